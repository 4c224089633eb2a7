//! Rate limits per key and over all keys: requests per minute, input and output
//! tokens per minute, and requests in flight.
//!
//! Admission asks the [`Limiter`] with the key's [`KeyLimits`] and an estimate of
//! the request's tokens (a [`Demand`]). The answer is a [`Decision`]: either
//! [`Decision::Admit`] with a [`Reservation`] that holds the estimate and a
//! concurrency slot, or [`Decision::Wait`] with the real time until the demand
//! would fit. A `Wait` takes nothing. When the response ends, [`Limiter::settle`]
//! replaces the estimate with the actual usage and frees the slot; a reservation
//! dropped without settling frees its slot too and keeps its estimate as usage.
//!
//! Every dimension is per minute and refills continuously:
//! - requests use GCRA (the `governor` crate locally, the same maths in a Redis
//!   script), with a burst of the whole limit: `rpm = 60` admits 60 at once, then
//!   one per second;
//! - tokens use a bucket of capacity `tpm` refilling at `tpm / 60` per second. The
//!   estimate is taken at admission; settling gives back what was not used, or
//!   takes the excess as debt, so later requests wait until it is paid off. A
//!   demand larger than the whole bucket is admitted when the bucket is full (it
//!   could never run otherwise) and leaves the bucket in debt;
//! - concurrency counts admitted reservations not yet settled or dropped.
//!
//! One decision checks every dimension of the key and of the global limits at
//! once and takes all of them or none. Two backends keep the state: in this
//! process (`limits/local.rs`) or in Redis (`limits/redis.rs`), where each
//! decision and each settlement is one atomic script call, so replicas share
//! one limit.

mod local;
mod metrics;
mod redis;

use std::fmt;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, SecondsFormat, Utc};
use prometheus::Registry;
use tokio::time::Instant;

use crate::config::{LimitsBackend, LimitsConfig};

pub use metrics::{LimiterMetrics, Outcome};

/// How long a decision advises to wait when the only thing missing is a free
/// concurrency slot. Nobody knows when a request in flight will end, so this is
/// a polling interval, not a prediction.
pub const CONCURRENCY_RETRY: Duration = Duration::from_millis(100);

/// How long a decision advises to wait when a limit is 0, which nothing fits in:
/// a minute, after which a changed limit may let the key in.
pub const ZERO_LIMIT_RETRY: Duration = Duration::from_secs(60);

/// The limits of one key, or the global limits. `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyLimits {
    /// Requests per minute.
    pub rpm: Option<u32>,
    /// Input tokens per minute (cache reads not counted).
    pub input_tpm: Option<u64>,
    /// Output tokens per minute.
    pub output_tpm: Option<u64>,
    /// Requests admitted and not yet settled.
    pub max_concurrent: Option<u32>,
}

impl KeyLimits {
    /// No limit at all.
    pub const UNLIMITED: KeyLimits = KeyLimits {
        rpm: None,
        input_tpm: None,
        output_tpm: None,
        max_concurrent: None,
    };

    /// True when no dimension is limited.
    pub fn is_unlimited(&self) -> bool {
        *self == KeyLimits::UNLIMITED
    }

    /// The default limits of every key, from `[limits]`.
    pub fn defaults(config: &LimitsConfig) -> KeyLimits {
        KeyLimits {
            rpm: config.rpm,
            input_tpm: config.input_tpm,
            output_tpm: config.output_tpm,
            max_concurrent: config.max_concurrent,
        }
    }

    /// The global limits from `[limits]`, if any dimension is set.
    pub fn global(config: &LimitsConfig) -> Option<KeyLimits> {
        let limits = KeyLimits {
            rpm: config.global_rpm,
            input_tpm: config.global_input_tpm,
            output_tpm: config.global_output_tpm,
            max_concurrent: config.global_max_concurrent,
        };
        (!limits.is_unlimited()).then_some(limits)
    }

