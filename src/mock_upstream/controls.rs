//! The `x-mock-*` request headers that steer one response, read and checked
//! before anything is sent. A bad value is answered with a 400
//! `invalid_request_error` that names the header, never ignored.

use std::time::Duration;

use http::HeaderMap;

use super::faults::FaultPlan;
use super::synth::CacheSpec;

/// Most output tokens a request may ask for: keeps a non-streaming body (four
/// bytes a token) to a few megabytes.
pub(crate) const MAX_OUTPUT_TOKENS: u64 = 1_000_000;
/// Longest per-event delay a request may ask for.
const MAX_EVENT_DELAY_MS: u64 = 60_000;

/// Server-wide defaults that the headers override.
#[derive(Debug, Clone)]
pub(crate) struct Defaults {
    pub output_tokens: u64,
    pub event_delay: Duration,
    pub stamp: bool,
}

/// What the `x-mock-*` headers of one request ask for.
#[derive(Debug, Clone, Default)]
pub(crate) struct Controls {
    /// `x-mock-fixture`: replay this recorded stream.
    pub fixture: Option<String>,
    /// `x-mock-output-tokens`.
    pub output_tokens: u64,
    /// `x-mock-cache: write=N,read=M[,write_1h=K]`.
    pub cache: CacheSpec,
    /// `x-mock-input-growth`.
    pub input_growth: u64,
    /// `x-mock-web-searches`.
    pub web_searches: u64,
    /// `x-mock-event-delay-ms`.
    pub event_delay: Duration,
    /// `x-mock-stamp`.
    pub stamp: bool,
    /// `x-mock-gzip`.
    pub gzip: bool,
    /// `x-mock-fault`, before `x-mock-fail-times` is applied.
    pub faults: FaultPlan,
    /// `x-mock-fail-times` with its `x-mock-fault-key`.
    pub fail_times: Option<(u64, String)>,
}

impl Controls {
    /// Reads the headers; the error is a message for the 400 response.
    pub fn from_headers(headers: &HeaderMap, defaults: &Defaults) -> Result<Controls, String> {
        let mut controls = Controls {
            output_tokens: defaults.output_tokens,
            event_delay: defaults.event_delay,
            stamp: defaults.stamp,
            ..Controls::default()
        };
        if let Some(name) = text(headers, "x-mock-fixture")? {
            controls.fixture = Some(name.to_owned());
        }
        if let Some(n) = number(headers, "x-mock-output-tokens")? {
            if n > MAX_OUTPUT_TOKENS {
                return Err(format!("x-mock-output-tokens: at most {MAX_OUTPUT_TOKENS}"));
            }
            controls.output_tokens = n;
        }
        if let Some(spec) = text(headers, "x-mock-cache")? {
            controls.cache = parse_cache(spec).map_err(|e| format!("x-mock-cache: {e}"))?;
        }
        if let Some(n) = number(headers, "x-mock-input-growth")? {
            controls.input_growth = n;
        }
        if let Some(n) = number(headers, "x-mock-web-searches")? {
            controls.web_searches = n;
        }
        if let Some(ms) = number(headers, "x-mock-event-delay-ms")? {
            if ms > MAX_EVENT_DELAY_MS {
                return Err(format!(
                    "x-mock-event-delay-ms: at most {MAX_EVENT_DELAY_MS}"
                ));
            }
            controls.event_delay = Duration::from_millis(ms);
        }
        if let Some(on) = flag(headers, "x-mock-stamp")? {
            controls.stamp = on;
        }
        if let Some(on) = flag(headers, "x-mock-gzip")? {
            controls.gzip = on;
        }
        if let Some(spec) = text(headers, "x-mock-fault")? {
            controls.faults = FaultPlan::parse(spec).map_err(|e| format!("x-mock-fault: {e}"))?;
        }
        match (
            number(headers, "x-mock-fail-times")?,
            text(headers, "x-mock-fault-key")?,
        ) {
            (Some(times), Some(key)) => controls.fail_times = Some((times, key.to_owned())),
            (Some(_), None) => return Err("x-mock-fail-times needs x-mock-fault-key".into()),
            (None, _) => {}
        }
        Ok(controls)
    }
}

