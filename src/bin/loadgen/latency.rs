//! Latency histograms (HdrHistogram, nanoseconds, three significant digits)
//! shared by the tasks of one measurement.
//!
//! Tasks collect samples in a small local buffer and merge it into the shared
//! histogram now and then, so recording costs no lock per request and the
//! memory stays one histogram per metric however many tasks there are.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Largest value recorded exactly: one hour. Larger ones saturate.
const MAX_NANOS: u64 = 3_600_000_000_000;
/// Samples a task buffers before merging them.
const LOCAL_BUFFER: usize = 1024;

/// A histogram that many tasks record into.
pub struct Shared {
    histogram: Mutex<Histogram<u64>>,
}

impl Shared {
    /// An empty histogram.
    pub fn new() -> anyhow::Result<Shared> {
        Ok(Shared {
            histogram: Mutex::new(Histogram::new_with_bounds(1, MAX_NANOS, 3)?),
        })
    }

    /// A buffer for one task; it merges what it holds when dropped.
    pub fn local(&self) -> Local<'_> {
        Local {
            shared: self,
            samples: Vec::with_capacity(LOCAL_BUFFER),
        }
    }

    fn merge(&self, samples: &[u64]) {
        let mut histogram = self
            .histogram
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for &nanos in samples {
            histogram.saturating_record(nanos);
        }
    }

    /// Percentiles of everything recorded so far.
    pub fn summary(&self) -> Summary {
        let h = self
            .histogram
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let ms = |nanos: u64| nanos as f64 / 1e6;
        Summary {
            count: h.len(),
            min_ms: ms(if h.is_empty() { 0 } else { h.min() }),
            mean_ms: h.mean() / 1e6,
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// One task's sample buffer.
pub struct Local<'a> {
    shared: &'a Shared,
    samples: Vec<u64>,
}

impl Local<'_> {
    /// Records one duration.
    pub fn record(&mut self, elapsed: Duration) {
        self.record_nanos(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Records one value in nanoseconds.
    pub fn record_nanos(&mut self, nanos: u64) {
        self.samples.push(nanos);
        if self.samples.len() >= LOCAL_BUFFER {
            self.shared.merge(&self.samples);
            self.samples.clear();
        }
    }
}

impl Drop for Local<'_> {
    fn drop(&mut self) {
        self.shared.merge(&self.samples);
    }
}

/// Percentiles of a histogram, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Summary {
    pub count: u64,
    pub min_ms: f64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_known_samples() {
        let shared = Shared::new().unwrap();
        {
            // Two tasks, 1..=1000 microseconds between them.
            let mut a = shared.local();
            let mut b = shared.local();
            for us in 1..=1000u64 {
                let task = if us % 2 == 0 { &mut a } else { &mut b };
                task.record(Duration::from_micros(us));
            }
        }
        let s = shared.summary();
        assert_eq!(s.count, 1000);
        assert!((s.p50_ms - 0.5).abs() < 0.001, "{s:?}");
        assert!((s.p99_ms - 0.99).abs() < 0.001, "{s:?}");
        assert!((s.max_ms - 1.0).abs() < 0.001, "{s:?}");
    }
}
