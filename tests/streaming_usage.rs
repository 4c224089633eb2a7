//! Usage metering of Messages responses, through the public meter API.
//!
//! The recorded streams in `tests/fixtures/sse/` (expected usage in the README
//! there) are fed whole, split at every byte offset, with CRLF and CR line
//! ends, behind a BOM, and in random chunks; each must yield exactly the same
//! reading. Hand-written streams cover the rest of the usage rule and the SSE
//! rules, and the JSON cases cover non-streaming bodies and their encodings.

// Helpers outside `#[test]` functions panic on purpose: a failed helper is a
// failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;

use flate2::Compression;
use flate2::write::GzEncoder;
use proptest::prelude::*;
use tollgate::meter::{Meter, MeterReading, Usage};

/// A recorded stream and what the meter must read from it.
struct Fixture {
    file: &'static str,
    usage: Usage,
    stop_reason: &'static str,
    message_id: &'static str,
    model: &'static str,
    /// ceil(bytes of text, tool input and thinking / 4), counted independently.
    estimated_output_tokens: u64,
}

fn fixtures() -> Vec<Fixture> {
    let standard = || Some("standard".to_string());
    vec![
        Fixture {
            file: "basic_response.sse",
            usage: Usage {
                input_tokens: 11,
                output_tokens: 6,
                ..Usage::default()
            },
            stop_reason: "end_turn",
            message_id: "msg_4QpJur2dWWDjF6C758FbBw5vm12BaVipnK",
            model: "claude-3-opus-latest",
            estimated_output_tokens: 3,
        },
        Fixture {
            file: "tool_use_response.sse",
            usage: Usage {
                input_tokens: 377,
                output_tokens: 65,
                service_tier: standard(),
                ..Usage::default()
            },
            stop_reason: "tool_use",
            message_id: "msg_019Q1hrJbZG26Fb9BQhrkHEr",
            model: "claude-sonnet-4-20250514",
            estimated_output_tokens: 19,
        },
        Fixture {
            file: "incomplete_partial_json_response.sse",
            usage: Usage {
                input_tokens: 450,
                output_tokens: 124,
                service_tier: standard(),
                ..Usage::default()
            },
            stop_reason: "max_tokens",
            message_id: "msg_01UdjYBBipA9omjYhicnevgq",
            model: "claude-3-7-sonnet-20250219",
            estimated_output_tokens: 76,
        },
        Fixture {
            file: "refusal_response.sse",
            usage: Usage {
                input_tokens: 20,
                output_tokens: 0,
                ..Usage::default()
            },
            stop_reason: "refusal",
            message_id: "msg_01RefusalTestMessage123456789",
            model: "claude-opus-4-7",
            estimated_output_tokens: 0,
        },
        Fixture {
            file: "compaction_response.sse",
            usage: Usage {
                input_tokens: 30,
                output_tokens: 8,
                ..Usage::default()
            },
            stop_reason: "end_turn",
            message_id: "msg_01CompactionEncryptedContent01",
            model: "claude-opus-4-7",
            estimated_output_tokens: 3,
        },
    ]
}

