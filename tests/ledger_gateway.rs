//! The ledger behind the real gateway: exactly one row per request with the
//! usage the upstream reported, under load, through a store outage, and across
//! a SIGKILL.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use http_body_util::BodyExt;
use support::client::{http_client, messages_body, request, send};
use support::ledger::test_ledgers;
use support::postgres::test_database;
use support::process::GatewayProcess;
use support::relay::TcpRelay;
use tokio::sync::Semaphore;
use tollgate::app::{App, AppOptions};
use tollgate::config::Config;
use tollgate::mock_upstream::{self, MockOptions};

/// One `usage_events` row, as the tests compare it.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    outcome: String,
    usage_exact: bool,
    input: i64,
    output: i64,
    cache_write: i64,
    cache_read: i64,
}

const ROW_SQL: &str = "SELECT request_id, outcome, usage_exact, input_tokens, output_tokens, \
     cache_creation_input_tokens, cache_read_input_tokens FROM usage_events";

type RawRow = (String, String, bool, i64, i64, i64, i64);

/// Every row of the ledger at `url`, by request id, failing on duplicates.
async fn ledger_rows(url: &str) -> HashMap<String, Row> {
    let raw: Vec<RawRow> = if url.starts_with("postgres") {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        let rows = sqlx::query_as(ROW_SQL).fetch_all(&pool).await.unwrap();
        pool.close().await;
        rows
    } else {
        let pool = sqlx::SqlitePool::connect(url).await.unwrap();
        let rows = sqlx::query_as(ROW_SQL).fetch_all(&pool).await.unwrap();
        pool.close().await;
        rows
    };
    let mut out = HashMap::new();
    for (id, outcome, usage_exact, input, output, cache_write, cache_read) in raw {
        let row = Row {
            outcome,
            usage_exact,
            input,
            output,
            cache_write,
            cache_read,
        };
        assert!(out.insert(id.clone(), row).is_none(), "duplicate row {id}");
    }
    out
}

fn gateway_config(
    mock_url: &str,
    ledger_url: &str,
    journal: &std::path::Path,
    extra: &[(&str, &str)],
) -> Config {
    let mut env = vec![
        (
            "TOLLGATE__SERVER__LISTEN".to_owned(),
            "127.0.0.1:0".to_owned(),
        ),
        (
            "TOLLGATE__ADMIN__LISTEN".to_owned(),
            "127.0.0.1:0".to_owned(),
        ),
        ("TOLLGATE__UPSTREAM__URL".to_owned(), mock_url.to_owned()),
        ("TOLLGATE__UPSTREAM__MAX_RETRIES".to_owned(), "0".to_owned()),
        ("TOLLGATE__LEDGER__URL".to_owned(), ledger_url.to_owned()),
        (
            "TOLLGATE__LEDGER__JOURNAL_DIR".to_owned(),
            journal.display().to_string(),
        ),
    ];
    env.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    Config::load_from(None, env).unwrap()
}

/// What the client knows of one request once it ended.
#[derive(Debug)]
struct Sent {
    request_id: String,
    kind: Kind,
    /// The final usage the mock reported in `x-mock-usage`, for completed ones.
    reported: Option<String>,
    finished: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Stream,
    Json,
    Cached,
    Abandoned,
    UpstreamError,
    Reset,
}

impl Kind {
    fn of(i: usize) -> Kind {
        match i % 10 {
            0..=3 => Kind::Stream,
            4 | 5 => Kind::Json,
            6 => Kind::Cached,
            7 => Kind::Abandoned,
            8 => Kind::UpstreamError,
            _ => Kind::Reset,
        }
    }
}

/// Sends request number `i` of the mixed workload to the gateway at `base`.
async fn one_request(base: &str, i: usize) -> Sent {
    let kind = Kind::of(i);
    let url = format!("{base}/v1/messages");
    // Abandoned streams are long enough that the upstream never finishes
    // before the client leaves.
    let tokens = if kind == Kind::Abandoned {
        "200".to_owned()
    } else {
        format!("{}", 5 + i % 23)
    };
    let mut headers = vec![("x-mock-output-tokens", tokens.as_str())];
    match kind {
        Kind::Cached => headers.push(("x-mock-cache", "write=120,read=900,write_1h=30")),
        Kind::Abandoned => headers.push(("x-mock-event-delay-ms", "10")),
        Kind::UpstreamError => headers.push(("x-mock-fault", "status=500")),
        Kind::Reset => headers.push(("x-mock-fault", "reset-after=3")),
        _ => {}
    }
    let client = http_client();
    let req = request(
        Method::POST,
        &url,
        messages_body(kind != Kind::Json, 200),
        &headers,
    );
    if kind == Kind::Abandoned {
        let response = client.request(req).await.unwrap();
        let request_id = response.headers()["tollgate-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        let mut body = response.into_body();
        let _ = body.frame().await;
        let _ = body.frame().await;
        drop(body);
        return Sent {
            request_id,
            kind,
            reported: None,
            finished: Instant::now(),
        };
    }
    let resp = send(&client, req).await;
    let reported = match kind {
        Kind::Stream | Kind::Json | Kind::Cached => {
            assert_eq!(resp.status, 200, "{}", resp.text());
            Some(resp.headers["x-mock-usage"].to_str().unwrap().to_owned())
        }
        _ => None,
    };
    Sent {
        request_id: resp.request_id(),
        kind,
        reported,
        finished: Instant::now(),
    }
}

/// Runs `n` requests, `concurrency` at a time.
async fn workload(base: String, n: usize, concurrency: usize) -> Vec<Sent> {
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let permit = permits.clone().acquire_owned().await.unwrap();
        let base = base.clone();
        tasks.spawn(async move {
            let sent = one_request(&base, i).await;
            drop(permit);
            sent
        });
    }
    let mut out = Vec::new();
    while let Some(sent) = tasks.join_next().await {
        out.push(sent.unwrap());
    }
    out
}

