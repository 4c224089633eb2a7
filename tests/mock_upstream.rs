//! The mock upstream, exercised over real HTTP/1.1, h2 and TLS on port 0.

// Test helpers are not `#[test]` functions, so clippy's test exemption does
// not reach them; a failed unwrap here is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connect, HttpConnector};
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tollgate::mock_upstream::{MockOptions, MockServer, MockStats, start};
use tollgate::secret::Secret;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sse")
}

async fn mock() -> MockServer {
    start(MockOptions::default()).await.unwrap()
}

async fn mock_with(opts: MockOptions) -> MockServer {
    start(opts).await.unwrap()
}

fn http1() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn h2c() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A request body of the Messages API.
fn message_body(stream: bool) -> String {
    json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "stream": stream,
        "messages": [{"role": "user", "content": "Hello, mock."}],
    })
    .to_string()
}

fn expected_input_tokens(body: &str) -> u64 {
    (body.len() as u64).div_ceil(4)
}

fn post(
    server: &MockServer,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Request<Full<Bytes>> {
    let mut builder = Request::post(format!("{}{path}", server.url()))
        .header("x-api-key", "sk-test")
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

fn get(server: &MockServer, path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("{}{path}", server.url()))
        .header("x-api-key", "sk-test")
        .body(Full::default())
        .unwrap()
}

async fn send<C>(
    client: &Client<C, Full<Bytes>>,
    request: Request<Full<Bytes>>,
) -> Response<Incoming>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    client.request(request).await.unwrap()
}

async fn body_of(response: Response<Incoming>) -> Bytes {
    response.into_body().collect().await.unwrap().to_bytes()
}

async fn json_of(response: Response<Incoming>) -> Value {
    serde_json::from_slice(&body_of(response).await).unwrap()
}

/// One parsed SSE event.
#[derive(Debug)]
struct Event {
    name: String,
    data: Value,
    comments: Vec<String>,
}

fn parse_sse(bytes: &[u8]) -> Vec<Event> {
    let text = std::str::from_utf8(bytes).unwrap();
    text.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let mut event = Event {
                name: String::new(),
                data: Value::Null,
                comments: Vec::new(),
            };
            for line in block.lines() {
                if let Some(name) = line.strip_prefix("event: ") {
                    event.name = name.to_owned();
                } else if let Some(data) = line.strip_prefix("data: ") {
                    event.data = serde_json::from_str(data).unwrap();
                } else if let Some(comment) = line.strip_prefix(':') {
                    event.comments.push(comment.trim().to_owned());
                }
            }
            event
        })
        .collect()
}

fn names(events: &[Event]) -> Vec<&str> {
    events.iter().map(|e| e.name.as_str()).collect()
}

fn synth_names(deltas: usize) -> Vec<&'static str> {
    let mut names = vec!["message_start", "content_block_start", "ping"];
    names.extend(std::iter::repeat_n("content_block_delta", deltas));
    names.extend(["content_block_stop", "message_delta", "message_stop"]);
    names
}

fn header<'r>(response: &'r Response<Incoming>, name: &str) -> &'r str {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
}

/// Asserts an Anthropic-shaped error with the given status and type, whose
/// `request_id` matches the `request-id` header.
async fn assert_error(response: Response<Incoming>, status: u16, error_type: &str) -> Value {
    assert_eq!(response.status(), status);
    let request_id = header(&response, "request-id").to_owned();
    assert!(request_id.starts_with("req_mock_"), "{request_id}");
    let body = json_of(response).await;
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], error_type, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    assert_eq!(body["request_id"], request_id.as_str());
    body
}

/// Reads the next data frame, or `None` if nothing arrives within `wait`.
async fn next_frame(body: &mut Incoming, wait: Duration) -> Option<Result<Bytes, hyper::Error>> {
    match tokio::time::timeout(wait, body.frame()).await {
        Err(_) => None,
        Ok(None) => panic!("body ended"),
        Ok(Some(Ok(frame))) => Some(Ok(frame.into_data().unwrap_or_default())),
        Ok(Some(Err(e))) => Some(Err(e)),
    }
}

