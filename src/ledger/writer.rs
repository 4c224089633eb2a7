//! The batch writer: reads durable records from the journal, in order, and
//! inserts them into the store in batches, then checkpoints the journal.
//!
//! A batch closes at `ledger.batch_size` records or `ledger.batch_interval`
//! after its first record was read, whichever comes first. An insert that
//! fails because the store is unreachable is retried with backoff (100 ms up
//! to 5 s) for as long as it takes; meanwhile the journal keeps the records
//! that follow, so memory holds one batch at most. Because every insert is
//! `ON CONFLICT (request_id) DO NOTHING`, writing a batch twice (after a crash
//! between the insert and the checkpoint) changes nothing.
//!
//! A row the store rejects as invalid data cannot succeed by retrying: the
//! batch is then written row by row, and each rejected row is logged in full
//! and appended to `rejected.jsonl` in the journal directory, so that one bad
//! row never holds back the others.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::record::UsageRecord;

use super::Shared;
use super::journal::{self, Handoff, JournalReader, ReadBatch};
use super::store::{self, Store};

/// Longest an insert may take before it counts as failed and is retried
/// (a store behind a dead network path can otherwise hang forever).
const INSERT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest the migrations may take.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(120);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Pause before a writer that ended unexpectedly is started again.
const RESTART_DELAY: Duration = Duration::from_secs(1);

/// What the writer needs from the configuration.
#[derive(Debug, Clone)]
pub(crate) struct WriterSettings {
    pub dir: PathBuf,
    pub batch_size: usize,
    pub batch_interval: Duration,
    /// Apply the migrations before the first insert.
    pub migrate: bool,
    /// Records up to this sequence number come from a previous run.
    pub replay_until: u64,
    /// Durable records from the journal's sync thread.
    pub handoff: Arc<Handoff>,
    /// The store URL, only to scrub its password from error messages.
    pub url: String,
}

/// Runs the writer until the journal has stopped and everything in it is
/// written, or until `cancel`. A writer that fails or panics is started again
/// from the last checkpoint (its state is all in the journal), so the ledger
/// never silently stops writing. Closes the store at the end.
pub(crate) async fn supervise(
    store: Store,
    mut settings: WriterSettings,
    durable: watch::Receiver<u64>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    // Marks the writer gone however this ends, for the health report.
    struct AliveGuard(Arc<Shared>);
    impl Drop for AliveGuard {
        fn drop(&mut self) {
            self.0.writer_alive.store(false, Ordering::SeqCst);
        }
    }
    let _alive = AliveGuard(shared.clone());
    loop {
        let writer = BatchWriter {
            reader: Some(JournalReader::new(
                &settings.dir,
                shared.checkpoint.load(Ordering::SeqCst),
                settings.handoff.clone(),
            )),
            store: store.clone(),
            settings: settings.clone(),
            shared: shared.clone(),
            migrate_failures: 0,
            next_migrate: Instant::now(),
            rejected: 0,
        };
        match tokio::spawn(writer.run(durable.clone(), cancel.clone())).await {
            Ok(Ok(())) => break,
            Ok(Err(e)) => tracing::error!(
                error = format!("{e:#}"),
                "ledger writer failed; restarting it"
            ),
            Err(e) => tracing::error!(error = %e, "ledger writer panicked; restarting it"),
        }
        shared.metrics.writer_restarts.inc();
        shared
            .progress
            .oldest_unwritten_ms
            .store(0, Ordering::SeqCst);
        tokio::select! {
            () = tokio::time::sleep(RESTART_DELAY) => {}
            () = cancel.cancelled() => break,
        }
        // Migrations are idempotent; a restarted writer re-checks them only if
        // they were still due.
        settings.migrate = settings.migrate && !shared.store_reachable.load(Ordering::SeqCst);
    }
    store.close().await;
}

/// Durable records on their way into the store.
struct Batch {
    records: Vec<UsageRecord>,
    last_seq: u64,
    /// Records from a previous run's journal.
    replayed: u64,
}

struct BatchWriter {
    /// Taken while a blocking read runs on another thread.
    reader: Option<JournalReader>,
    store: Store,
    settings: WriterSettings,
    shared: Arc<Shared>,
    /// Failed migration attempts so far, and when the next one is due.
    migrate_failures: u32,
    next_migrate: Instant,
    /// Rows of the current batch set aside by [`BatchWriter::reject`].
    rejected: u64,
}

impl BatchWriter {
    async fn run(
        mut self,
        mut durable: watch::Receiver<u64>,
        cancel: CancellationToken,
    ) -> anyhow::Result<()> {
        loop {
            let Some(batch) = self.collect(&mut durable, &cancel).await? else {
                return Ok(());
            };
            let Some(inserted) = self.write(&batch.records, &cancel).await? else {
                return Ok(());
            };
            self.checkpoint(&batch, inserted).await?;
        }
    }

