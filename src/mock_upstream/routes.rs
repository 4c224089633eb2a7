//! The mock's request handling: authentication, routing, the `x-mock-*`
//! controls and faults, body validation, and the responses of each endpoint.
//!
//! Order for every `/v1/...` request, as the real API would see it:
//! authenticate → route → read the controls → read the body → apply faults
//! (slow first byte, injected status) → validate → answer.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::body::{MockBody, Pacing, Pieces};
use super::controls::{Controls, Defaults};
use super::faults::{Cut, CutKind, FailTimes, FaultPlan};
use super::fixtures::Fixture;
use super::stats::{MockUsage, Served, StatsCounters};
use super::synth::{SynthPlan, Templates};
use crate::secret::Secret;

/// Largest request body read; the real API's limit for the Messages API.
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

const SSE_CONTENT_TYPE: &str = "text/event-stream; charset=utf-8";
const JSON_CONTENT_TYPE: &str = "application/json";

/// Everything the handler shares across requests.
#[derive(Debug)]
pub(crate) struct MockState {
    pub defaults: Defaults,
    /// When set, the only key accepted; otherwise any non-empty key is.
    pub api_key: Option<Secret<String>>,
    pub max_stall: Duration,
    pub templates: Arc<Templates>,
    pub fixtures: HashMap<String, Arc<Fixture>>,
    pub stats: Arc<StatsCounters>,
    pub fail_times: FailTimes,
    models_body: Bytes,
    ids: UniqueIds,
}

impl MockState {
    pub fn new(
        defaults: Defaults,
        api_key: Option<Secret<String>>,
        max_stall: Duration,
        fixtures: HashMap<String, Arc<Fixture>>,
    ) -> MockState {
        MockState {
            defaults,
            api_key,
            max_stall,
            templates: Arc::new(Templates::new()),
            fixtures,
            stats: Arc::new(StatsCounters::default()),
            fail_times: FailTimes::default(),
            models_body: models_body(),
            ids: UniqueIds {
                prefix: rand::random(),
                counter: AtomicU64::new(0),
            },
        }
    }
}

/// Unique id suffixes: a random per-server prefix, so ids from two mocks in
/// one test differ, and a counter.
#[derive(Debug)]
struct UniqueIds {
    prefix: u32,
    counter: AtomicU64,
}

impl UniqueIds {
    fn next(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{:08x}{n:012x}", self.prefix)
    }
}

/// An answer that is an Anthropic-shaped error.
#[derive(Debug)]
struct MockError {
    status: StatusCode,
    error_type: &'static str,
    message: String,
    retry_after: Option<f64>,
}

impl MockError {
    fn new(status: StatusCode, error_type: &'static str, message: impl Into<String>) -> MockError {
        MockError {
            status,
            error_type,
            message: message.into(),
            retry_after: None,
        }
    }

    fn invalid(message: impl Into<String>) -> MockError {
        MockError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    fn into_response(self, request_id: &str) -> Response<MockBody> {
        let body = crate::error::error_body(self.error_type, &self.message, request_id);
        let mut response = plain_response(self.status, JSON_CONTENT_TYPE, MockBody::full(body));
        if let Some(secs) = self.retry_after {
            let headers = response.headers_mut();
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.ceil() as u64));
            headers.insert(
                "retry-after-ms",
                HeaderValue::from((secs * 1000.0).round() as u64),
            );
        }
        response
    }
}

/// The service function: never fails, every answer carries a `request-id`.
pub(crate) async fn handle(
    state: Arc<MockState>,
    request: Request<Incoming>,
) -> Result<Response<MockBody>, Infallible> {
    state.stats.request_received();
    let unique = state.ids.next();
    let request_id = format!("req_mock_{unique}");
    let (mut response, served) = match route(&state, request, &unique).await {
        Ok(answer) => answer,
        Err(error) => (error.into_response(&request_id), Served::Error),
    };
    state.stats.served(served);
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("request-id", value);
    }
    Ok(response)
}

#[derive(Debug, Clone, Copy)]
enum Endpoint {
    Messages,
    CountTokens,
    Models,
}

