//! The key API on the admin listener, through the real gateway started in
//! process on port 0 (`App::start`), against both ledger backends: the bearer
//! token (missing, wrong, not configured), create/list/show/update/revoke,
//! Anthropic-shaped errors for bad input, and a scan of everything logged and
//! of `/metrics` for every secret created.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};
use tollgate::app::{App, AppOptions, RunningApp};
use tollgate::config::{Config, LedgerConfig};
use tollgate::keys::KeyStore;
use tollgate::keys::secret::hash_secret;
use tollgate::secret::MaskedUrl;

use support::client::{Collected, http_client, send};
use support::ledger::test_ledgers;

const TOKEN: &str = "admin-token-for-tests-7f3a";

/// Everything every test in this binary logs, at debug level and above.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("debug")
            .with_writer(move || LogWriter(writer.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("first subscriber");
        buffer
    })
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Gateway {
    app: RunningApp,
    _dir: tempfile::TempDir,
}

/// Starts the gateway with its ledger at `url` and the given admin token.
async fn start(url: &str, token: Option<&str>) -> Gateway {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let mut env = vec![
        ("TOLLGATE__SERVER__LISTEN", "127.0.0.1:0".to_owned()),
        ("TOLLGATE__ADMIN__LISTEN", "127.0.0.1:0".to_owned()),
        ("TOLLGATE__UPSTREAM__URL", "http://127.0.0.1:9".to_owned()),
        ("TOLLGATE__LEDGER__URL", url.to_owned()),
        (
            "TOLLGATE__LEDGER__JOURNAL_DIR",
            dir.path().join("journal").display().to_string(),
        ),
    ];
    if let Some(token) = token {
        env.push(("TOLLGATE__ADMIN__TOKEN", token.to_owned()));
    }
    let env = env.into_iter().map(|(k, v)| (k.to_owned(), v));
    let config = Config::load_from(None, env).expect("valid test config");
    let app = App::start(config, AppOptions::default())
        .await
        .expect("gateway starts");
    Gateway { app, _dir: dir }
}

impl Gateway {
    async fn call(&self, method: Method, path: &str, auth: Option<&str>, body: &str) -> Collected {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.app.admin_addr()));
        if let Some(auth) = auth {
            builder = builder.header("authorization", auth);
        }
        if !body.is_empty() {
            builder = builder.header("content-type", "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        send(&http_client(), request).await
    }

    /// A call with the right token.
    async fn admin(&self, method: Method, path: &str, body: &str) -> Collected {
        self.call(method, path, Some(&format!("Bearer {TOKEN}")), body)
            .await
    }

    async fn metrics(&self) -> String {
        let r = self.call(Method::GET, "/metrics", None, "").await;
        assert_eq!(r.status, StatusCode::OK, "metrics stay open: {}", r.text());
        r.text()
    }
}

/// Asserts an Anthropic-shaped error with this status and type.
fn assert_error(r: &Collected, status: StatusCode, error_type: &str) -> String {
    assert_eq!(r.status, status, "{}", r.text());
    let body = r.json();
    assert_eq!(body["type"], "error", "{body}");
    assert_eq!(body["error"]["type"], error_type, "{body}");
    assert!(body["request_id"].is_string(), "{body}");
    body["error"]["message"].as_str().unwrap().to_owned()
}

/// Fails if any secret appears in the captured logs or in `text`.
fn assert_nowhere(secrets: &[String], texts: &[&str]) {
    let logs = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    assert!(!logs.is_empty(), "the log capture works");
    for secret in secrets {
        assert!(
            !logs.contains(secret.as_str()),
            "secret {secret} was logged"
        );
        // Nor its random part, in case something trimmed the prefix.
        assert!(!logs.contains(&secret[3..]), "secret {secret} was logged");
        for text in texts {
            assert!(
                !text.contains(secret.as_str()),
                "secret {secret} leaked into:\n{text}"
            );
        }
    }
}

