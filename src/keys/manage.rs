//! Key management shared by `tollgate keys` and `/admin/v1/keys`: what a new
//! key or a change may say, how its values are read (from flags or JSON) and
//! checked — every problem listed at once — and how a key is shown.
//!
//! Values and their rules:
//! - `name` (required on create, not empty, at most 200 characters), `team`
//!   (optional, same length rule);
//! - `rpm`, `max_concurrent` (0 – 4,294,967,295) and `input_tpm`,
//!   `output_tpm` (0 – 2^63−1): the key's own limits over `[limits]`;
//! - `budget_usd`: a decimal amount of dollars (string or JSON number; read
//!   exactly, at most 9 decimals), stored as nano-dollars; `budget_period`:
//!   `day` or `month` (UTC), `month` if not given;
//! - `expires` (or `expires_at` in JSON): a date (`2027-01-01`, UTC
//!   midnight), an RFC 3339 time, or a duration from now (`30d`, `12h`); never
//!   in the past;
//! - `shadow`: limits and budget are evaluated but not enforced.
//!
//! In a change, a value left out stays as it is and `null` (or a `--clear-…`
//! flag) removes it.

use chrono::{DateTime, NaiveDate, SecondsFormat, TimeZone, Utc};
use serde::Serialize;
use serde_json::{Map, Value};

use super::secret::{NewSecret, new_key_id};
use super::store::NewKeyRow;
use super::{KeyError, KeyKind, KeyLimitsOverride, KeyRecord, KeyStore};
use crate::budget::{Budget, BudgetPeriod, format_usd, parse_usd};

/// Longest name or team.
const MAX_LABEL_CHARS: usize = 200;

/// Everything a new key may say.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeySpec {
    pub name: String,
    pub team: Option<String>,
    pub limits: KeyLimitsOverride,
    pub budget_nanousd: Option<i64>,
    pub budget_period: Option<BudgetPeriod>,
    pub shadow: bool,
    pub expires_at: Option<DateTime<Utc>>,
}

/// A change to a key: `None` leaves a value as it is, `Some(None)` removes it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyPatch {
    pub name: Option<String>,
    pub team: Option<Option<String>>,
    pub rpm: Option<Option<u32>>,
    pub input_tpm: Option<Option<u64>>,
    pub output_tpm: Option<Option<u64>>,
    pub max_concurrent: Option<Option<u32>>,
    /// `Some(None)` removes the budget (amount and period).
    pub budget_nanousd: Option<Option<i64>>,
    pub budget_period: Option<BudgetPeriod>,
    pub shadow: Option<bool>,
    pub expires_at: Option<Option<DateTime<Utc>>>,
}

impl KeyPatch {
    /// Whether the patch changes nothing.
    pub fn is_empty(&self) -> bool {
        *self == KeyPatch::default()
    }

    /// The key with the patch applied, or every problem with the result.
    pub fn apply(&self, mut key: KeyRecord) -> Result<KeyRecord, Vec<String>> {
        let mut problems = Vec::new();
        if let Some(name) = &self.name {
            key.name = name.clone();
        }
        if let Some(team) = &self.team {
            key.team = team.clone();
        }
        let l = &mut key.limits;
        if let Some(v) = self.rpm {
            l.rpm = v;
        }
        if let Some(v) = self.input_tpm {
            l.input_tpm = v;
        }
        if let Some(v) = self.output_tpm {
            l.output_tpm = v;
        }
        if let Some(v) = self.max_concurrent {
            l.max_concurrent = v;
        }
        let amount = match self.budget_nanousd {
            Some(v) => v,
            None => key.budget.map(|b| b.nanousd),
        };
        key.budget = match (amount, self.budget_period) {
            (Some(nanousd), period) => Some(Budget {
                nanousd,
                period: period
                    .or(key.budget.map(|b| b.period))
                    .unwrap_or(BudgetPeriod::Month),
            }),
            (None, Some(_)) if self.budget_nanousd == Some(None) => {
                problems.push("budget_period cannot be set while removing the budget".to_owned());
                None
            }
            (None, Some(_)) => {
                problems.push("budget_period needs a budget: set budget_usd too".to_owned());
                None
            }
            (None, None) => None,
        };
        if let Some(shadow) = self.shadow {
            key.shadow = shadow;
        }
        if let Some(expires_at) = self.expires_at {
            key.expires_at = expires_at;
        }
        check_labels(&key.name, key.team.as_deref(), &mut problems);
        if problems.is_empty() {
            Ok(key)
        } else {
            Err(problems)
        }
    }
}

