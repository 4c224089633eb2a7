//! The request path: route, read, identify, forward, and wrap the response.
//!
//! [`Proxy::handle`] runs once per request. It accepts only `/v1/...` paths,
//! reads the body (bounded by `server.max_body_bytes`), takes a lenient look at
//! it ([`request_info`]), identifies the caller ([`identity`]), forwards the
//! request with hop-by-hop headers removed, and returns the upstream response
//! with its body wrapped in a [`MeteredBody`]. Errors tollgate originates go
//! through [`GatewayError::to_response`], the one place that shapes them.

pub mod admission;
pub mod identity;
pub mod request_info;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;

use crate::error::{GatewayError, REQUEST_ID_HEADER};
use crate::keys::{AuthError, Identity, Keys};
use crate::limits::KeyLimits;
use crate::meter::Meter;
use crate::meter::body::{MeteredBody, Recorder, RequestContext, ResponseFacts};
use crate::secret::Secret;
use crate::upstream::{RetryPolicy, Upstream, retry_hint, retryable_status, should_retry};
use admission::{Admission, Caller};
use identity::Credential;
use request_info::RequestInfo;

/// The body of every response the proxy returns.
pub type ProxyBody = Either<MeteredBody<Incoming>, Full<Bytes>>;

/// Request headers starting with this prefix are for tollgate and not forwarded.
const OWN_HEADER_PREFIX: &str = "tollgate-";
/// Optional request header with free-form labels recorded in `tags`.
const TAGS_HEADER: &str = "tollgate-tags";

/// What the request path is built from.
pub struct ProxyParts {
    pub upstream: Upstream,
    pub retry: RetryPolicy,
    pub keys: Keys,
    /// `upstream.api_key` in virtual mode; `None` in passthrough mode.
    pub upstream_key: Option<Secret<String>>,
    pub admission: Admission,
    /// The configured per-key limits, which a key's own override.
    pub default_limits: KeyLimits,
    pub recorder: Arc<Recorder>,
    pub max_body_bytes: u64,
}

/// Shared state of the request path.
pub struct Proxy {
    upstream: Upstream,
    retry: RetryPolicy,
    keys: Keys,
    /// In virtual mode, the key sent upstream instead of the client's.
    upstream_key: Option<HeaderValue>,
    admission: Admission,
    default_limits: KeyLimits,
    recorder: Arc<Recorder>,
    max_body_bytes: u64,
}

impl Proxy {
    /// Creates the request handler.
    pub fn new(parts: ProxyParts) -> Proxy {
        let mut upstream_key = parts
            .upstream_key
            .and_then(|key| HeaderValue::from_str(key.expose()).ok());
        if let Some(key) = upstream_key.as_mut() {
            key.set_sensitive(true);
        }
        Proxy {
            upstream: parts.upstream,
            retry: parts.retry,
            keys: parts.keys,
            upstream_key,
            admission: parts.admission,
            default_limits: parts.default_limits,
            recorder: parts.recorder,
            max_body_bytes: parts.max_body_bytes,
        }
    }

    /// Handles one request. Never fails: errors become Anthropic-shaped responses.
    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<ProxyBody> {
        let started = Instant::now();
        let started_at = chrono::Utc::now();
        let request_id = format!("tg_{}", uuid::Uuid::now_v7().simple());
        match self
            .forward(request, &request_id, started, started_at)
            .await
        {
            Ok(response) => response,
            Err(error) => {
                self.recorder
                    .metrics()
                    .rejected
                    .with_label_values(&[error.label()])
                    .inc();
                tracing::debug!(request_id = %request_id, error = %error, "request answered by tollgate");
                error.to_response(&request_id).map(Either::Right)
            }
        }
    }

