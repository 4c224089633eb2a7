//! The ledger: every finalised usage record, made durable on local disk first
//! and then written, exactly once, to the store (Postgres, or SQLite embedded).
//!
//! The path of a record, one stage per file:
//! 1. [`LedgerSink::record`] appends it to a checksummed segment file of the
//!    [`journal`] and writes it there at once (a short lock and one `write`,
//!    no thread hop), so a killed process still leaves it on disk.
//! 2. [`journal`]: the sync thread fsyncs written records in groups
//!    (`ledger.fsync_interval`); only then is a record durable and handed to
//!    the writer (in memory; the files are read back only to replay).
//! 3. [`writer`]: the batch writer takes durable records in order, inserts
//!    them in batches (`ledger.batch_size` rows or
//!    `ledger.batch_interval`) with `ON CONFLICT (request_id) DO NOTHING`, and
//!    then checkpoints the journal and deletes the segments it has passed.
//! 4. [`store`]: the two backends, their migrations and queries.
//!
//! While the store is unreachable, records pile up in the journal (not in
//! memory) and the writer retries with backoff; it replays them in order when
//! the store returns. On start, everything after the checkpoint is replayed, so
//! a killed process loses nothing it had finalised. [`report`] and [`cli`] are
//! the `tollgate usage`, `migrate` and `reprice` commands.

pub mod cli;
pub mod journal;
pub mod metrics;
pub mod report;
pub mod store;
pub mod writer;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::config::LedgerConfig;
use crate::record::{UsageRecord, UsageSink};

pub use metrics::LedgerMetrics;
pub use store::{Backend, Store};

use journal::{Handoff, Journal, JournalWriter};

/// Records waiting to be written to the journal (only while its writes fail)
/// past which the sink stops accepting new requests.
const MAX_QUEUED_RECORDS: i64 = 100_000;
/// Durable records held in memory for the batch writer; past this (the store
/// is down and the writer behind) it reads them back from the journal files.
const HANDOFF_CAPACITY: usize = 16_384;
/// How long [`start`] tries to migrate before leaving it to the writer.
const START_MIGRATE_TIMEOUT: Duration = Duration::from_secs(4);

/// State shared by the sink, the journal thread, the writer and the handle.
pub(crate) struct Shared {
    pub metrics: LedgerMetrics,
    pub progress: Arc<Progress>,
    pub max_bytes: u64,
    /// False once the journal thread has ended (for whatever reason).
    pub journal_alive: AtomicBool,
    /// False once the writer's supervisor has ended (for whatever reason).
    pub writer_alive: AtomicBool,
    /// True while journal writes fail.
    pub journal_failing: AtomicBool,
    /// True while the journal is past `max_bytes`.
    pub journal_full: AtomicBool,
    /// Highest sequence number fsynced to the journal.
    pub durable_seq: AtomicU64,
    /// Highest sequence number known to be in the store.
    pub checkpoint: AtomicU64,
    pub store_reachable: AtomicBool,
    /// The last store error, scrubbed of the connection URL's password.
    pub last_error: Mutex<Option<String>>,
}

/// Timestamps behind `tollgate_ledger_oldest_unflushed_seconds` (kept apart
/// from [`Shared`] because the metric's collector needs them before the
/// metrics exist).
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// When the sink accepted the oldest record of the writer's current
    /// batch (unix ms; 0 when the writer holds none).
    pub oldest_unwritten_ms: AtomicU64,
    /// When the sink accepted the first record of the journal's unsynced
    /// group (unix ms; 0 when there is none).
    pub oldest_unsynced_ms: AtomicU64,
    /// When the sink accepted the first record of the oldest group synced
    /// since the writer last read from the journal (unix ms; 0 when none).
    /// Covers durable records the writer has not read yet, e.g. while it is
    /// busy retrying migrations.
    pub oldest_durable_ms: AtomicU64,
}

impl Progress {
    /// Seconds since the oldest record not yet in the store was accepted.
    pub fn oldest_unflushed_seconds(&self) -> f64 {
        let oldest = [
            &self.oldest_unwritten_ms,
            &self.oldest_durable_ms,
            &self.oldest_unsynced_ms,
        ]
        .iter()
        .map(|a| a.load(Ordering::Relaxed))
        .filter(|ms| *ms > 0)
        .min();
        match oldest {
            Some(ms) => now_ms().saturating_sub(ms) as f64 / 1000.0,
            None => 0.0,
        }
    }
}

