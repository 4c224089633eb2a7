//! The link to Redis that the rate limiter and the budgets share the shape of.
//!
//! Both keep state in one Redis and must never let it slow or stop admission:
//! every call is bounded by `limits.redis_timeout`, and after a failure Redis
//! is skipped for `limits.redis_retry_interval`, so a Redis that is down costs
//! one timeout per interval rather than one per request. This module holds
//! that machinery once; what a caller does meanwhile (decide locally, refuse,
//! keep costs for later), its metrics and its log lines stay with the caller.

use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, FromRedisValue, RedisResult, ScriptInvocation};
use tokio::time::Instant;

use crate::config::LimitsConfig;

/// At most one error line per this interval while Redis stays down, so an
/// outage does not flood the log at the request rate.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// One Redis client with its lazily made connection, the call timeout and
/// the circuit breaker that skips Redis after a failure.
pub(crate) struct RedisLink {
    client: redis::Client,
    connection: Mutex<Option<ConnectionManager>>,
    timeout: Duration,
    retry_interval: Duration,
    health: Mutex<Health>,
}

/// Whether Redis is being skipped, and the error log's rate limit.
#[derive(Default)]
struct Health {
    skip_until: Option<Instant>,
    last_log: Option<Instant>,
    suppressed: u64,
}

/// Why a Redis call did not give an answer. The caller turns it into its own
/// error or fallback; the text goes into its log lines.
#[derive(Debug)]
pub(crate) enum CallError {
    /// Redis (or the connection to it) answered with an error.
    Redis(redis::RedisError),
    /// Nothing came back within the timeout.
    Timeout(Duration),
    /// An answer the caller could not read, described in full by the caller
    /// (which knows what it asked for).
    Reply(String),
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::Redis(e) => write!(f, "{e}"),
            CallError::Timeout(d) => write!(f, "no answer within {d:?}"),
            CallError::Reply(r) => f.write_str(r),
        }
    }
}

impl RedisLink {
    /// A link to `limits.redis_url` with the timeout and retry interval of
    /// `limits`. Nothing connects until the first call, so a gateway starts
    /// while Redis is down. The error is a message for the caller's config
    /// error, with the URL's password masked.
    pub(crate) fn open(limits: &LimitsConfig) -> Result<RedisLink, String> {
        let url = limits
            .redis_url
            .as_ref()
            .ok_or_else(|| "limits.backend = \"redis\" needs limits.redis_url".to_owned())?;
        let client =
            redis::Client::open(url.expose()).map_err(|e| format!("{}: {e}", url.masked()))?;
        Ok(RedisLink {
            client,
            connection: Mutex::new(None),
            timeout: limits.redis_timeout,
            retry_interval: limits.redis_retry_interval,
            health: Mutex::new(Health::default()),
        })
    }

    /// How long Redis is skipped after a failure; callers that retry on
    /// their own (the budget task) wait this long too.
    pub(crate) fn retry_interval(&self) -> Duration {
        self.retry_interval
    }

    /// Runs a prepared script once, within the timeout (connecting included).
    pub(crate) async fn invoke<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, CallError> {
        let mut connection = self.connection()?;
        self.within_timeout(invocation.invoke_async(&mut connection))
            .await
    }

    /// Runs one command once, within the timeout (connecting included).
    pub(crate) async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, CallError> {
        let mut connection = self.connection()?;
        self.within_timeout(cmd.query_async(&mut connection)).await
    }

