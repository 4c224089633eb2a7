//! Keys against both ledger backends (SQLite in a temporary directory and a
//! fresh database on the test Postgres): the store's create, list, show,
//! update and revoke; hash-only storage; expiry; the cache's TTL (a revoke is
//! seen within it) and its "not found" answers; passthrough registration; and
//! `tollgate keys` through the real binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use prometheus::Registry;
use tollgate::budget::{Budget, BudgetPeriod};
use tollgate::config::{AuthConfig, AuthMode, LedgerConfig};
use tollgate::keys::manage::{self, KeyPatch, KeySpec};
use tollgate::keys::secret::{fingerprint_of_hash, hash_secret};
use tollgate::keys::store::NewKeyRow;
use tollgate::keys::{
    AuthError, KeyCache, KeyKind, KeyLimitsOverride, KeyRecord, KeyStatus, KeyStore, Keys,
};
use tollgate::ledger::Store;
use tollgate::secret::MaskedUrl;

use support::ledger::{TestLedger, test_ledgers};

async fn key_store(db: &TestLedger) -> KeyStore {
    let ledger = LedgerConfig {
        url: MaskedUrl::new(&db.url),
        ..LedgerConfig::default()
    };
    let store = KeyStore::open(&ledger).unwrap();
    store
        .migrate()
        .await
        .unwrap_or_else(|e| panic!("[{}] migrate: {e}", db.backend));
    store
}

fn auth(mode: AuthMode, ttl: Duration) -> AuthConfig {
    AuthConfig {
        mode,
        key_cache_ttl: ttl,
        ..AuthConfig::default()
    }
}

fn spec(name: &str) -> KeySpec {
    KeySpec {
        name: name.to_owned(),
        team: Some("search".to_owned()),
        limits: KeyLimitsOverride {
            rpm: Some(60),
            input_tpm: Some(40_000),
            output_tpm: None,
            max_concurrent: Some(4),
        },
        budget_nanousd: Some(12_500_000_000),
        budget_period: Some(BudgetPeriod::Day),
        shadow: false,
        expires_at: None,
    }
}

/// Every column of the key's row, as text.
async fn row_text(store: &Store, id: &str) -> String {
    let sql = "SELECT id || '|' || name || '|' || COALESCE(team, '') || '|' || kind || '|' || \
               secret_hash || '|' || key_prefix || '|' || COALESCE(CAST(budget_nanousd AS TEXT), '') \
               FROM api_keys WHERE id = ";
    match store {
        Store::Postgres(pool) => sqlx::query_scalar(&format!("{sql}$1"))
            .bind(id)
            .fetch_one(pool)
            .await
            .unwrap(),
        Store::Sqlite(pool) => sqlx::query_scalar(&format!("{sql}?"))
            .bind(id)
            .fetch_one(pool)
            .await
            .unwrap(),
    }
}

async fn count_keys(store: &Store) -> i64 {
    let sql = "SELECT count(*) FROM api_keys";
    match store {
        Store::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap(),
        Store::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap(),
    }
}

fn lookups(registry: &Registry, result: &str) -> u64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == "tollgate_key_cache_lookups_total")
        .flat_map(|f| f.get_metric())
        .filter(|m| m.get_label().iter().any(|l| l.value() == result))
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

