//! Synthesised responses: a realistic Messages API event sequence, or the
//! equivalent JSON message, computed from a [`SynthPlan`].
//!
//! A stream is `message_start` → `content_block_start` → `ping` → one
//! `content_block_delta` per output token → `content_block_stop` →
//! `message_delta` (stop reason and cumulative final usage) → `message_stop`.
//! Everything but `message_start`, a tool block's `content_block_start` and
//! `message_delta` is rendered once per server ([`Templates`]); a delta costs a
//! reference-count increment, not an allocation.

use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use serde_json::{Value, json};

use super::stats::MockUsage;

/// Sixteen words of three letters and a space. Four bytes each, so a reader
/// that estimates one token per four bytes of text (as the meter does for a
/// cut stream) estimates exactly one token per delta.
const WORDS: [&str; 16] = [
    "the ", "cat ", "sat ", "and ", "ran ", "far ", "yet ", "one ", "day ", "sun ", "was ", "low ",
    "old ", "red ", "fox ", "hid ",
];

/// Opens and closes the JSON object a tool block's `input_json_delta`s spell out.
const TOOL_INPUT_OPEN: &str = "{\"text\": \"";
const TOOL_INPUT_CLOSE: &str = "\"}";

// The wire shapes, as plain structs so fields keep the real API's order
// (`type` first) without a JSON map per event.

#[derive(Serialize)]
struct TypeOnly {
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct MessageStartEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    message: Message<'a>,
}

#[derive(Serialize)]
struct Message<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: Vec<Block<'a>>,
    stop_reason: Option<&'a str>,
    stop_sequence: Option<&'a str>,
    usage: Usage,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block<'a> {
    Text {
        text: &'a str,
    },
    ToolUse {
        id: &'a str,
        name: &'a str,
        input: Value,
    },
}

#[derive(Serialize)]
struct Usage {
    input_tokens: u64,
    cache_creation_input_tokens: u64,
    cache_read_input_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_creation: Option<CacheCreation>,
    output_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    service_tier: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    server_tool_use: Option<ServerToolUse>,
}

#[derive(Serialize)]
struct CacheCreation {
    ephemeral_5m_input_tokens: u64,
    ephemeral_1h_input_tokens: u64,
}

#[derive(Serialize)]
struct ServerToolUse {
    web_search_requests: u64,
}

#[derive(Serialize)]
struct BlockStartEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    index: usize,
    content_block: Block<'a>,
}

#[derive(Serialize)]
struct BlockDeltaEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    index: usize,
    delta: Delta<'a>,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Delta<'a> {
    TextDelta { text: &'a str },
    InputJsonDelta { partial_json: &'a str },
}

#[derive(Serialize)]
struct BlockStopEvent {
    #[serde(rename = "type")]
    kind: &'static str,
    index: usize,
}

#[derive(Serialize)]
struct MessageDeltaEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    delta: StopDelta<'a>,
    usage: Usage,
}

#[derive(Serialize)]
struct StopDelta<'a> {
    stop_reason: &'a str,
    stop_sequence: Option<&'a str>,
}

/// Renders one SSE event: `event:` line, one `data:` line, blank line.
fn sse_event<T: Serialize>(name: &str, data: &T) -> Bytes {
    let mut buf = Vec::with_capacity(256);
    buf.extend_from_slice(b"event: ");
    buf.extend_from_slice(name.as_bytes());
    buf.extend_from_slice(b"\ndata: ");
    // Structs of strings and numbers always serialize.
    let _ = serde_json::to_writer(&mut buf, data);
    buf.extend_from_slice(b"\n\n");
    Bytes::from(buf)
}

/// The events that never change, rendered once per server.
#[derive(Debug)]
pub(crate) struct Templates {
    text_block_start: Bytes,
    text_deltas: Vec<Bytes>,
    tool_first: Bytes,
    tool_middle: Vec<Bytes>,
    tool_last: Vec<Bytes>,
    tool_only: Bytes,
    block_stop: Bytes,
    ping: Bytes,
    message_stop: Bytes,
    /// The in-stream error `error-after` sends.
    pub overloaded_error: Bytes,
}

