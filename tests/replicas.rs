//! Two gateway processes on one Redis enforce one limit; with Redis gone they
//! keep serving under local limits and go back to the shared limit when it
//! returns.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use http::Method;
use support::client::{http_client, messages_body, request, send};
use support::process::GatewayProcess;
use support::redis::{redis_or_skip, unique_prefix};
use support::relay::TcpRelay;
use tollgate::mock_upstream::{self, MockOptions};

/// Requests per minute of the one key both replicas serve: 50 a second.
const RPM: u32 = 3000;

fn replica(
    mock_url: &str,
    redis_url: &str,
    prefix: &str,
    dir: &std::path::Path,
    n: usize,
) -> GatewayProcess {
    GatewayProcess::spawn(&[
        ("TOLLGATE__UPSTREAM__URL", mock_url.to_owned()),
        (
            "TOLLGATE__LEDGER__URL",
            format!("sqlite://{}", dir.join("ledger.db").display()),
        ),
        (
            "TOLLGATE__LEDGER__JOURNAL_DIR",
            dir.join(format!("journal-{n}")).display().to_string(),
        ),
        ("TOLLGATE__LIMITS__BACKEND", "redis".to_owned()),
        ("TOLLGATE__LIMITS__REDIS_URL", redis_url.to_owned()),
        ("TOLLGATE__LIMITS__REDIS_KEY_PREFIX", prefix.to_owned()),
        ("TOLLGATE__LIMITS__REDIS_RETRY_INTERVAL", "300ms".to_owned()),
        ("TOLLGATE__LIMITS__RPM", RPM.to_string()),
        ("TOLLGATE__LIMITS__MAX_WAIT", "0s".to_owned()),
    ])
}