#[tokio::test]
async fn keys_are_created_listed_shown_updated_and_revoked() {
    for db in test_ledgers().await {
        let b = db.backend;
        let store = key_store(&db).await;
        let now = Utc::now();
        let created = manage::create_key(&store, spec("search-app"), now)
            .await
            .unwrap_or_else(|e| panic!("[{b}] create: {e}"));
        let secret = created.secret.expose().to_owned();
        let key = created.key.clone();
        assert!(key.id.starts_with("key_"), "[{b}] {}", key.id);
        assert_eq!(key.kind, KeyKind::Virtual);
        assert!(secret.starts_with("tg-") && secret.len() >= 3 + 22, "[{b}]");
        assert_eq!(
            key.key_prefix,
            secret[..11],
            "[{b}] prefix is tg- and 8 characters"
        );
        assert_eq!(
            key.budget,
            Some(Budget {
                nanousd: 12_500_000_000,
                period: BudgetPeriod::Day
            })
        );

        // Shown as stored.
        let shown = store.get(&key.id).await.unwrap().expect("stored");
        assert_eq!(shown, key, "[{b}] read back equals created");
        let by_hash = store.get_by_hash(&hash_secret(&secret)).await.unwrap();
        assert_eq!(
            by_hash.as_ref(),
            Some(&key),
            "[{b}] found by the hash of its secret"
        );

        // Only the hash and the prefix are stored: the secret is nowhere in the row.
        let row = row_text(store.ledger(), &key.id).await;
        assert!(!row.contains(&secret), "[{b}] secret in row: {row}");
        assert!(
            !row.contains(&secret[11..]),
            "[{b}] secret's random part in row: {row}"
        );
        assert!(row.contains(&hash_secret(&secret)), "[{b}] {row}");

        let other = manage::create_key(&store, spec("batch-app"), now)
            .await
            .unwrap()
            .key;
        let listed = store.list().await.unwrap();
        let ids: Vec<&str> = listed.iter().map(|k| k.id.as_str()).collect();
        assert_eq!(ids.len(), 2, "[{b}]");
        assert!(ids.contains(&key.id.as_str()) && ids.contains(&other.id.as_str()));

        // Update: absent fields stay, set ones change, cleared ones go.
        let patch = KeyPatch {
            name: Some("search-v2".into()),
            team: Some(None),
            rpm: Some(Some(5)),
            max_concurrent: Some(None),
            budget_period: Some(BudgetPeriod::Month),
            shadow: Some(true),
            ..KeyPatch::default()
        };
        let updated = store
            .update(&key.id, &patch)
            .await
            .unwrap()
            .expect("exists");
        assert_eq!(updated.name, "search-v2");
        assert_eq!(updated.team, None);
        assert_eq!(updated.limits.rpm, Some(5));
        assert_eq!(updated.limits.input_tpm, Some(40_000));
        assert_eq!(updated.limits.max_concurrent, None);
        assert_eq!(
            updated.budget,
            Some(Budget {
                nanousd: 12_500_000_000,
                period: BudgetPeriod::Month
            })
        );
        assert!(updated.shadow);
        assert_eq!(
            store.get(&key.id).await.unwrap().as_ref(),
            Some(&updated),
            "[{b}]"
        );
        let clear = KeyPatch {
            budget_nanousd: Some(None),
            ..KeyPatch::default()
        };
        assert_eq!(
            store.update(&key.id, &clear).await.unwrap().unwrap().budget,
            None
        );
        let bad = KeyPatch {
            name: Some("  ".into()),
            ..KeyPatch::default()
        };
        assert!(
            store.update(&key.id, &bad).await.is_err(),
            "[{b}] empty name refused"
        );
        assert!(store.update("key_missing", &patch).await.unwrap().is_none());

        // Revoke: idempotent, keeps the first time.
        let revoked = store.revoke(&key.id, now).await.unwrap().expect("exists");
        assert_eq!(revoked.status(Utc::now()), KeyStatus::Revoked, "[{b}]");
        let first = revoked.revoked_at;
        let again = store
            .revoke(&key.id, now + chrono::Duration::hours(1))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again.revoked_at, first, "[{b}]");
        assert!(store.revoke("key_missing", now).await.unwrap().is_none());
        assert_eq!(
            store
                .get(&other.id)
                .await
                .unwrap()
                .unwrap()
                .status(Utc::now()),
            KeyStatus::Active,
            "[{b}] other keys untouched"
        );
    }
}

#[tokio::test]
async fn virtual_keys_authenticate_until_revoked_within_the_cache_ttl() {
    let ttl = Duration::from_millis(200);
    for db in test_ledgers().await {
        let b = db.backend;
        let store = key_store(&db).await;
        let registry = Registry::new();
        let (keys, _task) =
            Keys::start(store.clone(), &auth(AuthMode::Virtual, ttl), &registry).unwrap();
        let created = manage::create_key(&store, spec("app"), Utc::now())
            .await
            .unwrap();
        let secret = created.secret.expose().to_owned();

        let identity = keys.authenticate(&secret).await.unwrap();
        assert_eq!(identity.key.id, created.key.id, "[{b}]");
        assert_eq!(identity.secret_hash, hash_secret(&secret));

        // Revoked by "another replica" (straight in the store): this one keeps
        // its cached answer until the TTL, then refuses.
        store.revoke(&created.key.id, Utc::now()).await.unwrap();
        assert!(
            keys.authenticate(&secret).await.is_ok(),
            "[{b}] cached within the TTL"
        );
        tokio::time::sleep(ttl + Duration::from_millis(50)).await;
        match keys.authenticate(&secret).await {
            Err(AuthError::Unauthenticated(m)) => assert!(m.contains("revoked"), "[{b}] {m}"),
            other => panic!("[{b}] revoked key accepted: {other:?}"),
        }

        // Other credentials are refused without a key.
        for bad in ["sk-ant-api03-real-anthropic-key", "tg-short", ""] {
            assert!(
                matches!(
                    keys.authenticate(bad).await,
                    Err(AuthError::Unauthenticated(_))
                ),
                "[{b}] {bad:?}"
            );
        }
        let unknown = format!("tg-{}", "x".repeat(43));
        assert!(matches!(
            keys.authenticate(&unknown).await,
            Err(AuthError::Unauthenticated("invalid API key"))
        ));
    }
}

