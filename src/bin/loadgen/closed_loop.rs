//! Closed loop: N connections, each sending its next request as soon as the
//! previous response ended. Measures the maximum throughput (scenario a) and,
//! with a fixed request count, the soak (scenario e), where the proxy's RSS
//! after the warm-up is compared with its RSS at the end.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::client::{Conn, Errors, Target, Workload};
use crate::latency;
use crate::proc_stats::Watched;

/// When a closed-loop run stops, and what of it is warm-up.
#[derive(Debug, Clone, Copy)]
pub enum Stop {
    /// Warm up for `warmup`, then measure for `measure`.
    Time { warmup: Duration, measure: Duration },
    /// Send `total` requests; the first `warmup` are not measured.
    Requests { total: u64, warmup: u64 },
}

/// A closed-loop run: how many connections, and when it stops.
#[derive(Debug, Clone)]
pub struct Plan {
    pub connections: usize,
    pub stop: Stop,
}

/// State the workers share.
struct Shared {
    /// Requests handed out so far (the index of the next one).
    issued: AtomicU64,
    /// Successful responses, warm-up included.
    completed: AtomicU64,
    /// Responses completed inside the measured window.
    measured: AtomicU64,
    /// Nanoseconds from `origin` to the last measured completion.
    last_completion_ns: AtomicU64,
    /// Set (once) when the warm-up of a request-count run has been sent.
    warmed_up: Notify,
    latency: latency::Shared,
    origin: Instant,
}

/// Runs the plan against `target` and returns its JSON result: throughput,
/// latency from send to the end of the response, and the watched processes'
/// CPU and memory over the measured window.
pub async fn run(
    target: &Target,
    workload: &Workload,
    plan: &Plan,
    watched: &Watched,
) -> anyhow::Result<Value> {
    let origin = Instant::now();
    let shared = Arc::new(Shared {
        issued: AtomicU64::new(0),
        completed: AtomicU64::new(0),
        measured: AtomicU64::new(0),
        last_completion_ns: AtomicU64::new(0),
        warmed_up: Notify::new(),
        latency: latency::Shared::new()?,
        origin,
    });

    let mut conns = Vec::with_capacity(plan.connections);
    for _ in 0..plan.connections {
        conns.push(Conn::open(target).await?);
    }
    let mut workers = JoinSet::new();
    for conn in conns {
        let (target, workload, plan, shared) = (
            target.clone(),
            workload.clone(),
            plan.clone(),
            shared.clone(),
        );
        workers.spawn(async move { worker(conn, &target, &workload, &plan, &shared).await });
    }

    // The measured window starts after the warm-up.
    let (measure_start, timeline_task) = match plan.stop {
        Stop::Time { warmup, .. } => {
            tokio::time::sleep_until(origin + warmup).await;
            (origin + warmup, None)
        }
        Stop::Requests { warmup, .. } => {
            if warmup > 0 {
                shared.warmed_up.notified().await;
            }
            // Follow the proxy's memory through the soak, once a second.
            let sampler = watched.clone();
            let stop = CancellationToken::new();
            let task = tokio::spawn({
                let stop = stop.clone();
                async move {
                    let started = Instant::now();
                    let mut points = Vec::new();
                    let mut tick = tokio::time::interval(Duration::from_secs(1));
                    loop {
                        tokio::select! {
                            () = stop.cancelled() => break,
                            _ = tick.tick() => {}
                        }
                        if let Some(s) = sampler.proxy_sample() {
                            points
                                .push(json!([started.elapsed().as_secs_f64().round(), s.rss_kib]));
                        }
                    }
                    points
                }
            });
            (Instant::now(), Some((stop, task)))
        }
    };
    let start = watched.start();

    let mut errors = Errors::default();
    while let Some(joined) = workers.join_next().await {
        errors.add(joined??);
    }
    let end = watched.snapshot();
    let timeline = match timeline_task {
        Some((stop, task)) => {
            stop.cancel();
            task.await?
        }
        None => Vec::new(),
    };

    let measured = shared.measured.load(Ordering::Relaxed);
    let window = match plan.stop {
        Stop::Time { measure, .. } => measure.as_secs_f64(),
        Stop::Requests { .. } => {
            let last =
                origin + Duration::from_nanos(shared.last_completion_ns.load(Ordering::Relaxed));
            last.saturating_duration_since(measure_start).as_secs_f64()
        }
    };
    let mut result = json!({
        "mode": "closed",
        "connections": plan.connections,
        "window_s": window,
        "requests_ok": shared.completed.load(Ordering::Relaxed),
        "completed": measured,
        "rps": if window > 0.0 { measured as f64 / window } else { 0.0 },
        "errors": errors,
        "latency": shared.latency.summary(),
    });
    if !timeline.is_empty() {
        // [seconds since the warm-up ended, proxy RSS in KiB]
        result["proxy_rss_timeline"] = Value::Array(timeline);
    }
    let usage = watched.usage(&start, &end, Some(measured));
    if let (Value::Object(r), Value::Object(u)) = (&mut result, usage) {
        r.extend(u);
    }
    Ok(result)
}

async fn worker(
    mut conn: Conn,
    target: &Target,
    workload: &Workload,
    plan: &Plan,
    shared: &Shared,
) -> anyhow::Result<Errors> {
    let mut errors = Errors::default();
    let mut samples = shared.latency.local();
    let (end, measure_from_time) = match plan.stop {
        Stop::Time { warmup, measure } => (
            Some(shared.origin + warmup + measure),
            Some(shared.origin + warmup),
        ),
        Stop::Requests { .. } => (None, None),
    };
    loop {
        let index = shared.issued.fetch_add(1, Ordering::Relaxed);
        let measured_index = match plan.stop {
            Stop::Requests { total, warmup } => {
                if index >= total {
                    break;
                }
                if warmup > 0 && index == warmup {
                    shared.warmed_up.notify_one();
                }
                index >= warmup
            }
            Stop::Time { .. } => true,
        };
        let sent = Instant::now();
        if end.is_some_and(|end| sent >= end) {
            break;
        }
        let outcome = conn.round_trip(workload.request(target)?).await;
        let done = Instant::now();
        let in_window = measured_index
            && measure_from_time.is_none_or(|from| sent >= from)
            && end.is_none_or(|end| done <= end);
        match outcome {
            Ok(status) if status.is_success() => {
                shared.completed.fetch_add(1, Ordering::Relaxed);
                if in_window {
                    samples.record(done - sent);
                    shared.measured.fetch_add(1, Ordering::Relaxed);
                    let since_origin =
                        u64::try_from((done - shared.origin).as_nanos()).unwrap_or(u64::MAX);
                    shared
                        .last_completion_ns
                        .fetch_max(since_origin, Ordering::Relaxed);
                }
            }
            Ok(_) => errors.status += 1,
            Err(_) => {
                errors.io += 1;
                // Give a struggling target a moment, then start afresh.
                tokio::time::sleep(Duration::from_millis(10)).await;
                conn = Conn::open(target).await?;
            }
        }
    }
    Ok(errors)
}
