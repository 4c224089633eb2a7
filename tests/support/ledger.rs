//! Ledger test helpers: sample usage records, a ledger configuration in a
//! temporary directory, and the test databases of both backends.

// Helpers outside `#[test]` functions panic on purpose: a failed helper is a
// failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use tollgate::config::LedgerConfig;
use tollgate::meter::Usage;
use tollgate::record::{Outcome, UsageRecord};
use tollgate::secret::MaskedUrl;

use super::postgres::{TestDatabase, test_database};

/// A complete record, distinct per `i`, started at `started_at`.
pub fn sample_record(i: u64, started_at: DateTime<Utc>) -> UsageRecord {
    UsageRecord {
        request_id: format!("req_{i:08}"),
        upstream_request_id: Some(format!("up_{i}")),
        message_id: Some(format!("msg_{i}")),
        key_id: format!("key_{}", i % 3),
        team: Some(format!("team_{}", i % 2)),
        model: Some("claude-sonnet-4-5".to_owned()),
        endpoint: "/v1/messages".to_owned(),
        stream: i.is_multiple_of(2),
        status: 200,
        outcome: Outcome::Completed,
        error_type: None,
        stop_reason: Some("end_turn".to_owned()),
        usage: Usage {
            input_tokens: 100 + i,
            output_tokens: 10 + i,
            cache_creation_input_tokens: 7,
            cache_creation_5m_tokens: Some(5),
            cache_creation_1h_tokens: Some(2),
            cache_read_input_tokens: 3,
            web_search_requests: i % 2,
            service_tier: Some("standard".to_owned()),
            inference_geo: Some("global".to_owned()),
        },
        usage_exact: true,
        cost_nanousd: Some(1_000 + i as i64),
        price_version: Some("test".to_owned()),
        end_user: Some(format!("user_{}", i % 4)),
        tags: None,
        attempts: 1,
        queued_ms: 0,
        ttfb_ms: Some(12),
        duration_ms: 345,
        started_at,
        finished_at: started_at + chrono::Duration::milliseconds(345),
        meter_errors: 0,
        long_context_beta: false,
    }
}

/// A fixed instant for reproducible data: 2025-03-01 10:00:00 UTC plus `secs`.
pub fn at(secs: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 3, 1, 10, 0, 0)
        .single()
        .expect("valid time")
        + chrono::Duration::seconds(secs)
}

/// A ledger configuration with its journal in `dir`, quick to flush.
pub fn ledger_config(url: &str, dir: &Path) -> LedgerConfig {
    LedgerConfig {
        url: MaskedUrl::new(url),
        journal_dir: dir.join("journal"),
        fsync_interval: Duration::from_millis(2),
        batch_interval: Duration::from_millis(10),
        ..LedgerConfig::default()
    }
}

/// A SQLite URL for a new file in `dir`.
pub fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("ledger.db").display())
}

/// One ledger database of a test: SQLite in a temporary directory, or a
/// fresh Postgres database.
pub struct TestLedger {
    /// `sqlite` or `postgres`, for failure messages.
    pub backend: &'static str,
    pub url: String,
    _dir: tempfile::TempDir,
    _pg: Option<TestDatabase>,
}

/// The databases a store test runs against: SQLite always, Postgres when
/// reachable (required under `CI=true`).
pub async fn test_ledgers() -> Vec<TestLedger> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut out = vec![TestLedger {
        backend: "sqlite",
        url: sqlite_url(dir.path()),
        _dir: dir,
        _pg: None,
    }];
    if let Some(pg) = test_database().await {
        out.push(TestLedger {
            backend: "postgres",
            url: pg.url.clone(),
            _dir: tempfile::tempdir().expect("tempdir"),
            _pg: Some(pg),
        });
    }
    out
}
