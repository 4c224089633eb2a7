//! The Redis backend: limit state shared by every replica.
//!
//! Each decision is one call of one Lua script (`redis/limits.lua`, EVALSHA with
//! a fallback to loading it) that checks and takes every dimension of the key and
//! of the global limits atomically, on Redis's own clock. Settling is one more
//! call of the same script. Keys are `{prefix}:{<key_id>}:state` (a hash of the
//! three theoretical arrival times) and `{prefix}:{<key_id>}:slots` (a sorted set
//! of concurrency slots), and `{prefix}:global:state|slots`; each expires once it
//! holds nothing, so idle keys cost no memory. The braces make a key's two
//! entries one Redis Cluster hash slot, but the global entries live elsewhere, so
//! the backend needs a single Redis (or a primary with replicas), not a cluster.
//!
//! Concurrency slots are leases: a slot is released when its reservation is
//! settled, or, if the reservation is dropped unsettled, with this replica's next
//! call (a drop cannot await, and nothing is spawned for it); if the replica dies
//! first, the slot expires after `limits.redis_slot_lease`.
//!
//! When Redis fails or takes longer than `limits.redis_timeout`, decisions skip
//! it for `limits.redis_retry_interval`, then the next one tries again. Meanwhile
//! `redis_failure = "open"` decides under this replica's local limits (each
//! replica then admits the whole limit) and `"closed"` refuses. The connection
//! manager reconnects on its own once Redis is back.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::local::LocalLimiter;
use super::{
    CONCURRENCY_RETRY, Decision, Demand, Dimension, DimensionState, KeyLimits, LimitError,
    LimitState, LimitedBy, LimiterMetrics, Reservation, Scope, Ticket as AnyTicket, Wait,
};
use crate::config::{LimitsConfig, RedisFailure};
use crate::redis_link::{CallError, RedisLink};

/// The script behind every decision and settlement.
const SCRIPT: &str = include_str!("redis/limits.lua");

/// At most this many slot releases of dropped reservations wait for the next
/// call; past it, their leases free them.
const MAX_PENDING_RELEASES: usize = 10_000;
/// Releases carried by one call, so no call grows large.
const RELEASES_PER_CALL: usize = 64;

/// Limits kept in Redis, with local limits to fall back on.
pub(super) struct RedisLimiter {
    shared: Arc<RedisShared>,
    fallback: LocalLimiter,
}

/// What reservations need to reach Redis (or queue their release) on drop.
struct RedisShared {
    link: RedisLink,
    script: redis::Script,
    prefix: String,
    lease: Duration,
    failure: RedisFailure,
    global: Option<KeyLimits>,
    pending: Mutex<Vec<Release>>,
    metrics: LimiterMetrics,
}

/// A concurrency slot to free with the next call.
struct Release {
    slots: String,
    member: String,
}

impl RedisLimiter {
    /// A limiter on `config.redis_url`. Nothing connects until the first call.
    pub(super) fn new(
        config: &LimitsConfig,
        global: Option<KeyLimits>,
        metrics: LimiterMetrics,
    ) -> Result<RedisLimiter, LimitError> {
        let link = RedisLink::open(config).map_err(LimitError::Config)?;
        Ok(RedisLimiter {
            shared: Arc::new(RedisShared {
                link,
                script: redis::Script::new(SCRIPT),
                prefix: config.redis_key_prefix.clone(),
                lease: config.redis_slot_lease,
                failure: config.redis_failure,
                global,
                pending: Mutex::new(Vec::new()),
                metrics,
            }),
            fallback: LocalLimiter::new(global),
        })
    }

    /// Decides in Redis, or under local limits while Redis is unreachable (open),
    /// or fails (closed). Also names the backend that decided, for the metrics.
    pub(super) async fn try_acquire(
        &self,
        key_id: &str,
        limits: &KeyLimits,
        demand: Demand,
    ) -> (Result<Decision, LimitError>, &'static str) {
        let shared = &self.shared;
        let last_error = if shared.link.may_call() {
            let member = format!("{:032x}", rand::random::<u128>());
            let releases = shared.take_releases();
            let args = Call {
                op: "admit",
                key_id,
                member: &member,
                limits,
                input: i64::try_from(demand.input_tokens).unwrap_or(i64::MAX),
                output: i64::try_from(demand.output_tokens).unwrap_or(i64::MAX),
                releases: &releases,
            };
            match shared
                .call(&args)
                .await
                .and_then(|reply| shared.decision(&reply, limits))
            {
                Ok(admitted_or_wait) => {
                    shared.recovered();
                    let decision = match admitted_or_wait {
                        Ok(state) => {
                            let ticket = Ticket {
                                shared: shared.clone(),
                                key_id: key_id.to_owned(),
                                member,
                                limits: *limits,
                            };
                            Decision::Admit(Reservation::new(
                                Some(AnyTicket::Redis(ticket)),
                                demand,
                                state,
                            ))
                        }
                        Err(wait) => Decision::Wait(wait),
                    };
                    return (Ok(decision), "redis");
                }
                Err(e) => {
                    shared.requeue(releases);
                    shared.failed("acquire", &e);
                    e.to_string()
                }
            }
        } else {
            "skipped after a recent failure".to_owned()
        };
        match shared.failure {
            RedisFailure::Open => {
                shared.metrics.redis_fallback.inc();
                (
                    Ok(self.fallback.try_acquire(key_id, limits, demand)),
                    "local",
                )
            }
            RedisFailure::Closed => (
                Err(LimitError::Unavailable(format!("Redis: {last_error}"))),
                "redis",
            ),
        }
    }

