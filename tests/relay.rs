//! The gateway relays upstream responses unchanged and unbuffered while it
//! meters them: gateway and mock upstream over HTTPS with the mock's own CA,
//! both on port 0.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::time::Duration;

use http::Method;
use support::client::{http_client, https_client, messages_body, request, send, sse_events};
use support::gateway::start_gateway;
use tollgate::mock_upstream::{self, MockOptions, MockServer};
use tollgate::record::Outcome;

async fn tls_mock() -> MockServer {
    mock_upstream::start(MockOptions {
        tls: true,
        fixtures: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sse")),
        ..MockOptions::default()
    })
    .await
    .unwrap()
}

/// Expected usage of each recorded fixture (tests/fixtures/sse/README.md):
/// name, input, output, stop reason.
const FIXTURES: &[(&str, u64, u64, &str)] = &[
    ("basic_response", 11, 6, "end_turn"),
    ("tool_use_response", 377, 65, "tool_use"),
    ("incomplete_partial_json_response", 450, 124, "max_tokens"),
    ("refusal_response", 20, 0, "refusal"),
    ("compaction_response", 30, 8, "end_turn"),
];

#[tokio::test]
async fn every_fixture_is_relayed_byte_for_byte_and_metered() {
    let mock = tls_mock().await;
    let gw = start_gateway(mock.url(), mock.ca_path(), &[]).await;
    let direct = https_client(mock.ca_pem().unwrap(), false);
    let via = http_client();
    for (name, input, output, stop) in FIXTURES {
        let body = messages_body(true, 1024);
        let headers = [("x-mock-fixture", *name)];
        let upstream = send(
            &direct,
            request(
                Method::POST,
                &format!("{}/v1/messages", mock.url()),
                body.clone(),
                &headers,
            ),
        )
        .await;
        let relayed = send(
            &via,
            request(
                Method::POST,
                &format!("{}/v1/messages", gw.url()),
                body,
                &headers,
            ),
        )
        .await;
        assert_eq!(relayed.status, 200, "{name}: {}", relayed.text());
        assert!(relayed.body() == upstream.body(), "{name}: bytes differ");
        let file = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/sse/{name}.sse")),
        )
        .unwrap();
        assert!(
            relayed.body() == file,
            "{name}: bytes differ from the fixture file"
        );
        assert_eq!(
            relayed.headers["content-type"],
            upstream.headers["content-type"]
        );

        let record = gw.sink.wait_for_request(&relayed.request_id()).await;
        assert_eq!(record.usage.input_tokens, *input, "{name}");
        assert_eq!(record.usage.output_tokens, *output, "{name}");
        assert_eq!(record.stop_reason.as_deref(), Some(*stop), "{name}");
        assert_eq!(record.outcome, Outcome::Completed, "{name}");
        assert!(record.usage_exact, "{name}");
        assert!(record.stream, "{name}");
        assert_eq!(record.status, 200);
        assert_eq!(record.endpoint, "/v1/messages");
        assert!(record.key_id.starts_with("pt_"), "{}", record.key_id);
        assert!(
            record
                .upstream_request_id
                .as_deref()
                .unwrap_or("")
                .starts_with("req_mock_")
        );
        assert_eq!(
            record.upstream_request_id.as_deref(),
            relayed
                .headers
                .get("request-id")
                .and_then(|v| v.to_str().ok())
        );
        assert!(
            record
                .message_id
                .as_deref()
                .unwrap_or("")
                .starts_with("msg_")
        );
        assert_eq!(record.attempts, 1);
    }
    gw.app.shutdown().await.unwrap();
}

