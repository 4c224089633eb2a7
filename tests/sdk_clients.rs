//! The official Anthropic SDKs as clients of tollgate: what an application
//! team sees when it sets `ANTHROPIC_BASE_URL` to the gateway.
//!
//! Each test starts the mock upstream over HTTPS (with its own CA) and a
//! gateway in front of it, both on port 0, then runs one scenario of the real
//! Python SDK (`anthropic` 2.14.0) or TypeScript SDK (`@anthropic-ai/sdk`
//! 1.14.0, and 0.137.0 for the `x-api-key` style) as a subprocess. The script
//! prints what the SDK saw; the test finds tollgate's usage record by the
//! `tollgate-request-id` the SDK received and checks that the two agree, and
//! that the SDK behaved (streamed, retried, raised) as against the real API.
//!
//! The SDKs come from `scripts/setup-sdks`. Without them these tests fail (see
//! `support::sdk::Sdk::available` for the opt-out outside CI).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use serde_json::Value;
use tollgate::mock_upstream::{self, MockOptions, MockServer};
use tollgate::record::{Outcome, UsageRecord};
use tollgate::secret::Secret;

use support::gateway::{TestGateway, start_gateway};
use support::sdk::{
    ScenarioRun, Sdk, TEST_API_KEY, UpstreamTap, assert_usage_matches, header, run_scenario,
};

/// The mock upstream (HTTPS, accepting only the test key) and a gateway in
/// front of it with the given extra settings.
struct Stack {
    mock: MockServer,
    gateway: TestGateway,
}

impl Stack {
    async fn start(extra: &[(&str, &str)]) -> Stack {
        let mock = mock_upstream::start(MockOptions {
            tls: true,
            api_key: Some(Secret::new(TEST_API_KEY.to_owned())),
            ..MockOptions::default()
        })
        .await
        .expect("the mock upstream starts");
        let gateway = start_gateway(mock.url(), mock.ca_path(), extra).await;
        Stack { mock, gateway }
    }

    async fn run(&self, sdk: Sdk, scenario: &str) -> ScenarioRun {
        run_scenario(sdk, scenario, &self.gateway.url()).await
    }

    /// The record of the request whose `tollgate-request-id` the SDK saw.
    async fn record_of(&self, run: &ScenarioRun) -> UsageRecord {
        self.gateway
            .sink
            .wait_for_request(&run.tollgate_request_id())
            .await
    }
}

/// Settings for the retry scenarios: tollgate itself does not retry, so the
/// fault reaches the SDK and the SDK's own retry logic is what is tested.
const NO_GATEWAY_RETRIES: &[(&str, &str)] = &[("TOLLGATE__UPSTREAM__MAX_RETRIES", "0")];

/// The text of the first text block of a reported message.
fn first_text(result: &Value) -> &str {
    result["content"][0]["text"].as_str().unwrap_or_default()
}

/// Checks a successful message against its record: usage counter by counter,
/// ids, stop reason, and that the whole response was relayed.
fn assert_completed(run: &ScenarioRun, record: &UsageRecord, stream: bool) {
    let result = run.result();
    assert_usage_matches(&result["usage"], record);
    assert_eq!(record.outcome, Outcome::Completed, "{record:?}");
    assert_eq!(record.status, 200);
    assert_eq!(record.stream, stream, "{record:?}");
    assert!(record.usage_exact, "{record:?}");
    assert_eq!(record.endpoint, "/v1/messages");
    assert_eq!(
        record.message_id.as_deref(),
        result["message_id"].as_str(),
        "{run}"
    );
    assert_eq!(
        record.stop_reason.as_deref(),
        result["stop_reason"].as_str(),
        "{run}"
    );
    assert_eq!(record.model.as_deref(), result["model"].as_str(), "{run}");
    assert_eq!(
        record.upstream_request_id.as_deref(),
        result["headers"]["request-id"].as_str(),
        "the upstream's request-id reached the SDK unchanged; {run}"
    );
}

/// The SDK's view of a stream: every text delta arrived and adds up to the
/// final message's text; the mock sends one delta per output token.
fn assert_streamed_text(run: &ScenarioRun) {
    let result = run.result();
    assert_eq!(
        result["text_stream"].as_str(),
        Some(first_text(result)),
        "{run}"
    );
    assert_eq!(
        result["text_events"], result["usage"]["output_tokens"],
        "{run}"
    );
}