    /// Settles a reservation made in Redis. On failure the estimate stands and
    /// the slot is released with a later call, or by its lease.
    pub(super) async fn settle(&self, ticket: Ticket, estimate: Demand, actual: Demand) {
        let shared = &self.shared;
        let delta = |a: u64, e: u64| {
            let d = i128::from(a) - i128::from(e);
            i64::try_from(d).unwrap_or(if d > 0 { i64::MAX } else { i64::MIN })
        };
        if !shared.link.may_call() {
            shared
                .metrics
                .redis_errors
                .with_label_values(&["settle"])
                .inc();
            ticket.release_later();
            return;
        }
        let releases = shared.take_releases();
        let args = Call {
            op: "settle",
            key_id: &ticket.key_id,
            member: &ticket.member,
            limits: &ticket.limits,
            input: delta(actual.input_tokens, estimate.input_tokens),
            output: delta(actual.output_tokens, estimate.output_tokens),
            releases: &releases,
        };
        match shared.call(&args).await {
            // Settled: the slots are free and nothing is left to give back.
            Ok(_) => shared.recovered(),
            Err(e) => {
                shared.requeue(releases);
                shared.failed("settle", &e);
                ticket.release_later();
            }
        }
    }
}

/// The arguments of one script call.
struct Call<'a> {
    op: &'static str,
    key_id: &'a str,
    member: &'a str,
    limits: &'a KeyLimits,
    input: i64,
    output: i64,
    releases: &'a [Release],
}

impl RedisShared {
    fn key_state(&self, key_id: &str) -> String {
        format!("{}:{{{key_id}}}:state", self.prefix)
    }

    fn key_slots(&self, key_id: &str) -> String {
        format!("{}:{{{key_id}}}:slots", self.prefix)
    }

    fn global_state(&self) -> String {
        format!("{}:global:state", self.prefix)
    }

    fn global_slots(&self) -> String {
        format!("{}:global:slots", self.prefix)
    }

    /// Runs the script once, within the timeout (connecting included).
    async fn call(&self, call: &Call<'_>) -> Result<Vec<i64>, CallError> {
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(self.key_state(call.key_id))
            .key(self.key_slots(call.key_id))
            .key(self.global_state())
            .key(self.global_slots());
        for release in call.releases {
            invocation.key(&release.slots);
        }
        invocation
            .arg(call.op)
            .arg(call.member)
            .arg(micros(self.lease))
            .arg(micros(CONCURRENCY_RETRY))
            .arg(call.input)
            .arg(call.output);
        for limits in [*call.limits, self.global.unwrap_or(KeyLimits::UNLIMITED)] {
            invocation
                .arg(limits.rpm.unwrap_or(0))
                .arg(limits.input_tpm.unwrap_or(0))
                .arg(limits.output_tpm.unwrap_or(0))
                .arg(limits.max_concurrent.unwrap_or(0));
        }
        for release in call.releases {
            invocation.arg(&release.member);
        }
        self.link.invoke(&invocation).await
    }

    /// Reads an admission reply: the key's state, and the wait if not admitted.
    fn decision(
        &self,
        reply: &[i64],
        limits: &KeyLimits,
    ) -> Result<Result<LimitState, Wait>, CallError> {
        let &[
            admitted,
            wait_us,
            limited_by,
            r_left,
            r_reset,
            i_left,
            i_reset,
            o_left,
            o_reset,
        ] = reply
        else {
            return Err(unexpected(reply));
        };
        let dimension = |left: i64, reset_us: i64, limit: Option<u64>| {
            let (Some(limit), Ok(left)) = (limit, u64::try_from(left)) else {
                return None;
            };
            Some(DimensionState {
                limit,
                remaining: left,
                reset_after: Duration::from_micros(u64::try_from(reset_us).unwrap_or(0)),
            })
        };
        let state = LimitState {
            requests: dimension(r_left, r_reset, limits.rpm.map(u64::from)),
            input_tokens: dimension(i_left, i_reset, limits.input_tpm),
            output_tokens: dimension(o_left, o_reset, limits.output_tpm),
        };
        if admitted == 1 {
            return Ok(Ok(state));
        }
        let (scope, code) = match limited_by {
            1..=4 => (Scope::Key, limited_by),
            5..=8 => (Scope::Global, limited_by - 4),
            _ => return Err(unexpected(reply)),
        };
        let dimension = match code {
            1 => Dimension::Requests,
            2 => Dimension::InputTokens,
            3 => Dimension::OutputTokens,
            _ => Dimension::Concurrency,
        };
        Ok(Err(Wait {
            retry_after: Duration::from_micros(u64::try_from(wait_us).unwrap_or(1).max(1)),
            limited_by: LimitedBy { scope, dimension },
            state,
        }))
    }

