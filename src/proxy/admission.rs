//! Admission: may this caller's request go upstream now?
//!
//! Runs after identification and before forwarding, holding no upstream
//! connection. It checks the key's budget, then its rate limits: a request over
//! a limit waits until the limiter says it fits, if that is within
//! `limits.max_wait`; otherwise it gets a 429 with the real time until it would
//! fit. A key in shadow mode has everything evaluated, logged and counted, but
//! nothing enforced.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::budget::{BudgetDecision, Budgets};
use crate::error::GatewayError;
use crate::keys::KeyRecord;
use crate::limits::{AcquireError, Decision, Demand, KeyLimits, Limiter, Outcome, Reservation};

/// Output tokens assumed for a request that does not say `max_tokens`.
const DEFAULT_OUTPUT_ESTIMATE: u64 = 4096;

/// Who is calling, as far as admission and accounting go.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The key id (a virtual key's id, or a passthrough fingerprint).
    pub key_id: String,
    pub team: Option<String>,
    /// The key's limits: its own overrides over the configured defaults.
    pub limits: KeyLimits,
    /// Evaluate limits and budgets without enforcing them.
    pub shadow: bool,
}

/// What admission granted.
#[derive(Debug, Default)]
pub struct Admitted {
    /// Held until the response ends, then settled with the actual usage.
    pub reservation: Option<Reservation>,
    /// Time spent waiting for the limiter.
    pub waited: Duration,
    /// `tollgate-ratelimit-*` headers describing the key's limit state.
    pub headers: Vec<(&'static str, String)>,
}

/// The admission stage.
pub struct Admission {
    limiter: Arc<Limiter>,
    budgets: Budgets,
    has_global: bool,
    max_wait: Duration,
}

impl Admission {
    /// Creates the stage. `has_global` says whether global limits are set.
    pub fn new(
        limiter: Arc<Limiter>,
        budgets: Budgets,
        has_global: bool,
        max_wait: Duration,
    ) -> Admission {
        Admission {
            limiter,
            budgets,
            has_global,
            max_wait,
        }
    }

    /// Refuses a key whose budget is spent with 402 `billing_error` (which the
    /// SDKs do not retry). Shadow keys are logged and counted, not refused.
    pub async fn check_budget(
        &self,
        key: &KeyRecord,
        request_id: &str,
    ) -> Result<(), GatewayError> {
        let BudgetDecision::Exhausted(spent) = self.budgets.check(key).await else {
            return Ok(());
        };
        if key.shadow {
            self.limiter.metrics().count(Outcome::ShadowViolation);
            tracing::warn!(request_id, key_id = %key.id, "shadow mode: request over its budget let through");
            return Ok(());
        }
        self.limiter.metrics().count(Outcome::OverBudget);
        tracing::info!(request_id, key_id = %key.id, "budget exhausted");
        Err(GatewayError::BudgetExhausted(spent.message()))
    }

    /// The limiter, for settling reservations.
    pub fn limiter(&self) -> &Arc<Limiter> {
        &self.limiter
    }

    /// The estimate reserved at admission: input from the body size (about four
    /// bytes a token), output from `max_tokens`. Endpoints that are not billed
    /// reserve no tokens but still count as requests.
    pub fn estimate(body_len: usize, max_tokens: Option<u64>, billable: bool) -> Demand {
        if !billable {
            return Demand {
                input_tokens: 0,
                output_tokens: 0,
            };
        }
        Demand {
            input_tokens: (body_len as u64).div_ceil(4),
            output_tokens: max_tokens.unwrap_or(DEFAULT_OUTPUT_ESTIMATE),
        }
    }

    /// Admits the request, waits for it, or refuses it.
    pub async fn admit(
        &self,
        caller: &Caller,
        demand: Demand,
        request_id: &str,
    ) -> Result<Admitted, GatewayError> {
        if caller.limits.is_unlimited() && !self.has_global {
            return Ok(Admitted::default());
        }
        let now = SystemTime::now();
        if caller.shadow {
            return Ok(self.admit_shadow(caller, demand, request_id, now).await);
        }
        match self
            .limiter
            .acquire(&caller.key_id, &caller.limits, demand, self.max_wait)
            .await
        {
            Ok(acquired) => Ok(Admitted {
                headers: acquired.reservation.state().headers(now),
                reservation: Some(acquired.reservation),
                waited: acquired.waited,
            }),
            Err(AcquireError::Limited(wait)) => {
                tracing::info!(
                    request_id,
                    key_id = %caller.key_id,
                    limited_by = %wait.limited_by,
                    retry_after_ms = wait.retry_after.as_millis() as u64,
                    "rate limited"
                );
                Err(GatewayError::RateLimited {
                    message: format!("over the {}", wait.limited_by),
                    retry_after: wait.retry_after,
                    headers: wait.state.headers(now),
                })
            }
            Err(AcquireError::Unavailable(e)) => Err(GatewayError::Overloaded(format!(
                "rate limiter unavailable: {e}"
            ))),
        }
    }

    /// Shadow mode: one non-blocking decision; a violation is logged and
    /// counted, and the request goes ahead either way.
    async fn admit_shadow(
        &self,
        caller: &Caller,
        demand: Demand,
        request_id: &str,
        now: SystemTime,
    ) -> Admitted {
        match self
            .limiter
            .try_acquire(&caller.key_id, &caller.limits, demand)
            .await
        {
            Ok(Decision::Admit(reservation)) => {
                self.limiter.metrics().count(Outcome::Admitted);
                Admitted {
                    headers: reservation.state().headers(now),
                    reservation: Some(reservation),
                    waited: Duration::ZERO,
                }
            }
            Ok(Decision::Wait(wait)) => {
                self.limiter.metrics().count(Outcome::ShadowViolation);
                tracing::warn!(
                    request_id,
                    key_id = %caller.key_id,
                    limited_by = %wait.limited_by,
                    retry_after_ms = wait.retry_after.as_millis() as u64,
                    "shadow mode: request over its rate limit let through"
                );
                Admitted {
                    headers: wait.state.headers(now),
                    ..Admitted::default()
                }
            }
            Err(e) => {
                tracing::warn!(request_id, error = %e, "shadow mode: limiter unavailable");
                Admitted::default()
            }
        }
    }
}