impl Shared {
    /// Whether new requests may be admitted: the journal works, is under its
    /// size limit, and keeps up with the queue.
    fn accepting(&self) -> bool {
        self.journal_alive.load(Ordering::Relaxed)
            && !self.journal_failing.load(Ordering::Relaxed)
            && !self.journal_full.load(Ordering::Relaxed)
            && self.metrics.queue_depth.get() < MAX_QUEUED_RECORDS
    }

    /// Re-evaluates the size limit after the journal grew or shrank, logging
    /// the transitions once each.
    pub(crate) fn update_full(&self) {
        let bytes = u64::try_from(self.metrics.journal_bytes.get()).unwrap_or(0);
        let full = bytes >= self.max_bytes;
        if self.journal_full.swap(full, Ordering::SeqCst) != full {
            self.metrics.journal_full.set(i64::from(full));
            if full {
                tracing::error!(
                    journal_bytes = bytes,
                    journal_max_bytes = self.max_bytes,
                    "usage journal is full: refusing new requests (503) until the store catches up"
                );
            } else {
                tracing::info!(
                    journal_bytes = bytes,
                    "usage journal below its limit again: accepting requests"
                );
            }
        }
    }

    /// Counts a record that cannot be journalled and logs it in full at error
    /// level: the log line is then the only place it is kept.
    pub(crate) fn drop_record(&self, record: &UsageRecord, why: &str) {
        self.metrics.records.with_label_values(&["dropped"]).inc();
        match serde_json::to_string(record) {
            Ok(json) => {
                tracing::error!(record = %json, "{why}; this record is only in this log line")
            }
            Err(_) => {
                tracing::error!(record = ?record, "{why}; this record is only in this log line")
            }
        }
    }

    pub(crate) fn set_store_ok(&self) {
        if !self.store_reachable.swap(true, Ordering::SeqCst) {
            tracing::info!("ledger store reachable");
        }
        self.metrics.store_up.set(1);
        if let Ok(mut last) = self.last_error.lock() {
            *last = None;
        }
    }

    pub(crate) fn set_store_error(&self, error: String) {
        self.store_reachable.store(false, Ordering::SeqCst);
        self.metrics.store_up.set(0);
        self.metrics.store_errors.inc();
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(error);
        }
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The [`UsageSink`] of the ledger: appends each record to the journal and
/// writes it to the segment file before returning (a short lock and one
/// `write` to the page cache, never an fsync), so it is safe to call from
/// `Drop` on a runtime worker and needs no ack while the disk works.
///
/// **When it is full.** [`accepting`](UsageSink::accepting) turns false when
/// the journal on disk reaches `ledger.journal_max_bytes` (the store has been
/// unreachable long enough), when journal writes fail, or when more than
/// 100,000 records wait to be written (a failing disk). The proxy then
/// refuses new requests with 503 rather than forward traffic it could not
/// account for; `tollgate_ledger_journal_full` is 1 and an error is logged.
/// Records of requests already in flight are still taken and journalled —
/// a finalised record is never dropped to make room, so the journal may pass
/// its limit by what those requests produce. It accepts again as soon as the
/// writer has caught up enough to delete segments.
///
/// Only if the journal's sync thread has stopped (after
/// [`LedgerHandle::shutdown`], or a fatal fault) can a record not be
/// journalled; it is then logged in full at error level and counted as
/// `dropped`.
pub struct LedgerSink {
    journal: Arc<Journal>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LedgerSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerSink").finish_non_exhaustive()
    }
}

impl UsageSink for LedgerSink {
    fn record(&self, record: UsageRecord) -> crate::record::RecordAck {
        match self.journal.append(record) {
            Ok(ack) => ack,
            Err(record) => {
                self.shared
                    .drop_record(&record, "usage journal has stopped");
                None
            }
        }
    }

    fn accepting(&self) -> bool {
        self.shared.accepting()
    }
}