fn load(fixture: &Fixture) -> Vec<u8> {
    let path = format!(
        "{}/tests/fixtures/sse/{}",
        env!("CARGO_MANIFEST_DIR"),
        fixture.file
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The fixture as recorded (LF), with CRLF and with CR line ends, and with a
/// BOM in front of the CRLF form. None of the fixtures has a raw line break
/// inside its JSON, so rewriting LF is safe.
fn variants(recorded: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    let with_line_end = |end: &[u8]| -> Vec<u8> {
        recorded
            .split(|&b| b == b'\n')
            .collect::<Vec<_>>()
            .join(end)
    };
    let crlf = with_line_end(b"\r\n");
    let bom_crlf = [b"\xEF\xBB\xBF".as_slice(), &crlf].concat();
    vec![
        ("LF", recorded.to_vec()),
        ("CRLF", crlf),
        ("CR", with_line_end(b"\r")),
        ("BOM+CRLF", bom_crlf),
    ]
}

/// Feeds a stream to a fresh SSE meter, chunk by chunk, and returns its reading.
fn read_stream<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> MeterReading {
    read_body("text/event-stream", "", chunks)
}

fn read_body<'a>(
    content_type: &str,
    content_encoding: &str,
    chunks: impl IntoIterator<Item = &'a [u8]>,
) -> MeterReading {
    let mut meter = Meter::for_response(true, content_type, content_encoding);
    for chunk in chunks {
        meter.feed(chunk);
    }
    meter.finish();
    meter
        .reading()
        .cloned()
        .expect("a billable response is metered")
}

/// Asserts that a fixture, fed in the given chunks, reads exactly as expected.
fn check<'a>(fixture: &Fixture, how: &str, chunks: impl IntoIterator<Item = &'a [u8]>) {
    let reading = read_stream(chunks);
    let at = format!("{} ({how})", fixture.file);
    assert_eq!(reading.usage, fixture.usage, "{at}");
    assert_eq!(
        reading.stop_reason.as_deref(),
        Some(fixture.stop_reason),
        "{at}"
    );
    assert_eq!(
        reading.message_id.as_deref(),
        Some(fixture.message_id),
        "{at}"
    );
    assert_eq!(reading.model.as_deref(), Some(fixture.model), "{at}");
    assert!(
        reading.saw_start && reading.saw_final_usage && reading.saw_stop,
        "{at}"
    );
    assert!(
        !reading.saw_error_event && reading.error_type.is_none(),
        "{at}"
    );
    assert_eq!(reading.malformed, 0, "{at}");
    assert_eq!(
        reading.estimated_output_tokens, fixture.estimated_output_tokens,
        "{at}"
    );
    assert_eq!(
        reading.output_tokens_for_record(),
        fixture.usage.output_tokens,
        "{at}"
    );
}

/// Splits `bytes` into chunks of the given sizes, cycling through them.
fn chunked<'a>(bytes: &'a [u8], sizes: &[usize]) -> Vec<&'a [u8]> {
    let mut chunks = Vec::new();
    let mut rest = bytes;
    for &size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (chunk, tail) = rest.split_at(size.clamp(1, rest.len()));
        chunks.push(chunk);
        rest = tail;
    }
    chunks
}

#[test]
fn fixtures_read_whole() {
    for fixture in fixtures() {
        for (how, stream) in variants(&load(&fixture)) {
            check(&fixture, how, [stream.as_slice()]);
        }
    }
}

#[test]
fn fixtures_split_at_every_byte_offset() {
    for fixture in fixtures() {
        for (how, stream) in variants(&load(&fixture)) {
            for cut in 0..=stream.len() {
                let (head, tail) = stream.split_at(cut);
                check(&fixture, &format!("{how}, cut at {cut}"), [head, tail]);
            }
        }
    }
}

#[test]
fn fixtures_fed_byte_by_byte() {
    for fixture in fixtures() {
        for (how, stream) in variants(&load(&fixture)) {
            check(&fixture, &format!("{how}, bytes"), stream.chunks(1));
        }
    }
}

proptest! {
    #[test]
    fn fixtures_in_random_chunks(
        which in 0..5usize,
        variant in 0..4usize,
        sizes in proptest::collection::vec(1..48usize, 1..64),
    ) {
        let all = fixtures();
        let fixture = &all[which];
        let all_variants = variants(&load(fixture));
        let (how, stream) = &all_variants[variant];
        check(fixture, &format!("{how}, chunks {sizes:?}"), chunked(stream, &sizes));
    }
}

#[test]
fn gzip_encoded_stream_reads_the_same() {
    let all = fixtures();
    let fixture = &all[1];
    let compressed = gzip(&load(fixture));
    let reading = read_body("text/event-stream", "gzip", compressed.chunks(5));
    assert_eq!(reading.usage, fixture.usage);
    assert!(reading.saw_final_usage && reading.saw_stop);
    assert_eq!(reading.malformed, 0);
}

