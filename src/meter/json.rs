//! The JSON reader for non-streaming responses, and the `usage` object that
//! both readers apply.
//!
//! A non-streaming Messages response carries its usage in one JSON body. The
//! body can only be parsed whole, so [`JsonMeter`] keeps a copy of it (up to
//! [`MAX_BODY_BYTES`]) and parses it when the body ends. The forwarded frames
//! are never held back: the copy is the meter's alone.

use serde::Deserialize;

use super::{MeterReading, Reader, Usage};

/// The largest body the JSON reader copies. Messages responses are far
/// smaller; past this the copy is dropped (so a huge body cannot grow the
/// gateway's memory) and the reading is flagged malformed.
pub const MAX_BODY_BYTES: usize = 64 << 20;

/// A `usage` object as the Messages API sends it: in `message_start`, in
/// every `message_delta`, and in a non-streaming body.
///
/// Every field is optional because a `message_delta` may carry any subset of
/// the counters, and a null means "unchanged", exactly like an absent field.
#[derive(Debug, Default, Deserialize)]
pub(super) struct UsageJson {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation: Option<CacheCreationJson>,
    server_tool_use: Option<ServerToolUseJson>,
    service_tier: Option<String>,
    inference_geo: Option<String>,
}

/// `usage.cache_creation`: the cache writes split by lifetime.
#[derive(Debug, Default, Deserialize)]
struct CacheCreationJson {
    ephemeral_5m_input_tokens: Option<u64>,
    ephemeral_1h_input_tokens: Option<u64>,
}

/// `usage.server_tool_use`: server-side tool calls billed per request.
#[derive(Debug, Default, Deserialize)]
struct ServerToolUseJson {
    web_search_requests: Option<u64>,
}

/// The `error` object of an error body or an in-stream `error` event.
#[derive(Debug, Default, Deserialize)]
pub(super) struct ErrorJson {
    /// `overloaded_error`, `api_error`, ...
    #[serde(rename = "type")]
    pub(super) kind: Option<String>,
}

impl UsageJson {
    /// Writes every counter that is present and non-null onto `usage`, and
    /// leaves the others as they were.
    ///
    /// This is the whole usage rule in one place, shared by the SSE and JSON
    /// readers: the API's counters are cumulative, so a later object replaces
    /// an earlier one field by field and nothing is ever summed.
    pub(super) fn apply_to(self, usage: &mut Usage) {
        overwrite(&mut usage.input_tokens, self.input_tokens);
        overwrite(&mut usage.output_tokens, self.output_tokens);
        overwrite(
            &mut usage.cache_creation_input_tokens,
            self.cache_creation_input_tokens,
        );
        overwrite(
            &mut usage.cache_read_input_tokens,
            self.cache_read_input_tokens,
        );
        if let Some(split) = self.cache_creation {
            overwrite(
                &mut usage.cache_creation_5m_tokens,
                split.ephemeral_5m_input_tokens.map(Some),
            );
            overwrite(
                &mut usage.cache_creation_1h_tokens,
                split.ephemeral_1h_input_tokens.map(Some),
            );
        }
        if let Some(tools) = self.server_tool_use {
            overwrite(&mut usage.web_search_requests, tools.web_search_requests);
        }
        overwrite(&mut usage.service_tier, self.service_tier.map(Some));
        overwrite(&mut usage.inference_geo, self.inference_geo.map(Some));
    }
}

/// Replaces `slot` when the upstream sent a value.
fn overwrite<T>(slot: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *slot = value;
    }
}

/// The fields of a non-streaming body that the meter reads; the rest
/// (`content` above all) is skipped by the parser.
#[derive(Debug, Deserialize)]
struct BodyJson {
    #[serde(rename = "type")]
    kind: Option<String>,
    id: Option<String>,
    model: Option<String>,
    stop_reason: Option<String>,
    usage: Option<UsageJson>,
    error: Option<ErrorJson>,
}

/// Reads the usage of a non-streaming JSON response.
///
/// Fed the decoded body frame by frame, it keeps a copy and parses it at
/// [`Reader::finish`]. A message body sets `saw_start` and `saw_final_usage`;
/// an error body (`{"type":"error","error":{"type":...}}`) sets `error_type`.
/// A body that is not JSON, or larger than [`MAX_BODY_BYTES`], counts one
/// `malformed`. An empty body (a bodiless error, say) is simply nothing to read.
#[derive(Debug, Default)]
pub struct JsonMeter {
    reading: MeterReading,
    body: Vec<u8>,
    /// The body outgrew [`MAX_BODY_BYTES`]; the copy was dropped.
    too_large: bool,
    /// `finish` ran; later calls and bytes are ignored.
    finished: bool,
}

impl JsonMeter {
    /// A reader with nothing read yet.
    pub fn new() -> JsonMeter {
        JsonMeter::default()
    }