/// Polls the stats until `check` holds (the body's end is recorded by the
/// server's connection task, a moment after the client saw it).
async fn wait_for_stats(server: &MockServer, check: impl Fn(&MockStats) -> bool) -> MockStats {
    for _ in 0..200 {
        let stats = server.stats();
        if check(&stats) {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("stats never matched: {:?}", server.stats());
}

#[tokio::test]
async fn streams_a_synthesised_message_in_order() {
    let server = mock().await;
    let body = message_body(true);
    let response = send(
        &http1(),
        post(
            &server,
            "/v1/messages",
            &body,
            &[("x-mock-output-tokens", "5")],
        ),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        header(&response, "content-type"),
        "text/event-stream; charset=utf-8"
    );
    assert_eq!(header(&response, "cache-control"), "no-cache");
    assert!(header(&response, "request-id").starts_with("req_mock_"));
    let input = expected_input_tokens(&body);
    assert_eq!(
        header(&response, "x-mock-usage"),
        format!("input={input},output=5,cache_write=0,cache_read=0")
    );
    let events = parse_sse(&body_of(response).await);
    assert_eq!(names(&events), synth_names(5));
    for event in &events {
        assert_eq!(event.data["type"], event.name.as_str());
    }

    let message = &events[0].data["message"];
    assert_eq!(message["model"], "claude-sonnet-4-5");
    assert!(message["id"].as_str().unwrap().starts_with("msg_mock_"));
    assert_eq!(message["usage"]["input_tokens"], input);
    assert_eq!(message["usage"]["output_tokens"], 1);
    assert_eq!(message["usage"]["cache_creation_input_tokens"], 0);
    assert_eq!(events[1].data["content_block"]["type"], "text");
    for delta in &events[3..8] {
        let text = delta.data["delta"]["text"].as_str().unwrap();
        assert_eq!(text.len(), 4, "one four-byte word per token");
    }
    let final_delta = &events[9].data;
    assert_eq!(final_delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(final_delta["usage"]["output_tokens"], 5);
    assert_eq!(final_delta["usage"]["input_tokens"], input);
}

#[tokio::test]
async fn caps_output_at_max_tokens() {
    let server = mock().await;
    let body = json!({"model": "m", "max_tokens": 3, "stream": true, "messages": []}).to_string();
    let response = send(
        &http1(),
        post(
            &server,
            "/v1/messages",
            &body,
            &[("x-mock-output-tokens", "50")],
        ),
    )
    .await;
    let events = parse_sse(&body_of(response).await);
    assert_eq!(names(&events), synth_names(3));
    assert_eq!(events[7].data["delta"]["stop_reason"], "max_tokens");
    assert_eq!(events[7].data["usage"]["output_tokens"], 3);
}

#[tokio::test]
async fn reports_cache_and_input_growth() {
    let server = mock().await;
    let body = message_body(true);
    let headers = [
        ("x-mock-output-tokens", "2"),
        ("x-mock-cache", "write=100,read=200,write_1h=50"),
        ("x-mock-input-growth", "9"),
        ("x-mock-web-searches", "2"),
    ];
    let response = send(&http1(), post(&server, "/v1/messages", &body, &headers)).await;
    let input = expected_input_tokens(&body);
    assert_eq!(
        header(&response, "x-mock-usage"),
        format!(
            "input={},output=2,cache_write=150,cache_read=200",
            input + 9
        )
    );
    let events = parse_sse(&body_of(response).await);
    let start = &events[0].data["message"]["usage"];
    assert_eq!(start["input_tokens"], input);
    assert_eq!(start["cache_creation_input_tokens"], 150);
    assert_eq!(start["cache_read_input_tokens"], 200);
    assert_eq!(start["cache_creation"]["ephemeral_5m_input_tokens"], 100);
    assert_eq!(start["cache_creation"]["ephemeral_1h_input_tokens"], 50);
    let end = &events[6].data["usage"];
    assert_eq!(end["input_tokens"], input + 9);
    assert_eq!(end["cache_creation_input_tokens"], 150);
    assert_eq!(end["cache_read_input_tokens"], 200);
    assert_eq!(end["server_tool_use"]["web_search_requests"], 2);
}

#[tokio::test]
async fn calls_a_tool_when_the_request_has_tools() {
    let server = mock().await;
    let body = json!({
        "model": "claude-opus-4-1", "max_tokens": 100, "stream": true,
        "messages": [{"role": "user", "content": "weather?"}],
        "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
    })
    .to_string();
    let response = send(
        &http1(),
        post(
            &server,
            "/v1/messages",
            &body,
            &[("x-mock-output-tokens", "6")],
        ),
    )
    .await;
    let events = parse_sse(&body_of(response).await);
    assert_eq!(names(&events), synth_names(6));
    let block = &events[1].data["content_block"];
    assert_eq!(block["type"], "tool_use");
    assert_eq!(block["name"], "get_weather");
    assert!(block["id"].as_str().unwrap().starts_with("toolu_mock_"));
    let arguments: String = events[3..9]
        .iter()
        .map(|e| {
            assert_eq!(e.data["delta"]["type"], "input_json_delta");
            e.data["delta"]["partial_json"].as_str().unwrap().to_owned()
        })
        .collect();
    let input: Value = serde_json::from_str(&arguments).unwrap();
    assert_eq!(input["text"].as_str().unwrap().len(), 24);
    assert_eq!(events[10].data["delta"]["stop_reason"], "tool_use");
}

#[tokio::test]
async fn answers_json_and_gzipped_json() {
    let server = mock().await;
    let body = message_body(false);
    let client = http1();
    let plain = send(
        &client,
        post(
            &server,
            "/v1/messages",
            &body,
            &[("x-mock-output-tokens", "4")],
        ),
    )
    .await;
    assert_eq!(header(&plain, "content-type"), "application/json");
    assert!(plain.headers().get("content-encoding").is_none());
    let usage_header = header(&plain, "x-mock-usage").to_owned();
    let plain = json_of(plain).await;
    assert_eq!(plain["type"], "message");
    assert_eq!(plain["role"], "assistant");
    assert_eq!(plain["model"], "claude-sonnet-4-5");
    assert_eq!(plain["stop_reason"], "end_turn");
    assert_eq!(plain["content"][0]["text"].as_str().unwrap().len(), 16);
    assert_eq!(plain["usage"]["input_tokens"], expected_input_tokens(&body));
    assert_eq!(plain["usage"]["output_tokens"], 4);
    assert_eq!(
        usage_header,
        format!(
            "input={},output=4,cache_write=0,cache_read=0",
            expected_input_tokens(&body)
        )
    );

    let headers = [("x-mock-output-tokens", "4"), ("x-mock-gzip", "1")];
    let zipped = send(&client, post(&server, "/v1/messages", &body, &headers)).await;
    assert_eq!(header(&zipped, "content-encoding"), "gzip");
    let raw = body_of(zipped).await;
    let mut text = String::new();
    flate2::read::GzDecoder::new(&raw[..])
        .read_to_string(&mut text)
        .unwrap();
    let unzipped: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(unzipped["content"], plain["content"]);
    assert_eq!(unzipped["usage"], plain["usage"]);
    assert_ne!(unzipped["id"], plain["id"], "every message has its own id");
}

#[tokio::test]
async fn counts_tokens_and_lists_models() {
    let server = mock().await;
    let client = http1();
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let response = send(
        &client,
        post(&server, "/v1/messages/count_tokens", &body, &[]),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        json_of(response).await,
        json!({"input_tokens": expected_input_tokens(&body)})
    );

    let response = send(&client, get(&server, "/v1/models")).await;
    assert_eq!(response.status(), 200);
    let list = json_of(response).await;
    let models = list["data"].as_array().unwrap();
    assert!(models.len() >= 2);
    assert!(
        models
            .iter()
            .all(|m| m["type"] == "model" && m["id"].as_str().unwrap().starts_with("claude-"))
    );
    assert_eq!(list["has_more"], false);
    assert_eq!(list["first_id"], models[0]["id"]);
}

#[tokio::test]
async fn unknown_routes_are_not_found() {
    let server = mock().await;
    let client = http1();
    assert_error(
        send(&client, get(&server, "/v1/nope")).await,
        404,
        "not_found_error",
    )
    .await;
    assert_error(
        send(&client, get(&server, "/v1/messages")).await,
        404,
        "not_found_error",
    )
    .await;
    let body = message_body(false);
    assert_error(
        send(&client, post(&server, "/v1/complete?beta=true", &body, &[])).await,
        404,
        "not_found_error",
    )
    .await;
}

#[tokio::test]
async fn requires_an_api_key() {
    let server = mock_with(MockOptions {
        api_key: Some(Secret::new("sk-right".into())),
        ..MockOptions::default()
    })
    .await;
    let client = http1();
    let body = message_body(false);
    let bare = Request::post(format!("{}/v1/messages", server.url()))
        .body(Full::new(Bytes::from(body.clone())))
        .unwrap();
    assert_error(send(&client, bare).await, 401, "authentication_error").await;

    // `post` sends x-api-key: sk-test, which this mock does not accept.
    assert_error(
        send(&client, post(&server, "/v1/messages", &body, &[])).await,
        401,
        "authentication_error",
    )
    .await;

    for (name, value) in [
        ("x-api-key", "sk-right"),
        ("authorization", "Bearer sk-right"),
    ] {
        let request = Request::post(format!("{}/v1/messages", server.url()))
            .header(name, value)
            .body(Full::new(Bytes::from(body.clone())))
            .unwrap();
        assert_eq!(send(&client, request).await.status(), 200, "{name}");
    }

    // Without a configured key, any non-empty bearer token is accepted.
    let open = mock().await;
    let request = Request::post(format!("{}/v1/messages", open.url()))
        .header("authorization", "Bearer anything")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    assert_eq!(send(&client, request).await.status(), 200);
}

#[tokio::test]
async fn rejects_invalid_requests() {
    let server = mock().await;
    let client = http1();
    let cases = [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "JSON object"),
        (r#"{"max_tokens": 10, "messages": []}"#, "model"),
        (r#"{"model": "m", "messages": []}"#, "max_tokens"),
        (
            r#"{"model": "m", "max_tokens": 0, "messages": []}"#,
            "max_tokens",
        ),
        (r#"{"model": "m", "max_tokens": 10}"#, "messages"),
        (
            r#"{"model": "m", "max_tokens": 10, "messages": [], "stream": "yes"}"#,
            "stream",
        ),
    ];
    for (body, mentions) in cases {
        let response = send(&client, post(&server, "/v1/messages", body, &[])).await;
        let error = assert_error(response, 400, "invalid_request_error").await;
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(mentions), "{body}: {message}");
    }
    let body = message_body(true);
    for (name, value) in [
        ("x-mock-fault", "explode=1"),
        ("x-mock-output-tokens", "lots"),
        ("x-mock-fixture", "no_such_fixture"),
        ("x-mock-fail-times", "2"),
    ] {
        let response = send(
            &client,
            post(&server, "/v1/messages", &body, &[(name, value)]),
        )
        .await;
        let error = assert_error(response, 400, "invalid_request_error").await;
        assert!(
            error["error"]["message"].as_str().unwrap().contains(name),
            "{error}"
        );
    }
    let body = message_body(false);
    let response = send(
        &client,
        post(
            &server,
            "/v1/messages",
            &body,
            &[("x-mock-fault", "error-after=2")],
        ),
    )
    .await;
    assert_error(response, 400, "invalid_request_error").await;
}

#[tokio::test]
async fn injects_error_statuses() {
    let server = mock().await;
    let client = http1();
    let body = message_body(true);

    let response = send(
        &client,
        post(
            &server,
            "/v1/messages",
            &body,
            &[("x-mock-fault", "status=429;retry-after=2")],
        ),
    )
    .await;
    assert_eq!(header(&response, "retry-after"), "2");
    assert_eq!(header(&response, "retry-after-ms"), "2000");
    assert_error(response, 429, "rate_limit_error").await;

    let response = send(
        &client,
        post(
            &server,
            "/v1/messages",
            &body,
            &[("x-mock-fault", "status=429;retry-after=0.25")],
        ),
    )
    .await;
    assert_eq!(header(&response, "retry-after"), "1");
    assert_eq!(header(&response, "retry-after-ms"), "250");

    let response = send(
        &client,
        post(
            &server,
            "/v1/messages",
            &body,
            &[("x-mock-fault", "status=529")],
        ),
    )
    .await;
    assert!(response.headers().get("retry-after").is_none());
    assert_error(response, 529, "overloaded_error").await;

    let response = send(
        &client,
        post(
            &server,
            "/v1/messages",
            &body,
            &[("x-mock-fault", "status=500")],
        ),
    )
    .await;
    assert_error(response, 500, "api_error").await;

    let count = json!({"model": "m", "messages": []}).to_string();
    let response = send(
        &client,
        post(
            &server,
            "/v1/messages/count_tokens",
            &count,
            &[("x-mock-fault", "status=503")],
        ),
    )
    .await;
    assert_error(response, 503, "api_error").await;
}

#[tokio::test]
async fn reset_after_breaks_the_body_over_http1_and_h2() {
    let server = mock().await;
    let body = message_body(true);
    for client in [http1(), h2c()] {
        let headers = [
            ("x-mock-fault", "reset-after=3"),
            ("x-mock-output-tokens", "10"),
        ];
        let response = send(&client, post(&server, "/v1/messages", &body, &headers)).await;
        assert_eq!(response.status(), 200);
        let mut incoming = response.into_body();
        let mut received = Vec::new();
        let error = loop {
            match incoming.frame().await {
                Some(Ok(frame)) => {
                    received.extend_from_slice(&frame.into_data().unwrap_or_default())
                }
                Some(Err(e)) => break e,
                None => panic!("the body ended cleanly; it must break"),
            }
        };
        assert_eq!(
            names(&parse_sse(&received)),
            ["message_start", "content_block_start", "ping"],
            "{error}"
        );
    }

    // A JSON body breaks after the given number of bytes.
    let body = message_body(false);
    let response = send(
        &http1(),
        post(
            &server,
            "/v1/messages",
            &body,
            &[("x-mock-fault", "reset-after=10")],
        ),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert!(response.into_body().collect().await.is_err());

    let stats = wait_for_stats(&server, |s| s.bodies_cut == 3).await;
    assert_eq!(
        stats.output_tokens, 0,
        "cut bodies never emitted their final usage"
    );
    assert_eq!(stats.faults_injected, 3);
}

#[tokio::test]
async fn error_after_ends_with_an_error_event() {
    let server = mock().await;
    let body = message_body(true);
    let headers = [
        ("x-mock-fault", "error-after=4"),
        ("x-mock-output-tokens", "10"),
    ];
    let response = send(&http1(), post(&server, "/v1/messages", &body, &headers)).await;
    let events = parse_sse(&body_of(response).await);
    assert_eq!(
        names(&events),
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "error"
        ]
    );
    assert_eq!(events[4].data["error"]["type"], "overloaded_error");
}

#[tokio::test]
async fn slow_first_byte_delays_the_headers() {
    let server = mock().await;
    let body = message_body(true);
    let started = Instant::now();
    let response = send(
        &http1(),
        post(
            &server,
            "/v1/messages",
            &body,
            &[("x-mock-fault", "slow-first-byte=300")],
        ),
    )
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(response.status(), 200);
    assert_eq!(
        parse_sse(&body_of(response).await).len(),
        synth_names(16).len()
    );
}

#[tokio::test]
async fn stall_after_holds_the_stream_open() {
    let server = mock().await;
    let body = message_body(true);
    let response = send(
        &http1(),
        post(
            &server,
            "/v1/messages",
            &body,
            &[("x-mock-fault", "stall-after=2")],
        ),
    )
    .await;
    let mut incoming = response.into_body();
    let mut received = Vec::new();
    while let Some(frame) = next_frame(&mut incoming, Duration::from_millis(500)).await {
        received.extend_from_slice(&frame.unwrap());
    }
    assert_eq!(
        names(&parse_sse(&received)),
        ["message_start", "content_block_start"]
    );
    // The client going away ends the stall.
    drop(incoming);
    wait_for_stats(&server, |s| s.bodies_abandoned == 1).await;

    // A stall that outlasts --max-stall is aborted.
    let short = mock_with(MockOptions {
        max_stall: Duration::from_millis(100),
        ..MockOptions::default()
    })
    .await;
    let response = send(
        &http1(),
        post(
            &short,
            "/v1/messages",
            &body,
            &[("x-mock-fault", "stall-after=1")],
        ),
    )
    .await;
    let started = Instant::now();
    assert!(response.into_body().collect().await.is_err());
    assert!(started.elapsed() >= Duration::from_millis(90));
    wait_for_stats(&short, |s| s.bodies_cut == 1).await;
}

#[tokio::test]
async fn fail_times_applies_the_fault_to_the_first_requests_only() {
    let server = mock().await;
    let client = http1();
    let body = message_body(false);
    let request = |key: &'static str| {
        post(
            &server,
            "/v1/messages",
            &body,
            &[
                ("x-mock-fault", "status=529"),
                ("x-mock-fail-times", "2"),
                ("x-mock-fault-key", key),
            ],
        )
    };
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(send(&client, request("retry-test")).await.status());
    }
    let overloaded = StatusCode::from_u16(529).unwrap();
    assert_eq!(
        statuses,
        [overloaded, overloaded, StatusCode::OK, StatusCode::OK]
    );
    assert_eq!(
        send(&client, request("other-key")).await.status(),
        overloaded
    );
    assert_eq!(server.stats().faults_injected, 3);
}

#[tokio::test]
async fn replays_fixtures_byte_for_byte() {
    let server = mock_with(MockOptions {
        fixtures: Some(fixtures_dir()),
        event_delay: Duration::from_millis(2),
        ..MockOptions::default()
    })
    .await;
    let body = message_body(true);
    let mut replayed = 0;
    for entry in std::fs::read_dir(fixtures_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "sse") {
            continue;
        }
        let name = path.file_stem().unwrap().to_str().unwrap();
        let response = send(
            &http1(),
            post(&server, "/v1/messages", &body, &[("x-mock-fixture", name)]),
        )
        .await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            body_of(response).await,
            std::fs::read(&path).unwrap(),
            "{name}"
        );
        replayed += 1;
    }
    assert!(replayed >= 5);

    // Usage as tests/fixtures/sse/README.md gives it.
    let response = send(
        &http1(),
        post(
            &server,
            "/v1/messages",
            &body,
            &[("x-mock-fixture", "basic_response")],
        ),
    )
    .await;
    assert_eq!(
        header(&response, "x-mock-usage"),
        "input=11,output=6,cache_write=0,cache_read=0"
    );
    let response = send(
        &http1(),
        post(
            &server,
            "/v1/messages",
            &body,
            &[("x-mock-fixture", "incomplete_partial_json_response")],
        ),
    )
    .await;
    assert_eq!(
        header(&response, "x-mock-usage"),
        "input=450,output=124,cache_write=0,cache_read=0"
    );
}

