//! The journal: an append-only, checksummed log of finalised usage records on
//! local disk, written before any record is handed to the store.
//!
//! Layout of `ledger.journal_dir`:
//! - segment files `<first seq, 20 digits>.journal`, each a run of frames
//!   `[payload len u32][crc32 u32][seq u64][appended unix ms u64][payload]`
//!   (little-endian; the CRC covers seq, timestamp and payload; the payload is
//!   the record as JSON). Sequence numbers rise by one from frame to frame.
//! - `checkpoint`: the highest sequence number such that it and every record
//!   before it are in the store. Writing it is not fsynced on purpose: a
//!   checkpoint lost in a crash only makes the next start replay rows the store
//!   already has, which the idempotent insert ignores.
//! - `rejected.jsonl`: records the store refused as invalid data (never
//!   expected; kept so that no row is lost silently).
//!
//! One thread appends ([`run_journal`]); one reader ([`JournalReader`], owned by
//! the batch writer) follows it. Records reach the reader only once they are
//! fsynced: the journal thread publishes the highest durable sequence number
//! after each group fsync. The reader deletes a segment once it has moved past
//! it and the checkpoint covers all of it; the appender never touches a segment
//! again after it moved to the next one, so the two never race on a file.
//!
//! Crash safety: a crash can leave a torn last frame. [`JournalWriter::open`]
//! truncates the newest segment after its last valid frame, and a reader stops
//! at the first invalid frame of an older segment and moves on to the next one.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use crate::record::UsageRecord;

use super::Shared;

/// File name extension of journal segments.
const SEGMENT_EXT: &str = "journal";
/// Name of the checkpoint file inside the journal directory.
const CHECKPOINT_FILE: &str = "checkpoint";
/// Name of the file that keeps records the store refused as invalid.
pub(crate) const REJECTED_FILE: &str = "rejected.jsonl";
/// Bytes before the payload of a frame.
const HEADER_LEN: usize = 24;
/// A frame announcing a larger payload is garbage: records are a few hundred bytes.
const MAX_PAYLOAD: usize = 16 * 1024 * 1024;
/// The reader reads segments in chunks of this size.
const READ_CHUNK: usize = 256 * 1024;
/// Records appended without a sync before one is forced regardless of the interval.
const MAX_UNSYNCED_RECORDS: usize = 8192;
/// How long the journal thread sleeps between attempts after a disk error.
const RETRY_BACKOFF: Duration = Duration::from_millis(200);

/// One record as read back from the journal.
#[derive(Debug, Clone, PartialEq)]
pub struct JournalEntry {
    /// Position in the journal; rises by one per record.
    pub seq: u64,
    /// When the sink accepted the record (unix milliseconds).
    pub appended_ms: u64,
    pub record: UsageRecord,
}

/// A message to the journal thread.
#[derive(Debug)]
pub(crate) enum JournalMsg {
    /// A finalised record, when the sink accepted it (unix milliseconds), and
    /// the ack sent once the record is written to the segment file.
    Record(Box<UsageRecord>, u64, tokio::sync::oneshot::Sender<()>),
    /// Sync what was received and stop; records that arrive later are still
    /// journalled if they are already queued behind this message.
    Shutdown,
}

/// The path of the segment whose first record has sequence number `first_seq`.
fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.{SEGMENT_EXT}"))
}

/// A segment file found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SegmentFile {
    pub first_seq: u64,
    pub path: PathBuf,
}

/// The segments in `dir`, oldest first.
pub(crate) fn list_segments(dir: &Path) -> io::Result<Vec<SegmentFile>> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some(SEGMENT_EXT) {
            continue;
        }
        let Some(first_seq) = path
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        segments.push(SegmentFile { first_seq, path });
    }
    segments.sort_by_key(|s| s.first_seq);
    Ok(segments)
}

/// Total size of the segment files in `dir`.
pub(crate) fn journal_bytes(dir: &Path) -> io::Result<u64> {
    let mut total = 0;
    for segment in list_segments(dir)? {
        total += fs::metadata(&segment.path).map(|m| m.len()).unwrap_or(0);
    }
    Ok(total)
}

