//! The in-process backend: limit state in this replica's memory.
//!
//! Keys are spread over a fixed set of shards, each a `Mutex<HashMap>`, so
//! decisions for different keys rarely contend; the global scope, when
//! configured, is one more mutex taken after the key's shard (always in that
//! order). A decision holds the locks only for the arithmetic, never across an
//! await. Idle keys (everything replenished, nothing in flight) are swept from
//! their shard every few thousand decisions, so memory follows the active keys.
//!
//! Time is `tokio::time::Instant`, so tests can pause the clock. Requests per
//! minute are `governor`'s GCRA, fed through a state store that stages the new
//! state until every other dimension agrees (all or nothing). Token buckets are
//! the same GCRA idea with a weight per token: the state is the time at which
//! the bucket is full again (its "theoretical arrival time"), in nanoseconds.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{NotKeyed, StateStore};
use governor::{Quota, RateLimiter};
use tokio::time::Instant;

use super::{
    Blocked, CONCURRENCY_RETRY, Decision, Demand, Dimension, DimensionState, KeyLimits, LimitState,
    Reservation, Scope, Ticket as AnyTicket, Wait,
};

/// Shards of the key map: enough that two busy keys rarely share a lock.
const SHARDS: usize = 32;
/// Decisions on a shard between two sweeps of its idle keys.
const SWEEP_EVERY: u32 = 1024;
/// Every limit is per minute: a full bucket is one minute of refill.
const WINDOW_NS: i128 = 60_000_000_000;

/// Limits kept in this process.
pub(super) struct LocalLimiter {
    shared: Arc<Shared>,
}

/// The state, shared with the reservations so they can give back on drop.
struct Shared {
    epoch: Instant,
    hasher: RandomState,
    shards: Box<[Mutex<Shard>]>,
    global: Option<GlobalScope>,
}

struct GlobalScope {
    limits: KeyLimits,
    state: Mutex<ScopeState>,
}

#[derive(Default)]
struct Shard {
    scopes: HashMap<String, ScopeState>,
    since_sweep: u32,
}

impl LocalLimiter {
    /// An empty limiter, with `global` limits over all keys if given.
    pub(super) fn new(global: Option<KeyLimits>) -> LocalLimiter {
        let shards = (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect();
        let global = global.map(|limits| GlobalScope {
            limits,
            state: Mutex::new(ScopeState::default()),
        });
        LocalLimiter {
            shared: Arc::new(Shared {
                epoch: Instant::now(),
                hasher: RandomState::new(),
                shards,
                global,
            }),
        }
    }

    /// Decides for one demand: see [`super::Limiter::try_acquire`]. Limits of 0
    /// were turned away by the caller.
    pub(super) fn try_acquire(&self, key_id: &str, limits: &KeyLimits, demand: Demand) -> Decision {
        let shared = &self.shared;
        let now = shared.now();
        let charge_key = !limits.is_unlimited();
        let mut shard = charge_key.then(|| lock(shared.shard(key_id)));
        let mut key_scope = shard.as_mut().map(|shard| {
            shard.sweep_if_due(now);
            shard.scope(key_id)
        });
        let mut global = shared.global.as_ref().map(|g| (&g.limits, lock(&g.state)));

        let mut blocked = Blocked::default();
        let key_plan = key_scope
            .as_mut()
            .map(|s| s.plan(limits, demand, now, Scope::Key, &mut blocked));
        let global_plan = global
            .as_mut()
            .map(|(l, s)| s.plan(l, demand, now, Scope::Global, &mut blocked));
        if let Some((retry_after, limited_by)) = blocked.worst {
            let state = key_scope
                .as_ref()
                .map(|s| s.state(limits, now))
                .unwrap_or_default();
            return Decision::Wait(Wait {
                retry_after,
                limited_by,
                state,
            });
        }
        if let (Some(scope), Some(plan)) = (key_scope.as_mut(), key_plan) {
            scope.commit(plan);
        }
        if let (Some((_, scope)), Some(plan)) = (global.as_mut(), global_plan) {
            scope.commit(plan);
        }
        let state = key_scope
            .as_ref()
            .map(|s| s.state(limits, now))
            .unwrap_or_default();
        let ticket = Ticket {
            shared: shared.clone(),
            key_id: charge_key.then(|| key_id.to_owned()),
            limits: *limits,
            global: global.is_some(),
            estimate: demand,
        };
        Decision::Admit(Reservation::new(
            Some(AnyTicket::Local(ticket)),
            demand,
            state,
        ))
    }
}

impl Shared {
    /// Nanoseconds since the limiter was built.
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn shard(&self, key_id: &str) -> &Mutex<Shard> {
        // The modulo keeps the index below SHARDS, so it fits in usize.
        let index = (self.hasher.hash_one(key_id) % self.shards.len() as u64) as usize;
        &self.shards[index]
    }
}

impl Shard {
    /// The key's state, created full if the key is new (or was swept as idle,
    /// which is the same thing).
    fn scope(&mut self, key_id: &str) -> &mut ScopeState {
        self.scopes.entry(key_id.to_owned()).or_default()
    }

