//! The `tollgate` binary as an operator runs it: configuration errors, masked
//! `check-config`, and graceful shutdown on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use http::Method;
use support::client::{http_client, messages_body, request, send, sse_events};
use tollgate::mock_upstream::{self, MockOptions};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

#[test]
fn invalid_config_lists_every_error_and_exits_64() {
    let out = Command::new(BIN)
        .arg("check-config")
        .env("TOLLGATE__SERVER__LISTEN", "not-an-address")
        .env("TOLLGATE__UPSTREAM__URL", "ftp://example")
        .env("TOLLGATE__ADMIN__LISTEN", "0.0.0.0:9464")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in ["server.listen", "upstream.url", "admin.token"] {
        assert!(stderr.contains(key), "{key} not reported:\n{stderr}");
    }
    // The same config makes `serve` exit 64 before binding anything.
    let out = Command::new(BIN)
        .env("TOLLGATE__SERVER__LISTEN", "nope")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let out = Command::new(BIN)
        .args(["--config", "/nonexistent/tollgate.toml", "check-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    // A price table that does not load is a configuration error too.
    let out = Command::new(BIN)
        .env("TOLLGATE__PRICES__FILE", "/nonexistent/prices.toml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("prices.file"));
}

#[test]
fn check_config_prints_the_effective_config_with_secrets_masked() {
    let out = Command::new(BIN)
        .arg("check-config")
        .env("TOLLGATE__UPSTREAM__API_KEY", "sk-ant-api03-supersecret")
        .env("TOLLGATE__ADMIN__TOKEN", "admin-token-supersecret")
        .env(
            "TOLLGATE__LEDGER__URL",
            "postgres://finance:dbpassword@db.internal/ledger",
        )
        .env("TOLLGATE__SERVER__SHUTDOWN_GRACE", "5s")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    for secret in ["supersecret", "dbpassword"] {
        assert!(!stdout.contains(secret), "{secret} leaked:\n{stdout}");
    }
    assert!(
        stdout.contains("postgres://finance:*****@db.internal/ledger"),
        "{stdout}"
    );
    assert!(stdout.contains("shutdown_grace = \"5s\""), "{stdout}");
    let parsed: toml::Value = toml::from_str(&stdout).unwrap();
    assert_eq!(parsed["server"]["listen"].as_str(), Some("127.0.0.1:8080"));
}

/// SIGTERM while streams are open: they run to their end, every one is
/// recorded, and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_open_streams_finish_and_records_them_all() {
    let mock = mock_upstream::start(MockOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("TOLLGATE__SERVER__LISTEN", "127.0.0.1:0")
        .env("TOLLGATE__ADMIN__LISTEN", "127.0.0.1:0")
        .env("TOLLGATE__UPSTREAM__URL", mock.url())
        .env(
            "TOLLGATE__LEDGER__URL",
            format!("sqlite://{}", dir.path().join("ledger.db").display()),
        )
        .env("TOLLGATE__LEDGER__JOURNAL_DIR", dir.path().join("journal"))
        .env("TOLLGATE__LOG__FORMAT", "json")
        .env("TOLLGATE__LOG__LEVEL", "info,tollgate::usage=debug")
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines_tx, lines_rx) = mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut log = Vec::new();
    let addr = loop {
        let line = lines_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("gateway starts");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        log.push(line);
        if let Some(addr) = v["proxy_addr"].as_str() {
            break addr.to_owned();
        }
    };

    // Three streams of 20 events 50 ms apart (about a second each).
    let mut streams = Vec::new();
    for _ in 0..3 {
        let url = format!("http://{addr}/v1/messages");
        streams.push(tokio::spawn(async move {
            send(
                &http_client(),
                request(
                    Method::POST,
                    &url,
                    messages_body(true, 100),
                    &[
                        ("x-mock-output-tokens", "20"),
                        ("x-mock-event-delay-ms", "50"),
                    ],
                ),
            )
            .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());

    let mut ids = Vec::new();
    for s in streams {
        let resp = s.await.unwrap();
        assert_eq!(resp.status, 200);
        assert!(resp.error.is_none(), "{:?}", resp.error);
        let events = sse_events(&resp.text());
        assert!(
            events.last().unwrap().contains("message_stop"),
            "stream cut: {events:?}"
        );
        ids.push(resp.request_id());
    }
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    log.extend(lines_rx.try_iter());
    let finished: Vec<serde_json::Value> = log
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "request finished")
        .collect();
    for id in &ids {
        let rec = finished
            .iter()
            .find(|v| v["request_id"] == id.as_str())
            .unwrap_or_else(|| panic!("no record for {id}:\n{}", log.join("\n")));
        assert_eq!(rec["outcome"], "completed");
        assert_eq!(rec["output_tokens"], 20);
        assert_eq!(rec["usage_exact"], true);
    }
    assert_eq!(finished.len(), 3, "{}", log.join("\n"));
}

/// Past `server.shutdown_grace`, open streams are cut and recorded as
/// `interrupted`, and shutdown still completes.
#[tokio::test]
async fn streams_still_open_after_the_grace_are_recorded_as_interrupted() {
    let mock = mock_upstream::start(MockOptions::default()).await.unwrap();
    let gw = support::gateway::start_gateway(
        mock.url(),
        None,
        &[("TOLLGATE__SERVER__SHUTDOWN_GRACE", "200ms")],
    )
    .await;
    let url = format!("{}/v1/messages", gw.url());
    let response = http_client()
        .request(request(
            Method::POST,
            &url,
            messages_body(true, 1000),
            &[
                ("x-mock-output-tokens", "200"),
                ("x-mock-event-delay-ms", "50"),
            ],
        ))
        .await
        .unwrap();
    let request_id = response.headers()["tollgate-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let reader = tokio::spawn(async move {
        use http_body_util::BodyExt;
        let mut body = response.into_body();
        while let Some(Ok(_)) = body.frame().await {}
    });
    let started = std::time::Instant::now();
    let sink = gw.sink.clone();
    tokio::time::timeout(Duration::from_secs(10), gw.app.shutdown())
        .await
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    let record = sink.wait_for_request(&request_id).await;
    assert_eq!(record.outcome, tollgate::record::Outcome::Interrupted);
    assert!(!record.usage_exact);
    assert_eq!(sink.all().len(), 1);
    reader.await.unwrap();
}
