//! A lenient look at the request body: the few fields the gateway needs.
//!
//! The body is forwarded as it came whatever this finds; a body that is not JSON,
//! or has fields of unexpected types, simply yields `None`s and the upstream
//! answers it.

use serde::Deserialize;
use serde_json::Value;

/// The fields of a Messages request that tollgate uses.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RequestInfo {
    pub model: Option<String>,
    pub stream: bool,
    pub max_tokens: Option<u64>,
    /// `metadata.user_id`.
    pub end_user: Option<String>,
}

/// Only these keys are materialised; everything else (messages, tools, …) is
/// skipped by serde without building values.
#[derive(Deserialize)]
struct Peek {
    model: Option<Value>,
    stream: Option<Value>,
    max_tokens: Option<Value>,
    metadata: Option<Value>,
}

impl RequestInfo {
    /// Reads what it can; never fails.
    pub fn from_body(body: &[u8]) -> RequestInfo {
        let Ok(peek) = serde_json::from_slice::<Peek>(body) else {
            return RequestInfo::default();
        };
        RequestInfo {
            model: peek
                .model
                .as_ref()
                .and_then(Value::as_str)
                .map(str::to_owned),
            stream: peek
                .stream
                .as_ref()
                .and_then(Value::as_bool)
                .unwrap_or(false),
            max_tokens: peek.max_tokens.as_ref().and_then(Value::as_u64),
            end_user: peek
                .metadata
                .as_ref()
                .and_then(|m| m.get("user_id"))
                .and_then(Value::as_str)
                .map(str::to_owned),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_fields() {
        let info = RequestInfo::from_body(
            br#"{"model":"claude-sonnet-4-5","max_tokens":100,"stream":true,
                "messages":[{"role":"user","content":"hi"}],"metadata":{"user_id":"u-1"}}"#,
        );
        assert_eq!(info.model.as_deref(), Some("claude-sonnet-4-5"));
        assert!(info.stream);
        assert_eq!(info.max_tokens, Some(100));
        assert_eq!(info.end_user.as_deref(), Some("u-1"));
    }

    #[test]
    fn is_lenient() {
        assert_eq!(RequestInfo::from_body(b"not json"), RequestInfo::default());
        assert_eq!(RequestInfo::from_body(b""), RequestInfo::default());
        let info = RequestInfo::from_body(br#"{"model":7,"stream":"yes","max_tokens":-1}"#);
        assert_eq!(info, RequestInfo::default());
    }
}
