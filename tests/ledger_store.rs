//! The ledger stores, against both backends: SQLite in a temporary directory
//! and a fresh database on the test Postgres (see `tests/support/postgres.rs`).
//! Migrations, idempotent inserts, the `usage_daily` view, `tollgate usage` in
//! every format (through the real binary) and `tollgate reprice`.

// Helpers outside `#[test]` functions panic on purpose: a failed helper is a
// failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::process::Command;

use chrono::{DateTime, Utc};
use sqlx::Row;
use tollgate::ledger::cli::reprice_store;
use tollgate::ledger::{Backend, Store};
use tollgate::meter::Usage;
use tollgate::prices::{CostQuery, PriceTable};
use tollgate::record::UsageRecord;

use support::ledger::{TestLedger, at, sample_record, test_ledgers};

async fn migrated(db: &TestLedger) -> Store {
    let store = Store::open_lazy(&db.url, true).expect("store url");
    store
        .migrate()
        .await
        .unwrap_or_else(|e| panic!("[{}] migrate: {e}", db.backend));
    store
}

async fn count(store: &Store, sql: &str) -> i64 {
    match store {
        Store::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap(),
        Store::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap(),
    }
}

#[tokio::test]
async fn migrations_create_every_table_and_are_idempotent() {
    for db in test_ledgers().await {
        let store = migrated(&db).await;
        store
            .migrate()
            .await
            .unwrap_or_else(|e| panic!("[{}] second migrate: {e}", db.backend));
        assert_eq!(
            count(&store, "SELECT count(*) FROM _sqlx_migrations").await,
            1,
            "[{}]",
            db.backend
        );
        for table in ["usage_events", "api_keys", "usage_daily"] {
            assert_eq!(
                count(&store, &format!("SELECT count(*) FROM {table}")).await,
                0,
                "[{}] {table}",
                db.backend
            );
        }
        // The columns finance depends on, by name, in both backends.
        let columns = "request_id, upstream_request_id, message_id, key_id, team, model, endpoint, \
            stream, status, outcome, error_type, stop_reason, input_tokens, output_tokens, \
            cache_creation_input_tokens, cache_creation_5m_tokens, cache_creation_1h_tokens, \
            cache_read_input_tokens, web_search_requests, service_tier, usage_exact, cost_nanousd, \
            price_version, end_user, tags, attempts, queued_ms, ttfb_ms, duration_ms, started_at, \
            finished_at, inference_geo, long_context_beta, meter_errors";
        count(
            &store,
            &format!("SELECT count(*) FROM (SELECT {columns} FROM usage_events) AS t"),
        )
        .await;
        let key_columns = "id, name, team, kind, secret_hash, key_prefix, rpm, input_tpm, output_tpm, \
            max_concurrent, budget_nanousd, budget_period, shadow, created_at, expires_at, revoked_at";
        count(
            &store,
            &format!("SELECT count(*) FROM (SELECT {key_columns} FROM api_keys) AS t"),
        )
        .await;
        let daily = "day, key_id, team, model, requests, input_tokens, output_tokens, \
            cache_creation_input_tokens, cache_creation_5m_tokens, cache_creation_1h_tokens, \
            cache_read_input_tokens, web_search_requests, cost_nanousd, cost_usd, unpriced_requests";
        count(
            &store,
            &format!("SELECT count(*) FROM (SELECT {daily} FROM usage_daily) AS t"),
        )
        .await;
        store.close().await;
    }
}

#[tokio::test]
async fn the_same_request_is_stored_once() {
    for db in test_ledgers().await {
        let store = migrated(&db).await;
        let a = sample_record(1, at(0));
        let b = sample_record(2, at(1));
        assert_eq!(
            store.insert(&[a.clone(), b.clone()]).await.unwrap(),
            2,
            "[{}]",
            db.backend
        );
        // Again, alone and within a batch that repeats it.
        assert_eq!(
            store.insert(std::slice::from_ref(&a)).await.unwrap(),
            0,
            "[{}]",
            db.backend
        );
        let c = sample_record(3, at(2));
        assert_eq!(
            store
                .insert(&[b.clone(), c.clone(), c.clone()])
                .await
                .unwrap(),
            1,
            "[{}]",
            db.backend
        );
        assert_eq!(
            count(&store, "SELECT count(*) FROM usage_events").await,
            3,
            "[{}]",
            db.backend
        );
        store.close().await;
    }
}