    /// The first dimension whose limit is 0, which no request fits in.
    fn zero_dimension(&self) -> Option<Dimension> {
        if self.rpm == Some(0) {
            Some(Dimension::Requests)
        } else if self.input_tpm == Some(0) {
            Some(Dimension::InputTokens)
        } else if self.output_tpm == Some(0) {
            Some(Dimension::OutputTokens)
        } else if self.max_concurrent == Some(0) {
            Some(Dimension::Concurrency)
        } else {
            None
        }
    }
}

/// Tokens a request counts against the token limits: the estimate at admission,
/// the actual usage at settlement. Cache reads are left out by the caller, as
/// Anthropic does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Demand {
    /// Input tokens, cache reads left out (cache writes count).
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
}

/// Whether a limit belongs to the key or to all keys together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The requesting key's own limits.
    Key,
    /// The limits over all keys together.
    Global,
}

/// One limited quantity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dimension {
    /// Requests per minute.
    Requests,
    /// Input tokens per minute.
    InputTokens,
    /// Output tokens per minute.
    OutputTokens,
    /// Requests in flight.
    Concurrency,
}

/// The limit that made a request wait (the one it waits longest for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitedBy {
    /// Whose limit.
    pub scope: Scope,
    /// Which quantity.
    pub dimension: Dimension,
}

impl fmt::Display for LimitedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.dimension {
            Dimension::Requests => "requests per minute",
            Dimension::InputTokens => "input tokens per minute",
            Dimension::OutputTokens => "output tokens per minute",
            Dimension::Concurrency => "concurrent requests",
        };
        match self.scope {
            Scope::Key => write!(f, "{what} of this key"),
            Scope::Global => write!(f, "{what} of all keys together"),
        }
    }
}

/// One dimension of a key's limit state, as Anthropic's
/// `anthropic-ratelimit-*` headers describe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DimensionState {
    /// The limit per minute.
    pub limit: u64,
    /// How many fit right now (0 while in debt).
    pub remaining: u64,
    /// Time until the dimension is fully replenished.
    pub reset_after: Duration,
}

impl DimensionState {
    /// The moment the dimension is fully replenished, rounded up to the second.
    pub fn reset_at(&self, now: SystemTime) -> DateTime<Utc> {
        let at = DateTime::<Utc>::from(now + self.reset_after);
        let whole = at.timestamp();
        let seconds = if at.timestamp_subsec_nanos() > 0 {
            whole + 1
        } else {
            whole
        };
        DateTime::from_timestamp(seconds, 0).unwrap_or(at)
    }
}

/// A key's own limit state, for the `tollgate-ratelimit-*` response headers.
/// Unlimited dimensions are `None`. Global limits are not shown: they are the
/// organisation's business, not the key holder's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimitState {
    /// Requests per minute.
    pub requests: Option<DimensionState>,
    /// Input tokens per minute.
    pub input_tokens: Option<DimensionState>,
    /// Output tokens per minute.
    pub output_tokens: Option<DimensionState>,
}

impl LimitState {
    /// The response headers of the limited dimensions:
    /// `tollgate-ratelimit-{requests,input-tokens,output-tokens}-{limit,remaining,reset}`,
    /// the reset as an RFC 3339 time rounded up to the second.
    pub fn headers(&self, now: SystemTime) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let dimensions = [
            (
                &self.requests,
                [
                    "tollgate-ratelimit-requests-limit",
                    "tollgate-ratelimit-requests-remaining",
                    "tollgate-ratelimit-requests-reset",
                ],
            ),
            (
                &self.input_tokens,
                [
                    "tollgate-ratelimit-input-tokens-limit",
                    "tollgate-ratelimit-input-tokens-remaining",
                    "tollgate-ratelimit-input-tokens-reset",
                ],
            ),
            (
                &self.output_tokens,
                [
                    "tollgate-ratelimit-output-tokens-limit",
                    "tollgate-ratelimit-output-tokens-remaining",
                    "tollgate-ratelimit-output-tokens-reset",
                ],
            ),
        ];
        for (state, [limit, remaining, reset]) in dimensions {
            if let Some(s) = state {
                out.push((limit, s.limit.to_string()));
                out.push((remaining, s.remaining.to_string()));
                out.push((
                    reset,
                    s.reset_at(now).to_rfc3339_opts(SecondsFormat::Secs, true),
                ));
            }
        }
        out
    }
}

