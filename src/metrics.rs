//! Prometheus metrics of the request path, registered on a registry that is
//! passed in (so a test can assert on a fresh one).
//!
//! Label cardinality is bounded: `model` is the model the upstream confirmed
//! in its response (else `unknown`), never a free-form value from the client.

use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

use crate::record::UsageRecord;

/// Buckets for latencies, from sub-millisecond overheads to long generations.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0, 600.0,
];

/// The gateway's own metrics.
#[derive(Clone)]
pub struct Metrics {
    pub requests: IntCounterVec,
    pub tokens: IntCounterVec,
    pub cost_usd: prometheus::CounterVec,
    pub request_duration: HistogramVec,
    pub ttfb: HistogramVec,
    pub upstream_ttfb: HistogramVec,
    pub active_requests: IntGauge,
    pub meter_parse_errors: IntCounter,
    pub inexact_usage: IntCounter,
    pub record_ack_timeouts: IntCounter,
    pub rejected: IntCounterVec,
    pub upstream_failures: IntCounterVec,
    pub upstream_retries: IntCounterVec,
    pub drains: IntCounterVec,
    pub active_drains: IntGauge,
    pub admission_wait: Histogram,
}

impl Metrics {
    /// Creates the metrics and registers them on `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Metrics> {
        let m = Metrics {
            requests: IntCounterVec::new(
                Opts::new("tollgate_requests_total", "Requests relayed to the upstream, by how they ended."),
                &["model", "outcome", "status_class"],
            )?,
            tokens: IntCounterVec::new(
                Opts::new("tollgate_tokens_total", "Tokens used, by model and type (input, output, cache_write, cache_read)."),
                &["model", "type"],
            )?,
            cost_usd: prometheus::CounterVec::new(
                Opts::new("tollgate_cost_usd_total", "Cost of the requests at list price, in US dollars."),
                &["model"],
            )?,
            request_duration: HistogramVec::new(
                HistogramOpts::new("tollgate_request_duration_seconds", "Time from request arrival to the end of the response.")
                    .buckets(LATENCY_BUCKETS.to_vec()),
                &["stream"],
            )?,
            ttfb: HistogramVec::new(
                HistogramOpts::new("tollgate_ttfb_seconds", "Time from request arrival to the first response body byte sent to the client.")
                    .buckets(LATENCY_BUCKETS.to_vec()),
                &["stream"],
            )?,
            upstream_ttfb: HistogramVec::new(
                HistogramOpts::new("tollgate_upstream_ttfb_seconds", "Time from forwarding the request to the first response body byte from the upstream.")
                    .buckets(LATENCY_BUCKETS.to_vec()),
                &["stream"],
            )?,
            active_requests: IntGauge::new("tollgate_active_requests", "Requests in flight.")?,
            meter_parse_errors: IntCounter::new(
                "tollgate_meter_parse_errors_total",
                "SSE events or bodies the meter could not read (the bytes were still relayed).",
            )?,
            inexact_usage: IntCounter::new(
                "tollgate_inexact_usage_total",
                "Requests recorded with usage_exact = false.",
            )?,
            record_ack_timeouts: IntCounter::new(
                "tollgate_record_ack_timeouts_total",
                "Responses ended before their record was written to the journal (journal slower than 2 s).",
            )?,
            rejected: IntCounterVec::new(
                Opts::new("tollgate_rejected_requests_total", "Requests tollgate answered itself, by reason."),
                &["reason"],
            )?,
            upstream_failures: IntCounterVec::new(
                Opts::new("tollgate_upstream_failures_total", "Upstream connection failures, timeouts and broken streams."),
                &["kind"],
            )?,
            upstream_retries: IntCounterVec::new(
                Opts::new("tollgate_upstream_retries_total", "Upstream attempts retried before any byte reached the client, by reason (connect, 429, 529, 5xx)."),
                &["reason"],
            )?,
            drains: IntCounterVec::new(
                Opts::new("tollgate_drains_total", "Streams kept reading after a client disconnect (policy drain), by result."),
                &["result"],
            )?,
            active_drains: IntGauge::new("tollgate_active_drains", "Streams being drained now.")?,
            admission_wait: Histogram::with_opts(
                HistogramOpts::new("tollgate_admission_wait_seconds", "Time requests waited before being forwarded.")
                    .buckets(LATENCY_BUCKETS.to_vec()),
            )?,
        };
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.tokens.clone()))?;
        registry.register(Box::new(m.cost_usd.clone()))?;
        registry.register(Box::new(m.request_duration.clone()))?;
        registry.register(Box::new(m.ttfb.clone()))?;
        registry.register(Box::new(m.upstream_ttfb.clone()))?;
        registry.register(Box::new(m.active_requests.clone()))?;
        registry.register(Box::new(m.meter_parse_errors.clone()))?;
        registry.register(Box::new(m.inexact_usage.clone()))?;
        registry.register(Box::new(m.record_ack_timeouts.clone()))?;
        registry.register(Box::new(m.rejected.clone()))?;
        registry.register(Box::new(m.upstream_failures.clone()))?;
        registry.register(Box::new(m.upstream_retries.clone()))?;
        registry.register(Box::new(m.drains.clone()))?;
        registry.register(Box::new(m.active_drains.clone()))?;
        registry.register(Box::new(m.admission_wait.clone()))?;
        Ok(m)
    }

    /// Counts a finalised record: outcome, tokens, durations.
    pub fn observe_record(&self, r: &UsageRecord, model_confirmed: bool) {
        let model = match (&r.model, model_confirmed) {
            (Some(m), true) => m.as_str(),
            _ => "unknown",
        };
        let status_class = match r.status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.requests
            .with_label_values(&[model, r.outcome.as_str(), status_class])
            .inc();
        let u = &r.usage;
        for (kind, n) in [
            ("input", u.input_tokens),
            ("output", u.output_tokens),
            ("cache_write", u.cache_creation_input_tokens),
            ("cache_read", u.cache_read_input_tokens),
        ] {
            if n > 0 {
                self.tokens.with_label_values(&[model, kind]).inc_by(n);
            }
        }
        if let Some(nanos) = r.cost_nanousd {
            self.cost_usd
                .with_label_values(&[model])
                .inc_by(nanos as f64 / 1e9);
        }
        let stream = if r.stream { "true" } else { "false" };
        self.request_duration
            .with_label_values(&[stream])
            .observe(Duration::from_millis(r.duration_ms).as_secs_f64());
        if r.meter_errors > 0 {
            self.meter_parse_errors.inc_by(u64::from(r.meter_errors));
        }
        if !r.usage_exact {
            self.inexact_usage.inc();
        }
    }
}

/// Renders a registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    use prometheus::Encoder;
    let mut out = Vec::new();
    let encoder = prometheus::TextEncoder::new();
    if let Err(e) = encoder.encode(&registry.gather(), &mut out) {
        tracing::error!(error = %e, "cannot encode metrics");
    }
    String::from_utf8(out).unwrap_or_default()
}
