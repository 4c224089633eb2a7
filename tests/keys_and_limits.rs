//! Virtual keys, rate limits and budgets at the gateway, with the official
//! Python SDK as the client: limits delay or 429 (which the SDK waits out), a
//! spent budget is a 402 the SDK does not retry, a revoked key is refused
//! within the cache TTL, and the client's key never reaches the upstream.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::Method;
use serde_json::{Value, json};
use support::client::{http_client, messages_body, request, send};
use support::gateway::{TestGateway, start_gateway};
use support::sdk::{Sdk, run_scenario_as};
use tollgate::mock_upstream::{self, MockOptions, MockServer};
use tollgate::secret::Secret;

const ADMIN_TOKEN: &str = "admin-token-for-tests-0123456789";
const UPSTREAM_KEY: &str = "sk-ant-upstream-organisation-key";

/// A mock that accepts only the organisation's key, and a virtual-key gateway.
async fn virtual_gateway(extra: &[(&str, &str)]) -> (MockServer, TestGateway) {
    let mock = mock_upstream::start(MockOptions {
        api_key: Some(Secret::new(UPSTREAM_KEY.to_owned())),
        ..MockOptions::default()
    })
    .await
    .unwrap();
    let mut env = vec![
        ("TOLLGATE__AUTH__MODE", "virtual"),
        ("TOLLGATE__UPSTREAM__API_KEY", UPSTREAM_KEY),
        ("TOLLGATE__ADMIN__TOKEN", ADMIN_TOKEN),
        ("TOLLGATE__AUTH__KEY_CACHE_TTL", "500ms"),
    ];
    env.extend_from_slice(extra);
    let gw = start_gateway(mock.url(), None, &env).await;
    (mock, gw)
}

/// Creates a key through the admin API; returns (id, secret).
async fn create_key(gw: &TestGateway, spec: Value) -> (String, String) {
    let mut req = request(
        Method::POST,
        &format!("{}/admin/v1/keys", gw.admin_url()),
        spec.to_string(),
        &[],
    );
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {ADMIN_TOKEN}").parse().unwrap(),
    );
    let resp = send(&http_client(), req).await;
    assert_eq!(resp.status, 201, "{}", resp.text());
    let body = resp.json();
    let key = if body["key"].is_object() {
        &body["key"]
    } else {
        &body
    };
    (
        key["id"].as_str().unwrap().to_owned(),
        body["secret"].as_str().unwrap().to_owned(),
    )
}

async fn metrics(gw: &TestGateway) -> String {
    gw.metrics().await
}

#[tokio::test]
async fn virtual_keys_replace_the_client_key_upstream() {
    let (_mock, gw) = virtual_gateway(&[]).await;
    let (id, secret) = create_key(&gw, json!({"name": "svc-a", "team": "search"})).await;
    assert!(
        secret.starts_with("tg-") && secret.len() >= 3 + 22,
        "{secret}"
    );
    let url = format!("{}/v1/messages", gw.url());
    // The mock accepts only the organisation's key: a 200 proves the swap.
    let mut req = request(Method::POST, &url, messages_body(false, 10), &[]);
    req.headers_mut()
        .insert("x-api-key", secret.parse().unwrap());
    let resp = send(&http_client(), req).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let record = gw.sink.wait_for_request(&resp.request_id()).await;
    assert_eq!(record.key_id, id);
    assert_eq!(record.team.as_deref(), Some("search"));
    // Bearer works the same way.
    let mut req = request(Method::POST, &url, messages_body(false, 10), &[]);
    req.headers_mut().remove("x-api-key");
    req.headers_mut()
        .insert("authorization", format!("Bearer {secret}").parse().unwrap());
    assert_eq!(send(&http_client(), req).await.status, 200);
    // An Anthropic key, or an unknown tollgate key, is refused by tollgate.
    for bad in [UPSTREAM_KEY.to_owned(), format!("tg-{}", "x".repeat(43))] {
        let mut req = request(Method::POST, &url, messages_body(false, 10), &[]);
        req.headers_mut().insert("x-api-key", bad.parse().unwrap());
        let resp = send(&http_client(), req).await;
        assert_eq!(resp.status, 401, "{}", resp.text());
        assert_eq!(resp.json()["error"]["type"], "authentication_error");
    }
    assert!(!metrics(&gw).await.contains(&secret));
}

