//! The limiter's own metrics, registered on a registry that is passed in.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};

/// Waits, from a few milliseconds to the longest sensible `max_wait`.
const WAIT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Decision latencies, from an uncontended in-process lock to a slow Redis.
const DECISION_BUCKETS: &[f64] = &[
    0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
];

/// How an admission ended, the `outcome` label of `tollgate_limiter_decisions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Admitted without waiting.
    Admitted,
    /// Admitted after waiting for the limits.
    Waited,
    /// Refused with 429: the wait would have exceeded `max_wait`.
    Limited,
    /// Refused with 402: the key's budget is spent (counted by the caller).
    OverBudget,
    /// A shadow key broke a limit or budget and was let through (counted by the caller).
    ShadowViolation,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Admitted => "admitted",
            Outcome::Waited => "waited",
            Outcome::Limited => "limited",
            Outcome::OverBudget => "over_budget",
            Outcome::ShadowViolation => "shadow_violation",
        }
    }
}

/// Metrics of the rate limiter.
#[derive(Clone)]
pub struct LimiterMetrics {
    /// `tollgate_limiter_decisions_total{outcome}`: admissions by how they ended.
    pub decisions: IntCounterVec,
    /// `tollgate_limiter_wait_seconds`: time admitted requests waited (0 included).
    pub wait_seconds: Histogram,
    /// `tollgate_limiter_decision_seconds{backend}`: latency of one decision
    /// (`local`, `redis`, or `none` for keys without limits).
    pub decision_seconds: HistogramVec,
    /// `tollgate_limiter_redis_errors_total{op}`: failed Redis calls (`acquire`, `settle`).
    pub redis_errors: IntCounterVec,
    /// `tollgate_limiter_redis_fallback_total`: decisions made under local limits
    /// because Redis was unreachable.
    pub redis_fallback: IntCounter,
}

impl LimiterMetrics {
    /// Creates the metrics and registers them on `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<LimiterMetrics> {
        let m = LimiterMetrics {
            decisions: IntCounterVec::new(
                Opts::new(
                    "tollgate_limiter_decisions_total",
                    "Admission decisions, by outcome (admitted, waited, limited, over_budget, shadow_violation).",
                ),
                &["outcome"],
            )?,
            wait_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "tollgate_limiter_wait_seconds",
                    "Time admitted requests waited for their rate limits.",
                )
                .buckets(WAIT_BUCKETS.to_vec()),
            )?,
            decision_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "tollgate_limiter_decision_seconds",
                    "Time one rate-limit decision took, by backend.",
                )
                .buckets(DECISION_BUCKETS.to_vec()),
                &["backend"],
            )?,
            redis_errors: IntCounterVec::new(
                Opts::new(
                    "tollgate_limiter_redis_errors_total",
                    "Redis calls of the rate limiter that failed or timed out, by operation.",
                ),
                &["op"],
            )?,
            redis_fallback: IntCounter::new(
                "tollgate_limiter_redis_fallback_total",
                "Rate-limit decisions made under this replica's local limits because Redis was unreachable.",
            )?,
        };
        registry.register(Box::new(m.decisions.clone()))?;
        registry.register(Box::new(m.wait_seconds.clone()))?;
        registry.register(Box::new(m.decision_seconds.clone()))?;
        registry.register(Box::new(m.redis_errors.clone()))?;
        registry.register(Box::new(m.redis_fallback.clone()))?;
        Ok(m)
    }

    /// Counts one admission outcome.
    pub fn count(&self, outcome: Outcome) {
        self.decisions.with_label_values(&[outcome.as_str()]).inc();
    }
}
