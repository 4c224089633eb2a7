//! SSE streams: many at once with the relay delay of every event
//! (scenario c), and many slow ones held open to weigh the proxy's memory per
//! open stream (scenario d).
//!
//! The mock writes `: ts=<unix epoch ns>` (an SSE comment, which every proxy
//! relays as is) just before each event. The client reads the wall clock
//! (`SystemTime`, CLOCK_REALTIME, the clock the mock read) when the chunk that
//! completes the line arrives; the difference is the event's delay from the
//! mock's write to the client's read. Against `direct` it is the floor of the
//! machine; what a proxy adds is its figure minus direct's.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::BodyExt as _;
use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::client::{Conn, Target, Workload};
use crate::latency;
use crate::proc_stats::Watched;

/// Finds `: ts=<ns>` lines in a byte stream split anywhere.
#[derive(Debug, Default)]
pub struct StampScanner {
    /// The start of the current line, kept only while it may still be a stamp.
    partial: Vec<u8>,
    /// The current line is known not to be a stamp: skip to its end.
    skipping: bool,
}

const STAMP: &[u8] = b": ts=";
/// Longer than any stamp line (`: ts=` and twenty digits).
const MAX_STAMP_LINE: usize = 40;

impl StampScanner {
    /// Scans `chunk`, calling `found(stamp_ns)` for every stamp line it completes.
    pub fn feed(&mut self, mut chunk: &[u8], mut found: impl FnMut(u128)) {
        while !chunk.is_empty() {
            let (segment, complete) = match memchr::memchr(b'\n', chunk) {
                Some(end) => (&chunk[..end], true),
                None => (chunk, false),
            };
            chunk = &chunk[(segment.len() + usize::from(complete)).min(chunk.len())..];
            if !self.skipping {
                if self.partial.is_empty() && complete {
                    // The common case: a whole line in one chunk, no copy.
                    if let Some(ns) = parse_stamp(segment) {
                        found(ns);
                    }
                } else {
                    self.partial.extend_from_slice(segment);
                    let prefix = self.partial.len().min(STAMP.len());
                    if self.partial[..prefix] != STAMP[..prefix]
                        || self.partial.len() > MAX_STAMP_LINE
                    {
                        self.partial.clear();
                        self.skipping = true;
                    } else if complete {
                        if let Some(ns) = parse_stamp(&self.partial) {
                            found(ns);
                        }
                        self.partial.clear();
                    }
                }
            }
            if complete {
                self.skipping = false;
            }
        }
    }
}

fn parse_stamp(line: &[u8]) -> Option<u128> {
    let digits = line.strip_prefix(STAMP)?;
    let digits = digits.strip_suffix(b"\r").unwrap_or(digits);
    std::str::from_utf8(digits).ok()?.parse().ok()
}

fn now_unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Events of the warm-up stream each connection runs before a measurement.
const STREAM_WARMUP_EVENTS: u64 = 8;

/// Scenario (c): how many streams, of how many events, how far apart; stream
/// starts are spread over `ramp`.
#[derive(Debug, Clone)]
pub struct ConcurrentPlan {
    pub streams: usize,
    pub events: u64,
    pub event_delay_ms: u64,
    pub ramp: Duration,
    pub timeout: Duration,
}

/// What one stream saw.
#[derive(Debug, Default)]
struct StreamOutcome {
    events: u64,
    /// Stamps later than the client's clock (the clock stepped): recorded as 0.
    negative: u64,
    ok: bool,
}

