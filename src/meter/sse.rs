//! The incremental SSE reader for streaming responses.
//!
//! [`SseMeter`] follows the WHATWG event-stream parsing rules on raw bytes, so
//! a frame may end anywhere: mid-line, between the CR and LF of one line end,
//! or inside a UTF-8 character. Lines are found with `memchr`; a line that
//! lies wholly inside a frame is read in place, and only a line cut by a frame
//! boundary is copied (or, when its content is not needed, skipped to its
//! end without copying).
//!
//! Only `message_start`, `message_delta` and `error` carry usage, so only
//! their data is kept and JSON-parsed. `message_stop` is noted without
//! parsing; `content_block_delta` is measured, not parsed, for the output
//! estimate of a cut stream; everything else (`ping`, `content_block_start`,
//! events added to the API later) is dropped as it is read.

use std::sync::LazyLock;

use memchr::{memchr2, memmem};
use serde::Deserialize;

use super::json::{ErrorJson, UsageJson};
use super::{MeterReading, Reader};

/// The most bytes one line, or the data of one kept event, may take in
/// memory. Real events are a few hundred bytes; past this cap the event is
/// counted malformed and skipped, so a hostile stream cannot grow memory
/// without bound.
pub const MAX_EVENT_BYTES: usize = 16 << 20;

/// A UTF-8 byte order mark, which the SSE rules strip from the stream start.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Text bytes per output token, for the estimate of a cut stream.
const BYTES_PER_TOKEN: u64 = 4;

/// The keys of a `content_block_delta` whose string values count as output:
/// text, tool input, thinking. Built once, as a searcher costs more to build
/// than a short stream costs to scan.
static TEXT_KEYS: LazyLock<[memmem::Finder<'static>; 3]> = LazyLock::new(|| {
    [
        memmem::Finder::new(b"\"text\""),
        memmem::Finder::new(b"\"partial_json\""),
        memmem::Finder::new(b"\"thinking\""),
    ]
});

/// The `event:` name of the event being read, which decides what its data
/// lines are worth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventKind {
    /// No `event:` line (yet): the data is kept, and its `"type"` decides.
    Unnamed,
    MessageStart,
    MessageDelta,
    MessageStop,
    Error,
    /// Text, tool input or thinking: measured for the output estimate.
    ContentBlockDelta,
    /// `ping`, `content_block_start`/`_stop`, and any future event.
    Other,
}

impl EventKind {
    fn from_name(name: &[u8]) -> EventKind {
        match name {
            b"" => EventKind::Unnamed,
            b"message_start" => EventKind::MessageStart,
            b"message_delta" => EventKind::MessageDelta,
            b"message_stop" => EventKind::MessageStop,
            b"error" => EventKind::Error,
            b"content_block_delta" => EventKind::ContentBlockDelta,
            _ => EventKind::Other,
        }
    }

    /// Whether the event's data must be kept for JSON parsing.
    fn keeps_data(self) -> bool {
        matches!(
            self,
            EventKind::Unnamed
                | EventKind::MessageStart
                | EventKind::MessageDelta
                | EventKind::Error
        )
    }

    /// Whether the event's data lines can be dropped unread: only their
    /// presence matters (an event without data is never dispatched).
    fn ignores_data(self) -> bool {
        matches!(self, EventKind::MessageStop | EventKind::Other)
    }
}

/// Where the reader is within the current line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineState {
    /// At the start of a line.
    Start,
    /// Inside a line that began in an earlier frame; its bytes so far are held.
    Holding,
    /// Inside a line whose content is not needed: skip to its end.
    Skipping,
}

// The fields of `message_start`, `message_delta` and `error` events that the
// meter reads; everything else in them is skipped by the parser.

/// The `"type"` of an event without an `event:` line.
#[derive(Debug, Deserialize)]
struct TypeJson {
    #[serde(rename = "type")]
    kind: Option<String>,
}

#[derive(Debug, Deserialize)]
struct MessageStartJson {
    message: Option<MessageJson>,
}

#[derive(Debug, Deserialize)]
struct MessageDeltaJson {
    delta: Option<DeltaJson>,
    usage: Option<UsageJson>,
}

#[derive(Debug, Deserialize)]
struct ErrorEventJson {
    error: Option<ErrorJson>,
}

/// `message_start.message`.
#[derive(Debug, Deserialize)]
struct MessageJson {
    id: Option<String>,
    model: Option<String>,
    usage: Option<UsageJson>,
}

/// `message_delta.delta`.
#[derive(Debug, Deserialize)]
struct DeltaJson {
    stop_reason: Option<String>,
}

