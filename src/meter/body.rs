//! [`MeteredBody`]: the response body wrapper that meters while it relays.
//!
//! Each upstream frame is shown to the [`Meter`] in place and returned to hyper
//! unchanged, so bytes reach the client as they arrive. The wrapper holds the
//! request's state in an `Option` and takes it at the first of: the end of the
//! body, an upstream failure (broken body or idle timeout), or `Drop` (the
//! client went away, or shutdown cut the stream). That is the one place a
//! [`UsageRecord`] is finalised, so every request yields exactly one.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::Semaphore;
use tokio::time::Sleep;
use tokio_util::task::TaskTracker;

use crate::budget::Budgets;
use crate::config::DisconnectPolicy;
use crate::error::sse_error_event;
use crate::limits::{Demand, Limiter, Reservation};
use crate::meter::{Meter, MeterReading};
use crate::metrics::Metrics;
use crate::prices::{CostQuery, Pricer};
use crate::record::{Outcome, RecordAck, SharedSink, UsageRecord};

/// The error type of a metered body: the upstream's, or an idle timeout.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the proxy knew about a request before its response arrived.
#[derive(Debug)]
pub struct RequestContext {
    pub request_id: String,
    pub key_id: String,
    pub team: Option<String>,
    /// The `model` of the request body, if it had one.
    pub requested_model: Option<String>,
    pub endpoint: String,
    pub end_user: Option<String>,
    pub tags: Option<String>,
    pub long_context_beta: bool,
    pub attempts: u32,
    pub queued_ms: u64,
    /// The rate-limit reservation made at admission, settled at the end.
    pub reservation: Option<Reservation>,
    /// When the request arrived.
    pub started: Instant,
    pub started_at: DateTime<Utc>,
    /// When the request was sent upstream (after admission).
    pub forwarded: Instant,
}

/// What the response headers said.
#[derive(Debug, Clone)]
pub struct ResponseFacts {
    pub status: u16,
    pub upstream_request_id: Option<String>,
    /// The response is an SSE stream (`text/event-stream`).
    pub stream: bool,
    /// An SSE error event may be appended if the upstream breaks: the response
    /// is a stream without a `content-length`.
    pub can_append_error: bool,
}

/// How a request's response ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The upstream body ended.
    Clean,
    /// The upstream body failed or went idle for too long.
    UpstreamBroke,
    /// The client went away first.
    ClientGone,
    /// Shutdown grace expired with the stream still open.
    Interrupted,
}

/// Turns finished requests into records and hands them to the sink. Shared by
/// every request.
pub struct Recorder {
    sink: SharedSink,
    metrics: Metrics,
    prices: Arc<Pricer>,
    limiter: Arc<Limiter>,
    budgets: Budgets,
    policy: DisconnectPolicy,
    idle_timeout: Duration,
    drain_timeout: Duration,
    drains: Arc<Semaphore>,
    drain_tasks: TaskTracker,
    /// Set when shutdown grace has expired: streams dropped from then on were
    /// cut by tollgate, not by their client.
    interrupting: AtomicBool,
}

/// Settings of the [`Recorder`].
pub struct RecorderSettings {
    /// Prices each record.
    pub prices: Arc<Pricer>,
    /// Settles each request's rate-limit reservation.
    pub limiter: Arc<Limiter>,
    /// Adds each record's cost to its key's budget.
    pub budgets: Budgets,
    pub policy: DisconnectPolicy,
    pub idle_timeout: Duration,
    pub drain_timeout: Duration,
    pub max_drains: usize,
}

impl Recorder {
    /// Creates the recorder. `drain_tasks` (also used for rate-limit settlements
    /// that cannot finish at once) is owned by the app, which waits for it at
    /// shutdown.
    pub fn new(
        sink: SharedSink,
        metrics: Metrics,
        settings: RecorderSettings,
        drain_tasks: TaskTracker,
    ) -> Recorder {
        Recorder {
            sink,
            metrics,
            prices: settings.prices,
            limiter: settings.limiter,
            budgets: settings.budgets,
            policy: settings.policy,
            idle_timeout: settings.idle_timeout,
            drain_timeout: settings.drain_timeout,
            drains: Arc::new(Semaphore::new(settings.max_drains)),
            drain_tasks,
            interrupting: AtomicBool::new(false),
        }
    }

    /// The metrics the recorder updates.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The sink records go to.
    pub fn sink(&self) -> &SharedSink {
        &self.sink
    }

    /// From now on, dropped streams are recorded as `interrupted`.
    pub fn start_interrupting(&self) {
        self.interrupting.store(true, Ordering::SeqCst);
    }