/// Scenario (c): `streams` streams at once, each of `events` events.
pub async fn run_concurrent(
    target: &Target,
    plan: &ConcurrentPlan,
    watched: &Watched,
) -> anyhow::Result<Value> {
    let workload = Workload::stream_of(plan.events, plan.event_delay_ms);
    let ttfb = Arc::new(latency::Shared::new()?);
    let relay = Arc::new(latency::Shared::new()?);

    // Connect first, so connection setup is not part of any stream's TTFB.
    let mut conns = Vec::with_capacity(plan.streams);
    for _ in 0..plan.streams {
        conns.push(Conn::open(target).await?);
    }
    // Then one short stream on every connection at once: the proxy's own
    // connection pool to the upstream now holds as many connections as the
    // measurement needs, as it would in steady state.
    let warmup = Workload::stream_of(STREAM_WARMUP_EVENTS, 0);
    let mut warming = JoinSet::new();
    for mut conn in conns {
        let (target, warmup) = (target.clone(), warmup.clone());
        warming.spawn(async move {
            conn.round_trip(warmup.request(&target)?).await?;
            anyhow::Ok(conn)
        });
    }
    let mut conns = Vec::with_capacity(plan.streams);
    while let Some(joined) = warming.join_next().await {
        conns.push(joined??);
    }
    let start = Instant::now() + Duration::from_millis(10);
    let usage_start = watched.start();
    let mut tasks = JoinSet::new();
    for (i, mut conn) in conns.into_iter().enumerate() {
        let offset = plan.ramp.mul_f64(i as f64 / plan.streams.max(1) as f64);
        let (target, workload, ttfb, relay) = (
            target.clone(),
            workload.clone(),
            ttfb.clone(),
            relay.clone(),
        );
        tasks.spawn(async move {
            tokio::time::sleep_until(start + offset).await;
            let mut outcome = StreamOutcome::default();
            let mut ttfb = ttfb.local();
            let mut relay = relay.local();
            let sent = Instant::now();
            let response = match conn.send(workload.request(&target)?).await {
                Ok(r) if r.status().is_success() => r,
                _ => return anyhow::Ok(outcome),
            };
            let mut body = response.into_body();
            let mut scanner = StampScanner::default();
            let mut first = true;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { return Ok(outcome) };
                let Some(data) = frame.data_ref() else {
                    continue;
                };
                let now = now_unix_ns();
                if first {
                    ttfb.record(sent.elapsed());
                    first = false;
                }
                scanner.feed(data, |stamp| {
                    outcome.events += 1;
                    if stamp > now {
                        outcome.negative += 1;
                    }
                    relay
                        .record_nanos(u64::try_from(now.saturating_sub(stamp)).unwrap_or(u64::MAX));
                });
            }
            outcome.ok = true;
            Ok(outcome)
        });
    }

    let mut streams_ok = 0u64;
    let mut events = 0u64;
    let mut negative = 0u64;
    let joined = tokio::time::timeout(plan.timeout, async {
        while let Some(joined) = tasks.join_next().await {
            let outcome = joined??;
            streams_ok += u64::from(outcome.ok);
            events += outcome.events;
            negative += outcome.negative;
        }
        anyhow::Ok(())
    })
    .await;
    let wall = Instant::now()
        .saturating_duration_since(start)
        .as_secs_f64();
    let usage_end = watched.snapshot();
    let timed_out = joined.is_err();
    if let Ok(result) = joined {
        result?;
    }
    let mut result = json!({
        "mode": "streams",
        "streams": plan.streams,
        "streams_ok": streams_ok,
        "timed_out": timed_out,
        "events_per_stream": plan.events,
        "event_delay_ms": plan.event_delay_ms,
        "events_expected": plan.streams as u64 * plan.events,
        "events_received": events,
        "clock_steps": negative,
        "wall_s": wall,
        "ttfb": ttfb.summary(),
        "relay_delay": relay.summary(),
    });
    let usage = watched.usage(&usage_start, &usage_end, Some(plan.streams as u64));
    if let (Value::Object(r), Value::Object(u)) = (&mut result, usage) {
        r.extend(u);
    }
    Ok(result)
}

/// Scenario (d): how many slow streams to hold, how fast to open them, and
/// how long to let the proxy settle before its memory is read.
#[derive(Debug, Clone)]
pub struct HoldPlan {
    pub streams: usize,
    pub events: u64,
    pub event_delay_ms: u64,
    pub open_concurrency: usize,
    pub settle: Duration,
    pub timeout: Duration,
}

