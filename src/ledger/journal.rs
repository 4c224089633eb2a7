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
//! Whoever finalises a record appends and writes it ([`Journal::append`]);
//! one thread fsyncs what was written in groups ([`Journal::run_sync`]) and
//! publishes the highest durable sequence number. Durable records reach the
//! batch writer's [`JournalReader`] in memory ([`Handoff`]); it reads the
//! files only to replay (after a restart, or when the hand-off overflowed
//! while the store was down). The reader deletes a segment once the checkpoint
//! covers every record before the next segment's first; new segments begin
//! only when everything before them is written, so the two never race on a
//! file.
//!
//! Crash safety: a crash can leave a torn last frame. [`JournalWriter::open`]
//! truncates the newest segment after its last valid frame, and a reader stops
//! at the first invalid frame of an older segment and moves on to the next one.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::record::{RecordAck, UsageRecord};

use super::{Shared, now_ms};

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

/// The file side of the journal: frames are encoded into an in-memory group
/// by [`push`](Self::push), written to the segment file by
/// [`write_out`](Self::write_out), and dropped from memory once fsynced
/// ([`synced`](Self::synced)). [`Journal`] drives it under its lock.
#[derive(Debug)]
pub(crate) struct JournalWriter {
    dir: PathBuf,
    segment_bytes: u64,
    /// The segment being appended to, and its length. Shared so that the sync
    /// thread can fsync it without holding the journal's lock.
    file: Option<(Arc<File>, u64)>,
    next_seq: u64,
    /// Encoded frames not yet known to be durable, and the sequence number of
    /// the first.
    buf: Vec<u8>,
    buf_first_seq: u64,
    buf_records: usize,
    /// How much of `buf` has been written (not necessarily fsynced) to `file`.
    /// Writing each record at once means a killed process loses nothing it
    /// handed to the journal: the page cache outlives the process.
    written: usize,
    /// A segment was created since the directory was last fsynced.
    dir_dirty: bool,
}