#[tokio::test]
async fn fixture_events_arrive_one_frame_each() {
    let server = mock_with(MockOptions {
        fixtures: Some(fixtures_dir()),
        ..MockOptions::default()
    })
    .await;
    let body = message_body(true);
    let headers = [
        ("x-mock-fixture", "refusal_response"),
        ("x-mock-event-delay-ms", "30"),
    ];
    let response = send(&http1(), post(&server, "/v1/messages", &body, &headers)).await;
    let mut incoming = response.into_body();
    let mut frames = Vec::new();
    while let Some(frame) = incoming.frame().await {
        frames.push(frame.unwrap().into_data().unwrap());
    }
    let file = std::fs::read(fixtures_dir().join("refusal_response.sse")).unwrap();
    assert_eq!(frames.concat(), file);
    assert_eq!(frames.len(), parse_sse(&file).len(), "one frame per event");
    assert!(
        frames[..frames.len() - 1]
            .iter()
            .all(|f| f.ends_with(b"\n\n"))
    );
}

#[tokio::test]
async fn fixture_as_json_message() {
    let server = mock_with(MockOptions {
        fixtures: Some(fixtures_dir()),
        ..MockOptions::default()
    })
    .await;
    let body = message_body(false);
    let response = send(
        &http1(),
        post(
            &server,
            "/v1/messages",
            &body,
            &[("x-mock-fixture", "tool_use_response")],
        ),
    )
    .await;
    assert_eq!(
        header(&response, "x-mock-usage"),
        "input=377,output=65,cache_write=0,cache_read=0"
    );
    let message = json_of(response).await;
    assert_eq!(message["id"], "msg_019Q1hrJbZG26Fb9BQhrkHEr");
    assert_eq!(message["stop_reason"], "tool_use");
    assert_eq!(
        message["content"][0]["text"],
        "I'll check the current weather in Paris for you."
    );
    assert_eq!(message["content"][1]["name"], "get_weather");
    assert_eq!(message["content"][1]["input"], json!({"location": "Paris"}));
    assert_eq!(message["usage"]["input_tokens"], 377);
    assert_eq!(message["usage"]["output_tokens"], 65);
    assert_eq!(server.stats().output_tokens, 65);
}