#[tokio::test]
async fn expired_keys_are_refused() {
    for db in test_ledgers().await {
        let store = key_store(&db).await;
        let registry = Registry::new();
        let ttl = Duration::from_secs(60);
        let (keys, _task) =
            Keys::start(store.clone(), &auth(AuthMode::Virtual, ttl), &registry).unwrap();
        let mut s = spec("short-lived");
        s.expires_at = Some(Utc::now() + chrono::Duration::milliseconds(300));
        let created = manage::create_key(&store, s, Utc::now()).await.unwrap();
        let secret = created.secret.expose().to_owned();
        assert!(keys.authenticate(&secret).await.is_ok(), "[{}]", db.backend);
        tokio::time::sleep(Duration::from_millis(400)).await;
        // Still cached (TTL 60 s), but expiry is checked on every request.
        match keys.authenticate(&secret).await {
            Err(AuthError::Unauthenticated(m)) => assert!(m.contains("expired"), "{m}"),
            other => panic!("[{}] expired key accepted: {other:?}", db.backend),
        }
    }
}

#[tokio::test]
async fn unknown_keys_are_cached_as_not_found_and_looked_up_once() {
    let ttl = Duration::from_millis(300);
    for db in test_ledgers().await {
        let b = db.backend;
        let store = key_store(&db).await;
        let registry = Registry::new();
        let cache = Arc::new(KeyCache::new(store.clone(), ttl, &registry).unwrap());
        let secret = format!("tg-{}", "k".repeat(43));
        let hash = hash_secret(&secret);

        // A flood of the same unknown key: one store query.
        let lookups_at_once: Vec<_> = (0..50)
            .map(|_| {
                let cache = cache.clone();
                let secret = secret.clone();
                tokio::spawn(async move { cache.lookup_secret(&secret).await })
            })
            .collect();
        for l in lookups_at_once {
            assert!(l.await.unwrap().unwrap().is_none(), "[{b}]");
        }
        assert_eq!(lookups(&registry, "miss"), 1, "[{b}] one store query");
        assert_eq!(
            lookups(&registry, "hit") + lookups(&registry, "shared"),
            49,
            "[{b}]"
        );

        // The key appears in the store; "not found" holds until the TTL.
        let mut record = KeyRecord::unregistered_passthrough("key_late", Utc::now());
        record.kind = KeyKind::Virtual;
        record.name = "late".into();
        record.created_at =
            chrono::DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap();
        store
            .insert(&NewKeyRow {
                record: record.clone(),
                secret_hash: hash.clone(),
            })
            .await
            .unwrap();
        assert!(
            cache.lookup_hash(&hash).await.unwrap().is_none(),
            "[{b}] negative cache"
        );
        tokio::time::sleep(ttl + Duration::from_millis(50)).await;
        let found = cache.lookup_hash(&hash).await.unwrap();
        assert_eq!(found.as_deref(), Some(&record), "[{b}] found after the TTL");
        assert_eq!(
            cache.lookup_id("key_late").await.unwrap().as_deref(),
            Some(&record)
        );
        assert_eq!(lookups(&registry, "miss"), 3, "[{b}]");
    }
}