fn format_usage(r: &Row) -> String {
    format!(
        "input={},output={},cache_write={},cache_read={}",
        r.input, r.output, r.cache_write, r.cache_read
    )
}

/// Every request has exactly one row; completed ones carry exactly the usage
/// the upstream reported; the ledger's exact totals equal the mock's.
fn check_parity(
    sent: &[Sent],
    rows: &HashMap<String, Row>,
    mock: &mock_upstream::MockStats,
    label: &str,
) {
    assert_eq!(rows.len(), sent.len(), "{label}: one row per request");
    let ids: HashSet<&str> = sent.iter().map(|s| s.request_id.as_str()).collect();
    assert_eq!(ids.len(), sent.len(), "{label}: request ids are unique");
    for s in sent {
        let row = rows
            .get(&s.request_id)
            .unwrap_or_else(|| panic!("{label}: no row for {s:?}"));
        let expected_outcome = match s.kind {
            Kind::Stream | Kind::Json | Kind::Cached => "completed",
            Kind::Abandoned => "client_disconnected",
            Kind::UpstreamError | Kind::Reset => "upstream_error",
        };
        assert_eq!(row.outcome, expected_outcome, "{label}: {s:?}");
        if let Some(reported) = &s.reported {
            assert!(row.usage_exact, "{label}: {s:?}");
            assert_eq!(&format_usage(row), reported, "{label}: {s:?}");
        }
        if matches!(s.kind, Kind::Abandoned | Kind::Reset) {
            assert!(!row.usage_exact, "{label}: {s:?}");
        }
    }
    let exact: Vec<&Row> = rows.values().filter(|r| r.usage_exact).collect();
    let sum = |f: fn(&Row) -> i64| exact.iter().map(|r| f(r)).sum::<i64>() as u64;
    assert_eq!(sum(|r| r.input), mock.input_tokens, "{label}: input totals");
    assert_eq!(
        sum(|r| r.output),
        mock.output_tokens,
        "{label}: output totals"
    );
    assert_eq!(
        sum(|r| r.cache_write),
        mock.cache_write_tokens,
        "{label}: cache write totals"
    );
    assert_eq!(
        sum(|r| r.cache_read),
        mock.cache_read_tokens,
        "{label}: cache read totals"
    );
}

/// A few thousand concurrent requests of every kind: one row each, exact sums.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parity_under_load() {
    for ledger in test_ledgers().await {
        let n = if ledger.backend == "postgres" {
            3000
        } else {
            1500
        };
        let mock = mock_upstream::start(MockOptions::default()).await.unwrap();
        let journal = tempfile::tempdir().unwrap();
        let config = gateway_config(mock.url(), &ledger.url, journal.path(), &[]);
        let app = App::start(config, AppOptions::default()).await.unwrap();
        let base = format!("http://{}", app.proxy_addr());
        let started = Instant::now();
        let sent = workload(base, n, 200).await;
        let elapsed = started.elapsed();
        eprintln!(
            "{}: {n} requests in {elapsed:?} ({:.0}/s)",
            ledger.backend,
            n as f64 / elapsed.as_secs_f64()
        );
        app.shutdown().await.unwrap();
        let rows = ledger_rows(&ledger.url).await;
        check_parity(&sent, &rows, &mock.stats(), ledger.backend);
    }
}