    fn sweep_if_due(&mut self, now: u64) {
        self.since_sweep += 1;
        if self.since_sweep >= SWEEP_EVERY {
            self.since_sweep = 0;
            self.scopes.retain(|_, s| !s.is_idle(now));
        }
    }
}

/// What an admitted reservation gives back, locally.
pub(super) struct Ticket {
    shared: Arc<Shared>,
    /// The key whose scope was charged; `None` for a key without limits.
    key_id: Option<String>,
    limits: KeyLimits,
    global: bool,
    estimate: Demand,
}

impl Ticket {
    /// Replaces the estimate with `actual` and frees the concurrency slot.
    pub(super) fn settle(self, actual: Demand) {
        self.finish(Some(actual));
    }

    /// Frees the concurrency slot; the estimate stays counted.
    pub(super) fn release(self) {
        self.finish(None);
    }

    fn finish(&self, actual: Option<Demand>) {
        let now = self.shared.now();
        if let Some(key_id) = &self.key_id {
            let mut shard = lock(self.shared.shard(key_id));
            let scope = shard.scope(key_id);
            if let Some(actual) = actual {
                scope.settle(&self.limits, now, self.estimate, actual);
            }
            scope.release();
        }
        if let (true, Some(global)) = (self.global, &self.shared.global) {
            let mut scope = lock(&global.state);
            if let Some(actual) = actual {
                scope.settle(&global.limits, now, self.estimate, actual);
            }
            scope.release();
        }
    }
}

/// The limit state of one key, or of the global scope.
#[derive(Default)]
struct ScopeState {
    requests: Option<RequestGcra>,
    input: TokenBucket,
    output: TokenBucket,
    /// Admitted and not yet settled or dropped; counted even without a
    /// concurrency limit, so a key with requests in flight is never swept.
    in_flight: u32,
}

/// What a scope becomes if the demand is admitted.
#[derive(Default)]
struct Plan {
    requests: bool,
    input_tat: Option<i128>,
    output_tat: Option<i128>,
}

impl ScopeState {
    /// Checks every limited dimension without changing anything visible, adding
    /// what does not fit to `blocked`.
    fn plan(
        &mut self,
        limits: &KeyLimits,
        demand: Demand,
        now: u64,
        scope: Scope,
        blocked: &mut Blocked,
    ) -> Plan {
        let mut plan = Plan::default();
        if let Some(rpm) = limits.rpm.and_then(NonZeroU32::new) {
            match self.requests_at(rpm, now).check(now) {
                Ok(()) => plan.requests = true,
                Err(wait) => blocked.add(wait, scope, Dimension::Requests),
            }
        }
        if let Some(tpm) = limits.input_tpm.filter(|&t| t > 0) {
            match self.input.check(now, tpm, demand.input_tokens) {
                Ok(tat) => plan.input_tat = Some(tat),
                Err(wait) => blocked.add(wait, scope, Dimension::InputTokens),
            }
        }
        if let Some(tpm) = limits.output_tpm.filter(|&t| t > 0) {
            match self.output.check(now, tpm, demand.output_tokens) {
                Ok(tat) => plan.output_tat = Some(tat),
                Err(wait) => blocked.add(wait, scope, Dimension::OutputTokens),
            }
        }
        if let Some(max) = limits.max_concurrent
            && self.in_flight >= max
        {
            blocked.add(CONCURRENCY_RETRY, scope, Dimension::Concurrency);
        }
        plan
    }

