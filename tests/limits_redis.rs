//! The rate limiter's Redis backend against a real Redis
//! (`TOLLGATE_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`), on the wall
//! clock. Each test writes under its own key prefix. Without Redis the tests
//! that need it fail when `CI=true` and are skipped loudly otherwise; the
//! failure-mode tests need no Redis and always run.

// Helpers outside `#[test]` functions panic on purpose: a failed helper is a
// failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use support::redis::{redis_or_skip, unique_prefix};

use prometheus::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep};
use tollgate::config::{LimitsBackend, LimitsConfig, RedisFailure};
use tollgate::limits::{
    AcquireError, CONCURRENCY_RETRY, Decision, Demand, Dimension, KeyLimits, LimitError, LimitedBy,
    Limiter, Reservation, Scope, Wait,
};
use tollgate::secret::MaskedUrl;

fn redis_config(url: &str, prefix: &str) -> LimitsConfig {
    LimitsConfig {
        backend: LimitsBackend::Redis,
        redis_url: Some(MaskedUrl::new(url)),
        redis_key_prefix: prefix.to_owned(),
        // Generous for a busy CI machine; failures are tested on a closed port.
        redis_timeout: Duration::from_secs(2),
        ..LimitsConfig::default()
    }
}

fn limiter(config: &LimitsConfig) -> Limiter {
    Limiter::new(config, &Registry::new()).unwrap()
}

fn tokens(input: u64, output: u64) -> Demand {
    Demand {
        input_tokens: input,
        output_tokens: output,
    }
}

fn admitted(decision: Decision) -> Reservation {
    match decision {
        Decision::Admit(r) => r,
        Decision::Wait(w) => panic!("expected an admission, got {w:?}"),
    }
}

fn waiting(decision: Decision) -> Wait {
    match decision {
        Decision::Wait(w) => w,
        Decision::Admit(r) => panic!("expected a wait, got {r:?}"),
    }
}

async fn try_acquire(l: &Limiter, key: &str, limits: &KeyLimits, demand: Demand) -> Decision {
    l.try_acquire(key, limits, demand).await.unwrap()
}

/// Asserts `actual` is at most `expected` and at least `expected - slack`: on
/// the wall clock, time passes between the calls of a test.
#[track_caller]
fn assert_close_below(actual: Duration, expected: Duration, slack: Duration) {
    assert!(
        actual <= expected && actual + slack >= expected,
        "{actual:?} is not within {slack:?} below {expected:?}"
    );
}

const SLACK: Duration = Duration::from_millis(250);

const fn key_limit(dimension: Dimension) -> LimitedBy {
    LimitedBy {
        scope: Scope::Key,
        dimension,
    }
}

fn backend_decisions(l: &Limiter, backend: &str) -> u64 {
    l.metrics()
        .decision_seconds
        .with_label_values(&[backend])
        .get_sample_count()
}

#[tokio::test]
async fn rpm_admits_the_burst_then_one_per_interval() {
    let Some(url) = redis_or_skip("rpm_admits_the_burst_then_one_per_interval").await else {
        return;
    };
    let l = limiter(&redis_config(&url, &unique_prefix()));
    let limits = KeyLimits {
        rpm: Some(60),
        ..KeyLimits::UNLIMITED
    };
    for i in 0..60 {
        let r = admitted(try_acquire(&l, "k", &limits, Demand::default()).await);
        let requests = r.state().requests.unwrap();
        assert_eq!((requests.limit, requests.remaining), (60, 59 - i));
    }
    let w = waiting(try_acquire(&l, "k", &limits, Demand::default()).await);
    assert_eq!(w.limited_by, key_limit(Dimension::Requests));
    assert_close_below(w.retry_after, Duration::from_secs(1), SLACK);
    assert_eq!(w.state.requests.unwrap().remaining, 0);
    // Waiting took nothing: after the advised time, one fits, then the next waits
    // a whole interval again.
    let again = waiting(try_acquire(&l, "k", &limits, Demand::default()).await);
    sleep(again.retry_after).await;
    admitted(try_acquire(&l, "k", &limits, Demand::default()).await);
    let w = waiting(try_acquire(&l, "k", &limits, Demand::default()).await);
    assert_close_below(w.retry_after, Duration::from_secs(1), SLACK);
    assert_eq!(backend_decisions(&l, "redis"), 64);
}