async fn route(
    state: &MockState,
    request: Request<Incoming>,
    unique: &str,
) -> Result<(Response<MockBody>, Served), MockError> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    if method == Method::GET && path == "/mock/stats" {
        let stats = serde_json::to_vec(&state.stats.snapshot()).unwrap_or_default();
        let body = MockBody::full(Bytes::from(stats));
        return Ok((
            plain_response(StatusCode::OK, JSON_CONTENT_TYPE, body),
            Served::Control,
        ));
    }
    authenticate(state, request.headers())?;
    let endpoint = match (&method, path.as_str()) {
        (&Method::POST, "/v1/messages") => Endpoint::Messages,
        (&Method::POST, "/v1/messages/count_tokens") => Endpoint::CountTokens,
        (&Method::GET, "/v1/models") => Endpoint::Models,
        _ => {
            let message = format!("{method} {path}: not found");
            return Err(MockError::new(
                StatusCode::NOT_FOUND,
                "not_found_error",
                message,
            ));
        }
    };
    let controls =
        Controls::from_headers(request.headers(), &state.defaults).map_err(MockError::invalid)?;
    let body = read_body(request.into_body()).await?;

    let faults = active_faults(state, &controls);
    if let Some(wait) = faults.slow_first_byte {
        tokio::time::sleep(wait).await;
    }
    if let Some(fault) = &faults.status {
        let (error_type, message) = fault.error_type_and_message();
        let mut error = MockError::new(fault.status, error_type, message);
        error.retry_after = fault.retry_after;
        return Err(error);
    }
    match endpoint {
        Endpoint::Messages => messages(state, &controls, faults.cut, &body, unique),
        Endpoint::CountTokens => count_tokens(&body),
        Endpoint::Models => {
            let body = MockBody::full(state.models_body.clone());
            Ok((
                plain_response(StatusCode::OK, JSON_CONTENT_TYPE, body),
                Served::Models,
            ))
        }
    }
}

/// Requests need `x-api-key` or `Authorization: Bearer`, like the real API.
fn authenticate(state: &MockState, headers: &HeaderMap) -> Result<(), MockError> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .or(bearer)
        .map(str::trim)
        .filter(|k| !k.is_empty());
    let unauthorized =
        |message: &str| MockError::new(StatusCode::UNAUTHORIZED, "authentication_error", message);
    match (key, &state.api_key) {
        (None, _) => Err(unauthorized("x-api-key header is required")),
        (Some(key), Some(expected)) if key != expected.expose() => {
            Err(unauthorized("invalid x-api-key"))
        }
        _ => Ok(()),
    }
}

/// The faults that apply to this request, after `x-mock-fail-times`.
fn active_faults(state: &MockState, controls: &Controls) -> FaultPlan {
    if controls.faults.is_empty() {
        return FaultPlan::default();
    }
    if let Some((times, key)) = &controls.fail_times
        && !state.fail_times.should_fail(key, *times)
    {
        return FaultPlan::default();
    }
    state.stats.fault_injected();
    controls.faults.clone()
}

async fn read_body(body: Incoming) -> Result<Bytes, MockError> {
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(MockError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!("request body exceeds {MAX_BODY_BYTES} bytes"),
        )),
        Err(e) => Err(MockError::invalid(format!(
            "could not read the request body: {e}"
        ))),
    }
}

/// Input tokens derived from the request alone: a quarter of its body bytes,
/// rounded up, at least one.
pub(crate) fn input_tokens_for(body: &[u8]) -> u64 {
    (body.len() as u64).div_ceil(4).max(1)
}

/// The fields of a Messages request the mock uses.
struct MessagesRequest {
    model: String,
    max_tokens: u64,
    stream: bool,
    /// The name of the first tool, when `tools` is non-empty.
    tool: Option<String>,
}

fn parse_json_object(body: &[u8]) -> Result<serde_json::Map<String, Value>, MockError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(MockError::invalid("the request body must be a JSON object")),
        Err(e) => Err(MockError::invalid(format!(
            "invalid JSON in the request body: {e}"
        ))),
    }
}