/// What an fsync of the current segment will make durable: every frame
/// written so far.
#[derive(Debug)]
struct Snapshot {
    file: Arc<File>,
    /// Bytes of `buf` (from its start) and records it covers.
    bytes: usize,
    records: usize,
    last_seq: u64,
    /// The directory must be fsynced too (a segment was created).
    dir: bool,
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
            dir_dirty: false,
        };
        Ok(Recovered {
            writer,
            last_seq,
            checkpoint,
            bytes,
            torn_bytes,
        })
    }

    /// Encodes a frame into the group; returns its sequence number.
    fn push(&mut self, appended_ms: u64, payload: &[u8]) -> u64 {
        let seq = self.next_seq;
        if self.buf_records == 0 {
            self.buf_first_seq = seq;
        }
        encode_frame(&mut self.buf, seq, appended_ms, payload);
        self.buf_records += 1;
        self.next_seq += 1;
        seq
    }

    /// Records appended and not yet known to be durable.
    fn unsynced(&self) -> usize {
        self.buf_records
    }

    /// Writes the frames not yet written, without fsyncing. Without an open
    /// segment (at the start, or after an error left what reached the last one
    /// unknown) it starts one at the group's first record and writes the whole
    /// group into it. On error the segment is abandoned.
    fn write_out(&mut self) -> io::Result<()> {
        if self.written == self.buf.len() {
            return Ok(());
        }
        if self.file.is_none() {
            // If a file of that name exists, it is from a failed attempt at
            // this same group, so nothing in it was ever reported durable.
            let file = create_segment(&self.dir, self.buf_first_seq)?;
            self.file = Some((Arc::new(file), 0));
            self.written = 0;
            self.dir_dirty = true;
        }
        let pending = &self.buf[self.written..];
        let result = match &mut self.file {
            Some((file, len)) => (&**file).write_all(pending).map(|()| {
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
                self.abandon_segment();
                Err(e)
            }
        }
    }

    /// Forgets the open segment: the next write starts a fresh one holding the
    /// whole unsynced group.
    fn abandon_segment(&mut self) {
        self.file = None;
        self.written = 0;
    }

    /// [`snapshot`](Self::snapshot), then, once the current segment has
    /// reached its size, a new segment for the records to come. The snapshot
    /// keeps the segment its records are in, so the new one never needs the
    /// fsync that makes them durable. Call after a successful
    /// [`write_out`](Self::write_out).
    fn snapshot_and_rotate(&mut self) -> Option<Snapshot> {
        let snapshot = self.snapshot();
        let full = self
            .file
            .as_ref()
            .is_some_and(|(_, len)| *len >= self.segment_bytes);
        if full && self.written == self.buf.len() {
            match create_segment(&self.dir, self.next_seq) {
                Ok(file) => {
                    self.file = Some((Arc::new(file), 0));
                    self.dir_dirty = true;
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    "cannot start a new journal segment; appending to the current one"
                ),
            }
        }
        snapshot
    }

    /// What an fsync now would make durable; `None` when there is nothing to
    /// sync. Call after a successful [`write_out`](Self::write_out).
    fn snapshot(&mut self) -> Option<Snapshot> {
        if self.buf_records == 0 || self.written != self.buf.len() {
            return None;
        }
        let (file, _) = self.file.as_ref()?;
        Some(Snapshot {
            file: file.clone(),
            bytes: self.buf.len(),
            records: self.buf_records,
            last_seq: self.next_seq - 1,
            dir: std::mem::take(&mut self.dir_dirty),
        })
    }

    /// Drops the frames a successful sync covered.
    fn synced(&mut self, snapshot: &Snapshot) {
        self.buf.drain(..snapshot.bytes);
        self.written = self.written.saturating_sub(snapshot.bytes);
        self.buf_records -= snapshot.records;
        self.buf_first_seq = snapshot.last_seq + 1;
    }

    /// After an error: what to rewrite, namely every record not known to be
    /// durable, into a fresh segment that starts at the first of them. The
    /// open segment is forgotten; while the journal fails, appenders leave the
    /// files alone, so the sync thread runs the [`Rewrite`] without the lock.
    fn rewrite_job(&mut self) -> Rewrite {
        self.abandon_segment();
        Rewrite {
            dir: self.dir.clone(),
            first_seq: self.buf_first_seq,
            bytes: self.buf.clone(),
            records: self.buf_records,
            last_seq: self.next_seq - 1,
        }
    }

    /// Takes the segment a successful [`Rewrite`] wrote; returns what it made
    /// durable. Records appended meanwhile follow in `buf`, not yet written.
    fn rewritten(&mut self, job: &Rewrite, file: Option<File>) -> Option<Snapshot> {
        self.dir_dirty = false;
        let file = Arc::new(file?);
        self.file = Some((file.clone(), job.bytes.len() as u64));
        self.written = job.bytes.len();
        Some(Snapshot {
            file,
            bytes: job.bytes.len(),
            records: job.records,
            last_seq: job.last_seq,
            dir: false,
        })
    }

    /// The JSON of the records appended since the last successful sync.
    fn unsynced_payloads(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = self.buf.as_slice();
        while let Frame::Valid { payload, len, .. } = parse_frame(rest) {
            out.push(String::from_utf8_lossy(payload).into_owned());
            rest = &rest[len..];
        }
        out
    }
}

/// The records to write again after a journal error, and where.
#[derive(Debug)]
struct Rewrite {
    dir: PathBuf,
    first_seq: u64,
    /// The encoded frames, from `first_seq` to `last_seq`.
    bytes: Vec<u8>,
    records: usize,
    last_seq: u64,
}

