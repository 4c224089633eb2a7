//! The price table file: its raw TOML shape, exact decimal reading, and the
//! validation that turns it into a [`PriceTable`].
//!
//! Reading happens in two stages, like the main configuration: serde reads the
//! raw structs (unknown keys and missing required keys are rejected there, with
//! the line), then [`build`] checks every value and reports every problem at
//! once, each prefixed with its TOML path.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use sha2::{Digest, Sha256};

use super::{MatchKind, ModelPrice, Multiplier, PriceTable, Rates};

/// Decimal places allowed in a price (USD per million tokens): nine, so a
/// price is an exact whole number of femto-dollars per token.
const PRICE_DECIMALS: u32 = 9;
/// Decimal places allowed in a multiplier: three, so a multiplier is an exact
/// whole number of thousandths.
const MULTIPLIER_DECIMALS: u32 = 3;
/// The largest price accepted, in USD per million tokens. Far above any list
/// price; it bounds the arithmetic so that a typo cannot overflow a cost.
const MAX_PRICE_USD: u128 = 1_000_000;
/// The largest multiplier accepted, for the same reason.
const MAX_MULTIPLIER: u128 = 1_000;
/// Hex digits of the SHA-256 kept as the table's version.
const VERSION_HEX_DIGITS: usize = 12;

/// Why a price table could not be loaded. Each variant names the file (or
/// `(inline)` for a table given as a string).
#[derive(Debug, thiserror::Error)]
pub enum PriceError {
    /// The file could not be read (missing, unreadable, not UTF-8).
    #[error("cannot read price table {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The text is not TOML, or does not have the table's shape: an unknown
    /// key, a missing required key, a float where a decimal string belongs.
    #[error("price table {origin} cannot be read: {source}")]
    Parse {
        origin: String,
        #[source]
        source: toml::de::Error,
    },
    /// The unpriced-requests metric could not be registered (a second
    /// [`super::Pricer`] on the same registry).
    #[error("cannot register the price table's metric: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The shape is right but values are not: every problem is listed.
    #[error("price table {origin} is invalid:\n  - {}", problems.join("\n  - "))]
    Invalid {
        origin: String,
        problems: Vec<String>,
    },
}

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    rules: RawRules,
    models: BTreeMap<String, RawModel>,
}

/// `[rules]`: the multipliers and fees that apply to every model.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRules {
    cache_write_5m_multiplier: DecimalText,
    cache_write_1h_multiplier: DecimalText,
    cache_read_multiplier: DecimalText,
    batch_multiplier: DecimalText,
    us_only_multiplier: DecimalText,
    web_search_per_1000: DecimalText,
    long_context_threshold_tokens: u64,
}

/// One `[models."<id or prefix>"]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    #[serde(rename = "match", default)]
    match_kind: RawMatch,
    input: DecimalText,
    output: DecimalText,
    cache_write_5m: Option<DecimalText>,
    cache_write_1h: Option<DecimalText>,
    cache_read: Option<DecimalText>,
    long_context_input: Option<DecimalText>,
    long_context_output: Option<DecimalText>,
    #[serde(default)]
    us_only_premium: bool,
    #[serde(default)]
    legacy: bool,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawMatch {
    #[default]
    Exact,
    Prefix,
}

/// A decimal number as written in the file, kept as text until validation
/// reads it at the scale its key needs. Accepts a string or a TOML integer;
/// rejects a TOML float, which cannot hold most decimal fractions exactly.
#[derive(Debug)]
struct DecimalText(String);

impl<'de> Deserialize<'de> for DecimalText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DecimalVisitor;

        impl Visitor<'_> for DecimalVisitor {
            type Value = DecimalText;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a decimal number written as a string, e.g. \"3.00\"")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<DecimalText, E> {
                Ok(DecimalText(v.to_owned()))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<DecimalText, E> {
                Ok(DecimalText(v.to_string()))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<DecimalText, E> {
                Ok(DecimalText(v.to_string()))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<DecimalText, E> {
                Err(E::custom(format!(
                    "{v} is a float, which cannot be read exactly; write it as a string, \
                     e.g. \"{v}\""
                )))
            }
        }

        deserializer.deserialize_any(DecimalVisitor)
    }
}