/// Reads one stored row back as a record, column by column.
async fn read_back(store: &Store, request_id: &str) -> UsageRecord {
    macro_rules! read {
        ($row:expr, $ts:expr) => {{
            let row = $row;
            UsageRecord {
                request_id: row.get("request_id"),
                upstream_request_id: row.get("upstream_request_id"),
                message_id: row.get("message_id"),
                key_id: row.get("key_id"),
                team: row.get("team"),
                model: row.get("model"),
                endpoint: row.get("endpoint"),
                stream: row.get("stream"),
                status: u16::try_from(row.get::<i32, _>("status")).unwrap(),
                outcome: tollgate::record::Outcome::parse(row.get("outcome")).unwrap(),
                error_type: row.get("error_type"),
                stop_reason: row.get("stop_reason"),
                usage: Usage {
                    input_tokens: row.get::<i64, _>("input_tokens") as u64,
                    output_tokens: row.get::<i64, _>("output_tokens") as u64,
                    cache_creation_input_tokens: row.get::<i64, _>("cache_creation_input_tokens")
                        as u64,
                    cache_creation_5m_tokens: row
                        .get::<Option<i64>, _>("cache_creation_5m_tokens")
                        .map(|n| n as u64),
                    cache_creation_1h_tokens: row
                        .get::<Option<i64>, _>("cache_creation_1h_tokens")
                        .map(|n| n as u64),
                    cache_read_input_tokens: row.get::<i64, _>("cache_read_input_tokens") as u64,
                    web_search_requests: row.get::<i64, _>("web_search_requests") as u64,
                    service_tier: row.get("service_tier"),
                    inference_geo: row.get("inference_geo"),
                },
                usage_exact: row.get("usage_exact"),
                cost_nanousd: row.get("cost_nanousd"),
                price_version: row.get("price_version"),
                end_user: row.get("end_user"),
                tags: row.get("tags"),
                attempts: row.get::<i32, _>("attempts") as u32,
                queued_ms: row.get::<i64, _>("queued_ms") as u64,
                ttfb_ms: row.get::<Option<i64>, _>("ttfb_ms").map(|n| n as u64),
                duration_ms: row.get::<i64, _>("duration_ms") as u64,
                started_at: $ts(&row, "started_at"),
                finished_at: $ts(&row, "finished_at"),
                meter_errors: row.get::<i32, _>("meter_errors") as u32,
                long_context_beta: row.get("long_context_beta"),
            }
        }};
    }
    let sql = "SELECT * FROM usage_events WHERE request_id = $1";
    match store {
        Store::Postgres(pool) => {
            let row = sqlx::query(sql)
                .bind(request_id)
                .fetch_one(pool)
                .await
                .unwrap();
            read!(row, |r: &sqlx::postgres::PgRow, c: &str| r
                .get::<DateTime<Utc>, _>(c))
        }
        Store::Sqlite(pool) => {
            let row = sqlx::query(sql)
                .bind(request_id)
                .fetch_one(pool)
                .await
                .unwrap();
            read!(row, |r: &sqlx::sqlite::SqliteRow, c: &str| {
                let text: String = r.get(c);
                assert_eq!(
                    text.len(),
                    "2025-03-01T10:00:00.000000Z".len(),
                    "fixed-width timestamp {text}"
                );
                text.parse::<DateTime<Utc>>().unwrap()
            })
        }
    }
}