#[tokio::test]
async fn settlement_gives_back_or_takes_debt() {
    let Some(url) = redis_or_skip("settlement_gives_back_or_takes_debt").await else {
        return;
    };
    let l = limiter(&redis_config(&url, &unique_prefix()));
    // 60,000 per minute: 1,000 tokens per second.
    let limits = KeyLimits {
        input_tpm: Some(60_000),
        ..KeyLimits::UNLIMITED
    };
    let r = admitted(try_acquire(&l, "give", &limits, tokens(1_000, 0)).await);
    assert_eq!(r.state().input_tokens.unwrap().remaining, 59_000);
    l.settle(r, tokens(200, 0)).await;
    // 800 came back: 59,800 fit, then 1,000 more wait about a second.
    admitted(try_acquire(&l, "give", &limits, tokens(59_800, 0)).await);
    let w = waiting(try_acquire(&l, "give", &limits, tokens(1_000, 0)).await);
    assert_eq!(w.limited_by, key_limit(Dimension::InputTokens));
    assert_close_below(w.retry_after, Duration::from_secs(1), SLACK);

    // 6,000 per minute: 100 per second. 8,000 used of a 1,000 estimate leaves
    // 2,000 of debt: 100 more tokens wait 21 s.
    let limits = KeyLimits {
        input_tpm: Some(6_000),
        ..KeyLimits::UNLIMITED
    };
    let r = admitted(try_acquire(&l, "debt", &limits, tokens(1_000, 0)).await);
    l.settle(r, tokens(8_000, 0)).await;
    let w = waiting(try_acquire(&l, "debt", &limits, tokens(100, 0)).await);
    assert_close_below(w.retry_after, Duration::from_secs(21), SLACK);
    let input = w.state.input_tokens.unwrap();
    assert_eq!(input.remaining, 0);
    assert_close_below(input.reset_after, Duration::from_secs(80), SLACK);

    // Larger than the whole bucket: runs when the bucket is full.
    let limits = KeyLimits {
        output_tpm: Some(8_000),
        ..KeyLimits::UNLIMITED
    };
    admitted(try_acquire(&l, "big", &limits, tokens(0, 64_000)).await);
    let w = waiting(try_acquire(&l, "big", &limits, tokens(0, 1_000)).await);
    assert_close_below(w.retry_after, Duration::from_millis(427_500), SLACK);
}

#[tokio::test]
async fn dimensions_are_taken_all_or_none() {
    let Some(url) = redis_or_skip("dimensions_are_taken_all_or_none").await else {
        return;
    };
    let l = limiter(&redis_config(&url, &unique_prefix()));
    let limits = KeyLimits {
        rpm: Some(10),
        input_tpm: Some(6_000),
        ..KeyLimits::UNLIMITED
    };
    let r = admitted(try_acquire(&l, "k", &limits, tokens(6_000, 0)).await);
    assert_eq!(r.state().requests.unwrap().remaining, 9);
    for _ in 0..20 {
        let w = waiting(try_acquire(&l, "k", &limits, tokens(100, 0)).await);
        assert_eq!(w.limited_by, key_limit(Dimension::InputTokens));
        assert_eq!(w.state.requests.unwrap().remaining, 9);
    }
    // Out of requests, the tokens stay: nine fit with no tokens, then the
    // requests limit makes the next wait, and the token state does not move.
    for _ in 0..9 {
        admitted(try_acquire(&l, "k", &limits, tokens(0, 0)).await);
    }
    let w = waiting(try_acquire(&l, "k", &limits, tokens(0, 0)).await);
    assert_eq!(w.limited_by, key_limit(Dimension::Requests));
    assert_eq!(w.state.input_tokens.unwrap().remaining, 0);
}