/// A key over its RPM: within max_wait tollgate holds requests and all
/// succeed; beyond it the SDK receives 429, waits the advertised time,
/// retries and succeeds.
#[tokio::test]
async fn python_sdk_over_rpm_waits_or_retries_and_always_succeeds() {
    if !Sdk::Python.available("python_sdk_over_rpm_waits_or_retries_and_always_succeeds") {
        return;
    }
    for (max_wait, expect_waits) in [("5s", true), ("0s", false)] {
        let (_mock, gw) = virtual_gateway(&[("TOLLGATE__LIMITS__MAX_WAIT", max_wait)]).await;
        let (_, secret) = create_key(&gw, json!({"name": "bursty", "rpm": 60})).await;
        let run = run_scenario_as(
            Sdk::Python,
            "burst",
            &gw.url(),
            &secret,
            &[("BURST_N", "62")],
        )
        .await;
        let result = run.result();
        assert_eq!(result["completed"], 62, "{result}");
        assert!(result["elapsed_s"].as_f64().unwrap() >= 1.5, "{result}");
        let m = metrics(&gw).await;
        if expect_waits {
            assert!(
                m.contains(r#"tollgate_limiter_decisions_total{outcome="waited"} 2"#),
                "{m}"
            );
            assert!(
                !m.contains(r#"tollgate_rejected_requests_total{reason="rate_limited"}"#),
                "{m}"
            );
        } else {
            // Two requests refused at least once; the SDK retried them.
            assert!(
                m.contains(r#"tollgate_limiter_decisions_total{outcome="limited"}"#),
                "{m}"
            );
            assert!(
                m.contains(r#"tollgate_rejected_requests_total{reason="rate_limited"}"#),
                "{m}"
            );
        }
        // Exactly one row per completed request, none for the refusals.
        assert_eq!(gw.sink.wait_for(62).await.len(), 62);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(gw.sink.all().len(), 62);
    }
}

#[tokio::test]
async fn python_sdk_gets_402_on_a_spent_budget_and_does_not_retry() {
    if !Sdk::Python.available("python_sdk_gets_402_on_a_spent_budget_and_does_not_retry") {
        return;
    }
    let (_mock, gw) = virtual_gateway(&[]).await;
    // A budget of a millionth of a dollar: the first request spends it.
    let (_, secret) = create_key(
        &gw,
        json!({"name": "thrifty", "budget_usd": "0.000001", "budget_period": "day"}),
    )
    .await;
    let run = run_scenario_as(Sdk::Python, "budget_exhausted", &gw.url(), &secret, &[]).await;
    let error = &run.result()["second_error"];
    assert_eq!(error["status_code"], 402, "{error}");
    assert_eq!(error["type"], "billing_error", "{error}");
    let m = metrics(&gw).await;
    assert!(
        m.contains(r#"tollgate_rejected_requests_total{reason="over_budget"} 1"#),
        "the SDK retried a 402:\n{m}"
    );
    assert!(
        m.contains(r#"tollgate_limiter_decisions_total{outcome="over_budget"} 1"#),
        "{m}"
    );
    assert_eq!(gw.sink.all().len(), 1);
}

#[tokio::test]
async fn python_sdk_gets_401_within_the_cache_ttl_of_a_revoke() {
    if !Sdk::Python.available("python_sdk_gets_401_within_the_cache_ttl_of_a_revoke") {
        return;
    }
    let (mock, gw) = virtual_gateway(&[]).await;
    let (id, secret) = create_key(&gw, json!({"name": "leaving"})).await;
    let sdk = tokio::spawn({
        let url = gw.url();
        async move { run_scenario_as(Sdk::Python, "until_unauthorized", &url, &secret, &[]).await }
    });
    // Wait until the SDK is making requests with the key.
    for _ in 0..400 {
        if mock.stats().requests >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(mock.stats().requests >= 3, "the SDK never got going");
    // Revoke through the store directly, as another replica's admin API would:
    // this replica learns of it only through its cache expiring.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["keys", "revoke", &id])
        .env(
            "TOLLGATE__LEDGER__URL",
            format!("sqlite://{}", gw.dir.path().join("ledger.db").display()),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let revoked_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let run = sdk.await.unwrap();
    let result = run.result();
    assert!(result["successes"].as_u64().unwrap() > 3, "{result}");
    assert_eq!(result["error"]["status_code"], 401);
    let delay = result["refused_at"].as_f64().unwrap() - revoked_at;
    // Cache TTL 500 ms, plus the SDK's request interval and a loaded machine.
    assert!(delay < 1.5, "refused {delay:.3}s after the revoke");
}

/// Shadow keys: over their limit and budget, requests still go through, and
/// the violations are counted.
#[tokio::test]
async fn shadow_keys_are_evaluated_not_enforced() {
    let (_mock, gw) = virtual_gateway(&[("TOLLGATE__LIMITS__MAX_WAIT", "0s")]).await;
    let (_, secret) = create_key(
        &gw,
        json!({"name": "trial", "rpm": 2, "budget_usd": "0.000001", "shadow": true}),
    )
    .await;
    let url = format!("{}/v1/messages", gw.url());
    for _ in 0..5 {
        let mut req = request(Method::POST, &url, messages_body(false, 10), &[]);
        req.headers_mut()
            .insert("x-api-key", secret.parse().unwrap());
        let resp = send(&http_client(), req).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    let m = metrics(&gw).await;
    // Requests 3..5 are over the rpm; requests 2..5 over the budget.
    assert!(
        m.contains(r#"tollgate_limiter_decisions_total{outcome="shadow_violation"} 7"#),
        "{m}"
    );
}