/// Reads the checkpoint; a missing or unreadable one counts as zero, which
/// replays everything still in the journal (idempotently).
pub fn read_checkpoint(dir: &Path) -> u64 {
    match fs::read_to_string(dir.join(CHECKPOINT_FILE)) {
        Ok(text) => text.trim().parse().unwrap_or_else(|_| {
            tracing::warn!(dir = %dir.display(), "journal checkpoint unreadable; replaying the whole journal");
            0
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot read the journal checkpoint; replaying the whole journal");
            0
        }
    }
}

/// Records that every record up to `seq` is in the store. Atomic (rename).
pub(crate) fn write_checkpoint(dir: &Path, seq: u64) -> io::Result<()> {
    let tmp = dir.join(format!("{CHECKPOINT_FILE}.tmp"));
    fs::write(&tmp, format!("{seq}\n"))?;
    fs::rename(&tmp, dir.join(CHECKPOINT_FILE))
}

fn frame_crc(seq: u64, appended_ms: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&seq.to_le_bytes());
    hasher.update(&appended_ms.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// Appends one frame to `buf`.
pub(crate) fn encode_frame(buf: &mut Vec<u8>, seq: u64, appended_ms: u64, payload: &[u8]) {
    // Payloads are bounded by MAX_PAYLOAD when encoded by `JournalWriter::append`.
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&frame_crc(seq, appended_ms, payload).to_le_bytes());
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&appended_ms.to_le_bytes());
    buf.extend_from_slice(payload);
}

/// What the frame at some offset of a segment turned out to be.
enum Frame<'a> {
    /// A complete frame whose checksum matches.
    Valid {
        seq: u64,
        appended_ms: u64,
        payload: &'a [u8],
        len: usize,
    },
    /// Fewer bytes than a whole frame: the end of the data written so far.
    Short,
    /// Bytes that are not a frame: a torn write or corruption.
    Invalid,
}

fn parse_frame(bytes: &[u8]) -> Frame<'_> {
    if bytes.len() < HEADER_LEN {
        return Frame::Short;
    }
    let word =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let long = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let payload_len = word(0) as usize;
    if payload_len > MAX_PAYLOAD {
        return Frame::Invalid;
    }
    let crc = word(4);
    let seq = long(8);
    let appended_ms = long(16);
    if bytes.len() < HEADER_LEN + payload_len {
        return Frame::Short;
    }
    let payload = &bytes[HEADER_LEN..HEADER_LEN + payload_len];
    if frame_crc(seq, appended_ms, payload) != crc {
        return Frame::Invalid;
    }
    Frame::Valid {
        seq,
        appended_ms,
        payload,
        len: HEADER_LEN + payload_len,
    }
}