    /// One attempt at the pending migrations. On failure the next attempt is
    /// not made before `next_migrate` (backoff). Returns whether the schema
    /// is ready.
    async fn try_migrate(&mut self, cancel: &CancellationToken) -> bool {
        if !self.settings.migrate {
            return true;
        }
        let attempt = tokio::time::timeout(MIGRATE_TIMEOUT, self.store.migrate());
        let error = tokio::select! {
            result = attempt => match result {
                Ok(Ok(())) => {
                    tracing::info!("ledger migrations applied");
                    self.settings.migrate = false;
                    self.shared.set_store_ok();
                    return true;
                }
                Ok(Err(e)) => store::scrub(&e.to_string(), &self.settings.url),
                Err(_) => "migrations timed out".to_owned(),
            },
            () = cancel.cancelled() => return false,
        };
        self.migrate_failures += 1;
        if self.migrate_failures == 1 || self.migrate_failures.is_multiple_of(20) {
            tracing::warn!(
                error,
                failures = self.migrate_failures,
                "cannot migrate the ledger store yet; retrying (records wait in the journal)"
            );
        }
        self.shared.set_store_error(error);
        let backoff = BACKOFF_MIN
            .saturating_mul(1 << self.migrate_failures.min(6))
            .min(BACKOFF_MAX);
        self.next_migrate = Instant::now() + backoff;
        false
    }

    /// Takes records from the hand-off, or reads them from the journal files
    /// in a blocking thread.
    async fn read(&mut self, max: usize, durable: u64) -> anyhow::Result<ReadBatch> {
        if let Some(batch) = self
            .reader
            .as_mut()
            .and_then(|reader| reader.read_handoff(max, durable))
        {
            return Ok(batch);
        }
        let mut reader = self.reader.take().context("journal reader lost")?;
        let (reader, result) = tokio::task::spawn_blocking(move || {
            let result = reader.read(max, durable);
            (reader, result)
        })
        .await
        .context("journal read panicked")?;
        self.reader = Some(reader);
        result
            .with_context(|| format!("cannot read the journal in {}", self.settings.dir.display()))
    }

    /// Waits for the next batch: `batch_size` records, or whatever arrived
    /// within `batch_interval` of the first. `None` when the journal has
    /// stopped and everything was read, or when cancelled.
    async fn collect(
        &mut self,
        durable: &mut watch::Receiver<u64>,
        cancel: &CancellationToken,
    ) -> anyhow::Result<Option<Batch>> {
        let size = self.settings.batch_size;
        let mut batch = Batch {
            records: Vec::new(),
            last_seq: 0,
            replayed: 0,
        };
        let mut deadline: Option<Instant> = None;
        loop {
            // Closed first, then the value: a closed channel's value is final.
            let closed = durable.has_changed().is_err();
            let durable_seq = *durable.borrow_and_update();
            let want = size - batch.records.len();
            let read = self.read(want, durable_seq).await?;
            if read.lost > 0 {
                self.shared
                    .metrics
                    .records
                    .with_label_values(&["dropped"])
                    .inc_by(read.lost);
            }
            let got = read.entries.len();
            if let Some(first) = read.entries.first() {
                let progress = &self.shared.progress;
                if batch.records.is_empty() {
                    progress
                        .oldest_unwritten_ms
                        .store(first.appended_ms, Ordering::SeqCst);
                    deadline = Some(Instant::now() + self.settings.batch_interval);
                }
                // This batch now stands for the oldest durable records.
                progress.oldest_durable_ms.store(0, Ordering::SeqCst);
            }
            for entry in read.entries {
                if entry.seq <= self.settings.replay_until {
                    batch.replayed += 1;
                }
                batch.last_seq = entry.seq;
                batch.records.push(entry.record);
            }
            if batch.records.len() >= size {
                return Ok(Some(batch));
            }
            if closed && got < want {
                // The journal has stopped and nothing more is readable.
                return Ok(if batch.records.is_empty() {
                    None
                } else {
                    Some(batch)
                });
            }
            let wait_deadline = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            // While idle, pending migrations are retried, so the schema is
            // ready as soon as the store is.
            let migrate_due = self.settings.migrate && batch.records.is_empty() && got == 0;
            let next_migrate = self.next_migrate;
            tokio::select! {
                () = cancel.cancelled() => return Ok(None),
                // A closed channel also wakes this; the next turn reads the rest.
                _ = durable.changed() => {}
                () = wait_deadline => return Ok(Some(batch)),
                () = tokio::time::sleep_until(next_migrate), if migrate_due => {
                    self.try_migrate(cancel).await;
                }
            }
        }
    }