/// Parses, validates and indexes a price table. `origin` names the source in
/// errors.
pub(super) fn parse(text: &str, origin: &str) -> Result<PriceTable, PriceError> {
    let raw: RawTable = toml::from_str(text).map_err(|source| PriceError::Parse {
        origin: origin.to_owned(),
        source,
    })?;
    let version = version_of(text.as_bytes());
    build(raw, version).map_err(|problems| PriceError::Invalid {
        origin: origin.to_owned(),
        problems,
    })
}

/// The first hex digits of the SHA-256 of the file's bytes.
fn version_of(bytes: &[u8]) -> String {
    let digest = hex::encode(Sha256::digest(bytes));
    digest[..VERSION_HEX_DIGITS].to_owned()
}

/// Collects problems while values are read, so all of them are reported.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    /// Reads a price in USD per million tokens as femto-dollars per token.
    fn price(&mut self, at: &str, value: &DecimalText) -> u128 {
        self.decimal(at, value, PRICE_DECIMALS, MAX_PRICE_USD)
    }

    /// Reads a multiplier as thousandths.
    fn multiplier(&mut self, at: &str, value: &DecimalText) -> Multiplier {
        Multiplier(self.decimal(at, value, MULTIPLIER_DECIMALS, MAX_MULTIPLIER))
    }

    fn decimal(&mut self, at: &str, value: &DecimalText, decimals: u32, max: u128) -> u128 {
        match parse_decimal(&value.0, decimals) {
            Ok(n) if n <= max * 10u128.pow(decimals) => n,
            Ok(_) => {
                self.0
                    .push(format!("{at}: {:?} is above the limit of {max}", value.0));
                0
            }
            Err(why) => {
                self.0.push(format!("{at}: {:?} {why}", value.0));
                0
            }
        }
    }

    fn push(&mut self, problem: String) {
        self.0.push(problem);
    }
}

/// Reads a non-negative decimal (`"3"`, `"3.00"`, `"0.8"`) as an integer count
/// of `10^-decimals` units, exactly. Returns why it cannot, as a phrase.
fn parse_decimal(text: &str, decimals: u32) -> Result<u128, String> {
    if text.starts_with('-') {
        return Err("must not be negative".to_owned());
    }
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !all_digits(whole) || !all_digits(fraction) || text.ends_with('.') {
        return Err("is not a decimal number like \"3.00\"".to_owned());
    }
    if fraction.len() > decimals as usize {
        return Err(format!("has more than {decimals} decimal places"));
    }
    // A whole part longer than 20 digits cannot be below any limit we accept,
    // and stopping here keeps the arithmetic below from overflowing.
    if whole.trim_start_matches('0').len() > 20 {
        return Err("is too large".to_owned());
    }
    let mut units: u128 = 0;
    for digit in whole.bytes().chain(fraction.bytes()) {
        units = units * 10 + u128::from(digit - b'0');
    }
    // `fraction.len() <= decimals` was checked above, so this cannot underflow.
    Ok(units * 10u128.pow(decimals - fraction.len() as u32))
}

/// A price charged as written, in atto-dollars per token.
fn as_is(femtousd_per_token: u128) -> u128 {
    Multiplier::ONE.apply(femtousd_per_token)
}

