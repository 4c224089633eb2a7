//! Bad input and upstream failures: tollgate answers with Anthropic-shaped
//! errors, ends broken streams cleanly, records every request that reached the
//! upstream exactly once, and keeps serving.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use http::Method;
use support::client::{http_client, messages_body, request, send, sse_events};
use support::gateway::start_gateway;
use tollgate::mock_upstream::{self, MockOptions, MockServer};
use tollgate::record::Outcome;

async fn mock() -> MockServer {
    mock_upstream::start(MockOptions::default()).await.unwrap()
}

fn assert_error_shape(body: &serde_json::Value, error_type: &str) {
    assert_eq!(body["type"], "error", "{body}");
    assert_eq!(body["error"]["type"], error_type, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(
        body["request_id"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

#[tokio::test]
async fn tollgate_errors_have_the_anthropic_shape_and_no_row() {
    let mock = mock().await;
    let gw = start_gateway(
        mock.url(),
        None,
        &[("TOLLGATE__SERVER__MAX_BODY_BYTES", "1000")],
    )
    .await;
    let client = http_client();

    let resp = send(
        &client,
        request(
            Method::POST,
            &format!("{}/v2/whatever", gw.url()),
            "{}",
            &[],
        ),
    )
    .await;
    assert_eq!(resp.status, 404);
    assert_error_shape(&resp.json(), "not_found_error");
    assert!(resp.headers.contains_key("tollgate-request-id"));

    let big = format!("{{\"model\":\"x\",\"pad\":\"{}\"}}", "a".repeat(2000));
    let resp = send(
        &client,
        request(Method::POST, &format!("{}/v1/messages", gw.url()), big, &[]),
    )
    .await;
    assert_eq!(resp.status, 413);
    assert_error_shape(&resp.json(), "request_too_large");

    let mut req = request(
        Method::POST,
        &format!("{}/v1/messages", gw.url()),
        messages_body(false, 5),
        &[],
    );
    req.headers_mut().remove("x-api-key");
    let resp = send(&client, req).await;
    assert_eq!(resp.status, 401);
    assert_error_shape(&resp.json(), "authentication_error");

    // Still serving, and nothing was recorded for requests that never left.
    let resp = send(
        &client,
        request(
            Method::POST,
            &format!("{}/v1/messages", gw.url()),
            messages_body(false, 5),
            &[],
        ),
    )
    .await;
    assert_eq!(resp.status, 200);
    let records = gw.sink.wait_for(1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(gw.sink.all().len(), 1, "{records:?}");
    let metrics = send(
        &client,
        request(Method::GET, &format!("{}/metrics", gw.admin_url()), "", &[]),
    )
    .await
    .text();
    for reason in ["not_found", "too_large", "unauthenticated"] {
        assert!(
            metrics.contains(&format!(
                "tollgate_rejected_requests_total{{reason=\"{reason}\"}} 1"
            )),
            "{metrics}"
        );
    }
}

/// A chunked body over the limit is refused too, without a content-length.
#[tokio::test]
async fn chunked_body_over_the_limit_is_refused() {
    let mock = mock().await;
    let gw = start_gateway(
        mock.url(),
        None,
        &[("TOLLGATE__SERVER__MAX_BODY_BYTES", "1000")],
    )
    .await;
    let chunks: Vec<Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>> = (0..20)
        .map(|_| Ok(http_body::Frame::data(bytes::Bytes::from(vec![b'a'; 100]))))
        .collect();
    let body = http_body_util::StreamBody::new(futures_util::stream::iter(chunks));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let req = http::Request::post(format!("{}/v1/messages", gw.url()))
        .header("x-api-key", "k")
        .body(body)
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 413);
}

#[tokio::test]
async fn a_body_that_is_not_json_is_forwarded_and_the_upstream_answers() {
    let mock = mock().await;
    let gw = start_gateway(mock.url(), None, &[]).await;
    let resp = send(
        &http_client(),
        request(
            Method::POST,
            &format!("{}/v1/messages", gw.url()),
            "this is not json",
            &[],
        ),
    )
    .await;
    assert_eq!(resp.status, 400);
    assert_error_shape(&resp.json(), "invalid_request_error");
    assert!(
        resp.headers["request-id"]
            .to_str()
            .unwrap()
            .starts_with("req_mock_")
    );
    let record = gw.sink.wait_for_request(&resp.request_id()).await;
    assert_eq!(record.outcome, Outcome::UpstreamError);
    assert_eq!(record.status, 400);
    assert_eq!(record.error_type.as_deref(), Some("invalid_request_error"));
    assert_eq!(record.usage.input_tokens, 0);
    assert!(record.usage_exact);
}

#[tokio::test]
async fn upstream_error_statuses_pass_through_unchanged() {
    let mock = mock().await;
    let gw = start_gateway(
        mock.url(),
        None,
        &[("TOLLGATE__UPSTREAM__MAX_RETRIES", "0")],
    )
    .await;
    for (fault, status, error_type) in [
        ("status=429;retry-after=7", 429, "rate_limit_error"),
        ("status=529", 529, "overloaded_error"),
        ("status=500", 500, "api_error"),
    ] {
        let resp = gw
            .post_messages(messages_body(true, 5), &[("x-mock-fault", fault)])
            .await;
        assert_eq!(resp.status, status);
        assert_error_shape(&resp.json(), error_type);
        if status == 429 {
            assert_eq!(resp.headers["retry-after"], "7");
        }
        let record = gw.sink.wait_for_request(&resp.request_id()).await;
        assert_eq!(record.outcome, Outcome::UpstreamError);
        assert_eq!(record.status, status);
        assert_eq!(record.error_type.as_deref(), Some(error_type));
    }
}

/// The upstream dies mid-stream: the client's stream ends with a well-formed
/// `error` event, and the request is an `upstream_error` with the usage seen.
#[tokio::test]
async fn upstream_reset_mid_stream_ends_with_an_error_event() {
    let mock = mock().await;
    let gw = start_gateway(mock.url(), None, &[]).await;
    let resp = gw
        .post_messages(
            messages_body(true, 100),
            &[
                ("x-mock-fault", "reset-after=4"),
                ("x-mock-output-tokens", "20"),
            ],
        )
        .await;
    assert_eq!(resp.status, 200);
    assert!(
        resp.error.is_none(),
        "the client sees a clean end: {:?}",
        resp.error
    );
    let events = sse_events(&resp.text());
    let last = events.last().unwrap();
    assert!(last.starts_with("event: error\ndata: "), "{last}");
    let data: serde_json::Value =
        serde_json::from_str(last.split_once("data: ").unwrap().1).unwrap();
    assert_eq!(data["type"], "error");
    assert_eq!(data["error"]["type"], "api_error");
    let record = gw.sink.wait_for_request(&resp.request_id()).await;
    assert_eq!(record.outcome, Outcome::UpstreamError);
    assert!(!record.usage_exact);
    assert!(
        record.usage.input_tokens > 0,
        "input from message_start: {record:?}"
    );
    assert_eq!(record.error_type.as_deref(), Some("api_error"));
}

#[tokio::test]
async fn in_stream_error_event_is_relayed_and_recorded() {
    let mock = mock().await;
    let gw = start_gateway(mock.url(), None, &[]).await;
    let resp = gw
        .post_messages(
            messages_body(true, 100),
            &[("x-mock-fault", "error-after=3")],
        )
        .await;
    let events = sse_events(&resp.text());
    assert!(
        events.last().unwrap().contains("overloaded_error"),
        "{events:?}"
    );
    let record = gw.sink.wait_for_request(&resp.request_id()).await;
    assert_eq!(record.outcome, Outcome::StreamError);
    assert_eq!(record.error_type.as_deref(), Some("overloaded_error"));
    assert!(!record.usage_exact);
}

#[tokio::test]
async fn a_stalled_upstream_hits_the_idle_timeout() {
    let mock = mock().await;
    let gw = start_gateway(
        mock.url(),
        None,
        &[("TOLLGATE__UPSTREAM__IDLE_TIMEOUT", "300ms")],
    )
    .await;
    let started = std::time::Instant::now();
    let resp = gw
        .post_messages(
            messages_body(true, 100),
            &[("x-mock-fault", "stall-after=3")],
        )
        .await;
    assert!(started.elapsed() < Duration::from_secs(5));
    let events = sse_events(&resp.text());
    assert!(events.last().unwrap().contains("api_error"), "{events:?}");
    let record = gw.sink.wait_for_request(&resp.request_id()).await;
    assert_eq!(record.outcome, Outcome::UpstreamError);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(r#"tollgate_upstream_failures_total{kind="idle_timeout"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_slow_first_byte_hits_the_first_byte_timeout() {
    let mock = mock().await;
    let gw = start_gateway(
        mock.url(),
        None,
        &[("TOLLGATE__UPSTREAM__FIRST_BYTE_TIMEOUT", "300ms")],
    )
    .await;
    let resp = gw
        .post_messages(
            messages_body(true, 100),
            &[("x-mock-fault", "slow-first-byte=3000")],
        )
        .await;
    assert_eq!(resp.status, 504);
    assert_error_shape(&resp.json(), "timeout_error");
    // The request reached the upstream: it is recorded, its usage unknown.
    let record = gw.sink.wait_for_request(&resp.request_id()).await;
    assert_eq!(record.outcome, Outcome::UpstreamError);
    assert_eq!(record.status, 504);
    assert!(!record.usage_exact);
}

#[tokio::test]
async fn an_unreachable_upstream_gets_502_and_no_row() {
    // Bind and drop a listener to get a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let gw = start_gateway(&format!("http://127.0.0.1:{port}"), None, &[]).await;
    let resp = gw.post_messages(messages_body(true, 5), &[]).await;
    assert_eq!(resp.status, 502);
    assert_error_shape(&resp.json(), "api_error");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(gw.sink.all().is_empty());
}

/// Reads a few events of a slow stream, then drops the response.
async fn abandon_stream(gw_url: &str) -> String {
    use http_body_util::BodyExt;
    let client = http_client();
    let response = client
        .request(request(
            Method::POST,
            &format!("{gw_url}/v1/messages"),
            messages_body(true, 100),
            &[
                ("x-mock-output-tokens", "40"),
                ("x-mock-event-delay-ms", "30"),
            ],
        ))
        .await
        .unwrap();
    let request_id = response.headers()["tollgate-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let mut body = response.into_body();
    let mut seen = String::new();
    while !seen.contains("content_block_delta") {
        let frame = body.frame().await.unwrap().unwrap();
        seen.push_str(std::str::from_utf8(frame.data_ref().unwrap()).unwrap());
    }
    drop(body);
    drop(client);
    request_id
}

#[tokio::test]
async fn a_client_that_leaves_is_recorded_as_disconnected_with_an_estimate() {
    let mock = mock().await;
    let gw = start_gateway(mock.url(), None, &[]).await;
    let request_id = abandon_stream(&gw.url()).await;
    let record = gw.sink.wait_for_request(&request_id).await;
    assert_eq!(record.outcome, Outcome::ClientDisconnected);
    assert!(!record.usage_exact);
    assert!(record.usage.input_tokens > 0);
    assert!(
        record.usage.output_tokens >= 1 && record.usage.output_tokens < 40,
        "{record:?}"
    );
    // cancel: the upstream stream was closed, so the mock never emitted final usage.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(mock.stats().output_tokens, 0);
}

#[tokio::test]
async fn the_drain_policy_reads_the_upstream_to_its_final_usage() {
    let mock = mock().await;
    let gw = start_gateway(
        mock.url(),
        None,
        &[("TOLLGATE__METER__ON_CLIENT_DISCONNECT", "drain")],
    )
    .await;
    let request_id = abandon_stream(&gw.url()).await;
    let record = gw.sink.wait_for_request(&request_id).await;
    assert_eq!(record.outcome, Outcome::ClientDisconnected);
    assert!(record.usage_exact, "{record:?}");
    assert_eq!(record.usage.output_tokens, 40);
    assert_eq!(mock.stats().output_tokens, 40);
}

/// A 529 (or 429) before any byte reached the client is retried by tollgate;
/// the client sees the success and the one row counts both attempts.
#[tokio::test]
async fn upstream_529_then_200_is_retried_and_recorded_once() {
    let mock = mock().await;
    let gw = start_gateway(mock.url(), None, &[]).await;
    for (fault, key) in [
        ("status=529", "retry-529"),
        ("status=429;retry-after=1", "retry-429"),
    ] {
        let started = std::time::Instant::now();
        let resp = gw
            .post_messages(
                messages_body(true, 100),
                &[
                    ("x-mock-fault", fault),
                    ("x-mock-fail-times", "1"),
                    ("x-mock-fault-key", key),
                    ("x-mock-output-tokens", "5"),
                ],
            )
            .await;
        assert_eq!(resp.status, 200, "{fault}: {}", resp.text());
        let record = gw.sink.wait_for_request(&resp.request_id()).await;
        assert_eq!(record.attempts, 2, "{fault}");
        assert_eq!(record.outcome, Outcome::Completed);
        assert_eq!(record.usage.output_tokens, 5);
        if fault.contains("retry-after=1") {
            assert!(
                started.elapsed() >= Duration::from_secs(1),
                "retry-after honoured"
            );
        }
    }
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(r#"tollgate_upstream_retries_total{reason="529"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"tollgate_upstream_retries_total{reason="429"} 1"#),
        "{metrics}"
    );
    assert_eq!(gw.sink.all().len(), 2);
}

/// Once a byte was forwarded, a broken stream is never retried.
#[tokio::test]
async fn a_stream_that_fails_after_its_first_byte_is_not_retried() {
    let mock = mock().await;
    let gw = start_gateway(mock.url(), None, &[]).await;
    let resp = gw
        .post_messages(
            messages_body(true, 100),
            &[("x-mock-fault", "reset-after=2")],
        )
        .await;
    let record = gw.sink.wait_for_request(&resp.request_id()).await;
    assert_eq!(record.attempts, 1);
    assert_eq!(record.outcome, Outcome::UpstreamError);
    assert_eq!(mock.stats().requests, 1);
}

/// A retry whose wait would exceed the budget is not made: the 429 is relayed.
#[tokio::test]
async fn a_retry_after_beyond_the_budget_is_relayed() {
    let mock = mock().await;
    let gw = start_gateway(
        mock.url(),
        None,
        &[("TOLLGATE__UPSTREAM__RETRY_BUDGET", "2s")],
    )
    .await;
    let resp = gw
        .post_messages(
            messages_body(false, 10),
            &[("x-mock-fault", "status=429;retry-after=60")],
        )
        .await;
    assert_eq!(resp.status, 429);
    assert_eq!(resp.headers["retry-after"], "60");
    let record = gw.sink.wait_for_request(&resp.request_id()).await;
    assert_eq!(record.attempts, 1);
}