/// The answer to one admission check.
#[derive(Debug)]
pub enum Decision {
    /// Every limit had room: the demand is taken, until settled.
    Admit(Reservation),
    /// Something does not fit; nothing was taken.
    Wait(Wait),
}

/// Why and how long to wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wait {
    /// The time until the demand would fit, if nothing else takes the room first.
    /// For concurrency, which frees up at no predictable time, it is
    /// [`CONCURRENCY_RETRY`]; for a limit of 0 it is [`ZERO_LIMIT_RETRY`].
    pub retry_after: Duration,
    /// The limit waited for longest.
    pub limited_by: LimitedBy,
    /// The key's limit state now, for the response headers.
    pub state: LimitState,
}

/// An admitted demand, held until [`Limiter::settle`]. Dropping it unsettled
/// frees its concurrency slot and leaves its estimate counted as usage.
pub struct Reservation {
    ticket: Option<Ticket>,
    estimate: Demand,
    state: LimitState,
}

/// What a reservation must give back, per backend.
enum Ticket {
    Local(local::Ticket),
    Redis(redis::Ticket),
}

impl Reservation {
    fn new(ticket: Option<Ticket>, estimate: Demand, state: LimitState) -> Reservation {
        Reservation {
            ticket,
            estimate,
            state,
        }
    }

    /// The estimate taken at admission.
    pub fn estimate(&self) -> Demand {
        self.estimate
    }

    /// The key's limit state just after admission, for the response headers.
    pub fn state(&self) -> &LimitState {
        &self.state
    }
}

impl fmt::Debug for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let backend = match &self.ticket {
            Some(Ticket::Local(_)) => "local",
            Some(Ticket::Redis(_)) => "redis",
            None => "none",
        };
        f.debug_struct("Reservation")
            .field("backend", &backend)
            .field("estimate", &self.estimate)
            .finish()
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        match self.ticket.take() {
            Some(Ticket::Local(t)) => t.release(),
            Some(Ticket::Redis(t)) => t.release_later(),
            None => {}
        }
    }
}

/// A reservation obtained by [`Limiter::acquire`], possibly after waiting.
#[derive(Debug)]
pub struct Acquired {
    /// Settle it when the response ends.
    pub reservation: Reservation,
    /// Time spent waiting for the limits.
    pub waited: Duration,
}

/// Why [`Limiter::acquire`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    /// The demand would not fit within `max_wait`: answer 429 with
    /// `retry_after` (the real time until it would fit).
    #[error("rate limit exceeded: {}, retry after {:?}", .0.limited_by, .0.retry_after)]
    Limited(Wait),
    /// The limiter could not decide (Redis down with `redis_failure = "closed"`).
    #[error(transparent)]
    Unavailable(#[from] LimitError),
}

/// A limiter that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    /// Redis did not answer and `redis_failure = "closed"`: answer 503.
    #[error("the rate-limit store is unavailable: {0}")]
    Unavailable(String),
    /// The Redis URL cannot be used.
    #[error("invalid limits.redis_url: {0}")]
    Config(String),
    /// The limiter's metrics could not be registered.
    #[error("cannot register the limiter metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// The rate limiter of the gateway, with the backend chosen by `limits.backend`.
pub struct Limiter {
    backend: Backend,
    global: Option<KeyLimits>,
    metrics: LimiterMetrics,
}

enum Backend {
    Local(local::LocalLimiter),
    Redis(redis::RedisLimiter),
}