#[tokio::test]
async fn passthrough_keys_are_registered_once_and_can_be_limited_and_revoked() {
    let ttl = Duration::from_millis(200);
    for db in test_ledgers().await {
        let b = db.backend;
        let store = key_store(&db).await;
        let registry = Registry::new();
        let (keys, task) =
            Keys::start(store.clone(), &auth(AuthMode::Passthrough, ttl), &registry).unwrap();
        let client_key = "sk-ant-api03-client-key-of-team-a";
        let fingerprint = tollgate::keys::secret::fingerprint(client_key);

        let identity = keys.authenticate(client_key).await.unwrap();
        assert_eq!(identity.key.id, fingerprint, "[{b}]");
        assert_eq!(identity.key.kind, KeyKind::Passthrough);
        assert_eq!(fingerprint_of_hash(&identity.secret_hash), fingerprint);
        assert_eq!(
            store.get(&fingerprint).await.unwrap(),
            None,
            "[{b}] not before success"
        );

        for _ in 0..20 {
            keys.register_passthrough(&identity);
        }
        let mut row = None;
        for _ in 0..200 {
            row = store.get(&fingerprint).await.unwrap();
            if row.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let row = row.unwrap_or_else(|| panic!("[{b}] passthrough key never registered"));
        assert_eq!(row.kind, KeyKind::Passthrough);
        assert_eq!(row.name, fingerprint);
        assert_eq!(row.budget, None);
        assert_eq!(count_keys(store.ledger()).await, 1, "[{b}] registered once");
        let text = row_text(store.ledger(), &fingerprint).await;
        assert!(
            text.contains(&hash_secret(client_key)),
            "[{b}] full SHA-256 stored"
        );
        assert!(
            !text.contains(client_key),
            "[{b}] the key itself is not stored"
        );

        // Idempotent in the store too (another replica, a restart).
        let again = store
            .register_passthrough(&fingerprint, &hash_secret(client_key), Utc::now())
            .await
            .unwrap();
        assert!(!again, "[{b}] ON CONFLICT DO NOTHING");
        assert_eq!(count_keys(store.ledger()).await, 1);

        // Limits attached later apply after the TTL; a revoke locks the key out.
        let limit = KeyPatch {
            rpm: Some(Some(7)),
            team: Some(Some("team-a".into())),
            ..KeyPatch::default()
        };
        store.update(&fingerprint, &limit).await.unwrap().unwrap();
        tokio::time::sleep(ttl + Duration::from_millis(50)).await;
        let identity = keys.authenticate(client_key).await.unwrap();
        assert_eq!(identity.key.limits.rpm, Some(7), "[{b}]");
        assert_eq!(identity.key.team.as_deref(), Some("team-a"));
        store.revoke(&fingerprint, Utc::now()).await.unwrap();
        tokio::time::sleep(ttl + Duration::from_millis(50)).await;
        assert!(
            matches!(
                keys.authenticate(client_key).await,
                Err(AuthError::Unauthenticated(_))
            ),
            "[{b}] revoked passthrough key refused"
        );
        // A tollgate key is refused in passthrough mode.
        let tg = format!("tg-{}", "p".repeat(43));
        assert!(matches!(
            keys.authenticate(&tg).await,
            Err(AuthError::Unauthenticated(_))
        ));
        task.shutdown().await;
    }
}

#[tokio::test]
async fn an_unreachable_store_fails_virtual_keys_but_not_passthrough() {
    // A "database" that accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            held.push(conn);
        }
    });
    let ledger = LedgerConfig {
        url: MaskedUrl::new(format!("postgres://tollgate:hunter2@{addr}/nowhere")),
        ..LedgerConfig::default()
    };
    let store = KeyStore::open(&ledger).unwrap();
    let ttl = Duration::from_secs(5);
    let (keys, _t) = Keys::start(
        store.clone(),
        &auth(AuthMode::Virtual, ttl),
        &Registry::new(),
    )
    .unwrap();
    let secret = format!("tg-{}", "u".repeat(43));
    match keys.authenticate(&secret).await {
        Err(AuthError::Unavailable(e)) => {
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
        other => panic!("expected the store to be unavailable: {other:?}"),
    }
    // The failure is remembered briefly: the next request does not wait for
    // the store again.
    let started = std::time::Instant::now();
    assert!(matches!(
        keys.authenticate(&secret).await,
        Err(AuthError::Unavailable(_))
    ));
    assert!(
        started.elapsed() < Duration::from_millis(50),
        "{:?}",
        started.elapsed()
    );
    let (keys, _t) =
        Keys::start(store, &auth(AuthMode::Passthrough, ttl), &Registry::new()).unwrap();
    let identity = keys.authenticate("sk-ant-some-key").await.unwrap();
    assert_eq!(
        identity.key.id,
        tollgate::keys::secret::fingerprint("sk-ant-some-key")
    );
    assert_eq!(identity.key.limits, KeyLimitsOverride::default());
}

