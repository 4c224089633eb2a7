//! The meter: reads the token usage out of a response while it is relayed.
//!
//! [`body::MeteredBody`] wraps the upstream response body and hands each data
//! frame, in place, to a [`Meter`]; the frame itself goes on to the client
//! unchanged. The meter picks its reader from the response headers: an
//! incremental SSE parser ([`sse::SseMeter`]) for `text/event-stream`, a JSON
//! reader ([`json::JsonMeter`]) for a non-streaming body. A `gzip` or `deflate`
//! body is decoded into a copy first ([`decode`]). The meter never touches the
//! database, never alters a byte, and a malformed event is counted, not fatal.
//!
//! The usage rule (`DESIGN.md`): `message_start.message.usage` sets the starting
//! counters; every `message_delta.usage` is cumulative and overwrites each
//! counter present and non-null. Counters are never summed.

pub mod body;
pub mod decode;
pub mod json;
pub mod sse;

use serde::{Deserialize, Serialize};

/// Token counters and billing dimensions of one response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// All cache-write tokens (5-minute and 1-hour together).
    pub cache_creation_input_tokens: u64,
    /// The 5-minute part of the cache writes, when the upstream split them.
    pub cache_creation_5m_tokens: Option<u64>,
    /// The 1-hour part of the cache writes, when the upstream split them.
    pub cache_creation_1h_tokens: Option<u64>,
    pub cache_read_input_tokens: u64,
    /// `server_tool_use.web_search_requests`.
    pub web_search_requests: u64,
    /// `standard`, `priority` or `batch`.
    pub service_tier: Option<String>,
    /// Where inference ran, e.g. `us` or `global`.
    pub inference_geo: Option<String>,
}

/// What the meter learned from one response body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeterReading {
    pub usage: Usage,
    pub message_id: Option<String>,
    pub model: Option<String>,
    pub stop_reason: Option<String>,
    /// `error.type` of an in-stream `error` event or an error body.
    pub error_type: Option<String>,
    /// A `message_start` (or a JSON body with `usage`) was read.
    pub saw_start: bool,
    /// The final usage was read: a `message_delta` carrying `usage` for a
    /// stream, the `usage` object for a JSON body.
    pub saw_final_usage: bool,
    /// A `message_stop` event was read.
    pub saw_stop: bool,
    /// An in-stream `error` event was read.
    pub saw_error_event: bool,
    /// Events whose JSON could not be read, or a body that could not be decoded.
    pub malformed: u32,
    /// Output tokens estimated from the text seen in `content_block_delta`
    /// events (about four bytes a token); used only when the stream was cut.
    pub estimated_output_tokens: u64,
}

impl MeterReading {
    /// Output tokens to record: the upstream's figure when final, else the
    /// larger of the last counter seen and the estimate from the text.
    pub fn output_tokens_for_record(&self) -> u64 {
        if self.saw_final_usage {
            self.usage.output_tokens
        } else {
            self.usage.output_tokens.max(self.estimated_output_tokens)
        }
    }
}

/// The reader chosen for a response, fed every data frame in order.
#[derive(Debug)]
pub enum Meter {
    /// `text/event-stream` responses.
    Sse(Box<decode::Decoded<sse::SseMeter>>),
    /// Non-streaming JSON responses.
    Json(Box<decode::Decoded<json::JsonMeter>>),
    /// Responses that carry no usage (count_tokens, models, files, ...).
    Off,
}

/// Something that consumes decoded response bytes.
pub trait Reader {
    /// Consumes the next bytes of the (decoded) body.
    fn feed(&mut self, bytes: &[u8]);
    /// The body ended; process anything still buffered.
    fn finish(&mut self);
    /// What has been read so far.
    fn reading(&self) -> &MeterReading;
    /// Mutable access, for flagging decode faults.
    fn reading_mut(&mut self) -> &mut MeterReading;
}

impl Meter {
    /// Chooses the reader from the response's `content-type` and
    /// `content-encoding`. `billable` is false for endpoints that carry no usage.
    pub fn for_response(billable: bool, content_type: &str, content_encoding: &str) -> Meter {
        if !billable {
            return Meter::Off;
        }
        let encoding = decode::Encoding::from_header(content_encoding);
        if content_type.starts_with("text/event-stream") {
            Meter::Sse(Box::new(decode::Decoded::new(
                encoding,
                sse::SseMeter::new(),
            )))
        } else {
            Meter::Json(Box::new(decode::Decoded::new(
                encoding,
                json::JsonMeter::new(),
            )))
        }
    }

    /// Feeds one data frame.
    pub fn feed(&mut self, bytes: &[u8]) {
        match self {
            Meter::Sse(m) => m.feed(bytes),
            Meter::Json(m) => m.feed(bytes),
            Meter::Off => {}
        }
    }

    /// The body ended (cleanly or not).
    pub fn finish(&mut self) {
        match self {
            Meter::Sse(m) => m.finish(),
            Meter::Json(m) => m.finish(),
            Meter::Off => {}
        }
    }

    /// What has been read; `None` for responses that are not metered.
    pub fn reading(&self) -> Option<&MeterReading> {
        match self {
            Meter::Sse(m) => Some(m.reading()),
            Meter::Json(m) => Some(m.reading()),
            Meter::Off => None,
        }
    }

    /// Whether this is an SSE stream.
    pub fn is_stream(&self) -> bool {
        matches!(self, Meter::Sse(_))
    }
}