#[tokio::test]
async fn stamps_events_with_the_send_time() {
    let server = mock().await;
    let body = message_body(true);
    let headers = [("x-mock-stamp", "1"), ("x-mock-output-tokens", "3")];
    let response = send(&http1(), post(&server, "/v1/messages", &body, &headers)).await;
    let events = parse_sse(&body_of(response).await);
    assert_eq!(names(&events), synth_names(3));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    for event in &events {
        assert_eq!(event.comments.len(), 1, "{event:?}");
        let stamp: u128 = event.comments[0]
            .strip_prefix("ts=")
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            stamp <= now && now - stamp < 60_000_000_000,
            "{stamp} vs {now}"
        );
    }

    // Off by default.
    let response = send(&http1(), post(&server, "/v1/messages", &body, &[])).await;
    assert!(
        parse_sse(&body_of(response).await)
            .iter()
            .all(|e| e.comments.is_empty())
    );
}

#[tokio::test]
async fn delays_between_events() {
    let server = mock_with(MockOptions {
        event_delay: Duration::from_millis(100),
        ..MockOptions::default()
    })
    .await;
    let body = message_body(true);
    // No output tokens: six events, five gaps of the default delay.
    let started = Instant::now();
    let response = send(
        &http1(),
        post(
            &server,
            "/v1/messages",
            &body,
            &[("x-mock-output-tokens", "0")],
        ),
    )
    .await;
    assert_eq!(parse_sse(&body_of(response).await).len(), 6);
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );

    // The header overrides the default.
    let started = Instant::now();
    let headers = [
        ("x-mock-output-tokens", "0"),
        ("x-mock-event-delay-ms", "0"),
    ];
    let response = send(&http1(), post(&server, "/v1/messages", &body, &headers)).await;
    body_of(response).await;
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
}