#[tokio::test]
async fn every_field_round_trips() {
    for db in test_ledgers().await {
        let store = migrated(&db).await;
        let mut full = sample_record(7, at(0) + chrono::Duration::microseconds(123_456));
        full.tags = Some("team=search,env=prod".to_owned());
        full.error_type = Some("overloaded_error".to_owned());
        full.outcome = tollgate::record::Outcome::StreamError;
        full.long_context_beta = true;
        full.meter_errors = 2;
        full.attempts = 3;
        full.usage.inference_geo = Some("us".to_owned());
        let mut sparse = sample_record(8, at(5));
        sparse.upstream_request_id = None;
        sparse.message_id = None;
        sparse.team = None;
        sparse.model = None;
        sparse.usage = Usage::default();
        sparse.cost_nanousd = None;
        sparse.price_version = None;
        sparse.end_user = None;
        sparse.ttfb_ms = None;
        sparse.usage_exact = false;
        store.insert(&[full.clone(), sparse.clone()]).await.unwrap();
        assert_eq!(
            read_back(&store, &full.request_id).await,
            full,
            "[{}]",
            db.backend
        );
        assert_eq!(
            read_back(&store, &sparse.request_id).await,
            sparse,
            "[{}]",
            db.backend
        );
        store.close().await;
    }
}

#[tokio::test]
async fn postgres_text_with_nul_is_stored_not_refused() {
    for db in test_ledgers().await {
        let store = migrated(&db).await;
        let mut r = sample_record(1, at(0));
        r.end_user = Some("bad\0user".to_owned());
        assert_eq!(store.insert(&[r]).await.unwrap(), 1, "[{}]", db.backend);
        store.close().await;
    }
}

/// The `usage_daily` view against sums computed here from the same records.
#[tokio::test]
async fn usage_daily_sums_every_column_by_day_key_team_and_model() {
    for db in test_ledgers().await {
        let store = migrated(&db).await;
        let mut records = Vec::new();
        for i in 0..60u64 {
            // Three UTC days, with records close to midnight on either side.
            let mut r = sample_record(i, at(i as i64 * 3_000 + 40_000));
            if i % 5 == 0 {
                r.model = Some("claude-haiku-4-5".to_owned());
            }
            if i % 7 == 0 {
                r.cost_nanousd = None;
            }
            if i % 11 == 0 {
                r.usage.cache_creation_5m_tokens = None;
                r.usage.cache_creation_1h_tokens = None;
            }
            records.push(r);
        }
        store.insert(&records).await.unwrap();

        type Key = (String, String, Option<String>, Option<String>);
        let mut expected: BTreeMap<Key, [i64; 12]> = BTreeMap::new();
        for r in &records {
            let key = (
                r.started_at.format("%Y-%m-%d").to_string(),
                r.key_id.clone(),
                r.team.clone(),
                r.model.clone(),
            );
            let e = expected.entry(key).or_default();
            let u = &r.usage;
            let add = [
                1,
                u.input_tokens as i64,
                u.output_tokens as i64,
                u.cache_creation_input_tokens as i64,
                u.cache_creation_5m_tokens.unwrap_or(0) as i64,
                u.cache_creation_1h_tokens.unwrap_or(0) as i64,
                u.cache_read_input_tokens as i64,
                u.web_search_requests as i64,
                r.cost_nanousd.unwrap_or(0),
                i64::from(r.cost_nanousd.is_none()),
                0,
                0,
            ];
            for (slot, n) in e.iter_mut().zip(add) {
                *slot += n;
            }
        }
        let days: std::collections::BTreeSet<&str> =
            expected.keys().map(|k| k.0.as_str()).collect();
        assert_eq!(days.len(), 3, "the data spans three days");

        let (day, usd) = match store.backend() {
            Backend::Postgres => ("day::text", "cost_usd::float8"),
            Backend::Sqlite => ("day", "cost_usd"),
        };
        let sql = format!(
            "SELECT {day} AS day, key_id, team, model, requests, input_tokens, output_tokens, \
             cache_creation_input_tokens, cache_creation_5m_tokens, cache_creation_1h_tokens, \
             cache_read_input_tokens, web_search_requests, cost_nanousd, unpriced_requests, {usd} AS usd \
             FROM usage_daily"
        );
        let mut actual: BTreeMap<Key, [i64; 12]> = BTreeMap::new();
        macro_rules! collect {
            ($rows:expr) => {
                for row in $rows {
                    let key = (
                        row.get("day"),
                        row.get("key_id"),
                        row.get("team"),
                        row.get("model"),
                    );
                    let mut sums = [0i64; 12];
                    for (i, name) in [
                        "requests",
                        "input_tokens",
                        "output_tokens",
                        "cache_creation_input_tokens",
                        "cache_creation_5m_tokens",
                        "cache_creation_1h_tokens",
                        "cache_read_input_tokens",
                        "web_search_requests",
                        "cost_nanousd",
                        "unpriced_requests",
                    ]
                    .iter()
                    .enumerate()
                    {
                        sums[i] = row.get::<i64, _>(*name);
                    }
                    let usd: f64 = row.get("usd");
                    assert!(
                        (usd - sums[8] as f64 / 1e9).abs() < 1e-12,
                        "cost_usd {usd} vs {}",
                        sums[8]
                    );
                    actual.insert(key, sums);
                }
            };
        }
        match &store {
            Store::Postgres(pool) => collect!(sqlx::query(&sql).fetch_all(pool).await.unwrap()),
            Store::Sqlite(pool) => collect!(sqlx::query(&sql).fetch_all(pool).await.unwrap()),
        }
        assert_eq!(actual, expected, "[{}]", db.backend);
        store.close().await;
    }
}

