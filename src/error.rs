//! The one error taxonomy of the request path, and the only place that turns an
//! error into a status code and an Anthropic-shaped body.
//!
//! Errors are tagged by who failed: the client (bad request, too large, no such
//! route), authentication, admission (rate limit, budget), the upstream, or
//! tollgate itself. [`GatewayError::to_response`] renders
//! `{"type":"error","error":{"type":…,"message":…},"request_id":…}`;
//! [`GatewayError::label`] gives a low-cardinality metric label.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

/// Header carrying tollgate's own request id on every response.
pub const REQUEST_ID_HEADER: &str = "tollgate-request-id";

/// Why tollgate answered a request itself instead of relaying the upstream.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{method} {path} is not a route tollgate serves")]
    NotFound { method: String, path: String },
    #[error("request body exceeds the {limit}-byte limit")]
    BodyTooLarge { limit: u64 },
    #[error("could not read the request body: {0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("rate limit exceeded: {message}; retry in {retry_after:?}")]
    RateLimited {
        message: String,
        retry_after: Duration,
        /// The key's `tollgate-ratelimit-*` state.
        headers: Vec<(&'static str, String)>,
    },
    #[error("budget exhausted: {0}")]
    BudgetExhausted(String),
    #[error("upstream connection failed: {0}")]
    UpstreamConnect(String),
    #[error("upstream did not answer within {0:?}")]
    UpstreamTimeout(Duration),
    #[error("upstream failed: {0}")]
    UpstreamProtocol(String),
    #[error("tollgate cannot take requests now: {0}")]
    Overloaded(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl GatewayError {
    /// The HTTP status tollgate answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::NotFound { .. } => StatusCode::NOT_FOUND,
            GatewayError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::BadRequest(_) => StatusCode::BAD_REQUEST,
            GatewayError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            GatewayError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::BudgetExhausted(_) => StatusCode::PAYMENT_REQUIRED,
            GatewayError::UpstreamConnect(_) | GatewayError::UpstreamProtocol(_) => {
                StatusCode::BAD_GATEWAY
            }
            GatewayError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The Anthropic `error.type` for this error.
    pub fn error_type(&self) -> &'static str {
        match self {
            GatewayError::NotFound { .. } => "not_found_error",
            GatewayError::BodyTooLarge { .. } => "request_too_large",
            GatewayError::BadRequest(_) => "invalid_request_error",
            GatewayError::Unauthenticated(_) => "authentication_error",
            GatewayError::RateLimited { .. } => "rate_limit_error",
            GatewayError::BudgetExhausted(_) => "billing_error",
            GatewayError::UpstreamTimeout(_) => "timeout_error",
            GatewayError::UpstreamConnect(_) | GatewayError::UpstreamProtocol(_) => "api_error",
            GatewayError::Overloaded(_) => "overloaded_error",
            GatewayError::Internal(_) => "api_error",
        }
    }

    /// A low-cardinality label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            GatewayError::NotFound { .. } => "not_found",
            GatewayError::BodyTooLarge { .. } => "too_large",
            GatewayError::BadRequest(_) => "bad_request",
            GatewayError::Unauthenticated(_) => "unauthenticated",
            GatewayError::RateLimited { .. } => "rate_limited",
            GatewayError::BudgetExhausted(_) => "over_budget",
            GatewayError::UpstreamConnect(_) => "upstream_connect",
            GatewayError::UpstreamTimeout(_) => "upstream_timeout",
            GatewayError::UpstreamProtocol(_) => "upstream_protocol",
            GatewayError::Overloaded(_) => "overloaded",
            GatewayError::Internal(_) => "internal",
        }
    }

    /// Renders the error as the response tollgate sends.
    pub fn to_response(&self, request_id: &str) -> Response<Full<Bytes>> {
        let body = error_body(self.error_type(), &self.to_string(), request_id);
        let mut response = Response::new(Full::new(body));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Ok(v) = HeaderValue::from_str(request_id) {
            headers.insert(REQUEST_ID_HEADER, v.clone());
            headers.insert("request-id", v);
        }
        headers.insert(
            "x-should-retry",
            HeaderValue::from_static(self.should_retry()),
        );
        if let GatewayError::RateLimited {
            retry_after,
            headers: state,
            ..
        } = self
        {
            let millis = u64::try_from(retry_after.as_millis())
                .unwrap_or(u64::MAX)
                .max(1);
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(millis.div_ceil(1000)),
            );
            headers.insert("retry-after-ms", HeaderValue::from(millis));
            for (name, value) in state {
                if let Ok(v) = HeaderValue::from_str(value) {
                    headers.insert(*name, v);
                }
            }
        }
        response
    }

    /// Tells the official SDKs whether to retry (they honour `x-should-retry`).
    fn should_retry(&self) -> &'static str {
        match self {
            GatewayError::RateLimited { .. }
            | GatewayError::UpstreamConnect(_)
            | GatewayError::UpstreamTimeout(_)
            | GatewayError::UpstreamProtocol(_)
            | GatewayError::Overloaded(_)
            | GatewayError::Internal(_) => "true",
            _ => "false",
        }
    }
}

/// The JSON body of an Anthropic-shaped error.
pub fn error_body(error_type: &str, message: &str, request_id: &str) -> Bytes {
    let body = serde_json::json!({
        "type": "error",
        "error": { "type": error_type, "message": message },
        "request_id": request_id,
    });
    Bytes::from(body.to_string())
}

/// The SSE event that ends a stream the upstream broke, so SDK clients raise a
/// clean `APIError` instead of waiting for more.
pub fn sse_error_event(error_type: &str, message: &str) -> Bytes {
    let data = serde_json::json!({
        "type": "error",
        "error": { "type": error_type, "message": message },
    });
    Bytes::from(format!("event: error\ndata: {data}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_headers_are_rounded_up() {
        let e = GatewayError::RateLimited {
            message: "rpm".into(),
            retry_after: Duration::from_millis(1200),
            headers: vec![("tollgate-ratelimit-requests-limit", "60".into())],
        };
        let r = e.to_response("req_1");
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "2");
        assert_eq!(r.headers()["retry-after-ms"], "1200");
        assert_eq!(r.headers()[REQUEST_ID_HEADER], "req_1");
        assert_eq!(r.headers()["tollgate-ratelimit-requests-limit"], "60");
    }

    #[test]
    fn body_has_anthropic_shape() {
        let body = error_body("not_found_error", "nope", "req_2");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "not_found_error");
        assert_eq!(v["error"]["message"], "nope");
        assert_eq!(v["request_id"], "req_2");
    }
}
