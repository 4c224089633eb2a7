//! The durable path: sink → journal → batch writer → store. Every record
//! arrives exactly once whatever fails: a store that is down at start or goes
//! away mid-load, a restart, a torn last write, a full journal.

// Helpers outside `#[test]` functions panic on purpose: a failed helper is a
// failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use prometheus::Registry;
use tollgate::ledger::journal::read_checkpoint;
use tollgate::ledger::{self, Store};
use tollgate::record::UsageSink;

use support::ledger::{at, ledger_config, sample_record, sqlite_url, test_ledgers};
use support::postgres::test_database;
use support::relay::TcpRelay;

/// A Postgres URL on a port where nothing listens: a store that is down.
async fn unreachable_store_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("postgres://postgres@127.0.0.1:{port}/postgres")
}

/// The stored request ids: in insertion order for SQLite (rowid), by id for Postgres.
async fn stored_ids(url: &str) -> Vec<String> {
    let store = Store::open_lazy(url, false).unwrap();
    let ids = match &store {
        Store::Sqlite(pool) => {
            sqlx::query_scalar("SELECT request_id FROM usage_events ORDER BY rowid")
                .fetch_all(pool)
                .await
                .unwrap()
        }
        Store::Postgres(pool) => {
            sqlx::query_scalar("SELECT request_id FROM usage_events ORDER BY request_id")
                .fetch_all(pool)
                .await
                .unwrap()
        }
    };
    store.close().await;
    ids
}

fn ids(range: std::ops::Range<u64>) -> Vec<String> {
    range.map(|i| sample_record(i, at(0)).request_id).collect()
}

/// A metric's value, by name and optional `stage` label.
fn metric(registry: &Registry, name: &str, stage: Option<&str>) -> f64 {
    for family in registry.gather() {
        if family.name() != name {
            continue;
        }
        for m in family.get_metric() {
            let matches = stage.is_none_or(|s| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == "stage" && l.value() == s)
            });
            if matches {
                return match family.get_field_type() {
                    prometheus::proto::MetricType::COUNTER => m.get_counter().get_value(),
                    prometheus::proto::MetricType::GAUGE => m.get_gauge().get_value(),
                    _ => m.get_histogram().get_sample_count() as f64,
                };
            }
        }
    }
    panic!("metric {name} {stage:?} not registered");
}