/// The valid prefix of a segment: its length in bytes and its last sequence number.
fn scan_segment(segment: &SegmentFile) -> io::Result<(u64, Option<u64>)> {
    let bytes = fs::read(&segment.path)?;
    let mut offset = 0usize;
    let mut expected = segment.first_seq;
    let mut last = None;
    while let Frame::Valid { seq, len, .. } = parse_frame(&bytes[offset..]) {
        if seq != expected {
            break;
        }
        last = Some(seq);
        expected += 1;
        offset += len;
    }
    Ok((offset as u64, last))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The journal's state after [`JournalWriter::open`].
#[derive(Debug)]
pub(crate) struct Recovered {
    pub writer: JournalWriter,
    /// The last record already in the journal (0 when empty): everything up to
    /// it is durable and still to be replayed past the checkpoint.
    pub last_seq: u64,
    pub checkpoint: u64,
    /// Size of the segment files after recovery.
    pub bytes: u64,
    /// Bytes of torn frames cut off the end of the newest segment.
    pub torn_bytes: u64,
}

/// The appending side of the journal. Records are encoded into memory by
/// [`append`](Self::append) and reach the disk, fsynced, in [`sync`](Self::sync).
#[derive(Debug)]
pub(crate) struct JournalWriter {
    dir: PathBuf,
    segment_bytes: u64,
    /// The segment being appended to, and its length.
    file: Option<(File, u64)>,
    next_seq: u64,
    /// Encoded frames not yet written, and the sequence number of the first.
    buf: Vec<u8>,
    buf_first_seq: u64,
    buf_records: usize,
    /// How much of `buf` has already been written (not yet fsynced) to the
    /// segment. Writing each record at once means a killed process loses
    /// nothing it handed to the journal: the page cache outlives the process.
    written: usize,
}

impl JournalWriter {
    /// Opens (creating if needed) the journal in `dir`, cutting off a torn
    /// last frame. `segment_bytes` is the size at which a new segment begins.
    pub fn open(dir: &Path, segment_bytes: u64) -> io::Result<Recovered> {
        fs::create_dir_all(dir)?;
        let checkpoint = read_checkpoint(dir);
        let mut segments = list_segments(dir)?;
        let mut torn_bytes = 0;
        // Only the newest segment can end in a torn frame (older ones were
        // complete when the next one began): cut it back to its valid prefix,
        // and drop it if nothing valid is left.
        while let Some(newest) = segments.last() {
            let (valid_len, last) = scan_segment(newest)?;
            let file_len = fs::metadata(&newest.path)?.len();
            if valid_len < file_len {
                tracing::warn!(
                    segment = %newest.path.display(),
                    torn_bytes = file_len - valid_len,
                    "journal ends in a torn record (crash during a write); cutting it off"
                );
                let file = OpenOptions::new().write(true).open(&newest.path)?;
                file.set_len(valid_len)?;
                file.sync_all()?;
                torn_bytes += file_len - valid_len;
            }
            if last.is_some() {
                break;
            }
            fs::remove_file(&newest.path)?;
            segments.pop();
        }
        // A disk error during a group sync can leave that group's frames in the
        // segment before the newest too (the group is rewritten into a new
        // segment), so the highest sequence number is the larger of the two.
        let mut last_seq = 0;
        for segment in segments.iter().rev().take(2) {
            last_seq = last_seq.max(scan_segment(segment)?.1.unwrap_or(0));
        }
        sync_dir(dir)?;
        let bytes = journal_bytes(dir)?;
        let next_seq = last_seq.max(checkpoint) + 1;
        let writer = JournalWriter {
            dir: dir.to_path_buf(),
            segment_bytes: segment_bytes.max(1),
            file: None,
            next_seq,
            buf: Vec::new(),
            buf_first_seq: next_seq,
            buf_records: 0,
            written: 0,
        };
        Ok(Recovered {
            writer,
            last_seq,
            checkpoint,
            bytes,
            torn_bytes,
        })
    }

    /// Encodes a record into the group being built; returns its sequence number.
    pub fn append(&mut self, appended_ms: u64, record: &UsageRecord) -> serde_json::Result<u64> {
        let payload = serde_json::to_vec(record)?;
        if payload.len() > MAX_PAYLOAD {
            return Err(serde::ser::Error::custom("usage record larger than 16 MiB"));
        }
        let seq = self.next_seq;
        if self.buf_records == 0 {
            self.buf_first_seq = seq;
        }
        encode_frame(&mut self.buf, seq, appended_ms, &payload);
        self.buf_records += 1;
        self.next_seq += 1;
        Ok(seq)
    }

    /// Records appended since the last successful sync.
    pub fn unsynced(&self) -> usize {
        self.buf_records
    }

    /// Writes what the group holds beyond what was already written, without
    /// fsyncing. On error the whole group is written again to a fresh segment
    /// by the next call.
    pub fn write_out(&mut self) -> io::Result<()> {
        if self.written == self.buf.len() {
            return Ok(());
        }
        if self.written == 0
            && self
                .file
                .as_ref()
                .is_none_or(|(_, len)| *len >= self.segment_bytes)
        {
            // Starting a segment at the group's first record. If a file of that
            // name exists, it is from a failed attempt at this same group, so
            // nothing in it was ever reported durable.
            let path = segment_path(&self.dir, self.buf_first_seq);
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)?;
            sync_dir(&self.dir)?;
            self.file = Some((file, 0));
        }
        let pending = &self.buf[self.written..];
        let result = match &mut self.file {
            Some((file, len)) => file.write_all(pending).map(|()| {
                *len += pending.len() as u64;
            }),
            None => Err(io::Error::other("no journal segment open")),
        };
        match result {
            Ok(()) => {
                self.written = self.buf.len();
                Ok(())
            }
            Err(e) => {
                // What reached this segment is unknown: leave it behind.
                self.file = None;
                self.written = 0;
                Err(e)
            }
        }
    }

    /// Writes the group and fsyncs it. Returns what became durable, or `None`
    /// when there was nothing to write. On error the group stays in memory;
    /// the next call writes it to a fresh segment.
    pub fn sync(&mut self) -> io::Result<Option<Synced>> {
        if self.buf_records == 0 {
            return Ok(None);
        }
        self.write_out()?;
        let result = match &mut self.file {
            Some((file, _)) => file.sync_data(),
            None => Err(io::Error::other("no journal segment open")),
        };
        if let Err(e) = result {
            self.file = None;
            self.written = 0;
            return Err(e);
        }
        let synced = Synced {
            last_seq: self.next_seq - 1,
            bytes: self.buf.len() as u64,
            records: self.buf_records,
        };
        self.buf.clear();
        self.buf_records = 0;
        self.written = 0;
        Ok(Some(synced))
    }

    /// The JSON of the records appended since the last successful sync.
    pub fn unsynced_payloads(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = self.buf.as_slice();
        while let Frame::Valid { payload, len, .. } = parse_frame(rest) {
            out.push(String::from_utf8_lossy(payload).into_owned());
            rest = &rest[len..];
        }
        out
    }
}