#[tokio::test]
async fn the_admin_token_is_required() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let gw = start(&url, Some(TOKEN)).await;
    for auth in [
        None,
        Some("Bearer wrong-token"),
        Some("Bearer "),
        Some(&format!("Basic {TOKEN}") as &str),
        Some(&format!("Bearer {TOKEN}x") as &str),
        Some(&TOKEN[..TOKEN.len() - 1]),
    ] {
        for (method, path) in [
            (Method::GET, "/admin/v1/keys"),
            (Method::POST, "/admin/v1/keys"),
            (Method::DELETE, "/admin/v1/keys/key_x"),
            (Method::GET, "/admin/v1/anything"),
        ] {
            let r = gw.call(method.clone(), path, auth, r#"{"name":"x"}"#).await;
            let message = assert_error(&r, StatusCode::UNAUTHORIZED, "authentication_error");
            assert!(message.contains("admin token"), "{auth:?}: {message}");
            assert_eq!(r.headers["www-authenticate"], "Bearer");
        }
    }
    // Nothing was created by the refused calls.
    let r = gw.admin(Method::GET, "/admin/v1/keys", "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["data"], json!([]));
    // The token is case-sensitive, the scheme is not.
    let r = gw
        .call(
            Method::GET,
            "/admin/v1/keys",
            Some(&format!("bearer {TOKEN}")),
            "",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = gw.call(Method::GET, "/livez", None, "").await;
    assert_eq!(r.status, StatusCode::OK);
    let metrics = gw.metrics().await;
    assert!(!metrics.contains(TOKEN), "the admin token is in /metrics");
    gw.app.shutdown().await.unwrap();
}

#[tokio::test]
async fn without_a_token_the_key_api_is_disabled() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let gw = start(&url, None).await;
    for auth in [None, Some("Bearer anything")] {
        let r = gw.call(Method::GET, "/admin/v1/keys", auth, "").await;
        let message = assert_error(&r, StatusCode::FORBIDDEN, "permission_error");
        assert!(message.contains("admin.token"), "{message}");
    }
    gw.metrics().await;
    let r = gw.call(Method::GET, "/readyz", None, "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    gw.app.shutdown().await.unwrap();
}

#[tokio::test]
async fn keys_are_managed_over_http_on_both_backends() {
    for db in test_ledgers().await {
        let b = db.backend;
        let gw = start(&db.url, Some(TOKEN)).await;
        let mut secrets = Vec::new();

        // Create: 201, the secret once.
        let r = gw
            .admin(
                Method::POST,
                "/admin/v1/keys",
                r#"{"name": "search", "team": "growth", "rpm": 60, "output_tpm": 8000,
                    "budget_usd": "12.50", "budget_period": "day", "expires": "30d"}"#,
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "[{b}] {}", r.text());
        let created = r.json();
        let secret = created["secret"].as_str().unwrap().to_owned();
        secrets.push(secret.clone());
        let id = created["id"].as_str().unwrap().to_owned();
        assert!(secret.starts_with("tg-"), "[{b}] {created}");
        assert_eq!(created["key_prefix"], &secret[..11]);
        assert_eq!(created["budget_usd"], "12.50");
        assert_eq!(created["budget_nanousd"], 12_500_000_000i64);
        assert_eq!(created["status"], "active");
        assert_eq!(created["kind"], "virtual");

        // A second key, with the budget as a JSON number (read exactly).
        let r = gw
            .admin(
                Method::POST,
                "/admin/v1/keys",
                r#"{"name": "batch", "budget_usd": 0.1, "shadow": true}"#,
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "[{b}] {}", r.text());
        let second = r.json();
        secrets.push(second["secret"].as_str().unwrap().to_owned());
        assert_eq!(second["budget_nanousd"], 100_000_000, "[{b}]");
        assert_eq!(second["budget_period"], "month", "[{b}] default period");

        // The secret is the key's (by hash, in the ledger).
        let store = KeyStore::open(&LedgerConfig {
            url: MaskedUrl::new(&db.url),
            ..LedgerConfig::default()
        })
        .unwrap();
        let stored = store
            .get_by_hash(&hash_secret(&secret))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.id, id, "[{b}]");

        // List and show: never the secret.
        let list = gw.admin(Method::GET, "/admin/v1/keys", "").await;
        assert_eq!(list.status, StatusCode::OK, "[{b}] {}", list.text());
        let data = list.json()["data"].as_array().unwrap().clone();
        assert_eq!(data.len(), 2, "[{b}]");
        assert!(data.iter().all(|k| k.get("secret").is_none()));
        let show = gw
            .admin(Method::GET, &format!("/admin/v1/keys/{id}"), "")
            .await;
        assert_eq!(show.status, StatusCode::OK, "[{b}] {}", show.text());
        let mut expected = created.clone();
        expected.as_object_mut().unwrap().remove("secret");
        assert_eq!(show.json(), expected, "[{b}] shown as created");

        // Update: absent kept, null removed.
        let r = gw
            .admin(
                Method::PATCH,
                &format!("/admin/v1/keys/{id}"),
                r#"{"rpm": 5, "team": null, "budget_usd": "1.25", "max_concurrent": 2}"#,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "[{b}] {}", r.text());
        let updated = r.json();
        assert_eq!(updated["rpm"], 5);
        assert_eq!(updated["team"], Value::Null);
        assert_eq!(updated["output_tpm"], 8000);
        assert_eq!(updated["max_concurrent"], 2);
        assert_eq!(updated["budget_usd"], "1.25");
        assert_eq!(updated["budget_period"], "day");
        let r = gw
            .admin(
                Method::PATCH,
                &format!("/admin/v1/keys/{id}"),
                r#"{"budget_usd": null}"#,
            )
            .await;
        assert_eq!(r.json()["budget_usd"], Value::Null, "[{b}]");
        assert_eq!(r.json()["budget_period"], Value::Null, "[{b}]");

        // Bad input: 400 with every problem listed; nothing changes.
        let r = gw
            .admin(
                Method::PATCH,
                &format!("/admin/v1/keys/{id}"),
                r#"{"rpm": "fast", "budget_period": "week", "colour": 1, "name": null}"#,
            )
            .await;
        let message = assert_error(&r, StatusCode::BAD_REQUEST, "invalid_request_error");
        for field in ["rpm", "budget_period", "colour", "name"] {
            assert!(message.contains(field), "[{b}] {field} not in {message}");
        }
        let r = gw
            .admin(Method::PATCH, &format!("/admin/v1/keys/{id}"), "{}")
            .await;
        assert_error(&r, StatusCode::BAD_REQUEST, "invalid_request_error");
        let r = gw
            .admin(Method::POST, "/admin/v1/keys", r#"{"name": "x",}"#)
            .await;
        let message = assert_error(&r, StatusCode::BAD_REQUEST, "invalid_request_error");
        assert!(message.contains("not valid JSON"), "{message}");
        let r = gw.admin(Method::POST, "/admin/v1/keys", "[1, 2]").await;
        assert_error(&r, StatusCode::BAD_REQUEST, "invalid_request_error");
        let r = gw
            .admin(
                Method::POST,
                "/admin/v1/keys",
                r#"{"team": "t", "max_concurrent": -1, "budget_usd": "1.0000000001", "expires": "2001-01-01"}"#,
            )
            .await;
        let message = assert_error(&r, StatusCode::BAD_REQUEST, "invalid_request_error");
        for problem in [
            "name is required",
            "max_concurrent",
            "9 decimals",
            "in the past",
        ] {
            assert!(
                message.contains(problem),
                "[{b}] {problem:?} not in {message}"
            );
        }
        let huge = format!(r#"{{"name": "{}"}}"#, "x".repeat(70 * 1024));
        let r = gw.admin(Method::POST, "/admin/v1/keys", &huge).await;
        assert_error(&r, StatusCode::PAYLOAD_TOO_LARGE, "request_too_large");
        let r = gw.admin(Method::GET, "/admin/v1/keys", "").await;
        assert_eq!(
            r.json()["data"].as_array().unwrap().len(),
            2,
            "[{b}] bad input created nothing"
        );

        // Unknown keys and routes.
        let r = gw.admin(Method::GET, "/admin/v1/keys/key_nope", "").await;
        assert_error(&r, StatusCode::NOT_FOUND, "not_found_error");
        let r = gw
            .admin(Method::DELETE, "/admin/v1/keys/key_nope", "")
            .await;
        assert_error(&r, StatusCode::NOT_FOUND, "not_found_error");
        let r = gw.admin(Method::GET, "/admin/v1/teams", "").await;
        assert_error(&r, StatusCode::NOT_FOUND, "not_found_error");
        let r = gw
            .admin(Method::PUT, &format!("/admin/v1/keys/{id}"), "{}")
            .await;
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{}", r.text());

        // Revoke: sets revoked_at; idempotent.
        let r = gw
            .admin(Method::DELETE, &format!("/admin/v1/keys/{id}"), "")
            .await;
        assert_eq!(r.status, StatusCode::OK, "[{b}] {}", r.text());
        let revoked = r.json();
        assert_eq!(revoked["status"], "revoked");
        assert!(revoked["revoked_at"].is_string());
        let r = gw
            .admin(Method::DELETE, &format!("/admin/v1/keys/{id}"), "")
            .await;
        assert_eq!(r.json()["revoked_at"], revoked["revoked_at"], "[{b}]");

        // No secret anywhere: logs, metrics, list and show outputs.
        let metrics = gw.metrics().await;
        let list = gw.admin(Method::GET, "/admin/v1/keys", "").await.text();
        assert_nowhere(
            &secrets,
            &[&metrics, &list, &show.text(), &updated.to_string()],
        );
        let logged = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
        assert!(
            logged.contains("key created through the admin API") && logged.contains(&id),
            "[{b}] the capture sees the gateway's own log lines"
        );
        gw.app.shutdown().await.unwrap();
    }
}