/// Reads the usage of a `text/event-stream` response, frame by frame.
///
/// Feed it every decoded frame in order, then call [`Reader::finish`] when
/// the body ends (cleanly or not): a last event that was not followed by a
/// blank line is dispatched then, as the recorded streams end that way.
/// Buffers are reused across events; the common case allocates nothing per
/// frame.
#[derive(Debug)]
pub struct SseMeter {
    reading: MeterReading,
    line_state: LineState,
    /// The start of a line cut by a frame boundary.
    line: Vec<u8>,
    /// The last frame ended in CR: an LF starting the next one ends the same line.
    after_cr: bool,
    /// How many bytes of a BOM the stream has begun with, while that is
    /// undecided; `None` once the stream start is behind.
    bom_matched: Option<usize>,
    event: EventKind,
    /// The current event has at least one `data:` line.
    has_data: bool,
    /// The current event's data lines, joined with LF, when it is kept.
    data: Vec<u8>,
    /// The current event outgrew [`MAX_EVENT_BYTES`]: drop its lines until
    /// the blank line that ends it.
    skipping_event: bool,
    /// Bytes of text, tool input and thinking seen in `content_block_delta`s.
    text_bytes: u64,
}

impl Default for SseMeter {
    fn default() -> SseMeter {
        SseMeter::new()
    }
}

impl SseMeter {
    /// A reader at the start of a stream.
    pub fn new() -> SseMeter {
        SseMeter {
            reading: MeterReading::default(),
            line_state: LineState::Start,
            line: Vec::new(),
            after_cr: false,
            bom_matched: Some(0),
            event: EventKind::Unnamed,
            has_data: false,
            data: Vec::new(),
            skipping_event: false,
            text_bytes: 0,
        }
    }

