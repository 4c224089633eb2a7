//! Totals of what the mock emitted, so a test can compare the gateway's ledger
//! with what the "upstream" actually reported.
//!
//! Token sums count a response's final usage at the moment it leaves the mock:
//! the final `message_delta` of a stream, or the JSON body of a non-streaming
//! reply. A stream cut before its final `message_delta` adds no tokens.

use std::sync::atomic::{AtomicU64, Ordering};

use http::HeaderValue;
use serde::{Deserialize, Serialize};

/// The final usage of one response, as its last usage-bearing event reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct MockUsage {
    pub input: u64,
    pub output: u64,
    /// Cache writes, 5-minute and 1-hour together.
    pub cache_write: u64,
    pub cache_read: u64,
}

impl MockUsage {
    /// The `x-mock-usage` header value, e.g. `input=12,output=16,cache_write=0,cache_read=0`.
    pub fn header_value(&self) -> HeaderValue {
        let text = format!(
            "input={},output={},cache_write={},cache_read={}",
            self.input, self.output, self.cache_write, self.cache_read
        );
        // Digits, letters, '=' and ',' only: always a valid header value.
        HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
    }
}

/// A snapshot of the mock's totals since it started (`MockServer::stats`,
/// `GET /mock/stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MockStats {
    /// Every request received, whatever its outcome.
    pub requests: u64,
    /// `POST /v1/messages` answered 200 with an SSE stream.
    pub messages_streamed: u64,
    /// `POST /v1/messages` answered 200 with a JSON message.
    pub messages_json: u64,
    /// `POST /v1/messages/count_tokens` answered 200.
    pub count_tokens: u64,
    /// `GET /v1/models` answered 200.
    pub models: u64,
    /// Responses with a 4xx or 5xx status, injected or not.
    pub error_responses: u64,
    /// Requests on which an `x-mock-fault` took effect.
    pub faults_injected: u64,
    /// Message bodies (SSE or JSON) sent to their end.
    pub bodies_completed: u64,
    /// Message bodies ended early by `reset-after`, `error-after` or a stall
    /// that reached its limit.
    pub bodies_cut: u64,
    /// Message bodies dropped before their end because the client went away.
    pub bodies_abandoned: u64,
    /// Sum of the final `input_tokens` emitted.
    pub input_tokens: u64,
    /// Sum of the final `output_tokens` emitted.
    pub output_tokens: u64,
    /// Sum of the final `cache_creation_input_tokens` emitted.
    pub cache_write_tokens: u64,
    /// Sum of the final `cache_read_input_tokens` emitted.
    pub cache_read_tokens: u64,
}

/// The live counters behind [`MockStats`], shared by every connection.
#[derive(Debug, Default)]
pub(crate) struct StatsCounters {
    requests: AtomicU64,
    messages_streamed: AtomicU64,
    messages_json: AtomicU64,
    count_tokens: AtomicU64,
    models: AtomicU64,
    error_responses: AtomicU64,
    faults_injected: AtomicU64,
    bodies_completed: AtomicU64,
    bodies_cut: AtomicU64,
    bodies_abandoned: AtomicU64,
    input_tokens: AtomicU64,
    output_tokens: AtomicU64,
    cache_write_tokens: AtomicU64,
    cache_read_tokens: AtomicU64,
}

/// Which request counter a response adds to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Served {
    MessagesStreamed,
    MessagesJson,
    CountTokens,
    Models,
    Error,
    /// Mock control endpoints count only as requests.
    Control,
}

/// How a response body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyEnd {
    Completed,
    Cut,
    Abandoned,
}

impl StatsCounters {
    pub fn request_received(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub fn served(&self, kind: Served) {
        let counter = match kind {
            Served::MessagesStreamed => &self.messages_streamed,
            Served::MessagesJson => &self.messages_json,
            Served::CountTokens => &self.count_tokens,
            Served::Models => &self.models,
            Served::Error => &self.error_responses,
            Served::Control => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn fault_injected(&self) {
        self.faults_injected.fetch_add(1, Ordering::Relaxed);
    }

    pub fn body_ended(&self, end: BodyEnd) {
        let counter = match end {
            BodyEnd::Completed => &self.bodies_completed,
            BodyEnd::Cut => &self.bodies_cut,
            BodyEnd::Abandoned => &self.bodies_abandoned,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds a final usage at the moment it is emitted.
    pub fn usage_emitted(&self, usage: &MockUsage) {
        self.input_tokens.fetch_add(usage.input, Ordering::Relaxed);
        self.output_tokens
            .fetch_add(usage.output, Ordering::Relaxed);
        self.cache_write_tokens
            .fetch_add(usage.cache_write, Ordering::Relaxed);
        self.cache_read_tokens
            .fetch_add(usage.cache_read, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> MockStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MockStats {
            requests: get(&self.requests),
            messages_streamed: get(&self.messages_streamed),
            messages_json: get(&self.messages_json),
            count_tokens: get(&self.count_tokens),
            models: get(&self.models),
            error_responses: get(&self.error_responses),
            faults_injected: get(&self.faults_injected),
            bodies_completed: get(&self.bodies_completed),
            bodies_cut: get(&self.bodies_cut),
            bodies_abandoned: get(&self.bodies_abandoned),
            input_tokens: get(&self.input_tokens),
            output_tokens: get(&self.output_tokens),
            cache_write_tokens: get(&self.cache_write_tokens),
            cache_read_tokens: get(&self.cache_read_tokens),
        }
    }
}