fn segments(journal: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(journal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "journal"))
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_reaches_the_store_exactly_once() {
    for db in test_ledgers().await {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::new();
        let cfg = ledger_config(&db.url, dir.path());
        let (sink, handle) = ledger::start(&cfg, &registry).await.unwrap();
        assert!(sink.accepting());
        // Four producers at once, as request tasks would.
        let mut producers = Vec::new();
        for p in 0..4u64 {
            let sink = sink.clone();
            producers.push(tokio::spawn(async move {
                for i in 0..500u64 {
                    sink.record(sample_record(p * 500 + i, at(i as i64)));
                    if i % 50 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            }));
        }
        for p in producers {
            p.await.unwrap();
        }
        assert!(
            handle.flushed(Duration::from_secs(60)).await,
            "[{}] not flushed",
            db.backend
        );
        let health = handle.health();
        assert!(
            health.ready() && health.store_reachable,
            "[{}] {health:?}",
            db.backend
        );
        assert_eq!(health.unflushed_records, 0);
        // With everything written, shutdown returns at once rather than
        // waiting out its bound (the sink is still alive, as in the gateway).
        let stopping = std::time::Instant::now();
        handle.shutdown(Duration::from_secs(30)).await;
        assert!(
            stopping.elapsed() < Duration::from_secs(10),
            "[{}] shutdown took {:?}",
            db.backend,
            stopping.elapsed()
        );

        let mut stored = stored_ids(&db.url).await;
        stored.sort();
        assert_eq!(stored, ids(0..2000), "[{}]", db.backend);
        assert_eq!(
            metric(
                &registry,
                "tollgate_ledger_records_total",
                Some("journalled")
            ),
            2000.0
        );
        assert_eq!(
            metric(&registry, "tollgate_ledger_records_total", Some("written")),
            2000.0
        );
        assert_eq!(
            metric(&registry, "tollgate_ledger_records_total", Some("replayed")),
            0.0
        );
        assert_eq!(
            metric(&registry, "tollgate_ledger_records_total", Some("dropped")),
            0.0
        );
        assert_eq!(metric(&registry, "tollgate_ledger_queue_depth", None), 0.0);
        assert!(metric(&registry, "tollgate_ledger_batch_size", None) > 0.0);
        assert!(metric(&registry, "tollgate_ledger_insert_seconds", None) > 0.0);
        assert_eq!(metric(&registry, "tollgate_ledger_journal_full", None), 0.0);
        assert_eq!(
            metric(&registry, "tollgate_ledger_oldest_unflushed_seconds", None),
            0.0
        );
        assert_eq!(read_checkpoint(&cfg.journal_dir), 2000);
        // Graceful shutdown after everything was written leaves nothing to replay.
        let (_sink, again) = ledger::start(&cfg, &Registry::new()).await.unwrap();
        assert_eq!(again.health().unflushed_records, 0);
        again.shutdown(Duration::from_secs(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_wait_in_the_journal_while_the_store_is_down_then_replay_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let down = ledger_config(&unreachable_store_url().await, dir.path());
    // The gateway must start, and keep accepting, with its store down.
    let registry = Registry::new();
    let (sink, handle) = ledger::start(&down, &registry).await.unwrap();
    for i in 0..300 {
        sink.record(sample_record(i, at(i as i64)));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while handle.health().unflushed_records < 300 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let health = handle.health();
    assert_eq!(health.unflushed_records, 300, "{health:?}");
    assert!(
        !health.store_reachable && health.accepting && health.ready(),
        "{health:?}"
    );
    assert!(health.journal_bytes > 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        handle.health().oldest_unflushed_seconds > 0.2,
        "{:?}",
        handle.health()
    );
    assert!(metric(&registry, "tollgate_ledger_oldest_unflushed_seconds", None) > 0.2);
    assert_eq!(metric(&registry, "tollgate_ledger_store_up", None), 0.0);
    // Shutdown cannot reach the store: the records stay in the journal.
    handle.shutdown(Duration::from_millis(200)).await;
    assert_eq!(read_checkpoint(&down.journal_dir), 0);
    assert!(!segments(&down.journal_dir).is_empty());

    // Next start, with a store that works: everything replays, in order.
    let url = sqlite_url(dir.path());
    let registry = Registry::new();
    let (sink, handle) = ledger::start(&ledger_config(&url, dir.path()), &registry)
        .await
        .unwrap();
    sink.record(sample_record(300, at(300)));
    assert!(handle.flushed(Duration::from_secs(30)).await);
    handle.shutdown(Duration::from_secs(5)).await;
    assert_eq!(stored_ids(&url).await, ids(0..301));
    assert_eq!(
        metric(&registry, "tollgate_ledger_records_total", Some("replayed")),
        300.0
    );
    assert_eq!(
        metric(&registry, "tollgate_ledger_records_total", Some("written")),
        301.0
    );
}

/// Journals `n` records with the store down and stops; returns the config.
async fn journal_offline(dir: &Path, n: u64) -> tollgate::config::LedgerConfig {
    let cfg = ledger_config(&unreachable_store_url().await, dir);
    let (sink, handle) = ledger::start(&cfg, &Registry::new()).await.unwrap();
    for i in 0..n {
        sink.record(sample_record(i, at(i as i64)));
    }
    handle.shutdown(Duration::from_millis(100)).await;
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_last_write_is_cut_off_and_everything_before_it_replays() {
    // A crash in the middle of writing record 51: its frame is incomplete.
    let dir = tempfile::tempdir().unwrap();
    let cfg = journal_offline(dir.path(), 51).await;
    let files = segments(&cfg.journal_dir);
    let newest = files.last().unwrap();
    let len = std::fs::metadata(newest).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(newest)
        .unwrap()
        .set_len(len - 10)
        .unwrap();

    let url = sqlite_url(dir.path());
    let (sink, handle) = ledger::start(&ledger_config(&url, dir.path()), &Registry::new())
        .await
        .unwrap();
    // Records after the restart follow the cut-off point.
    sink.record(sample_record(1000, at(0)));
    assert!(handle.flushed(Duration::from_secs(30)).await);
    handle.shutdown(Duration::from_secs(5)).await;
    let mut expected = ids(0..50);
    expected.push(sample_record(1000, at(0)).request_id);
    assert_eq!(stored_ids(&url).await, expected);

    // A crash that left zeroed blocks after the last record (as some file
    // systems do when the size was updated but the data was not).
    let dir = tempfile::tempdir().unwrap();
    let cfg = journal_offline(dir.path(), 40).await;
    let newest = segments(&cfg.journal_dir).pop().unwrap();
    let mut bytes = std::fs::read(&newest).unwrap();
    bytes.extend(std::iter::repeat_n(0u8, 4096));
    std::fs::write(&newest, bytes).unwrap();
    let url = sqlite_url(dir.path());
    let (_sink, handle) = ledger::start(&ledger_config(&url, dir.path()), &Registry::new())
        .await
        .unwrap();
    assert!(handle.flushed(Duration::from_secs(30)).await);
    handle.shutdown(Duration::from_secs(5)).await;
    assert_eq!(stored_ids(&url).await, ids(0..40));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_twice_inserts_nothing_twice() {
    // The checkpoint is lost after the rows were written (a crash between the
    // insert and the checkpoint): the replay must not duplicate them.
    for db in test_ledgers().await {
        let dir = tempfile::tempdir().unwrap();
        let cfg = journal_offline(dir.path(), 30).await;
        let journal = std::fs::read_dir(&cfg.journal_dir).unwrap().count();
        assert!(journal > 0);
        let cfg = ledger_config(&db.url, dir.path());
        let (_sink, handle) = ledger::start(&cfg, &Registry::new()).await.unwrap();
        assert!(handle.flushed(Duration::from_secs(30)).await);
        handle.shutdown(Duration::from_secs(5)).await;
        // Put the journal back as it was before the checkpoint.
        let again = journal_offline(&dir.path().join("again"), 30).await;
        let registry = Registry::new();
        let cfg = tollgate::config::LedgerConfig {
            journal_dir: again.journal_dir,
            ..cfg
        };
        let (_sink, handle) = ledger::start(&cfg, &registry).await.unwrap();
        assert!(handle.flushed(Duration::from_secs(30)).await);
        handle.shutdown(Duration::from_secs(5)).await;
        let mut stored = stored_ids(&db.url).await;
        stored.sort();
        assert_eq!(stored, ids(0..30), "[{}]", db.backend);
        assert_eq!(
            metric(
                &registry,
                "tollgate_ledger_records_total",
                Some("duplicate")
            ),
            30.0,
            "[{}]",
            db.backend
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn written_segments_are_deleted_after_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path());
    // 64 KiB of journal: 4 KiB segments, a few records each.
    let cfg = tollgate::config::LedgerConfig {
        journal_max_bytes: 64 * 1024,
        ..ledger_config(&url, dir.path())
    };
    let registry = Registry::new();
    let (sink, handle) = ledger::start(&cfg, &registry).await.unwrap();
    let mut most_segments = 0;
    for i in 0..600 {
        sink.record(sample_record(i, at(i as i64)));
        if i % 20 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
            most_segments = most_segments.max(segments(&cfg.journal_dir).len());
        }
    }
    assert!(handle.flushed(Duration::from_secs(30)).await);
    assert!(
        most_segments >= 2,
        "the test must roll segments over ({most_segments})"
    );
    let left = segments(&cfg.journal_dir);
    assert!(left.len() <= 2, "segments left: {left:?}");
    let on_disk: u64 = left
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!(
        metric(&registry, "tollgate_ledger_journal_bytes", None),
        on_disk as f64
    );
    // Back under the limit: only the segment being written (and perhaps the
    // one before it) remain.
    assert!(on_disk < cfg.journal_max_bytes, "{on_disk} bytes left");
    assert_eq!(read_checkpoint(&cfg.journal_dir), 600);
    handle.shutdown(Duration::from_secs(5)).await;
    assert_eq!(stored_ids(&url).await.len(), 600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_journal_refuses_new_requests_but_keeps_every_finalised_record() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tollgate::config::LedgerConfig {
        journal_max_bytes: 32 * 1024,
        ..ledger_config(&unreachable_store_url().await, dir.path())
    };
    let registry = Registry::new();
    let (sink, handle) = ledger::start(&cfg, &registry).await.unwrap();
    let mut recorded = 0u64;
    while sink.accepting() && recorded < 5_000 {
        sink.record(sample_record(recorded, at(0)));
        recorded += 1;
        if recorded.is_multiple_of(5) {
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    }
    assert!(
        !sink.accepting(),
        "journal never filled after {recorded} records"
    );
    assert!(recorded > 10);
    let health = handle.health();
    assert!(health.journal_full && !health.ready(), "{health:?}");
    assert_eq!(metric(&registry, "tollgate_ledger_journal_full", None), 1.0);
    // Requests already in flight still finish and are recorded.
    for i in 0..25 {
        sink.record(sample_record(recorded + i, at(0)));
    }
    let total = recorded + 25;
    handle.shutdown(Duration::from_millis(100)).await;

    // The store comes back: every record arrives and the journal drains.
    let url = sqlite_url(dir.path());
    let cfg = tollgate::config::LedgerConfig {
        url: tollgate::secret::MaskedUrl::new(url.clone()),
        ..cfg
    };
    let registry = Registry::new();
    let (sink, handle) = ledger::start(&cfg, &registry).await.unwrap();
    assert!(handle.flushed(Duration::from_secs(30)).await);
    assert!(sink.accepting(), "{:?}", handle.health());
    assert_eq!(metric(&registry, "tollgate_ledger_journal_full", None), 0.0);
    handle.shutdown(Duration::from_secs(5)).await;
    assert_eq!(stored_ids(&url).await, ids(0..total));
}

/// A row the store refuses as invalid (here a trigger refuses it) cannot
/// hold back the rest: it is set aside in `rejected.jsonl`, counted, and the
/// other rows of its batch go in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_the_store_refuses_is_set_aside_and_the_others_go_in() {
    for db in test_ledgers().await {
        let store = Store::open_lazy(&db.url, true).unwrap();
        store.migrate().await.unwrap();
        match &store {
            Store::Sqlite(pool) => {
                sqlx::query(
                    "CREATE TRIGGER refuse_poison BEFORE INSERT ON usage_events \
                     WHEN NEW.end_user = 'poison' BEGIN SELECT RAISE(ABORT, 'poison row'); END",
                )
                .execute(pool)
                .await
                .unwrap();
            }
            Store::Postgres(pool) => {
                sqlx::query(
                    "CREATE FUNCTION refuse_poison() RETURNS trigger AS $$ BEGIN \
                     IF NEW.end_user = 'poison' THEN \
                     RAISE EXCEPTION 'poison row' USING ERRCODE = '22023'; END IF; \
                     RETURN NEW; END $$ LANGUAGE plpgsql",
                )
                .execute(pool)
                .await
                .unwrap();
                sqlx::query(
                    "CREATE TRIGGER refuse_poison BEFORE INSERT ON usage_events \
                     FOR EACH ROW EXECUTE FUNCTION refuse_poison()",
                )
                .execute(pool)
                .await
                .unwrap();
            }
        }
        store.close().await;

        let dir = tempfile::tempdir().unwrap();
        let cfg = ledger_config(&db.url, dir.path());
        let registry = Registry::new();
        let (sink, handle) = ledger::start(&cfg, &registry).await.unwrap();
        for i in 0..20 {
            let mut record = sample_record(i, at(0));
            if i == 7 {
                record.end_user = Some("poison".to_owned());
            }
            sink.record(record);
        }
        assert!(
            handle.flushed(Duration::from_secs(30)).await,
            "[{}]",
            db.backend
        );
        handle.shutdown(Duration::from_secs(5)).await;

        let mut expected = ids(0..20);
        expected.remove(7);
        let mut stored = stored_ids(&db.url).await;
        stored.sort();
        assert_eq!(stored, expected, "[{}]", db.backend);
        let rejected = std::fs::read_to_string(cfg.journal_dir.join("rejected.jsonl")).unwrap();
        let lines: Vec<tollgate::record::UsageRecord> = rejected
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 1, "[{}] {rejected}", db.backend);
        assert_eq!(lines[0].request_id, sample_record(7, at(0)).request_id);
        assert_eq!(
            metric(&registry, "tollgate_ledger_records_total", Some("dropped")),
            1.0,
            "[{}]",
            db.backend
        );
        assert_eq!(
            metric(&registry, "tollgate_ledger_records_total", Some("written")),
            19.0,
            "[{}]",
            db.backend
        );
    }
}

/// The store goes away mid-load (a relay in front of Postgres is cut) and
/// comes back: every record arrives exactly once, none is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outage_mid_load_loses_and_duplicates_nothing() {
    let Some(db) = test_database().await else {
        return;
    };
    let mut url = url::Url::parse(&db.url).unwrap();
    let target: SocketAddr = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432))
        .parse()
        .unwrap();
    let relay = TcpRelay::start(target).await;
    url.set_port(Some(relay.addr().port())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = ledger_config(url.as_str(), dir.path());
    let registry = Registry::new();
    let (sink, handle) = ledger::start(&cfg, &registry).await.unwrap();

    let produce = |from: u64, to: u64| {
        let sink = sink.clone();
        async move {
            for i in from..to {
                sink.record(sample_record(i, at(i as i64)));
                if i % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    };
    produce(0, 1000).await;
    relay.cut().await;
    produce(1000, 2000).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while handle.health().store_reachable && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let during = handle.health();
    assert!(!during.store_reachable && during.ready(), "{during:?}");
    assert!(during.unflushed_records > 0);
    produce(2000, 2500).await;
    relay.restore();
    produce(2500, 3000).await;
    assert!(
        handle.flushed(Duration::from_secs(60)).await,
        "{:?}",
        handle.health()
    );
    handle.shutdown(Duration::from_secs(5)).await;

    assert_eq!(stored_ids(&db.url).await, ids(0..3000));
    let store = Store::open_lazy(&db.url, false).unwrap();
    if let Store::Postgres(pool) = &store {
        let sum: i64 = sqlx::query_scalar("SELECT sum(input_tokens)::int8 FROM usage_events")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(sum, (0..3000).map(|i| 100 + i).sum::<i64>());
    }
    store.close().await;
    assert!(metric(&registry, "tollgate_ledger_store_errors_total", None) > 0.0);
    assert_eq!(
        metric(&registry, "tollgate_ledger_records_total", Some("dropped")),
        0.0
    );
}

/// Run by hand: `cargo test --release --test ledger_journal -- --ignored --nocapture`.
/// Prints the rows per second the writer sustains into the test Postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_writer_rows_per_second_into_postgres() {
    let Some(db) = test_database().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let n = 200_000u64;
    for (batch_size, fsync) in [(500usize, 20u64), (2000, 20)] {
        let registry = Registry::new();
        let cfg = tollgate::config::LedgerConfig {
            batch_size,
            fsync_interval: Duration::from_millis(fsync),
            batch_interval: Duration::from_millis(100),
            journal_dir: dir.path().join(format!("journal-{batch_size}")),
            ..ledger_config(&db.url, dir.path())
        };
        let (sink, handle) = ledger::start(&cfg, &registry).await.unwrap();
        let offset = batch_size as u64 * 1_000_000;
        let started = Instant::now();
        for i in 0..n {
            sink.record(sample_record(offset + i, at(0)));
        }
        let queued = started.elapsed();
        assert!(handle.flushed(Duration::from_secs(600)).await);
        let elapsed = started.elapsed();
        handle.shutdown(Duration::from_secs(5)).await;
        println!(
            "batch_size {batch_size}: {n} rows in {:.2}s = {:.0} rows/s into Postgres (sink took {:.3}s, {:.0} records/s)",
            elapsed.as_secs_f64(),
            n as f64 / elapsed.as_secs_f64(),
            queued.as_secs_f64(),
            n as f64 / queued.as_secs_f64()
        );
    }
}