/// The upstream's usage statement (`x-mock-usage`) as the SDK saw it, so the
/// record is also checked against what the mock says it emitted.
fn assert_mock_usage_header(run: &ScenarioRun, record: &UsageRecord) {
    let u = &record.usage;
    let expected = format!(
        "input={},output={},cache_write={},cache_read={}",
        u.input_tokens, u.output_tokens, u.cache_creation_input_tokens, u.cache_read_input_tokens
    );
    assert_eq!(
        run.result()["headers"]["x-mock-usage"].as_str(),
        Some(expected.as_str()),
        "{run}"
    );
}

fn assert_sent(run: &ScenarioRun, version: &str, bearer: bool) {
    let sent = &run.result()["sent"];
    assert_eq!(sent["anthropic-version"], version, "{run}");
    if bearer {
        assert_eq!(sent["authorization-scheme"], "Bearer", "{run}");
        assert_eq!(sent["x-api-key-present"], false, "{run}");
    } else {
        assert_eq!(sent["x-api-key-present"], true, "{run}");
        assert!(sent.get("authorization-scheme").is_none(), "{run}");
    }
}

/// An error the SDK raised: its class (or a base class), status and type.
fn assert_raised(run: &ScenarioRun, class: &str, status: Option<u64>, error_type: &str) {
    let error = run.error();
    let mro: Vec<&str> = error["mro"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        mro.contains(&class),
        "expected the SDK to raise {class}: {run}"
    );
    assert_eq!(
        error["sdk_error"], true,
        "not one of the SDK's own exception classes: {run}"
    );
    assert_eq!(error["status_code"].as_u64(), status, "{run}");
    assert_eq!(error["type"], error_type, "{run}");
}

// --- Python SDK --------------------------------------------------------------

#[tokio::test]
async fn python_stream_usage_equals_record() {
    if !Sdk::Python.available("python_stream_usage_equals_record") {
        return;
    }
    let stack = Stack::start(&[]).await;
    let run = stack.run(Sdk::Python, "stream").await;
    let record = stack.record_of(&run).await;
    assert_completed(&run, &record, true);
    assert_streamed_text(&run);
    assert_mock_usage_header(&run, &record);
    assert!(
        record.usage.cache_creation_input_tokens > 0 && record.usage.cache_read_input_tokens > 0
    );
    assert_sent(&run, "2026-10-21", true);
}

#[tokio::test]
async fn python_async_stream_usage_equals_record() {
    if !Sdk::Python.available("python_async_stream_usage_equals_record") {
        return;
    }
    let stack = Stack::start(&[]).await;
    let run = stack.run(Sdk::Python, "stream_async").await;
    let record = stack.record_of(&run).await;
    assert_completed(&run, &record, true);
    assert_streamed_text(&run);
    assert_mock_usage_header(&run, &record);
}