/// The known data behind the `tollgate usage` tests.
fn report_data() -> Vec<UsageRecord> {
    let day = |d: u32, h: u32| -> DateTime<Utc> {
        chrono::TimeZone::with_ymd_and_hms(&Utc, 2025, 3, d, h, 0, 0)
            .single()
            .unwrap()
    };
    let base = |i: u64, key: &str, team: Option<&str>, model: &str, started: DateTime<Utc>| {
        let mut r = sample_record(i, started);
        r.key_id = key.to_owned();
        r.team = team.map(str::to_owned);
        r.model = Some(model.to_owned());
        r.end_user = None;
        r.usage = Usage::default();
        r
    };
    let mut r1 = base(1, "key_a", Some("team_x"), "claude-opus-4-5", day(1, 9));
    r1.usage.input_tokens = 100;
    r1.usage.output_tokens = 10;
    r1.usage.cache_creation_input_tokens = 5;
    r1.usage.cache_read_input_tokens = 20;
    r1.cost_nanousd = Some(1_500_000_000);
    r1.end_user = Some("u1".to_owned());
    let mut r2 = base(2, "key_a", Some("team_x"), "claude-sonnet-4-5", day(1, 23));
    r2.usage.input_tokens = 200;
    r2.usage.output_tokens = 20;
    r2.usage.web_search_requests = 1;
    r2.cost_nanousd = Some(12_500_000);
    r2.end_user = Some("u2".to_owned());
    let mut r3 = base(3, "key_b", Some("team_y"), "claude-opus-4-5", day(2, 0));
    r3.usage.input_tokens = 300;
    r3.usage.output_tokens = 30;
    r3.usage.cache_read_input_tokens = 10;
    r3.cost_nanousd = Some(2_000_000_000);
    r3.end_user = Some("u1".to_owned());
    let mut r4 = base(4, "key_b", None, "mystery-model", day(2, 12));
    r4.usage.input_tokens = 50;
    r4.usage.output_tokens = 5;
    r4.cost_nanousd = None;
    // Outside `--until 2025-03-02`.
    let mut r5 = base(5, "key_a", Some("team_x"), "claude-opus-4-5", day(3, 0));
    r5.usage.input_tokens = 1000;
    r5.usage.output_tokens = 100;
    r5.cost_nanousd = Some(1);
    vec![r1, r2, r3, r4, r5]
}