fn https_client(
    ca_pem: &[u8],
    h2: bool,
) -> Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &ca_pem[..]) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only();
    let connector = if h2 {
        builder.enable_all_versions().build()
    } else {
        builder.enable_http1().build()
    };
    Client::builder(TokioExecutor::new()).build(connector)
}

#[tokio::test]
async fn serves_https_with_the_written_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca_out = dir.path().join("ca.pem");
    let server = mock_with(MockOptions {
        tls: true,
        ca_out: Some(ca_out.clone()),
        ..MockOptions::default()
    })
    .await;
    assert!(server.url().starts_with("https://localhost:"));
    assert_eq!(server.ca_path(), Some(ca_out.as_path()));
    let written = std::fs::read(&ca_out).unwrap();
    assert_eq!(written, server.ca_pem().unwrap().as_bytes());

    let body = message_body(true);
    for (h2, version) in [(true, Version::HTTP_2), (false, Version::HTTP_11)] {
        let client = https_client(&written, h2);
        let response = send(
            &client,
            post(
                &server,
                "/v1/messages",
                &body,
                &[("x-mock-output-tokens", "3")],
            ),
        )
        .await;
        assert_eq!(response.version(), version);
        assert_eq!(names(&parse_sse(&body_of(response).await)), synth_names(3));
    }

    // A client that does not trust the CA is refused.
    let untrusted = https_client(b"", false);
    assert!(
        untrusted
            .request(post(&server, "/v1/messages", &body, &[]))
            .await
            .is_err()
    );

    // Without --ca-out the CA goes to a temporary file, removed with the server.
    let server = mock_with(MockOptions {
        tls: true,
        ..MockOptions::default()
    })
    .await;
    let temporary = server.ca_path().unwrap().to_owned();
    assert!(temporary.exists());
    server.shutdown().await;
    assert!(!temporary.exists());
}