#[tokio::test]
async fn synthesised_stream_usage_matches_what_the_upstream_reported() {
    let mock = tls_mock().await;
    let gw = start_gateway(mock.url(), mock.ca_path(), &[]).await;
    let resp = gw
        .post_messages(
            messages_body(true, 1000),
            &[
                ("x-mock-output-tokens", "40"),
                ("x-mock-cache", "write=300,read=700,write_1h=100"),
                ("x-mock-input-growth", "25"),
            ],
        )
        .await;
    assert_eq!(resp.status, 200);
    let reported = resp.headers["x-mock-usage"].to_str().unwrap().to_owned();
    let record = gw.sink.wait_for_request(&resp.request_id()).await;
    let u = &record.usage;
    assert_eq!(
        reported,
        format!(
            "input={},output={},cache_write={},cache_read={}",
            u.input_tokens,
            u.output_tokens,
            u.cache_creation_input_tokens,
            u.cache_read_input_tokens
        )
    );
    assert_eq!(u.output_tokens, 40);
    assert_eq!(u.cache_creation_1h_tokens, Some(100));
    // write= is the 5-minute part, write_1h= the 1-hour part.
    assert_eq!(u.cache_creation_5m_tokens, Some(300));
    assert_eq!(u.cache_creation_input_tokens, 400);
    assert_eq!(u.cache_read_input_tokens, 700);
    assert!(record.usage_exact);
    assert_eq!(record.model.as_deref(), Some("claude-sonnet-4-5"));
    // The mock's totals agree with what was recorded.
    let stats = mock.stats();
    assert_eq!(stats.output_tokens, 40);
    assert_eq!(stats.input_tokens, u.input_tokens);
}

/// Events paced 200 ms apart upstream arrive paced the same way: nothing is
/// buffered in between.
#[tokio::test]
async fn paced_events_arrive_paced() {
    let mock = tls_mock().await;
    let gw = start_gateway(mock.url(), mock.ca_path(), &[]).await;
    let resp = gw
        .post_messages(
            messages_body(true, 100),
            &[
                ("x-mock-output-tokens", "5"),
                ("x-mock-event-delay-ms", "200"),
            ],
        )
        .await;
    assert_eq!(resp.status, 200);
    // Timestamp each event by the chunk that completed it.
    let mut arrivals = Vec::new();
    let mut text = String::new();
    for (at, chunk) in &resp.chunks {
        text.push_str(std::str::from_utf8(chunk).unwrap());
        while let Some(end) = text.find("\n\n") {
            arrivals.push(*at);
            text.drain(..end + 2);
        }
    }
    assert!(arrivals.len() >= 8, "{} events", arrivals.len());
    let gaps: Vec<Duration> = arrivals.windows(2).map(|w| w[1] - w[0]).collect();
    // Generous bounds: each gap near 200 ms, none collapsed by buffering.
    for gap in &gaps {
        assert!(*gap >= Duration::from_millis(120), "gaps {gaps:?}");
        assert!(*gap <= Duration::from_millis(1500), "gaps {gaps:?}");
    }
    gw.app.shutdown().await.unwrap();
}

#[tokio::test]
async fn non_streaming_plain_and_gzip_bodies_are_metered() {
    let mock = tls_mock().await;
    let gw = start_gateway(mock.url(), mock.ca_path(), &[]).await;
    let client = http_client();
    for gzip in ["0", "1"] {
        let resp = send(
            &client,
            request(
                Method::POST,
                &format!("{}/v1/messages", gw.url()),
                messages_body(false, 1000),
                &[
                    ("x-mock-output-tokens", "12"),
                    ("x-mock-gzip", gzip),
                    ("x-mock-cache", "read=50"),
                ],
            ),
        )
        .await;
        assert_eq!(resp.status, 200);
        if gzip == "1" {
            assert_eq!(resp.headers["content-encoding"], "gzip");
            // The gzip bytes were relayed, not decoded.
            assert_eq!(&resp.body()[..2], &[0x1f, 0x8b]);
        }
        let record = gw.sink.wait_for_request(&resp.request_id()).await;
        assert_eq!(record.usage.output_tokens, 12, "gzip={gzip}");
        assert_eq!(record.usage.cache_read_input_tokens, 50);
        assert!(record.usage.input_tokens > 0);
        assert!(record.usage_exact);
        assert!(!record.stream);
        assert_eq!(record.stop_reason.as_deref(), Some("end_turn"));
    }
}