/// Runs the real binary against a ledger, returning stdout.
fn tollgate(url: &str, args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .current_dir(dir.path())
        .env("TOLLGATE__LEDGER__URL", url)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run tollgate");
    assert!(
        output.status.success(),
        "tollgate {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test]
async fn usage_command_reports_known_data_in_every_format() {
    for db in test_ledgers().await {
        // `tollgate migrate` creates the schema (and the SQLite file).
        let out = tollgate(&db.url, &["migrate"]);
        assert!(out.contains("up to date"), "{out}");
        let store = Store::open_lazy(&db.url, false).unwrap();
        store.insert(&report_data()).await.unwrap();
        store.close().await;
        let range = ["--since", "2025-03-01", "--until", "2025-03-02"];

        let csv = tollgate(
            &db.url,
            &[
                &["usage", "--format", "csv", "--group-by", "model"][..],
                &range,
            ]
            .concat(),
        );
        assert_eq!(
            csv,
            "model,requests,input_tokens,output_tokens,cache_creation_input_tokens,cache_read_input_tokens,web_search_requests,cost_usd,unpriced_requests\n\
             claude-opus-4-5,2,400,40,5,30,0,3.50,0\n\
             claude-sonnet-4-5,1,200,20,0,0,1,0.0125,0\n\
             mystery-model,1,50,5,0,0,0,0.00,1\n",
            "[{}]",
            db.backend
        );

        let table = tollgate(
            &db.url,
            &[
                &["usage", "--group-by", "team", "--group-by", "day"][..],
                &range,
            ]
            .concat(),
        );
        assert_eq!(
            table,
            "\
team    day         requests  input_tokens  output_tokens  cache_creation_input_tokens  cache_read_input_tokens  web_search_requests  cost_usd  unpriced_requests
------  ----------  --------  ------------  -------------  ---------------------------  -----------------------  -------------------  --------  -----------------
-       2025-03-02         1            50              5                            0                        0                    0      0.00                  1
team_x  2025-03-01         2           300             30                            5                       20                    1    1.5125                  0
team_y  2025-03-02         1           300             30                            0                       10                    0      2.00                  0
TOTAL                      4           650             65                            5                       30                    1    3.5125                  1
",
            "[{}]",
            db.backend
        );

        let json = tollgate(
            &db.url,
            &[
                &["usage", "--format", "json", "--group-by", "key,end_user"][..],
                &range,
            ]
            .concat(),
        );
        let json: serde_json::Value = serde_json::from_str(&json).unwrap();
        let row = |key: &str,
                   user: Option<&str>,
                   n: i64,
                   input: i64,
                   output: i64,
                   cw: i64,
                   cr: i64,
                   ws: i64,
                   usd: f64,
                   nanos: i64,
                   unpriced: i64| {
            serde_json::json!({
                "key_id": key, "end_user": user, "requests": n, "input_tokens": input,
                "output_tokens": output, "cache_creation_input_tokens": cw,
                "cache_read_input_tokens": cr, "web_search_requests": ws, "cost_usd": usd,
                "cost_nanousd": nanos, "unpriced_requests": unpriced,
            })
        };
        assert_eq!(
            json,
            serde_json::json!([
                row(
                    "key_a",
                    Some("u1"),
                    1,
                    100,
                    10,
                    5,
                    20,
                    0,
                    1.5,
                    1_500_000_000,
                    0
                ),
                row(
                    "key_a",
                    Some("u2"),
                    1,
                    200,
                    20,
                    0,
                    0,
                    1,
                    0.0125,
                    12_500_000,
                    0
                ),
                row("key_b", None, 1, 50, 5, 0, 0, 0, 0.0, 0, 1),
                row(
                    "key_b",
                    Some("u1"),
                    1,
                    300,
                    30,
                    0,
                    10,
                    0,
                    2.0,
                    2_000_000_000,
                    0
                ),
            ]),
            "[{}]",
            db.backend
        );

        // No range: every row, one total line.
        let all = tollgate(&db.url, &["usage", "--format", "csv", "--group-by", "day"]);
        assert_eq!(all.lines().count(), 4, "[{}] {all}", db.backend);
        assert!(
            all.ends_with("2025-03-03,1,1000,100,0,0,0,0.000000001,0\n"),
            "[{}] {all}",
            db.backend
        );
    }
}

#[tokio::test]
async fn usage_command_fails_clearly_without_a_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("missing.db").display());
    let output = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["usage"])
        .env("TOLLGATE__LEDGER__URL", &url)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot open the ledger"), "{stderr}");
    assert!(
        !dir.path().join("missing.db").exists(),
        "a report must not create a ledger"
    );
}

