//! A real Redis for tests: the server at `TOLLGATE_TEST_REDIS_URL` (default
//! `redis://127.0.0.1:6379`). Each test uses its own key prefix.
//!
//! When the server cannot be reached, a test fails under `CI=true` and is
//! skipped (with a loud message) otherwise.

use std::time::Duration;

/// The configured test Redis URL.
pub fn redis_url() -> String {
    std::env::var("TOLLGATE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The Redis URL if Redis answers a PING; otherwise panics under `CI=true`,
/// or returns `None` after a loud skip message.
pub async fn redis_or_skip(test: &str) -> Option<String> {
    let url = redis_url();
    let ping = async {
        let client = redis::Client::open(url.as_str()).ok()?;
        let mut c = client.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("PING").query_async::<String>(&mut c).await.ok()
    };
    match tokio::time::timeout(Duration::from_secs(3), ping).await {
        Ok(Some(_)) => Some(url),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{test}: Redis at {url} is required under CI=true but unreachable")
        }
        _ => {
            eprintln!(
                "\n!!!!! SKIPPING {test}: Redis at {url} unreachable; CI=true makes this a failure.\n"
            );
            None
        }
    }
}

/// A key prefix no other test (or run) uses.
pub fn unique_prefix() -> String {
    format!("tollgate-test:{}", uuid::Uuid::now_v7().simple())
}