fn text<'h>(headers: &'h HeaderMap, name: &str) -> Result<Option<&'h str>, String> {
    match headers.get(name) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .map(|v| Some(v.trim()))
            .map_err(|_| format!("{name}: not visible ASCII")),
    }
}

fn number(headers: &HeaderMap, name: &str) -> Result<Option<u64>, String> {
    match text(headers, name)? {
        None => Ok(None),
        Some(raw) => raw
            .parse()
            .map(Some)
            .map_err(|_| format!("{name}: expected a whole number, got `{raw}`")),
    }
}

fn flag(headers: &HeaderMap, name: &str) -> Result<Option<bool>, String> {
    match text(headers, name)? {
        None => Ok(None),
        Some("1" | "true" | "yes" | "on") => Ok(Some(true)),
        Some("0" | "false" | "no" | "off") => Ok(Some(false)),
        Some(raw) => Err(format!("{name}: expected 1 or 0, got `{raw}`")),
    }
}

/// Parses `write=N,read=M[,write_1h=K]`; every part is optional.
fn parse_cache(spec: &str) -> Result<CacheSpec, String> {
    let mut cache = CacheSpec::default();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, raw) = part
            .split_once('=')
            .ok_or_else(|| format!("expected key=N, got `{part}`"))?;
        let n: u64 = raw
            .trim()
            .parse()
            .map_err(|_| format!("`{key}` needs a whole number"))?;
        match key.trim() {
            "write" => cache.write_5m = n,
            "write_1h" => cache.write_1h = n,
            "read" => cache.read = n,
            other => return Err(format!("unknown counter `{other}`")),
        }
    }
    Ok(cache)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Defaults {
        Defaults {
            output_tokens: 16,
            event_delay: Duration::ZERO,
            stamp: false,
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, v.parse().unwrap());
        }
        map
    }

    #[test]
    fn reads_every_control() {
        let h = headers(&[
            ("x-mock-fixture", "basic_response"),
            ("x-mock-output-tokens", "40"),
            ("x-mock-cache", "write=10, read=20,write_1h=5"),
            ("x-mock-input-growth", "7"),
            ("x-mock-event-delay-ms", "3"),
            ("x-mock-stamp", "1"),
            ("x-mock-gzip", "true"),
            ("x-mock-fault", "status=529"),
            ("x-mock-fail-times", "2"),
            ("x-mock-fault-key", "k1"),
        ]);
        let c = Controls::from_headers(&h, &defaults()).unwrap();
        assert_eq!(c.fixture.as_deref(), Some("basic_response"));
        assert_eq!(c.output_tokens, 40);
        assert_eq!(
            c.cache,
            CacheSpec {
                write_5m: 10,
                write_1h: 5,
                read: 20
            }
        );
        assert_eq!(c.input_growth, 7);
        assert_eq!(c.event_delay, Duration::from_millis(3));
        assert!(c.stamp && c.gzip);
        assert_eq!(c.faults.status.unwrap().status, 529);
        assert_eq!(c.fail_times, Some((2, "k1".into())));
    }

    #[test]
    fn defaults_apply_without_headers() {
        let c = Controls::from_headers(&HeaderMap::new(), &defaults()).unwrap();
        assert_eq!(c.output_tokens, 16);
        assert!(c.faults.is_empty() && !c.stamp && !c.gzip);
    }

    #[test]
    fn rejects_bad_values() {
        for pair in [
            ("x-mock-output-tokens", "many"),
            ("x-mock-output-tokens", "1000001"),
            ("x-mock-cache", "write=1,evict=2"),
            ("x-mock-cache", "write"),
            ("x-mock-stamp", "maybe"),
            ("x-mock-event-delay-ms", "600000"),
            ("x-mock-fault", "status=700"),
            ("x-mock-fail-times", "1"),
        ] {
            let err = Controls::from_headers(&headers(&[pair]), &defaults()).unwrap_err();
            assert!(err.starts_with(pair.0), "{err}");
        }
    }
}