    async fn within_timeout<T>(
        &self,
        call: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, CallError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(CallError::Redis(e)),
            Err(_) => Err(CallError::Timeout(self.timeout)),
        }
    }

    /// The shared connection, created at the first call (it needs the runtime).
    fn connection(&self) -> Result<ConnectionManager, CallError> {
        let mut slot = lock(&self.connection);
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            // Reconnect attempts are paced by our own retry interval, not here.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let manager = ConnectionManager::new_lazy_with_config(self.client.clone(), config)
            .map_err(CallError::Redis)?;
        *slot = Some(manager.clone());
        Ok(manager)
    }

    /// True if Redis should be called now. After a failure, one caller per
    /// retry interval gets to try.
    pub(crate) fn may_call(&self) -> bool {
        let mut health = lock(&self.health);
        match health.skip_until {
            None => true,
            Some(until) => {
                let now = Instant::now();
                if now < until {
                    return false;
                }
                // This caller probes; the others keep skipping until it reports.
                health.skip_until = Some(now + self.retry_interval);
                true
            }
        }
    }

    /// Records an answer. True when Redis was failing until now, so the
    /// caller logs, once, that its state is shared again.
    pub(crate) fn recovered(&self) -> bool {
        let mut health = lock(&self.health);
        if health.skip_until.take().is_none() {
            return false;
        }
        health.last_log = None;
        health.suppressed = 0;
        true
    }

    /// Records a failure: Redis is skipped for the retry interval. Returns
    /// `Some(failures not logged since the last line)` when the caller should
    /// log this one, `None` while the log is rate-limited.
    pub(crate) fn failed(&self) -> Option<u64> {
        let now = Instant::now();
        let mut health = lock(&self.health);
        health.skip_until = Some(now + self.retry_interval);
        if health
            .last_log
            .is_some_and(|t| now.duration_since(t) < ERROR_LOG_INTERVAL)
        {
            health.suppressed += 1;
            return None;
        }
        health.last_log = Some(now);
        Some(std::mem::take(&mut health.suppressed))
    }
}

/// A poisoned lock only means another thread panicked mid-update; this state
/// (a connection handle, timestamps, counters) stays usable, so carry on.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::MaskedUrl;

    const RETRY: Duration = Duration::from_secs(1);

    fn link() -> RedisLink {
        let limits = LimitsConfig {
            redis_url: Some(MaskedUrl::new("redis://127.0.0.1:1")),
            redis_retry_interval: RETRY,
            ..LimitsConfig::default()
        };
        RedisLink::open(&limits).unwrap()
    }

    #[test]
    fn opening_needs_a_url_and_masks_its_password() {
        let missing = RedisLink::open(&LimitsConfig::default()).err().unwrap();
        assert_eq!(missing, "limits.backend = \"redis\" needs limits.redis_url");
        let bad = LimitsConfig {
            redis_url: Some(MaskedUrl::new("nope://user:hunter2@host")),
            ..LimitsConfig::default()
        };
        let error = RedisLink::open(&bad).err().unwrap();
        assert!(error.starts_with("nope://user:*****@host: "), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_skips_redis_for_the_retry_interval_then_one_caller_probes() {
        let link = link();
        assert!(link.may_call());
        assert!(!link.recovered(), "nothing failed, nothing to announce");

        assert_eq!(link.failed(), Some(0));
        assert!(!link.may_call());
        tokio::time::advance(RETRY - Duration::from_millis(1)).await;
        assert!(!link.may_call());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(link.may_call(), "the interval is over: probe");
        assert!(!link.may_call(), "only one caller probes per interval");

        assert!(link.recovered());
        assert!(link.may_call());
        assert!(!link.recovered(), "the recovery is announced once");
    }

    #[tokio::test(start_paused = true)]
    async fn failure_logs_are_rate_limited_and_count_what_they_skipped() {
        let link = link();
        assert_eq!(link.failed(), Some(0));
        assert_eq!(link.failed(), None);
        assert_eq!(link.failed(), None);
        tokio::time::advance(ERROR_LOG_INTERVAL).await;
        assert_eq!(link.failed(), Some(2));
        assert_eq!(link.failed(), None);

        // A recovery starts the count afresh: the next failure is news.
        assert!(link.recovered());
        assert_eq!(link.failed(), Some(0));
    }

    #[test]
    fn call_errors_read_as_log_text() {
        assert_eq!(
            CallError::Timeout(Duration::from_millis(250)).to_string(),
            "no answer within 250ms"
        );
        let reply = CallError::Reply("unexpected reply: [1]".into());
        assert_eq!(reply.to_string(), "unexpected reply: [1]");
    }
}