impl Limiter {
    /// Builds the limiter of `config` and registers its metrics on `registry`.
    /// The Redis backend connects lazily, at the first decision, so this neither
    /// blocks nor fails when Redis is down.
    pub fn new(config: &LimitsConfig, registry: &Registry) -> Result<Limiter, LimitError> {
        let metrics = LimiterMetrics::new(registry)?;
        let global = KeyLimits::global(config);
        let backend = match config.backend {
            LimitsBackend::Local => Backend::Local(local::LocalLimiter::new(global)),
            LimitsBackend::Redis => {
                Backend::Redis(redis::RedisLimiter::new(config, global, metrics.clone())?)
            }
        };
        Ok(Limiter {
            backend,
            global,
            metrics,
        })
    }

    /// The limiter's metrics, so the caller can count its own outcomes (over
    /// budget, shadow violations) in the same family.
    pub fn metrics(&self) -> &LimiterMetrics {
        &self.metrics
    }

    /// Checks every limit of the key and the global limits at once: takes the
    /// demand from all of them, or from none and says how long to wait.
    /// Fails only when Redis is unreachable and `redis_failure = "closed"`.
    /// Counts the decision's latency but no outcome: [`Limiter::acquire`] does,
    /// or the caller with [`LimiterMetrics::count`].
    pub async fn try_acquire(
        &self,
        key_id: &str,
        limits: &KeyLimits,
        demand: Demand,
    ) -> Result<Decision, LimitError> {
        let started = std::time::Instant::now();
        let zero = limits
            .zero_dimension()
            .map(|d| (Scope::Key, d))
            .or_else(|| {
                self.global
                    .and_then(|g| g.zero_dimension())
                    .map(|d| (Scope::Global, d))
            });
        let (decision, backend) = if let Some((scope, dimension)) = zero {
            let wait = Wait {
                retry_after: ZERO_LIMIT_RETRY,
                limited_by: LimitedBy { scope, dimension },
                state: LimitState::default(),
            };
            (Ok(Decision::Wait(wait)), "none")
        } else if limits.is_unlimited() && self.global.is_none() {
            // Nothing to count: unlimited keys cost no lock and no round trip.
            (
                Ok(Decision::Admit(Reservation::new(
                    None,
                    demand,
                    LimitState::default(),
                ))),
                "none",
            )
        } else {
            match &self.backend {
                Backend::Local(l) => (Ok(l.try_acquire(key_id, limits, demand)), "local"),
                Backend::Redis(r) => r.try_acquire(key_id, limits, demand).await,
            }
        };
        self.metrics
            .decision_seconds
            .with_label_values(&[backend])
            .observe(started.elapsed().as_secs_f64());
        decision
    }

    /// Waits for the limits, up to `max_wait`: tries, sleeps the advised time
    /// (plus a little jitter, so waiters do not all wake at once), and tries
    /// again, until admitted or until the next wait would end after `max_wait`.
    /// Counts the outcome (`admitted`, `waited` or `limited`) and the wait.
    pub async fn acquire(
        &self,
        key_id: &str,
        limits: &KeyLimits,
        demand: Demand,
        max_wait: Duration,
    ) -> Result<Acquired, AcquireError> {
        let started = Instant::now();
        let deadline = started + max_wait;
        let mut slept = false;
        loop {
            match self.try_acquire(key_id, limits, demand).await? {
                Decision::Admit(reservation) => {
                    let (waited, outcome) = if slept {
                        (started.elapsed(), Outcome::Waited)
                    } else {
                        (Duration::ZERO, Outcome::Admitted)
                    };
                    self.metrics.count(outcome);
                    self.metrics.wait_seconds.observe(waited.as_secs_f64());
                    return Ok(Acquired {
                        reservation,
                        waited,
                    });
                }
                Decision::Wait(wait) => {
                    let now = Instant::now();
                    if now + wait.retry_after > deadline {
                        self.metrics.count(Outcome::Limited);
                        return Err(AcquireError::Limited(wait));
                    }
                    let wake = (now + wait.retry_after + jitter(wait.retry_after)).min(deadline);
                    tokio::time::sleep_until(wake).await;
                    slept = true;
                }
            }
        }
    }