    fn commit(&mut self, plan: Plan) {
        if let (true, Some(requests)) = (plan.requests, &self.requests) {
            requests.commit();
        }
        if let Some(tat) = plan.input_tat {
            self.input.tat = tat;
        }
        if let Some(tat) = plan.output_tat {
            self.output.tat = tat;
        }
        self.in_flight = self.in_flight.saturating_add(1);
    }

    fn settle(&mut self, limits: &KeyLimits, now: u64, estimate: Demand, actual: Demand) {
        let delta = |a: u64, e: u64| i128::from(a) - i128::from(e);
        if let Some(tpm) = limits.input_tpm.filter(|&t| t > 0) {
            self.input
                .adjust(now, tpm, delta(actual.input_tokens, estimate.input_tokens));
        }
        if let Some(tpm) = limits.output_tpm.filter(|&t| t > 0) {
            self.output.adjust(
                now,
                tpm,
                delta(actual.output_tokens, estimate.output_tokens),
            );
        }
    }

    fn release(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// The GCRA for `rpm`, rebuilt (carrying its state over) if the limit changed.
    fn requests_at(&mut self, rpm: NonZeroU32, now: u64) -> &RequestGcra {
        let gcra = match self.requests.take() {
            Some(g) if g.rpm == rpm => g,
            previous => RequestGcra::new(rpm, now, previous.and_then(|g| g.tat())),
        };
        self.requests.insert(gcra)
    }

    fn state(&self, limits: &KeyLimits, now: u64) -> LimitState {
        LimitState {
            requests: match (limits.rpm.and_then(NonZeroU32::new), &self.requests) {
                (Some(rpm), Some(g)) if g.rpm == rpm => Some(g.state(now)),
                (Some(rpm), _) => Some(DimensionState {
                    limit: rpm.get().into(),
                    remaining: rpm.get().into(),
                    reset_after: Duration::ZERO,
                }),
                (None, _) => None,
            },
            input_tokens: limits.input_tpm.map(|tpm| self.input.state(now, tpm)),
            output_tokens: limits.output_tpm.map(|tpm| self.output.state(now, tpm)),
        }
    }

    /// True when forgetting this state changes nothing: all full, none in flight.
    fn is_idle(&self, now: u64) -> bool {
        self.in_flight == 0
            && self.input.backlog(now) == 0
            && self.output.backlog(now) == 0
            && self.requests.as_ref().is_none_or(|g| g.backlog(now) == 0)
    }
}

/// A token bucket of capacity `tpm` refilling at `tpm` per minute, kept as the
/// time it is full again. Taking `n` tokens pushes that time `n * 60 s / tpm`
/// later; the bucket holds what is left of one minute before it.
#[derive(Default, Clone, Copy)]
struct TokenBucket {
    /// Nanoseconds since the epoch; at or before now, the bucket is full.
    tat: i128,
}

impl TokenBucket {
    /// How far the bucket is from full, in nanoseconds of refill.
    fn backlog(&self, now: u64) -> i128 {
        (self.tat - i128::from(now)).max(0)
    }