    /// Strips a BOM from the stream start, even one split across frames, and
    /// returns the bytes left to parse.
    fn skip_bom<'a>(&mut self, bytes: &'a [u8]) -> &'a [u8] {
        let Some(held) = self.bom_matched else {
            return bytes;
        };
        let mut matched = held;
        let mut taken = 0;
        while matched < BOM.len() && taken < bytes.len() && bytes[taken] == BOM[matched] {
            matched += 1;
            taken += 1;
        }
        if matched == BOM.len() {
            self.bom_matched = None;
            return &bytes[taken..];
        }
        if taken == bytes.len() {
            // Everything so far may still be a BOM: wait for more.
            self.bom_matched = Some(matched);
            return &[];
        }
        // Not a BOM after all: the bytes held back from earlier frames begin
        // the first line, and this frame is parsed from its start.
        self.bom_matched = None;
        if held > 0 {
            self.line.extend_from_slice(&BOM[..held]);
            self.line_state = LineState::Holding;
        }
        bytes
    }

    /// Returns what follows the line end at `rest[end]` (LF, CR or CRLF).
    fn after_line_end<'a>(&mut self, rest: &'a [u8], end: usize) -> &'a [u8] {
        if rest[end] == b'\r' {
            match rest.get(end + 1) {
                Some(b'\n') => return &rest[end + 2..],
                Some(_) => {}
                None => self.after_cr = true,
            }
        }
        &rest[end + 1..]
    }

    /// Takes more of a line that is cut by a frame boundary.
    fn continue_line(&mut self, bytes: &[u8]) {
        if self.line_state == LineState::Skipping {
            return;
        }
        // A line is judged by its first bytes; deciding before copying keeps
        // the long data lines of skipped events out of memory entirely.
        let verdict = if self.line.is_empty() {
            self.unneeded_line(bytes)
        } else {
            None
        };
        if verdict.is_none() {
            if self.line.len() + bytes.len() > MAX_EVENT_BYTES {
                self.event_too_large();
                self.line = Vec::new();
                self.line_state = LineState::Skipping;
                return;
            }
            self.line.extend_from_slice(bytes);
            self.line_state = LineState::Holding;
        }
        if let Some(is_data) = verdict.or_else(|| self.unneeded_line(&self.line)) {
            self.has_data |= is_data;
            self.line.clear();
            self.line_state = LineState::Skipping;
        }
    }

    /// Whether a line starting with `head` can be skipped unread: `Some(true)`
    /// for a data line of an event whose data is ignored, `Some(false)` for a
    /// comment or a line of an oversized event, `None` if it must be read.
    fn unneeded_line(&self, head: &[u8]) -> Option<bool> {
        if self.skipping_event || head.first() == Some(&b':') {
            return Some(false);
        }
        if self.event.ignores_data() && head.starts_with(b"data:") {
            return Some(true);
        }
        None
    }

    /// The line held across frames has ended: read it.
    fn end_held_line(&mut self) {
        if self.line_state == LineState::Holding {
            let line = std::mem::take(&mut self.line);
            self.read_line(&line);
            self.line = line;
            self.line.clear();
        }
        self.line_state = LineState::Start;
    }

    /// Reads one complete line, without its line end.
    fn read_line(&mut self, line: &[u8]) {
        if line.is_empty() {
            self.dispatch();
            return;
        }
        if self.skipping_event {
            return;
        }
        // Anthropic's streams use only `event:` and `data:`; test for them
        // first so the common line costs no search for its colon.
        if let Some(value) = line.strip_prefix(b"data:") {
            self.data_line(strip_one_space(value));
        } else if let Some(value) = line.strip_prefix(b"event:") {
            self.event = EventKind::from_name(strip_one_space(value));
        } else {
            // A field name alone is a field with an empty value. Comments,
            // `id`, `retry` and unknown fields carry nothing the meter needs.
            match line {
                b"data" => self.data_line(b""),
                b"event" => self.event = EventKind::Unnamed,
                _ => {}
            }
        }
    }

    fn data_line(&mut self, value: &[u8]) {
        let first = !self.has_data;
        self.has_data = true;
        match self.event {
            EventKind::ContentBlockDelta => self.count_text(value),
            kind if kind.keeps_data() => {
                let joined = value.len() + usize::from(!first);
                if self.data.len() + joined > MAX_EVENT_BYTES {
                    self.event_too_large();
                    return;
                }
                if !first {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
            }
            _ => {}
        }
    }

    /// The current event broke [`MAX_EVENT_BYTES`]: count it once and drop it.
    fn event_too_large(&mut self) {
        if !self.skipping_event {
            self.reading.malformed += 1;
            self.skipping_event = true;
        }
        self.data = Vec::new();
    }

    /// Adds the text of a `content_block_delta` to the output estimate.
    fn count_text(&mut self, data: &[u8]) {
        self.text_bytes += delta_text_len(data) as u64;
        self.reading.estimated_output_tokens = self.text_bytes.div_ceil(BYTES_PER_TOKEN);
    }

    /// A blank line ended the event: act on it, then start a new one.
    fn dispatch(&mut self) {
        if self.has_data && !self.skipping_event {
            match self.event {
                EventKind::MessageStart | EventKind::MessageDelta | EventKind::Error => {
                    self.parse_event(self.event);
                }
                EventKind::MessageStop => self.reading.saw_stop = true,
                EventKind::Unnamed => self.dispatch_unnamed(),
                EventKind::ContentBlockDelta | EventKind::Other => {}
            }
        }
        self.event = EventKind::Unnamed;
        self.has_data = false;
        self.data.clear();
        self.skipping_event = false;
    }

    /// An event without an `event:` line. Its `"type"` names it; a quoted
    /// interesting name can only appear in the data as a JSON string token
    /// (inside strings quotes are escaped), so this cheap check sends only
    /// candidates to the parser.
    fn dispatch_unnamed(&mut self) {
        let data = &self.data;
        if memmem::find(data, b"\"message_").is_some() || memmem::find(data, b"\"error\"").is_some()
        {
            self.parse_event(EventKind::Unnamed);
        } else if memmem::find(data, b"\"content_block_delta\"").is_some() {
            let len = delta_text_len(data);
            self.text_bytes += len as u64;
            self.reading.estimated_output_tokens = self.text_bytes.div_ceil(BYTES_PER_TOKEN);
        }
    }

    /// Parses the kept data of an event and applies the usage rule. `named`
    /// is the `event:` name, or `Unnamed` to go by the data's `"type"`.
    fn parse_event(&mut self, named: EventKind) {
        if self.apply_event(named).is_err() {
            self.reading.malformed += 1;
        }
    }

    fn apply_event(&mut self, named: EventKind) -> Result<(), ()> {
        // Validating the UTF-8 once, up front, is faster than letting the
        // parser validate every string and key as it goes.
        let json = std::str::from_utf8(&self.data).map_err(drop)?;
        let kind = match named {
            EventKind::Unnamed => serde_json::from_str::<TypeJson>(json)
                .map_err(drop)?
                .kind
                .map_or(EventKind::Other, |t| EventKind::from_name(t.as_bytes())),
            named => named,
        };
        let reading = &mut self.reading;
        match kind {
            EventKind::MessageStart => {
                let event: MessageStartJson = serde_json::from_str(json).map_err(drop)?;
                if let Some(message) = event.message {
                    reading.message_id = message.id.or(reading.message_id.take());
                    reading.model = message.model.or(reading.model.take());
                    if let Some(usage) = message.usage {
                        usage.apply_to(&mut reading.usage);
                    }
                    reading.saw_start = true;
                }
            }
            EventKind::MessageDelta => {
                let event: MessageDeltaJson = serde_json::from_str(json).map_err(drop)?;
                if let Some(stop_reason) = event.delta.and_then(|d| d.stop_reason) {
                    reading.stop_reason = Some(stop_reason);
                }
                if let Some(usage) = event.usage {
                    usage.apply_to(&mut reading.usage);
                    reading.saw_final_usage = true;
                }
            }
            EventKind::Error => {
                let event: ErrorEventJson = serde_json::from_str(json).map_err(drop)?;
                reading.error_type = event.error.and_then(|e| e.kind);
                reading.saw_error_event = true;
            }
            EventKind::MessageStop => reading.saw_stop = true,
            EventKind::Unnamed | EventKind::ContentBlockDelta | EventKind::Other => {}
        }
        Ok(())
    }
}