/// One SSE event with LF line ends; data that spans lines is sent as one
/// `data:` line per line, as a server must.
fn event(name: &str, data: &str) -> String {
    let data_lines: String = data
        .split('\n')
        .map(|line| format!("data: {line}\n"))
        .collect();
    format!("event: {name}\n{data_lines}\n")
}

fn message_start(usage: &str) -> String {
    event(
        "message_start",
        &format!(
            r#"{{"type":"message_start","message":{{"id":"msg_t","type":"message","role":"assistant","model":"claude-test","content":[],"stop_reason":null,"usage":{usage}}}}}"#
        ),
    )
}

fn message_delta(usage: &str) -> String {
    event(
        "message_delta",
        &format!(
            r#"{{"type":"message_delta","delta":{{"stop_reason":"end_turn","stop_sequence":null}},"usage":{usage}}}"#
        ),
    )
}

fn text_delta(text: &str) -> String {
    event(
        "content_block_delta",
        &format!(
            r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":"{text}"}}}}"#
        ),
    )
}

fn read_str(stream: &str) -> MeterReading {
    read_stream([stream.as_bytes()])
}

#[test]
fn input_tokens_grow_in_message_delta_and_are_overwritten_not_summed() {
    let reading = read_str(
        &[
            message_start(r#"{"input_tokens":100,"output_tokens":1}"#),
            message_delta(r#"{"input_tokens":180,"output_tokens":20}"#),
            message_delta(r#"{"input_tokens":250,"output_tokens":45}"#),
        ]
        .concat(),
    );
    assert_eq!(reading.usage.input_tokens, 250);
    assert_eq!(reading.usage.output_tokens, 45);
    assert!(reading.saw_final_usage);
    assert_eq!(reading.output_tokens_for_record(), 45);
}

#[test]
fn cache_fields_present_only_in_message_delta() {
    let reading = read_str(
        &[
            message_start(r#"{"input_tokens":5,"output_tokens":1}"#),
            message_delta(
                r#"{"output_tokens":9,"cache_creation_input_tokens":1200,"cache_read_input_tokens":3400}"#,
            ),
        ]
        .concat(),
    );
    assert_eq!(reading.usage.input_tokens, 5);
    assert_eq!(reading.usage.cache_creation_input_tokens, 1200);
    assert_eq!(reading.usage.cache_read_input_tokens, 3400);
    assert_eq!(reading.usage.output_tokens, 9);
}

#[test]
fn every_usage_field_of_message_start_is_read() {
    let reading = read_str(&message_start(
        r#"{"input_tokens":10,"cache_creation_input_tokens":300,"cache_read_input_tokens":40,
            "cache_creation":{"ephemeral_5m_input_tokens":100,"ephemeral_1h_input_tokens":200},
            "output_tokens":3,"server_tool_use":{"web_search_requests":2},
            "service_tier":"priority","inference_geo":"us"}"#,
    ));
    assert_eq!(
        reading.usage,
        Usage {
            input_tokens: 10,
            output_tokens: 3,
            cache_creation_input_tokens: 300,
            cache_creation_5m_tokens: Some(100),
            cache_creation_1h_tokens: Some(200),
            cache_read_input_tokens: 40,
            web_search_requests: 2,
            service_tier: Some("priority".into()),
            inference_geo: Some("us".into()),
        }
    );
    assert_eq!(reading.message_id.as_deref(), Some("msg_t"));
    assert_eq!(reading.model.as_deref(), Some("claude-test"));
    assert!(reading.saw_start && !reading.saw_final_usage);
}

#[test]
fn server_tool_use_and_cache_split_update_in_message_delta() {
    let reading = read_str(
        &[
            message_start(
                r#"{"input_tokens":10,"output_tokens":1,"server_tool_use":{"web_search_requests":0}}"#,
            ),
            message_delta(
                r#"{"output_tokens":50,"server_tool_use":{"web_search_requests":3},
                    "cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":900}}"#,
            ),
        ]
        .concat(),
    );
    assert_eq!(reading.usage.web_search_requests, 3);
    assert_eq!(reading.usage.cache_creation_5m_tokens, Some(0));
    assert_eq!(reading.usage.cache_creation_1h_tokens, Some(900));
}

#[test]
fn null_fields_in_a_delta_do_not_overwrite() {
    let reading = read_str(
        &[
            message_start(
                r#"{"input_tokens":77,"cache_read_input_tokens":12,"output_tokens":1,"service_tier":"standard","inference_geo":"global"}"#,
            ),
            message_delta(
                r#"{"input_tokens":null,"cache_read_input_tokens":null,"cache_creation_input_tokens":null,
                    "output_tokens":30,"service_tier":null,"inference_geo":null,"server_tool_use":null}"#,
            ),
        ]
        .concat(),
    );
    assert_eq!(reading.usage.input_tokens, 77);
    assert_eq!(reading.usage.cache_read_input_tokens, 12);
    assert_eq!(reading.usage.output_tokens, 30);
    assert_eq!(reading.usage.service_tier.as_deref(), Some("standard"));
    assert_eq!(reading.usage.inference_geo.as_deref(), Some("global"));
    assert!(reading.saw_final_usage);
}

