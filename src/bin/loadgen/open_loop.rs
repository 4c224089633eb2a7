//! Open loop: requests arrive at a fixed rate whatever the target does, and
//! each one's latency runs from its *scheduled* send time (scenario b).
//!
//! Request `i` is due at `start + i / rate`. A pacer thread releases requests
//! as they fall due; a pool of connections takes them in order. When every
//! connection is busy, a due request waits, and that wait is part of its
//! latency: a target that stalls cannot make the client send less and so hide
//! the stall (coordinated omission, as wrk2 corrects it).
//!
//! The pacer is an OS thread sleeping with `nanosleep` (tens of microseconds
//! of jitter) rather than a tokio timer, whose millisecond ticks would add up
//! to a millisecond of artificial delay to every request. It sleeps at least
//! [`MIN_PACER_SLEEP`] at a time and then releases every request that fell
//! due, so very high rates cost a bounded number of wake-ups.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::client::{Conn, Errors, Target, Workload};
use crate::latency;
use crate::proc_stats::Watched;

/// The pacer's shortest sleep.
const MIN_PACER_SLEEP: Duration = Duration::from_micros(50);

/// An open-loop run: the arrival rate, the warm-up and measured periods, the
/// connections the schedule may use, and how long queued requests may drain.
#[derive(Debug, Clone)]
pub struct Plan {
    pub rate: f64,
    pub warmup: Duration,
    pub measure: Duration,
    pub connections: usize,
    pub drain: Duration,
}

struct Schedule {
    start: Instant,
    rate: f64,
    total: u64,
    /// Requests that fell due so far.
    released: AtomicU64,
    /// Requests taken by a connection so far.
    claimed: AtomicU64,
    /// The pacer released the last request.
    finished: AtomicBool,
    /// One `notify_one` per released request; `notify_waiters` at the end.
    wake: Notify,
    measure_from: Instant,
    latency: latency::Shared,
    service: latency::Shared,
    measured: AtomicU64,
    /// Responses that ended inside the measured window: the requests the
    /// window's CPU time paid for.
    ended_in_window: AtomicU64,
    measure_until: Instant,
}

impl Schedule {
    fn due(&self, index: u64) -> Instant {
        self.start + Duration::from_secs_f64(index as f64 / self.rate)
    }

    /// Takes the next released request, if any.
    fn claim(&self) -> Option<u64> {
        let mut claimed = self.claimed.load(Ordering::Acquire);
        loop {
            if claimed >= self.released.load(Ordering::Acquire) {
                return None;
            }
            match self.claimed.compare_exchange_weak(
                claimed,
                claimed + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(claimed),
                Err(now) => claimed = now,
            }
        }
    }
}