fn required_model(map: &serde_json::Map<String, Value>) -> Result<String, MockError> {
    match map.get("model") {
        Some(Value::String(model)) if !model.is_empty() => Ok(model.clone()),
        Some(_) => Err(MockError::invalid(
            "model: Input should be a non-empty string",
        )),
        None => Err(MockError::invalid("model: Field required")),
    }
}

fn required_messages(map: &serde_json::Map<String, Value>) -> Result<(), MockError> {
    match map.get("messages") {
        Some(Value::Array(_)) => Ok(()),
        Some(_) => Err(MockError::invalid("messages: Input should be a valid list")),
        None => Err(MockError::invalid("messages: Field required")),
    }
}

fn parse_messages_request(body: &[u8]) -> Result<MessagesRequest, MockError> {
    let map = parse_json_object(body)?;
    let model = required_model(&map)?;
    let max_tokens = match map.get("max_tokens") {
        Some(v) => v
            .as_u64()
            .filter(|n| *n >= 1)
            .ok_or_else(|| MockError::invalid("max_tokens: Input should be an integer >= 1"))?,
        None => return Err(MockError::invalid("max_tokens: Field required")),
    };
    required_messages(&map)?;
    let stream = match map.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(MockError::invalid(
                "stream: Input should be a valid boolean",
            ));
        }
    };
    let tool = match map.get("tools") {
        Some(Value::Array(tools)) => tools.first().map(|first| {
            first["name"]
                .as_str()
                .filter(|n| !n.is_empty())
                .unwrap_or("tool")
                .to_owned()
        }),
        None | Some(Value::Null) => None,
        Some(_) => return Err(MockError::invalid("tools: Input should be a valid list")),
    };
    Ok(MessagesRequest {
        model,
        max_tokens,
        stream,
        tool,
    })
}

fn messages(
    state: &MockState,
    controls: &Controls,
    cut: Option<Cut>,
    body: &[u8],
    unique: &str,
) -> Result<(Response<MockBody>, Served), MockError> {
    let request = parse_messages_request(body)?;
    if let Some(name) = &controls.fixture {
        let fixture = state.fixtures.get(name).ok_or_else(|| {
            let mut known: Vec<&str> = state.fixtures.keys().map(String::as_str).collect();
            known.sort_unstable();
            MockError::invalid(format!(
                "x-mock-fixture: no fixture `{name}` (loaded: {})",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ))
        })?;
        let usage = fixture.final_usage;
        return if request.stream {
            let pieces = Pieces::Fixture(fixture.clone());
            Ok(sse_response(state, controls, cut, pieces, usage))
        } else {
            json_message_response(state, controls, cut, fixture.json_message.clone(), usage)
        };
    }

    let capped = controls.output_tokens > request.max_tokens;
    let stop_reason = match (&request.tool, capped) {
        (_, true) => "max_tokens",
        (Some(_), false) => "tool_use",
        (None, false) => "end_turn",
    };
    // Both are bounded by MAX_OUTPUT_TOKENS once the smaller is taken.
    let output_tokens =
        usize::try_from(controls.output_tokens.min(request.max_tokens)).unwrap_or(usize::MAX);
    let plan = SynthPlan {
        unique: unique.to_owned(),
        model: request.model,
        input_tokens: input_tokens_for(body),
        output_tokens,
        stop_reason,
        cache: controls.cache,
        input_growth: controls.input_growth,
        web_searches: controls.web_searches,
        tool: request.tool,
    };
    let usage = plan.final_usage();
    if request.stream {
        let stream = plan.stream(state.templates.clone());
        let usage_at = Some((stream.final_usage_index(), usage));
        Ok(sse_response(
            state,
            controls,
            cut,
            Pieces::Synth(stream),
            usage_at,
        ))
    } else {
        let last = Some((0, usage));
        json_message_response(state, controls, cut, plan.json_message(), last)
    }
}

fn sse_response(
    state: &MockState,
    controls: &Controls,
    cut: Option<Cut>,
    pieces: Pieces,
    final_usage: Option<(usize, MockUsage)>,
) -> (Response<MockBody>, Served) {
    let pacing = Pacing {
        final_usage,
        cut,
        delay: controls.event_delay,
        stamp: controls.stamp,
        error_event: state.templates.overloaded_error.clone(),
        max_stall: state.max_stall,
        stats: state.stats.clone(),
    };
    let body = MockBody::paced(pieces, pacing);
    let mut response = plain_response(StatusCode::OK, SSE_CONTENT_TYPE, body);
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Some((_, usage)) = final_usage {
        headers.insert("x-mock-usage", usage.header_value());
    }
    (response, Served::MessagesStreamed)
}