impl Reader for SseMeter {
    fn feed(&mut self, bytes: &[u8]) {
        let mut rest = self.skip_bom(bytes);
        if rest.is_empty() {
            return;
        }
        if self.after_cr {
            self.after_cr = false;
            if rest[0] == b'\n' {
                rest = &rest[1..];
            }
        }
        if self.line_state != LineState::Start {
            let Some(end) = memchr2(b'\n', b'\r', rest) else {
                self.continue_line(rest);
                return;
            };
            self.continue_line(&rest[..end]);
            self.end_held_line();
            rest = self.after_line_end(rest, end);
        }
        while let Some(end) = memchr2(b'\n', b'\r', rest) {
            self.read_line(&rest[..end]);
            rest = self.after_line_end(rest, end);
        }
        if !rest.is_empty() {
            self.continue_line(rest);
        }
    }

    fn finish(&mut self) {
        // A BOM prefix left undecided is not a line worth reading.
        self.bom_matched = None;
        self.after_cr = false;
        self.end_held_line();
        self.dispatch();
    }

    fn reading(&self) -> &MeterReading {
        &self.reading
    }

    fn reading_mut(&mut self) -> &mut MeterReading {
        &mut self.reading
    }
}

/// A field's value: what follows the colon, less one leading space.
fn strip_one_space(value: &[u8]) -> &[u8] {
    value.strip_prefix(b" ").unwrap_or(value)
}

/// Bytes in the string value of the first `"text"`, `"partial_json"` or
/// `"thinking"` key of a `content_block_delta`'s data, counted as written
/// (escapes included): close enough for an estimate, and no parse needed.
fn delta_text_len(data: &[u8]) -> usize {
    for key in TEXT_KEYS.iter() {
        let mut from = 0;
        while let Some(at) = key.find(&data[from..]) {
            let after = from + at + key.needle().len();
            if let Some(len) = string_value_len(&data[after..]) {
                return len;
            }
            from = after;
        }
    }
    0
}