/// What one successful [`JournalWriter::sync`] made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Synced {
    /// Every record up to this sequence number is on disk.
    pub last_seq: u64,
    /// Bytes added to the journal.
    pub bytes: u64,
    /// Records in the group.
    pub records: usize,
}

/// The journal thread: receives records from the sink, appends them, fsyncs
/// them in groups (at most `fsync_interval` after the first record of a
/// group), and publishes the highest durable sequence number to the writer.
/// It stops after a [`JournalMsg::Shutdown`] (or when every sender is gone),
/// having synced everything it received.
pub(crate) fn run_journal(
    mut journal: JournalWriter,
    rx: Receiver<JournalMsg>,
    durable: tokio::sync::watch::Sender<u64>,
    shared: Arc<Shared>,
    fsync_interval: Duration,
) {
    // Marks the journal dead however this function ends, so that the sink
    // refuses traffic it could no longer record.
    struct AliveGuard(Arc<Shared>);
    impl Drop for AliveGuard {
        fn drop(&mut self) {
            self.0.journal_alive.store(false, Ordering::SeqCst);
        }
    }
    let _alive = AliveGuard(shared.clone());

    let mut group_started: Option<Instant> = None;
    let mut stopping = false;
    // Acks of records not yet written to the segment file.
    let mut unacked: Vec<tokio::sync::oneshot::Sender<()>> = Vec::new();
    loop {
        let message = if stopping {
            // Take what is already queued, without waiting for more.
            rx.try_recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            match rx.try_recv() {
                Ok(message) => Ok(message),
                Err(TryRecvError::Disconnected) => Err(RecvTimeoutError::Disconnected),
                Err(TryRecvError::Empty) => {
                    // Nothing more queued: write what was appended into the
                    // file (fsync comes with the group), so a process killed
                    // now still leaves the records for the next start, and ack
                    // them. Under load this is one write for many records. A
                    // failure here is retried and reported by the group's
                    // sync; the acks wait until the records are in the file.
                    if journal.write_out().is_ok() {
                        for ack in unacked.drain(..) {
                            let _ = ack.send(());
                        }
                    }
                    let wait = match group_started {
                        Some(start) => {
                            (start + fsync_interval).saturating_duration_since(Instant::now())
                        }
                        None => Duration::from_secs(3600),
                    };
                    rx.recv_timeout(wait)
                }
            }
        };
        let mut drained = false;
        match message {
            Ok(JournalMsg::Record(record, appended_ms, ack)) => {
                unacked.push(ack);
                match journal.append(appended_ms, &record) {
                    Ok(_) => {
                        if group_started.is_none() {
                            group_started = Some(Instant::now());
                            shared
                                .progress
                                .oldest_unsynced_ms
                                .store(appended_ms, Ordering::SeqCst);
                        }
                    }
                    Err(e) => {
                        // Only a record that cannot be serialized ends here; log
                        // every field so that it can still be accounted for.
                        shared.metrics.records.with_label_values(&["dropped"]).inc();
                        tracing::error!(error = %e, "cannot encode a usage record for the journal; it is only in this log line");
                        crate::record::log_record(&record);
                    }
                }
                // Only now: a record is always either queued or in the journal.
                shared.metrics.queue_depth.dec();
            }
            Ok(JournalMsg::Shutdown) => stopping = true,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                stopping = true;
                drained = true;
            }
        }
        let due = drained
            || journal.unsynced() >= MAX_UNSYNCED_RECORDS
            || group_started.is_some_and(|start| start.elapsed() >= fsync_interval);
        if due {
            sync_until_done(&mut journal, &durable, &shared, stopping);
            group_started = None;
            if journal.unsynced() == 0 {
                for ack in unacked.drain(..) {
                    let _ = ack.send(());
                }
            }
        }
        if drained {
            tracing::debug!("journal stopped");
            return;
        }
    }
}