#[tokio::test]
async fn concurrency_frees_on_settle_on_drop_and_by_lease() {
    let Some(url) = redis_or_skip("concurrency_frees_on_settle_on_drop_and_by_lease").await else {
        return;
    };
    let config = LimitsConfig {
        redis_slot_lease: Duration::from_secs(1),
        ..redis_config(&url, &unique_prefix())
    };
    let l = limiter(&config);
    let limits = KeyLimits {
        max_concurrent: Some(2),
        ..KeyLimits::UNLIMITED
    };
    let first = admitted(try_acquire(&l, "k", &limits, Demand::default()).await);
    let second = admitted(try_acquire(&l, "k", &limits, Demand::default()).await);
    let w = waiting(try_acquire(&l, "k", &limits, Demand::default()).await);
    assert_eq!(w.limited_by, key_limit(Dimension::Concurrency));
    assert_eq!(w.retry_after, CONCURRENCY_RETRY);
    // A drop cannot await: the slot is released with the next call.
    drop(first);
    let third = admitted(try_acquire(&l, "k", &limits, Demand::default()).await);
    waiting(try_acquire(&l, "k", &limits, Demand::default()).await);
    l.settle(second, Demand::default()).await;
    admitted(try_acquire(&l, "k", &limits, Demand::default()).await);

    // A replica that dies holding slots: they come back when the lease ends.
    let crashed = limiter(&config);
    let limits = KeyLimits {
        max_concurrent: Some(1),
        ..KeyLimits::UNLIMITED
    };
    std::mem::forget(admitted(
        try_acquire(&crashed, "lease", &limits, Demand::default()).await,
    ));
    waiting(try_acquire(&l, "lease", &limits, Demand::default()).await);
    sleep(Duration::from_millis(1_100)).await;
    admitted(try_acquire(&l, "lease", &limits, Demand::default()).await);
    drop(third);
}

#[tokio::test]
async fn global_limits_hold_across_keys() {
    let Some(url) = redis_or_skip("global_limits_hold_across_keys").await else {
        return;
    };
    let config = LimitsConfig {
        global_rpm: Some(3),
        ..redis_config(&url, &unique_prefix())
    };
    let l = limiter(&config);
    let own = KeyLimits {
        rpm: Some(100),
        ..KeyLimits::UNLIMITED
    };
    admitted(try_acquire(&l, "a", &KeyLimits::UNLIMITED, Demand::default()).await);
    admitted(try_acquire(&l, "a", &KeyLimits::UNLIMITED, Demand::default()).await);
    let b = admitted(try_acquire(&l, "b", &own, Demand::default()).await);
    assert_eq!(b.state().requests.unwrap().remaining, 99);
    let w = waiting(try_acquire(&l, "b", &own, Demand::default()).await);
    assert_eq!(
        w.limited_by,
        LimitedBy {
            scope: Scope::Global,
            dimension: Dimension::Requests
        }
    );
    assert_close_below(w.retry_after, Duration::from_secs(20), SLACK);
    assert_eq!(w.state.requests.unwrap().remaining, 99);
}

/// Two limiters (two replicas) hammer one key: together they admit one limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_enforce_one_limit() {
    let Some(url) = redis_or_skip("two_replicas_enforce_one_limit").await else {
        return;
    };
    let config = redis_config(&url, &unique_prefix());
    let replicas = [Arc::new(limiter(&config)), Arc::new(limiter(&config))];
    let limits = KeyLimits {
        rpm: Some(120),
        ..KeyLimits::UNLIMITED
    };
    let run_for = Duration::from_secs(3);
    let started = Instant::now();
    let admitted_count = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for replica in &replicas {
        for _ in 0..4 {
            let (replica, count) = (replica.clone(), admitted_count.clone());
            tasks.spawn(async move {
                while started.elapsed() < run_for {
                    match replica
                        .try_acquire("shared", &limits, Demand::default())
                        .await
                        .unwrap()
                    {
                        Decision::Admit(_) => {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                        Decision::Wait(_) => sleep(Duration::from_millis(2)).await,
                    }
                }
            });
        }
    }
    tasks.join_all().await;
    let elapsed = started.elapsed().as_secs_f64();
    // The burst of 120, then 2 per second.
    let expected = 120.0 + 2.0 * elapsed;
    let got = admitted_count.load(Ordering::Relaxed) as f64;
    let error = (got - expected).abs() / expected;
    eprintln!(
        "two replicas, rpm 120 burst phase: admitted {got} in {elapsed:.2}s, expected {expected:.1}, error {:.2}%",
        error * 100.0
    );
    assert!(error <= 0.05, "admitted {got}, expected {expected:.1}");
    for replica in &replicas {
        assert!(backend_decisions(replica, "redis") > 100);
        assert_eq!(replica.metrics().redis_fallback.get(), 0);
    }
}

