//! Recorded streams replayed byte for byte (`--fixtures DIR`, header
//! `x-mock-fixture: NAME`).
//!
//! Each `NAME.sse` file is read once at start and split into events at blank
//! lines (LF or CRLF); the pieces, concatenated, are exactly the file. The file
//! is also read once as the meter would read it, to know its final usage (for
//! the `x-mock-usage` header and the stats) and to build the JSON message a
//! non-streaming request gets instead.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use serde_json::{Map, Value};

use super::stats::MockUsage;

/// One recorded stream.
#[derive(Debug)]
pub(crate) struct Fixture {
    /// The file's events, in order; their concatenation is the file.
    pub events: Vec<Bytes>,
    /// The index of the last event that carries usage, and the usage the
    /// stream has reported once that event is out. `None` when no event
    /// carries usage.
    pub final_usage: Option<(usize, MockUsage)>,
    /// The message the stream spells out, as a non-streaming response body.
    pub json_message: Bytes,
}

/// Loads every `*.sse` file of `dir`, keyed by file name without extension.
pub(crate) fn load_dir(dir: &Path) -> anyhow::Result<HashMap<String, Arc<Fixture>>> {
    let mut fixtures = HashMap::new();
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("reading fixtures in {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_none_or(|ext| ext != "sse") {
            continue;
        }
        let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        fixtures.insert(
            name.to_owned(),
            Arc::new(Fixture::from_bytes(Bytes::from(bytes))),
        );
    }
    Ok(fixtures)
}

impl Fixture {
    /// Splits and reads a recorded stream.
    pub fn from_bytes(bytes: Bytes) -> Fixture {
        let events = split_events(&bytes);
        let mut message = MessageBuilder::default();
        for (index, event) in events.iter().enumerate() {
            if let Some(data) = event_data(event) {
                message.apply(index, &data);
            }
        }
        let final_usage = message.usage_index.map(|index| (index, message.usage()));
        Fixture {
            events,
            final_usage,
            json_message: message.finish(),
        }
    }
}

/// Splits a stream after each blank line. A blank line with nothing before it
/// stays with the next event, so no piece is empty and nothing is lost.
fn split_events(bytes: &Bytes) -> Vec<Bytes> {
    let mut events = Vec::new();
    let mut start = 0;
    let mut line_start = 0;
    for newline in memchr::memchr_iter(b'\n', bytes) {
        let line = &bytes[line_start..newline];
        let event_had_content = line_start > start;
        line_start = newline + 1;
        if (line.is_empty() || line == b"\r") && event_had_content {
            events.push(bytes.slice(start..line_start));
            start = line_start;
        }
    }
    if start < bytes.len() {
        events.push(bytes.slice(start..));
    }
    events
}

/// The JSON of an event's `data:` lines, if any and if valid.
fn event_data(event: &[u8]) -> Option<Value> {
    let text = std::str::from_utf8(event).ok()?;
    let mut data = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(rest.strip_prefix(' ').unwrap_or(rest));
        }
    }
    serde_json::from_str(&data).ok()
}

/// Rebuilds the message a stream describes, applying the usage rule: the
/// `message_start` usage, then every counter present in a `message_delta`
/// overwrites the previous one.
#[derive(Debug, Default)]
struct MessageBuilder {
    message: Map<String, Value>,
    blocks: Vec<Value>,
    /// Tool input JSON being spelled out, per block index.
    partial_json: HashMap<usize, String>,
    usage: Map<String, Value>,
    usage_index: Option<usize>,
}

impl MessageBuilder {
    fn apply(&mut self, event_index: usize, data: &Value) {
        let index = data["index"].as_u64().and_then(|i| usize::try_from(i).ok());
        match data["type"].as_str() {
            Some("message_start") => {
                if let Some(message) = data["message"].as_object() {
                    self.message = message.clone();
                }
                if let Some(usage) = data["message"]["usage"].as_object() {
                    self.usage = usage.clone();
                    self.usage_index = Some(event_index);
                }
            }
            Some("content_block_start") => {
                if let Some(i) = index {
                    if self.blocks.len() <= i {
                        self.blocks.resize(i + 1, Value::Null);
                    }
                    self.blocks[i] = data["content_block"].clone();
                }
            }
            Some("content_block_delta") => {
                if let Some(i) = index {
                    self.apply_delta(i, &data["delta"]);
                }
            }
            Some("content_block_stop") => {
                if let Some(i) = index {
                    self.finish_tool_input(i);
                }
            }
            Some("message_delta") => {
                if let Some(delta) = data["delta"].as_object() {
                    for (key, value) in delta {
                        self.message.insert(key.clone(), value.clone());
                    }
                }
                if let Some(usage) = data["usage"].as_object() {
                    for (key, value) in usage.iter().filter(|(_, v)| !v.is_null()) {
                        self.usage.insert(key.clone(), value.clone());
                    }
                    self.usage_index = Some(event_index);
                }
            }
            _ => {}
        }
    }