/// Runs the real binary in `dir` with the ledger at `url`.
fn tollgate(dir: &std::path::Path, url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .current_dir(dir)
        .env("TOLLGATE__LEDGER__URL", url)
        .env("TOLLGATE__LOG__LEVEL", "debug")
        .env_remove("RUST_LOG")
        .output()
        .expect("run tollgate")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test]
async fn cli_prints_the_secret_once_and_never_again() {
    for db in test_ledgers().await {
        let b = db.backend;
        let dir = tempfile::tempdir().unwrap();
        let create = tollgate(
            dir.path(),
            &db.url,
            &[
                "keys",
                "create",
                "--name",
                "search",
                "--team",
                "growth",
                "--rpm",
                "60",
                "--input-tpm",
                "40000",
                "--budget-usd",
                "12.50",
                "--budget-period",
                "day",
                "--expires",
                "30d",
            ],
        );
        assert!(create.status.success(), "[{b}] {}", stderr(&create));
        let out = stdout(&create);
        let secret = out
            .lines()
            .find_map(|l| l.strip_prefix("secret:"))
            .map(str::trim)
            .unwrap_or_else(|| panic!("[{b}] no secret line in:\n{out}"))
            .to_owned();
        assert!(secret.starts_with("tg-"), "[{b}] {secret}");
        assert_eq!(
            out.matches(&secret).count(),
            1,
            "[{b}] printed once:\n{out}"
        );
        assert!(
            !stderr(&create).contains(&secret),
            "[{b}] secret in the logs"
        );
        let id = out
            .lines()
            .find_map(|l| l.strip_prefix("id:"))
            .map(str::trim)
            .unwrap()
            .to_owned();
        assert!(out.contains("$12.50 per day"), "[{b}]\n{out}");

        // The secret works: it is the key's.
        let store = key_store(&db).await;
        let found = store
            .get_by_hash(&hash_secret(&secret))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(found.id, id);
        assert_eq!(found.limits.input_tpm, Some(40_000));

        let mut outputs = Vec::new();
        for args in [
            vec!["keys", "list"],
            vec!["keys", "list", "--format", "json"],
            vec!["keys", "show", &id],
            vec!["keys", "show", &id, "--format", "json"],
            vec![
                "keys",
                "update",
                &id,
                "--rpm",
                "5",
                "--clear-budget",
                "--no-shadow",
            ],
            vec!["keys", "revoke", &id],
        ] {
            let o = tollgate(dir.path(), &db.url, &args);
            assert!(o.status.success(), "[{b}] {args:?}: {}", stderr(&o));
            for text in [stdout(&o), stderr(&o)] {
                assert!(
                    !text.contains(&secret),
                    "[{b}] {args:?} printed the secret:\n{text}"
                );
            }
            outputs.push(stdout(&o));
        }
        assert!(
            outputs[0].contains(&id) && outputs[0].contains("growth"),
            "[{b}]\n{}",
            outputs[0]
        );
        let listed: serde_json::Value = serde_json::from_str(&outputs[1]).unwrap();
        assert_eq!(listed[0]["id"], id.as_str());
        assert_eq!(listed[0]["budget_usd"], "12.50");
        assert_eq!(listed[0]["budget_nanousd"], 12_500_000_000i64);
        assert_eq!(listed[0]["budget_period"], "day");
        assert!(listed[0].get("secret").is_none());
        let shown: serde_json::Value = serde_json::from_str(&outputs[3]).unwrap();
        assert_eq!(shown["rpm"], 60);
        assert!(
            outputs[4].contains("rpm:") && outputs[4].contains(" 5\n"),
            "{}",
            outputs[4]
        );
        assert!(outputs[5].contains("revoked"), "[{b}]\n{}", outputs[5]);
        assert_eq!(
            store.get(&id).await.unwrap().unwrap().status(Utc::now()),
            KeyStatus::Revoked
        );

        // Mistakes are listed, and nothing is created.
        let bad = tollgate(
            dir.path(),
            &db.url,
            &[
                "keys",
                "create",
                "--name",
                "x",
                "--budget-usd",
                "1.0000000001",
            ],
        );
        assert!(!bad.status.success());
        assert!(
            stderr(&bad).contains("9 decimals"),
            "[{b}] {}",
            stderr(&bad)
        );
        let missing = tollgate(dir.path(), &db.url, &["keys", "show", "key_nope"]);
        assert!(!missing.status.success());
        assert!(
            stderr(&missing).contains("no key with id"),
            "{}",
            stderr(&missing)
        );
        assert_eq!(store.list().await.unwrap().len(), 1, "[{b}]");
    }
}