impl Templates {
    pub fn new() -> Templates {
        let delta = |delta: Delta<'_>| {
            let event = BlockDeltaEvent {
                kind: "content_block_delta",
                index: 0,
                delta,
            };
            sse_event("content_block_delta", &event)
        };
        let text = |text| delta(Delta::TextDelta { text });
        let json = |partial_json: &str| delta(Delta::InputJsonDelta { partial_json });
        let text_start = BlockStartEvent {
            kind: "content_block_start",
            index: 0,
            content_block: Block::Text { text: "" },
        };
        Templates {
            text_block_start: sse_event("content_block_start", &text_start),
            text_deltas: WORDS.iter().map(|w| text(w)).collect(),
            tool_first: json(&format!("{TOOL_INPUT_OPEN}{}", WORDS[0])),
            tool_middle: WORDS.iter().map(|w| json(w)).collect(),
            tool_last: WORDS
                .iter()
                .map(|w| json(&format!("{w}{TOOL_INPUT_CLOSE}")))
                .collect(),
            tool_only: json(&format!("{TOOL_INPUT_OPEN}{}{TOOL_INPUT_CLOSE}", WORDS[0])),
            block_stop: sse_event(
                "content_block_stop",
                &BlockStopEvent {
                    kind: "content_block_stop",
                    index: 0,
                },
            ),
            ping: sse_event("ping", &TypeOnly { kind: "ping" }),
            message_stop: sse_event(
                "message_stop",
                &TypeOnly {
                    kind: "message_stop",
                },
            ),
            overloaded_error: crate::error::sse_error_event("overloaded_error", "Overloaded"),
        }
    }
}

/// Cache counters a request asked for with `x-mock-cache`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CacheSpec {
    /// 5-minute cache writes (`write=`).
    pub write_5m: u64,
    /// 1-hour cache writes (`write_1h=`).
    pub write_1h: u64,
    /// Cache reads (`read=`).
    pub read: u64,
}

impl CacheSpec {
    fn write_total(&self) -> u64 {
        self.write_5m.saturating_add(self.write_1h)
    }
}

/// Everything that decides one synthesised response.
#[derive(Debug, Clone)]
pub(crate) struct SynthPlan {
    /// The unique part of the ids (`msg_mock_…`, `toolu_mock_…`).
    pub unique: String,
    /// Echoed from the request.
    pub model: String,
    pub input_tokens: u64,
    /// The final output tokens, already capped by `max_tokens`; one delta each.
    pub output_tokens: usize,
    pub stop_reason: &'static str,
    pub cache: CacheSpec,
    /// Added to `input_tokens` in the final usage, as server tools do.
    pub input_growth: u64,
    /// `server_tool_use.web_search_requests` in the final usage, when non-zero.
    pub web_searches: u64,
    /// The tool to call, when the request had `tools`.
    pub tool: Option<String>,
}

impl SynthPlan {
    /// The usage the response ends with.
    pub fn final_usage(&self) -> MockUsage {
        MockUsage {
            input: self.input_tokens.saturating_add(self.input_growth),
            output: self.output_tokens as u64,
            cache_write: self.cache.write_total(),
            cache_read: self.cache.read,
        }
    }

    fn cache_creation(&self) -> Option<CacheCreation> {
        Some(CacheCreation {
            ephemeral_5m_input_tokens: self.cache.write_5m,
            ephemeral_1h_input_tokens: self.cache.write_1h,
        })
    }

    fn server_tool_use(&self) -> Option<ServerToolUse> {
        (self.web_searches > 0).then_some(ServerToolUse {
            web_search_requests: self.web_searches,
        })
    }

