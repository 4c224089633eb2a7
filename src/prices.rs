//! Prices: the list-price table (`config/prices.toml`) and the exact cost of
//! one response, computed when its usage record is finalised.
//!
//! Money is integers end to end, never floating point. The file's decimal
//! strings are read exactly: a price in USD per million tokens becomes
//! femto-dollars (1e-15 USD) per token ($3/MTok = 3,000,000,000), a multiplier
//! becomes thousandths (1.25 = 1,250). At load time each model's per-category
//! rates are precomputed in atto-dollars (1e-18 USD) per token, which holds
//! every price times every multiplier exactly. A cost is the exact sum of
//! tokens × rate × request multipliers in `u128`, rounded once, half up, to a
//! whole nano-dollar (the unit of `usage_events.cost_nanousd`). Arithmetic is
//! checked: at list prices a request would need over 10^18 tokens to
//! overflow, and such a cost is reported as unpriced, never wrapped.
//!
//! The pricing rules themselves (cache writes, batch, long context, US-only
//! inference, web search, model matching) are documented where finance reads
//! them: at the top of `config/prices.toml`.

mod file;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use prometheus::{IntCounter, Registry};

use crate::config::PricesConfig;
use crate::meter::Usage;

pub use file::PriceError;

/// The `anthropic-beta` value that opens the 1M-token context window, and with
/// it long-context pricing on the models that have it.
pub const LONG_CONTEXT_BETA: &str = "context-1m-2025-08-07";

/// The price table shipped in `config/prices.toml`, compiled in so that a
/// binary run without that file still prices at list prices (and stamps the
/// same version as the shipped file).
const BUILTIN_TABLE: &str = include_str!("../config/prices.toml");

/// Atto-dollars per nano-dollar.
const ATTO_PER_NANO: u128 = 1_000_000_000;
/// How many distinct unknown model names get their own warning. Past this,
/// unknown models are still counted but no longer logged one by one, so a
/// stream of invented names cannot grow memory or flood the log.
const MAX_WARNED_MODELS: usize = 256;

/// How a table entry matches model ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchKind {
    /// The id must equal the entry's key.
    Exact,
    /// The id must start with the key, then end or continue with a character
    /// that is not an ASCII letter or digit.
    Prefix,
}

/// A multiplier in thousandths (1.25 is 1,250), exact for the list multipliers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Multiplier(u128);

impl Multiplier {
    /// Thousandths in one.
    const SCALE: u128 = 1_000;
    const ONE: Multiplier = Multiplier(Self::SCALE);

    /// Femto-dollars per token times this multiplier, in atto-dollars per
    /// token: exact, because femto × thousandths = atto.
    fn apply(self, femtousd_per_token: u128) -> u128 {
        femtousd_per_token * self.0
    }
}

/// Per-token rates of one pricing regime, in atto-dollars (1e-18 USD) per
/// token. $3/MTok is 3,000,000,000,000 atto-dollars per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rates {
    pub input: u128,
    pub output: u128,
    /// Tokens written to the 5-minute cache.
    pub cache_write_5m: u128,
    /// Tokens written to the 1-hour cache.
    pub cache_write_1h: u128,
    pub cache_read: u128,
}

/// The prices of one table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPrice {
    key: String,
    match_kind: MatchKind,
    legacy: bool,
    standard: Rates,
    long_context: Option<Rates>,
    us_only_premium: bool,
}

impl ModelPrice {
    /// The entry's key in the file: a model id, or a prefix of ids.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Whether the entry matches exactly or by prefix.
    pub fn match_kind(&self) -> MatchKind {
        self.match_kind
    }

    /// True for models Anthropic has retired (informational).
    pub fn is_legacy(&self) -> bool {
        self.legacy
    }

    /// The rates at or below the long-context threshold.
    pub fn standard(&self) -> &Rates {
        &self.standard
    }

    /// The rates above the long-context threshold, for models that have them.
    pub fn long_context(&self) -> Option<&Rates> {
        self.long_context.as_ref()
    }

    /// Whether US-only inference costs the table's `us_only_multiplier` more.
    pub fn has_us_only_premium(&self) -> bool {
        self.us_only_premium
    }

    /// Whether this entry covers `model`.
    fn matches(&self, model: &str) -> bool {
        match self.match_kind {
            MatchKind::Exact => model == self.key,
            MatchKind::Prefix => match model.strip_prefix(self.key.as_str()) {
                Some(rest) => {
                    self.key.ends_with(|c: char| !c.is_ascii_alphanumeric())
                        || !rest.starts_with(|c: char| c.is_ascii_alphanumeric())
                }
                None => false,
            },
        }
    }
}