/// Runs the schedule against `target` and returns its JSON result: latency
/// from the scheduled send time, the service time from the actual send, the
/// requests that could not be sent in time, and the watched processes' usage.
pub async fn run(
    target: &Target,
    workload: &Workload,
    plan: &Plan,
    watched: &Watched,
) -> anyhow::Result<Value> {
    anyhow::ensure!(plan.rate > 0.0, "--rate must be positive");
    let mut conns = Vec::with_capacity(plan.connections);
    for _ in 0..plan.connections {
        conns.push(Conn::open(target).await?);
    }
    let start = Instant::now() + Duration::from_millis(20);
    let total = ((plan.warmup + plan.measure).as_secs_f64() * plan.rate).ceil() as u64;
    let schedule = Arc::new(Schedule {
        start,
        rate: plan.rate,
        total,
        released: AtomicU64::new(0),
        claimed: AtomicU64::new(0),
        finished: AtomicBool::new(false),
        wake: Notify::new(),
        measure_from: start + plan.warmup,
        latency: latency::Shared::new()?,
        service: latency::Shared::new()?,
        measured: AtomicU64::new(0),
        ended_in_window: AtomicU64::new(0),
        measure_until: start + plan.warmup + plan.measure,
    });

    let mut workers = JoinSet::new();
    for conn in conns {
        let (target, workload, schedule) = (target.clone(), workload.clone(), schedule.clone());
        workers.spawn(async move { worker(conn, &target, &workload, &schedule).await });
    }
    let pacer = std::thread::Builder::new().name("pacer".into()).spawn({
        let schedule = schedule.clone();
        move || pace(&schedule)
    })?;

    tokio::time::sleep_until(schedule.measure_from).await;
    let usage_start = watched.start();
    tokio::time::sleep_until(start + plan.warmup + plan.measure).await;
    let usage_end = watched.snapshot();

    // Requests still queued get `drain` to finish; the rest count as not sent.
    let drained = tokio::time::timeout(plan.drain, async {
        let mut errors = Errors::default();
        while let Some(joined) = workers.join_next().await {
            errors.add(joined??);
        }
        anyhow::Ok(errors)
    })
    .await;
    let (errors, complete) = match drained {
        Ok(errors) => (errors?, true),
        Err(_) => {
            workers.abort_all();
            (Errors::default(), false)
        }
    };
    if pacer.join().is_err() {
        anyhow::bail!("the pacer thread panicked");
    }
    let not_sent = total.saturating_sub(schedule.claimed.load(Ordering::Acquire));
    let measured = schedule.measured.load(Ordering::Relaxed);
    let mut result = json!({
        "mode": "open",
        "connections": plan.connections,
        "offered_rps": plan.rate,
        "window_s": plan.measure.as_secs_f64(),
        "completed": measured,
        "rps": measured as f64 / plan.measure.as_secs_f64(),
        "not_sent": not_sent,
        "drained": complete,
        "errors": errors,
        // From the scheduled send time: what a user arriving then would see.
        "latency": schedule.latency.summary(),
        // From the actual send: the target's own service time.
        "service_time": schedule.service.summary(),
    });
    let ended_in_window = schedule.ended_in_window.load(Ordering::Relaxed);
    let usage = watched.usage(&usage_start, &usage_end, Some(ended_in_window));
    if let (Value::Object(r), Value::Object(u)) = (&mut result, usage) {
        r.extend(u);
    }
    Ok(result)
}

/// Releases requests as they fall due (runs on its own thread).
fn pace(schedule: &Schedule) {
    loop {
        let elapsed = Instant::now().saturating_duration_since(schedule.start);
        let due = ((elapsed.as_secs_f64() * schedule.rate).floor() as u64 + 1).min(schedule.total);
        let released = schedule.released.load(Ordering::Acquire);
        if due > released {
            schedule.released.store(due, Ordering::Release);
            for _ in released..due {
                schedule.wake.notify_one();
            }
        }
        if due >= schedule.total {
            break;
        }
        let next = schedule.due(due);
        let wait = next
            .saturating_duration_since(Instant::now())
            .max(MIN_PACER_SLEEP);
        std::thread::sleep(wait);
    }
    schedule.finished.store(true, Ordering::Release);
    schedule.wake.notify_waiters();
}

async fn worker(
    mut conn: Conn,
    target: &Target,
    workload: &Workload,
    schedule: &Schedule,
) -> anyhow::Result<Errors> {
    let mut errors = Errors::default();
    let mut latency = schedule.latency.local();
    let mut service = schedule.service.local();
    loop {
        let index = loop {
            let notified = schedule.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(index) = schedule.claim() {
                break Some(index);
            }
            if schedule.finished.load(Ordering::Acquire) {
                break None;
            }
            notified.await;
        };
        let Some(index) = index else { break };
        let due = schedule.due(index);
        let sent = Instant::now();
        let outcome = conn.round_trip(workload.request(target)?).await;
        let done = Instant::now();
        match outcome {
            Ok(status) if status.is_success() => {
                if done >= schedule.measure_from && done <= schedule.measure_until {
                    schedule.ended_in_window.fetch_add(1, Ordering::Relaxed);
                }
                if due >= schedule.measure_from {
                    latency.record(done.saturating_duration_since(due));
                    service.record(done - sent);
                    schedule.measured.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(_) => errors.status += 1,
            Err(_) => {
                errors.io += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
                conn = Conn::open(target).await?;
            }
        }
    }
    Ok(errors)
}