/// The steady rate, once the burst is gone: two replicas waiting with
/// `acquire`, as the gateway does, share 50 requests per second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_the_steady_rate() {
    let Some(url) = redis_or_skip("two_replicas_share_the_steady_rate").await else {
        return;
    };
    let config = redis_config(&url, &unique_prefix());
    let replicas = [Arc::new(limiter(&config)), Arc::new(limiter(&config))];
    let limits = KeyLimits {
        rpm: Some(3_000),
        ..KeyLimits::UNLIMITED
    };
    // Empty the burst first.
    while let Decision::Admit(_) =
        try_acquire(&replicas[0], "steady", &limits, Demand::default()).await
    {}
    let started = Instant::now();
    let deadline = started + Duration::from_secs(3);
    let admitted_count = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for replica in &replicas {
        for _ in 0..4 {
            let (replica, count) = (replica.clone(), admitted_count.clone());
            tasks.spawn(async move {
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match replica
                        .acquire("steady", &limits, Demand::default(), left)
                        .await
                    {
                        Ok(acquired) if Instant::now() <= deadline => {
                            count.fetch_add(1, Ordering::Relaxed);
                            replica
                                .settle(acquired.reservation, Demand::default())
                                .await;
                        }
                        Ok(_) | Err(AcquireError::Limited(_)) => break,
                        Err(e) => panic!("{e}"),
                    }
                }
            });
        }
    }
    tasks.join_all().await;
    let expected = 50.0 * 3.0;
    let got = admitted_count.load(Ordering::Relaxed) as f64;
    let error = (got - expected).abs() / expected;
    eprintln!(
        "two replicas, rpm 3000 steady: admitted {got} in 3s, expected {expected}, error {:.2}%",
        error * 100.0
    );
    assert!(error <= 0.05, "admitted {got}, expected {expected}");
    let waited: u64 = replicas
        .iter()
        .map(|r| r.metrics().decisions.with_label_values(&["waited"]).get())
        .sum();
    assert!(
        waited as f64 >= got - 8.0,
        "most admissions waited: {waited} of {got}"
    );
}

/// A TCP port nothing listens on.
async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn unreachable_redis_open_falls_back_to_local_limits() {
    let port = closed_port().await;
    let config = LimitsConfig {
        redis_timeout: Duration::from_millis(250),
        ..redis_config(&format!("redis://127.0.0.1:{port}"), "unused")
    };
    let l = limiter(&config);
    let limits = KeyLimits {
        rpm: Some(2),
        ..KeyLimits::UNLIMITED
    };
    let started = Instant::now();
    admitted(try_acquire(&l, "k", &limits, Demand::default()).await);
    admitted(try_acquire(&l, "k", &limits, Demand::default()).await);
    let w = waiting(try_acquire(&l, "k", &limits, Demand::default()).await);
    assert_close_below(w.retry_after, Duration::from_secs(30), SLACK);
    // A refused connection fails fast; later decisions skip Redis.
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    let m = l.metrics();
    assert_eq!(m.redis_fallback.get(), 3);
    assert_eq!(m.redis_errors.with_label_values(&["acquire"]).get(), 1);
    assert_eq!(backend_decisions(&l, "local"), 3);
}

