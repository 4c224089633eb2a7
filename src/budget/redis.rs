//! Budget totals shared by every replica through Redis.
//!
//! Each (key, period) is one integer of nano-dollars at
//! `{limits.redis_key_prefix}:budget:{key_id}:day:2026-01-31` or
//! `…:month:2026-01`, expiring a day after its period ends (it is never read
//! after that). Its life:
//! 1. **Seed**: the first replica that needs it and finds it missing reads the
//!    key's spend in that period from the ledger and writes it with
//!    `SET … NX EX`. A replica that finds it present keeps it: the value there
//!    already holds the ledger's figure plus every cost added since, so two
//!    replicas starting together, or one starting later, never count the
//!    ledger's spend twice. At start, every key with a budget is seeded this
//!    way in batches.
//! 2. **Add**: each finalised cost is queued (bounded, never blocking the
//!    request path) for the replica's `budget-redis` task, which sends the
//!    queued costs in batches with one script call: `INCRBY` on each counter
//!    that exists. A counter that does not exist (Redis restarted, or nobody
//!    has needed the period yet) is seeded from the ledger and then increased.
//! 3. **Check**: admission reads the counter of the key's current period
//!    (`GET`, one round trip).
//!
//! Calls are bounded by `limits.redis_timeout`; after a failure Redis is
//! skipped for `limits.redis_retry_interval`. Meanwhile checks use the local
//! totals and costs wait in the task (up to 100,000 counters) until Redis
//! answers again. Like the limiter, this needs one Redis (or a primary), not
//! a cluster: the scripts touch several keys.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::seed::{self, Ledger};
use super::totals::Sums;
use super::{BudgetError, BudgetMetrics, BudgetPeriod, Clock};
use crate::config::LimitsConfig;
use crate::redis_link::{CallError, RedisLink};
use crate::task::NamedTask;

/// Seeds counters that do not exist, adds an amount, returns the values.
/// KEYS: counters; ARGV: (seed, ttl seconds, amount) per counter.
const SEED_SCRIPT: &str = r"
local out = {}
for i, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[3 * i - 2], 'NX', 'EX', ARGV[3 * i - 1])
  if ARGV[3 * i] ~= '0' then
    redis.call('INCRBY', key, ARGV[3 * i])
  end
  out[i] = redis.call('GET', key)
end
return out
";

/// Adds each amount to its counter if the counter exists.
/// KEYS: counters; ARGV: amounts. Returns 1 (added) or 0 (absent) per counter.
const ADD_SCRIPT: &str = r"
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    redis.call('INCRBY', key, ARGV[i])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
";

/// Costs queued for the task; past this, a cost is counted locally only.
const QUEUE_CAPACITY: usize = 10_000;
/// Costs taken from the queue per round.
const BATCH: usize = 512;
/// Counters sent per script call.
const COUNTERS_PER_CALL: usize = 256;
/// Counters whose additions wait for Redis; past this, new ones are dropped.
const MAX_PENDING: usize = 100_000;
/// How long past the end of its period a counter lives.
const TTL_MARGIN: chrono::Duration = chrono::Duration::days(1);

/// A finalised cost on its way to Redis.
#[derive(Debug)]
struct Cost {
    key_id: String,
    cost: i64,
    started_at: DateTime<Utc>,
}

/// Additions to one counter not yet in Redis.
#[derive(Debug, Clone)]
struct Pending {
    key_id: String,
    period: BudgetPeriod,
    start: DateTime<Utc>,
    amount: i64,
}

/// The shared totals of one replica.
pub(crate) struct RedisBudgets {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Cost>,
}

struct Shared {
    link: RedisLink,
    seed_script: redis::Script,
    add_script: redis::Script,
    prefix: String,
    ledger: Ledger,
    clock: Arc<dyn Clock>,
    metrics: BudgetMetrics,
}

/// Owns the `budget-redis` task that sends costs to Redis. Shutting it down
/// sends what is queued (one attempt, bounded by `limits.redis_timeout`; costs
/// that do not make it are in the ledger and reach Redis through the next seed
/// of their period, if any).
pub type RedisBudgetHandle = NamedTask;

impl RedisBudgets {
    /// Opens the client (nothing connects until the first call) and starts
    /// the task.
    pub(super) fn start(
        limits: &LimitsConfig,
        ledger: Ledger,
        clock: Arc<dyn Clock>,
        metrics: BudgetMetrics,
    ) -> Result<(RedisBudgets, RedisBudgetHandle), BudgetError> {
        let link = RedisLink::open(limits).map_err(BudgetError::Redis)?;
        let shared = Arc::new(Shared {
            link,
            seed_script: redis::Script::new(SEED_SCRIPT),
            add_script: redis::Script::new(ADD_SCRIPT),
            prefix: limits.redis_key_prefix.clone(),
            ledger,
            clock,
            metrics,
        });
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let task = NamedTask::spawn("budget-redis", {
            let shared = shared.clone();
            move |cancel| run(shared, rx, cancel)
        });
        Ok((RedisBudgets { shared, tx }, task))
    }