/// Postgres goes away mid-load and comes back: traffic keeps flowing, the
/// gateway stays ready, and every row arrives exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outage_mid_load_loses_nothing() {
    let Some(db) = test_database().await else {
        return;
    };
    let mut url = url::Url::parse(&db.url).unwrap();
    let target = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432));
    let target = tokio::net::lookup_host(target)
        .await
        .unwrap()
        .next()
        .unwrap();
    let relay = TcpRelay::start(target).await;
    url.set_port(Some(relay.addr().port())).unwrap();
    let _ = url.set_host(Some("127.0.0.1"));

    let mock = mock_upstream::start(MockOptions::default()).await.unwrap();
    let journal = tempfile::tempdir().unwrap();
    let config = gateway_config(mock.url(), url.as_str(), journal.path(), &[]);
    let app = App::start(config, AppOptions::default()).await.unwrap();
    let base = format!("http://{}", app.proxy_addr());
    let admin = format!("http://{}", app.admin_addr());

    let mut sent = workload(base.clone(), 300, 50).await;
    relay.cut().await;
    let during = tokio::spawn(workload(base.clone(), 600, 50));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let ready = send(
        &http_client(),
        request(Method::GET, &format!("{admin}/readyz"), "", &[]),
    )
    .await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(
        ready.json()["components"]["ledger"]["store_reachable"],
        false,
        "{}",
        ready.text()
    );
    sent.extend(during.await.unwrap());
    relay.restore();
    sent.extend(workload(base, 300, 50).await);
    app.shutdown().await.unwrap();

    let rows = ledger_rows(&db.url).await;
    check_parity(&sent, &rows, &mock.stats(), "outage");
}

/// Starts the binary on the given ledger and journal.
fn spawn_gateway(mock_url: &str, ledger_url: &str, journal: &std::path::Path) -> GatewayProcess {
    GatewayProcess::spawn(&[
        ("TOLLGATE__UPSTREAM__URL", mock_url.to_owned()),
        ("TOLLGATE__UPSTREAM__MAX_RETRIES", "0".to_owned()),
        ("TOLLGATE__LEDGER__URL", ledger_url.to_owned()),
        (
            "TOLLGATE__LEDGER__JOURNAL_DIR",
            journal.display().to_string(),
        ),
    ])
}

/// SIGKILL mid-load, then start again: every request that finished before the
/// kill is in the ledger exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_load_then_restart_loses_nothing() {
    for ledger in test_ledgers().await {
        let mock = mock_upstream::start(MockOptions::default()).await.unwrap();
        let journal = tempfile::tempdir().unwrap();
        let mut gateway = spawn_gateway(mock.url(), &ledger.url, journal.path());
        let base = gateway.url.clone();
        // Keep requests flowing, then kill the process in the middle of them.
        let load = tokio::spawn({
            let base = base.clone();
            async move {
                let mut done = Vec::new();
                let mut tasks = tokio::task::JoinSet::new();
                for i in 0..100_000usize {
                    if tasks.len() >= 40 {
                        match tasks.join_next().await.unwrap().unwrap() {
                            Some(sent) => done.push(sent),
                            None => break,
                        }
                    }
                    let base = base.clone();
                    // Only completed kinds: their rows must all survive.
                    let i = [0usize, 4, 6][i % 3] + 10 * i;
                    tasks.spawn(async move {
                        tokio::time::timeout(Duration::from_secs(5), async {
                            let client = http_client();
                            let resp = client
                                .request(request(
                                    Method::POST,
                                    &format!("{base}/v1/messages"),
                                    messages_body(Kind::of(i) != Kind::Json, 200),
                                    &[("x-mock-output-tokens", "8")],
                                ))
                                .await
                                .ok()?;
                            let id = resp.headers()["tollgate-request-id"]
                                .to_str()
                                .ok()?
                                .to_owned();
                            let body = resp.into_body().collect().await.ok()?;
                            let _ = body;
                            Some(Sent {
                                request_id: id,
                                kind: Kind::of(i),
                                reported: None,
                                finished: Instant::now(),
                            })
                        })
                        .await
                        .ok()
                        .flatten()
                    });
                }
                while let Some(r) = tasks.join_next().await {
                    if let Ok(Some(sent)) = r {
                        done.push(sent);
                    }
                }
                done
            }
        });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let killed_at = Instant::now();
        gateway.child.kill().unwrap(); // SIGKILL
        gateway.child.wait().unwrap();
        let done = load.await.unwrap();
        // The record is handed to the journal when the last byte is relayed;
        // allow the journal thread a moment to take it.
        let must_have: Vec<&Sent> = done
            .iter()
            .filter(|s| s.finished + Duration::from_millis(50) <= killed_at)
            .collect();
        assert!(
            must_have.len() > 100,
            "{}: only {} requests finished before the kill",
            ledger.backend,
            must_have.len()
        );

        // Start again on the same journal: it replays, then a graceful stop flushes.
        let restarted = spawn_gateway(mock.url(), &ledger.url, journal.path());
        assert_eq!(restarted.terminate(), Some(0));

        let rows = ledger_rows(&ledger.url).await;
        for s in must_have {
            let row = rows
                .get(&s.request_id)
                .unwrap_or_else(|| panic!("{}: lost {}", ledger.backend, s.request_id));
            assert_eq!(row.outcome, "completed");
            assert!(row.usage_exact);
            assert_eq!(row.output, 8);
        }
        eprintln!(
            "{}: {} rows after the crash, {} requests finished",
            ledger.backend,
            rows.len(),
            done.len()
        );
    }
}