/// Sends requests of the one key to both replicas, `workers` at a time, until
/// `stop`; returns when each admitted (200) response arrived.
async fn hammer(urls: [String; 2], workers: usize, stop: Arc<AtomicBool>) -> (Vec<Instant>, usize) {
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..workers {
        let url = format!("{}/v1/messages", urls[w % 2]);
        let stop = stop.clone();
        tasks.spawn(async move {
            let client = http_client();
            let (mut admitted, mut limited) = (Vec::new(), 0usize);
            while !stop.load(Ordering::SeqCst) {
                let resp = send(
                    &client,
                    request(
                        Method::POST,
                        &url,
                        messages_body(false, 5),
                        &[("x-mock-output-tokens", "1")],
                    ),
                )
                .await;
                match resp.status.as_u16() {
                    200 => admitted.push(Instant::now()),
                    429 => {
                        limited += 1;
                        // Stay busy but don't spin: a tenth of the advertised wait.
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    other => panic!("unexpected {other}: {}", resp.text()),
                }
            }
            (admitted, limited)
        });
    }
    let (mut all, mut limited) = (Vec::new(), 0);
    while let Some(r) = tasks.join_next().await {
        let (a, l) = r.unwrap();
        all.extend(a);
        limited += l;
    }
    all.sort();
    (all, limited)
}

async fn metric(admin_url: &str, name: &str) -> f64 {
    let text = send(
        &http_client(),
        request(Method::GET, &format!("{admin_url}/metrics"), "", &[]),
    )
    .await
    .text();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_limit_and_survive_redis_going_away() {
    let Some(redis_url) =
        redis_or_skip("two_replicas_share_one_limit_and_survive_redis_going_away").await
    else {
        return;
    };
    let target = url::Url::parse(&redis_url).unwrap();
    let target = tokio::net::lookup_host(format!(
        "{}:{}",
        target.host_str().unwrap(),
        target.port().unwrap_or(6379)
    ))
    .await
    .unwrap()
    .next()
    .unwrap();
    let relay = TcpRelay::start(target).await;
    let relayed = format!("redis://{}", relay.addr());
    let mock = mock_upstream::start(MockOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix();
    let a = replica(mock.url(), &relayed, &prefix, dir.path(), 1);
    let b = replica(mock.url(), &relayed, &prefix, dir.path(), 2);
    let urls = [a.url.clone(), b.url.clone()];

    // 1. Hammer the key through both replicas for a while.
    let stop = Arc::new(AtomicBool::new(false));
    let run = tokio::spawn(hammer(urls.clone(), 16, stop.clone()));
    tokio::time::sleep(Duration::from_secs(9)).await;
    stop.store(true, Ordering::SeqCst);
    let (admitted, limited) = run.await.unwrap();
    assert!(limited > 0, "the limit never bound");
    assert!(
        admitted.len() >= RPM as usize,
        "burst not spent: {}",
        admitted.len()
    );
    // GCRA admits the burst (one minute's allowance) plus the refill rate for
    // the whole run: total = RPM + rate × (last − first). Compare the part the
    // rate explains with what the rate allows.
    let window = admitted
        .last()
        .unwrap()
        .duration_since(admitted[0])
        .as_secs_f64();
    let refilled = (admitted.len() - RPM as usize) as f64;
    let expected = window * f64::from(RPM) / 60.0;
    let error = (refilled - expected).abs() / expected;
    eprintln!(
        "two replicas: {} admitted in {window:.2}s ({refilled} beyond the burst, {expected:.1} allowed: {:.2}% off); {limited} limited",
        admitted.len(),
        error * 100.0
    );
    assert!(window > 5.0, "window too short: {window}");
    assert!(
        error <= 0.05,
        "admitted {refilled} beyond the burst, expected {expected:.1}"
    );

    // 2. Redis goes away: both replicas keep serving under local limits.
    relay.cut().await;
    for url in &urls {
        for _ in 0..5 {
            let resp = send(
                &http_client(),
                request(
                    Method::POST,
                    &format!("{url}/v1/messages"),
                    messages_body(false, 5),
                    &[],
                ),
            )
            .await;
            assert!(matches!(resp.status.as_u16(), 200 | 429), "{}", resp.text());
        }
    }
    // Local limits start fresh: each replica admits again.
    for url in &urls {
        let resp = send(
            &http_client(),
            request(
                Method::POST,
                &format!("{url}/v1/messages"),
                messages_body(false, 5),
                &[],
            ),
        )
        .await;
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    for admin in [&a.admin_url, &b.admin_url] {
        assert!(metric(admin, "tollgate_limiter_redis_fallback_total").await > 0.0);
    }

    // 3. Redis returns: decisions go back to it (the fallback count stops growing).
    relay.restore();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let _ = send(
        &http_client(),
        request(
            Method::POST,
            &format!("{}/v1/messages", urls[0]),
            messages_body(false, 5),
            &[],
        ),
    )
    .await;
    let before = metric(&a.admin_url, "tollgate_limiter_redis_fallback_total").await;
    for _ in 0..20 {
        let resp = send(
            &http_client(),
            request(
                Method::POST,
                &format!("{}/v1/messages", urls[0]),
                messages_body(false, 5),
                &[],
            ),
        )
        .await;
        assert!(matches!(resp.status.as_u16(), 200 | 429));
    }
    let after = metric(&a.admin_url, "tollgate_limiter_redis_fallback_total").await;
    assert_eq!(before, after, "still falling back after Redis returned");
    // And the shared state is the one from before the outage: the key spent its
    // burst, so beyond the couple of seconds' refill since, a quick burst is
    // refused (fresh local limits would admit all of it).
    let mut refused = 0;
    for _ in 0..300 {
        let resp = send(
            &http_client(),
            request(
                Method::POST,
                &format!("{}/v1/messages", urls[1]),
                messages_body(false, 5),
                &[],
            ),
        )
        .await;
        refused += usize::from(resp.status == 429);
    }
    assert!(
        refused >= 100,
        "only {refused} of 300 refused: not back on the shared limit"
    );
    assert_eq!(a.terminate(), Some(0));
    assert_eq!(b.terminate(), Some(0));
}