    /// Inserts records until they are in the store. Returns how many were new,
    /// or `None` if cancelled first.
    async fn write(
        &mut self,
        records: &[UsageRecord],
        cancel: &CancellationToken,
    ) -> anyhow::Result<Option<u64>> {
        let backend = self.store.backend();
        let mut backoff = BACKOFF_MIN;
        let mut failures = 0u32;
        loop {
            if !self.try_migrate(cancel).await {
                if cancel.is_cancelled() {
                    return Ok(None);
                }
                tokio::select! {
                    () = tokio::time::sleep_until(self.next_migrate) => {}
                    () = cancel.cancelled() => return Ok(None),
                }
                continue;
            }
            let started = Instant::now();
            let attempt = tokio::time::timeout(INSERT_TIMEOUT, self.store.insert(records));
            let result = tokio::select! {
                result = attempt => result,
                () = cancel.cancelled() => return Ok(None),
            };
            let error = match result {
                Ok(Ok(inserted)) => {
                    self.shared
                        .metrics
                        .insert_seconds
                        .observe(started.elapsed().as_secs_f64());
                    self.shared.metrics.batch_size.observe(records.len() as f64);
                    self.shared.set_store_ok();
                    return Ok(Some(inserted));
                }
                Ok(Err(e)) if store::is_bad_data(backend, &e) && records.len() > 1 => {
                    tracing::warn!(
                        error = %store::scrub(&e.to_string(), &self.settings.url),
                        rows = records.len(),
                        "the store rejected a batch as invalid; writing its rows one by one"
                    );
                    return self.write_each(records, cancel).await;
                }
                Ok(Err(e)) if store::is_bad_data(backend, &e) => {
                    self.reject(
                        &records[0],
                        &store::scrub(&e.to_string(), &self.settings.url),
                    )
                    .await;
                    return Ok(Some(0));
                }
                Ok(Err(e)) => store::scrub(&e.to_string(), &self.settings.url),
                Err(_) => format!("insert took longer than {INSERT_TIMEOUT:?}"),
            };
            failures += 1;
            if failures == 1 || failures.is_multiple_of(20) {
                tracing::warn!(
                    error,
                    failures,
                    rows = records.len(),
                    "cannot write usage rows to the ledger store; retrying (they are safe in the journal)"
                );
            }
            self.shared.set_store_error(error);
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = cancel.cancelled() => return Ok(None),
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Writes rows one at a time, so that the rows the store rejects are set
    /// aside and the others go in.
    async fn write_each(
        &mut self,
        records: &[UsageRecord],
        cancel: &CancellationToken,
    ) -> anyhow::Result<Option<u64>> {
        let mut inserted = 0;
        for record in records {
            // `write` with one row rejects it itself rather than coming back here.
            match Box::pin(self.write(std::slice::from_ref(record), cancel)).await? {
                Some(n) => inserted += n,
                None => return Ok(None),
            }
        }
        Ok(Some(inserted))
    }

    /// Sets aside a row the store refuses: logged in full and kept in
    /// `rejected.jsonl`, so an operator can fix and insert it by hand.
    async fn reject(&mut self, record: &UsageRecord, error: &str) {
        self.rejected += 1;
        self.shared
            .metrics
            .records
            .with_label_values(&["dropped"])
            .inc();
        let line = serde_json::to_string(record).unwrap_or_default();
        tracing::error!(error, record = %line, "the ledger store rejected a usage row; it is kept in rejected.jsonl");
        let path = self.settings.dir.join(journal::REJECTED_FILE);
        let written = tokio::task::spawn_blocking(move || {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?;
            writeln!(file, "{line}")?;
            file.sync_data()
        })
        .await;
        if !matches!(written, Ok(Ok(()))) {
            tracing::error!(
                "cannot append to rejected.jsonl; the row is only in the log line above"
            );
        }
    }

    /// Records that the batch is in the store and deletes the journal
    /// segments that are now wholly written.
    async fn checkpoint(&mut self, batch: &Batch, inserted: u64) -> anyhow::Result<()> {
        let metrics = &self.shared.metrics;
        let rows = (batch.records.len() as u64).saturating_sub(std::mem::take(&mut self.rejected));
        metrics.records.with_label_values(&["written"]).inc_by(rows);
        metrics
            .records
            .with_label_values(&["replayed"])
            .inc_by(batch.replayed);
        metrics
            .records
            .with_label_values(&["duplicate"])
            .inc_by(rows.saturating_sub(inserted));
        self.shared
            .progress
            .oldest_unwritten_ms
            .store(0, Ordering::SeqCst);

        let mut reader = self.reader.take().context("journal reader lost")?;
        let dir = self.settings.dir.clone();
        let last_seq = batch.last_seq;
        let (reader, freed) = tokio::task::spawn_blocking(move || {
            // A checkpoint that fails to save only means replaying rows the
            // store already has after a restart.
            if let Err(e) = journal::write_checkpoint(&dir, last_seq) {
                tracing::warn!(error = %e, "cannot save the journal checkpoint");
            }
            let freed = reader.release(last_seq);
            (reader, freed)
        })
        .await
        .context("journal checkpoint panicked")?;
        self.reader = Some(reader);
        if freed > 0 {
            metrics
                .journal_bytes
                .sub(i64::try_from(freed).unwrap_or(i64::MAX));
            self.shared.update_full();
        }
        // Published last, so that whoever sees the checkpoint (`flushed`,
        // health) also sees the journal it leaves behind.
        self.shared
            .checkpoint
            .store(batch.last_seq, Ordering::SeqCst);
        Ok(())
    }
}