/// A non-streaming message. `final_usage`'s index is ignored: the usage counts
/// as emitted when the last byte of the body leaves. For this body, a cut
/// counts bytes, not events.
fn json_message_response(
    state: &MockState,
    controls: &Controls,
    cut: Option<Cut>,
    message: Bytes,
    final_usage: Option<(usize, MockUsage)>,
) -> Result<(Response<MockBody>, Served), MockError> {
    if cut.is_some_and(|c| c.kind == CutKind::Error) {
        return Err(MockError::invalid(
            "x-mock-fault: error-after applies to streams only",
        ));
    }
    let body = if controls.gzip {
        gzip(&message)?
    } else {
        message
    };
    let (chunks, cut) = match cut {
        Some(c) if c.after >= body.len() => (vec![body], None),
        Some(c) if c.after == 0 => (vec![body], Some(c)),
        Some(c) => {
            let head = body.slice(..c.after);
            let tail = body.slice(c.after..);
            (
                vec![head, tail],
                Some(Cut {
                    after: 1,
                    kind: c.kind,
                }),
            )
        }
        None => (vec![body], None),
    };
    let last = chunks.len() - 1;
    let usage = final_usage.map(|(_, usage)| usage);
    let pacing = Pacing {
        final_usage: usage.map(|u| (last, u)),
        cut,
        delay: Duration::ZERO,
        stamp: false,
        error_event: Bytes::new(),
        max_stall: state.max_stall,
        stats: state.stats.clone(),
    };
    let body = MockBody::paced(Pieces::Chunks(chunks), pacing);
    let mut response = plain_response(StatusCode::OK, JSON_CONTENT_TYPE, body);
    let headers = response.headers_mut();
    if controls.gzip {
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    if let Some(usage) = usage {
        headers.insert("x-mock-usage", usage.header_value());
    }
    Ok((response, Served::MessagesJson))
}

fn gzip(body: &[u8]) -> Result<Bytes, MockError> {
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 2 + 64),
        flate2::Compression::fast(),
    );
    encoder
        .write_all(body)
        .and_then(|()| encoder.finish())
        .map(Bytes::from)
        .map_err(|e| {
            MockError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                format!("gzip: {e}"),
            )
        })
}

fn count_tokens(body: &[u8]) -> Result<(Response<MockBody>, Served), MockError> {
    let map = parse_json_object(body)?;
    required_model(&map)?;
    required_messages(&map)?;
    let answer = json!({ "input_tokens": input_tokens_for(body) });
    let body = MockBody::full(Bytes::from(answer.to_string()));
    Ok((
        plain_response(StatusCode::OK, JSON_CONTENT_TYPE, body),
        Served::CountTokens,
    ))
}

/// The `GET /v1/models` answer: a short list in the real API's shape.
fn models_body() -> Bytes {
    let models = [
        (
            "claude-opus-4-1-20250805",
            "Claude Opus 4.1",
            "2025-08-05T00:00:00Z",
        ),
        (
            "claude-sonnet-4-5-20250929",
            "Claude Sonnet 4.5",
            "2025-09-29T00:00:00Z",
        ),
        (
            "claude-haiku-4-5-20251001",
            "Claude Haiku 4.5",
            "2025-10-01T00:00:00Z",
        ),
    ];
    let data: Vec<Value> = models
        .iter()
        .map(|(id, name, created)| {
            json!({"type": "model", "id": id, "display_name": name, "created_at": created})
        })
        .collect();
    let list = json!({
        "data": data,
        "has_more": false,
        "first_id": models[0].0,
        "last_id": models[models.len() - 1].0,
    });
    Bytes::from(list.to_string())
}

fn plain_response(
    status: StatusCode,
    content_type: &'static str,
    body: MockBody,
) -> Response<MockBody> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