/// The ledger's state for `/readyz` and operators.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LedgerHealth {
    /// `postgres` or `sqlite`.
    pub backend: Backend,
    /// The last operation on the store succeeded. The gateway keeps serving
    /// while this is false: the journal holds the records.
    pub store_reachable: bool,
    /// New requests are admitted (see [`LedgerSink`]).
    pub accepting: bool,
    pub journal_full: bool,
    /// Records waiting to be written to the journal (only while writes fail).
    pub queue_depth: u64,
    pub journal_bytes: u64,
    pub journal_max_bytes: u64,
    /// Records journalled but not yet known to be in the store.
    pub unflushed_records: u64,
    pub oldest_unflushed_seconds: f64,
    /// The journal thread and the writer are running.
    pub tasks_running: bool,
    /// The last store error, if the store is failing (no secrets).
    pub last_error: Option<String>,
}

impl LedgerHealth {
    /// Whether the gateway should report ready: it can take and record requests.
    pub fn ready(&self) -> bool {
        self.accepting && self.tasks_running
    }
}

/// Owns the ledger's journal thread and writer task: reports their health and
/// shuts them down in order.
pub struct LedgerHandle {
    shared: Arc<Shared>,
    backend: Backend,
    journal: Arc<Journal>,
    journal_thread: std::thread::JoinHandle<()>,
    writer: tokio::task::JoinHandle<()>,
    cancel: CancellationToken,
    journal_dir: PathBuf,
}

impl std::fmt::Debug for LedgerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerHandle")
            .field("journal_dir", &self.journal_dir)
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn health(&self, backend: Backend) -> LedgerHealth {
        let durable = self.durable_seq.load(Ordering::SeqCst);
        let checkpoint = self.checkpoint.load(Ordering::SeqCst);
        LedgerHealth {
            backend,
            store_reachable: self.store_reachable.load(Ordering::SeqCst),
            accepting: self.accepting(),
            journal_full: self.journal_full.load(Ordering::SeqCst),
            queue_depth: u64::try_from(self.metrics.queue_depth.get()).unwrap_or(0),
            journal_bytes: u64::try_from(self.metrics.journal_bytes.get()).unwrap_or(0),
            journal_max_bytes: self.max_bytes,
            unflushed_records: durable.saturating_sub(checkpoint),
            oldest_unflushed_seconds: self.progress.oldest_unflushed_seconds(),
            tasks_running: self.journal_alive.load(Ordering::SeqCst)
                && self.writer_alive.load(Ordering::SeqCst),
            last_error: self.last_error.lock().ok().and_then(|e| e.clone()),
        }
    }
}

/// A cheap, cloneable view of the ledger's health, for `/readyz`.
#[derive(Clone)]
pub struct LedgerStatus {
    shared: Arc<Shared>,
    backend: Backend,
}

impl std::fmt::Debug for LedgerStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.health().fmt(f)
    }
}

impl LedgerStatus {
    /// The ledger's state now.
    pub fn health(&self) -> LedgerHealth {
        self.shared.health(self.backend)
    }
}

impl crate::admin::HealthCheck for LedgerStatus {
    fn name(&self) -> &'static str {
        "ledger"
    }

    /// Ready while records can be taken; a store that is down does not make
    /// the gateway unready (the journal holds the records), a full journal does.
    fn check(&self) -> (bool, serde_json::Value) {
        let health = self.health();
        let details = serde_json::to_value(&health).unwrap_or(serde_json::Value::Null);
        (health.ready(), details)
    }
}

impl LedgerHandle {
    /// The ledger's state now.
    pub fn health(&self) -> LedgerHealth {
        let mut health = self.shared.health(self.backend);
        health.tasks_running &= !self.journal_thread.is_finished() && !self.writer.is_finished();
        health
    }

    /// A view of the health to hand to the admin listener.
    pub fn status(&self) -> LedgerStatus {
        LedgerStatus {
            shared: self.shared.clone(),
            backend: self.backend,
        }
    }

    /// The highest journal sequence number known to be in the store.
    pub fn checkpoint(&self) -> u64 {
        self.shared.checkpoint.load(Ordering::SeqCst)
    }

