//! Budgets: spend caps per key per UTC day or month, from the ledger's costs.
//!
//! A key's [`Budget`] is an amount of nano-dollars per [`BudgetPeriod`]. The
//! proxy asks [`Budgets::check`] at admission and tells [`Budgets::add`] the
//! cost of every finalised record. The running total of a key is:
//! - **seeded from the ledger**: at start for every key with a budget (one
//!   query), and lazily at the first check of a key that got its budget later —
//!   the sum of `usage_events.cost_nanousd` of the key since the start of the
//!   current UTC day and month ([`seed`]);
//! - **kept up to date in memory** ([`totals`]) by `add`, which files each cost
//!   under the period its request *started* in (the ledger's `started_at`), so
//!   a request that starts before midnight and ends after it counts for the
//!   day it started, in memory as in the ledger;
//! - **reset by period rollover**: at UTC midnight (or the 1st of the month) a
//!   total starts again from 0; nothing needs to run at that moment.
//!
//! With `limits.backend = "redis"` the totals are shared by the replicas
//! ([`redis`]): each (key, period start) is one Redis integer, seeded from the
//! ledger with `SET NX` and increased with `INCRBY`. While Redis cannot be
//! reached, decisions use this replica's local totals.
//!
//! Money is integer nano-dollars throughout ([`parse_usd`] reads a decimal
//! string exactly; [`format_usd`] writes one back).

mod metrics;
pub mod redis;
mod seed;
mod totals;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use chrono::{DateTime, Datelike, NaiveDate, SecondsFormat, TimeZone, Utc};
use prometheus::Registry;

use crate::config::{Config, LimitsBackend};
use crate::keys::KeyRecord;
use crate::ledger::store::Store;

pub use metrics::BudgetMetrics;
pub use redis::RedisBudgetHandle;

use totals::KeyTotals;

/// Nano-dollars in one US dollar.
pub const NANOUSD_PER_USD: i64 = 1_000_000_000;

/// The span a budget covers. Periods are UTC calendar days and months.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetPeriod {
    Day,
    Month,
}

impl BudgetPeriod {
    /// The stored name (`api_keys.budget_period`).
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetPeriod::Day => "day",
            BudgetPeriod::Month => "month",
        }
    }

    /// Parses a stored or typed name.
    pub fn parse(s: &str) -> Option<BudgetPeriod> {
        match s {
            "day" => Some(BudgetPeriod::Day),
            "month" => Some(BudgetPeriod::Month),
            _ => None,
        }
    }

    /// The start of the period that contains `at`: UTC midnight of its day, or
    /// of the first of its month.
    pub fn start(self, at: DateTime<Utc>) -> DateTime<Utc> {
        let day = at.date_naive();
        let first = match self {
            BudgetPeriod::Day => day,
            BudgetPeriod::Month => day.with_day(1).unwrap_or(day),
        };
        midnight(first)
    }

    /// The start of the period after the one that contains `at`.
    pub fn next_start(self, at: DateTime<Utc>) -> DateTime<Utc> {
        let day = at.date_naive();
        let next = match self {
            BudgetPeriod::Day => day.succ_opt(),
            BudgetPeriod::Month => {
                let (y, m) = if day.month() == 12 {
                    (day.year() + 1, 1)
                } else {
                    (day.year(), day.month() + 1)
                };
                NaiveDate::from_ymd_opt(y, m, 1)
            }
        };
        next.map(midnight).unwrap_or(DateTime::<Utc>::MAX_UTC)
    }
}

fn midnight(day: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&day.and_time(chrono::NaiveTime::MIN))
}

impl fmt::Display for BudgetPeriod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A spend cap: at most `nanousd` per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub nanousd: i64,
    pub period: BudgetPeriod,
}

/// Reads a dollar amount written as a decimal (`12.50`, `0.000000001`, `3`)
/// exactly into nano-dollars. No sign, no exponent, at most 9 decimals (a
/// nano-dollar), at most 9,223,372,036 dollars.
pub fn parse_usd(text: &str) -> Result<i64, String> {
    let t = text.trim();
    let t = t.strip_prefix('$').unwrap_or(t);
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && frac.is_empty()) || !digits(whole) || !digits(frac) {
        return Err(format!(
            "{text:?} is not an amount in US dollars like 12.50 (digits and one decimal point)"
        ));
    }
    if frac.len() > 9 {
        return Err(format!(
            "{text:?} has more than 9 decimals: the smallest amount is one nano-dollar (0.000000001)"
        ));
    }
    let too_large = || format!("{text:?} is too large");
    let whole: i64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| too_large())?
    };
    let frac_nanos: i64 = if frac.is_empty() {
        0
    } else {
        // Pad to 9 digits: "5" is 500,000,000 nano-dollars.
        format!("{frac:0<9}").parse().map_err(|_| too_large())?
    };
    whole
        .checked_mul(NANOUSD_PER_USD)
        .and_then(|n| n.checked_add(frac_nanos))
        .ok_or_else(too_large)
}