    /// The final usage as the non-streaming body reports it (`full`) or as the
    /// final `message_delta` does: cumulative, without the cache split.
    fn usage(&self, full: bool) -> Usage {
        let usage = self.final_usage();
        Usage {
            input_tokens: usage.input,
            cache_creation_input_tokens: usage.cache_write,
            cache_read_input_tokens: usage.cache_read,
            cache_creation: if full { self.cache_creation() } else { None },
            output_tokens: usage.output,
            service_tier: full.then_some("standard"),
            server_tool_use: self.server_tool_use(),
        }
    }

    fn message<'a>(&'a self, id: &'a str, content: Vec<Block<'a>>, ended: bool) -> Message<'a> {
        let usage = if ended {
            self.usage(true)
        } else {
            Usage {
                input_tokens: self.input_tokens,
                cache_creation_input_tokens: self.cache.write_total(),
                cache_read_input_tokens: self.cache.read,
                cache_creation: self.cache_creation(),
                // The real API's placeholder until the final message_delta.
                output_tokens: 1,
                service_tier: Some("standard"),
                server_tool_use: None,
            }
        };
        Message {
            id,
            kind: "message",
            role: "assistant",
            model: &self.model,
            content,
            stop_reason: ended.then_some(self.stop_reason),
            stop_sequence: None,
            usage,
        }
    }

    fn ids(&self) -> (String, String) {
        (
            format!("msg_mock_{}", self.unique),
            format!("toolu_mock_{}", self.unique),
        )
    }

    /// The event sequence of a streaming response.
    pub fn stream(&self, templates: Arc<Templates>) -> SynthStream {
        let (message_id, tool_id) = self.ids();
        let start = MessageStartEvent {
            kind: "message_start",
            message: self.message(&message_id, Vec::new(), false),
        };
        let message_start = sse_event("message_start", &start);
        let block_start = match &self.tool {
            Some(name) => {
                let block = Block::ToolUse {
                    id: &tool_id,
                    name,
                    input: json!({}),
                };
                let event = BlockStartEvent {
                    kind: "content_block_start",
                    index: 0,
                    content_block: block,
                };
                sse_event("content_block_start", &event)
            }
            None => templates.text_block_start.clone(),
        };
        let delta = MessageDeltaEvent {
            kind: "message_delta",
            delta: StopDelta {
                stop_reason: self.stop_reason,
                stop_sequence: None,
            },
            usage: self.usage(false),
        };
        SynthStream {
            templates,
            tool: self.tool.is_some(),
            deltas: self.output_tokens,
            message_start,
            block_start,
            message_delta: sse_event("message_delta", &delta),
        }
    }

    /// The JSON body of a non-streaming response: the message the stream spells out.
    pub fn json_message(&self) -> Bytes {
        let (message_id, tool_id) = self.ids();
        let text: String = (0..self.output_tokens)
            .map(|k| WORDS[k % WORDS.len()])
            .collect();
        let block = match &self.tool {
            Some(name) => {
                let input = if self.output_tokens > 0 {
                    json!({ "text": text })
                } else {
                    json!({})
                };
                Block::ToolUse {
                    id: &tool_id,
                    name,
                    input,
                }
            }
            None => Block::Text { text: &text },
        };
        let message = self.message(&message_id, vec![block], true);
        Bytes::from(serde_json::to_vec(&message).unwrap_or_default())
    }
}

/// A synthesised event sequence, produced by index so nothing is pre-built per
/// delta.
#[derive(Debug)]
pub(crate) struct SynthStream {
    templates: Arc<Templates>,
    tool: bool,
    deltas: usize,
    message_start: Bytes,
    block_start: Bytes,
    message_delta: Bytes,
}

impl SynthStream {
    /// Number of events.
    pub fn len(&self) -> usize {
        self.deltas + 6
    }

    /// Index of the `message_delta` carrying the final usage.
    pub fn final_usage_index(&self) -> usize {
        self.deltas + 4
    }

