//! Budgets: exact nano-dollar accounting, UTC day and month rollover on an
//! injected clock, totals rebuilt from a ledger that already has rows (both
//! backends), totals shared by two `Budgets` through the real Redis
//! (`TOLLGATE_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`; required under
//! `CI=true`), and the fallback to local totals while Redis is unreachable,
//! then the catch-up when it answers again.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::redis::{redis_or_skip, unique_prefix};

use chrono::{DateTime, Utc};
use prometheus::Registry;
use tokio::net::{TcpListener, TcpStream};
use tollgate::budget::{
    Budget, BudgetDecision, BudgetExhausted, BudgetPeriod, Budgets, Clock, RedisBudgetHandle,
};
use tollgate::config::Config;
use tollgate::keys::store::NewKeyRow;
use tollgate::keys::{KeyKind, KeyRecord, KeyStore};
use tollgate::ledger::Store;
use tollgate::secret::MaskedUrl;

use support::ledger::{TestLedger, sample_record, test_ledgers};

/// A clock the test moves by hand.
struct ManualClock(Mutex<DateTime<Utc>>);

impl ManualClock {
    fn at(s: &str) -> Arc<ManualClock> {
        Arc::new(ManualClock(Mutex::new(t(s))))
    }
    fn set(&self, s: &str) {
        *self.0.lock().unwrap() = t(s);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap()
    }
}

fn t(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

fn key(id: &str, nanousd: i64, period: BudgetPeriod) -> KeyRecord {
    let mut k = KeyRecord::unregistered_passthrough(id, t("2025-01-01T00:00:00Z"));
    k.kind = KeyKind::Virtual;
    k.name = id.to_owned();
    k.budget = Some(Budget { nanousd, period });
    k
}

fn config(ledger_url: &str, extra: &[(&str, &str)]) -> Config {
    let mut env = vec![("TOLLGATE__LEDGER__URL".to_owned(), ledger_url.to_owned())];
    env.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    Config::load_from(None, env).expect("valid test config")
}

async fn migrated(url: &str) -> Store {
    let store = Store::open_lazy(url, true).unwrap();
    store.migrate().await.unwrap();
    store
}

async fn start(
    config: &Config,
    store: &Store,
    clock: Arc<ManualClock>,
    registry: &Registry,
) -> (Budgets, RedisBudgetHandle) {
    Budgets::start(config, store.clone(), registry, clock)
        .await
        .expect("budgets start")
}

fn remaining(d: &BudgetDecision) -> i64 {
    match d {
        BudgetDecision::Ok {
            remaining_nanousd: Some(r),
        } => *r,
        other => panic!("expected a budget with room, got {other:?}"),
    }
}

fn exhausted(d: BudgetDecision) -> BudgetExhausted {
    match d {
        BudgetDecision::Exhausted(e) => e,
        other => panic!("expected the budget to be spent, got {other:?}"),
    }
}

fn counter(registry: &Registry, name: &str) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric())
        .map(|m| m.get_counter().get_value())
        .sum()
}

/// A fresh SQLite ledger in a temporary directory.
async fn sqlite_ledger() -> (tempfile::TempDir, String, Store) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let store = migrated(&url).await;
    (dir, url, store)
}