/// Given the bytes after a quoted key, the length of its string value if
/// they read `: "…"`. An unterminated string (data split over `data:`
/// lines) counts to the end.
fn string_value_len(after_key: &[u8]) -> Option<usize> {
    let rest = after_key.trim_ascii_start().strip_prefix(b":")?;
    let body = rest.trim_ascii_start().strip_prefix(b"\"")?;
    let mut from = 0;
    while let Some(at) = memchr2(b'"', b'\\', &body[from..]) {
        let pos = from + at;
        if body[pos] == b'"' {
            return Some(pos);
        }
        // Skip the escaped byte, which may be a quote.
        from = pos + 2;
        if from >= body.len() {
            break;
        }
    }
    Some(body.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(chunks: &[&[u8]]) -> SseMeter {
        let mut meter = SseMeter::new();
        for chunk in chunks {
            meter.feed(chunk);
        }
        meter.finish();
        meter
    }

    fn text_len(data: &str) -> usize {
        delta_text_len(data.as_bytes())
    }

    #[test]
    fn text_length_finds_each_delta_kind() {
        assert_eq!(
            text_len(r#"{"delta":{"type":"text_delta","text":"Hello"}}"#),
            5
        );
        assert_eq!(
            text_len(r#"{"delta":{"type":"input_json_delta","partial_json":"{\"a\": 1}"}}"#),
            10
        );
        assert_eq!(
            text_len(r#"{"delta":{"type":"thinking_delta","thinking" : "hmm"}}"#),
            3
        );
        assert_eq!(
            text_len(r#"{"delta":{"type":"signature_delta","signature":"abc"}}"#),
            0
        );
    }

    #[test]
    fn text_length_skips_a_text_that_is_not_a_key() {
        assert_eq!(text_len(r#"{"kind":"text","text":"ab\"c"}"#), 5);
        assert_eq!(text_len(r#"{"text":"unterminated"#), 12);
        assert_eq!(text_len(r#"{"text":"ends in a backslash \"#), 21);
    }

    #[test]
    fn skipped_event_data_is_never_copied() {
        let mut meter = SseMeter::new();
        meter.feed(b"event: content_block_start\ndata: {\"x\":\"");
        let filler = vec![b'a'; 1 << 20];
        for _ in 0..20 {
            meter.feed(&filler);
        }
        meter.feed(b"\"}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
        assert!(meter.line.capacity() < 1 << 10);
        assert!(meter.data.capacity() < 1 << 10);
        assert!(meter.reading().saw_stop);
        assert_eq!(meter.reading().malformed, 0);
    }

    #[test]
    fn oversized_kept_event_is_flagged_once_and_the_stream_goes_on() {
        let mut meter = SseMeter::new();
        meter.feed(b"event: message_delta\ndata: {\"pad\":\"");
        let filler = vec![b'a'; 1 << 20];
        for _ in 0..(MAX_EVENT_BYTES >> 20) + 2 {
            meter.feed(&filler);
        }
        meter.feed(b"\"}\ndata: more\n\n");
        meter.feed(b"event: message_delta\ndata: {\"usage\":{\"output_tokens\":7}}\n\n");
        meter.finish();
        assert_eq!(meter.reading().malformed, 1);
        assert_eq!(meter.reading().usage.output_tokens, 7);
        assert!(meter.line.capacity() <= MAX_EVENT_BYTES);
    }

    #[test]
    fn too_many_data_lines_overflow_the_event() {
        let mut meter = SseMeter::new();
        meter.feed(b"event: message_start\n");
        let line = [b"data: ".as_slice(), &vec![b'x'; 1 << 20], b"\n"].concat();
        for _ in 0..(MAX_EVENT_BYTES >> 20) + 1 {
            meter.feed(&line);
        }
        meter.feed(b"\n");
        meter.finish();
        assert_eq!(meter.reading().malformed, 1);
        assert!(!meter.reading().saw_start);
        assert_eq!(meter.data.capacity(), 0);
    }

    #[test]
    fn bom_split_over_frames_is_stripped() {
        let stream = b"\xEF\xBB\xBFevent: message_stop\ndata: {}\n\n";
        for cut in 0..=4 {
            let meter = read(&[&stream[..cut], &stream[cut..]]);
            assert!(meter.reading().saw_stop, "cut at {cut}");
        }
    }

    #[test]
    fn partial_bom_begins_the_first_line() {
        // An EF byte that is not a BOM makes the first field unknown, so the
        // event keeps no name and is read by its `"type"`.
        let meter = read(&[b"\xEF", b"vent: x\ndata: {\"type\":\"message_stop\"}\n\n"]);
        assert!(meter.reading().saw_stop);
    }

    #[test]
    fn cr_at_frame_end_then_lf_is_one_line_end() {
        let meter = read(&[
            b"event: message_delta\r",
            b"\ndata: {\"usage\":{\"output_tokens\":3}}\r",
            b"\n\r",
            b"\n",
        ]);
        assert_eq!(meter.reading().usage.output_tokens, 3);
        assert!(meter.reading().saw_final_usage);
    }

    #[test]
    fn empty_frames_change_nothing() {
        let meter = read(&[
            b"event: message_stop\r",
            b"",
            b"\ndata: {}",
            b"",
            b"\r\n\r\n",
        ]);
        assert!(meter.reading().saw_stop);
        assert_eq!(meter.reading().malformed, 0);
    }

    #[test]
    fn event_without_data_is_not_dispatched() {
        let meter = read(&[b"event: message_stop\n\n"]);
        assert!(!meter.reading().saw_stop);
    }

    #[test]
    fn finish_twice_dispatches_once() {
        let mut meter = SseMeter::new();
        meter.feed(b"event: message_delta\ndata: {oops");
        meter.finish();
        meter.finish();
        assert_eq!(meter.reading().malformed, 1);
    }
}