impl Rewrite {
    /// Deletes the segments newer than `first_seq` (they hold only records
    /// being rewritten), writes the frames into a fresh segment, and fsyncs it
    /// and the directory. Returns the segment (`None` when there were no
    /// records, only the directory to sync).
    fn run(&self) -> io::Result<Option<File>> {
        if self.records == 0 {
            sync_dir(&self.dir)?;
            return Ok(None);
        }
        for segment in list_segments(&self.dir)? {
            if segment.first_seq > self.first_seq {
                fs::remove_file(&segment.path)?;
            }
        }
        let mut file = create_segment(&self.dir, self.first_seq)?;
        file.write_all(&self.bytes)?;
        file.sync_data()?;
        sync_dir(&self.dir)?;
        Ok(Some(file))
    }
}

/// Creates (or empties) the segment whose first record is `first_seq`.
fn create_segment(dir: &Path, first_seq: u64) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(segment_path(dir, first_seq))
}

/// Durable records on their way from the sync thread to the batch writer,
/// so that the writer need not read back and decode what was just written.
/// Bounded: past its capacity (the store is down and the writer is behind)
/// records are left out, and the writer reads them from the journal files.
#[derive(Debug)]
pub(crate) struct Handoff {
    entries: Mutex<VecDeque<JournalEntry>>,
    capacity: usize,
}