    /// The new full-again time if `tokens` fit now, else the time until they fit.
    fn check(&self, now: u64, tpm: u64, tokens: u64) -> Result<i128, Duration> {
        let back = self.backlog(now);
        let cost = weight(i128::from(tokens), tpm, Rounding::Up);
        let now = i128::from(now);
        if back + cost <= WINDOW_NS {
            Ok(now + back + cost)
        } else if cost > WINDOW_NS {
            // Larger than the whole bucket: admitted once the bucket is full, in
            // debt afterwards, or it could never run.
            if back == 0 {
                Ok(now + cost)
            } else {
                Err(duration(back))
            }
        } else {
            Err(duration(back + cost - WINDOW_NS))
        }
    }

    /// Takes `delta` more tokens (debt allowed) or gives `-delta` back (never
    /// beyond full).
    fn adjust(&mut self, now: u64, tpm: u64, delta: i128) {
        let now = i128::from(now);
        if delta > 0 {
            self.tat = self.tat.max(now) + weight(delta, tpm, Rounding::Up);
        } else if delta < 0 && self.tat > now {
            self.tat = (self.tat - weight(-delta, tpm, Rounding::Down)).max(now);
        }
    }

    fn state(&self, now: u64, tpm: u64) -> DimensionState {
        let back = self.backlog(now);
        let left = (WINDOW_NS - back).max(0);
        let remaining = left * i128::from(tpm) / WINDOW_NS;
        DimensionState {
            limit: tpm,
            remaining: u64::try_from(remaining).unwrap_or(0).min(tpm),
            reset_after: duration(back),
        }
    }
}

#[derive(Clone, Copy)]
enum Rounding {
    /// For what is taken: never undercharge.
    Up,
    /// For what is given back: never overpay.
    Down,
}

/// The refill time of `tokens` at `tpm` per minute, in nanoseconds.
fn weight(tokens: i128, tpm: u64, rounding: Rounding) -> i128 {
    let numerator = tokens.saturating_mul(WINDOW_NS);
    let tpm = i128::from(tpm.max(1));
    match rounding {
        Rounding::Up => (numerator + tpm - 1) / tpm,
        Rounding::Down => numerator / tpm,
    }
}

fn duration(nanos: i128) -> Duration {
    Duration::from_nanos(u64::try_from(nanos.max(0)).unwrap_or(u64::MAX))
}

/// Marks an unused GCRA cell (`governor`'s `None` state).
const NEVER: u64 = u64::MAX;

/// `governor`'s GCRA over one scope's requests, with a clock and a state store
/// that make it stage-then-commit: `check` computes the new state into
/// `staged`, and only `commit` makes it the state, once every other dimension
/// agreed. The clock reads a time pinned by the caller, so every dimension of one
/// decision sees the same instant.
struct RequestGcra {
    rpm: NonZeroU32,
    /// The clock reading when `limiter` was built: its zero.
    start: u64,
    cell: Arc<GcraCell>,
    limiter: RateLimiter<NotKeyed, CellStore, CellClock, NoOpMiddleware<Nanos>>,
}

/// The shared cell behind the store and the clock. Only touched under the
/// scope's mutex, so relaxed atomics suffice; they are atomics because
/// `governor` wants a `Sync` store.
struct GcraCell {
    now: AtomicU64,
    tat: AtomicU64,
    staged: AtomicU64,
}

struct CellStore(Arc<GcraCell>);

struct CellClock(Arc<GcraCell>);

impl StateStore for CellStore {
    type Key = NotKeyed;

    fn measure_and_replace<T, F, E>(&self, _key: &NotKeyed, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let current = self.0.tat.load(Relaxed);
        let (outcome, next) = f((current != NEVER).then(|| Nanos::from(current)))?;
        self.0.staged.store(next.as_u64(), Relaxed);
        Ok(outcome)
    }
}

impl Clock for CellClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(self.0.now.load(Relaxed))
    }
}