#[tokio::test]
async fn stats_total_what_was_emitted() {
    let server = mock().await;
    let client = http1();
    let stream = message_body(true);
    let json_body = message_body(false);
    let input = expected_input_tokens(&stream);
    let json_input = expected_input_tokens(&json_body);

    let headers = [
        ("x-mock-output-tokens", "7"),
        ("x-mock-cache", "write=10,read=20,write_1h=5"),
    ];
    body_of(send(&client, post(&server, "/v1/messages", &stream, &headers)).await).await;
    let headers = [("x-mock-output-tokens", "3"), ("x-mock-input-growth", "4")];
    body_of(send(&client, post(&server, "/v1/messages", &json_body, &headers)).await).await;
    // Cut before the final message_delta: no tokens count.
    let headers = [("x-mock-fault", "error-after=5")];
    body_of(send(&client, post(&server, "/v1/messages", &stream, &headers)).await).await;
    let count = json!({"model": "m", "messages": []}).to_string();
    body_of(
        send(
            &client,
            post(&server, "/v1/messages/count_tokens", &count, &[]),
        )
        .await,
    )
    .await;
    body_of(send(&client, get(&server, "/v1/nothing")).await).await;

    let stats = wait_for_stats(&server, |s| s.bodies_completed + s.bodies_cut == 3).await;
    let expected = MockStats {
        requests: 5,
        messages_streamed: 2,
        messages_json: 1,
        count_tokens: 1,
        models: 0,
        error_responses: 1,
        faults_injected: 1,
        bodies_completed: 2,
        bodies_cut: 1,
        bodies_abandoned: 0,
        input_tokens: input + json_input + 4,
        output_tokens: 7 + 3,
        cache_write_tokens: 15,
        cache_read_tokens: 20,
    };
    assert_eq!(stats, expected);

    // The same totals over HTTP, no key needed; that request counts too.
    let request = Request::get(format!("{}/mock/stats", server.url()))
        .body(Full::default())
        .unwrap();
    let over_http: MockStats =
        serde_json::from_slice(&body_of(send(&client, request).await).await).unwrap();
    assert_eq!(
        over_http,
        MockStats {
            requests: 6,
            ..expected
        }
    );
}