    /// The shared total of a key's current period, seeding it from the ledger
    /// if Redis has none. `None` when Redis (or, for a seed, the ledger) cannot
    /// answer: decide locally.
    pub(super) async fn spent(
        &self,
        key_id: &str,
        period: BudgetPeriod,
        now: DateTime<Utc>,
    ) -> Option<i64> {
        let shared = &self.shared;
        if !shared.link.may_call() {
            return None;
        }
        let counter = shared.counter(key_id, period, period.start(now));
        let mut cmd = redis::cmd("GET");
        cmd.arg(&counter);
        let value = match shared.link.query::<Option<i64>>(&cmd).await {
            Ok(v) => v,
            Err(e) => {
                shared.failed("check", &e);
                return None;
            }
        };
        shared.recovered();
        if let Some(v) = value {
            return Some(v);
        }
        let sums = match seed::key_sums(&shared.ledger, key_id, now).await {
            Ok(sums) => sums,
            Err(error) => {
                shared.metrics.seed_errors.inc();
                tracing::warn!(key_id, %error, "cannot read the key's spend from the ledger to seed its shared budget total");
                return None;
            }
        };
        match shared.seed(&[(key_id.to_owned(), sums)], now).await {
            Ok(values) => {
                let (day, month) = values.first().copied()?;
                Some(match period {
                    BudgetPeriod::Day => day,
                    BudgetPeriod::Month => month,
                })
            }
            Err(e) => {
                shared.failed("seed", &e);
                None
            }
        }
    }

    /// Seeds the counters of every key with a budget (at start).
    pub(super) async fn seed_all(&self, all: &[(String, Sums)], now: DateTime<Utc>) {
        for chunk in all.chunks(COUNTERS_PER_CALL / 2) {
            if let Err(e) = self.shared.seed(chunk, now).await {
                self.shared.failed("seed", &e);
                return;
            }
        }
    }

    /// Queues a cost for the shared total; never blocks.
    pub(super) fn add(&self, key_id: &str, cost: i64, started_at: DateTime<Utc>) {
        let queued = self.tx.try_send(Cost {
            key_id: key_id.to_owned(),
            cost,
            started_at,
        });
        if let Err(mpsc::error::TrySendError::Full(cost)) = queued {
            self.shared
                .metrics
                .redis_errors
                .with_label_values(&["queue_full"])
                .inc();
            tracing::debug!(key_id = %cost.key_id, "budget cost queue full: counted on this replica only");
        }
    }
}

/// The `budget-redis` task: takes queued costs, sums them per counter and
/// sends them; keeps what Redis did not take and tries again after
/// `redis_retry_interval`. On cancellation, sends what is queued once and ends.
async fn run(shared: Arc<Shared>, mut rx: mpsc::Receiver<Cost>, cancel: CancellationToken) {
    let mut pending: HashMap<String, Pending> = HashMap::new();
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => {
                while let Ok(cost) = rx.try_recv() {
                    shared.queue(&mut pending, cost);
                }
                shared.flush(&mut pending).await;
                if !pending.is_empty() {
                    tracing::warn!(counters = pending.len(),
                        "budget costs not sent to Redis at shutdown; the ledger has them");
                }
                return;
            }
            received = rx.recv_many(&mut batch, BATCH) => {
                if received == 0 {
                    // Every sender is gone: the budgets were dropped.
                    shared.flush(&mut pending).await;
                    return;
                }
                for cost in batch.drain(..) {
                    shared.queue(&mut pending, cost);
                }
            }
            () = tokio::time::sleep(shared.link.retry_interval()), if !pending.is_empty() => {}
        }
        shared.flush(&mut pending).await;
    }
}

impl Shared {
    fn counter(&self, key_id: &str, period: BudgetPeriod, start: DateTime<Utc>) -> String {
        let date = match period {
            BudgetPeriod::Day => start.format("%Y-%m-%d"),
            BudgetPeriod::Month => start.format("%Y-%m"),
        };
        format!("{}:budget:{key_id}:{period}:{date}", self.prefix)
    }

    /// Seconds a counter of the period starting at `start` should live from `now`.
    fn ttl(&self, period: BudgetPeriod, start: DateTime<Utc>, now: DateTime<Utc>) -> i64 {
        (period.next_start(start) + TTL_MARGIN - now)
            .num_seconds()
            .max(60)
    }