#[tokio::test]
async fn spend_is_counted_to_the_nano_dollar() {
    let (_dir, url, store) = sqlite_ledger().await;
    let clock = ManualClock::at("2025-03-15T12:00:00Z");
    let registry = Registry::new();
    let (budgets, _h) = start(&config(&url, &[]), &store, clock.clone(), &registry).await;
    let k = key("key_exact", 1_000_000_000, BudgetPeriod::Day);

    assert_eq!(remaining(&budgets.check(&k).await), 1_000_000_000);
    let now = clock.now();
    // Costs that do not sum well in floating point: 0.1 + 0.2 + 0.7 - 1 nano.
    budgets.add("key_exact", 100_000_000, now);
    budgets.add("key_exact", 200_000_000, now);
    budgets.add("key_exact", 699_999_999, now);
    assert_eq!(remaining(&budgets.check(&k).await), 1);
    budgets.add("key_exact", 1, now);
    let e = exhausted(budgets.check(&k).await);
    assert_eq!(e.spent_nanousd, 1_000_000_000);
    assert_eq!(e.budget_nanousd, 1_000_000_000);
    assert_eq!(e.resets_at, t("2025-03-16T00:00:00Z"));
    assert!(e.message().contains("$1.00 per day"), "{}", e.message());

    // In-flight requests finish and count: spend passes the budget.
    budgets.add("key_exact", 250_000_000, now);
    assert_eq!(
        exhausted(budgets.check(&k).await).spent_nanousd,
        1_250_000_000
    );
    assert_eq!(counter(&registry, "tollgate_budget_exhausted_total"), 2.0);

    // Keys without a budget are never refused; costs of other keys do not mix.
    let mut free = k.clone();
    free.id = "key_free".into();
    free.budget = None;
    budgets.add("key_free", i64::MAX / 2, now);
    assert_eq!(
        budgets.check(&free).await,
        BudgetDecision::Ok {
            remaining_nanousd: None
        }
    );
    let other = key("key_other", 5, BudgetPeriod::Day);
    assert_eq!(remaining(&budgets.check(&other).await), 5);
    // A zero budget admits nothing.
    let zero = key("key_zero", 0, BudgetPeriod::Month);
    exhausted(budgets.check(&zero).await);
}

#[tokio::test]
async fn totals_reset_at_utc_midnight_and_at_the_start_of_the_month() {
    let (_dir, url, store) = sqlite_ledger().await;
    let clock = ManualClock::at("2025-03-31T23:59:00Z");
    let registry = Registry::new();
    let (budgets, _h) = start(&config(&url, &[]), &store, clock.clone(), &registry).await;
    let daily = key("key_daily", 100, BudgetPeriod::Day);
    let monthly = key("key_monthly", 1000, BudgetPeriod::Month);
    budgets.check(&daily).await;
    budgets.check(&monthly).await;

    budgets.add("key_daily", 100, t("2025-03-31T23:59:00Z"));
    budgets.add("key_monthly", 1000, t("2025-03-31T10:00:00Z"));
    assert_eq!(
        exhausted(budgets.check(&daily).await).resets_at,
        t("2025-04-01T00:00:00Z")
    );
    assert_eq!(
        exhausted(budgets.check(&monthly).await).resets_at,
        t("2025-04-01T00:00:00Z")
    );

    // A request that started before midnight and finishes after it counts for
    // the old day and month, which are over.
    clock.set("2025-04-01T00:00:01Z");
    budgets.add("key_daily", 40, t("2025-03-31T23:59:59Z"));
    budgets.add("key_monthly", 40, t("2025-03-31T23:59:59Z"));
    assert_eq!(remaining(&budgets.check(&daily).await), 100);
    assert_eq!(remaining(&budgets.check(&monthly).await), 1000);

    budgets.add("key_daily", 30, clock.now());
    budgets.add("key_monthly", 30, clock.now());
    clock.set("2025-04-01T23:00:00Z");
    assert_eq!(remaining(&budgets.check(&daily).await), 70);
    // Next day: the daily total starts again, the monthly one goes on.
    clock.set("2025-04-02T00:00:00Z");
    assert_eq!(remaining(&budgets.check(&daily).await), 100);
    assert_eq!(remaining(&budgets.check(&monthly).await), 970);
    // A key moved from a monthly to a daily budget gets the day's figure at once.
    let mut switched = monthly.clone();
    switched.budget = Some(Budget {
        nanousd: 1000,
        period: BudgetPeriod::Day,
    });
    budgets.add("key_monthly", 5, clock.now());
    assert_eq!(remaining(&budgets.check(&switched).await), 995);
}

async fn insert_key(store: &Store, url: &str, id: &str, budget: Option<Budget>) {
    let keys = KeyStore::from_store(store.clone(), MaskedUrl::new(url));
    let mut record = key(id, 0, BudgetPeriod::Day);
    record.budget = budget;
    keys.insert(&NewKeyRow {
        record,
        secret_hash: format!("{id}-hash"),
    })
    .await
    .unwrap();
}