#[test]
fn in_stream_error_event() {
    let reading = read_str(
        &[
            message_start(r#"{"input_tokens":40,"output_tokens":1}"#),
            text_delta("Partial answer"),
            event(
                "error",
                r#"{"type":"error","error":{"details":null,"type":"overloaded_error","message":"Overloaded"}}"#,
            ),
        ]
        .concat(),
    );
    assert_eq!(reading.error_type.as_deref(), Some("overloaded_error"));
    assert!(reading.saw_error_event);
    assert!(!reading.saw_final_usage && !reading.saw_stop);
    assert_eq!(reading.usage.input_tokens, 40);
}

#[test]
fn stream_cut_before_message_delta_estimates_output_from_the_text() {
    // 40 bytes of text and 24 bytes of tool input (escapes as written): 64
    // bytes, 16 tokens.
    let tool_input = event(
        "content_block_delta",
        r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"city\": \"Paris, Fran"}}"#,
    );
    let stream = [
        message_start(r#"{"input_tokens":100,"cache_read_input_tokens":20,"output_tokens":1}"#),
        text_delta("0123456789012345678901234567890123456789"),
        tool_input,
        // The cut falls inside the final message_delta's data line.
        r#"event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tok"#
            .to_string(),
    ]
    .concat();
    let reading = read_str(&stream);
    assert!(!reading.saw_final_usage && !reading.saw_stop);
    assert_eq!(reading.usage.input_tokens, 100);
    assert_eq!(reading.usage.cache_read_input_tokens, 20);
    assert_eq!(reading.usage.output_tokens, 1);
    assert_eq!(reading.estimated_output_tokens, 16);
    assert_eq!(reading.output_tokens_for_record(), 16);
    assert_eq!(reading.malformed, 1, "the cut event is unreadable");
}

#[test]
fn multi_line_data_is_joined_with_lf() {
    let stream = "event: message_delta\n\
                  data: {\"type\":\"message_delta\",\n\
                  data: \"usage\":\n\
                  data: {\"output_tokens\":5}}\n\n";
    let reading = read_str(stream);
    assert_eq!(reading.usage.output_tokens, 5);
    assert!(reading.saw_final_usage);
    assert_eq!(reading.malformed, 0);
}

#[test]
fn comments_ids_and_retry_are_ignored() {
    let stream = ": keep-alive\n\
                  id: 7\n\
                  retry: 1000\n\
                  event: message_delta\n\
                  : a comment inside the event\n\
                  id\n\
                  data:{\"usage\":{\"output_tokens\":12}}\n\
                  \n\
                  :\n\n";
    let reading = read_str(stream);
    assert_eq!(reading.usage.output_tokens, 12);
    assert!(reading.saw_final_usage);
    assert_eq!(reading.malformed, 0);
}