/// Checks every value and builds the indexed table.
fn build(raw: RawTable, version: String) -> Result<PriceTable, Vec<String>> {
    let mut problems = Problems::default();
    let rules = &raw.rules;
    let write_5m = problems.multiplier(
        "rules.cache_write_5m_multiplier",
        &rules.cache_write_5m_multiplier,
    );
    let write_1h = problems.multiplier(
        "rules.cache_write_1h_multiplier",
        &rules.cache_write_1h_multiplier,
    );
    let read = problems.multiplier("rules.cache_read_multiplier", &rules.cache_read_multiplier);
    let batch = problems.multiplier("rules.batch_multiplier", &rules.batch_multiplier);
    let us_only = problems.multiplier("rules.us_only_multiplier", &rules.us_only_multiplier);
    // Nano-dollars per 1,000 requests is atto-dollars per request / 10^6.
    let web_search_nano_per_1000 = problems.decimal(
        "rules.web_search_per_1000",
        &rules.web_search_per_1000,
        PRICE_DECIMALS,
        MAX_PRICE_USD,
    );
    if raw.models.is_empty() {
        problems
            .push("models: the table prices no model; add at least one [models.\"…\"]".to_owned());
    }

    let mut exact = HashMap::new();
    let mut prefixes = Vec::new();
    for (key, model) in &raw.models {
        let at = format!("models.{key:?}");
        if key.trim().is_empty() || key.trim() != key {
            problems.push(format!(
                "{at}: a model id must be non-empty, without surrounding spaces"
            ));
        }
        let input = problems.price(&format!("{at}.input"), &model.input);
        let output = problems.price(&format!("{at}.output"), &model.output);
        let mut direct = |name: &str, value: &Option<DecimalText>| {
            value
                .as_ref()
                .map(|v| problems.price(&format!("{at}.{name}"), v))
        };
        let write_5m_price = direct("cache_write_5m", &model.cache_write_5m);
        let write_1h_price = direct("cache_write_1h", &model.cache_write_1h);
        let read_price = direct("cache_read", &model.cache_read);
        let long_input = direct("long_context_input", &model.long_context_input);
        let long_output = direct("long_context_output", &model.long_context_output);

        let standard = Rates {
            input: as_is(input),
            output: as_is(output),
            cache_write_5m: write_5m_price.map_or(write_5m.apply(input), as_is),
            cache_write_1h: write_1h_price.map_or(write_1h.apply(input), as_is),
            cache_read: read_price.map_or(read.apply(input), as_is),
        };
        let overrides_cache =
            write_5m_price.is_some() || write_1h_price.is_some() || read_price.is_some();
        let long_context = match (long_input, long_output) {
            (Some(input), Some(output)) => {
                if overrides_cache {
                    problems.push(format!(
                        "{at}: a model with long_context prices cannot also override cache \
                         prices (the long-context cache prices follow the multipliers)"
                    ));
                }
                Some(Rates {
                    input: as_is(input),
                    output: as_is(output),
                    cache_write_5m: write_5m.apply(input),
                    cache_write_1h: write_1h.apply(input),
                    cache_read: read.apply(input),
                })
            }
            (None, None) => None,
            _ => {
                problems.push(format!(
                    "{at}: long_context_input and long_context_output go together; set both or \
                     neither"
                ));
                None
            }
        };
        let match_kind = match model.match_kind {
            RawMatch::Exact => MatchKind::Exact,
            RawMatch::Prefix => MatchKind::Prefix,
        };
        let price = ModelPrice {
            key: key.clone(),
            match_kind,
            legacy: model.legacy,
            standard,
            long_context,
            us_only_premium: model.us_only_premium,
        };
        match match_kind {
            MatchKind::Exact => {
                exact.insert(key.clone(), price);
            }
            MatchKind::Prefix => prefixes.push(price),
        }
    }
    if !problems.0.is_empty() {
        return Err(problems.0);
    }
    // Longest first, so the first prefix that matches is the longest one.
    prefixes.sort_by(|a, b| {
        b.key
            .len()
            .cmp(&a.key.len())
            .then_with(|| a.key.cmp(&b.key))
    });
    Ok(PriceTable {
        version,
        exact,
        prefixes,
        batch,
        us_only,
        web_search_atto_per_request: web_search_nano_per_1000 * 1_000_000,
        long_context_threshold_tokens: rules.long_context_threshold_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_read_exactly() {
        assert_eq!(parse_decimal("3", 9), Ok(3_000_000_000));
        assert_eq!(parse_decimal("3.00", 9), Ok(3_000_000_000));
        assert_eq!(parse_decimal("0.8", 9), Ok(800_000_000));
        assert_eq!(parse_decimal("22.50", 9), Ok(22_500_000_000));
        assert_eq!(parse_decimal("0.000000001", 9), Ok(1));
        assert_eq!(parse_decimal("1.25", 3), Ok(1_250));
        assert_eq!(parse_decimal("0.1", 3), Ok(100));
        assert_eq!(parse_decimal("007", 3), Ok(7_000));
    }

    #[test]
    fn malformed_decimals_are_refused() {
        for text in [
            "", ".5", "5.", "1.2.3", "1e3", " 1", "1,5", "$3", "+1", "abc",
        ] {
            assert!(parse_decimal(text, 9).is_err(), "{text:?} was accepted");
        }
        assert_eq!(
            parse_decimal("-1", 9),
            Err("must not be negative".to_owned())
        );
        assert!(parse_decimal("0.0000000001", 9).is_err());
        assert!(parse_decimal("1.2345", 3).is_err());
        assert!(parse_decimal("999999999999999999999999", 3).is_err());
    }

    #[test]
    fn version_is_a_sha256_prefix() {
        // SHA-256("") = e3b0c44298fc1c149afbf4c8996fb924...
        assert_eq!(version_of(b""), "e3b0c44298fc");
    }
}