    /// The event at `index` (`index < len()`).
    pub fn event(&self, index: usize) -> Bytes {
        let t = &self.templates;
        match index {
            0 => self.message_start.clone(),
            1 => self.block_start.clone(),
            2 => t.ping.clone(),
            i if i < 3 + self.deltas => self.delta(i - 3),
            i if i == 3 + self.deltas => t.block_stop.clone(),
            i if i == 4 + self.deltas => self.message_delta.clone(),
            _ => t.message_stop.clone(),
        }
    }

    fn delta(&self, k: usize) -> Bytes {
        let t = &self.templates;
        let word = k % WORDS.len();
        if !self.tool {
            t.text_deltas[word].clone()
        } else if self.deltas == 1 {
            t.tool_only.clone()
        } else if k == 0 {
            t.tool_first.clone()
        } else if k + 1 == self.deltas {
            t.tool_last[word].clone()
        } else {
            t.tool_middle[word].clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(tool: Option<&str>, output_tokens: usize) -> SynthPlan {
        SynthPlan {
            unique: "0001".into(),
            model: "claude-test".into(),
            input_tokens: 10,
            output_tokens,
            stop_reason: if tool.is_some() {
                "tool_use"
            } else {
                "end_turn"
            },
            cache: CacheSpec {
                write_5m: 3,
                write_1h: 4,
                read: 5,
            },
            input_growth: 2,
            web_searches: 0,
            tool: tool.map(str::to_owned),
        }
    }

    /// Fields come in the real API's order, `type` first.
    #[test]
    fn events_start_with_their_type() {
        let templates = Arc::new(Templates::new());
        let stream = plan(Some("lookup"), 3).stream(templates);
        for i in 0..stream.len() {
            let event = stream.event(i);
            let text = std::str::from_utf8(&event).unwrap();
            assert!(text.contains("\ndata: {\"type\":\""), "{text}");
            assert!(text.ends_with("}\n\n"), "{text}");
        }
        let message = String::from_utf8(plan(None, 2).json_message().to_vec()).unwrap();
        assert!(
            message.starts_with("{\"id\":\"msg_mock_0001\",\"type\":\"message\""),
            "{message}"
        );
    }

    fn data_of(event: &Bytes) -> Value {
        let text = std::str::from_utf8(event).unwrap();
        let data = text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
        serde_json::from_str(data).unwrap()
    }

    /// The stream's deltas spell out the same content as the JSON message.
    #[test]
    fn stream_and_json_agree() {
        let templates = Arc::new(Templates::new());
        for (tool, n) in [
            (None, 0),
            (None, 20),
            (Some("lookup"), 1),
            (Some("lookup"), 2),
            (Some("lookup"), 37),
        ] {
            let plan = plan(tool, n);
            let stream = plan.stream(templates.clone());
            let events: Vec<Value> = (0..stream.len())
                .map(|i| data_of(&stream.event(i)))
                .collect();
            let mut spelled = String::new();
            for e in &events[3..3 + n] {
                let delta = &e["delta"];
                spelled.push_str(
                    delta["text"]
                        .as_str()
                        .or(delta["partial_json"].as_str())
                        .unwrap(),
                );
            }
            let message: Value = serde_json::from_slice(&plan.json_message()).unwrap();
            let block = &message["content"][0];
            match tool {
                Some(_) if n > 0 => {
                    let input: Value = serde_json::from_str(&spelled).unwrap();
                    assert_eq!(input, block["input"]);
                }
                Some(_) => assert_eq!(block["input"], json!({})),
                None => assert_eq!(block["text"], spelled.as_str()),
            }
            let last_usage = &events[stream.final_usage_index()]["usage"];
            assert_eq!(last_usage["output_tokens"], n as u64);
            assert_eq!(last_usage["input_tokens"], 12);
            assert_eq!(message["usage"]["input_tokens"], 12);
            assert_eq!(message["usage"]["cache_creation_input_tokens"], 7);
            assert_eq!(
                events[0]["message"]["usage"]["cache_creation"]["ephemeral_1h_input_tokens"],
                4
            );
            assert_eq!(events.last().unwrap()["type"], "message_stop");
        }
    }
}