    async fn forward(
        &self,
        request: Request<Incoming>,
        request_id: &str,
        started: Instant,
        started_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<Response<ProxyBody>, GatewayError> {
        let (parts, body) = request.into_parts();
        let path = parts.uri.path();
        if !(path == "/v1" || path.starts_with("/v1/")) {
            return Err(GatewayError::NotFound {
                method: parts.method.to_string(),
                path: path.to_owned(),
            });
        }
        if !self.recorder.sink().accepting() {
            return Err(GatewayError::Overloaded(
                "the usage journal is full; retry later".to_owned(),
            ));
        }
        let identity = self.identify(&parts.headers).await?;
        let caller = Caller {
            key_id: identity.key.id.clone(),
            team: identity.key.team.clone(),
            limits: identity.key.limits(self.default_limits),
            shadow: identity.key.shadow,
        };
        self.admission
            .check_budget(&identity.key, request_id)
            .await?;

        let body = self.read_body(&parts.headers, body).await?;
        let endpoint = path.to_owned();
        let billable = parts.method == Method::POST && endpoint == "/v1/messages";
        let info = if billable {
            RequestInfo::from_body(&body)
        } else {
            RequestInfo::default()
        };

        let path_and_query = parts.uri.path_and_query().map_or(path, |pq| pq.as_str());
        let upstream_uri = self.upstream.uri_for(path_and_query)?;
        let mut upstream_headers = forwarded_request_headers(&parts.headers);
        if let Some(key) = &self.upstream_key {
            // Virtual keys: the client's key stops here; the upstream gets ours.
            upstream_headers.remove(header::AUTHORIZATION);
            upstream_headers.insert("x-api-key", key.clone());
        }
        let make_request = || {
            let mut r = Request::new(Full::new(body.clone()));
            *r.method_mut() = parts.method.clone();
            *r.uri_mut() = upstream_uri.clone();
            *r.headers_mut() = upstream_headers.clone();
            r
        };

        let demand = Admission::estimate(body.len(), info.max_tokens, billable);
        let admitted = self.admission.admit(&caller, demand, request_id).await?;
        self.recorder
            .metrics()
            .admission_wait
            .observe(admitted.waited.as_secs_f64());

        let mut ctx = RequestContext {
            request_id: request_id.to_owned(),
            key_id: caller.key_id,
            team: caller.team,
            requested_model: info.model,
            endpoint,
            end_user: info.end_user,
            tags: header_str(&parts.headers, TAGS_HEADER).map(str::to_owned),
            long_context_beta: header_str(&parts.headers, "anthropic-beta")
                .is_some_and(crate::prices::is_long_context_beta),
            attempts: 1,
            queued_ms: u64::try_from(admitted.waited.as_millis()).unwrap_or(u64::MAX),
            reservation: admitted.reservation,
            started,
            started_at,
            forwarded: Instant::now(),
        };

        self.recorder.metrics().active_requests.inc();
        let response = match self.send_with_retries(make_request, &mut ctx).await {
            Ok(response) => response,
            Err(error) => {
                self.upstream_failed(ctx, &error);
                return Err(error);
            }
        };

        if response.status() != http::StatusCode::UNAUTHORIZED
            && response.status() != http::StatusCode::FORBIDDEN
        {
            // The upstream accepted the key: give a passthrough key its row.
            self.keys.register_passthrough(&identity);
        }
        Ok(self.relay(response, ctx, billable, admitted.headers))
    }

    /// Sends the request, retrying (with backoff, within the retry budget) on
    /// answers that say "not processed, try again" — connect errors, 429, 529,
    /// 5xx without `x-should-retry: false` — and only here, before any byte of
    /// a response went to the client. Counts the attempts in `ctx`.
    async fn send_with_retries(
        &self,
        make_request: impl Fn() -> Request<Full<Bytes>>,
        ctx: &mut RequestContext,
    ) -> Result<Response<Incoming>, GatewayError> {
        let mut waited = Duration::ZERO;
        loop {
            let outcome = self.upstream.send(make_request()).await;
            let (reason, hint) = match &outcome {
                Ok(r)
                    if retryable_status(r.status()) && should_retry(r.headers()) != Some(false) =>
                {
                    (status_reason(r.status()), retry_hint(r.headers()))
                }
                Err(GatewayError::UpstreamConnect(_)) => ("connect", None),
                _ => return outcome,
            };
            let Some(delay) = self.retry.delay(ctx.attempts, hint, waited) else {
                return outcome;
            };
            self.recorder
                .metrics()
                .upstream_retries
                .with_label_values(&[reason])
                .inc();
            tracing::debug!(request_id = %ctx.request_id, attempt = ctx.attempts, reason, ?delay, "retrying upstream");
            // Dropping an unread error response closes its stream; fine for a retry.
            drop(outcome);
            tokio::time::sleep(delay).await;
            waited += delay;
            ctx.attempts += 1;
            ctx.forwarded = Instant::now();
        }
    }

    /// Accounts for a request whose upstream answer never came.
    fn upstream_failed(&self, ctx: RequestContext, error: &GatewayError) {
        let metrics = self.recorder.metrics();
        metrics
            .upstream_failures
            .with_label_values(&[error.label()])
            .inc();
        tracing::warn!(request_id = %ctx.request_id, error = %error, "upstream request failed");
        match error {
            // The request never reached the upstream: nothing to record.
            GatewayError::UpstreamConnect(_) => metrics.active_requests.dec(),
            // It may have been processed: record it, usage unknown.
            _ => self
                .recorder
                .record_failed(ctx, error.status().as_u16(), error.error_type()),
        }
    }

    /// The upstream's response as relayed: hop-by-hop headers removed,
    /// tollgate's request id and the key's limit state added, and the body
    /// wrapped in a [`MeteredBody`] that meters it and finalises the record.
    fn relay(
        &self,
        response: Response<Incoming>,
        ctx: RequestContext,
        billable: bool,
        limit_headers: Vec<(&'static str, String)>,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let content_type = header_str(&parts.headers, header::CONTENT_TYPE.as_str()).unwrap_or("");
        let encoding = header_str(&parts.headers, header::CONTENT_ENCODING.as_str()).unwrap_or("");
        let stream = content_type.starts_with("text/event-stream");
        let meter = Meter::for_response(billable, content_type, encoding);
        let facts = ResponseFacts {
            status: parts.status.as_u16(),
            upstream_request_id: header_str(&parts.headers, "request-id").map(str::to_owned),
            stream,
            can_append_error: stream && !parts.headers.contains_key(header::CONTENT_LENGTH),
        };
        if let Ok(v) = HeaderValue::from_str(&ctx.request_id) {
            parts.headers.insert(REQUEST_ID_HEADER, v);
        }
        for (name, value) in limit_headers {
            if let Ok(v) = HeaderValue::from_str(&value) {
                parts.headers.insert(name, v);
            }
        }
        let body = MeteredBody::new(body, meter, ctx, facts, self.recorder.clone());
        Response::from_parts(parts, Either::Left(body))
    }

    /// Identifies the caller from its credential (through the key cache).
    async fn identify(&self, headers: &HeaderMap) -> Result<Identity, GatewayError> {
        let Some(credential) = Credential::from_headers(headers) else {
            self.keys.count_missing();
            return Err(GatewayError::Unauthenticated(
                "missing API key: send x-api-key or Authorization: Bearer",
            ));
        };
        self.keys
            .authenticate(credential.secret())
            .await
            .map_err(|e| match e {
                AuthError::Unauthenticated(message) => GatewayError::Unauthenticated(message),
                AuthError::Unavailable(e) => {
                    GatewayError::Overloaded(format!("cannot check the API key now: {e}"))
                }
            })
    }

    /// Reads the whole request body, refusing more than `max_body_bytes`.
    async fn read_body(&self, headers: &HeaderMap, body: Incoming) -> Result<Bytes, GatewayError> {
        let limit = self.max_body_bytes;
        let declared = header_str(headers, header::CONTENT_LENGTH.as_str())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(GatewayError::BodyTooLarge { limit });
        }
        let max = usize::try_from(limit).unwrap_or(usize::MAX);
        match Limited::new(body, max).collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                Err(GatewayError::BodyTooLarge { limit })
            }
            Err(e) => Err(GatewayError::BadRequest(e.to_string())),
        }
    }
}

/// The metric label of a retried status.
fn status_reason(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        429 => "429",
        529 => "529",
        _ => "5xx",
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) that a proxy must not forward.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers, including any the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
}

/// The client's headers as sent upstream: end-to-end headers unchanged,
/// hop-by-hop and tollgate's own removed, and `Host` left to the client
/// (set from the upstream URI).
fn forwarded_request_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = headers.clone();
    strip_hop_by_hop(&mut out);
    out.remove(header::HOST);
    // The body is re-framed from the bytes read; hyper sets the length.
    out.remove(header::CONTENT_LENGTH);
    let own: Vec<HeaderName> = out
        .keys()
        .filter(|k| k.as_str().starts_with(OWN_HEADER_PREFIX))
        .cloned()
        .collect();
    for name in own {
        out.remove(name);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-secret-hop".parse().unwrap());
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("host", "tollgate:8080".parse().unwrap());
        h.insert("x-api-key", "sk".parse().unwrap());
        h.insert("anthropic-version", "2023-06-01".parse().unwrap());
        h.insert("tollgate-tags", "a".parse().unwrap());
        let out = forwarded_request_headers(&h);
        let names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(out["x-api-key"], "sk");
        assert_eq!(out["anthropic-version"], "2023-06-01");
    }
}
