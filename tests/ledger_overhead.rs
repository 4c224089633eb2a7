//! A measurement, not a check (run with `--ignored --nocapture`, in release):
//! the gateway's throughput with the ledger on (SQLite, Postgres) and off (a
//! sink that drops records), in one process, the same workload alternating
//! between them so machine drift cancels out.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::Method;
use support::client::{http_client, messages_body, request, send};
use support::postgres::test_database;
use tollgate::app::{App, AppOptions, RunningApp};
use tollgate::config::Config;
use tollgate::mock_upstream::{self, MockOptions};
use tollgate::record::{RecordAck, UsageRecord, UsageSink};

/// Drops every record: the gateway with no ledger at all.
struct NoLedger;

impl UsageSink for NoLedger {
    fn record(&self, record: UsageRecord) -> RecordAck {
        drop(record);
        None
    }
}

async fn start(
    mock_url: &str,
    ledger_url: &str,
    dir: &std::path::Path,
    sink: Option<Arc<dyn UsageSink>>,
) -> RunningApp {
    let env = [
        ("TOLLGATE__SERVER__LISTEN", "127.0.0.1:0".to_owned()),
        ("TOLLGATE__ADMIN__LISTEN", "127.0.0.1:0".to_owned()),
        ("TOLLGATE__UPSTREAM__URL", mock_url.to_owned()),
        ("TOLLGATE__LEDGER__URL", ledger_url.to_owned()),
        (
            "TOLLGATE__LEDGER__JOURNAL_DIR",
            dir.join("journal").display().to_string(),
        ),
        ("TOLLGATE__LOG__LEVEL", "warn".to_owned()),
    ];
    let config =
        Config::load_from(None, env.iter().map(|(k, v)| ((*k).to_owned(), v.clone()))).unwrap();
    App::start(
        config,
        AppOptions {
            registry: None,
            sink,
        },
    )
    .await
    .unwrap()
}

/// Requests per second through `base` with `connections` clients for `secs`.
async fn throughput(base: &str, connections: usize, secs: f64) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let url = format!("{base}/v1/messages");
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let (stop, done, url) = (stop.clone(), done.clone(), url.clone());
        tasks.spawn(async move {
            let client = http_client();
            while !stop.load(Ordering::Relaxed) {
                let resp = send(
                    &client,
                    request(
                        Method::POST,
                        &url,
                        messages_body(false, 16),
                        &[("x-mock-output-tokens", "8")],
                    ),
                )
                .await;
                assert_eq!(resp.status, 200);
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let n = done.load(Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    while tasks.join_next().await.is_some() {}
    n as f64 / elapsed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn throughput_with_the_ledger_on_and_off() {
    let mock = mock_upstream::start(MockOptions::default()).await.unwrap();
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let pg = test_database().await.expect("Postgres for the measurement");
    let sqlite = format!("sqlite://{}", dirs[1].path().join("ledger.db").display());
    let apps = [
        (
            "off",
            start(
                mock.url(),
                &format!("sqlite://{}", dirs[0].path().join("keys.db").display()),
                dirs[0].path(),
                Some(Arc::new(NoLedger)),
            )
            .await,
        ),
        (
            "sqlite",
            start(mock.url(), &sqlite, dirs[1].path(), None).await,
        ),
        (
            "postgres",
            start(mock.url(), &pg.url, dirs[2].path(), None).await,
        ),
    ];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); apps.len()];
    for round in 0..4 {
        for (i, (_, app)) in apps.iter().enumerate() {
            let rate = throughput(&format!("http://{}", app.proxy_addr()), 32, 4.0).await;
            // The first round warms up pools and caches.
            if round > 0 {
                results[i].push(rate);
            }
        }
    }
    for (i, (name, _)) in apps.iter().enumerate() {
        let mut r = results[i].clone();
        r.sort_by(f64::total_cmp);
        eprintln!(
            "ledger {name:>8}: median {:>8.0} req/s  (runs {:?})",
            r[r.len() / 2],
            r.iter().map(|x| x.round()).collect::<Vec<_>>()
        );
    }
    for (_, app) in apps {
        app.shutdown().await.unwrap();
    }
}
