//! The write-ahead log: every accepted export request, as the protobuf the client sent (after
//! decompression), appended to numbered segment files and fsynced before the client hears back.
//!
//! A request is logged *after* every shard applied it. So everything logged before a position
//! `P` is in any state read after `P` was taken, and a checkpoint that records `P` needs only the
//! records from `P` on replayed (replay is idempotent: the exactly-once windows and the
//! cumulative last values in the checkpoint turn a record applied twice into duplicates).
//!
//! One writer thread owns the open segment: it writes everything queued as one group and hands
//! the group to a syncer thread, which syncs once for every group written meanwhile and then
//! answers them (group commit, pipelined: the next group is written while the last one syncs,
//! so a request waits for about one fsync, not two). After an I/O error the segment is
//! abandoned and the next group opens a new one, so one bad write never poisons later ones.
//!
//! Segment: `SPANWAL\0`, format version (u32 LE), state start (u64 LE ns), then records:
//! payload length (u32 LE), CRC-32 (u32 LE) of the rest, record version (u8), kind (u8),
//! payload. A record that is short or fails its CRC is a torn tail: replay truncates the segment
//! there and counts it. A kind with the `TIMED` bit carries the time the request was accepted
//! before its payload: replay judges the request by that time, not by when it runs.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};

use super::{numbered_files, sync_dir, StorageMetrics};

mod format;
mod replay;

use format::{encode_record, MAGIC, SEGMENT_VERSION};
pub use format::{
    segment_state_start, split_timed, timed, timed_with, HEADER_LEN, KIND_METRICS,
    KIND_METRICS_GZIP, KIND_METRICS_SNAPPY, KIND_METRICS_ZSTD, TIMED,
};
pub use replay::{replay, ReplayStats};

/// Requests waiting for the writer before exports are refused (retryably).
const QUEUE: usize = 4096;
/// A group stops growing here, so one sync never waits behind an unbounded write.
const GROUP_BYTES: usize = 16 << 20;

/// A place in the log: segment number and byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.segment, self.offset)
    }
}

impl std::str::FromStr for Position {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (seg, off) = s.split_once(':').ok_or("expected segment:offset")?;
        Ok(Self {
            segment: seg.parse().map_err(|_| "bad segment number")?,
            offset: off.parse().map_err(|_| "bad offset")?,
        })
    }
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.wal"))
}

/// Segment files in `dir`, oldest first.
pub fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    numbered_files(dir, "", ".wal")
}

/// Why an append was not made durable.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("write-ahead log I/O error: {0}")]
    Io(String),
    #[error("write-ahead log queue is full")]
    Busy,
    #[error("write-ahead log is closed")]
    Closed,
}

type Reply<T> = tokio::sync::oneshot::Sender<T>;
type Pending = (u8, Bytes, Reply<Result<(), WalError>>);

enum Msg {
    Append(u8, Bytes, Reply<Result<(), WalError>>),
    /// Start a new segment; answers the position where the next record will go.
    Rotate(Reply<Position>),
}

/// The log's writer side.
pub struct Wal {
    tx: Option<Sender<Msg>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Segment {
    file: Arc<File>,
    offset: u64,
}

/// A written group waiting for its fsync.
struct SyncJob {
    file: Arc<File>,
    replies: Vec<Reply<Result<(), WalError>>>,
    bytes: u64,
}

struct Writer {
    dir: PathBuf,
    next_seq: u64,
    state_start_ns: u64,
    segment_size: u64,
    open: Option<Segment>,
    metrics: StorageMetrics,
    buf: Vec<u8>,
    syncer: Option<Sender<SyncJob>>,
    /// Set by the syncer after a failed sync: the open segment must not be written again.
    sync_failed: Arc<AtomicBool>,
}

impl Wal {
    /// Starts the writer; the first record goes to segment `next_seq`.
    pub fn start(
        dir: &Path,
        next_seq: u64,
        state_start_ns: u64,
        segment_size: u64,
        metrics: StorageMetrics,
    ) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let (tx, rx) = bounded(QUEUE);
        let (sync_tx, sync_rx) = crossbeam_channel::unbounded();
        let sync_failed = Arc::new(AtomicBool::new(false));
        let syncer = {
            let (metrics, failed) = (metrics.clone(), sync_failed.clone());
            std::thread::Builder::new()
                .name("spanagg-wal-sync".into())
                .spawn(move || sync_loop(sync_rx, metrics, failed))?
        };
        let mut w = Writer {
            dir: dir.to_owned(),
            next_seq: next_seq.max(1),
            state_start_ns,
            segment_size,
            open: None,
            metrics,
            buf: Vec::new(),
            syncer: Some(sync_tx),
            sync_failed,
        };
        let thread = std::thread::Builder::new()
            .name("spanagg-wal".into())
            .spawn(move || {
                w.run(rx);
                // Dropping the writer closes the syncer's queue: it answers what it holds and
                // stops.
                drop(w);
                let _ = syncer.join();
            })?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Appends one record of `kind` and waits until it is on disk.
    pub async fn append(&self, kind: u8, payload: Bytes) -> Result<(), WalError> {
        let tx = self.tx.as_ref().ok_or(WalError::Closed)?;
        let (reply, rx) = tokio::sync::oneshot::channel();
        match tx.try_send(Msg::Append(kind, payload, reply)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(WalError::Busy),
            Err(TrySendError::Disconnected(_)) => return Err(WalError::Closed),
        }
        rx.await.unwrap_or(Err(WalError::Closed))
    }