impl KeySpec {
    /// Checks the spec, listing every problem.
    pub fn check(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        check_labels(&self.name, self.team.as_deref(), &mut problems);
        if self.budget_period.is_some() && self.budget_nanousd.is_none() {
            problems.push("budget_period needs a budget: set budget_usd too".to_owned());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

fn check_labels(name: &str, team: Option<&str>, problems: &mut Vec<String>) {
    if name.trim().is_empty() {
        problems.push("name must not be empty".to_owned());
    }
    if name.chars().count() > MAX_LABEL_CHARS {
        problems.push(format!("name is longer than {MAX_LABEL_CHARS} characters"));
    }
    if let Some(team) = team {
        if team.trim().is_empty() {
            problems.push("team must not be empty (leave it out, or null, for no team)".to_owned());
        }
        if team.chars().count() > MAX_LABEL_CHARS {
            problems.push(format!("team is longer than {MAX_LABEL_CHARS} characters"));
        }
    }
}

/// A key just created, with the only copy of its secret.
pub struct CreatedKey {
    pub key: KeyRecord,
    /// The secret: show it once, never store or log it.
    pub secret: NewSecret,
}

/// Why a key could not be created.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CreateError {
    #[error("invalid key: {}", .0.join("; "))]
    Invalid(Vec<String>),
    #[error(transparent)]
    Store(#[from] KeyError),
}

/// Creates a virtual key from a checked spec.
pub async fn create_key(
    store: &KeyStore,
    spec: KeySpec,
    now: DateTime<Utc>,
) -> Result<CreatedKey, CreateError> {
    spec.check().map_err(CreateError::Invalid)?;
    let secret = NewSecret::generate();
    let key = KeyRecord {
        id: new_key_id(),
        name: spec.name,
        team: spec.team,
        kind: KeyKind::Virtual,
        key_prefix: secret.prefix.clone(),
        limits: spec.limits,
        budget: spec.budget_nanousd.map(|nanousd| Budget {
            nanousd,
            period: spec.budget_period.unwrap_or(BudgetPeriod::Month),
        }),
        shadow: spec.shadow,
        // Whole microseconds, as both backends store them, so the record
        // returned equals the record read back.
        created_at: truncate_to_micros(now),
        expires_at: spec.expires_at.map(truncate_to_micros),
        revoked_at: None,
    };
    store
        .insert(&NewKeyRow {
            record: key.clone(),
            secret_hash: secret.hash.clone(),
        })
        .await?;
    Ok(CreatedKey { key, secret })
}

fn truncate_to_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

/// Reads an expiry: a date (UTC midnight), an RFC 3339 time, or a duration
/// from `now` such as `30d`. It must be in the future.
pub fn parse_expiry(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let t = text.trim();
    let at = if let Ok(date) = NaiveDate::parse_from_str(t, "%Y-%m-%d") {
        Utc.from_utc_datetime(&date.and_time(chrono::NaiveTime::MIN))
    } else if let Ok(time) = DateTime::parse_from_rfc3339(t) {
        time.with_timezone(&Utc)
    } else if let Ok(d) = humantime::parse_duration(t) {
        chrono::Duration::from_std(d)
            .ok()
            .and_then(|d| now.checked_add_signed(d))
            .ok_or_else(|| format!("expires {t:?} is too far in the future"))?
    } else {
        return Err(format!(
            "expires {t:?} is not a date (2027-01-01), an RFC 3339 time or a duration (30d)"
        ));
    };
    if at <= now {
        return Err(format!(
            "expires {t:?} is in the past ({})",
            at.to_rfc3339_opts(SecondsFormat::Secs, true)
        ));
    }
    Ok(at)
}

/// Reads the JSON body of `POST /admin/v1/keys`.
pub fn spec_from_json(body: &Value, now: DateTime<Utc>) -> Result<KeySpec, Vec<String>> {
    let mut fields = Fields::new(body)?;
    let spec = KeySpec {
        name: fields.string("name").flatten().unwrap_or_default(),
        team: fields.string("team").flatten(),
        limits: KeyLimitsOverride {
            rpm: fields.u32("rpm").flatten(),
            input_tpm: fields.u64("input_tpm").flatten(),
            output_tpm: fields.u64("output_tpm").flatten(),
            max_concurrent: fields.u32("max_concurrent").flatten(),
        },
        budget_nanousd: fields.usd("budget_usd").flatten(),
        budget_period: fields.period("budget_period").flatten(),
        shadow: fields.bool("shadow").flatten().unwrap_or(false),
        expires_at: fields.expires(now).flatten(),
    };
    if !fields.map.contains_key("name") {
        fields.problems.push("name is required".to_owned());
    }
    fields.finish()?;
    spec.check()?;
    Ok(spec)
}

/// Reads the JSON body of `PATCH /admin/v1/keys/{id}`.
pub fn patch_from_json(body: &Value, now: DateTime<Utc>) -> Result<KeyPatch, Vec<String>> {
    let mut fields = Fields::new(body)?;
    let patch = KeyPatch {
        name: fields.required_string("name"),
        team: fields.string("team"),
        rpm: fields.u32("rpm"),
        input_tpm: fields.u64("input_tpm"),
        output_tpm: fields.u64("output_tpm"),
        max_concurrent: fields.u32("max_concurrent"),
        budget_nanousd: fields.usd("budget_usd"),
        budget_period: fields.period("budget_period").flatten(),
        shadow: fields.bool("shadow").flatten(),
        expires_at: fields.expires(now),
    };
    if fields.map.get("budget_period").is_some_and(Value::is_null) {
        fields.problems.push(
            "budget_period cannot be null: remove the budget with \"budget_usd\": null".to_owned(),
        );
    }
    if fields.map.get("shadow").is_some_and(Value::is_null) {
        fields
            .problems
            .push("shadow must be true or false".to_owned());
    }
    fields.finish()?;
    Ok(patch)
}

/// The fields of a JSON object, read one by one, collecting problems.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    problems: Vec<String>,
}

/// Every field a key body may have.
const KNOWN_FIELDS: &[&str] = &[
    "name",
    "team",
    "rpm",
    "input_tpm",
    "output_tpm",
    "max_concurrent",
    "budget_usd",
    "budget_period",
    "shadow",
    "expires",
    "expires_at",
];

impl<'a> Fields<'a> {
    fn new(body: &'a Value) -> Result<Fields<'a>, Vec<String>> {
        let map = body
            .as_object()
            .ok_or_else(|| vec!["the body must be a JSON object".to_owned()])?;
        let mut problems = Vec::new();
        for key in map.keys() {
            if !KNOWN_FIELDS.contains(&key.as_str()) {
                problems.push(format!(
                    "unknown field {key:?} (known: {})",
                    KNOWN_FIELDS.join(", ")
                ));
            }
        }
        Ok(Fields { map, problems })
    }

    fn finish(self) -> Result<(), Vec<String>> {
        if self.problems.is_empty() {
            Ok(())
        } else {
            Err(self.problems)
        }
    }

    /// `None`: absent; `Some(None)`: null; `Some(Some(v))`: a valid value.
    /// An invalid value is a problem and reads as absent.
    fn read<T>(
        &mut self,
        name: &str,
        parse: impl FnOnce(&Value) -> Result<T, String>,
    ) -> Option<Option<T>> {
        match self.map.get(name)? {
            Value::Null => Some(None),
            v => match parse(v) {
                Ok(t) => Some(Some(t)),
                Err(problem) => {
                    self.problems.push(format!("{name}: {problem}"));
                    None
                }
            },
        }
    }

    fn string(&mut self, name: &str) -> Option<Option<String>> {
        self.read(name, |v| {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("must be a string, got {v}"))
        })
    }

    fn required_string(&mut self, name: &str) -> Option<String> {
        match self.string(name) {
            Some(Some(s)) => Some(s),
            Some(None) => {
                self.problems.push(format!("{name} cannot be null"));
                None
            }
            None => None,
        }
    }

    fn u64(&mut self, name: &str) -> Option<Option<u64>> {
        self.read(name, |v| {
            v.as_u64()
                .filter(|n| i64::try_from(*n).is_ok())
                .ok_or_else(|| format!("must be a whole number from 0 to {}, got {v}", i64::MAX))
        })
    }

    fn u32(&mut self, name: &str) -> Option<Option<u32>> {
        self.read(name, |v| {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| format!("must be a whole number from 0 to {}, got {v}", u32::MAX))
        })
    }

    fn bool(&mut self, name: &str) -> Option<Option<bool>> {
        self.read(name, |v| {
            v.as_bool()
                .ok_or_else(|| format!("must be true or false, got {v}"))
        })
    }

    /// Dollars as a decimal string or a JSON number, read exactly from its
    /// decimal text (a JSON number's text is its shortest exact form).
    fn usd(&mut self, name: &str) -> Option<Option<i64>> {
        self.read(name, |v| match v {
            Value::String(s) => parse_usd(s),
            Value::Number(n) => parse_usd(&n.to_string()),
            other => Err(format!(
                "must be an amount of dollars like \"12.50\", got {other}"
            )),
        })
    }

    fn period(&mut self, name: &str) -> Option<Option<BudgetPeriod>> {
        self.read(name, |v| {
            v.as_str()
                .and_then(BudgetPeriod::parse)
                .ok_or_else(|| format!("must be \"day\" or \"month\", got {v}"))
        })
    }

    /// The expiry, under either name: `expires` (as the CLI flag) or
    /// `expires_at` (as shown).
    fn expires(&mut self, now: DateTime<Utc>) -> Option<Option<DateTime<Utc>>> {
        match (
            self.map.contains_key("expires"),
            self.map.contains_key("expires_at"),
        ) {
            (true, true) => {
                self.problems
                    .push("give expires or expires_at, not both".to_owned());
                None
            }
            (false, true) => self.expiry("expires_at", now),
            _ => self.expiry("expires", now),
        }
    }

    fn expiry(&mut self, name: &str, now: DateTime<Utc>) -> Option<Option<DateTime<Utc>>> {
        self.read(name, |v| match v.as_str() {
            Some(s) => parse_expiry(s, now),
            None => Err(format!(
                "must be a date, an RFC 3339 time or a duration as a string, got {v}"
            )),
        })
    }
}

/// A key as shown by the CLI and the admin API: the stored values, flat, with
/// the budget in exact dollars and the key's status now. Never the secret or
/// its hash.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeyView {
    pub id: String,
    pub name: String,
    pub team: Option<String>,
    pub kind: KeyKind,
    pub key_prefix: String,
    pub status: &'static str,
    pub rpm: Option<u32>,
    pub input_tpm: Option<u64>,
    pub output_tpm: Option<u64>,
    pub max_concurrent: Option<u32>,
    pub budget_usd: Option<String>,
    pub budget_nanousd: Option<i64>,
    pub budget_period: Option<BudgetPeriod>,
    pub shadow: bool,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub revoked_at: Option<String>,
}

