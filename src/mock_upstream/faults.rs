//! Injected faults: the `x-mock-fault` grammar and the `x-mock-fail-times`
//! bookkeeping that lets a test see "529, then 200" across an SDK retry.
//!
//! Grammar (items separated by `,`, parameters of an item by `;`):
//!
//! ```text
//! fault  = item *( "," item )
//! item   = "status=" CODE *( ";retry-after=" SECONDS )
//!        / "slow-first-byte=" MS
//!        / "reset-after=" N / "error-after=" N / "stall-after=" N
//! ```
//!
//! At most one of `reset-after`, `error-after` and `stall-after` per request.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use http::StatusCode;

/// The faults one request asked for.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct FaultPlan {
    /// Answer with this error status instead of the real response.
    pub status: Option<StatusFault>,
    /// Wait this long before sending the response headers.
    pub slow_first_byte: Option<Duration>,
    /// Break the body after some events (streams) or bytes (JSON bodies).
    pub cut: Option<Cut>,
}

/// An injected error response.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StatusFault {
    pub status: StatusCode,
    /// Seconds for `retry-after` (rounded up) and `retry-after-ms`.
    pub retry_after: Option<f64>,
}

impl StatusFault {
    /// The Anthropic `error.type` and a message like the real API's for this status.
    pub fn error_type_and_message(&self) -> (&'static str, String) {
        match self.status.as_u16() {
            400 => (
                "invalid_request_error",
                "mock fault: invalid request".into(),
            ),
            401 => (
                "authentication_error",
                "mock fault: invalid x-api-key".into(),
            ),
            403 => ("permission_error", "mock fault: permission denied".into()),
            404 => ("not_found_error", "mock fault: not found".into()),
            413 => ("request_too_large", "mock fault: request too large".into()),
            429 => ("rate_limit_error", "mock fault: rate limit exceeded".into()),
            529 => ("overloaded_error", "Overloaded".into()),
            code => ("api_error", format!("mock fault: status {code}")),
        }
    }
}

/// Where and how a response body is broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cut {
    /// Events (SSE) or bytes (JSON) sent before the fault.
    pub after: usize,
    pub kind: CutKind,
}

/// What happens at the cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CutKind {
    /// End the body with an error: the connection (h1) or stream (h2) is aborted.
    Reset,
    /// Send an in-stream `overloaded_error` event and end cleanly.
    Error,
    /// Send nothing more and keep the body open.
    Stall,
}

impl FaultPlan {
    /// Whether the request asked for no fault at all.
    pub fn is_empty(&self) -> bool {
        self.status.is_none() && self.slow_first_byte.is_none() && self.cut.is_none()
    }

    /// Parses an `x-mock-fault` value; the error explains what is wrong.
    pub fn parse(value: &str) -> Result<FaultPlan, String> {
        let mut plan = FaultPlan::default();
        for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let mut parts = item.split(';').map(str::trim);
            let head = parts.next().unwrap_or_default();
            let (key, raw) = split_pair(head)?;
            let params: Vec<&str> = parts.collect();
            if key != "status" && !params.is_empty() {
                return Err(format!("`{key}` takes no parameters, got `{item}`"));
            }
            match key {
                "status" => plan.status = Some(parse_status(raw, &params)?),
                "slow-first-byte" => {
                    plan.slow_first_byte = Some(Duration::from_millis(parse_number(key, raw)?));
                }
                "reset-after" | "error-after" | "stall-after" => {
                    if plan.cut.is_some() {
                        return Err("only one of reset-after, error-after, stall-after".into());
                    }
                    let kind = match key {
                        "reset-after" => CutKind::Reset,
                        "error-after" => CutKind::Error,
                        _ => CutKind::Stall,
                    };
                    let after = usize::try_from(parse_number(key, raw)?)
                        .map_err(|_| format!("`{key}` is too large"))?;
                    plan.cut = Some(Cut { after, kind });
                }
                other => return Err(format!("unknown fault `{other}`")),
            }
        }
        Ok(plan)
    }
}

fn split_pair(pair: &str) -> Result<(&str, &str), String> {
    pair.split_once('=')
        .map(|(k, v)| (k.trim(), v.trim()))
        .ok_or_else(|| format!("expected key=value, got `{pair}`"))
}

fn parse_number(key: &str, raw: &str) -> Result<u64, String> {
    raw.parse()
        .map_err(|_| format!("`{key}` needs a whole number, got `{raw}`"))
}