    /// Applies a parsed body to the reading.
    fn apply(&mut self, body: BodyJson) {
        let reading = &mut self.reading;
        if let Some(error) = body.error {
            reading.error_type = error.kind;
        }
        let is_message = body.kind.as_deref() == Some("message") || body.usage.is_some();
        if !is_message {
            return;
        }
        reading.message_id = body.id;
        reading.model = body.model;
        reading.stop_reason = body.stop_reason;
        if let Some(usage) = body.usage {
            usage.apply_to(&mut reading.usage);
            reading.saw_start = true;
            reading.saw_final_usage = true;
        }
    }
}

impl Reader for JsonMeter {
    fn feed(&mut self, bytes: &[u8]) {
        if self.finished || self.too_large {
            return;
        }
        if self.body.len() + bytes.len() > MAX_BODY_BYTES {
            self.too_large = true;
            self.body = Vec::new();
            self.reading.malformed += 1;
            return;
        }
        self.body.extend_from_slice(bytes);
    }

    fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        let body = std::mem::take(&mut self.body);
        if self.too_large || body.is_empty() {
            return;
        }
        match serde_json::from_slice::<BodyJson>(&body) {
            Ok(parsed) => self.apply(parsed),
            Err(_) => self.reading.malformed += 1,
        }
    }

    fn reading(&self) -> &MeterReading {
        &self.reading
    }

    fn reading_mut(&mut self) -> &mut MeterReading {
        &mut self.reading
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(body: &[u8]) -> MeterReading {
        let mut meter = JsonMeter::new();
        meter.feed(body);
        meter.finish();
        meter.reading().clone()
    }

    #[test]
    fn usage_overwrites_present_fields_and_keeps_absent_and_null_ones() {
        let mut usage = Usage {
            input_tokens: 100,
            output_tokens: 1,
            cache_read_input_tokens: 40,
            service_tier: Some("standard".into()),
            ..Usage::default()
        };
        let delta: UsageJson = serde_json::from_str(
            r#"{"input_tokens":250,"output_tokens":80,"cache_read_input_tokens":null,
                "service_tier":null,"cache_creation":{"ephemeral_1h_input_tokens":7}}"#,
        )
        .unwrap();
        delta.apply_to(&mut usage);
        assert_eq!(usage.input_tokens, 250);
        assert_eq!(usage.output_tokens, 80);
        assert_eq!(usage.cache_read_input_tokens, 40);
        assert_eq!(usage.service_tier.as_deref(), Some("standard"));
        assert_eq!(usage.cache_creation_1h_tokens, Some(7));
        assert_eq!(usage.cache_creation_5m_tokens, None);
    }

    #[test]
    fn message_body_sets_final_usage() {
        let reading = read(
            br#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-x",
                "content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn",
                "usage":{"input_tokens":12,"output_tokens":3,"cache_read_input_tokens":5}}"#,
        );
        assert_eq!(reading.message_id.as_deref(), Some("msg_1"));
        assert_eq!(reading.model.as_deref(), Some("claude-x"));
        assert_eq!(reading.stop_reason.as_deref(), Some("end_turn"));
        assert_eq!(reading.usage.input_tokens, 12);
        assert_eq!(reading.usage.output_tokens, 3);
        assert_eq!(reading.usage.cache_read_input_tokens, 5);
        assert!(reading.saw_start && reading.saw_final_usage);
        assert_eq!(reading.malformed, 0);
    }

    #[test]
    fn body_split_across_frames_is_read_whole() {
        let body =
            br#"{"type":"message","id":"msg_2","usage":{"input_tokens":9,"output_tokens":4}}"#;
        let mut meter = JsonMeter::new();
        for chunk in body.chunks(3) {
            meter.feed(chunk);
        }
        meter.finish();
        assert_eq!(meter.reading().usage.output_tokens, 4);
        assert_eq!(meter.reading().message_id.as_deref(), Some("msg_2"));
    }

    #[test]
    fn body_without_usage_is_not_a_message() {
        let reading = read(br#"{"type":"message_batch","id":"msgbatch_1"}"#);
        assert_eq!(reading.message_id, None);
        assert!(!reading.saw_final_usage);
        assert_eq!(reading.malformed, 0);
    }

    #[test]
    fn empty_body_reads_nothing_and_is_not_malformed() {
        assert_eq!(read(b""), MeterReading::default());
    }

    #[test]
    fn finish_twice_parses_once() {
        let mut meter = JsonMeter::new();
        meter.feed(b"not json");
        meter.finish();
        meter.finish();
        assert_eq!(meter.reading().malformed, 1);
    }

    #[test]
    fn oversized_body_is_dropped_and_flagged_once() {
        let mut meter = JsonMeter::new();
        let chunk = vec![b' '; 1 << 20];
        for _ in 0..(MAX_BODY_BYTES >> 20) + 2 {
            meter.feed(&chunk);
        }
        assert!(meter.body.capacity() == 0);
        meter.finish();
        assert_eq!(meter.reading().malformed, 1);
        assert!(!meter.reading().saw_final_usage);
    }
}