/// Usage rows: (key, cost, started_at).
async fn insert_usage(store: &Store, rows: &[(&str, Option<i64>, &str)]) {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let records: Vec<_> = rows
        .iter()
        .map(|(key_id, cost, at)| {
            let mut r = sample_record(u64::from(NEXT.fetch_add(1, Ordering::SeqCst)), t(at));
            r.key_id = (*key_id).to_owned();
            r.cost_nanousd = *cost;
            r
        })
        .collect();
    assert_eq!(store.insert(&records).await.unwrap(), records.len() as u64);
}

/// The ledger rows of the rebuild tests, on 2025-03-15 at noon.
async fn seed_ledger(db: &TestLedger, store: &Store) {
    insert_key(
        store,
        &db.url,
        "key_day",
        Some(Budget {
            nanousd: 10_000,
            period: BudgetPeriod::Day,
        }),
    )
    .await;
    insert_key(
        store,
        &db.url,
        "key_month",
        Some(Budget {
            nanousd: 10_000,
            period: BudgetPeriod::Month,
        }),
    )
    .await;
    insert_key(store, &db.url, "key_later", None).await;
    insert_usage(
        store,
        &[
            // Today.
            ("key_day", Some(1_111), "2025-03-15T00:00:00Z"),
            ("key_day", Some(2_222), "2025-03-15T11:59:59.999999Z"),
            ("key_day", None, "2025-03-15T11:00:00Z"),
            // Earlier this month, last month, and another key.
            ("key_day", Some(4_000), "2025-03-14T23:59:59.999999Z"),
            ("key_day", Some(9_000), "2025-02-28T12:00:00Z"),
            ("key_month", Some(3_000), "2025-03-01T00:00:00Z"),
            ("key_month", Some(500), "2025-03-15T09:00:00Z"),
            ("key_month", Some(7_777), "2025-02-28T23:59:59.999999Z"),
            ("key_later", Some(600), "2025-03-02T00:00:00Z"),
            ("key_later", Some(60), "2025-03-15T01:00:00Z"),
        ],
    )
    .await;
}

#[tokio::test]
async fn totals_are_rebuilt_from_the_ledger_at_start() {
    for db in test_ledgers().await {
        let b = db.backend;
        let store = migrated(&db.url).await;
        seed_ledger(&db, &store).await;
        let clock = ManualClock::at("2025-03-15T12:00:00Z");
        let (budgets, _h) = start(
            &config(&db.url, &[]),
            &store,
            clock.clone(),
            &Registry::new(),
        )
        .await;

        // Seeded at start: changing the ledger now does not change them...
        insert_usage(&store, &[("key_day", Some(1), "2025-03-15T11:30:00Z")]).await;
        let day = key("key_day", 10_000, BudgetPeriod::Day);
        assert_eq!(
            remaining(&budgets.check(&day).await),
            10_000 - 3_333,
            "[{b}]"
        );
        let as_monthly = key("key_day", 20_000, BudgetPeriod::Month);
        assert_eq!(
            remaining(&budgets.check(&as_monthly).await),
            20_000 - 7_333,
            "[{b}]"
        );
        let month = key("key_month", 10_000, BudgetPeriod::Month);
        assert_eq!(
            remaining(&budgets.check(&month).await),
            10_000 - 3_500,
            "[{b}]"
        );

        // ...but a key that gets its budget after the start is read at its
        // first check, with what the ledger has then.
        let later = key("key_later", 1_000, BudgetPeriod::Month);
        assert_eq!(remaining(&budgets.check(&later).await), 340, "[{b}]");
        budgets.add("key_later", 340, clock.now());
        exhausted(budgets.check(&later).await);

        // A second start (a restart) rebuilds the same figures from the ledger.
        let (again, _h2) = start(
            &config(&db.url, &[]),
            &store,
            clock.clone(),
            &Registry::new(),
        )
        .await;
        assert_eq!(remaining(&again.check(&day).await), 10_000 - 3_334, "[{b}]");
    }
}