/// Syncs the current group, retrying after disk errors. While it fails, the
/// sink refuses new traffic; records already finalised wait in memory.
fn sync_until_done(
    journal: &mut JournalWriter,
    durable: &tokio::sync::watch::Sender<u64>,
    shared: &Shared,
    stopping: bool,
) {
    let mut failures = 0u32;
    loop {
        let started = Instant::now();
        match journal.sync() {
            Ok(Some(synced)) => {
                shared
                    .metrics
                    .fsync_seconds
                    .observe(started.elapsed().as_secs_f64());
                shared
                    .metrics
                    .journal_bytes
                    .add(i64::try_from(synced.bytes).unwrap_or(i64::MAX));
                shared
                    .metrics
                    .records
                    .with_label_values(&["journalled"])
                    .inc_by(synced.records as u64);
                // The group's age moves from "unsynced" to "durable" before
                // the writer can see the group, so it is never unaccounted.
                let progress = &shared.progress;
                let first = progress.oldest_unsynced_ms.load(Ordering::SeqCst);
                if first > 0 {
                    let _ = progress.oldest_durable_ms.compare_exchange(
                        0,
                        first,
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    );
                }
                progress.oldest_unsynced_ms.store(0, Ordering::SeqCst);
                shared.durable_seq.store(synced.last_seq, Ordering::SeqCst);
                durable.send_replace(synced.last_seq);
                if failures > 0 {
                    shared.journal_failing.store(false, Ordering::SeqCst);
                    // Bytes of the failed attempts are still on disk until replayed.
                    if let Ok(bytes) = journal_bytes(&journal.dir) {
                        shared
                            .metrics
                            .journal_bytes
                            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
                    }
                    tracing::info!("journal writes work again");
                }
                shared.update_full();
                return;
            }
            Ok(None) => return,
            Err(e) => {
                failures += 1;
                shared.metrics.journal_errors.inc();
                if !shared.journal_failing.swap(true, Ordering::SeqCst)
                    || failures.is_multiple_of(50)
                {
                    tracing::error!(
                        error = %e,
                        dir = %journal.dir.display(),
                        unsynced = journal.unsynced(),
                        "cannot write the usage journal; refusing new requests until it works"
                    );
                }
                if stopping && failures >= 25 {
                    // Shutting down must end; the records are then only in the log.
                    shared
                        .metrics
                        .records
                        .with_label_values(&["dropped"])
                        .inc_by(journal.unsynced() as u64);
                    for payload in journal.unsynced_payloads() {
                        tracing::error!(record = %payload, "cannot journal this usage record at shutdown; it is only in this log line");
                    }
                    return;
                }
                std::thread::sleep(RETRY_BACKOFF);
            }
        }
    }
}