/// Writes nano-dollars as exact dollars with at least two decimals:
/// 12,500,000,000 is `12.50`, 1 is `0.000000001`.
pub fn format_usd(nanousd: i64) -> String {
    let sign = if nanousd < 0 { "-" } else { "" };
    let n = nanousd.unsigned_abs();
    let per = NANOUSD_PER_USD.unsigned_abs();
    let frac = format!("{:09}", n % per);
    let frac = frac.trim_end_matches('0');
    let frac = if frac.len() < 2 {
        format!("{frac:0<2}")
    } else {
        frac.to_owned()
    };
    format!("{sign}{}.{frac}", n / per)
}

/// Where budgets read the time: the system clock, or a test's.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> DateTime<Utc>;
}

/// The system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// The answer of [`Budgets::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BudgetDecision {
    /// The request may go. `remaining_nanousd` is what is left of the budget
    /// (`None`: the key has no budget).
    Ok { remaining_nanousd: Option<i64> },
    /// The budget is spent: answer 402 `billing_error` (unless the key is in
    /// shadow mode).
    Exhausted(BudgetExhausted),
}

/// A spent budget, with what the 402 message needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetExhausted {
    pub spent_nanousd: i64,
    pub budget_nanousd: i64,
    pub period: BudgetPeriod,
    /// When the period ends and the total starts again from 0.
    pub resets_at: DateTime<Utc>,
}

impl BudgetExhausted {
    /// The message of the 402 `billing_error`, e.g. "this key's budget of
    /// $12.50 per day is spent ($12.503 used); it resets at 2026-01-02T00:00:00Z".
    pub fn message(&self) -> String {
        format!(
            "this key's budget of ${} per {} is spent (${} used); it resets at {}",
            format_usd(self.budget_nanousd),
            self.period,
            format_usd(self.spent_nanousd),
            self.resets_at.to_rfc3339_opts(SecondsFormat::Secs, true),
        )
    }

    /// Time until the reset, for a `retry-after` if the caller wants one.
    pub fn resets_in(&self, now: DateTime<Utc>) -> std::time::Duration {
        (self.resets_at - now).to_std().unwrap_or_default()
    }
}

/// Why budgets could not start.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error("cannot register the budget metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("invalid limits.redis_url for budgets: {0}")]
    Redis(String),
}

/// Running spend per key and period, checked at admission.
///
/// **Overshoot policy.** A request is admitted while the key's spent total is
/// below its budget; once `spent >= budget`, every new request is refused
/// (402) until the period resets. A request's cost is only known when it ends,
/// so requests already in flight when the budget runs out are not cut: they
/// finish and their cost counts. Spend can therefore exceed the budget by the
/// cost of the requests that were in flight at that moment (plus, with Redis,
/// the few milliseconds before other replicas' costs arrive). A budget of 0
/// admits nothing.
///
/// **Across replicas.** With the local backend each replica counts its own
/// spend on top of the ledger's total at its start (or at the first check of
/// the key), so N replicas can together spend up to N budgets' worth before
/// any of them notices; use `limits.backend = "redis"` to share one total.
/// With Redis, a total is seeded from the ledger once per (key, period) with
/// `SET NX` — a replica starting later keeps the value already there, so the
/// seed is never counted twice — and then only grows by `INCRBY` of each
/// finalised cost. Costs whose ledger rows were still on their way to the
/// store (journal → batch writer, ~100 ms) when a seed was read are missed by a
/// local seed; a Redis total that must be re-seeded mid-period (Redis lost its
/// data) may count such costs twice, so it errs towards stopping early.
///
/// **When things fail.** If the ledger cannot be read at the first check of a
/// key, the key is admitted on what this replica has counted and the seed is
/// retried 10 s later (`tollgate_budget_seed_errors_total`). If Redis cannot
/// be reached, decisions use the local total, which is at least the last total
/// seen in Redis (`tollgate_budget_redis_fallback_total`); costs counted
/// meanwhile are sent to Redis when it answers again.
#[derive(Clone)]
pub struct Budgets {
    inner: Arc<Inner>,
}

struct Inner {
    totals: Mutex<HashMap<String, KeyTotals>>,
    /// Serialises seeding: a key is seeded once, and checks of a key being
    /// seeded wait for it rather than decide on a partial total.
    seed_lock: tokio::sync::Mutex<()>,
    ledger: seed::Ledger,
    clock: Arc<dyn Clock>,
    shared: Option<redis::RedisBudgets>,
    metrics: BudgetMetrics,
}