#[tokio::test]
async fn unreachable_redis_closed_refuses() {
    let port = closed_port().await;
    let config = LimitsConfig {
        redis_failure: RedisFailure::Closed,
        ..redis_config(&format!("redis://:hunter2@127.0.0.1:{port}"), "unused")
    };
    let l = limiter(&config);
    let limits = KeyLimits {
        rpm: Some(2),
        ..KeyLimits::UNLIMITED
    };
    for _ in 0..2 {
        let err = l
            .try_acquire("k", &limits, Demand::default())
            .await
            .unwrap_err();
        assert!(matches!(err, LimitError::Unavailable(_)), "{err:?}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
    let err = l
        .acquire("k", &limits, Demand::default(), Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(err, AcquireError::Unavailable(_)), "{err:?}");
    assert_eq!(l.metrics().redis_fallback.get(), 0);
}

/// A TCP relay to Redis that can be cut and restored, to watch the limiter
/// lose Redis and find it again.
struct Relay {
    port: u16,
    target: String,
    tasks: JoinSet<()>,
}

impl Relay {
    async fn start(target: String) -> Relay {
        let mut relay = Relay {
            port: 0,
            target,
            tasks: JoinSet::new(),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        relay.port = listener.local_addr().unwrap().port();
        relay.serve(listener);
        relay
    }

    fn serve(&mut self, listener: TcpListener) {
        let target = self.target.clone();
        self.tasks.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                let target = target.clone();
                connections.spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
    }

    /// Closes the listener and every relayed connection.
    async fn cut(&mut self) {
        self.tasks.shutdown().await;
    }

    async fn restore(&mut self) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket
            .bind(format!("127.0.0.1:{}", self.port).parse().unwrap())
            .unwrap();
        self.serve(socket.listen(64).unwrap());
    }
}

#[tokio::test]
async fn recovers_when_redis_returns() {
    let Some(url) = redis_or_skip("recovers_when_redis_returns").await else {
        return;
    };
    let target = url::Url::parse(&url).unwrap();
    let target = format!(
        "{}:{}",
        target.host_str().unwrap(),
        target.port().unwrap_or(6379)
    );
    let mut relay = Relay::start(target).await;
    let config = LimitsConfig {
        redis_retry_interval: Duration::from_millis(200),
        redis_timeout: Duration::from_millis(500),
        ..redis_config(
            &format!("redis://127.0.0.1:{}", relay.port),
            &unique_prefix(),
        )
    };
    let l = limiter(&config);
    let limits = KeyLimits {
        rpm: Some(1_000),
        ..KeyLimits::UNLIMITED
    };
    admitted(try_acquire(&l, "k", &limits, Demand::default()).await);
    assert_eq!(backend_decisions(&l, "redis"), 1);

    relay.cut().await;
    for _ in 0..5 {
        admitted(try_acquire(&l, "k", &limits, Demand::default()).await);
    }
    assert_eq!(l.metrics().redis_fallback.get(), 5);
    assert_eq!(backend_decisions(&l, "redis"), 1);

    relay.restore().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while backend_decisions(&l, "redis") < 2 {
        assert!(
            Instant::now() < deadline,
            "the limiter did not find Redis again"
        );
        admitted(try_acquire(&l, "k", &limits, Demand::default()).await);
        sleep(Duration::from_millis(50)).await;
    }
    let fallbacks = l.metrics().redis_fallback.get();
    for _ in 0..5 {
        admitted(try_acquire(&l, "k", &limits, Demand::default()).await);
    }
    assert_eq!(
        l.metrics().redis_fallback.get(),
        fallbacks,
        "back on Redis for good"
    );
}

/// Admission overhead per decision on Redis (run with `--ignored --nocapture`).
#[tokio::test]
#[ignore = "a measurement, not a check"]
async fn redis_admission_overhead() {
    let Some(url) = redis_or_skip("redis_admission_overhead").await else {
        return;
    };
    let l = limiter(&LimitsConfig {
        global_rpm: Some(1_000_000_000),
        global_max_concurrent: Some(1_000_000),
        ..redis_config(&url, &unique_prefix())
    });
    let limits = KeyLimits {
        rpm: Some(1_000_000),
        input_tpm: Some(1_000_000_000),
        output_tpm: Some(1_000_000_000),
        max_concurrent: Some(1_000),
    };
    let n = 20_000;
    let (mut admitting, mut settling) = (Duration::ZERO, Duration::ZERO);
    for i in 0..n {
        let key = format!("key-{}", i % 100);
        let t = std::time::Instant::now();
        let r = admitted(try_acquire(&l, &key, &limits, tokens(1_000, 1_000)).await);
        admitting += t.elapsed();
        let t = std::time::Instant::now();
        l.settle(r, tokens(900, 500)).await;
        settling += t.elapsed();
    }
    let per = |d: Duration| d.as_secs_f64() * 1e6 / f64::from(n);
    eprintln!(
        "redis: {:.1} µs per admission, {:.1} µs per settlement (one round trip each, sequential)",
        per(admitting),
        per(settling)
    );
}
