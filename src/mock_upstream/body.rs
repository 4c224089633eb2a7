//! The response body of the mock: a sequence of pre-rendered pieces (SSE
//! events, or a JSON body) sent one frame each, with an optional delay between
//! them, an optional timestamp comment before each event, and the cut faults.
//!
//! It is a plain [`http_body::Body`] driven by hyper's own polling: no task,
//! no channel, and a timer only when a delay or a stall is asked for.

use std::fmt::Write as _;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::faults::{Cut, CutKind};
use super::fixtures::Fixture;
use super::stats::{BodyEnd, MockUsage, StatsCounters};
use super::synth::SynthStream;

/// Where the pieces of a body come from.
#[derive(Debug)]
pub(crate) enum Pieces {
    Synth(SynthStream),
    Fixture(Arc<Fixture>),
    Chunks(Vec<Bytes>),
}

impl Pieces {
    fn len(&self) -> usize {
        match self {
            Pieces::Synth(stream) => stream.len(),
            Pieces::Fixture(fixture) => fixture.events.len(),
            Pieces::Chunks(chunks) => chunks.len(),
        }
    }

    fn get(&self, index: usize) -> Bytes {
        match self {
            Pieces::Synth(stream) => stream.event(index),
            Pieces::Fixture(fixture) => fixture.events.get(index).cloned().unwrap_or_default(),
            Pieces::Chunks(chunks) => chunks.get(index).cloned().unwrap_or_default(),
        }
    }
}

/// How a message body (SSE or JSON) is paced, broken and accounted.
#[derive(Debug)]
pub(crate) struct Pacing {
    /// Sent just before the piece at this index leaves; the usage it completes.
    pub final_usage: Option<(usize, MockUsage)>,
    pub cut: Option<Cut>,
    /// Between pieces, never before the first.
    pub delay: Duration,
    /// Write `: ts=<unix epoch ns>` before each piece (SSE only).
    pub stamp: bool,
    /// What `error-after` sends.
    pub error_event: Bytes,
    /// How long `stall-after` keeps the body open before aborting it.
    pub max_stall: Duration,
    pub stats: Arc<StatsCounters>,
}

/// How long a `reset-after` body pauses before aborting, so what was sent
/// before the cut leaves hyper's buffers (h1) or h2's send queue first:
/// an abort discards whatever is still buffered.
const FLUSH_BEFORE_RESET: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    Delay,
    Stall,
    FlushBeforeReset,
}

/// A response body of the mock.
#[derive(Debug)]
pub(crate) struct MockBody {
    pieces: Pieces,
    next: usize,
    /// `None` for plain bodies (errors, lists): no pacing, no accounting.
    pacing: Option<Pacing>,
    timer: Option<Pin<Box<Sleep>>>,
    waiting: Option<Wait>,
    /// The delay before `next` has been served.
    delay_served: bool,
    done: bool,
}

impl MockBody {
    /// A body of one piece, sent at once with a `content-length`.
    pub fn full(bytes: Bytes) -> MockBody {
        MockBody::new(Pieces::Chunks(vec![bytes]), None)
    }

    /// A message body, paced and accounted.
    pub fn paced(pieces: Pieces, pacing: Pacing) -> MockBody {
        MockBody::new(pieces, Some(pacing))
    }

    fn new(pieces: Pieces, pacing: Option<Pacing>) -> MockBody {
        MockBody {
            pieces,
            next: 0,
            pacing,
            timer: None,
            waiting: None,
            delay_served: false,
            done: false,
        }
    }

    fn finish(&mut self, end: BodyEnd) {
        self.done = true;
        if let Some(pacing) = &self.pacing {
            pacing.stats.body_ended(end);
        }
    }

    fn arm(&mut self, duration: Duration, wait: Wait) {
        let deadline = Instant::now() + duration;
        match &mut self.timer {
            Some(timer) => timer.as_mut().reset(deadline),
            None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
        self.waiting = Some(wait);
    }

    fn stamped(&self, piece: Bytes) -> Bytes {
        if !self.pacing.as_ref().is_some_and(|p| p.stamp) {
            return piece;
        }
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let mut buf = BytesMut::with_capacity(piece.len() + 32);
        // Writing into a BytesMut cannot fail.
        let _ = writeln!(buf, ": ts={nanos}");
        buf.put_slice(&piece);
        buf.freeze()
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if let (Some(wait), Some(timer)) = (this.waiting, this.timer.as_mut()) {
                ready!(timer.as_mut().poll(cx));
                this.waiting = None;
                match wait {
                    Wait::Delay => this.delay_served = true,
                    Wait::FlushBeforeReset => {
                        this.finish(BodyEnd::Cut);
                        let msg = "mock fault: reset-after";
                        return Poll::Ready(Some(Err(io::Error::new(
                            io::ErrorKind::ConnectionReset,
                            msg,
                        ))));
                    }
                    Wait::Stall => {
                        this.finish(BodyEnd::Cut);
                        let msg = "mock fault: stall-after reached its limit";
                        return Poll::Ready(Some(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            msg,
                        ))));
                    }
                }
            }
            let index = this.next;
            let (cut, delay, max_stall) = match &this.pacing {
                Some(p) => (p.cut.filter(|c| c.after == index), p.delay, p.max_stall),
                None => (None, Duration::ZERO, Duration::ZERO),
            };
            if let Some(cut) = cut {
                match cut.kind {
                    CutKind::Reset => {
                        this.arm(FLUSH_BEFORE_RESET, Wait::FlushBeforeReset);
                        continue;
                    }
                    CutKind::Error => {
                        let event = this.pacing.as_ref().map(|p| p.error_event.clone());
                        let event = this.stamped(event.unwrap_or_default());
                        this.finish(BodyEnd::Cut);
                        return Poll::Ready(Some(Ok(Frame::data(event))));
                    }
                    CutKind::Stall => {
                        this.arm(max_stall, Wait::Stall);
                        continue;
                    }
                }
            }
            if index >= this.pieces.len() {
                this.finish(BodyEnd::Completed);
                return Poll::Ready(None);
            }
            if index > 0 && !delay.is_zero() && !this.delay_served {
                this.arm(delay, Wait::Delay);
                continue;
            }
            this.delay_served = false;
            this.next += 1;
            if let Some(pacing) = &this.pacing
                && let Some((usage_index, usage)) = &pacing.final_usage
                && *usage_index == index
            {
                pacing.stats.usage_emitted(usage);
            }
            let piece = this.stamped(this.pieces.get(index));
            // Finish with the last piece unless a cut waits at the end: hyper
            // stops polling a body whose known length has been sent.
            let cut_at_end = this
                .pacing
                .as_ref()
                .and_then(|p| p.cut)
                .is_some_and(|c| c.after == this.next);
            if this.next == this.pieces.len() && !cut_at_end {
                this.finish(BodyEnd::Completed);
            }
            return Poll::Ready(Some(Ok(Frame::data(piece))));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        // Only an unbroken list of chunks has a known length; a paced body may
        // be stamped or cut, so it goes chunked (h1) or unsized (h2).
        match (&self.pieces, &self.pacing) {
            (Pieces::Chunks(chunks), pacing)
                if pacing.as_ref().is_none_or(|p| p.cut.is_none() && !p.stamp) =>
            {
                let remaining = chunks.get(self.next..).unwrap_or_default();
                SizeHint::with_exact(remaining.iter().map(|c| c.len() as u64).sum())
            }
            _ => SizeHint::default(),
        }
    }
}

impl Drop for MockBody {
    fn drop(&mut self) {
        if !self.done {
            self.finish(BodyEnd::Abandoned);
        }
    }
}