#[tokio::test]
async fn python_tool_use_stream_usage_equals_record() {
    if !Sdk::Python.available("python_tool_use_stream_usage_equals_record") {
        return;
    }
    let stack = Stack::start(&[]).await;
    let run = stack.run(Sdk::Python, "tool_use").await;
    let record = stack.record_of(&run).await;
    assert_completed(&run, &record, true);
    let result = run.result();
    assert_eq!(result["stop_reason"], "tool_use", "{run}");
    assert_eq!(record.stop_reason.as_deref(), Some("tool_use"));
    let block = &result["content"][0];
    assert_eq!(block["type"], "tool_use", "{run}");
    assert_eq!(block["name"], "get_weather", "{run}");
    assert!(
        block["input"]["text"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{run}"
    );
}

#[tokio::test]
async fn python_create_usage_equals_record() {
    if !Sdk::Python.available("python_create_usage_equals_record") {
        return;
    }
    let stack = Stack::start(&[]).await;
    let run = stack.run(Sdk::Python, "create").await;
    let record = stack.record_of(&run).await;
    assert_completed(&run, &record, false);
    assert_mock_usage_header(&run, &record);
    let result = run.result();
    assert_eq!(result["retries_taken"], 0, "{run}");
    // The SDK's `_request_id` is the upstream's id, relayed unchanged.
    assert_eq!(
        result["sdk_request_id"], result["headers"]["request-id"],
        "{run}"
    );
    assert_sent(&run, "2026-10-21", true);
}

#[tokio::test]
async fn python_x_api_key_auth_works() {
    if !Sdk::Python.available("python_x_api_key_auth_works") {
        return;
    }
    let stack = Stack::start(&[]).await;
    let run = stack.run(Sdk::Python, "create_x_api_key").await;
    assert_sent(&run, "2023-06-01", false);
    let record = stack.record_of(&run).await;
    assert_completed(&run, &record, false);
}

/// A failed first attempt followed by the SDK's successful retry: two client
/// requests, so two records; the failed one carries the upstream's error.
async fn check_sdk_retry(scenario: &str, status: u16, error_type: &str) -> ScenarioRun {
    let stack = Stack::start(NO_GATEWAY_RETRIES).await;
    let run = stack.run(Sdk::Python, scenario).await;
    let result = run.result();
    assert_eq!(result["retries_taken"], 1, "{run}");
    let record = stack.record_of(&run).await;
    assert_completed(&run, &record, false);
    let records = stack.gateway.sink.wait_for(2).await;
    assert_eq!(records.len(), 2, "{records:?}");
    let failed = records
        .iter()
        .find(|r| r.request_id != record.request_id)
        .unwrap();
    assert_eq!(failed.status, status, "{failed:?}");
    assert_eq!(failed.outcome, Outcome::UpstreamError, "{failed:?}");
    assert_eq!(failed.error_type.as_deref(), Some(error_type), "{failed:?}");
    assert_eq!(failed.usage.output_tokens, 0, "{failed:?}");
    assert_eq!(stack.mock.stats().faults_injected, 1);
    run
}

#[tokio::test]
async fn python_retries_429_after_retry_after() {
    if !Sdk::Python.available("python_retries_429_after_retry_after") {
        return;
    }
    let run = check_sdk_retry("retry_429", 429, "rate_limit_error").await;
    // The SDK waited as the relayed `retry-after` (1 s) told it to.
    let elapsed = run.result()["elapsed_s"].as_f64().unwrap();
    assert!(
        elapsed >= 1.0,
        "the SDK retried after {elapsed} s, before retry-after: {run}"
    );
}

#[tokio::test]
async fn python_retries_529_to_success() {
    if !Sdk::Python.available("python_retries_529_to_success") {
        return;
    }
    check_sdk_retry("retry_529", 529, "overloaded_error").await;
}

#[tokio::test]
async fn python_persistent_529_raises_overloaded_error() {
    if !Sdk::Python.available("python_persistent_529_raises_overloaded_error") {
        return;
    }
    let stack = Stack::start(NO_GATEWAY_RETRIES).await;
    let run = stack.run(Sdk::Python, "overloaded_529").await;
    assert_raised(&run, "OverloadedError", Some(529), "overloaded_error");
    assert_eq!(run.error()["class"], "OverloadedError", "{run}");
    let record = stack.record_of(&run).await;
    assert_eq!(record.status, 529, "{record:?}");
    assert_eq!(record.outcome, Outcome::UpstreamError, "{record:?}");
    assert_eq!(
        record.error_type.as_deref(),
        Some("overloaded_error"),
        "{record:?}"
    );
    assert_eq!(
        record.upstream_request_id.as_deref(),
        run.error()["request_id"].as_str()
    );
}

#[tokio::test]
async fn python_bad_request_raises_bad_request_error() {
    if !Sdk::Python.available("python_bad_request_raises_bad_request_error") {
        return;
    }
    let stack = Stack::start(&[]).await;
    let run = stack.run(Sdk::Python, "bad_request").await;
    assert_raised(&run, "BadRequestError", Some(400), "invalid_request_error");
    assert_eq!(run.error()["class"], "BadRequestError", "{run}");
    let record = stack.record_of(&run).await;
    assert_eq!(record.status, 400, "{record:?}");
    assert_eq!(record.outcome, Outcome::UpstreamError, "{record:?}");
    assert_eq!(
        record.error_type.as_deref(),
        Some("invalid_request_error"),
        "{record:?}"
    );
    assert_eq!(
        record.usage.input_tokens + record.usage.output_tokens,
        0,
        "{record:?}"
    );
    // A 400 is not retried: one request only.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(stack.gateway.sink.all().len(), 1);
}

/// What the SDK saw of a stream before it raised.
fn partial(run: &ScenarioRun) -> (u64, u64) {
    let partial = &run.report["partial"];
    let input = partial["input_tokens_at_start"]
        .as_u64()
        .unwrap_or_else(|| panic!("{run}"));
    let texts = partial["text_events"]
        .as_u64()
        .unwrap_or_else(|| panic!("{run}"));
    (input, texts)
}

#[tokio::test]
async fn python_in_stream_error_raises_and_is_recorded() {
    if !Sdk::Python.available("python_in_stream_error_raises_and_is_recorded") {
        return;
    }
    let stack = Stack::start(&[]).await;
    let run = stack.run(Sdk::Python, "stream_error").await;
    // SDK 2.14.0 turns an SSE `error` event into `APIStatusError` (its status
    // is the stream's 200) carrying the event's error type.
    assert_raised(&run, "APIStatusError", Some(200), "overloaded_error");
    let record = stack.record_of(&run).await;
    let (input, texts) = partial(&run);
    assert_eq!(record.outcome, Outcome::StreamError, "{record:?}");
    assert_eq!(
        record.error_type.as_deref(),
        Some("overloaded_error"),
        "{record:?}"
    );
    assert!(!record.usage_exact, "{record:?}");
    assert_eq!(record.usage.input_tokens, input, "{record:?}");
    assert!(
        record.usage.output_tokens >= texts,
        "output estimated from the text seen: {record:?}"
    );
    assert!(record.usage.output_tokens < 20, "{record:?}");
}

#[tokio::test]
async fn python_abandoned_stream_is_recorded_as_client_disconnected() {
    if !Sdk::Python.available("python_abandoned_stream_is_recorded_as_client_disconnected") {
        return;
    }
    let stack = Stack::start(&[]).await;
    let run = stack.run(Sdk::Python, "abandon").await;
    let result = run.result();
    let record = stack.record_of(&run).await;
    assert_eq!(record.outcome, Outcome::ClientDisconnected, "{record:?}");
    assert!(!record.usage_exact, "{record:?}");
    assert!(record.stream);
    assert_eq!(
        Some(record.usage.input_tokens),
        result["input_tokens_at_start"].as_u64(),
        "{run}"
    );
    let texts = result["text_events"].as_u64().unwrap();
    assert!(
        record.usage.output_tokens >= texts,
        "output estimated from the text seen: {record:?}"
    );
    assert!(
        record.usage.output_tokens < 400,
        "the stream was not read to its end: {record:?}"
    );
    assert_eq!(record.message_id.as_deref(), result["message_id"].as_str());
    // The default disconnect policy closes the upstream stream too.
    for _ in 0..100 {
        if stack.mock.stats().bodies_abandoned == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the upstream stream was not closed: {:?}",
        stack.mock.stats()
    );
}

#[tokio::test]
async fn python_upstream_reset_raises_cleanly() {
    if !Sdk::Python.available("python_upstream_reset_raises_cleanly") {
        return;
    }
    let stack = Stack::start(&[]).await;
    let run = stack.run(Sdk::Python, "upstream_reset").await;
    // tollgate ends the stream with an `api_error` event, which the SDK raises
    // as `APIStatusError` instead of hanging or failing at the socket.
    assert_raised(&run, "APIStatusError", Some(200), "api_error");
    let record = stack.record_of(&run).await;
    let (input, texts) = partial(&run);
    assert_eq!(record.outcome, Outcome::UpstreamError, "{record:?}");
    assert!(!record.usage_exact, "{record:?}");
    assert_eq!(record.usage.input_tokens, input, "{record:?}");
    assert!(record.usage.output_tokens >= texts, "{record:?}");
}

// --- TypeScript SDK ----------------------------------------------------------

#[tokio::test]
async fn typescript_stream_usage_equals_record() {
    if !Sdk::TypeScript.available("typescript_stream_usage_equals_record") {
        return;
    }
    let stack = Stack::start(&[]).await;
    let run = stack.run(Sdk::TypeScript, "stream").await;
    assert_eq!(run.report["sdk_version"], "1.14.0");
    let record = stack.record_of(&run).await;
    assert_completed(&run, &record, true);
    assert_streamed_text(&run);
    assert_mock_usage_header(&run, &record);
    assert_eq!(
        run.result()["sdk_request_id"],
        run.result()["headers"]["request-id"]
    );
    assert_sent(&run, "2026-10-21", true);
}

#[tokio::test]
async fn typescript_create_usage_equals_record() {
    if !Sdk::TypeScript.available("typescript_create_usage_equals_record") {
        return;
    }
    let stack = Stack::start(&[]).await;
    let run = stack.run(Sdk::TypeScript, "create").await;
    let record = stack.record_of(&run).await;
    assert_completed(&run, &record, false);
    assert_mock_usage_header(&run, &record);
    assert_sent(&run, "2026-10-21", true);
}

#[tokio::test]
async fn typescript_x_api_key_sdk_stream_and_create() {
    if !Sdk::TypeScript.available("typescript_x_api_key_sdk_stream_and_create") {
        return;
    }
    let stack = Stack::start(&[]).await;
    for (scenario, stream) in [("stream_v0", true), ("create_v0", false)] {
        let run = stack.run(Sdk::TypeScript, scenario).await;
        assert_eq!(run.report["sdk_version"], "0.137.0");
        assert_sent(&run, "2023-06-01", false);
        let record = stack.record_of(&run).await;
        assert_completed(&run, &record, stream);
    }
}

#[tokio::test]
async fn typescript_retries_429_after_retry_after() {
    if !Sdk::TypeScript.available("typescript_retries_429_after_retry_after") {
        return;
    }
    let stack = Stack::start(NO_GATEWAY_RETRIES).await;
    let run = stack.run(Sdk::TypeScript, "retry_429").await;
    let result = run.result();
    assert_eq!(result["attempts"], 2, "{run}");
    let elapsed = result["elapsed_s"].as_f64().unwrap();
    assert!(
        elapsed >= 1.0,
        "the SDK retried after {elapsed} s, before retry-after: {run}"
    );
    let record = stack.record_of(&run).await;
    assert_completed(&run, &record, false);
    let records = stack.gateway.sink.wait_for(2).await;
    let failed = records
        .iter()
        .find(|r| r.request_id != record.request_id)
        .unwrap();
    assert_eq!(failed.status, 429, "{failed:?}");
    assert_eq!(
        failed.error_type.as_deref(),
        Some("rate_limit_error"),
        "{failed:?}"
    );
}

#[tokio::test]
async fn typescript_in_stream_error_raises_and_is_recorded() {
    if !Sdk::TypeScript.available("typescript_in_stream_error_raises_and_is_recorded") {
        return;
    }
    let stack = Stack::start(&[]).await;
    let run = stack.run(Sdk::TypeScript, "stream_error").await;
    // SDK 1.14.0 raises a plain `APIError` without a status for an SSE `error`.
    assert_raised(&run, "APIError", None, "overloaded_error");
    let record = stack.record_of(&run).await;
    assert_eq!(record.outcome, Outcome::StreamError, "{record:?}");
    assert_eq!(
        record.error_type.as_deref(),
        Some("overloaded_error"),
        "{record:?}"
    );
    assert!(!record.usage_exact, "{record:?}");
}

// --- headers as the upstream received them -----------------------------------

/// Both auth styles and both API versions reach the upstream byte for byte:
/// the gateway runs in front of a relay that records what it forwards to a
/// cleartext mock.
#[tokio::test]
async fn sdk_auth_and_version_headers_reach_upstream_unchanged() {
    let test = "sdk_auth_and_version_headers_reach_upstream_unchanged";
    if !Sdk::Python.available(test) || !Sdk::TypeScript.available(test) {
        return;
    }
    let mock = mock_upstream::start(MockOptions {
        api_key: Some(Secret::new(TEST_API_KEY.to_owned())),
        ..MockOptions::default()
    })
    .await
    .unwrap();
    let tap = UpstreamTap::start(mock.addr()).await;
    let gateway = start_gateway(tap.url(), None, &[]).await;
    let bearer = format!("Bearer {TEST_API_KEY}");
    let cases = [
        (Sdk::Python, "create", "2026-10-21", true),
        (Sdk::Python, "create_x_api_key", "2023-06-01", false),
        (Sdk::TypeScript, "create", "2026-10-21", true),
        (Sdk::TypeScript, "create_v0", "2023-06-01", false),
    ];
    for (sdk, scenario, version, uses_bearer) in cases {
        let run = run_scenario(sdk, scenario, &gateway.url()).await;
        run.result();
        let requests = tap.take_requests();
        assert_eq!(requests.len(), 1, "{sdk:?} {scenario}: {requests:?}");
        let headers = &requests[0];
        assert_eq!(
            header(headers, "anthropic-version"),
            Some(version),
            "{sdk:?} {scenario}"
        );
        if uses_bearer {
            assert_eq!(
                header(headers, "authorization"),
                Some(bearer.as_str()),
                "{sdk:?}"
            );
            assert_eq!(header(headers, "x-api-key"), None, "{sdk:?} {scenario}");
        } else {
            assert_eq!(header(headers, "x-api-key"), Some(TEST_API_KEY), "{sdk:?}");
            assert_eq!(header(headers, "authorization"), None, "{sdk:?} {scenario}");
        }
    }
    // One key, whichever header carried it: one fingerprint, never the key.
    let records = gateway.sink.wait_for(cases.len()).await;
    let key_id = &records[0].key_id;
    assert!(
        !key_id.is_empty() && !key_id.contains(TEST_API_KEY),
        "{key_id}"
    );
    assert!(records.iter().all(|r| &r.key_id == key_id), "{records:?}");
}