impl KeyView {
    /// The view of `key` at `now`.
    pub fn of(key: &KeyRecord, now: DateTime<Utc>) -> KeyView {
        let time = |t: &DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Micros, true);
        KeyView {
            id: key.id.clone(),
            name: key.name.clone(),
            team: key.team.clone(),
            kind: key.kind,
            key_prefix: key.key_prefix.clone(),
            status: key.status(now).as_str(),
            rpm: key.limits.rpm,
            input_tpm: key.limits.input_tpm,
            output_tpm: key.limits.output_tpm,
            max_concurrent: key.limits.max_concurrent,
            budget_usd: key.budget.map(|b| format_usd(b.nanousd)),
            budget_nanousd: key.budget.map(|b| b.nanousd),
            budget_period: key.budget.map(|b| b.period),
            shadow: key.shadow,
            created_at: time(&key.created_at),
            expires_at: key.expires_at.as_ref().map(time),
            revoked_at: key.revoked_at.as_ref().map(time),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> DateTime<Utc> {
        "2026-01-10T12:00:00Z".parse().unwrap()
    }

    #[test]
    fn expiry_takes_dates_times_and_durations() {
        let n = now();
        assert_eq!(
            parse_expiry("2027-01-01", n).unwrap(),
            "2027-01-01T00:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        assert_eq!(
            parse_expiry("2026-02-01T10:00:00+02:00", n).unwrap(),
            "2026-02-01T08:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        assert_eq!(
            parse_expiry("30d", n).unwrap(),
            n + chrono::Duration::days(30)
        );
        assert!(
            parse_expiry("2020-01-01", n)
                .unwrap_err()
                .contains("in the past")
        );
        assert!(parse_expiry("soon", n).is_err());
    }

    #[test]
    fn create_body_lists_every_problem() {
        let body = json!({
            "name": 5, "rpm": -1, "max_concurrent": 1.5, "budget_usd": "1e3",
            "budget_period": "week", "expires": "yesterday", "colour": "red"
        });
        let problems = spec_from_json(&body, now()).unwrap_err();
        let all = problems.join("\n");
        for field in [
            "name",
            "rpm",
            "max_concurrent",
            "budget_usd",
            "budget_period",
            "expires",
            "colour",
        ] {
            assert!(all.contains(field), "{field} missing from:\n{all}");
        }
        assert_eq!(problems.len(), 7, "{all}");
    }

    #[test]
    fn create_body_reads_amounts_exactly() {
        let body = json!({"name": "a", "team": "t", "budget_usd": 0.1, "rpm": 60});
        let spec = spec_from_json(&body, now()).unwrap();
        assert_eq!(spec.budget_nanousd, Some(100_000_000));
        assert_eq!(spec.limits.rpm, Some(60));
        let body = json!({"name": "a", "budget_usd": "12.3456789012"});
        assert!(spec_from_json(&body, now()).unwrap_err()[0].contains("9 decimals"));
        assert_eq!(
            spec_from_json(&json!({}), now()).unwrap_err(),
            vec!["name is required".to_owned()]
        );
    }

    #[test]
    fn patch_distinguishes_absent_from_null() {
        let patch = patch_from_json(&json!({"team": null, "rpm": 10}), now()).unwrap();
        assert_eq!(patch.team, Some(None));
        assert_eq!(patch.rpm, Some(Some(10)));
        assert_eq!(patch.input_tpm, None);
        assert!(patch_from_json(&json!({"name": null}), now()).is_err());
        assert!(patch_from_json(&json!([1]), now()).is_err());
    }

    #[test]
    fn patch_keeps_or_defaults_the_budget_period() {
        let key = KeyRecord::unregistered_passthrough("pt_0000000000000000", now());
        let set = KeyPatch {
            budget_nanousd: Some(Some(5)),
            ..KeyPatch::default()
        };
        let key = set.apply(key).unwrap();
        assert_eq!(
            key.budget,
            Some(Budget {
                nanousd: 5,
                period: BudgetPeriod::Month
            })
        );
        let daily = KeyPatch {
            budget_period: Some(BudgetPeriod::Day),
            ..KeyPatch::default()
        };
        let key = daily.apply(key).unwrap();
        assert_eq!(
            key.budget.map(|b| (b.nanousd, b.period)),
            Some((5, BudgetPeriod::Day))
        );
        let clear = KeyPatch {
            budget_nanousd: Some(None),
            ..KeyPatch::default()
        };
        let key = clear.apply(key).unwrap();
        assert_eq!(key.budget, None);
        assert!(daily.apply(key).is_err(), "a period alone is not a budget");
    }
}
