//! The pooled client that carries requests to the Anthropic API.
//!
//! One hyper client over rustls (webpki roots plus an optional `upstream.ca_file`),
//! HTTP/1.1 or h2 by ALPN, with keep-alive pooling. Three timeouts apply:
//! connecting (TCP and TLS), the first byte (until the response headers arrive),
//! and idle gaps between body chunks (enforced by the metered body, which sees
//! every chunk).

use std::io::BufReader;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::config::Config;
use crate::error::GatewayError;

/// The upstream client and its timeouts.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    base: http::Uri,
    first_byte_timeout: Duration,
}

/// Why the upstream client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamSetupError {
    #[error("cannot read upstream.ca_file {path}: {source}")]
    CaFile {
        path: String,
        source: std::io::Error,
    },
    #[error("upstream.ca_file {0} holds no usable certificate")]
    NoCertificates(String),
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
}

impl Upstream {
    /// Builds the pooled client from the configuration.
    pub fn new(config: &Config) -> Result<Upstream, UpstreamSetupError> {
        let cfg = &config.raw.upstream;
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &cfg.ca_file {
            let display = path.display().to_string();
            let file = std::fs::File::open(path).map_err(|source| UpstreamSetupError::CaFile {
                path: display.clone(),
                source,
            })?;
            let mut added = 0;
            for cert in rustls_pemfile::certs(&mut BufReader::new(file)) {
                let cert = cert.map_err(|source| UpstreamSetupError::CaFile {
                    path: display.clone(),
                    source,
                })?;
                roots.add(cert)?;
                added += 1;
            }
            if added == 0 {
                return Err(UpstreamSetupError::NoCertificates(display));
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(
            rustls::crypto::ring::default_provider().into(),
        )
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();

        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
            .build(https);
        Ok(Upstream {
            client,
            base: config.upstream_url.clone(),
            first_byte_timeout: cfg.first_byte_timeout,
        })
    }

    /// The upstream URI for a request path and query.
    pub fn uri_for(&self, path_and_query: &str) -> Result<http::Uri, GatewayError> {
        let mut parts = self.base.clone().into_parts();
        parts.path_and_query = Some(
            path_and_query
                .parse()
                .map_err(|_| GatewayError::BadRequest("invalid request path".into()))?,
        );
        http::Uri::from_parts(parts).map_err(|e| GatewayError::Internal(e.to_string()))
    }

    /// The `Host` header value for the upstream.
    pub fn authority(&self) -> Option<&http::uri::Authority> {
        self.base.authority()
    }

    /// Sends one request and waits for the response headers, at most
    /// `upstream.first_byte_timeout`.
    pub async fn send(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, GatewayError> {
        match tokio::time::timeout(self.first_byte_timeout, self.client.request(request)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) if e.is_connect() => Err(GatewayError::UpstreamConnect(error_chain(&e))),
            Ok(Err(e)) => Err(GatewayError::UpstreamProtocol(error_chain(&e))),
            Err(_) => Err(GatewayError::UpstreamTimeout(self.first_byte_timeout)),
        }
    }
}

/// An error and its causes on one line (hyper's top-level messages are terse).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// When and how long to wait before another upstream attempt.
///
/// Retries happen only before any response byte reached the client (the proxy
/// decides on the response headers, before it relays anything). The delay is the
/// upstream's own hint (`retry-after-ms`, else `retry-after` seconds) when it
/// gives one, else exponential backoff with full jitter; a retry whose delay
/// would take the request past its time budget is not made.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    max_retries: u32,
    budget: Duration,
    base: Duration,
    cap: Duration,
}

impl RetryPolicy {
    /// The policy from `upstream.max_retries` and `upstream.retry_budget`.
    pub fn new(max_retries: u32, budget: Duration) -> RetryPolicy {
        RetryPolicy {
            max_retries,
            budget,
            base: Duration::from_millis(500),
            cap: Duration::from_secs(8),
        }
    }

    /// The wait before retry number `retry` (1-based), or `None` to stop.
    /// `hint` is the upstream's retry-after; `waited` is the time already spent
    /// waiting between attempts of this request.
    pub fn delay(&self, retry: u32, hint: Option<Duration>, waited: Duration) -> Option<Duration> {
        if retry > self.max_retries {
            return None;
        }
        let delay = match hint {
            Some(hint) => hint,
            None => {
                let exp = self
                    .base
                    .saturating_mul(1u32 << (retry - 1).min(16))
                    .min(self.cap);
                // Full jitter: uniform in [0, exp], so synchronised clients spread out.
                exp.mul_f64(rand::random::<f64>())
            }
        };
        (waited + delay <= self.budget).then_some(delay)
    }
}

/// Statuses worth another attempt: rate limited, overloaded, server errors.
pub fn retryable_status(status: http::StatusCode) -> bool {
    status == http::StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

/// The upstream's retry hint: `retry-after-ms`, else `retry-after` in seconds.
pub fn retry_hint(headers: &http::HeaderMap) -> Option<Duration> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = get("retry-after-ms").and_then(|v| v.parse::<f64>().ok())
        && ms.is_finite()
        && ms >= 0.0
    {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    get("retry-after")
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// The upstream's explicit `x-should-retry` verdict, if it gave one.
pub fn should_retry(headers: &http::HeaderMap) -> Option<bool> {
    match headers.get("x-should-retry").and_then(|v| v.to_str().ok()) {
        Some("true") => Some(true),
        Some("false") => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_stops() {
        let p = RetryPolicy::new(3, Duration::from_secs(30));
        for _ in 0..100 {
            assert!(p.delay(1, None, Duration::ZERO).unwrap() <= Duration::from_millis(500));
            assert!(p.delay(3, None, Duration::ZERO).unwrap() <= Duration::from_secs(2));
        }
        assert_eq!(p.delay(4, None, Duration::ZERO), None);
    }

    #[test]
    fn the_upstream_hint_wins_within_the_budget() {
        let p = RetryPolicy::new(2, Duration::from_secs(10));
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(3)), Duration::ZERO),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(3)), Duration::from_secs(8)),
            None
        );
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(60)), Duration::ZERO),
            None
        );
    }

    #[test]
    fn hints_are_read() {
        let mut h = http::HeaderMap::new();
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_hint(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", "1500.5".parse().unwrap());
        assert_eq!(retry_hint(&h), Some(Duration::from_micros(1_500_500)));
        h.insert("x-should-retry", "false".parse().unwrap());
        assert_eq!(should_retry(&h), Some(false));
        assert!(retryable_status(http::StatusCode::from_u16(529).unwrap()));
        assert!(!retryable_status(http::StatusCode::BAD_REQUEST));
    }
}