impl RequestGcra {
    /// A GCRA allowing `rpm` per minute with a burst of `rpm`, continuing from
    /// `carried_tat` (absolute) if a previous limit left one.
    fn new(rpm: NonZeroU32, now: u64, carried_tat: Option<u64>) -> RequestGcra {
        let cell = Arc::new(GcraCell {
            now: AtomicU64::new(now),
            tat: AtomicU64::new(carried_tat.map_or(NEVER, |t| t.saturating_sub(now))),
            staged: AtomicU64::new(NEVER),
        });
        let limiter = RateLimiter::new(
            Quota::per_minute(rpm),
            CellStore(cell.clone()),
            CellClock(cell.clone()),
        );
        RequestGcra {
            rpm,
            start: now,
            cell,
            limiter,
        }
    }

    /// Stages one request at `now`, or says how long until one fits.
    fn check(&self, now: u64) -> Result<(), Duration> {
        self.cell.now.store(now, Relaxed);
        self.limiter
            .check()
            .map_err(|not_until| not_until.wait_time_from(Nanos::from(now)))
    }

    fn commit(&self) {
        self.cell.tat.store(self.cell.staged.load(Relaxed), Relaxed);
    }

    /// The theoretical arrival time, absolute (nanoseconds since the epoch).
    fn tat(&self) -> Option<u64> {
        let tat = self.cell.tat.load(Relaxed);
        (tat != NEVER).then(|| self.start.saturating_add(tat))
    }

    fn backlog(&self, now: u64) -> u64 {
        self.tat().map_or(0, |t| t.saturating_sub(now))
    }

    fn state(&self, now: u64) -> DimensionState {
        let rpm = u64::from(self.rpm.get());
        // The emission interval exactly as governor's `Quota::per_minute` rounds it.
        let interval = (60_000_000_000 / rpm).max(1);
        let back = self.backlog(now);
        let remaining = (interval * rpm).saturating_sub(back) / interval;
        DimensionState {
            limit: rpm,
            remaining: remaining.min(rpm),
            reset_after: Duration::from_nanos(back),
        }
    }
}