    /// Closes the current segment; every record appended from now on is at or after the
    /// returned position.
    pub async fn rotate(&self) -> Result<Position, WalError> {
        let tx = self.tx.as_ref().ok_or(WalError::Closed)?;
        let (reply, rx) = tokio::sync::oneshot::channel();
        tx.send(Msg::Rotate(reply)).map_err(|_| WalError::Closed)?;
        rx.await.map_err(|_| WalError::Closed)
    }
}

impl Drop for Wal {
    /// Stops the writer after it has written (and synced) what is queued.
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Writer {
    fn run(&mut self, rx: Receiver<Msg>) {
        while let Ok(first) = rx.recv() {
            let mut group = Vec::new();
            let mut bytes = 0;
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Append(kind, payload, reply) => {
                        bytes += payload.len();
                        group.push((kind, payload, reply));
                    }
                    Msg::Rotate(reply) => {
                        // Records queued before the rotation belong before its position.
                        self.commit(std::mem::take(&mut group));
                        bytes = 0;
                        let _ = reply.send(self.rotate());
                    }
                }
                if bytes < GROUP_BYTES {
                    next = rx.try_recv().ok();
                }
            }
            self.commit(group);
        }
        if let Some(seg) = self.open.take() {
            let _ = seg.file.sync_all();
        }
    }

    fn rotate(&mut self) -> Position {
        if let Some(seg) = self.open.take() {
            let _ = seg.file.sync_all();
        }
        Position {
            segment: self.next_seq,
            offset: HEADER_LEN,
        }
    }

    fn commit(&mut self, group: Vec<Pending>) {
        if group.is_empty() {
            return;
        }
        if self.sync_failed.swap(false, Ordering::Relaxed) {
            // The file's state after a failed sync is unknown: start a new one.
            self.open = None;
        }
        let written = self.write_group(&group);
        let replies = group.into_iter().map(|(_, _, reply)| reply).collect();
        match written {
            Ok((file, bytes)) => {
                let job = SyncJob {
                    file,
                    replies,
                    bytes,
                };
                if let Some(Err(e)) = self.syncer.as_ref().map(|s| s.send(job)) {
                    fail(e.into_inner().replies, "WAL syncer stopped");
                }
            }
            Err(e) => {
                self.metrics.wal_errors.inc();
                tracing::error!(error = %e, "write-ahead log write failed: exports get a retryable error");
                // The file's state after a failed write is unknown: start a new one.
                self.open = None;
                fail(replies, &e.to_string());
            }
        }
    }

    /// Writes a group to the open segment (opening one if needed); returns the file to sync.
    fn write_group(&mut self, group: &[Pending]) -> io::Result<(Arc<File>, u64)> {
        let mut seg = match self.open.take() {
            Some(s) => s,
            None => self.open_segment()?,
        };
        self.buf.clear();
        for (kind, payload, _) in group {
            encode_record(&mut self.buf, *kind, payload)?;
        }
        (&*seg.file).write_all(&self.buf)?;
        let bytes = self.buf.len() as u64;
        seg.offset += bytes;
        self.metrics.wal_records.inc_by(group.len() as u64);
        let file = seg.file.clone();
        if seg.offset < self.segment_size {
            self.open = Some(seg);
        }
        if self.buf.capacity() > GROUP_BYTES * 2 {
            self.buf = Vec::new();
        }
        Ok((file, bytes))
    }

    fn open_segment(&mut self) -> io::Result<Segment> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let path = segment_path(&self.dir, seq);
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        let mut header = Vec::with_capacity(HEADER_LEN as usize);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&SEGMENT_VERSION.to_le_bytes());
        header.extend_from_slice(&self.state_start_ns.to_le_bytes());
        file.write_all(&header)?;
        file.sync_all()?;
        sync_dir(&self.dir)?;
        self.metrics.wal_segments_created.inc();
        Ok(Segment {
            file: Arc::new(file),
            offset: HEADER_LEN,
        })
    }
}

fn fail(replies: Vec<Reply<Result<(), WalError>>>, why: &str) {
    for r in replies {
        let _ = r.send(Err(WalError::Io(why.to_owned())));
    }
}

/// Syncs written groups: one fsync per file for everything written since the last one.
fn sync_loop(rx: Receiver<SyncJob>, metrics: StorageMetrics, failed: Arc<AtomicBool>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        jobs.extend(rx.try_iter());
        // Usually one file; after a segment roll, the old one's jobs come first.
        while let Some(file) = jobs.first().map(|j| j.file.clone()) {
            let n = jobs
                .iter()
                .take_while(|j| Arc::ptr_eq(&j.file, &file))
                .count();
            let t = Instant::now();
            let result = file.sync_data();
            metrics.wal_fsync.observe(t.elapsed().as_secs_f64());
            let batch: Vec<SyncJob> = jobs.drain(..n).collect();
            match result {
                Ok(()) => {
                    for job in batch {
                        metrics.wal_bytes.inc_by(job.bytes);
                        for r in job.replies {
                            let _ = r.send(Ok(()));
                        }
                    }
                }
                Err(e) => {
                    metrics.wal_errors.inc();
                    failed.store(true, Ordering::Relaxed);
                    tracing::error!(error = %e, "write-ahead log fsync failed: exports get a retryable error");
                    for job in batch {
                        fail(job.replies, &e.to_string());
                    }
                }
            }
        }
    }
}

/// Deletes segments numbered below `before` (covered by checkpoints); returns how many.
pub fn remove_before(dir: &Path, before: u64) -> io::Result<usize> {
    let mut n = 0;
    for (seq, path) in segments(dir)? {
        if seq < before {
            std::fs::remove_file(&path)?;
            n += 1;
        }
    }
    if n > 0 {
        sync_dir(dir)?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests;