#[tokio::test]
async fn reprice_recomputes_costs_from_stored_columns() {
    let table = PriceTable::builtin().unwrap();
    for db in test_ledgers().await {
        let store = migrated(&db).await;
        let mut sonnet = sample_record(1, at(0));
        sonnet.model = Some("claude-sonnet-4-5-20250929".to_owned());
        sonnet.usage = Usage {
            input_tokens: 1_000_000,
            output_tokens: 100_000,
            ..Usage::default()
        };
        sonnet.cost_nanousd = None;
        sonnet.price_version = Some("old".to_owned());
        let mut cached = sample_record(2, at(10));
        cached.model = Some("claude-opus-4-5".to_owned());
        cached.cost_nanousd = Some(1);
        let mut unknown = sample_record(3, at(20));
        unknown.model = Some("mystery-model".to_owned());
        unknown.cost_nanousd = Some(5);
        let mut before = sample_record(4, at(-86_400));
        before.cost_nanousd = Some(77);
        store
            .insert(&[
                sonnet.clone(),
                cached.clone(),
                unknown.clone(),
                before.clone(),
            ])
            .await
            .unwrap();

        let since = "2025-03-01"
            .parse::<chrono::NaiveDate>()
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap()
            .and_utc();
        let dry = reprice_store(&store, &table, since, None, true)
            .await
            .unwrap();
        assert_eq!(
            (dry.examined, dry.changed, dry.unpriced),
            (3, 3, 1),
            "[{}]",
            db.backend
        );
        assert_eq!(
            read_cost(&store, "req_00000001").await.0,
            None,
            "dry run writes nothing"
        );

        let done = reprice_store(&store, &table, since, None, false)
            .await
            .unwrap();
        assert_eq!(done, dry, "[{}]", db.backend);
        // Sonnet 4.5 list price: $3 / $15 per million tokens.
        assert_eq!(
            read_cost(&store, "req_00000001").await,
            (Some(4_500_000_000), Some(table.version().to_owned()))
        );
        let expected_cached = table.cost(&CostQuery {
            model: "claude-opus-4-5",
            usage: &cached.usage,
            long_context_beta: false,
        });
        assert!(expected_cached.is_some_and(|c| c > 1));
        assert_eq!(read_cost(&store, "req_00000002").await.0, expected_cached);
        assert_eq!(
            read_cost(&store, "req_00000003").await,
            (None, Some(table.version().to_owned()))
        );
        assert_eq!(
            read_cost(&store, "req_00000004").await,
            (Some(77), Some("test".to_owned())),
            "outside the range"
        );

        let again = reprice_store(&store, &table, since, None, false)
            .await
            .unwrap();
        assert_eq!(
            (again.examined, again.changed),
            (3, 0),
            "[{}] idempotent",
            db.backend
        );
        store.close().await;

        // The command itself, with the shipped price table.
        let out = tollgate(&db.url, &["reprice", "--since", "2025-02-01", "--dry-run"]);
        assert!(
            out.starts_with("would reprice 1 of 4 rows"),
            "[{}] {out}",
            db.backend
        );
    }
}

async fn read_cost(store: &Store, request_id: &str) -> (Option<i64>, Option<String>) {
    let sql = "SELECT cost_nanousd, price_version FROM usage_events WHERE request_id = $1";
    match store {
        Store::Postgres(pool) => {
            let row = sqlx::query(sql)
                .bind(request_id)
                .fetch_one(pool)
                .await
                .unwrap();
            (row.get(0), row.get(1))
        }
        Store::Sqlite(pool) => {
            let row = sqlx::query(sql)
                .bind(request_id)
                .fetch_one(pool)
                .await
                .unwrap();
            (row.get(0), row.get(1))
        }
    }
}