/// A segment the reader has moved past, waiting for the checkpoint to cover it.
#[derive(Debug)]
struct Passed {
    path: PathBuf,
    max_seq: u64,
}

/// The segment the reader is in.
#[derive(Debug)]
struct Current {
    first_seq: u64,
    path: PathBuf,
    file: File,
    /// Offset of the next frame to read.
    offset: u64,
    /// A window of the file, starting at `buf_offset`.
    buf: Vec<u8>,
    buf_offset: u64,
    /// Highest sequence number seen in this segment.
    max_seq: u64,
}

impl Current {
    fn open(segment: &SegmentFile) -> io::Result<Current> {
        Ok(Current {
            first_seq: segment.first_seq,
            path: segment.path.clone(),
            file: File::open(&segment.path)?,
            offset: 0,
            buf: Vec::new(),
            buf_offset: 0,
            max_seq: 0,
        })
    }

    /// The bytes from `offset` on, reading more of the file when fewer than
    /// `want` are buffered.
    fn window(&mut self, want: usize) -> io::Result<&[u8]> {
        let buffered = self.offset >= self.buf_offset
            && self.buf.len() >= (self.offset - self.buf_offset) as usize + want;
        if !buffered {
            let size = want.max(READ_CHUNK);
            let mut buf = vec![0u8; size];
            let mut filled = 0;
            while filled < size {
                let n = self
                    .file
                    .read_at(&mut buf[filled..], self.offset + filled as u64)?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            buf.truncate(filled);
            self.buf = buf;
            self.buf_offset = self.offset;
        }
        let start = (self.offset - self.buf_offset) as usize;
        Ok(&self.buf[start..])
    }
}

/// Records read by [`JournalReader::read`].
#[derive(Debug, Default)]
pub struct ReadBatch {
    pub entries: Vec<JournalEntry>,
    /// Records known to be lost (corrupt frames, undecodable payloads).
    pub lost: u64,
}

/// Follows the journal from the checkpoint on, handing out durable records in
/// order, and deletes segments the checkpoint has passed.
#[derive(Debug)]
pub struct JournalReader {
    dir: PathBuf,
    current: Option<Current>,
    passed: VecDeque<Passed>,
    /// The sequence number of the next record to hand out.
    next_seq: u64,
}

impl JournalReader {
    /// A reader that starts after `checkpoint`.
    pub fn new(dir: &Path, checkpoint: u64) -> JournalReader {
        JournalReader {
            dir: dir.to_path_buf(),
            current: None,
            passed: VecDeque::new(),
            next_seq: checkpoint + 1,
        }
    }