    /// Replaces the reservation's estimate with the actual usage (giving back
    /// what was not used, or taking the excess as debt) and frees its
    /// concurrency slot. Never fails: a Redis error is logged and counted, the
    /// estimate then stands and the slot is freed by its lease.
    pub async fn settle(&self, mut reservation: Reservation, actual: Demand) {
        let estimate = reservation.estimate;
        match reservation.ticket.take() {
            Some(Ticket::Local(t)) => t.settle(actual),
            Some(Ticket::Redis(t)) => match &self.backend {
                Backend::Redis(r) => r.settle(t, estimate, actual).await,
                // A Redis ticket only comes from a Redis limiter; were it handed to
                // another, the lease frees its slot.
                Backend::Local(_) => t.release_later(),
            },
            None => {}
        }
    }
}

/// A random extra delay of up to an eighth of `wait`, at most 10 ms.
fn jitter(wait: Duration) -> Duration {
    let cap = (wait / 8).min(Duration::from_millis(10));
    let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(rand::random_range(0..=nanos))
}

/// Tracks the worst limit a decision would wait for.
#[derive(Default)]
struct Blocked {
    worst: Option<(Duration, LimitedBy)>,
}

impl Blocked {
    fn add(&mut self, wait: Duration, scope: Scope, dimension: Dimension) {
        if self.worst.is_none_or(|(w, _)| wait > w) {
            self.worst = Some((wait, LimitedBy { scope, dimension }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_is_rounded_up_to_the_second() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_250);
        let s = DimensionState {
            limit: 60,
            remaining: 59,
            reset_after: Duration::from_millis(500),
        };
        assert_eq!(
            s.reset_at(now).to_rfc3339_opts(SecondsFormat::Secs, true),
            "2023-11-14T22:13:21Z"
        );
        let s = DimensionState {
            reset_after: Duration::from_millis(750),
            ..s
        };
        assert_eq!(
            s.reset_at(now).to_rfc3339_opts(SecondsFormat::Secs, true),
            "2023-11-14T22:13:21Z"
        );
    }

    #[test]
    fn headers_cover_only_limited_dimensions() {
        let state = LimitState {
            requests: Some(DimensionState {
                limit: 60,
                remaining: 3,
                reset_after: Duration::ZERO,
            }),
            input_tokens: None,
            output_tokens: Some(DimensionState {
                limit: 8000,
                remaining: 0,
                reset_after: Duration::from_secs(2),
            }),
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let headers = state.headers(now);
        let names: Vec<_> = headers.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "tollgate-ratelimit-requests-limit",
                "tollgate-ratelimit-requests-remaining",
                "tollgate-ratelimit-requests-reset",
                "tollgate-ratelimit-output-tokens-limit",
                "tollgate-ratelimit-output-tokens-remaining",
                "tollgate-ratelimit-output-tokens-reset",
            ]
        );
        assert_eq!(headers[1].1, "3");
        assert_eq!(headers[2].1, "2023-11-14T22:13:20Z");
        assert_eq!(headers[5].1, "2023-11-14T22:13:22Z");
    }

    #[test]
    fn limited_by_reads_as_a_sentence() {
        let by = LimitedBy {
            scope: Scope::Global,
            dimension: Dimension::InputTokens,
        };
        assert_eq!(
            by.to_string(),
            "input tokens per minute of all keys together"
        );
    }

    #[test]
    fn jitter_is_small() {
        for _ in 0..100 {
            assert!(jitter(Duration::from_secs(5)) <= Duration::from_millis(10));
            assert!(jitter(Duration::from_millis(8)) <= Duration::from_millis(1));
        }
        assert_eq!(jitter(Duration::from_nanos(7)), Duration::ZERO);
    }
}
