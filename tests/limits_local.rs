//! The rate limiter's decisions with the local backend, on tokio's paused clock:
//! every wait is checked to the nanosecond.

// Helpers outside `#[test]` functions panic on purpose: a failed helper is a
// failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use prometheus::Registry;
use tokio::time::{Instant, advance};
use tollgate::config::{Config, LimitsConfig};
use tollgate::limits::{
    AcquireError, CONCURRENCY_RETRY, Decision, Demand, Dimension, KeyLimits, LimitedBy, Limiter,
    Reservation, Scope, Wait, ZERO_LIMIT_RETRY,
};

fn limiter_with(config: LimitsConfig) -> Limiter {
    Limiter::new(&config, &Registry::new()).unwrap()
}

fn limiter() -> Limiter {
    limiter_with(LimitsConfig::default())
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

const fn key_limit(dimension: Dimension) -> LimitedBy {
    LimitedBy {
        scope: Scope::Key,
        dimension,
    }
}

#[tokio::test(start_paused = true)]
async fn rpm_admits_the_burst_then_one_per_interval() {
    let l = limiter();
    let limits = KeyLimits {
        rpm: Some(60),
        ..KeyLimits::UNLIMITED
    };
    let mut held = Vec::new();
    for i in 0..60 {
        let r = admitted(try_acquire(&l, "k", &limits, Demand::default()).await);
        assert_eq!(r.state().requests.unwrap().remaining, 59 - i);
        held.push(r);
    }
    let w = waiting(try_acquire(&l, "k", &limits, Demand::default()).await);
    assert_eq!(w.retry_after, Duration::from_secs(1));
    assert_eq!(w.limited_by, key_limit(Dimension::Requests));
    assert_eq!(w.state.requests.unwrap().remaining, 0);
    assert_eq!(
        w.state.requests.unwrap().reset_after,
        Duration::from_secs(60)
    );

    // Waiting consumes nothing: asking again keeps the same schedule.
    advance(Duration::from_millis(999)).await;
    let w = waiting(try_acquire(&l, "k", &limits, Demand::default()).await);
    assert_eq!(w.retry_after, Duration::from_millis(1));
    advance(Duration::from_millis(1)).await;
    admitted(try_acquire(&l, "k", &limits, Demand::default()).await);
    let w = waiting(try_acquire(&l, "k", &limits, Demand::default()).await);
    assert_eq!(w.retry_after, Duration::from_secs(1));

    // Ten seconds later, exactly ten more.
    advance(Duration::from_secs(10)).await;
    for _ in 0..10 {
        admitted(try_acquire(&l, "k", &limits, Demand::default()).await);
    }
    let w = waiting(try_acquire(&l, "k", &limits, Demand::default()).await);
    assert_eq!(w.retry_after, Duration::from_secs(1));

    // Another key has its own limit.
    admitted(try_acquire(&l, "other", &limits, Demand::default()).await);
}

#[tokio::test(start_paused = true)]
async fn settlement_gives_back_the_unused_estimate() {
    let l = limiter();
    // 60,000 per minute: 1,000 tokens per second, one per millisecond.
    let limits = KeyLimits {
        input_tpm: Some(60_000),
        ..KeyLimits::UNLIMITED
    };
    let r = admitted(try_acquire(&l, "k", &limits, tokens(1_000, 0)).await);
    assert_eq!(r.state().input_tokens.unwrap().remaining, 59_000);
    assert_eq!(r.estimate(), tokens(1_000, 0));
    l.settle(r, tokens(200, 0)).await;
    // 800 came back: 59,800 fit now, and not one more.
    admitted(try_acquire(&l, "k", &limits, tokens(59_800, 0)).await);
    let w = waiting(try_acquire(&l, "k", &limits, tokens(1, 0)).await);
    assert_eq!(w.retry_after, Duration::from_millis(1));
    assert_eq!(w.limited_by, key_limit(Dimension::InputTokens));
}

#[tokio::test(start_paused = true)]
async fn settlement_beyond_the_estimate_is_debt() {
    let l = limiter();
    // 6,000 per minute: 100 tokens per second.
    let limits = KeyLimits {
        input_tpm: Some(6_000),
        ..KeyLimits::UNLIMITED
    };
    let r = admitted(try_acquire(&l, "k", &limits, tokens(1_000, 0)).await);
    l.settle(r, tokens(8_000, 0)).await;
    // 8,000 used of 6,000: 2,000 in debt. 100 more tokens need 2,100 of refill.
    let w = waiting(try_acquire(&l, "k", &limits, tokens(100, 0)).await);
    assert_eq!(w.retry_after, Duration::from_secs(21));
    assert_eq!(w.state.input_tokens.unwrap().remaining, 0);
    assert_eq!(
        w.state.input_tokens.unwrap().reset_after,
        Duration::from_secs(80)
    );
    advance(Duration::from_secs(21)).await;
    admitted(try_acquire(&l, "k", &limits, tokens(100, 0)).await);
}

#[tokio::test(start_paused = true)]
async fn a_demand_larger_than_the_bucket_runs_when_it_is_full() {
    let l = limiter();
    // 8,000 output tokens per minute: 7.5 ms per token.
    let limits = KeyLimits {
        output_tpm: Some(8_000),
        ..KeyLimits::UNLIMITED
    };
    admitted(try_acquire(&l, "k", &limits, tokens(0, 1_000)).await);
    // 64,000 can never fit in 8,000: it waits until the bucket is full…
    let w = waiting(try_acquire(&l, "k", &limits, tokens(0, 64_000)).await);
    assert_eq!(w.retry_after, Duration::from_millis(7_500));
    advance(w.retry_after).await;
    // …then runs, leaving 56,000 of debt: 1,000 more wait 427.5 s.
    admitted(try_acquire(&l, "k", &limits, tokens(0, 64_000)).await);
    let w = waiting(try_acquire(&l, "k", &limits, tokens(0, 1_000)).await);
    assert_eq!(w.retry_after, Duration::from_millis(427_500));
    assert_eq!(w.limited_by, key_limit(Dimension::OutputTokens));
}

#[tokio::test(start_paused = true)]
async fn dimensions_are_taken_all_or_none() {
    let l = limiter();
    let limits = KeyLimits {
        rpm: Some(10),
        input_tpm: Some(6_000),
        ..KeyLimits::UNLIMITED
    };
    let r = admitted(try_acquire(&l, "k", &limits, tokens(6_000, 0)).await);
    assert_eq!(r.state().requests.unwrap().remaining, 9);
    // Tokens are gone; the requests that would fit are not taken by the waits.
    for _ in 0..20 {
        let w = waiting(try_acquire(&l, "k", &limits, tokens(100, 0)).await);
        assert_eq!(w.retry_after, Duration::from_secs(1));
        assert_eq!(w.limited_by, key_limit(Dimension::InputTokens));
        assert_eq!(w.state.requests.unwrap().remaining, 9);
    }
    advance(Duration::from_secs(1)).await;
    let r = admitted(try_acquire(&l, "k", &limits, tokens(100, 0)).await);
    assert_eq!(r.state().requests.unwrap().remaining, 8);

    // And the other way round: out of requests, the tokens stay.
    for _ in 0..8 {
        admitted(try_acquire(&l, "k", &limits, tokens(0, 0)).await);
    }
    let before = waiting(try_acquire(&l, "k", &limits, tokens(10, 0)).await);
    assert_eq!(before.limited_by, key_limit(Dimension::Requests));
    let after = waiting(try_acquire(&l, "k", &limits, tokens(10, 0)).await);
    assert_eq!(before.state, after.state);
}

#[tokio::test(start_paused = true)]
async fn the_wait_is_for_the_slowest_limit() {
    let l = limiter();
    let limits = KeyLimits {
        rpm: Some(60),
        input_tpm: Some(6_000),
        ..KeyLimits::UNLIMITED
    };
    admitted(try_acquire(&l, "k", &limits, tokens(5_800, 0)).await);
    for _ in 0..59 {
        admitted(try_acquire(&l, "k", &limits, tokens(0, 0)).await);
    }
    // Requests fit again in 1 s; 500 tokens in 3 s.
    let w = waiting(try_acquire(&l, "k", &limits, tokens(500, 0)).await);
    assert_eq!(w.retry_after, Duration::from_secs(3));
    assert_eq!(w.limited_by, key_limit(Dimension::InputTokens));
    advance(Duration::from_secs(3)).await;
    admitted(try_acquire(&l, "k", &limits, tokens(500, 0)).await);
}

#[tokio::test(start_paused = true)]
async fn concurrency_frees_on_settle_and_on_drop() {
    let l = limiter();
    let limits = KeyLimits {
        max_concurrent: Some(2),
        ..KeyLimits::UNLIMITED
    };
    let first = admitted(try_acquire(&l, "k", &limits, Demand::default()).await);
    let second = admitted(try_acquire(&l, "k", &limits, Demand::default()).await);
    let w = waiting(try_acquire(&l, "k", &limits, Demand::default()).await);
    assert_eq!(w.retry_after, CONCURRENCY_RETRY);
    assert_eq!(w.limited_by, key_limit(Dimension::Concurrency));
    drop(first);
    let third = admitted(try_acquire(&l, "k", &limits, Demand::default()).await);
    waiting(try_acquire(&l, "k", &limits, Demand::default()).await);
    l.settle(second, Demand::default()).await;
    let _fourth = admitted(try_acquire(&l, "k", &limits, Demand::default()).await);
    waiting(try_acquire(&l, "k", &limits, Demand::default()).await);
    drop(third);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_reservation_keeps_its_estimate() {
    let l = limiter();
    let limits = KeyLimits {
        input_tpm: Some(6_000),
        max_concurrent: Some(1),
        ..KeyLimits::UNLIMITED
    };
    let r = admitted(try_acquire(&l, "k", &limits, tokens(1_000, 0)).await);
    drop(r);
    let r = admitted(try_acquire(&l, "k", &limits, tokens(5_000, 0)).await);
    assert_eq!(r.state().input_tokens.unwrap().remaining, 0);
}

#[tokio::test(start_paused = true)]
async fn global_limits_hold_across_keys() {
    let l = limiter_with(LimitsConfig {
        global_rpm: Some(3),
        global_max_concurrent: Some(4),
        ..LimitsConfig::default()
    });
    let unlimited = KeyLimits::UNLIMITED;
    let own = KeyLimits {
        rpm: Some(100),
        ..KeyLimits::UNLIMITED
    };
    let a1 = admitted(try_acquire(&l, "a", &unlimited, Demand::default()).await);
    let a2 = admitted(try_acquire(&l, "a", &unlimited, Demand::default()).await);
    let b1 = admitted(try_acquire(&l, "b", &own, Demand::default()).await);
    // The key's own state shows its own limit, not the global one.
    assert_eq!(b1.state().requests.unwrap().remaining, 99);
    let w = waiting(try_acquire(&l, "b", &own, Demand::default()).await);
    assert_eq!(
        w.limited_by,
        LimitedBy {
            scope: Scope::Global,
            dimension: Dimension::Requests
        }
    );
    assert_eq!(w.retry_after, Duration::from_secs(20));
    // The global wait did not take b's own request.
    assert_eq!(w.state.requests.unwrap().remaining, 99);
    advance(Duration::from_secs(20)).await;
    let c1 = admitted(try_acquire(&l, "c", &unlimited, Demand::default()).await);
    // Four in flight over all keys: the next one waits for a slot.
    advance(Duration::from_secs(60)).await;
    let w = waiting(try_acquire(&l, "d", &unlimited, Demand::default()).await);
    assert_eq!(
        w.limited_by,
        LimitedBy {
            scope: Scope::Global,
            dimension: Dimension::Concurrency
        }
    );
    drop(a1);
    admitted(try_acquire(&l, "d", &unlimited, Demand::default()).await);
    drop((a2, c1));
}

#[tokio::test(start_paused = true)]
async fn acquire_waits_when_the_wait_fits_in_max_wait() {
    let l = limiter();
    let limits = KeyLimits {
        rpm: Some(60),
        ..KeyLimits::UNLIMITED
    };
    let first = l
        .acquire("k", &limits, Demand::default(), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(first.waited, Duration::ZERO);
    for _ in 0..59 {
        admitted(try_acquire(&l, "k", &limits, Demand::default()).await);
    }
    let started = Instant::now();
    let acquired = l
        .acquire("k", &limits, Demand::default(), Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(acquired.waited, started.elapsed());
    // One second, plus at most 10 ms of jitter.
    assert!(
        acquired.waited >= Duration::from_secs(1),
        "{:?}",
        acquired.waited
    );
    assert!(
        acquired.waited <= Duration::from_millis(1_010),
        "{:?}",
        acquired.waited
    );
    let m = l.metrics();
    assert_eq!(m.decisions.with_label_values(&["admitted"]).get(), 1);
    assert_eq!(m.decisions.with_label_values(&["waited"]).get(), 1);
    assert_eq!(m.wait_seconds.get_sample_count(), 2);
}

#[tokio::test(start_paused = true)]
async fn acquire_answers_limited_with_the_real_retry_time() {
    let l = limiter();
    let limits = KeyLimits {
        rpm: Some(60),
        input_tpm: Some(6_000),
        ..KeyLimits::UNLIMITED
    };
    admitted(try_acquire(&l, "k", &limits, tokens(6_000, 0)).await);
    let started = Instant::now();
    let err = l
        .acquire("k", &limits, tokens(1_500, 0), Duration::from_secs(10))
        .await
        .unwrap_err();
    let AcquireError::Limited(w) = err else {
        panic!("expected Limited, got {err:?}")
    };
    // 1,500 tokens at 100 per second: 15 s, beyond max_wait: refused at once.
    assert_eq!(w.retry_after, Duration::from_secs(15));
    assert_eq!(w.limited_by, key_limit(Dimension::InputTokens));
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(
        l.metrics().decisions.with_label_values(&["limited"]).get(),
        1
    );
    // Exactly at max_wait it still waits.
    let acquired = l
        .acquire("k", &limits, tokens(1_500, 0), Duration::from_secs(15))
        .await
        .unwrap();
    assert!(acquired.waited >= Duration::from_secs(15));
    assert!(acquired.waited <= Duration::from_secs(15));
}

#[tokio::test(start_paused = true)]
async fn acquire_waits_for_a_free_slot() {
    let l = limiter();
    let limits = KeyLimits {
        max_concurrent: Some(1),
        ..KeyLimits::UNLIMITED
    };
    let held = admitted(try_acquire(&l, "k", &limits, Demand::default()).await);
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(250)).await;
        drop(held);
    });
    let acquired = l
        .acquire("k", &limits, Demand::default(), Duration::from_secs(1))
        .await
        .unwrap();
    // Polled every 100 ms (plus jitter): admitted at the first poll after 250 ms.
    assert!(
        acquired.waited >= Duration::from_millis(250),
        "{:?}",
        acquired.waited
    );
    assert!(
        acquired.waited <= Duration::from_millis(350),
        "{:?}",
        acquired.waited
    );
    release.await.unwrap();
    // A slot that never frees up: limited after max_wait.
    let err = l
        .acquire("k", &limits, Demand::default(), Duration::from_millis(300))
        .await;
    let Err(AcquireError::Limited(w)) = err else {
        panic!("expected Limited, got {err:?}")
    };
    assert_eq!(w.limited_by, key_limit(Dimension::Concurrency));
    drop(acquired);
}

#[tokio::test(start_paused = true)]
async fn a_zero_limit_admits_nothing() {
    let l = limiter();
    let limits = KeyLimits {
        output_tpm: Some(0),
        ..KeyLimits::UNLIMITED
    };
    let w = waiting(try_acquire(&l, "k", &limits, tokens(0, 1)).await);
    assert_eq!(w.retry_after, ZERO_LIMIT_RETRY);
    assert_eq!(w.limited_by, key_limit(Dimension::OutputTokens));
}

#[tokio::test(start_paused = true)]
async fn unlimited_keys_are_always_admitted() {
    let l = limiter();
    for _ in 0..1_000 {
        let r =
            admitted(try_acquire(&l, "k", &KeyLimits::UNLIMITED, tokens(1 << 40, 1 << 40)).await);
        assert_eq!(*r.state(), Default::default());
    }
    let latency = l.metrics().decision_seconds.with_label_values(&["none"]);
    assert_eq!(latency.get_sample_count(), 1_000);
}

#[tokio::test(start_paused = true)]
async fn many_keys_keep_their_own_state() {
    // Enough keys and decisions for the idle sweep to run on every shard.
    let l = limiter();
    let limits = KeyLimits {
        rpm: Some(2),
        ..KeyLimits::UNLIMITED
    };
    for _ in 0..20 {
        for k in 0..1_000 {
            let key = format!("key-{k}");
            admitted(try_acquire(&l, &key, &limits, Demand::default()).await);
            admitted(try_acquire(&l, &key, &limits, Demand::default()).await);
            let w = waiting(try_acquire(&l, &key, &limits, Demand::default()).await);
            assert_eq!(w.retry_after, Duration::from_secs(30));
        }
        advance(Duration::from_secs(60)).await;
    }
}

#[test]
fn limits_come_from_the_configuration() {
    let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let config = Config::load_from(
        None,
        env(&[
            ("TOLLGATE__LIMITS__RPM", "120"),
            ("TOLLGATE__LIMITS__OUTPUT_TPM", "8000"),
            ("TOLLGATE__LIMITS__GLOBAL_INPUT_TPM", "2000000"),
            ("TOLLGATE__LIMITS__REDIS_FAILURE", "closed"),
        ]),
    )
    .unwrap();
    let limits = &config.raw.limits;
    assert_eq!(
        KeyLimits::defaults(limits),
        KeyLimits {
            rpm: Some(120),
            output_tpm: Some(8_000),
            ..KeyLimits::UNLIMITED
        }
    );
    assert_eq!(
        KeyLimits::global(limits),
        Some(KeyLimits {
            input_tpm: Some(2_000_000),
            ..KeyLimits::UNLIMITED
        })
    );
    assert_eq!(KeyLimits::global(&LimitsConfig::default()), None);

    let err = Config::load_from(
        None,
        env(&[
            ("TOLLGATE__LIMITS__RPM", "0"),
            ("TOLLGATE__LIMITS__GLOBAL_MAX_CONCURRENT", "0"),
            ("TOLLGATE__LIMITS__REDIS_TIMEOUT", "0s"),
            ("TOLLGATE__LIMITS__REDIS_URL", "http://example"),
            ("TOLLGATE__LIMITS__BACKEND", "redis"),
        ]),
    )
    .unwrap_err();
    let all = err.0.join("\n");
    for expected in [
        "limits.rpm",
        "limits.global_max_concurrent",
        "limits.redis_timeout",
        "limits.redis_url",
    ] {
        assert!(all.contains(expected), "{expected} missing from:\n{all}");
    }
    assert_eq!(err.0.len(), 4, "{all}");
}

/// Admission overhead per decision, local backend (run with `--ignored --nocapture`).
#[tokio::test]
#[ignore = "a measurement, not a check"]
async fn local_admission_overhead() {
    let l = limiter_with(LimitsConfig {
        global_rpm: Some(1_000_000_000),
        ..LimitsConfig::default()
    });
    let limits = KeyLimits {
        rpm: Some(1_000_000),
        input_tpm: Some(1_000_000_000),
        output_tpm: Some(1_000_000_000),
        max_concurrent: Some(1_000),
    };
    let keys: Vec<String> = (0..100).map(|i| format!("key-{i}")).collect();
    let n = 20_000;
    let (mut admitting, mut settling) = (Duration::ZERO, Duration::ZERO);
    for i in 0..n {
        let t = std::time::Instant::now();
        let r =
            admitted(try_acquire(&l, &keys[i % keys.len()], &limits, tokens(1_000, 1_000)).await);
        admitting += t.elapsed();
        let t = std::time::Instant::now();
        l.settle(r, tokens(900, 500)).await;
        settling += t.elapsed();
    }
    let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    eprintln!(
        "local: {:.2} µs per admission, {:.2} µs per settlement (key + global, every dimension)",
        per(admitting),
        per(settling)
    );
}