    /// Waits until every record given to the sink so far is in the store (or
    /// `timeout` passes; returns whether it got there). For tests and tools.
    pub async fn flushed(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let s = &self.shared;
            let idle = s.metrics.queue_depth.get() == 0
                && s.progress.oldest_unsynced_ms.load(Ordering::SeqCst) == 0;
            if idle && s.checkpoint.load(Ordering::SeqCst) >= s.durable_seq.load(Ordering::SeqCst) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops the ledger. Call it after the last request has finished:
    /// 1. the journal's sync thread fsyncs everything appended and stops
    ///    (records given to the sink after this are logged, not journalled);
    /// 2. the writer inserts what remains in the journal, for at most
    ///    `max_wait` — if the store is down, the records stay in the journal
    ///    and are replayed on the next start;
    /// 3. the store's connections are closed.
    pub async fn shutdown(self, max_wait: Duration) {
        let LedgerHandle {
            shared,
            journal,
            journal_thread,
            writer,
            cancel,
            journal_dir,
            ..
        } = self;
        // 1.
        journal.stop();
        match tokio::task::spawn_blocking(move || journal_thread.join()).await {
            Ok(Ok(())) => {}
            _ => tracing::error!("usage journal thread panicked"),
        }
        // 2.
        let mut writer = writer;
        if tokio::time::timeout(max_wait, &mut writer).await.is_err() {
            let left = shared
                .durable_seq
                .load(Ordering::SeqCst)
                .saturating_sub(shared.checkpoint.load(Ordering::SeqCst));
            tracing::warn!(
                records = left,
                journal_dir = %journal_dir.display(),
                "ledger store did not take every record before shutdown; they stay in the journal for the next start"
            );
            cancel.cancel();
            let _ = writer.await;
        }
        tracing::info!(
            checkpoint = shared.checkpoint.load(Ordering::SeqCst),
            "ledger stopped"
        );
    }
}

/// Why the store could not be prepared at start.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error(transparent)]
    Connect(sqlx::Error),
    #[error(transparent)]
    Migrate(sqlx::migrate::MigrateError),
}

impl StartError {
    /// Whether the store was only unreachable (then the writer retries later).
    fn is_transient(&self, backend: Backend) -> bool {
        match self {
            StartError::Connect(e) => store::is_unreachable(backend, e),
            StartError::Migrate(e) => store::migrate_error_is_transient(backend, e),
        }
    }
}