#[tokio::test]
async fn count_tokens_and_models_are_relayed_and_never_billed() {
    let mock = tls_mock().await;
    let gw = start_gateway(mock.url(), mock.ca_path(), &[]).await;
    let client = http_client();
    let resp = send(
        &client,
        request(
            Method::POST,
            &format!("{}/v1/messages/count_tokens", gw.url()),
            messages_body(false, 10),
            &[],
        ),
    )
    .await;
    assert_eq!(resp.status, 200);
    assert!(resp.json()["input_tokens"].as_u64().unwrap() > 0);
    let record = gw.sink.wait_for_request(&resp.request_id()).await;
    assert_eq!(record.endpoint, "/v1/messages/count_tokens");
    assert_eq!(record.usage, Default::default());
    // Not billed: a known zero cost, not an unpriced row.
    assert_eq!(record.cost_nanousd, Some(0));

    let resp = send(
        &client,
        request(
            Method::GET,
            &format!("{}/v1/models?limit=5", gw.url()),
            "",
            &[],
        ),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(resp.json()["data"].is_array());
    let record = gw.sink.wait_for_request(&resp.request_id()).await;
    assert_eq!(record.usage.input_tokens, 0);
}

#[tokio::test]
async fn cost_is_computed_from_the_price_table() {
    let mock = tls_mock().await;
    let gw = start_gateway(mock.url(), mock.ca_path(), &[]).await;
    let resp = gw
        .post_messages(messages_body(true, 1000), &[("x-mock-output-tokens", "10")])
        .await;
    let record = gw.sink.wait_for_request(&resp.request_id()).await;
    // claude-sonnet-4-5: $3 / $15 per MTok = 3,000 / 15,000 nano-dollars per token.
    let expected = record.usage.input_tokens as i64 * 3_000 + 10 * 15_000;
    assert_eq!(record.cost_nanousd, Some(expected));
    assert!(record.price_version.is_some());
}

/// The proxy listener speaks TLS with h2 and HTTP/1.1 when given a certificate.
#[tokio::test]
async fn tls_listener_serves_h2_and_http1() {
    let mock = tls_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let gw = start_gateway(
        mock.url(),
        mock.ca_path(),
        &[
            ("TOLLGATE__SERVER__TLS_CERT", cert_path.to_str().unwrap()),
            ("TOLLGATE__SERVER__TLS_KEY", key_path.to_str().unwrap()),
        ],
    )
    .await;
    let url = format!(
        "https://localhost:{}/v1/messages",
        gw.app.proxy_addr().port()
    );
    for h2 in [true, false] {
        let client = https_client(&cert.pem(), h2);
        let resp = send(
            &client,
            request(
                Method::POST,
                &url,
                messages_body(true, 100),
                &[("x-mock-output-tokens", "3")],
            ),
        )
        .await;
        assert_eq!(resp.status, 200, "h2={h2}");
        let events = sse_events(&resp.text());
        assert!(events.last().unwrap().contains("message_stop"), "h2={h2}");
        let record = gw.sink.wait_for_request(&resp.request_id()).await;
        assert_eq!(record.usage.output_tokens, 3);
    }
}

#[tokio::test]
async fn metrics_describe_the_traffic() {
    let mock = tls_mock().await;
    let gw = start_gateway(mock.url(), mock.ca_path(), &[]).await;
    let client = http_client();
    let resp = send(
        &client,
        request(
            Method::POST,
            &format!("{}/v1/messages", gw.url()),
            messages_body(true, 100),
            &[("x-mock-output-tokens", "7")],
        ),
    )
    .await;
    let record = gw.sink.wait_for_request(&resp.request_id()).await;
    let metrics = send(
        &client,
        request(Method::GET, &format!("{}/metrics", gw.admin_url()), "", &[]),
    )
    .await
    .text();
    assert!(metrics.contains(r#"tollgate_requests_total{model="claude-sonnet-4-5",outcome="completed",status_class="2xx"} 1"#), "{metrics}");
    assert!(
        metrics.contains(r#"tollgate_tokens_total{model="claude-sonnet-4-5",type="output"} 7"#),
        "{metrics}"
    );
    assert!(metrics.contains(&format!(
        r#"tollgate_tokens_total{{model="claude-sonnet-4-5",type="input"}} {}"#,
        record.usage.input_tokens
    )));
    for name in [
        "tollgate_request_duration_seconds_bucket",
        "tollgate_ttfb_seconds_bucket",
        "tollgate_upstream_ttfb_seconds_bucket",
        "tollgate_active_requests 0",
        "tollgate_meter_parse_errors_total 0",
        "tollgate_cost_usd_total",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    assert!(!metrics.contains("sk-ant-test-key"));
    let live = send(
        &client,
        request(Method::GET, &format!("{}/livez", gw.admin_url()), "", &[]),
    )
    .await;
    assert_eq!(live.status, 200);
    let ready = send(
        &client,
        request(Method::GET, &format!("{}/readyz", gw.admin_url()), "", &[]),
    )
    .await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["ready"], true);
}
