//! The budgets' metrics, registered on a registry that is passed in.

use prometheus::{GaugeVec, IntCounter, IntCounterVec, Opts, Registry};

use super::{BudgetPeriod, NANOUSD_PER_USD};

/// Metrics of [`super::Budgets`].
#[derive(Clone)]
pub struct BudgetMetrics {
    /// `tollgate_budget_exhausted_total{shadow}`: checks that found a budget
    /// spent (`shadow="true"`: the key is in shadow mode and was let through).
    pub exhausted: IntCounterVec,
    /// `tollgate_budget_seed_errors_total`: reads of a key's spend from the
    /// ledger that failed.
    pub seed_errors: IntCounter,
    /// `tollgate_budget_redis_errors_total{op}`: failed Redis calls (`check`,
    /// `seed`, `add`), and costs not queued for Redis (`queue_full`).
    pub redis_errors: IntCounterVec,
    /// `tollgate_budget_redis_fallback_total`: checks decided on this
    /// replica's totals because Redis could not be reached.
    pub redis_fallback: IntCounter,
    /// `tollgate_budget_spent_usd{key,period}`: each budgeted key's spend in
    /// the current period, as of its last check. Only with
    /// `auth.metrics_key_label = true`.
    spent: Option<GaugeVec>,
}

impl BudgetMetrics {
    /// Creates the metrics and registers them on `registry`; the per-key
    /// gauge only with `per_key`.
    pub fn new(registry: &Registry, per_key: bool) -> prometheus::Result<BudgetMetrics> {
        let m = BudgetMetrics {
            exhausted: IntCounterVec::new(
                Opts::new(
                    "tollgate_budget_exhausted_total",
                    "Admission checks that found the key's budget spent, by whether the key is in shadow mode.",
                ),
                &["shadow"],
            )?,
            seed_errors: IntCounter::new(
                "tollgate_budget_seed_errors_total",
                "Failed reads of a key's spend from the ledger.",
            )?,
            redis_errors: IntCounterVec::new(
                Opts::new(
                    "tollgate_budget_redis_errors_total",
                    "Failed Redis calls of the shared budget totals, by operation (check, seed, add, queue_full).",
                ),
                &["op"],
            )?,
            redis_fallback: IntCounter::new(
                "tollgate_budget_redis_fallback_total",
                "Budget checks decided on this replica's own totals because Redis was unreachable.",
            )?,
            spent: per_key
                .then(|| {
                    GaugeVec::new(
                        Opts::new(
                            "tollgate_budget_spent_usd",
                            "Spend of each key with a budget in its current period, in US dollars, as of its last check.",
                        ),
                        &["key", "period"],
                    )
                })
                .transpose()?,
        };
        registry.register(Box::new(m.exhausted.clone()))?;
        registry.register(Box::new(m.seed_errors.clone()))?;
        registry.register(Box::new(m.redis_errors.clone()))?;
        registry.register(Box::new(m.redis_fallback.clone()))?;
        if let Some(spent) = &m.spent {
            registry.register(Box::new(spent.clone()))?;
        }
        Ok(m)
    }

    /// Records a key's spend, if per-key metrics are on.
    pub(super) fn set_spent(&self, key_id: &str, period: BudgetPeriod, nanousd: i64) {
        if let Some(spent) = &self.spent {
            spent
                .with_label_values(&[key_id, period.as_str()])
                .set(nanousd as f64 / NANOUSD_PER_USD as f64);
        }
    }
}
