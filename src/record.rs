//! The usage record: one per client request that reached the upstream, finalised
//! exactly once, and the sinks that receive it.
//!
//! Field names are the `usage_events` column names of `DESIGN.md`, which finance
//! dashboards depend on.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::meter::Usage;

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The upstream answered and the response was relayed to its end.
    Completed,
    /// The upstream answered with an error status, broke the connection, or
    /// timed out.
    UpstreamError,
    /// The stream carried an in-stream `error` event.
    StreamError,
    /// The client went away before the response ended.
    ClientDisconnected,
    /// tollgate itself stopped the request (shutdown grace expired).
    Interrupted,
}

impl Outcome {
    /// The stored and labelled name.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::UpstreamError => "upstream_error",
            Outcome::StreamError => "stream_error",
            Outcome::ClientDisconnected => "client_disconnected",
            Outcome::Interrupted => "interrupted",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Outcome> {
        Some(match s {
            "completed" => Outcome::Completed,
            "upstream_error" => Outcome::UpstreamError,
            "stream_error" => Outcome::StreamError,
            "client_disconnected" => Outcome::ClientDisconnected,
            "interrupted" => Outcome::Interrupted,
            _ => return None,
        })
    }
}

/// Everything known about one request once it has ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// tollgate's request id (also the `tollgate-request-id` header).
    pub request_id: String,
    /// The upstream's `request-id` response header.
    pub upstream_request_id: Option<String>,
    /// The message id (`msg_…`) from the response.
    pub message_id: Option<String>,
    /// The key the request was made with: a key id or a passthrough fingerprint.
    pub key_id: String,
    /// The key's team, if known.
    pub team: Option<String>,
    /// The model the response names, else the model the request asked for.
    pub model: Option<String>,
    /// The request path without its query, e.g. `/v1/messages`.
    pub endpoint: String,
    /// Whether the response was an SSE stream.
    pub stream: bool,
    /// The HTTP status relayed to the client.
    pub status: u16,
    pub outcome: Outcome,
    /// The Anthropic error type, from an error body or an in-stream `error`.
    pub error_type: Option<String>,
    pub stop_reason: Option<String>,
    /// Token counters, overwritten (never summed) as the rule in `DESIGN.md` says.
    pub usage: Usage,
    /// True when the counters are the upstream's final figures.
    pub usage_exact: bool,
    /// Cost in nano-dollars, when the model has a price.
    pub cost_nanousd: Option<i64>,
    /// Hash of the price table the cost was computed with.
    pub price_version: Option<String>,
    /// The request's `metadata.user_id`.
    pub end_user: Option<String>,
    /// Free-form labels (from the `tollgate-tags` request header).
    pub tags: Option<String>,
    /// Upstream attempts made for this request (1 without retries).
    pub attempts: u32,
    /// Milliseconds spent waiting for admission before forwarding.
    pub queued_ms: u64,
    /// Milliseconds from request arrival to the first response byte sent.
    pub ttfb_ms: Option<u64>,
    pub duration_ms: u64,
    #[serde(serialize_with = "crate::timestamp::serialize")]
    pub started_at: DateTime<Utc>,
    #[serde(serialize_with = "crate::timestamp::serialize")]
    pub finished_at: DateTime<Utc>,
    /// Malformed SSE events seen by the meter (never fatal).
    pub meter_errors: u32,
    /// The request carried the `context-1m-2025-08-07` beta (long-context pricing).
    #[serde(default)]
    pub long_context_beta: bool,
}

/// Resolves once a sink holds a record safely enough to survive the process
/// being killed. `None`: nothing to wait for.
pub type RecordAck = Option<tokio::sync::oneshot::Receiver<()>>;

/// Where finalised records go. `record` is called exactly once per request,
/// possibly from a `Drop` on a runtime worker, so it must not wait on anything
/// slow: the ledger's sink takes a short lock and does one `write` to the page
/// cache (as nginx writes its access log), never an fsync or a network call.
pub trait UsageSink: Send + Sync + 'static {
    /// Takes ownership of one finalised record. The metered body holds the end
    /// of a response until the returned ack resolves (briefly), so a client
    /// never sees a request finish before its record is in the journal.
    fn record(&self, record: UsageRecord) -> RecordAck;

    /// Whether the sink can take more records. When false, the proxy refuses
    /// new requests (503) rather than forward traffic it could not account for.
    fn accepting(&self) -> bool {
        true
    }
}

/// A shared sink.
pub type SharedSink = Arc<dyn UsageSink>;

/// Logs a record as one structured line at `debug` (target `tollgate::usage`;
/// enable with `log.level = "info,tollgate::usage=debug"`). No secret is part of
/// a record.
pub fn log_record(r: &UsageRecord) {
    tracing::debug!(
        target: "tollgate::usage",
        request_id = %r.request_id,
        upstream_request_id = r.upstream_request_id.as_deref().unwrap_or(""),
        key_id = %r.key_id,
        model = r.model.as_deref().unwrap_or(""),
        endpoint = %r.endpoint,
        stream = r.stream,
        status = r.status,
        outcome = r.outcome.as_str(),
        error_type = r.error_type.as_deref().unwrap_or(""),
        stop_reason = r.stop_reason.as_deref().unwrap_or(""),
        input_tokens = r.usage.input_tokens,
        output_tokens = r.usage.output_tokens,
        cache_creation_input_tokens = r.usage.cache_creation_input_tokens,
        cache_read_input_tokens = r.usage.cache_read_input_tokens,
        usage_exact = r.usage_exact,
        attempts = r.attempts,
        duration_ms = r.duration_ms,
        "request finished"
    );
}
