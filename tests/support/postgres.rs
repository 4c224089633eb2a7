//! A real Postgres for tests: the server at `TOLLGATE_TEST_POSTGRES_URL`
//! (default `postgres://postgres@127.0.0.1:5432/postgres`), one fresh database
//! per test, dropped afterwards.
//!
//! When the server cannot be reached, a test fails under `CI=true` and is
//! skipped (with a loud message) otherwise.

// Helpers outside `#[test]` functions panic on purpose: a failed helper is a
// failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use sqlx::Connection as _;
use sqlx::postgres::PgConnection;

/// The default server, as `scripts/ensure-services` starts it.
pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The server URL tests use, if the server answers. Panics under `CI=true`
/// when it does not.
pub async fn postgres_url() -> Option<String> {
    let url =
        std::env::var("TOLLGATE_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
    let attempt = tokio::time::timeout(Duration::from_secs(5), PgConnection::connect(&url)).await;
    match attempt {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            Some(url)
        }
        failure => {
            let why = match failure {
                Ok(Err(e)) => e.to_string(),
                _ => "timed out".to_owned(),
            };
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("Postgres at {url} is required under CI=true but unreachable: {why}");
            }
            eprintln!(
                "\n!!!!! SKIPPING the Postgres half of this test: {url} unreachable ({why}).\n\
                 !!!!! Start Postgres or set TOLLGATE_TEST_POSTGRES_URL; CI=true makes this a failure.\n"
            );
            None
        }
    }
}

/// A database created for one test and dropped when this is dropped.
pub struct TestDatabase {
    /// URL of the new database.
    pub url: String,
    server_url: String,
    name: String,
}

/// Creates a uniquely named database on the test server, or `None` when the
/// server is unreachable outside CI (see [`postgres_url`]).
pub async fn test_database() -> Option<TestDatabase> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let server_url = postgres_url().await?;
    let name = format!(
        "tollgate_test_{}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst),
        uuid::Uuid::now_v7()
            .simple()
            .to_string()
            .get(20..)
            .unwrap_or("x")
    );
    let mut conn = PgConnection::connect(&server_url)
        .await
        .expect("connect to test Postgres");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create test database");
    let _ = conn.close().await;
    let mut url = url::Url::parse(&server_url).expect("test Postgres URL parses");
    url.set_path(&format!("/{name}"));
    Some(TestDatabase {
        url: url.to_string(),
        server_url,
        name,
    })
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Dropping runs outside any runtime guarantee, so use a thread with
        // its own small runtime; FORCE ends connections a test left open.
        let server_url = self.server_url.clone();
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let mut conn = PgConnection::connect(&server_url).await.ok()?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await
                    .ok()?;
                conn.close().await.ok()
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(()))) {
            eprintln!("could not drop test database {}", self.name);
        }
    }
}