/// What to price: one response's usage and the request facts that change the
/// price.
#[derive(Debug, Clone, Copy)]
pub struct CostQuery<'a> {
    /// The model the response names (else the one the request asked for).
    pub model: &'a str,
    pub usage: &'a Usage,
    /// The request's `anthropic-beta` header carried [`LONG_CONTEXT_BETA`]
    /// (see [`is_long_context_beta`]).
    pub long_context_beta: bool,
}

/// The loaded, validated price table. Immutable; share it behind an `Arc`.
#[derive(Debug, Clone)]
pub struct PriceTable {
    version: String,
    exact: HashMap<String, ModelPrice>,
    /// Prefix entries, longest key first.
    prefixes: Vec<ModelPrice>,
    batch: Multiplier,
    us_only: Multiplier,
    web_search_atto_per_request: u128,
    long_context_threshold_tokens: u64,
}

impl PriceTable {
    /// Reads, parses and validates the price table at `path`. Errors name the
    /// path and list every invalid value.
    pub fn load(path: &Path) -> Result<PriceTable, PriceError> {
        let text = std::fs::read_to_string(path).map_err(|source| PriceError::Read {
            path: path.to_owned(),
            source,
        })?;
        file::parse(&text, &path.display().to_string())
    }

    /// Parses and validates a price table given as text (errors say
    /// `(inline)` where [`PriceTable::load`] gives the path).
    pub fn from_toml_str(text: &str) -> Result<PriceTable, PriceError> {
        file::parse(text, "(inline)")
    }

    /// The table shipped in `config/prices.toml`, as compiled into the binary.
    pub fn builtin() -> Result<PriceTable, PriceError> {
        file::parse(BUILTIN_TABLE, "(built-in config/prices.toml)")
    }

    /// The table's version: the first 12 hex digits of the SHA-256 of its
    /// bytes, stored as `price_version` next to every cost.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The entry pricing `model`: an exact entry if there is one, else the
    /// longest matching prefix entry.
    pub fn price_for(&self, model: &str) -> Option<&ModelPrice> {
        self.exact
            .get(model)
            .or_else(|| self.prefixes.iter().find(|entry| entry.matches(model)))
    }

    /// The cost of one response in nano-dollars, exact to the rule in the
    /// module doc. `None` when the model has no entry (or, absurdly, when the
    /// cost does not fit an `i64`). A response with no billable usage at all
    /// costs `Some(0)` whatever its model, so failed requests naming a model
    /// that does not exist are not reported as unpriced.
    pub fn cost(&self, q: &CostQuery<'_>) -> Option<i64> {
        let Some(price) = self.price_for(q.model) else {
            return is_unbilled(q.usage).then_some(0);
        };
        let u = q.usage;
        let (write_5m, write_1h) = cache_writes(u);
        let total_input = u128::from(u.input_tokens)
            + u128::from(u.cache_read_input_tokens)
            + u128::from(write_5m)
            + u128::from(write_1h);
        let rates = match &price.long_context {
            Some(long)
                if q.long_context_beta
                    && total_input > u128::from(self.long_context_threshold_tokens) =>
            {
                long
            }
            _ => &price.standard,
        };
        let tokens_atto = [
            (u.input_tokens, rates.input),
            (u.output_tokens, rates.output),
            (write_5m, rates.cache_write_5m),
            (write_1h, rates.cache_write_1h),
            (u.cache_read_input_tokens, rates.cache_read),
        ]
        .into_iter()
        .try_fold(0u128, |sum, (tokens, rate)| {
            sum.checked_add(u128::from(tokens).checked_mul(rate)?)
        })?;

        let batch = if u.service_tier.as_deref() == Some("batch") {
            self.batch
        } else {
            Multiplier::ONE
        };
        let us_only = u
            .inference_geo
            .as_deref()
            .is_some_and(|g| g.eq_ignore_ascii_case("us"));
        let geo = if us_only && price.us_only_premium {
            self.us_only
        } else {
            Multiplier::ONE
        };

        // Everything is now in atto-dollars × thousandths²; the web search fee
        // is flat (the multipliers apply to tokens only) so it is scaled up to
        // the same unit rather than multiplied.
        let scale = Multiplier::SCALE * Multiplier::SCALE;
        let tokens_scaled = tokens_atto.checked_mul(batch.0)?.checked_mul(geo.0)?;
        let web_scaled = u128::from(u.web_search_requests)
            .checked_mul(self.web_search_atto_per_request)?
            .checked_mul(scale)?;
        let total = tokens_scaled.checked_add(web_scaled)?;
        let unit = ATTO_PER_NANO * scale;
        let nano = total.checked_add(unit / 2)? / unit;
        i64::try_from(nano).ok()
    }
}

/// Whether one `anthropic-beta` header value (a comma-separated list) carries
/// [`LONG_CONTEXT_BETA`].
pub fn is_long_context_beta(anthropic_beta: &str) -> bool {
    anthropic_beta
        .split(',')
        .any(|beta| beta.trim() == LONG_CONTEXT_BETA)
}