#[tokio::test]
async fn survives_garbage_and_keeps_serving() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = mock().await;
    for junk in [
        &b"\x00\x01\x02 not http at all\r\n\r\n"[..],
        b"POST /v1/messages HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff",
    ] {
        let mut stream = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
        stream.write_all(junk).await.unwrap();
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut sink)).await;
    }
    // Header values that are not visible ASCII are rejected, not a panic.
    let mut request = post(&server, "/v1/messages", &message_body(true), &[]);
    request.headers_mut().insert(
        "x-mock-output-tokens",
        http::HeaderValue::from_bytes(b"\xfa\xfb").unwrap(),
    );
    assert_error(send(&http1(), request).await, 400, "invalid_request_error").await;
    let response = send(
        &h2c(),
        post(&server, "/v1/messages", &message_body(false), &[]),
    )
    .await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn cli_prints_its_address_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let ca_out = dir.path().join("ca.pem");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args([
            "mock-upstream",
            "--listen",
            "127.0.0.1:0",
            "--tls",
            "--ca-out",
        ])
        .arg(&ca_out)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let field = |key: &str| {
        line.split(' ')
            .find_map(|kv| kv.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {line}"))
            .to_owned()
    };
    let url = field("url=");
    assert_eq!(PathBuf::from(field("ca=")), ca_out);
    assert!(url.starts_with("https://localhost:"), "{line}");

    let client = https_client(&std::fs::read(&ca_out).unwrap(), true);
    let request = Request::get(format!("{url}/v1/models"))
        .header("x-api-key", "k")
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&client, request).await.status(), 200);

    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}