    /// Records a request whose upstream answer never arrived (first-byte timeout
    /// or a failure after the request was sent).
    pub fn record_failed(&self, ctx: RequestContext, status: u16, error_type: &str) {
        let facts = ResponseFacts {
            status,
            upstream_request_id: None,
            stream: false,
            can_append_error: false,
        };
        let mut record = self.build(ctx, &facts, None, End::UpstreamBroke, None);
        record.error_type = Some(error_type.to_owned());
        // The client gets tollgate's own error at once; the record is queued.
        let _ack = self.emit(record, false);
    }

    fn finalise(&self, mut active: Active, end: End) -> RecordAck {
        active.meter.finish();
        let reading = active.meter.reading();
        let model_confirmed = reading.is_some_and(|r| r.model.is_some());
        let reservation = active.ctx.reservation.take();
        let record = self.build(active.ctx, &active.facts, reading, end, active.first_byte);
        if let Some(reservation) = reservation {
            self.settle(reservation, &record.usage);
        }
        self.emit(record, model_confirmed)
    }

    /// Replaces a reservation's estimate with the actual usage. Cache reads do
    /// not count against input limits (as Anthropic counts); cache writes do.
    /// The local limiter settles at once; a Redis settlement that must wait for
    /// the network continues as a tracked task.
    fn settle(&self, reservation: Reservation, usage: &crate::meter::Usage) {
        let limiter = self.limiter.clone();
        let actual = Demand {
            input_tokens: usage.input_tokens + usage.cache_creation_input_tokens,
            output_tokens: usage.output_tokens,
        };
        let mut settlement = Box::pin(async move { limiter.settle(reservation, actual).await });
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if settlement.as_mut().poll(&mut cx).is_pending() {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    self.drain_tasks.spawn_on(settlement, &runtime);
                }
                // Without a runtime the reservation is dropped: its slot is
                // freed and its estimate stays counted.
                Err(_) => drop(settlement),
            }
        }
    }

    fn emit(&self, mut record: UsageRecord, model_confirmed: bool) -> RecordAck {
        record.cost_nanousd = match record.model.as_deref() {
            Some(model) => self.prices.cost(&CostQuery {
                model,
                usage: &record.usage,
                long_context_beta: record.long_context_beta,
            }),
            // No model and no usage (count_tokens, models, files, …): nothing
            // was billed, which is a known cost, not an unpriced one.
            None if record.usage == crate::meter::Usage::default() => Some(0),
            None => None,
        };
        record.price_version = Some(self.prices.version().to_owned());
        if let Some(cost) = record.cost_nanousd.filter(|c| *c > 0) {
            self.budgets.add(&record.key_id, cost, record.started_at);
        }
        self.metrics.observe_record(&record, model_confirmed);
        self.metrics.active_requests.dec();
        crate::record::log_record(&record);
        self.sink.record(record)
    }

    fn build(
        &self,
        ctx: RequestContext,
        facts: &ResponseFacts,
        reading: Option<&MeterReading>,
        end: End,
        first_byte: Option<Instant>,
    ) -> UsageRecord {
        let outcome = match end {
            End::Clean if facts.status >= 400 => Outcome::UpstreamError,
            End::Clean if reading.is_some_and(|r| r.saw_error_event) => Outcome::StreamError,
            End::Clean => Outcome::Completed,
            End::UpstreamBroke => Outcome::UpstreamError,
            End::ClientGone => Outcome::ClientDisconnected,
            End::Interrupted => Outcome::Interrupted,
        };
        let usage_exact = match reading {
            // Endpoints that carry no usage bill nothing: zero is exact.
            None => end != End::UpstreamBroke || facts.status < 400,
            // An error answer bills nothing.
            Some(_) if end == End::Clean && facts.status >= 400 => true,
            Some(r) => r.saw_final_usage && r.malformed == 0,
        };
        let mut usage = reading.map(|r| r.usage.clone()).unwrap_or_default();
        if let Some(r) = reading {
            usage.output_tokens = r.output_tokens_for_record();
        }
        let error_type = match (end, reading.and_then(|r| r.error_type.clone())) {
            (_, Some(t)) => Some(t),
            (End::UpstreamBroke, None) => Some("api_error".to_owned()),
            _ => None,
        };
        let now = Instant::now();
        UsageRecord {
            request_id: ctx.request_id,
            upstream_request_id: facts.upstream_request_id.clone(),
            message_id: reading.and_then(|r| r.message_id.clone()),
            key_id: ctx.key_id,
            team: ctx.team,
            model: reading
                .and_then(|r| r.model.clone())
                .or(ctx.requested_model),
            endpoint: ctx.endpoint,
            stream: facts.stream,
            status: facts.status,
            outcome,
            error_type,
            stop_reason: reading.and_then(|r| r.stop_reason.clone()),
            usage,
            usage_exact,
            cost_nanousd: None,
            price_version: None,
            end_user: ctx.end_user,
            tags: ctx.tags,
            attempts: ctx.attempts,
            queued_ms: ctx.queued_ms,
            ttfb_ms: first_byte.map(|t| millis(t.duration_since(ctx.started))),
            duration_ms: millis(now.duration_since(ctx.started)),
            started_at: ctx.started_at,
            finished_at: Utc::now(),
            meter_errors: reading.map_or(0, |r| r.malformed),
            long_context_beta: ctx.long_context_beta,
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Everything a body in flight carries until its record is finalised.
struct Active {
    meter: Meter,
    ctx: RequestContext,
    facts: ResponseFacts,
    first_byte: Option<Instant>,
}

/// A response body relayed to the client while the meter reads a view of it.
pub struct MeteredBody<B>
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    inner: Option<B>,
    active: Option<Active>,
    recorder: Arc<Recorder>,
    /// Fires when the upstream has been silent for `idle_timeout`. It is re-armed
    /// lazily (only when it fires) rather than on every chunk.
    idle: Pin<Box<Sleep>>,
    last_activity: Instant,
    /// The sink's ack of the finalised record: the end of the response (its
    /// last frame, or its end) is held until the record is in the journal.
    ack: Option<tokio::sync::oneshot::Receiver<()>>,
    /// What to return once the ack arrives.
    held: Option<Option<Result<Frame<Bytes>, BoxError>>>,
}

/// Longest time the end of a response waits for its record to be journalled;
/// past it the response ends anyway (the record is still queued).
const ACK_TIMEOUT: Duration = Duration::from_secs(2);

type PolledFrame = Poll<Option<Result<Frame<Bytes>, BoxError>>>;

impl<B> MeteredBody<B>
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    /// Wraps an upstream body.
    pub fn new(
        inner: B,
        meter: Meter,
        ctx: RequestContext,
        facts: ResponseFacts,
        recorder: Arc<Recorder>,
    ) -> MeteredBody<B> {
        let now = Instant::now();
        let idle = Box::pin(tokio::time::sleep(recorder.idle_timeout));
        MeteredBody {
            inner: Some(inner),
            active: Some(Active {
                meter,
                ctx,
                facts,
                first_byte: None,
            }),
            recorder,
            idle,
            last_activity: now,
            ack: None,
            held: None,
        }
    }

    /// Returns `result` once `ack` resolves (or at once without one).
    fn after_ack(
        &mut self,
        ack: RecordAck,
        result: Option<Result<Frame<Bytes>, BoxError>>,
        cx: &mut Context<'_>,
    ) -> PolledFrame {
        match ack {
            None => Poll::Ready(result),
            Some(ack) => {
                self.ack = Some(ack);
                self.held = Some(result);
                self.idle
                    .as_mut()
                    .reset((Instant::now() + ACK_TIMEOUT).into());
                self.poll_ack(cx)
            }
        }
    }

    fn poll_ack(&mut self, cx: &mut Context<'_>) -> PolledFrame {
        if let Some(ack) = self.ack.as_mut() {
            if Pin::new(ack).poll(cx).is_pending() {
                if self.idle.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.recorder.metrics.record_ack_timeouts.inc();
                tracing::warn!(
                    "usage journal slow: ending a response before its record was written"
                );
            }
            self.ack = None;
        }
        Poll::Ready(self.held.take().flatten())
    }

    /// Finalises after an upstream failure. A stream that can take one more
    /// event ends with an SSE `error` event (so SDK clients raise a clean error);
    /// anything else ends with the error, which aborts the client connection.
    fn upstream_failed(&mut self, error: BoxError, cx: &mut Context<'_>) -> PolledFrame {
        self.inner = None;
        let Some(active) = self.active.take() else {
            return Poll::Ready(None);
        };
        let append = active.facts.can_append_error && active.meter.is_stream();
        self.recorder
            .metrics
            .upstream_failures
            .with_label_values(&["broken_body"])
            .inc();
        tracing::warn!(request_id = %active.ctx.request_id, error = %error, "upstream response failed mid-body");
        let ack = self.recorder.finalise(active, End::UpstreamBroke);
        let result = if append {
            let event = sse_error_event("api_error", "upstream connection failed mid-stream");
            Ok(Frame::data(event))
        } else {
            Err(error)
        };
        self.after_ack(ack, Some(result), cx)
    }

    /// Checks the idle timer; true when the upstream has been silent too long.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.idle.as_mut().poll(cx).is_pending() {
                return false;
            }
            let deadline = self.last_activity + self.recorder.idle_timeout;
            if Instant::now() >= deadline {
                return true;
            }
            self.idle.as_mut().reset(deadline.into());
        }
    }
}