    /// Text-like deltas append to the block's field of the same name; other
    /// fields replace it. Tool input is collected and parsed at the block's end.
    fn apply_delta(&mut self, index: usize, delta: &Value) {
        if let Some(partial) = delta["partial_json"].as_str() {
            self.partial_json
                .entry(index)
                .or_default()
                .push_str(partial);
            return;
        }
        let Some(block) = self.blocks.get_mut(index).and_then(Value::as_object_mut) else {
            return;
        };
        let Some(fields) = delta.as_object() else {
            return;
        };
        if let Some(citation) = fields.get("citation") {
            let citations = block
                .entry("citations")
                .or_insert_with(|| Value::Array(Vec::new()));
            if let Some(list) = citations.as_array_mut() {
                list.push(citation.clone());
            }
            return;
        }
        for (key, value) in fields.iter().filter(|(k, _)| *k != "type") {
            match (block.get_mut(key), value) {
                (Some(Value::String(existing)), Value::String(more)) => existing.push_str(more),
                _ => {
                    block.insert(key.clone(), value.clone());
                }
            }
        }
    }

    /// Parses a tool block's collected input. A stream cut mid-arguments
    /// leaves invalid JSON; the block then keeps its `input: {}`.
    fn finish_tool_input(&mut self, index: usize) {
        let Some(partial) = self.partial_json.remove(&index) else {
            return;
        };
        if let (Ok(input), Some(block)) = (
            serde_json::from_str::<Value>(&partial),
            self.blocks.get_mut(index).and_then(Value::as_object_mut),
        ) {
            block.insert("input".into(), input);
        }
    }

    fn usage(&self) -> MockUsage {
        let get = |key: &str| self.usage.get(key).and_then(Value::as_u64).unwrap_or(0);
        MockUsage {
            input: get("input_tokens"),
            output: get("output_tokens"),
            cache_write: get("cache_creation_input_tokens"),
            cache_read: get("cache_read_input_tokens"),
        }
    }

    fn finish(mut self) -> Bytes {
        let open: Vec<usize> = self.partial_json.keys().copied().collect();
        for index in open {
            self.finish_tool_input(index);
        }
        let mut message = self.message;
        let blocks = self.blocks.into_iter().filter(|b| !b.is_null()).collect();
        message.insert("content".into(), Value::Array(blocks));
        message.insert("usage".into(), Value::Object(self.usage));
        Bytes::from(Value::Object(message).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_every_byte() {
        for text in [
            "event: a\ndata: 1\n\nevent: b\ndata: 2\n\n",
            "event: a\r\ndata: 1\r\n\r\nevent: b\r\ndata: 2",
            "\n\nevent: a\ndata: 1\n\n\n",
            "",
        ] {
            let bytes = Bytes::from(text);
            let events = split_events(&bytes);
            assert_eq!(events.concat(), text.as_bytes());
            assert!(events.iter().all(|e| !e.is_empty()));
        }
        assert_eq!(
            split_events(&Bytes::from("event: a\n\nevent: b\n\n")).len(),
            2
        );
        assert_eq!(split_events(&Bytes::from("a\r\n\r\nb")).len(), 2);
    }

    #[test]
    fn reads_usage_and_message_of_a_tool_stream() {
        let stream = concat!(
            "event: message_start\n",
            "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"m\",",
            "\"content\":[],\"usage\":{\"input_tokens\":7,\"cache_read_input_tokens\":2,\"output_tokens\":1}}}\n\n",
            "event: content_block_start\n",
            "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"tool_use\",\"input\":{}}}\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"a\\\":\"}}\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"1}\"}}\n\n",
            "event: message_delta\n",
            "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":9,\"input_tokens\":null}}\n\n",
            "event: message_stop\n",
            "data: {\"type\":\"message_stop\"}\n\n",
        );
        let fixture = Fixture::from_bytes(Bytes::from(stream));
        let usage = MockUsage {
            input: 7,
            output: 9,
            cache_write: 0,
            cache_read: 2,
        };
        assert_eq!(fixture.final_usage, Some((4, usage)));
        let message: Value = serde_json::from_slice(&fixture.json_message).unwrap();
        assert_eq!(message["content"][0]["input"]["a"], 1);
        assert_eq!(message["stop_reason"], "tool_use");
        assert_eq!(message["usage"]["output_tokens"], 9);
        assert_eq!(message["usage"]["input_tokens"], 7);
    }
}