    /// Adds a cost to the counters of the periods its request started in.
    fn queue(&self, pending: &mut HashMap<String, Pending>, cost: Cost) {
        for period in [BudgetPeriod::Day, BudgetPeriod::Month] {
            let start = period.start(cost.started_at);
            let counter = self.counter(&cost.key_id, period, start);
            if let Some(p) = pending.get_mut(&counter) {
                p.amount = p.amount.saturating_add(cost.cost);
            } else if pending.len() < MAX_PENDING {
                pending.insert(
                    counter,
                    Pending {
                        key_id: cost.key_id.clone(),
                        period,
                        start,
                        amount: cost.cost,
                    },
                );
            } else {
                self.metrics
                    .redis_errors
                    .with_label_values(&["queue_full"])
                    .inc();
            }
        }
    }

    /// Sends pending additions; what fails stays pending.
    async fn flush(&self, pending: &mut HashMap<String, Pending>) {
        if pending.is_empty() || !self.link.may_call() {
            return;
        }
        let all: Vec<(String, Pending)> = pending.drain().collect();
        let mut missing = Vec::new();
        let mut failed = false;
        let mut chunks = all.chunks(COUNTERS_PER_CALL);
        for chunk in chunks.by_ref() {
            let mut invocation = self.add_script.prepare_invoke();
            for (counter, p) in chunk {
                invocation.key(counter).arg(p.amount);
            }
            match self.link.invoke::<Vec<i64>>(&invocation).await {
                Ok(flags) if flags.len() == chunk.len() => {
                    for ((counter, p), flag) in chunk.iter().zip(flags) {
                        if flag == 0 {
                            missing.push((counter.clone(), p.clone()));
                        }
                    }
                }
                Ok(flags) => {
                    let reply = format!(
                        "unexpected reply: {} flags for {} counters",
                        flags.len(),
                        chunk.len()
                    );
                    self.failed("add", &CallError::Reply(reply));
                    requeue(pending, chunk.iter().cloned());
                    failed = true;
                    break;
                }
                Err(e) => {
                    self.failed("add", &e);
                    requeue(pending, chunk.iter().cloned());
                    failed = true;
                    break;
                }
            }
        }
        // After a failure, what was not tried yet waits too.
        for chunk in chunks {
            requeue(pending, chunk.iter().cloned());
        }
        if !failed {
            self.recovered();
        }
        if !missing.is_empty() {
            self.seed_missing(pending, missing).await;
        }
    }

    /// Seeds counters that did not exist from the ledger, adding the pending
    /// amounts on top. Counters of periods already over are dropped: nothing
    /// reads them any more.
    async fn seed_missing(
        &self,
        pending: &mut HashMap<String, Pending>,
        missing: Vec<(String, Pending)>,
    ) {
        let now = self.clock.now();
        let mut by_key: HashMap<String, Vec<(String, Pending)>> = HashMap::new();
        for (counter, p) in missing {
            if p.start == p.period.start(now) {
                by_key
                    .entry(p.key_id.clone())
                    .or_default()
                    .push((counter, p));
            }
        }
        for (key_id, counters) in by_key {
            let sums = match seed::key_sums(&self.ledger, &key_id, now).await {
                Ok(sums) => sums,
                Err(error) => {
                    self.metrics.seed_errors.inc();
                    tracing::warn!(key_id, %error, "cannot read the key's spend from the ledger to seed its shared budget total; retrying");
                    requeue(pending, counters);
                    continue;
                }
            };
            let mut invocation = self.seed_script.prepare_invoke();
            for (counter, p) in &counters {
                let seed = match p.period {
                    BudgetPeriod::Day => sums.day,
                    BudgetPeriod::Month => sums.month,
                };
                invocation
                    .key(counter)
                    .arg(seed)
                    .arg(self.ttl(p.period, p.start, now))
                    .arg(p.amount);
            }
            if let Err(e) = self.link.invoke::<Vec<Option<i64>>>(&invocation).await {
                self.failed("seed", &e);
                requeue(pending, counters);
            }
        }
    }