impl<B> Body for MeteredBody<B>
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.held.is_some() {
            return this.poll_ack(cx);
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        match polled {
            Poll::Pending => {
                if this.idle_expired(cx) {
                    let timeout = this.recorder.idle_timeout;
                    this.recorder
                        .metrics
                        .upstream_failures
                        .with_label_values(&["idle_timeout"])
                        .inc();
                    return this
                        .upstream_failed(format!("upstream idle for {timeout:?}").into(), cx);
                }
                Poll::Pending
            }
            Poll::Ready(Some(Ok(frame))) => {
                this.last_activity = Instant::now();
                if let Some(active) = this.active.as_mut() {
                    if let Some(data) = frame.data_ref() {
                        if active.first_byte.is_none() {
                            active.first_byte = Some(this.last_activity);
                            observe_first_byte(&this.recorder.metrics, active, this.last_activity);
                        }
                        active.meter.feed(data);
                    }
                    // Finalise as soon as the upstream says the body is complete,
                    // so a client that hangs up right after the last byte is not
                    // mistaken for one that left early.
                    if this.inner.as_ref().is_some_and(|b| b.is_end_stream())
                        && let Some(active) = this.active.take()
                    {
                        let ack = this.recorder.finalise(active, End::Clean);
                        return this.after_ack(ack, Some(Ok(frame)), cx);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => this.upstream_failed(e.into(), cx),
            Poll::Ready(None) => {
                this.inner = None;
                match this.active.take() {
                    Some(active) => {
                        let ack = this.recorder.finalise(active, End::Clean);
                        this.after_ack(ack, None, cx)
                    }
                    None => Poll::Ready(None),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Some(b) => b.size_hint(),
            None => SizeHint::with_exact(0),
        }
    }
}

fn observe_first_byte(metrics: &Metrics, active: &Active, at: Instant) {
    let stream = if active.meter.is_stream() {
        "true"
    } else {
        "false"
    };
    metrics
        .ttfb
        .with_label_values(&[stream])
        .observe(at.duration_since(active.ctx.started).as_secs_f64());
    metrics
        .upstream_ttfb
        .with_label_values(&[stream])
        .observe(at.duration_since(active.ctx.forwarded).as_secs_f64());
}

impl<B> Drop for MeteredBody<B>
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    fn drop(&mut self) {
        let Some(active) = self.active.take() else {
            return;
        };
        if self.recorder.interrupting.load(Ordering::SeqCst) {
            let _ack = self.recorder.finalise(active, End::Interrupted);
            return;
        }
        if self.recorder.policy == DisconnectPolicy::Drain
            && let Some(inner) = self.inner.take()
            && let Ok(permit) = self.recorder.drains.clone().try_acquire_owned()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let recorder = self.recorder.clone();
            recorder.metrics.active_drains.inc();
            let task = drain(inner, active, recorder.clone(), permit);
            let _tracked = recorder.drain_tasks.spawn_on(task, &runtime);
            return;
        }
        let _ack = self.recorder.finalise(active, End::ClientGone);
    }
}

/// Reads an abandoned upstream body to its end (at most `drain_timeout`) so the
/// record carries the final usage, then finalises it as `client_disconnected`.
async fn drain<B>(
    mut inner: B,
    mut active: Active,
    recorder: Arc<Recorder>,
    _permit: tokio::sync::OwnedSemaphorePermit,
) where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
{
    let read_all = async {
        while let Some(frame) = inner.frame().await {
            match frame {
                Ok(frame) => {
                    if let Some(data) = frame.data_ref() {
                        active.meter.feed(data);
                    }
                }
                Err(_) => return false,
            }
        }
        true
    };
    let result = match tokio::time::timeout(recorder.drain_timeout, read_all).await {
        Ok(true) => "completed",
        Ok(false) => "upstream_error",
        Err(_) => "timeout",
    };
    recorder.metrics.drains.with_label_values(&[result]).inc();
    recorder.metrics.active_drains.dec();
    let _ack = recorder.finalise(active, End::ClientGone);
}