impl Handoff {
    pub fn new(capacity: usize) -> Handoff {
        Handoff {
            entries: Mutex::new(VecDeque::new()),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<JournalEntry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The journal as the sink sees it. Whoever finalises a record appends it and
/// writes it to the segment file under a short lock, so the record is in the
/// file (and survives the process being killed) before the response ends,
/// without a hop to another thread. One thread ([`Journal::run_sync`]) fsyncs
/// what was written in groups (at most `fsync_interval` after a group's first
/// record), outside the lock, then publishes the highest durable sequence
/// number and hands the records to the batch writer in memory.
///
/// A failed write or fsync marks the journal failing (the sink then refuses
/// new requests); records keep being accepted into memory and the sync thread
/// rewrites all of them into a fresh segment, retrying until it works, before
/// their acks are sent.
pub(crate) struct Journal {
    dir: PathBuf,
    state: Mutex<State>,
    /// Wakes the sync thread: a group started or grew large, a write failed,
    /// or the journal is stopping.
    wake: Condvar,
    shared: Arc<Shared>,
    handoff: Arc<Handoff>,
    fsync_interval: Duration,
}

struct State {
    writer: JournalWriter,
    /// The records of the writer's unsynced frames, in order.
    entries: VecDeque<JournalEntry>,
    /// Acks of records accepted while writes fail, sent once they are written.
    unacked: Vec<tokio::sync::oneshot::Sender<()>>,
    /// When the first record not yet covered by a sync was appended.
    group_started: Option<Instant>,
    /// A write or fsync failed; the sync thread rewrites the unsynced records.
    failing: bool,
    /// Counts failures, so that an fsync that straddles one is not trusted.
    epoch: u64,
    stopping: bool,
    /// The sync thread has stopped: nothing more can be journalled.
    closed: bool,
    /// Publishes the highest durable sequence number to the batch writer;
    /// dropped when the sync thread stops, which tells the writer that
    /// nothing more will come.
    durable: Option<tokio::sync::watch::Sender<u64>>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").finish_non_exhaustive()
    }
}

impl Journal {
    pub fn new(
        writer: JournalWriter,
        shared: Arc<Shared>,
        handoff: Arc<Handoff>,
        durable: tokio::sync::watch::Sender<u64>,
        fsync_interval: Duration,
    ) -> Journal {
        Journal {
            dir: writer.dir.clone(),
            state: Mutex::new(State {
                writer,
                entries: VecDeque::new(),
                unacked: Vec::new(),
                group_started: None,
                failing: false,
                epoch: 0,
                stopping: false,
                closed: false,
                durable: Some(durable),
            }),
            wake: Condvar::new(),
            shared,
            handoff,
            fsync_interval,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends a finalised record and writes it to the segment file. Returns
    /// an ack to wait for only while journal writes fail (it resolves once the
    /// record is written); gives the record back if the journal has stopped.
    pub fn append(&self, record: UsageRecord) -> Result<RecordAck, Box<UsageRecord>> {
        let appended_ms = now_ms();
        let payload = match serde_json::to_vec(&record) {
            Ok(payload) if payload.len() <= MAX_PAYLOAD => payload,
            outcome => {
                // Only a record that cannot be serialized ends here; log every
                // field so that it can still be accounted for.
                let error = match outcome {
                    Err(e) => e.to_string(),
                    Ok(_) => "usage record larger than 16 MiB".to_owned(),
                };
                self.shared.drop_record(
                    &record,
                    &format!("cannot encode a usage record for the journal: {error}"),
                );
                return Ok(None);
            }
        };
        let mut state = self.lock();
        if state.closed {
            return Err(Box::new(record));
        }
        let seq = state.writer.push(appended_ms, &payload);
        let mut wake = state.writer.unsynced() == MAX_UNSYNCED_RECORDS;
        if state.group_started.is_none() {
            state.group_started = Some(Instant::now());
            wake = true;
        }
        if state.entries.is_empty() {
            self.shared
                .progress
                .oldest_unsynced_ms
                .store(appended_ms, Ordering::SeqCst);
        }
        state.entries.push_back(JournalEntry {
            seq,
            appended_ms,
            record,
        });
        let written = !state.failing
            && match state.writer.write_out() {
                Ok(()) => true,
                Err(e) => {
                    self.fail(&mut state, &e);
                    wake = true;
                    false
                }
            };
        let ack = if written {
            None
        } else {
            let (ack, acked) = tokio::sync::oneshot::channel();
            state.unacked.push(ack);
            self.shared
                .metrics
                .queue_depth
                .set(i64::try_from(state.unacked.len()).unwrap_or(i64::MAX));
            Some(acked)
        };
        drop(state);
        if wake {
            self.wake.notify_one();
        }
        Ok(ack)
    }

    /// Asks the sync thread to sync everything appended and stop. Records
    /// appended before it has stopped are still journalled.
    pub fn stop(&self) {
        self.lock().stopping = true;
        self.wake.notify_one();
    }

    /// Marks the journal failing after a write or fsync error.
    fn fail(&self, state: &mut State, error: &io::Error) {
        state.failing = true;
        state.epoch += 1;
        self.shared.metrics.journal_errors.inc();
        if !self.shared.journal_failing.swap(true, Ordering::SeqCst) {
            tracing::error!(
                error = %error,
                dir = %state.writer.dir.display(),
                unsynced = state.writer.unsynced(),
                "cannot write the usage journal; refusing new requests until it works"
            );
        }
    }

    /// The sync thread: fsyncs written records in groups and publishes them,
    /// or rewrites them after an error, until [`stop`](Self::stop) and
    /// everything appended is durable.
    pub fn run_sync(&self) {
        // Marks the journal dead however this function ends, so that the sink
        // refuses traffic it could no longer record and appends are refused.
        struct AliveGuard<'a>(&'a Journal);
        impl Drop for AliveGuard<'_> {
            fn drop(&mut self) {
                let mut state = self.0.lock();
                state.closed = true;
                state.durable = None;
                self.0.shared.journal_alive.store(false, Ordering::SeqCst);
            }
        }
        let _alive = AliveGuard(self);

        let mut failures = 0u32;
        loop {
            let mut state = self.wait_for_work(self.lock());
            if state.failing {
                let job = state.writer.rewrite_job();
                drop(state);
                let started = Instant::now();
                let result = job.run();
                state = self.lock();
                let result = result.and_then(|file| {
                    if let Some(snapshot) = state.writer.rewritten(&job, file) {
                        self.complete(&mut state, &snapshot, started);
                    }
                    // Records appended during the rewrite go to the new segment.
                    state.writer.write_out()
                });
                match result {
                    Ok(()) => {
                        state.failing = false;
                        state.group_started = (state.writer.unsynced() > 0).then(Instant::now);
                        for ack in state.unacked.drain(..) {
                            let _ = ack.send(());
                        }
                        self.shared.metrics.queue_depth.set(0);
                        self.shared.journal_failing.store(false, Ordering::SeqCst);
                        // Bytes of the failed attempts stay on disk until replayed.
                        if let Ok(bytes) = journal_bytes(&state.writer.dir) {
                            self.shared
                                .metrics
                                .journal_bytes
                                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
                        }
                        self.shared.update_full();
                        failures = 0;
                        tracing::info!("journal writes work again");
                    }
                    Err(e) => {
                        failures += 1;
                        state.writer.abandon_segment();
                        state.writer.dir_dirty = true;
                        self.shared.metrics.journal_errors.inc();
                        if failures.is_multiple_of(50) {
                            tracing::error!(error = %e, failures, "the usage journal still cannot be written");
                        }
                        if state.stopping && failures >= 25 {
                            // Shutting down must end; the records are then only in the log.
                            self.give_up(&mut state);
                            return;
                        }
                        drop(state);
                        std::thread::sleep(RETRY_BACKOFF);
                        continue;
                    }
                }
            } else {
                let epoch = state.epoch;
                if let Err(e) = state.writer.write_out() {
                    self.fail(&mut state, &e);
                    continue;
                }
                state.group_started = None;
                if let Some(snapshot) = state.writer.snapshot_and_rotate() {
                    drop(state);
                    let started = Instant::now();
                    let result = snapshot.file.sync_data().and_then(|()| {
                        if snapshot.dir {
                            sync_dir(&self.dir)
                        } else {
                            Ok(())
                        }
                    });
                    state = self.lock();
                    if state.epoch != epoch {
                        // A write failed meanwhile: the rewrite covers these records.
                        continue;
                    }
                    if let Err(e) = result {
                        state.writer.dir_dirty |= snapshot.dir;
                        self.fail(&mut state, &e);
                        continue;
                    }
                    self.complete(&mut state, &snapshot, started);
                }
            }
            if state.stopping && !state.failing && state.writer.unsynced() == 0 {
                state.closed = true;
                tracing::debug!("journal stopped");
                return;
            }
        }
    }

    /// Waits until there is something to do: a group is due for its fsync, a
    /// write failed, or the journal is stopping.
    fn wait_for_work<'a>(&self, mut state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        loop {
            if state.stopping || state.failing {
                return state;
            }
            let Some(started) = state.group_started else {
                state = self
                    .wake
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            };
            let due = started + self.fsync_interval;
            let now = Instant::now();
            if now >= due || state.writer.unsynced() >= MAX_UNSYNCED_RECORDS {
                return state;
            }
            state = match self.wake.wait_timeout(state, due - now) {
                Ok((state, _)) => state,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// Publishes what a successful sync made durable and hands its records to
    /// the batch writer.
    fn complete(&self, state: &mut State, snapshot: &Snapshot, started: Instant) {
        state.writer.synced(snapshot);
        let shared = &self.shared;
        let mut first_ms = None;
        {
            let mut handoff = self.handoff.lock();
            while state
                .entries
                .front()
                .is_some_and(|e| e.seq <= snapshot.last_seq)
            {
                let Some(entry) = state.entries.pop_front() else {
                    break;
                };
                first_ms.get_or_insert(entry.appended_ms);
                if handoff.len() < self.handoff.capacity {
                    handoff.push_back(entry);
                }
            }
        }
        shared
            .metrics
            .fsync_seconds
            .observe(started.elapsed().as_secs_f64());
        shared
            .metrics
            .journal_bytes
            .add(i64::try_from(snapshot.bytes).unwrap_or(i64::MAX));
        shared
            .metrics
            .records
            .with_label_values(&["journalled"])
            .inc_by(snapshot.records as u64);
        // The group's age moves from "unsynced" to "durable" before the writer
        // can see the group, so it is never unaccounted.
        let progress = &shared.progress;
        if let Some(first) = first_ms {
            let _ = progress.oldest_durable_ms.compare_exchange(
                0,
                first,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
        }
        progress.oldest_unsynced_ms.store(
            state.entries.front().map_or(0, |e| e.appended_ms),
            Ordering::SeqCst,
        );
        shared
            .durable_seq
            .store(snapshot.last_seq, Ordering::SeqCst);
        if let Some(durable) = &state.durable {
            durable.send_replace(snapshot.last_seq);
        }
        shared.update_full();
    }

    /// At shutdown, after the journal kept failing: logs every record it could
    /// not make durable and stops.
    fn give_up(&self, state: &mut State) {
        let metrics = &self.shared.metrics;
        metrics
            .records
            .with_label_values(&["dropped"])
            .inc_by(state.writer.unsynced() as u64);
        for payload in state.writer.unsynced_payloads() {
            tracing::error!(record = %payload, "cannot journal this usage record at shutdown; it is only in this log line");
        }
        state.entries.clear();
        for ack in state.unacked.drain(..) {
            let _ = ack.send(());
        }
        metrics.queue_depth.set(0);
        state.closed = true;
    }
}

/// The segment the reader is in.
#[derive(Debug)]
struct Current {
    first_seq: u64,
    path: PathBuf,
    file: File,
    /// Offset of the next frame to read.
    offset: u64,
    /// A window of the file, starting at `buf_offset` (reused between reads).
    buf: Vec<u8>,
    buf_offset: u64,
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
        })
    }

    /// The bytes from `offset` on, reading more of the file when fewer than
    /// `want` are buffered.
    fn window(&mut self, want: usize) -> io::Result<&[u8]> {
        let buffered = self.offset >= self.buf_offset
            && self.buf.len() >= (self.offset - self.buf_offset) as usize + want;
        if !buffered {
            let size = want.max(READ_CHUNK);
            self.buf.clear();
            let mut file = &self.file;
            file.seek(SeekFrom::Start(self.offset))?;
            file.take(size as u64).read_to_end(&mut self.buf)?;
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
/// order: from the in-memory [`Handoff`] when it holds the next one (the usual
/// case), else from the segment files (a replay after a restart, or when the
/// hand-off overflowed while the store was down). Deletes segments the
/// checkpoint has passed.
#[derive(Debug)]
pub struct JournalReader {
    dir: PathBuf,
    handoff: Arc<Handoff>,
    current: Option<Current>,
    /// The sequence number of the next record to hand out.
    next_seq: u64,
}

impl JournalReader {
    /// A reader that starts after `checkpoint`.
    pub(crate) fn new(dir: &Path, checkpoint: u64, handoff: Arc<Handoff>) -> JournalReader {
        JournalReader {
            dir: dir.to_path_buf(),
            handoff,
            current: None,
            next_seq: checkpoint + 1,
        }
    }

    /// Up to `max` records with sequence numbers up to `durable` from the
    /// hand-off, without touching the disk; `None` when the next record is
    /// not there and [`read`](Self::read) must take it from the files.
    pub(crate) fn read_handoff(&mut self, max: usize, durable: u64) -> Option<ReadBatch> {
        let mut batch = ReadBatch::default();
        if self.next_seq > durable {
            return Some(batch);
        }
        let mut entries = self.handoff.lock();
        // Records already read from the files.
        while entries.front().is_some_and(|e| e.seq < self.next_seq) {
            entries.pop_front();
        }
        if entries.front().is_none_or(|e| e.seq != self.next_seq) {
            return None;
        }
        while batch.entries.len() < max
            && entries
                .front()
                .is_some_and(|e| e.seq == self.next_seq && e.seq <= durable)
        {
            let Some(entry) = entries.pop_front() else {
                break;
            };
            self.next_seq = entry.seq + 1;
            batch.entries.push(entry);
        }
        Some(batch)
    }

    /// Up to `max` records with sequence numbers up to `durable`, in order,
    /// read from the segment files.
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
                        // Written but not yet synced: wait for the sync thread.
                        break;
                    }
                    let decoded = (seq >= self.next_seq).then(|| {
                        serde_json::from_slice::<UsageRecord>(payload)
                            .map_err(|e| (e, String::from_utf8_lossy(payload).into_owned()))
                    });
                    current.offset += len as u64;
                    match decoded {
                        // Already handed out, or a copy written again after a disk error.
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
        let segments = list_segments(&self.dir)?;
        if !segments.iter().any(|s| s.path == current.path) {
            // Deleted under the reader: a segment holding only records that
            // were never durable, rewritten after a disk error. Start over
            // from the oldest segment (records already read are skipped).
            self.current = None;
            return Ok(true);
        }
        let next = segments
            .into_iter()
            .find(|s| s.first_seq > current.first_seq);
        let Some(next) = next else { return Ok(false) };
        if next.first_seq > self.next_seq {
            self.report_gap(next.first_seq, batch);
            self.next_seq = next.first_seq;
        }
        self.current = Some(Current::open(&next)?);
        Ok(true)
    }

    /// Deletes the segments whose records are all at or before `checkpoint`:
    /// every segment but the newest holds records below the next segment's
    /// first (or copies of records in it, after a disk error). Returns the
    /// bytes freed.
    pub fn release(&mut self, checkpoint: u64) -> u64 {
        let segments = match list_segments(&self.dir) {
            Ok(segments) => segments,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot list the journal segments");
                return 0;
            }
        };
        let mut freed = 0;
        for pair in segments.windows(2) {
            if pair[1].first_seq.saturating_sub(1) > checkpoint {
                break;
            }
            freed += remove_segment(&pair[0].path);
            if self
                .current
                .as_ref()
                .is_some_and(|c| c.path == pair[0].path)
            {
                self.current = None;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::Usage;
    use crate::record::Outcome;

    fn record(i: u64) -> UsageRecord {
        let at = chrono::DateTime::from_timestamp(1_764_000_000, 0).unwrap();
        UsageRecord {
            request_id: format!("req_{i:08}"),
            upstream_request_id: None,
            message_id: Some(format!("msg_{i}")),
            key_id: "key".to_owned(),
            team: None,
            model: Some("claude-sonnet-4-5".to_owned()),
            endpoint: "/v1/messages".to_owned(),
            stream: false,
            status: 200,
            outcome: Outcome::Completed,
            error_type: None,
            stop_reason: Some("end_turn".to_owned()),
            usage: Usage {
                input_tokens: i,
                output_tokens: i + 1,
                ..Usage::default()
            },
            usage_exact: true,
            cost_nanousd: Some(7),
            price_version: None,
            end_user: None,
            tags: None,
            attempts: 1,
            queued_ms: 0,
            ttfb_ms: None,
            duration_ms: 1,
            started_at: at,
            finished_at: at,
            meter_errors: 0,
            long_context_beta: false,
        }
    }

    /// A sync started as a segment fills covers the segment holding its
    /// records, not the one begun for the records after them.
    #[test]
    fn a_sync_covers_the_full_segment_not_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = JournalWriter::open(dir.path(), 1).unwrap().writer;
        writer.push(1, b"{}");
        writer.push(1, b"{}");
        writer.write_out().unwrap();
        let snapshot = writer.snapshot_and_rotate().unwrap();
        assert_eq!(snapshot.last_seq, 2);
        assert_eq!(
            snapshot.file.metadata().unwrap().len(),
            snapshot.bytes as u64
        );
        let (next, len) = writer.file.as_ref().unwrap();
        assert_eq!(*len, 0);
        assert_eq!(next.metadata().unwrap().len(), 0);
        assert!(snapshot.dir && writer.dir_dirty);
        assert_eq!(
            list_segments(dir.path())
                .unwrap()
                .iter()
                .map(|s| s.first_seq)
                .collect::<Vec<_>>(),
            [1, 3]
        );
    }

    /// Appenders on several threads, tiny segments (a rotation every few
    /// records) and write failures injected at random points: every record
    /// still ends up durable exactly once, in order, every ack resolves, and
    /// the records reach the hand-off or the files.
    #[test]
    fn injected_failures_and_rotations_lose_and_reorder_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Shared::for_test(u64::MAX);
        let recovered = JournalWriter::open(dir.path(), 2048).unwrap();
        let handoff = Arc::new(Handoff::new(100));
        let (durable_tx, durable_rx) = tokio::sync::watch::channel(0);
        let journal = Arc::new(Journal::new(
            recovered.writer,
            shared.clone(),
            handoff.clone(),
            durable_tx,
            Duration::from_millis(2),
        ));
        let sync = {
            let journal = journal.clone();
            std::thread::spawn(move || journal.run_sync())
        };
        const THREADS: u64 = 4;
        const EACH: u64 = 500;
        let appenders: Vec<_> = (0..THREADS)
            .map(|t| {
                let journal = journal.clone();
                std::thread::spawn(move || {
                    let mut acks = Vec::new();
                    for i in 0..EACH {
                        let n = t * EACH + i;
                        if n % 97 == 13 {
                            // What a failed write or fsync does.
                            let mut state = journal.lock();
                            journal.fail(&mut state, &io::Error::other("injected"));
                            drop(state);
                            journal.wake.notify_one();
                        }
                        if let Some(ack) = journal.append(record(n)).unwrap() {
                            acks.push(ack);
                        }
                    }
                    acks
                })
            })
            .collect();
        let mut acks = Vec::new();
        for appender in appenders {
            acks.extend(appender.join().unwrap());
        }
        assert!(!acks.is_empty(), "no append ever had to wait for a rewrite");
        journal.stop();
        sync.join().unwrap();
        for ack in acks {
            ack.blocking_recv().expect("ack dropped unsent");
        }
        let total = THREADS * EACH;
        assert_eq!(*durable_rx.borrow(), total);
        assert!(journal.append(record(0)).is_err(), "appended after stop");

        // Read back from the files alone (a restart): every record once, in order.
        let reopened = JournalWriter::open(dir.path(), 2048).unwrap();
        assert_eq!(reopened.last_seq, total);
        let mut reader = JournalReader::new(dir.path(), 0, Arc::new(Handoff::new(0)));
        let mut seen = std::collections::HashSet::new();
        let mut expected_seq = 1;
        loop {
            let batch = reader.read(64, total).unwrap();
            assert_eq!(batch.lost, 0);
            if batch.entries.is_empty() {
                break;
            }
            for entry in batch.entries {
                assert_eq!(entry.seq, expected_seq);
                expected_seq += 1;
                assert!(seen.insert(entry.record.request_id.clone()));
                let n: u64 = entry.record.request_id[4..].parse().unwrap();
                assert_eq!(entry.record, record(n));
            }
        }
        assert_eq!(seen.len() as u64, total);
        assert!(
            list_segments(dir.path()).unwrap().len() > 1,
            "no rotation happened"
        );

        // The hand-off holds the first durable records in order, capped.
        let mut reader = JournalReader::new(dir.path(), 0, handoff);
        let batch = reader.read_handoff(1000, total).unwrap();
        assert_eq!(batch.entries.len(), 100);
        assert!(batch.entries.iter().zip(1..).all(|(e, seq)| e.seq == seq));
        // Past the cap, the reader must go to the files.
        assert!(reader.read_handoff(1000, total).is_none());
        let rest = reader.read(10, total).unwrap();
        assert_eq!(rest.entries.first().map(|e| e.seq), Some(101));

        // Everything is in the store: every segment but the newest goes.
        let mut reader = JournalReader::new(dir.path(), total, Arc::new(Handoff::new(0)));
        assert!(reader.release(total) > 0);
        assert_eq!(list_segments(dir.path()).unwrap().len(), 1);
    }
}