    fn recovered(&self) {
        if self.link.recovered() {
            tracing::info!("Redis answers again: rate limits are shared across replicas again");
        }
    }

    fn failed(&self, op: &'static str, error: &CallError) {
        self.metrics.redis_errors.with_label_values(&[op]).inc();
        let Some(suppressed) = self.link.failed() else {
            return;
        };
        let policy = match self.failure {
            RedisFailure::Open => "deciding under this replica's local limits",
            RedisFailure::Closed => "refusing requests",
        };
        tracing::error!(
            op,
            %error,
            similar_errors_suppressed = suppressed,
            "rate-limit Redis unreachable, {policy} until it answers"
        );
    }

    fn take_releases(&self) -> Vec<Release> {
        let mut pending = lock(&self.pending);
        let keep = pending.len().saturating_sub(RELEASES_PER_CALL);
        pending.split_off(keep)
    }

    fn requeue(&self, releases: Vec<Release>) {
        let mut pending = lock(&self.pending);
        let room = MAX_PENDING_RELEASES.saturating_sub(pending.len());
        pending.extend(releases.into_iter().take(room));
    }
}

/// What a reservation made in Redis gives back.
pub(super) struct Ticket {
    shared: Arc<RedisShared>,
    key_id: String,
    member: String,
    limits: KeyLimits,
}

impl Ticket {
    /// Queues the release of the reservation's concurrency slots for this
    /// replica's next call; the estimate stays counted.
    pub(super) fn release_later(self) {
        let shared = &self.shared;
        let mut releases = Vec::new();
        if self.limits.max_concurrent.is_some() {
            releases.push(Release {
                slots: shared.key_slots(&self.key_id),
                member: self.member.clone(),
            });
        }
        if shared.global.is_some_and(|g| g.max_concurrent.is_some()) {
            releases.push(Release {
                slots: shared.global_slots(),
                member: self.member.clone(),
            });
        }
        if !releases.is_empty() {
            shared.requeue(releases);
        }
    }
}

/// A reply the script should never give: the script and this file disagree.
fn unexpected(reply: &[i64]) -> CallError {
    CallError::Reply(format!(
        "unexpected reply from the limits script: {reply:?}"
    ))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::MaskedUrl;

    fn limiter() -> RedisLimiter {
        let config = LimitsConfig {
            redis_url: Some(MaskedUrl::new("redis://127.0.0.1:1")),
            ..LimitsConfig::default()
        };
        let metrics = LimiterMetrics::new(&prometheus::Registry::new()).unwrap();
        RedisLimiter::new(&config, None, metrics).unwrap()
    }

    #[test]
    fn keys_are_namespaced_and_hash_tagged() {
        let l = limiter();
        assert_eq!(l.shared.key_state("k1"), "tollgate:limits:{k1}:state");
        assert_eq!(l.shared.key_slots("k1"), "tollgate:limits:{k1}:slots");
        assert_eq!(l.shared.global_state(), "tollgate:limits:global:state");
    }

    #[test]
    fn replies_are_read_per_dimension() {
        let l = limiter();
        let limits = KeyLimits {
            rpm: Some(60),
            output_tpm: Some(8000),
            ..KeyLimits::UNLIMITED
        };
        let admitted = l
            .shared
            .decision(&[1, 0, 0, 59, 1_000_000, -1, 0, 7000, 7_500_000], &limits);
        let state = admitted.unwrap().unwrap();
        assert_eq!(state.requests.unwrap().remaining, 59);
        assert_eq!(state.input_tokens, None);
        assert_eq!(
            state.output_tokens.unwrap().reset_after,
            Duration::from_millis(7500)
        );

        let waited = l
            .shared
            .decision(&[0, 2_500, 7, 0, 0, -1, 0, -1, 0], &limits)
            .unwrap();
        let wait = waited.unwrap_err();
        assert_eq!(wait.retry_after, Duration::from_micros(2_500));
        assert_eq!(
            wait.limited_by,
            LimitedBy {
                scope: Scope::Global,
                dimension: Dimension::OutputTokens
            }
        );

        assert!(
            l.shared
                .decision(&[0, 1, 9, 0, 0, 0, 0, 0, 0], &limits)
                .is_err()
        );
        assert!(l.shared.decision(&[1, 0], &limits).is_err());
    }

    #[test]
    fn releases_are_bounded_and_batched() {
        let l = limiter();
        let release = |i: usize| Release {
            slots: "s".into(),
            member: i.to_string(),
        };
        l.shared
            .requeue((0..MAX_PENDING_RELEASES + 5).map(release).collect());
        assert_eq!(lock(&l.shared.pending).len(), MAX_PENDING_RELEASES);
        assert_eq!(l.shared.take_releases().len(), RELEASES_PER_CALL);
        assert_eq!(
            lock(&l.shared.pending).len(),
            MAX_PENDING_RELEASES - RELEASES_PER_CALL
        );
    }
}