    /// Up to `max` records with sequence numbers up to `durable`, in order.
    pub fn read(&mut self, max: usize, durable: u64) -> io::Result<ReadBatch> {
        let mut batch = ReadBatch::default();
        // Bytes past the durable point may have been buffered mid-write by the
        // previous call: read the file afresh.
        if let Some(current) = self.current.as_mut() {
            current.buf.clear();
            current.buf_offset = current.offset;
        }
        while batch.entries.len() < max && self.next_seq <= durable {
            if self.current.is_none() && !self.open_first()? {
                break;
            }
            let Some(current) = self.current.as_mut() else {
                break;
            };
            let window = current.window(HEADER_LEN)?;
            let mut frame = parse_frame(window);
            if let Frame::Short = frame
                && window.len() >= HEADER_LEN
            {
                // The header is there but the payload is longer than the window.
                let want = HEADER_LEN
                    + u32::from_le_bytes([window[0], window[1], window[2], window[3]]) as usize;
                frame = parse_frame(current.window(want)?);
            }
            match frame {
                Frame::Valid {
                    seq,
                    appended_ms,
                    payload,
                    len,
                } => {
                    if seq > durable {
                        // Written but not yet synced: wait for the journal thread.
                        break;
                    }
                    let decoded = (seq >= self.next_seq).then(|| {
                        serde_json::from_slice::<UsageRecord>(payload)
                            .map_err(|e| (e, String::from_utf8_lossy(payload).into_owned()))
                    });
                    current.offset += len as u64;
                    current.max_seq = current.max_seq.max(seq);
                    match decoded {
                        // Already in the store, or a duplicate written again after a disk error.
                        None => {}
                        Some(Ok(record)) => {
                            if seq > self.next_seq {
                                self.report_gap(seq, &mut batch);
                            }
                            batch.entries.push(JournalEntry {
                                seq,
                                appended_ms,
                                record,
                            });
                            self.next_seq = seq + 1;
                        }
                        Some(Err((e, payload))) => {
                            tracing::error!(
                                seq,
                                error = %e,
                                payload = %payload,
                                "journal record cannot be decoded; it is only in this log line"
                            );
                            batch.lost += 1 + seq.saturating_sub(self.next_seq);
                            self.next_seq = seq + 1;
                        }
                    }
                }
                Frame::Short | Frame::Invalid => {
                    // The end of this segment's data. Move on if a newer
                    // segment exists; otherwise this is the one being written.
                    if !self.advance_segment(&mut batch)? {
                        break;
                    }
                }
            }
        }
        Ok(batch)
    }

    fn report_gap(&self, seq: u64, batch: &mut ReadBatch) {
        let missing = seq - self.next_seq;
        tracing::error!(
            from = self.next_seq,
            to = seq - 1,
            "journal records are missing (corrupt segment); they cannot be written"
        );
        batch.lost += missing;
    }

    /// Opens the oldest segment. Records before `next_seq` in it are skipped
    /// (segments are deleted soon after the checkpoint passes them, so there
    /// is little to skip).
    fn open_first(&mut self) -> io::Result<bool> {
        let segments = list_segments(&self.dir)?;
        let Some(segment) = segments.first() else {
            return Ok(false);
        };
        if segment.first_seq > self.next_seq {
            // Normal when the checkpoint file was lost with the segments it
            // covered already deleted: those records are in the store.
            tracing::info!(
                checkpoint = self.next_seq - 1,
                first_seq = segment.first_seq,
                "journal starts after the checkpoint; continuing from its first record"
            );
            self.next_seq = segment.first_seq;
        }
        self.current = Some(Current::open(segment)?);
        Ok(true)
    }

    /// Moves to the next segment, if there is one.
    fn advance_segment(&mut self, batch: &mut ReadBatch) -> io::Result<bool> {
        let Some(current) = self.current.as_ref() else {
            return Ok(false);
        };
        let next = list_segments(&self.dir)?
            .into_iter()
            .find(|s| s.first_seq > current.first_seq);
        let Some(next) = next else { return Ok(false) };
        if next.first_seq > self.next_seq {
            self.report_gap(next.first_seq, batch);
            self.next_seq = next.first_seq;
        }
        let opened = Current::open(&next)?;
        if let Some(old) = self.current.replace(opened) {
            self.passed.push_back(Passed {
                path: old.path,
                max_seq: old.max_seq,
            });
        }
        Ok(true)
    }

    /// Deletes the segments the reader has moved past whose records are all
    /// at or before `checkpoint`. Returns the bytes freed.
    pub fn release(&mut self, checkpoint: u64) -> u64 {
        let mut freed = 0;
        while self.passed.front().is_some_and(|p| p.max_seq <= checkpoint) {
            if let Some(passed) = self.passed.pop_front() {
                freed += remove_segment(&passed.path);
            }
        }
        freed
    }

    /// The sequence number of the next record this reader will hand out.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
}

/// Deletes a segment file; returns its size, 0 if it could not be deleted.
fn remove_segment(path: &Path) -> u64 {
    let size = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    match fs::remove_file(path) {
        Ok(()) => size,
        Err(e) => {
            tracing::warn!(segment = %path.display(), error = %e, "cannot delete a written journal segment");
            0
        }
    }
}