impl Budgets {
    /// Starts budgets over the ledger `store`: seeds the totals of every key
    /// with a budget from the ledger (if the ledger answers; otherwise keys are
    /// seeded at their first check), and with `limits.backend = "redis"`
    /// connects the shared totals and starts the task that sends costs to
    /// Redis, owned by the returned handle.
    ///
    /// Reads `limits` (backend, Redis settings), `auth.metrics_key_label` and
    /// `ledger.url` (to keep its password out of error messages) from `config`.
    pub async fn start(
        config: &Config,
        ledger: Store,
        registry: &Registry,
        clock: Arc<dyn Clock>,
    ) -> Result<(Budgets, RedisBudgetHandle), BudgetError> {
        let metrics = BudgetMetrics::new(registry, config.raw.auth.metrics_key_label)?;
        let ledger = seed::Ledger::new(ledger, config.raw.ledger.url.clone());
        let limits = &config.raw.limits;
        let (shared, handle) = match limits.backend {
            LimitsBackend::Local => (None, RedisBudgetHandle::idle("budget-redis")),
            LimitsBackend::Redis => {
                let (shared, handle) = redis::RedisBudgets::start(
                    limits,
                    ledger.clone(),
                    clock.clone(),
                    metrics.clone(),
                )?;
                (Some(shared), handle)
            }
        };
        let budgets = Budgets {
            inner: Arc::new(Inner {
                totals: Mutex::new(HashMap::new()),
                seed_lock: tokio::sync::Mutex::new(()),
                ledger,
                clock,
                shared,
                metrics,
            }),
        };
        budgets.seed_all().await;
        Ok((budgets, handle))
    }

    /// Checks a key's budget. Keys without a budget are always `Ok`. Shadow
    /// keys get the same answer; not enforcing it is the caller's part.
    pub async fn check(&self, key: &KeyRecord) -> BudgetDecision {
        let Some(budget) = key.budget else {
            return BudgetDecision::Ok {
                remaining_nanousd: None,
            };
        };
        let inner = &self.inner;
        let now = inner.clock.now();
        let mut spent = self.local_spent(&key.id, budget.period, now).await;
        if let Some(shared) = &inner.shared {
            match shared.spent(&key.id, budget.period, now).await {
                Some(total) => {
                    self.observe_shared(&key.id, budget.period, now, total);
                    spent = spent.max(total);
                }
                None => inner.metrics.redis_fallback.inc(),
            }
        }
        inner.metrics.set_spent(&key.id, budget.period, spent);
        if spent >= budget.nanousd {
            inner
                .metrics
                .exhausted
                .with_label_values(&[if key.shadow { "true" } else { "false" }])
                .inc();
            BudgetDecision::Exhausted(BudgetExhausted {
                spent_nanousd: spent,
                budget_nanousd: budget.nanousd,
                period: budget.period,
                resets_at: budget.period.next_start(now),
            })
        } else {
            BudgetDecision::Ok {
                remaining_nanousd: Some(budget.nanousd - spent),
            }
        }
    }

    /// Counts the cost of a finalised record of `key_id` that started at
    /// `started_at`. Never blocks and never fails (safe in `Drop`): the local
    /// total is updated in place and, with Redis, the cost is queued for the
    /// shared total. Costs of keys never checked with a budget are not kept
    /// (the ledger has them, and a later seed reads them from there).
    pub fn add(&self, key_id: &str, cost_nanousd: i64, started_at: DateTime<Utc>) {
        if cost_nanousd <= 0 {
            return;
        }
        let tracked = match lock(&self.inner.totals).get_mut(key_id) {
            Some(totals) => {
                totals.add(cost_nanousd, started_at);
                true
            }
            None => false,
        };
        if tracked && let Some(shared) = &self.inner.shared {
            shared.add(key_id, cost_nanousd, started_at);
        }
    }

    /// This replica's total for a key now, seeding it first if needed.
    async fn local_spent(&self, key_id: &str, period: BudgetPeriod, now: DateTime<Utc>) -> i64 {
        let inner = &self.inner;
        if let Some(spent) = ready(&inner.totals, key_id, period, now) {
            return spent;
        }
        let _seeding = inner.seed_lock.lock().await;
        if let Some(spent) = ready(&inner.totals, key_id, period, now) {
            return spent;
        }
        lock(&inner.totals)
            .entry(key_id.to_owned())
            .or_insert_with(|| KeyTotals::new(now))
            .begin_seed(now);
        let sums = seed::key_sums(&inner.ledger, key_id, now).await;
        let mut totals = lock(&inner.totals);
        let Some(entry) = totals.get_mut(key_id) else {
            return 0;
        };
        match sums {
            Ok(sums) => entry.finish_seed(sums),
            Err(error) => {
                inner.metrics.seed_errors.inc();
                tracing::warn!(key_id, %error,
                    "cannot read the key's spend from the ledger: deciding its budget on this replica's count, retrying in 10s");
                entry.seed_failed();
            }
        }
        entry.spent(period, now)
    }

