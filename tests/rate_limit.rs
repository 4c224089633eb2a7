//! Rate limits at the gateway: requests wait (holding no upstream connection)
//! when the limiter says they fit within `limits.max_wait`, and otherwise get a
//! 429 with the real time until they would fit.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use http::Method;
use support::client::{http_client, messages_body, request, send};
use support::gateway::start_gateway;
use tollgate::mock_upstream::{self, MockOptions};

#[tokio::test]
async fn a_key_over_its_rpm_waits_within_max_wait_and_succeeds() {
    let mock = mock_upstream::start(MockOptions::default()).await.unwrap();
    let gw = start_gateway(
        mock.url(),
        None,
        &[
            ("TOLLGATE__LIMITS__RPM", "60"),
            ("TOLLGATE__LIMITS__MAX_WAIT", "5s"),
        ],
    )
    .await;
    let client = http_client();
    let url = format!("{}/v1/messages", gw.url());
    let started = Instant::now();
    let mut last = None;
    // A burst of 60 fits at once; the next two wait about a second each.
    for _ in 0..62 {
        let resp = send(
            &client,
            request(Method::POST, &url, messages_body(false, 10), &[]),
        )
        .await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        last = Some(resp);
    }
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(1800), "{elapsed:?}");
    let last = last.unwrap();
    assert_eq!(last.headers["tollgate-ratelimit-requests-limit"], "60");
    assert_eq!(last.headers["tollgate-ratelimit-requests-remaining"], "0");
    assert!(
        last.headers
            .contains_key("tollgate-ratelimit-requests-reset")
    );
    let record = gw.sink.wait_for_request(&last.request_id()).await;
    assert!(record.queued_ms >= 800, "queued {} ms", record.queued_ms);
    let metrics = send(
        &client,
        request(Method::GET, &format!("{}/metrics", gw.admin_url()), "", &[]),
    )
    .await
    .text();
    assert!(
        metrics.contains(r#"tollgate_limiter_decisions_total{outcome="waited"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"tollgate_limiter_decisions_total{outcome="admitted"} 60"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn beyond_max_wait_the_answer_is_a_429_with_the_real_retry_time() {
    let mock = mock_upstream::start(MockOptions::default()).await.unwrap();
    let gw = start_gateway(
        mock.url(),
        None,
        &[
            ("TOLLGATE__LIMITS__RPM", "60"),
            ("TOLLGATE__LIMITS__MAX_WAIT", "50ms"),
        ],
    )
    .await;
    let client = http_client();
    let url = format!("{}/v1/messages", gw.url());
    for _ in 0..60 {
        let resp = send(
            &client,
            request(Method::POST, &url, messages_body(false, 10), &[]),
        )
        .await;
        assert_eq!(resp.status, 200);
    }
    let resp = send(
        &client,
        request(Method::POST, &url, messages_body(false, 10), &[]),
    )
    .await;
    assert_eq!(resp.status, 429);
    let body = resp.json();
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("requests per minute"),
        "{body}"
    );
    let retry_ms: u64 = resp.headers["retry-after-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (900..=1000).contains(&retry_ms),
        "retry-after-ms {retry_ms}"
    );
    assert_eq!(resp.headers["retry-after"], "1");
    assert_eq!(resp.headers["tollgate-ratelimit-requests-remaining"], "0");
    // After the advertised time the request fits.
    tokio::time::sleep(Duration::from_millis(retry_ms)).await;
    let resp = send(
        &client,
        request(Method::POST, &url, messages_body(false, 10), &[]),
    )
    .await;
    assert_eq!(resp.status, 200);
    // The refused request was never forwarded and has no row.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(gw.sink.all().len(), 61);
    assert_eq!(mock.stats().requests, 61);
}

#[tokio::test]
async fn output_tokens_are_reserved_from_max_tokens_and_settled_with_usage() {
    let mock = mock_upstream::start(MockOptions::default()).await.unwrap();
    // 6,000 output tokens a minute: a bucket of 6,000 refilling at 100 a second.
    let gw = start_gateway(
        mock.url(),
        None,
        &[
            ("TOLLGATE__LIMITS__OUTPUT_TPM", "6000"),
            ("TOLLGATE__LIMITS__MAX_WAIT", "50ms"),
        ],
    )
    .await;
    let client = http_client();
    let url = format!("{}/v1/messages", gw.url());
    let headers = [("x-mock-output-tokens", "10")];
    // Each request reserves max_tokens = 4,000 but uses 10: settlement gives the
    // rest back, so requests keep fitting.
    for _ in 0..5 {
        let resp = send(
            &client,
            request(Method::POST, &url, messages_body(false, 4000), &headers),
        )
        .await;
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    // Two launched together cannot both reserve 4,000 of 6,000.
    let a = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move {
            send(
                &client,
                request(
                    Method::POST,
                    &url,
                    messages_body(true, 4000),
                    &[
                        ("x-mock-output-tokens", "10"),
                        ("x-mock-event-delay-ms", "100"),
                    ],
                ),
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let b = send(
        &client,
        request(Method::POST, &url, messages_body(false, 4000), &headers),
    )
    .await;
    assert_eq!(b.status, 429, "{}", b.text());
    assert!(
        b.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("output tokens")
    );
    assert_eq!(a.await.unwrap().status, 200);
}

#[tokio::test]
async fn max_concurrent_holds_while_streams_are_open() {
    let mock = mock_upstream::start(MockOptions::default()).await.unwrap();
    let gw = start_gateway(
        mock.url(),
        None,
        &[
            ("TOLLGATE__LIMITS__MAX_CONCURRENT", "1"),
            ("TOLLGATE__LIMITS__MAX_WAIT", "50ms"),
        ],
    )
    .await;
    let client = http_client();
    let url = format!("{}/v1/messages", gw.url());
    let slow = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move {
            send(
                &client,
                request(
                    Method::POST,
                    &url,
                    messages_body(true, 100),
                    &[
                        ("x-mock-output-tokens", "5"),
                        ("x-mock-event-delay-ms", "100"),
                    ],
                ),
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let refused = send(
        &client,
        request(Method::POST, &url, messages_body(false, 10), &[]),
    )
    .await;
    assert_eq!(refused.status, 429);
    assert!(
        refused.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("concurren"),
        "{}",
        refused.text()
    );
    assert_eq!(slow.await.unwrap().status, 200);
    // The finished stream released its slot.
    let resp = send(
        &client,
        request(Method::POST, &url, messages_body(false, 10), &[]),
    )
    .await;
    assert_eq!(resp.status, 200);
}