fn redis_env(url: &str, prefix: &str) -> Vec<(&'static str, String)> {
    vec![
        ("TOLLGATE__LIMITS__BACKEND", "redis".to_owned()),
        ("TOLLGATE__LIMITS__REDIS_URL", url.to_owned()),
        ("TOLLGATE__LIMITS__REDIS_KEY_PREFIX", prefix.to_owned()),
        ("TOLLGATE__LIMITS__REDIS_TIMEOUT", "300ms".to_owned()),
        ("TOLLGATE__LIMITS__REDIS_RETRY_INTERVAL", "100ms".to_owned()),
    ]
}

fn as_pairs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Checks until the key has `expected` left (costs reach Redis through a task).
async fn eventually_remaining(budgets: &Budgets, k: &KeyRecord, expected: i64) {
    let mut last = None;
    for _ in 0..200 {
        let d = budgets.check(k).await;
        if d == (BudgetDecision::Ok {
            remaining_nanousd: Some(expected),
        }) {
            return;
        }
        last = Some(d);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("expected {expected} left, last decision {last:?}");
}

async fn redis_get(url: &str, key: &str) -> Option<i64> {
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut c)
        .await
        .unwrap()
}

#[tokio::test]
async fn replicas_share_one_total_in_redis() {
    let Some(redis) = redis_or_skip("replicas_share_one_total_in_redis").await else {
        return;
    };
    for db in test_ledgers().await {
        let b = db.backend;
        let store = migrated(&db.url).await;
        seed_ledger(&db, &store).await;
        let prefix = unique_prefix();
        let env = redis_env(&redis, &prefix);
        let cfg = config(&db.url, &as_pairs(&env));
        let clock = ManualClock::at("2025-03-15T12:00:00Z");
        // Two replicas starting together: the ledger's spend is seeded once.
        let (ra, rb) = (Registry::new(), Registry::new());
        let ((a, ha), (bb, hb)) = tokio::join!(
            start(&cfg, &store, clock.clone(), &ra),
            start(&cfg, &store, clock.clone(), &rb),
        );
        let day_counter = format!("{prefix}:budget:key_day:day:2025-03-15");
        assert_eq!(redis_get(&redis, &day_counter).await, Some(3_333), "[{b}]");
        let month_counter = format!("{prefix}:budget:key_month:month:2025-03");
        assert_eq!(
            redis_get(&redis, &month_counter).await,
            Some(3_500),
            "[{b}]"
        );

        let day = key("key_day", 10_000, BudgetPeriod::Day);
        assert_eq!(remaining(&a.check(&day).await), 6_667, "[{b}]");
        assert_eq!(remaining(&bb.check(&day).await), 6_667, "[{b}]");
        // Costs on either replica are seen by both.
        a.add("key_day", 1_000, clock.now());
        bb.add("key_day", 500, clock.now());
        eventually_remaining(&a, &day, 5_167).await;
        eventually_remaining(&bb, &day, 5_167).await;
        // A third replica starting later keeps the shared figure (no re-seed
        // from the ledger, which does not have those costs).
        let (c, hc) = start(&cfg, &store, clock.clone(), &Registry::new()).await;
        assert_eq!(remaining(&c.check(&day).await), 5_167, "[{b}]");
        // The budget runs out on one replica: the others refuse too.
        a.add("key_day", 5_167, clock.now());
        for replica in [&bb, &c] {
            let mut spent = None;
            for _ in 0..200 {
                if let BudgetDecision::Exhausted(e) = replica.check(&day).await {
                    spent = Some(e.spent_nanousd);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(spent, Some(10_000), "[{b}]");
        }
        // A key first checked after the start is seeded from the ledger.
        let later = key("key_later", 1_000, BudgetPeriod::Month);
        assert_eq!(remaining(&bb.check(&later).await), 340, "[{b}]");
        assert_eq!(
            redis_get(&redis, &format!("{prefix}:budget:key_later:month:2025-03")).await,
            Some(660),
            "[{b}]"
        );
        for h in [ha, hb, hc] {
            h.shutdown().await;
        }
    }
}

/// A TCP forwarder to Redis that can be switched off (connections cut and
/// refused) and on again.
struct FlakyProxy {
    url: String,
    up: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl FlakyProxy {
    async fn start(redis_url: &str) -> FlakyProxy {
        let target = url::Url::parse(redis_url).unwrap();
        let target = format!(
            "{}:{}",
            target.host_str().unwrap(),
            target.port().unwrap_or(6379)
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}", listener.local_addr().unwrap());
        let up = Arc::new(AtomicBool::new(true));
        let flag = up.clone();
        let task = tokio::spawn(async move {
            let mut connections: Vec<tokio::task::JoinHandle<()>> = Vec::new();
            loop {
                let (mut client, _) = match listener.accept().await {
                    Ok(c) => c,
                    Err(_) => return,
                };
                connections.retain(|c| !c.is_finished());
                if !flag.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let target = target.clone();
                let flag = flag.clone();
                connections.push(tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let copy = tokio::io::copy_bidirectional(&mut client, &mut server);
                    let cut = async {
                        while flag.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    };
                    tokio::select! {
                        _ = copy => {}
                        () = cut => {}
                    }
                }));
            }
        });
        FlakyProxy { url, up, task }
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
    }
}

impl Drop for FlakyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn without_redis_budgets_fall_back_to_local_totals_and_catch_up() {
    let Some(redis) =
        redis_or_skip("without_redis_budgets_fall_back_to_local_totals_and_catch_up").await
    else {
        return;
    };
    let (_dir, url, store) = sqlite_ledger().await;
    let proxy = FlakyProxy::start(&redis).await;
    let prefix = unique_prefix();
    let clock = ManualClock::at("2025-03-15T12:00:00Z");
    let flaky = config(&url, &as_pairs(&redis_env(&proxy.url, &prefix)));
    let direct = config(&url, &as_pairs(&redis_env(&redis, &prefix)));
    let registry = Registry::new();
    let (a, ha) = start(&flaky, &store, clock.clone(), &registry).await;
    let (other, ho) = start(&direct, &store, clock.clone(), &Registry::new()).await;
    let k = key("key_flaky", 1_000, BudgetPeriod::Day);
    assert_eq!(remaining(&a.check(&k).await), 1_000);
    a.add("key_flaky", 100, clock.now());
    eventually_remaining(&other, &k, 900).await;

    // Redis goes away: checks decide on the local total, costs still count.
    proxy.set_up(false);
    tokio::time::sleep(Duration::from_millis(50)).await;
    a.add("key_flaky", 300, clock.now());
    assert_eq!(remaining(&a.check(&k).await), 600);
    a.add("key_flaky", 600, clock.now());
    assert_eq!(exhausted(a.check(&k).await).spent_nanousd, 1_000);
    assert!(counter(&registry, "tollgate_budget_redis_fallback_total") >= 1.0);
    assert!(counter(&registry, "tollgate_budget_redis_errors_total") >= 1.0);
    // The other replica (direct to Redis) has not seen those costs yet.
    assert_eq!(remaining(&other.check(&k).await), 900);

    // Redis is back: the costs counted meanwhile reach the shared total.
    proxy.set_up(true);
    let mut seen = None;
    for _ in 0..300 {
        if let BudgetDecision::Exhausted(e) = other.check(&k).await {
            seen = Some(e.spent_nanousd);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(seen, Some(1_000), "the outage's costs reached Redis");
    ha.shutdown().await;
    ho.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_redis_is_not_fatal() {
    let (_dir, url, store) = sqlite_ledger().await;
    let env = redis_env("redis://127.0.0.1:1", "tollgate-test:nowhere");
    let registry = Registry::new();
    let clock = ManualClock::at("2025-03-15T12:00:00Z");
    let (budgets, h) = start(
        &config(&url, &as_pairs(&env)),
        &store,
        clock.clone(),
        &registry,
    )
    .await;
    let k = key("key_alone", 500, BudgetPeriod::Month);
    assert_eq!(remaining(&budgets.check(&k).await), 500);
    budgets.add("key_alone", 499, clock.now());
    assert_eq!(remaining(&budgets.check(&k).await), 1);
    budgets.add("key_alone", 1, clock.now());
    exhausted(budgets.check(&k).await);
    assert!(counter(&registry, "tollgate_budget_redis_fallback_total") >= 3.0);
    h.shutdown().await;
}
