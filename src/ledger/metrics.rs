//! The ledger's own metrics, registered on the registry passed to
//! [`super::start`].

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// Buckets for rows per insert.
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
];
/// Buckets for inserts and fsyncs, from a local SQLite to a distant Postgres.
const IO_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Metrics of the journal and the batch writer.
#[derive(Clone)]
pub struct LedgerMetrics {
    /// Records accepted by the sink and not yet written to the journal file
    /// (only while its writes fail). Also the counter the sink itself reads.
    pub queue_depth: IntGauge,
    /// Size of the journal's segment files; the sink refuses traffic past
    /// `ledger.journal_max_bytes`.
    pub journal_bytes: IntGauge,
    /// Age of the oldest record not yet in the store, set at each scrape.
    pub oldest_unflushed_seconds: Gauge,
    /// Records by stage: `journalled`, `written` (inserted or already there),
    /// `replayed` (written from a previous run's journal), `duplicate` (already
    /// in the store), `dropped` (lost; each one is also logged in full).
    pub records: IntCounterVec,
    pub batch_size: Histogram,
    pub insert_seconds: Histogram,
    pub fsync_seconds: Histogram,
    /// Failed inserts, connections and migrations.
    pub store_errors: IntCounter,
    /// 1 while the store could not be reached or refused the last insert.
    pub store_up: IntGauge,
    /// Failed journal writes or fsyncs.
    pub journal_errors: IntCounter,
    /// 1 while the journal is past `journal_max_bytes` (new requests get 503).
    pub journal_full: IntGauge,
    /// Writer tasks that ended unexpectedly and were restarted.
    pub writer_restarts: IntCounter,
}

impl LedgerMetrics {
    /// Creates the metrics and registers them on `registry`. The oldest
    /// unflushed age is registered through a collector that computes it at
    /// scrape time with `oldest_age`.
    pub fn new(
        registry: &Registry,
        oldest_age: impl Fn() -> f64 + Send + Sync + 'static,
    ) -> prometheus::Result<LedgerMetrics> {
        let m = LedgerMetrics {
            queue_depth: IntGauge::new(
                "tollgate_ledger_queue_depth",
                "Usage records accepted but not yet written to the journal (non-zero only while journal writes fail).",
            )?,
            journal_bytes: IntGauge::new(
                "tollgate_ledger_journal_bytes",
                "Bytes in the usage journal (records not yet known to be in the store, and some that are).",
            )?,
            oldest_unflushed_seconds: Gauge::new(
                "tollgate_ledger_oldest_unflushed_seconds",
                "Age of the oldest usage record not yet written to the store.",
            )?,
            records: IntCounterVec::new(
                Opts::new(
                    "tollgate_ledger_records_total",
                    "Usage records by ledger stage.",
                ),
                &["stage"],
            )?,
            batch_size: Histogram::with_opts(
                HistogramOpts::new(
                    "tollgate_ledger_batch_size",
                    "Rows per insert into the store.",
                )
                .buckets(BATCH_BUCKETS.to_vec()),
            )?,
            insert_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "tollgate_ledger_insert_seconds",
                    "Time taken by successful batch inserts.",
                )
                .buckets(IO_BUCKETS.to_vec()),
            )?,
            fsync_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "tollgate_ledger_fsync_seconds",
                    "Time taken to write and fsync one group of journal records.",
                )
                .buckets(IO_BUCKETS.to_vec()),
            )?,
            store_errors: IntCounter::new(
                "tollgate_ledger_store_errors_total",
                "Failed inserts, connections and migrations against the ledger store.",
            )?,
            store_up: IntGauge::new(
                "tollgate_ledger_store_up",
                "1 when the last operation on the ledger store succeeded.",
            )?,
            journal_errors: IntCounter::new(
                "tollgate_ledger_journal_errors_total",
                "Failed writes or fsyncs of the usage journal.",
            )?,
            journal_full: IntGauge::new(
                "tollgate_ledger_journal_full",
                "1 while the journal is past ledger.journal_max_bytes and new requests are refused.",
            )?,
            writer_restarts: IntCounter::new(
                "tollgate_ledger_writer_restarts_total",
                "Times the batch writer ended unexpectedly and was restarted.",
            )?,
        };
        for stage in ["journalled", "written", "replayed", "duplicate", "dropped"] {
            m.records.with_label_values(&[stage]);
        }
        registry.register(Box::new(m.queue_depth.clone()))?;
        registry.register(Box::new(m.journal_bytes.clone()))?;
        registry.register(Box::new(AgeCollector {
            gauge: m.oldest_unflushed_seconds.clone(),
            age: Box::new(oldest_age),
        }))?;
        registry.register(Box::new(m.records.clone()))?;
        registry.register(Box::new(m.batch_size.clone()))?;
        registry.register(Box::new(m.insert_seconds.clone()))?;
        registry.register(Box::new(m.fsync_seconds.clone()))?;
        registry.register(Box::new(m.store_errors.clone()))?;
        registry.register(Box::new(m.store_up.clone()))?;
        registry.register(Box::new(m.journal_errors.clone()))?;
        registry.register(Box::new(m.journal_full.clone()))?;
        registry.register(Box::new(m.writer_restarts.clone()))?;
        Ok(m)
    }
}

/// Sets the oldest-unflushed gauge when the registry is gathered, so the
/// scraped value is current without a task ticking it.
struct AgeCollector {
    gauge: Gauge,
    age: Box<dyn Fn() -> f64 + Send + Sync>,
}

impl Collector for AgeCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.gauge.set((self.age)());
        self.gauge.collect()
    }
}