    /// Seeds the day and month counters of keys (existing counters are kept)
    /// and returns each key's (day, month) totals.
    async fn seed(
        &self,
        keys: &[(String, Sums)],
        now: DateTime<Utc>,
    ) -> Result<Vec<(i64, i64)>, CallError> {
        let mut invocation = self.seed_script.prepare_invoke();
        for (key_id, sums) in keys {
            for (period, start, seed) in [
                (BudgetPeriod::Day, sums.day_start, sums.day),
                (BudgetPeriod::Month, sums.month_start, sums.month),
            ] {
                invocation
                    .key(self.counter(key_id, period, start))
                    .arg(seed)
                    .arg(self.ttl(period, start, now))
                    .arg(0);
            }
        }
        let values: Vec<Option<i64>> = self.link.invoke(&invocation).await?;
        if values.len() != keys.len() * 2 {
            return Err(CallError::Reply(format!(
                "unexpected reply: {} values for {} counters",
                values.len(),
                keys.len() * 2
            )));
        }
        Ok(values
            .chunks(2)
            .map(|pair| {
                (
                    pair.first().copied().flatten().unwrap_or(0),
                    pair.get(1).copied().flatten().unwrap_or(0),
                )
            })
            .collect())
    }

    fn recovered(&self) {
        if self.link.recovered() {
            tracing::info!("Redis answers again: budget totals are shared across replicas again");
        }
    }

    fn failed(&self, op: &'static str, error: &CallError) {
        self.metrics.redis_errors.with_label_values(&[op]).inc();
        let Some(suppressed) = self.link.failed() else {
            return;
        };
        tracing::error!(
            op,
            %error,
            similar_errors_suppressed = suppressed,
            "budget Redis unreachable: deciding budgets on this replica's totals until it answers"
        );
    }
}

/// Puts additions back to wait for the next attempt (merging with newer ones).
fn requeue(
    pending: &mut HashMap<String, Pending>,
    items: impl IntoIterator<Item = (String, Pending)>,
) {
    for (counter, p) in items {
        if let Some(existing) = pending.get_mut(&counter) {
            existing.amount = existing.amount.saturating_add(p.amount);
        } else if pending.len() < MAX_PENDING {
            pending.insert(counter, p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::SystemClock;
    use crate::ledger::store::Store;
    use crate::secret::MaskedUrl;

    /// Shared state over an unreachable Redis (nothing here connects).
    fn shared() -> (Arc<Shared>, RedisBudgetHandle) {
        let limits = LimitsConfig {
            redis_url: Some(MaskedUrl::new("redis://127.0.0.1:1")),
            ..LimitsConfig::default()
        };
        let store = Store::open_lazy("sqlite::memory:", true).unwrap();
        let metrics = BudgetMetrics::new(&prometheus::Registry::new(), false).unwrap();
        let ledger = Ledger::new(store, MaskedUrl::new("sqlite::memory:"));
        let (budgets, handle) =
            RedisBudgets::start(&limits, ledger, Arc::new(SystemClock), metrics).unwrap();
        (budgets.shared, handle)
    }

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn counters_are_named_by_key_period_and_start() {
        let (s, _task) = shared();
        let at = t("2026-01-31T23:00:00Z");
        assert_eq!(
            s.counter("key_a", BudgetPeriod::Day, BudgetPeriod::Day.start(at)),
            "tollgate:limits:budget:key_a:day:2026-01-31"
        );
        assert_eq!(
            s.counter("key_a", BudgetPeriod::Month, BudgetPeriod::Month.start(at)),
            "tollgate:limits:budget:key_a:month:2026-01"
        );
    }

    #[tokio::test]
    async fn counters_outlive_their_period_by_a_day() {
        let (s, _task) = shared();
        let now = t("2026-01-31T23:00:00Z");
        let day = BudgetPeriod::Day.start(now);
        assert_eq!(s.ttl(BudgetPeriod::Day, day, now), 3600 + 86_400);
        let month = BudgetPeriod::Month.start(now);
        assert_eq!(s.ttl(BudgetPeriod::Month, month, now), 3600 + 86_400);
        // A period long over still gets a short life, never a negative one.
        assert_eq!(s.ttl(BudgetPeriod::Day, t("2020-01-01T00:00:00Z"), now), 60);
    }

    #[tokio::test]
    async fn queued_costs_are_summed_per_counter() {
        let (s, _task) = shared();
        let mut pending = HashMap::new();
        for (cost, at) in [
            (5, "2026-01-31T10:00:00Z"),
            (7, "2026-01-31T11:00:00Z"),
            (11, "2026-02-01T00:00:00Z"),
        ] {
            s.queue(
                &mut pending,
                Cost {
                    key_id: "k".into(),
                    cost,
                    started_at: t(at),
                },
            );
        }
        let amount = |c: &str| {
            pending
                .get(&format!("tollgate:limits:budget:k:{c}"))
                .map(|p| p.amount)
        };
        assert_eq!(amount("day:2026-01-31"), Some(12));
        assert_eq!(amount("day:2026-02-01"), Some(11));
        assert_eq!(amount("month:2026-01"), Some(12));
        assert_eq!(amount("month:2026-02"), Some(11));
    }
}