/// Starts the ledger: opens the store (without requiring it to be up),
/// recovers the journal, and starts the journal thread and the batch writer,
/// which first replays whatever the journal holds past its checkpoint.
///
/// With `ledger.migrate`, migrations are applied here if the store answers
/// within a few seconds, else by the writer once it does. A store that answers
/// but refuses (wrong credentials, a missing database, a changed migration,
/// missing privileges) is an error.
pub async fn start(
    cfg: &LedgerConfig,
    registry: &prometheus::Registry,
) -> anyhow::Result<(Arc<LedgerSink>, LedgerHandle)> {
    let url = cfg.url.expose().to_owned();
    let store = Store::open_lazy(&url, true)
        .with_context(|| format!("cannot use ledger.url {}", cfg.url))?;
    let backend = store.backend();

    let progress = Arc::new(Progress::default());
    let age = progress.clone();
    let metrics = LedgerMetrics::new(registry, move || age.oldest_unflushed_seconds())
        .context("cannot register the ledger metrics")?;

    let mut migrated = false;
    let mut store_reachable = false;
    // One quick connection attempt first: the pool would keep retrying a
    // refused connection until its timeout, delaying the start for nothing.
    let probe = tokio::time::timeout(START_MIGRATE_TIMEOUT, store.probe()).await;
    let attempt = match probe {
        Ok(Ok(())) if cfg.migrate => tokio::time::timeout(START_MIGRATE_TIMEOUT, store.migrate())
            .await
            .map(|r| r.map_err(StartError::Migrate)),
        Ok(Ok(())) => Ok(Ok(())),
        Ok(Err(e)) => Ok(Err(StartError::Connect(e))),
        Err(elapsed) => Err(elapsed),
    };
    match attempt {
        Ok(Ok(())) => {
            migrated = true;
            store_reachable = true;
        }
        Ok(Err(e)) if e.is_transient(backend) => {
            tracing::warn!(
                error = %store::scrub(&e.to_string(), &url),
                store = %cfg.url,
                "ledger store unreachable at start; serving anyway, records wait in the journal"
            );
        }
        // Wrong credentials, a missing database, a changed migration: no
        // retry can fix these, so say so before serving anything.
        Ok(Err(e)) => {
            return Err(anyhow::anyhow!(store::scrub(&e.to_string(), &url)))
                .with_context(|| format!("cannot prepare the ledger at {}", cfg.url));
        }
        Err(_) => tracing::warn!(
            store = %cfg.url,
            "ledger store did not answer at start; serving anyway, records wait in the journal"
        ),
    }

    let dir = cfg.journal_dir.clone();
    let segment_bytes = (cfg.journal_max_bytes / 16).clamp(4 * 1024, 64 * 1024 * 1024);
    let recovered = {
        let dir_for_open = dir.clone();
        tokio::task::spawn_blocking(move || JournalWriter::open(&dir_for_open, segment_bytes))
            .await
            .context("journal recovery panicked")?
            .with_context(|| format!("cannot open the usage journal in {}", dir.display()))?
    };
    metrics
        .journal_bytes
        .set(i64::try_from(recovered.bytes).unwrap_or(i64::MAX));
    if recovered.torn_bytes > 0 {
        tracing::warn!(
            torn_bytes = recovered.torn_bytes,
            "cut a torn record off the journal"
        );
    }
    let pending = recovered.last_seq.saturating_sub(recovered.checkpoint);
    if pending > 0 {
        tracing::info!(
            records = pending,
            "replaying usage records from the journal"
        );
    }

    let shared = Arc::new(Shared {
        metrics,
        progress,
        max_bytes: cfg.journal_max_bytes,
        journal_alive: AtomicBool::new(true),
        writer_alive: AtomicBool::new(true),
        journal_failing: AtomicBool::new(false),
        journal_full: AtomicBool::new(false),
        durable_seq: AtomicU64::new(recovered.last_seq),
        checkpoint: AtomicU64::new(recovered.checkpoint.min(recovered.last_seq)),
        store_reachable: AtomicBool::new(store_reachable),
        last_error: Mutex::new(None),
    });
    shared.metrics.store_up.set(i64::from(store_reachable));
    shared.update_full();

    let (durable_tx, durable_rx) = tokio::sync::watch::channel(recovered.last_seq);
    let handoff = Arc::new(Handoff::new(HANDOFF_CAPACITY));
    let journal = Arc::new(Journal::new(
        recovered.writer,
        shared.clone(),
        handoff.clone(),
        durable_tx,
        cfg.fsync_interval,
    ));
    let journal_thread = {
        let journal = journal.clone();
        std::thread::Builder::new()
            .name("tollgate-journal".into())
            .spawn(move || journal.run_sync())
            .context("cannot start the journal thread")?
    };

    let cancel = CancellationToken::new();
    let settings = writer::WriterSettings {
        dir: dir.clone(),
        batch_size: cfg.batch_size.max(1),
        batch_interval: cfg.batch_interval,
        migrate: cfg.migrate && !migrated,
        replay_until: recovered.last_seq,
        handoff,
        url,
    };
    // The writer's supervisor, named by its span; this handle owns it.
    let writer = tokio::spawn(
        writer::supervise(store, settings, durable_rx, shared.clone(), cancel.clone())
            .instrument(tracing::info_span!("ledger-writer")),
    );

    let sink = Arc::new(LedgerSink {
        journal: journal.clone(),
        shared: shared.clone(),
    });
    let handle = LedgerHandle {
        shared,
        backend,
        journal,
        journal_thread,
        writer,
        cancel,
        journal_dir: dir,
    };
    Ok((sink, handle))
}

#[cfg(test)]
impl Shared {
    /// A fresh state with its own metrics registry, for unit tests.
    pub(crate) fn for_test(max_bytes: u64) -> Arc<Shared> {
        let registry = prometheus::Registry::new();
        let metrics = LedgerMetrics::new(&registry, || 0.0).unwrap();
        Arc::new(Shared {
            metrics,
            progress: Arc::new(Progress::default()),
            max_bytes,
            journal_alive: AtomicBool::new(true),
            writer_alive: AtomicBool::new(true),
            journal_failing: AtomicBool::new(false),
            journal_full: AtomicBool::new(false),
            durable_seq: AtomicU64::new(0),
            checkpoint: AtomicU64::new(0),
            store_reachable: AtomicBool::new(true),
            last_error: Mutex::new(None),
        })
    }
}