fn parse_status(raw: &str, params: &[&str]) -> Result<StatusFault, String> {
    let status = raw
        .parse::<u16>()
        .ok()
        .and_then(|code| StatusCode::from_u16(code).ok())
        .filter(|s| s.is_client_error() || s.is_server_error())
        .ok_or_else(|| format!("status needs a 4xx or 5xx code, got `{raw}`"))?;
    let mut fault = StatusFault {
        status,
        retry_after: None,
    };
    for param in params {
        match split_pair(param)? {
            ("retry-after", secs) => {
                let secs: f64 = secs
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s >= 0.0 && *s <= 86_400.0)
                    .ok_or_else(|| format!("retry-after needs 0..=86400 seconds, got `{secs}`"))?;
                fault.retry_after = Some(secs);
            }
            (other, _) => return Err(format!("unknown status parameter `{other}`")),
        }
    }
    Ok(fault)
}

/// How many requests per `x-mock-fault-key` have been seen, so a fault can be
/// applied to the first K of them only. Bounded: past [`FailTimes::CAPACITY`]
/// keys the oldest is forgotten (a test reusing a forgotten key sees its
/// faults again, which only matters to a test that uses thousands of keys).
#[derive(Debug, Default)]
pub(crate) struct FailTimes {
    inner: Mutex<FailTimesMap>,
}

#[derive(Debug, Default)]
struct FailTimesMap {
    seen: HashMap<String, u64>,
    /// Keys in insertion order, for eviction.
    order: VecDeque<String>,
}

impl FailTimes {
    /// The most keys remembered at once.
    pub const CAPACITY: usize = 4096;

    /// Counts one more request carrying `key` and says whether it is among the
    /// first `times` (and so gets the fault).
    pub fn should_fail(&self, key: &str, times: u64) -> bool {
        // A poisoned lock only means another request panicked mid-update; the
        // counts are still usable.
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(seen) = map.seen.get_mut(key) {
            let fail = *seen < times;
            *seen = seen.saturating_add(1);
            return fail;
        }
        if map.order.len() >= Self::CAPACITY
            && let Some(oldest) = map.order.pop_front()
        {
            map.seen.remove(&oldest);
        }
        map.seen.insert(key.to_owned(), 1);
        map.order.push_back(key.to_owned());
        times > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_fault() {
        let plan = FaultPlan::parse("status=429;retry-after=1.5, slow-first-byte=20").unwrap();
        let status = plan.status.unwrap();
        assert_eq!(status.status, 429);
        assert_eq!(status.retry_after, Some(1.5));
        assert_eq!(plan.slow_first_byte, Some(Duration::from_millis(20)));
        assert_eq!(plan.cut, None);

        for (text, kind) in [
            ("reset-after=3", CutKind::Reset),
            ("error-after=3", CutKind::Error),
            ("stall-after=3", CutKind::Stall),
        ] {
            assert_eq!(
                FaultPlan::parse(text).unwrap().cut,
                Some(Cut { after: 3, kind })
            );
        }
        assert!(FaultPlan::parse("").unwrap().is_empty());
    }

    #[test]
    fn rejects_bad_faults() {
        for bad in [
            "status=200",
            "status=abc",
            "status=429;retry-after=-1",
            "status=429;wait=1",
            "reset-after=x",
            "reset-after=1,stall-after=2",
            "stall-after=1;retry-after=2",
            "explode=1",
            "status",
        ] {
            assert!(FaultPlan::parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn fail_times_counts_per_key() {
        let fails = FailTimes::default();
        let seq: Vec<bool> = (0..4).map(|_| fails.should_fail("a", 2)).collect();
        assert_eq!(seq, [true, true, false, false]);
        assert!(fails.should_fail("b", 1));
        assert!(!fails.should_fail("c", 0));
    }

    #[test]
    fn fail_times_is_bounded() {
        let fails = FailTimes::default();
        for i in 0..FailTimes::CAPACITY + 10 {
            fails.should_fail(&i.to_string(), 1);
        }
        let map = fails.inner.lock().unwrap();
        assert_eq!(map.seen.len(), FailTimes::CAPACITY);
        assert_eq!(map.order.len(), FailTimes::CAPACITY);
        // The oldest keys were forgotten, the newest kept.
        assert!(!map.seen.contains_key("0"));
        assert!(
            map.seen
                .contains_key(&(FailTimes::CAPACITY + 9).to_string())
        );
    }
}