#[test]
fn malformed_json_is_counted_and_the_stream_goes_on() {
    let reading = read_str(
        &[
            message_start(r#"{"input_tokens":3,"output_tokens":1}"#),
            event(
                "message_delta",
                r#"{"type":"message_delta","usage":{"output_tokens":"#,
            ),
            event("message_start", "not json at all"),
            event("message_delta", "\u{FFFD}{]"),
            message_delta(r#"{"output_tokens":42}"#),
        ]
        .concat(),
    );
    assert_eq!(reading.malformed, 3);
    assert_eq!(reading.usage.output_tokens, 42);
    assert_eq!(reading.usage.input_tokens, 3);
    assert!(reading.saw_final_usage);
}

#[test]
fn invalid_utf8_in_a_parsed_event_is_malformed_not_a_panic() {
    let mut stream = b"event: message_delta\ndata: {\"delta\":{\"stop_reason\":\"".to_vec();
    stream.extend_from_slice(b"\xFF\xFE\"},\"usage\":{\"output_tokens\":1}}\n\n");
    let reading = read_stream([stream.as_slice()]);
    assert_eq!(reading.malformed, 1);
    assert!(!reading.saw_final_usage);
}

#[test]
fn unknown_events_are_skipped_even_with_usage_inside() {
    let reading = read_str(
        &[
            message_start(r#"{"input_tokens":8,"output_tokens":1}"#),
            event(
                "future_event",
                r#"{"type":"future_event","usage":{"output_tokens":999,"input_tokens":999}}"#,
            ),
            event("ping", r#"{"type": "ping"}"#),
            message_delta(r#"{"output_tokens":4}"#),
        ]
        .concat(),
    );
    assert_eq!(reading.usage.input_tokens, 8);
    assert_eq!(reading.usage.output_tokens, 4);
    assert_eq!(reading.malformed, 0);
}

#[test]
fn events_without_an_event_line_go_by_their_type() {
    let stream = concat!(
        "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_u\",\"model\":\"m\",",
        "\"usage\":{\"input_tokens\":21,\"output_tokens\":1}}}\n\n",
        "data: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"abcdefgh\"}}\n\n",
        "data: {\"type\":\"ping\"}\n\n",
        "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},",
        "\"usage\":{\"output_tokens\":9}}\n\n",
        "data: {\"type\":\"message_stop\"}\n\n",
    );
    let reading = read_str(stream);
    assert_eq!(reading.message_id.as_deref(), Some("msg_u"));
    assert_eq!(reading.usage.input_tokens, 21);
    assert_eq!(reading.usage.output_tokens, 9);
    assert_eq!(reading.stop_reason.as_deref(), Some("end_turn"));
    assert_eq!(reading.estimated_output_tokens, 2);
    assert!(reading.saw_start && reading.saw_final_usage && reading.saw_stop);
    assert_eq!(reading.malformed, 0);
}

#[test]
fn a_leading_bom_is_stripped() {
    let stream = "event: message_stop\ndata: {}\n\n";
    assert!(read_str(&format!("\u{FEFF}{stream}")).saw_stop);
    // Only one BOM is stripped: a second one spoils the first field name, and
    // the data alone does not say `message_stop`.
    assert!(!read_str(&format!("\u{FEFF}\u{FEFF}{stream}")).saw_stop);
}

#[test]
fn stream_without_message_stop_keeps_its_final_usage() {
    let reading = read_str(
        &[
            message_start(r#"{"input_tokens":2,"output_tokens":1}"#),
            message_delta(r#"{"output_tokens":7}"#),
        ]
        .concat(),
    );
    assert!(reading.saw_final_usage && !reading.saw_stop);
    assert_eq!(reading.output_tokens_for_record(), 7);
}

#[test]
fn non_billable_responses_are_not_metered() {
    let mut meter = Meter::for_response(false, "application/json", "");
    meter.feed(br#"{"input_tokens":12}"#);
    meter.finish();
    assert!(meter.reading().is_none());
    assert!(!meter.is_stream());
}

const JSON_BODY: &str = r#"{"id":"msg_json","type":"message","role":"assistant","model":"claude-sonnet-4-5",
    "content":[{"type":"text","text":"Hello! How can I help?"}],"stop_reason":"end_turn","stop_sequence":null,
    "usage":{"input_tokens":25,"cache_creation_input_tokens":100,"cache_read_input_tokens":50,
    "cache_creation":{"ephemeral_5m_input_tokens":60,"ephemeral_1h_input_tokens":40},
    "output_tokens":12,"server_tool_use":{"web_search_requests":1},"service_tier":"standard"}}"#;

fn assert_json_body(reading: &MeterReading) {
    assert_eq!(
        reading.usage,
        Usage {
            input_tokens: 25,
            output_tokens: 12,
            cache_creation_input_tokens: 100,
            cache_creation_5m_tokens: Some(60),
            cache_creation_1h_tokens: Some(40),
            cache_read_input_tokens: 50,
            web_search_requests: 1,
            service_tier: Some("standard".into()),
            inference_geo: None,
        }
    );
    assert_eq!(reading.message_id.as_deref(), Some("msg_json"));
    assert_eq!(reading.model.as_deref(), Some("claude-sonnet-4-5"));
    assert_eq!(reading.stop_reason.as_deref(), Some("end_turn"));
    assert!(reading.saw_start && reading.saw_final_usage);
    assert_eq!(reading.malformed, 0);
    assert_eq!(reading.output_tokens_for_record(), 12);
}

fn gzip(body: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(body).expect("writing to a Vec");
    encoder.finish().expect("writing to a Vec")
}

#[test]
fn json_body() {
    let reading = read_body("application/json", "", [JSON_BODY.as_bytes()]);
    assert_json_body(&reading);
}

#[test]
fn json_body_in_small_chunks() {
    let reading = read_body("application/json", "", JSON_BODY.as_bytes().chunks(7));
    assert_json_body(&reading);
}

#[test]
fn gzip_json_body_in_small_chunks() {
    let compressed = gzip(JSON_BODY.as_bytes());
    for size in [1, 3, 16] {
        let reading = read_body("application/json", "gzip", compressed.chunks(size));
        assert_json_body(&reading);
    }
}

#[test]
fn json_error_body() {
    let body = r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},"request_id":"req_1"}"#;
    let reading = read_body("application/json", "", [body.as_bytes()]);
    assert_eq!(reading.error_type.as_deref(), Some("overloaded_error"));
    assert!(!reading.saw_final_usage && !reading.saw_start);
    assert_eq!(reading.message_id, None);
    assert_eq!(reading.malformed, 0);
}

#[test]
fn non_json_body_is_malformed() {
    let body = "<html><body>502 Bad Gateway</body></html>";
    let reading = read_body("text/html", "", [body.as_bytes()]);
    assert_eq!(reading.malformed, 1);
    assert!(!reading.saw_final_usage);
    assert_eq!(reading.usage, Usage::default());
}

#[test]
fn truncated_json_body_is_malformed() {
    let body = &JSON_BODY.as_bytes()[..JSON_BODY.len() - 10];
    let reading = read_body("application/json", "", [body]);
    assert_eq!(reading.malformed, 1);
    assert!(!reading.saw_final_usage);
}

#[test]
fn unsupported_encoding_is_flagged_and_reads_nothing() {
    let reading = read_body(
        "application/json",
        "br",
        [b"\x1b\x00\x00".as_slice(), b"compressed bytes"],
    );
    assert_eq!(reading.malformed, 1);
    assert!(!reading.saw_final_usage);
    assert_eq!(reading.usage, Usage::default());
}