/// Loads the configured price table into a [`Pricer`] registered on
/// `registry`. When `prices.file` is the default path and no file is there,
/// the built-in copy of the shipped table is used (with a warning, so an
/// operator whose edited table was not found learns it); any other missing
/// or invalid file is an error.
pub fn load_configured(
    config: &PricesConfig,
    registry: &Registry,
) -> Result<Arc<Pricer>, PriceError> {
    let path = config.file.as_path();
    let default_path = PricesConfig::default().file;
    let table = if path == default_path && !path.exists() {
        let table = PriceTable::builtin()?;
        tracing::warn!(
            path = %path.display(),
            price_version = table.version(),
            "price table file not found; using the built-in list prices"
        );
        table
    } else {
        let table = PriceTable::load(path)?;
        tracing::info!(path = %path.display(), price_version = table.version(), "price table loaded");
        table
    };
    Ok(Arc::new(Pricer::new(table, registry)?))
}

/// The 5-minute and 1-hour cache writes to price. Without a split, all writes
/// are 5-minute; with one, the 1-hour figure is taken as given and any writes
/// the split leaves out of `cache_creation_input_tokens` are priced as
/// 5-minute, so no written token goes unpriced.
fn cache_writes(u: &Usage) -> (u64, u64) {
    let write_1h = u.cache_creation_1h_tokens.unwrap_or(0);
    let write_5m = u
        .cache_creation_5m_tokens
        .unwrap_or(0)
        .max(u.cache_creation_input_tokens.saturating_sub(write_1h));
    (write_5m, write_1h)
}

/// True when the usage has nothing to bill.
fn is_unbilled(u: &Usage) -> bool {
    let (write_5m, write_1h) = cache_writes(u);
    u.input_tokens == 0
        && u.output_tokens == 0
        && write_5m == 0
        && write_1h == 0
        && u.cache_read_input_tokens == 0
        && u.web_search_requests == 0
}

/// Prices finalised records with a [`PriceTable`] and reports the ones it
/// cannot price: each is counted in `tollgate_unpriced_requests_total`, and
/// each unknown model name is logged once (not once per request).
#[derive(Debug)]
pub struct Pricer {
    table: PriceTable,
    unpriced: IntCounter,
    warned: Mutex<WarnedModels>,
}

/// The unknown model names already logged.
#[derive(Debug, Default)]
struct WarnedModels {
    /// At most `MAX_WARNED_MODELS` names.
    names: HashSet<String>,
    /// The notice that further names go unlogged was given.
    gave_up: bool,
}

impl Pricer {
    /// Wraps `table` and registers `tollgate_unpriced_requests_total` on
    /// `registry`. The counter has no `model` label, to keep cardinality
    /// bounded; the model names are in the log.
    pub fn new(table: PriceTable, registry: &Registry) -> Result<Pricer, PriceError> {
        let unpriced = IntCounter::new(
            "tollgate_unpriced_requests_total",
            "Requests recorded with a NULL cost because their model has no price.",
        )?;
        registry.register(Box::new(unpriced.clone()))?;
        Ok(Pricer {
            table,
            unpriced,
            warned: Mutex::new(WarnedModels::default()),
        })
    }

    /// The table in use.
    pub fn table(&self) -> &PriceTable {
        &self.table
    }

    /// The table's version, to store as `price_version`.
    pub fn version(&self) -> &str {
        self.table.version()
    }

    /// [`PriceTable::cost`], counting and logging a cost that is `None`.
    pub fn cost(&self, q: &CostQuery<'_>) -> Option<i64> {
        let cost = self.table.cost(q);
        if cost.is_none() {
            self.unpriced.inc();
            if self.table.price_for(q.model).is_some() {
                tracing::error!(model = q.model, usage = ?q.usage, "cost does not fit in i64 nano-dollars; recorded as NULL");
            } else {
                self.warn_unknown(q.model);
            }
        }
        cost
    }

    fn warn_unknown(&self, model: &str) {
        // A poisoned lock only means another thread panicked mid-insert; the
        // set is still usable for deciding whether to log.
        let mut warned = self
            .warned
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if warned.names.contains(model) {
            return;
        }
        if warned.names.len() < MAX_WARNED_MODELS {
            warned.names.insert(model.to_owned());
            tracing::warn!(
                model,
                price_version = self.table.version(),
                "model has no price in the price table; its requests are recorded with a NULL cost"
            );
        } else if !warned.gave_up {
            warned.gave_up = true;
            tracing::warn!(
                "more than {MAX_WARNED_MODELS} unpriced model names; further ones are counted \
                 in tollgate_unpriced_requests_total but not logged"
            );
        }
    }
}