    /// Seeds every key with a budget, in one query; at start.
    async fn seed_all(&self) {
        let inner = &self.inner;
        let now = inner.clock.now();
        let _seeding = inner.seed_lock.lock().await;
        match seed::budgeted_sums(&inner.ledger, now).await {
            Ok(all) => {
                {
                    let mut totals = lock(&inner.totals);
                    for (key_id, sums) in &all {
                        let entry = totals
                            .entry(key_id.clone())
                            .or_insert_with(|| KeyTotals::new(now));
                        entry.begin_seed(now);
                        entry.finish_seed(*sums);
                    }
                }
                tracing::info!(keys = all.len(), "budget totals seeded from the ledger");
                if let Some(shared) = &inner.shared {
                    shared.seed_all(&all, now).await;
                }
            }
            Err(error) => {
                inner.metrics.seed_errors.inc();
                tracing::warn!(%error,
                    "cannot read spend from the ledger at start: each key's budget total is read at its first request");
            }
        }
    }

    /// Raises the local total to a total seen in Redis, so that a fallback to
    /// local totals starts from the best-known figure.
    fn observe_shared(&self, key_id: &str, period: BudgetPeriod, now: DateTime<Utc>, total: i64) {
        if let Some(entry) = lock(&self.inner.totals).get_mut(key_id) {
            entry.observe(period, now, total);
        }
    }
}

/// The total of a key if it is seeded (or its seed failed recently).
fn ready(
    totals: &Mutex<HashMap<String, KeyTotals>>,
    key_id: &str,
    period: BudgetPeriod,
    now: DateTime<Utc>,
) -> Option<i64> {
    let mut totals = lock(totals);
    let entry = totals.get_mut(key_id)?;
    entry.is_ready().then(|| entry.spent(period, now))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn usd_is_parsed_exactly() {
        assert_eq!(parse_usd("12.50"), Ok(12_500_000_000));
        assert_eq!(parse_usd("0.1"), Ok(100_000_000));
        assert_eq!(parse_usd("$3"), Ok(3_000_000_000));
        assert_eq!(parse_usd(".5"), Ok(500_000_000));
        assert_eq!(parse_usd("0.000000001"), Ok(1));
        assert_eq!(parse_usd("9223372036.854775807"), Ok(i64::MAX));
        for bad in [
            "",
            ".",
            "-1",
            "1e3",
            "1.0000000001",
            "1,5",
            "abc",
            "9223372037",
        ] {
            assert!(parse_usd(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn usd_is_formatted_exactly() {
        assert_eq!(format_usd(12_500_000_000), "12.50");
        assert_eq!(format_usd(1), "0.000000001");
        assert_eq!(format_usd(0), "0.00");
        assert_eq!(format_usd(1_234_567_890), "1.23456789");
        for n in [0, 1, 10, 999_999_999, 12_345_678_901, i64::MAX] {
            assert_eq!(parse_usd(&format_usd(n)), Ok(n));
        }
    }

    #[test]
    fn periods_are_utc_days_and_months() {
        let at = t("2025-12-31T23:59:59.999Z");
        assert_eq!(BudgetPeriod::Day.start(at), t("2025-12-31T00:00:00Z"));
        assert_eq!(BudgetPeriod::Day.next_start(at), t("2026-01-01T00:00:00Z"));
        assert_eq!(BudgetPeriod::Month.start(at), t("2025-12-01T00:00:00Z"));
        assert_eq!(
            BudgetPeriod::Month.next_start(at),
            t("2026-01-01T00:00:00Z")
        );
        let leap = t("2024-02-29T12:00:00Z");
        assert_eq!(
            BudgetPeriod::Month.next_start(leap),
            t("2024-03-01T00:00:00Z")
        );
        let midnight = t("2025-06-01T00:00:00Z");
        assert_eq!(BudgetPeriod::Day.start(midnight), midnight);
        assert_eq!(BudgetPeriod::Month.start(midnight), midnight);
    }

    #[test]
    fn exhausted_message_names_amounts_and_reset() {
        let e = BudgetExhausted {
            spent_nanousd: 12_503_000_000,
            budget_nanousd: 12_500_000_000,
            period: BudgetPeriod::Day,
            resets_at: t("2026-01-02T00:00:00Z"),
        };
        assert_eq!(
            e.message(),
            "this key's budget of $12.50 per day is spent ($12.503 used); it resets at 2026-01-02T00:00:00Z"
        );
    }
}