/// Locks a mutex; a panic elsewhere while holding it leaves plain numbers, which
/// are still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn bucket_reserves_refills_and_settles() {
        let tpm = 60_000; // 1,000 tokens per second, 1 ms per token.
        let mut bucket = TokenBucket::default();
        let now = 10 * SECOND;
        bucket.tat = bucket.check(now, tpm, 60_000).unwrap();
        assert_eq!(bucket.state(now, tpm).remaining, 0);
        assert_eq!(bucket.check(now, tpm, 500), Err(Duration::from_millis(500)));
        // Half a second later, 500 tokens are back.
        assert_eq!(bucket.state(now + SECOND / 2, tpm).remaining, 500);
        // Giving back 800 tokens makes 800 more available at once.
        bucket.adjust(now, tpm, -800);
        assert_eq!(bucket.state(now, tpm).remaining, 800);
        // Taking 3,000 more puts the bucket 2,200 tokens in debt.
        bucket.adjust(now, tpm, 3_000);
        assert_eq!(bucket.state(now, tpm).remaining, 0);
        assert_eq!(bucket.check(now, tpm, 1), Err(Duration::from_millis(2_201)));
    }

    #[test]
    fn oversized_demand_waits_for_a_full_bucket_then_runs() {
        let tpm = 60_000;
        let mut bucket = TokenBucket::default();
        let now = SECOND;
        bucket.tat = bucket.check(now, tpm, 1_000).unwrap();
        // 100,000 tokens never fit in a 60,000 bucket: wait until it is full.
        assert_eq!(bucket.check(now, tpm, 100_000), Err(Duration::from_secs(1)));
        let later = now + SECOND;
        bucket.tat = bucket.check(later, tpm, 100_000).unwrap();
        // 40,000 tokens of debt: 40 s until anything fits, 100 s until full.
        assert_eq!(
            bucket.check(later, tpm, 1),
            Err(Duration::from_millis(40_001))
        );
        assert_eq!(
            bucket.state(later, tpm).reset_after,
            Duration::from_secs(100)
        );
    }

    #[test]
    fn give_back_never_overfills() {
        let tpm = 60_000;
        let mut bucket = TokenBucket::default();
        bucket.tat = bucket.check(0, tpm, 100).unwrap();
        bucket.adjust(0, tpm, -5_000);
        assert_eq!(bucket.tat, 0);
        assert_eq!(bucket.state(0, tpm).remaining, 60_000);
    }

    #[test]
    fn weights_round_in_the_limiters_favour() {
        // 7,000 per minute: 8,571,428.57 ns per token.
        assert_eq!(weight(1, 7_000, Rounding::Up), 8_571_429);
        assert_eq!(weight(1, 7_000, Rounding::Down), 8_571_428);
        assert_eq!(weight(7_000, 7_000, Rounding::Up), WINDOW_NS);
    }

    #[test]
    fn gcra_stages_until_committed() {
        let rpm = NonZeroU32::new(60).unwrap();
        let gcra = RequestGcra::new(rpm, 5 * SECOND, None);
        for _ in 0..60 {
            gcra.check(5 * SECOND).unwrap();
            gcra.commit();
        }
        assert_eq!(gcra.check(5 * SECOND), Err(Duration::from_secs(1)));
        // A check that is not committed changes nothing.
        gcra.check(6 * SECOND).unwrap();
        gcra.check(6 * SECOND).unwrap();
        gcra.commit();
        assert_eq!(gcra.check(6 * SECOND), Err(Duration::from_secs(1)));
        assert_eq!(gcra.state(6 * SECOND).remaining, 0);
        assert_eq!(gcra.state(66 * SECOND).remaining, 60);
    }

    #[test]
    fn gcra_carries_its_state_over_a_limit_change() {
        let mut scope = ScopeState::default();
        let mut blocked = Blocked::default();
        let limits = KeyLimits {
            rpm: Some(2),
            ..KeyLimits::UNLIMITED
        };
        for _ in 0..2 {
            let plan = scope.plan(&limits, Demand::default(), 0, Scope::Key, &mut blocked);
            scope.commit(plan);
        }
        assert!(blocked.worst.is_none());
        assert!(
            !scope
                .plan(&limits, Demand::default(), 0, Scope::Key, &mut blocked)
                .requests
        );
        assert_eq!(blocked.worst.map(|(w, _)| w), Some(Duration::from_secs(30)));
        // The state is kept as time, as in Redis: raised to 4 per minute, the
        // exhausted minute refills at the new rate, one request every 15 s.
        let limits = KeyLimits {
            rpm: Some(4),
            ..limits
        };
        let mut blocked = Blocked::default();
        scope.plan(&limits, Demand::default(), 0, Scope::Key, &mut blocked);
        assert_eq!(blocked.worst.map(|(w, _)| w), Some(Duration::from_secs(15)));
        let mut blocked = Blocked::default();
        let plan = scope.plan(
            &limits,
            Demand::default(),
            15 * SECOND,
            Scope::Key,
            &mut blocked,
        );
        assert!(blocked.worst.is_none());
        scope.commit(plan);
        assert_eq!(
            scope
                .state(&limits, 15 * SECOND)
                .requests
                .unwrap()
                .remaining,
            0
        );
    }

    #[test]
    fn idle_keys_are_swept() {
        let mut shard = Shard::default();
        shard.scope("busy").in_flight = 1;
        shard.scope("idle");
        shard.scope("in-debt").input.tat = i128::from(100 * SECOND);
        for _ in 0..SWEEP_EVERY {
            shard.sweep_if_due(SECOND);
        }
        let mut left: Vec<_> = shard.scopes.keys().cloned().collect();
        left.sort();
        assert_eq!(left, ["busy", "in-debt"]);
    }
}