/// Scenario (d): open `streams` slow streams, hold them, and weigh the proxy.
pub async fn run_hold(
    target: &Target,
    plan: &HoldPlan,
    watched: &Watched,
) -> anyhow::Result<Value> {
    // Warm up: the first requests and streams initialise pools, caches and
    // lazily built state that would otherwise count as per-stream memory.
    {
        let mut conn = Conn::open(target).await?;
        let small = Workload::messages(false, 16, 0);
        for _ in 0..50 {
            conn.round_trip(small.request(target)?).await?;
        }
        let short = Workload::stream_of(10, 0);
        for _ in 0..5 {
            conn.round_trip(short.request(target)?).await?;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = watched.start();
    let idle_rss = watched.proxy_sample().map(|s| s.rss_kib);

    let workload = Workload::stream_of(plan.events, plan.event_delay_ms);
    let opening = Arc::new(Semaphore::new(plan.open_concurrency.max(1)));
    let open = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    // Why streams failed to open, by message: the first clue when some do.
    let why = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let ended_early = Arc::new(AtomicUsize::new(0));
    let events = Arc::new(AtomicU64::new(0));
    let changed = Arc::new(Notify::new());
    let release = CancellationToken::new();
    let began = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..plan.streams {
        let (target, workload) = (target.clone(), workload.clone());
        let (why, ended_early) = (why.clone(), ended_early.clone());
        let (opening, open, failed, events, changed, release) = (
            opening.clone(),
            open.clone(),
            failed.clone(),
            events.clone(),
            changed.clone(),
            release.clone(),
        );
        tasks.spawn(async move {
            let permit = opening.acquire_owned().await;
            let opened = async {
                let mut conn = Conn::open(&target).await?;
                let response = conn.send(workload.request(&target)?).await?;
                anyhow::ensure!(
                    response.status().is_success(),
                    "status {}",
                    response.status()
                );
                let mut body = response.into_body();
                // Open means: the first event arrived through the proxy.
                loop {
                    match body.frame().await {
                        Some(Ok(frame)) if frame.is_data() => break,
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Err(e.into()),
                        None => anyhow::bail!("stream ended before its first event"),
                    }
                }
                anyhow::Ok((conn, body))
            }
            .await;
            drop(permit);
            let (conn, mut body) = match opened {
                Ok(pair) => pair,
                Err(e) => {
                    *why.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .entry(format!("{e:#}"))
                        .or_default() += 1;
                    failed.fetch_add(1, Ordering::Relaxed);
                    changed.notify_one();
                    return;
                }
            };
            open.fetch_add(1, Ordering::Relaxed);
            changed.notify_one();
            // Keep reading (the events are slow) until released.
            loop {
                tokio::select! {
                    () = release.cancelled() => break,
                    frame = body.frame() => match frame {
                        Some(Ok(_)) => { events.fetch_add(1, Ordering::Relaxed); }
                        _ => {
                            ended_early.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    },
                }
            }
            drop(body);
            drop(conn);
        });
    }

    // Wait until every stream is open (or failed), or the timeout.
    let deadline = began + plan.timeout;
    loop {
        let settled = open.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed);
        if settled >= plan.streams || Instant::now() >= deadline {
            break;
        }
        let _ = tokio::time::timeout_at(deadline, changed.notified()).await;
    }
    let open_after = began.elapsed().as_secs_f64();
    tokio::time::sleep(plan.settle).await;
    let still_open = open
        .load(Ordering::Relaxed)
        .saturating_sub(ended_early.load(Ordering::Relaxed));
    let held = watched.snapshot();
    let held_rss = watched.proxy_sample().map(|s| s.rss_kib);

    release.cancel();
    while tasks.join_next().await.is_some() {}
    tokio::time::sleep(Duration::from_secs(1)).await;
    let closed_rss = watched.proxy_sample().map(|s| s.rss_kib);

    let per_stream_kib = match (idle_rss, held_rss) {
        (Some(idle), Some(held)) if still_open > 0 => {
            Some((held as f64 - idle as f64) / still_open as f64)
        }
        _ => None,
    };
    let mut result = json!({
        "mode": "hold",
        "streams": plan.streams,
        "streams_open": still_open,
        "streams_failed": failed.load(Ordering::Relaxed),
        "streams_ended_early": ended_early.load(Ordering::Relaxed),
        "failure_reasons": *why.lock().unwrap_or_else(PoisonError::into_inner),
        "open_s": open_after,
        "events_while_held": events.load(Ordering::Relaxed),
        "proxy_idle_rss_kib": idle_rss,
        "proxy_held_rss_kib": held_rss,
        "proxy_closed_rss_kib": closed_rss,
        "proxy_kib_per_stream": per_stream_kib,
    });
    let usage = watched.usage(&idle, &held, None);
    if let (Value::Object(r), Value::Object(u)) = (&mut result, usage) {
        r.extend(u);
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every split of the input into two chunks finds the same stamps.
    #[test]
    fn finds_stamps_at_every_split() {
        let input = b": ts=123\nevent: ping\ndata: {\"type\": \"ping\"}\n\n: ts=4567\r\nevent: x\n: other comment\n: ts=89\n";
        for split in 0..=input.len() {
            let mut scanner = StampScanner::default();
            let mut seen = Vec::new();
            scanner.feed(&input[..split], |ns| seen.push(ns));
            scanner.feed(&input[split..], |ns| seen.push(ns));
            assert_eq!(seen, [123, 4567, 89], "split at {split}");
        }
    }

    #[test]
    fn finds_stamps_fed_byte_by_byte() {
        let input = b"data: : ts=1\n: ts=2\n: ts=x3\n: ts=4";
        let mut scanner = StampScanner::default();
        let mut seen = Vec::new();
        for byte in input.chunks(1) {
            scanner.feed(byte, |ns| seen.push(ns));
        }
        // `data: : ts=1` is not a comment line, `: ts=x3` not a number, and
        // `: ts=4` is not complete yet.
        assert_eq!(seen, [2]);
        scanner.feed(b"\n", |ns| seen.push(ns));
        assert_eq!(seen, [2, 4]);
    }
}
