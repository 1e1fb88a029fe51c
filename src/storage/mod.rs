//! Durable state: the data directory (`wal/` and `checkpoints/`, one process at a time), what to
//! restore at start, periodic and final checkpoints, and the metrics that tell how it goes.
//!
//! The rule that keeps restarts honest (DESIGN §4): never serve a counter lower than one already
//! served. So a checkpoint is restored only when the WAL from its position on is still there
//! (`durability: wal`), or when a clean shutdown wrote it, and then only once (when the
//! restored state begins to serve it is renamed `*.restored` and older ones `*.stale`: after a
//! later crash they would be stale). Otherwise the state starts empty, with
//! a new start time: a reset Prometheus handles, never a stale value it would count twice.

pub mod checkpoint;
pub mod columns;
pub mod inspect;
mod lazy;
mod metrics;
mod offthread;
pub mod replay;
pub mod rows;
pub mod wal;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub use metrics::StorageMetrics;

use crate::aggregate::shard::{Part, ShardState};
use crate::aggregate::table::Table;
use crate::config::Durability;
use checkpoint::{CheckpointError, Meta};
use wal::{Position, Wal};

/// Files in `dir` named `{prefix}{number}{suffix}`, by number; none if `dir` does not exist.
fn numbered_files(dir: &Path, prefix: &str, suffix: &str) -> io::Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let seq = path.file_name().and_then(|n| n.to_str()).and_then(|n| {
            n.strip_prefix(prefix)?
                .strip_suffix(suffix)?
                .parse::<u64>()
                .ok()
        });
        if let Some(seq) = seq {
            out.push((seq, path));
        }
    }
    out.sort();
    Ok(out)
}

/// A scratch directory for unit tests, removed on drop (no extra crate for it).
#[cfg(test)]
pub(crate) struct ScratchDir(pub PathBuf);

#[cfg(test)]
impl ScratchDir {
    pub(crate) fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "spanagg-{tag}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&p).expect("temp dir");
        Self(p)
    }
}

#[cfg(test)]
impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Makes a rename or a new file in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Why the data directory could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("data directory {path}: {cause}")]
    Io { path: PathBuf, cause: io::Error },
    #[error("data directory {0} is in use by another spanagg (its LOCK file is held)")]
    Locked(PathBuf),
}

/// What start-up found and rebuilt.
pub struct Restored {
    /// Shards to start the table with.
    pub states: Vec<ShardState>,
    /// Start of the state: the original one when restored, else now.
    pub state_start_ns: u64,
    /// Replay the WAL from here before serving; `None`: nothing to replay.
    pub replay_from: Option<Position>,
    /// When the restored checkpoint was written (0: none): replay judges no record earlier than
    /// that, the time the restored windows describe.
    pub checkpoint_ns: u64,
    /// A clean checkpoint restored without a WAL, to be marked used before anything is served
    /// (see `Storage::consume_restored`).
    pub restore_once: Option<PathBuf>,
}

/// The data directory of a running spanagg.
pub struct Storage {
    wal_dir: PathBuf,
    checkpoint_dir: PathBuf,
    durability: Durability,
    keep: usize,
    segment_size: u64,
    state_start_ns: u64,
    /// New WAL segments are numbered at least this: replay after a crash starts at the restored
    /// checkpoint's position, so nothing may be logged before it.
    min_segment: u64,
    next_checkpoint: AtomicU64,
    wal: Option<Arc<Wal>>,
    metrics: StorageMetrics,
    /// One checkpoint at a time (the periodic one and the final one can meet at shutdown).
    busy: tokio::sync::Mutex<()>,
    /// See `Restored::restore_once`.
    restore_once: std::sync::Mutex<Option<PathBuf>>,
    /// About how many rows a checkpoint reads from a shard per visit (see `Part`).
    part_rows: usize,
    _lock: File,
}

/// Rows a checkpoint reads from a shard per visit by default: ~4.5 MiB of stream rows in Arrow.
pub const PART_ROWS: usize = 64 * 1024;

impl Storage {
    /// Locks the data directory and rebuilds the state. `make_states(start)` returns fresh
    /// shards whose state began at `start`.
    pub fn open(
        data_dir: &Path,
        durability: Durability,
        keep: usize,
        segment_size: u64,
        metrics: StorageMetrics,
        make_states: impl Fn(u64) -> Vec<ShardState>,
    ) -> Result<(Self, Restored), OpenError> {
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |cause| OpenError::Io { path, cause }
        };
        let wal_dir = data_dir.join("wal");
        let checkpoint_dir = data_dir.join("checkpoints");
        for d in [data_dir, &wal_dir, &checkpoint_dir] {
            std::fs::create_dir_all(d).map_err(io_err(d))?;
        }
        let lock_path = data_dir.join("LOCK");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        if lock.try_lock().is_err() {
            return Err(OpenError::Locked(data_dir.to_owned()));
        }
        let temps = checkpoint::remove_temps(&checkpoint_dir).map_err(io_err(&checkpoint_dir))?;
        if temps > 0 {
            tracing::warn!(
                files = temps,
                "removed checkpoint temp files a crash left behind"
            );
        }
        let t = Instant::now();
        let restored = restore(
            &checkpoint_dir,
            &wal_dir,
            durability,
            &metrics,
            &make_states,
        )
        .map_err(io_err(data_dir))?;
        metrics.restore_duration.set(t.elapsed().as_secs_f64());
        let last = checkpoint::list(&checkpoint_dir)
            .map_err(io_err(&checkpoint_dir))?
            .last()
            .map_or(0, |(seq, _)| *seq);
        let storage = Self {
            wal_dir,
            checkpoint_dir,
            durability,
            keep,
            segment_size,
            state_start_ns: restored.state_start_ns,
            min_segment: restored.replay_from.map_or(1, |p| p.segment.max(1)),
            next_checkpoint: AtomicU64::new(last + 1),
            wal: None,
            metrics,
            busy: tokio::sync::Mutex::new(()),
            restore_once: std::sync::Mutex::new(restored.restore_once.clone()),
            part_rows: PART_ROWS,
            _lock: lock,
        };
        Ok((storage, restored))
    }

    /// Called once the service is about to serve (every listener bound): a clean checkpoint
    /// restored without a WAL is marked used (`checkpoint::mark_restored`). Not earlier: a start
    /// that fails before serving anything may restore it again. An error must stop the start.
    pub fn consume_restored(&self) -> io::Result<()> {
        let path = self
            .restore_once
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?
            .take();
        if let Some(path) = path {
            let to = checkpoint::mark_restored(&path)?;
            tracing::info!(path = %to.display(), "the restored clean-shutdown checkpoint is used: it will not be restored again");
        }
        Ok(())
    }

    /// Sets about how many rows a checkpoint reads from a shard per visit.
    pub fn set_part_rows(&mut self, rows: usize) {
        self.part_rows = rows.max(1);
    }

    pub fn wal_dir(&self) -> &Path {
        &self.wal_dir
    }

    /// Starts the WAL writer (with `durability: wal`) after replay: new records go to a new
    /// segment after every existing one.
    pub fn start_wal(&mut self) -> io::Result<()> {
        if self.durability != Durability::Wal {
            return Ok(());
        }
        let last = wal::segments(&self.wal_dir)?
            .last()
            .map_or(0, |(seq, _)| *seq);
        self.wal = Some(Arc::new(Wal::start(
            &self.wal_dir,
            (last + 1).max(self.min_segment),
            self.state_start_ns,
            self.segment_size,
            self.metrics.clone(),
        )?));
        Ok(())
    }

    pub fn wal(&self) -> Option<Arc<Wal>> {
        self.wal.clone()
    }

    /// Writes a checkpoint of `table`. Failures are counted and logged by the caller's choice;
    /// the previous checkpoints stay either way.
    pub async fn checkpoint(
        &self,
        table: &Table,
        clean: bool,
    ) -> Result<(PathBuf, u64), CheckpointError> {
        let _busy = self.busy.lock().await;
        let t = Instant::now();
        let mut result = self.checkpoint_inner(table, clean, false).await;
        if matches!(result, Err(CheckpointError::Moved)) {
            // Rare (a projection changed across a restart, or a stream whose series expired sent
            // to an overflow series in its own shard): counted, then read whole at once.
            self.metrics
                .checkpoint_failed(CheckpointError::Moved.reason());
            tracing::warn!("{}", CheckpointError::Moved);
            result = self.checkpoint_inner(table, clean, true).await;
        }
        match &result {
            Ok((path, size, parts)) => {
                self.metrics
                    .checkpoint_duration
                    .observe(t.elapsed().as_secs_f64());
                self.metrics.checkpoint_size.set(*size as i64);
                self.metrics.checkpoint_success(crate::unix_ns());
                tracing::info!(path = %path.display(), bytes = size, seconds = t.elapsed().as_secs_f64(), parts, clean, "checkpoint written");
            }
            Err(e) => {
                self.metrics.checkpoint_failed(e.reason());
                tracing::error!(error = %e, "checkpoint failed: the previous one stays, ingestion goes on");
            }
        }
        result.map(|(path, size, _)| (path, size))
    }

    /// Writes a checkpoint, its shards read `whole` or in parts; returns its path, size and how
    /// many parts its shards were read in.
    async fn checkpoint_inner(
        &self,
        table: &Table,
        clean: bool,
        whole: bool,
    ) -> Result<(PathBuf, u64, u32), CheckpointError> {
        // Shards are read one after another (`offthread`), each in parts (`Part`): a series
        // with every stream that feeds it at one instant, parts and shards at different ones.
        // Replay from the WAL position rebuilds the state exactly because, with no series,
        // stream or overflow mark going away meanwhile (sweeps are paused), each one read is
        // there with everything applied to it before its read, and each one not read was
        // created after its part's read, by a record that replay applies again. So a replayed
        // record finds what it found when it was first applied; and where it counted toward a
        // limit, it finds at least as many as then, and no more than a record accepted after
        // it found (which the limit let in), so the limit decides as it did.
        let sweeps = table.pause_sweeps();
        // A sweep already under way when the pause began ends before this visit is answered.
        crate::export::gather(table, |_| ())
            .await
            .ok_or_else(|| CheckpointError::Io(io::Error::other("a shard has stopped")))?;
        // Every request logged before this position was applied before it was logged, so the
        // shard reads below include it.
        let wal_position = match &self.wal {
            Some(w) => Some(
                w.rotate()
                    .await
                    .map_err(|e| CheckpointError::Io(io::Error::other(e)))?,
            ),
            None => None,
        };
        // The time replay judges early records by: before any shard is read, so no record
        // accepted after a shard's read is judged later than it was.
        let created_ns = crate::unix_ns();
        let seq = self.next_checkpoint.fetch_add(1, Ordering::Relaxed);
        let writer = offthread::Writer::start(self.checkpoint_dir.clone(), seq);
        let (mut series, mut streams, mut series_budget) = (0u64, 0u64, 0u64);
        let mut parts = 0u32;
        let rows = self.part_rows;
        // One part of one shard at a time: the checkpoint's peak is a part, not the state.
        for i in 0..table.len() {
            // The first visit decides how many parts; the shard ingests between visits.
            let first = move |s: &ShardState| {
                let of = if whole { 1 } else { s.checkpoint_parts(rows) };
                let part = Part { index: 0, of };
                let batches = columns::part_batches(s, i as u32, part);
                (of, s.stream_moves(), s.series_budget(), batches)
            };
            let (of, moves, budget, batches) = visit(table, i, first).await?;
            parts = parts.saturating_add(of);
            series_budget = series_budget.max(budget);
            let mut rows = write_part(table, i, &writer, batches).await?;
            for part in Part::all(of).skip(1) {
                let read = move |s: &ShardState| {
                    (s.stream_moves(), columns::part_batches(s, i as u32, part))
                };
                let (now, batches) = visit(table, i, read).await?;
                if now != moves {
                    table.free_on_shard(i, batches, crate::memory::release_freed);
                    return Err(CheckpointError::Moved);
                }
                let more = write_part(table, i, &writer, batches).await?;
                rows = (rows.0 + more.0, rows.1 + more.1);
            }
            series += rows.0;
            streams += rows.1;
        }
        let meta = Meta {
            wal_position,
            state_start_ns: self.state_start_ns,
            clean_shutdown: clean,
            series_budget,
            ..Meta::new(table.len() as u32, series, streams, created_ns)
        };
        drop(sweeps);
        let (path, size) = writer.finish(meta).await?;
        if let Err(e) = self.prune() {
            tracing::warn!(error = %e, "could not prune old checkpoints or WAL segments");
        }
        Ok((path, size, parts))
    }

    /// Keeps the newest `keep` checkpoints, and the WAL from the second newest on, so that
    /// falling back to it (if the newest turns out unreadable) still replays exactly.
    fn prune(&self) -> io::Result<()> {
        let files = checkpoint::list(&self.checkpoint_dir)?;
        let excess = files.len().saturating_sub(self.keep);
        for (_, path) in files.iter().take(excess) {
            std::fs::remove_file(path)?;
        }
        if excess > 0 {
            sync_dir(&self.checkpoint_dir)?;
        }
        if self.wal.is_none() {
            return Ok(());
        }
        let floor = match files.len() {
            0 | 1 => None,
            n => files
                .get(n - 2)
                .and_then(|(_, p)| checkpoint::read_meta(p).ok())
                .and_then(|m| m.wal_position),
        };
        if let Some(p) = floor {
            wal::remove_before(&self.wal_dir, p.segment)?;
        }
        Ok(())
    }
}

/// Runs `read` on shard `i`'s thread.
async fn visit<R: Send + 'static>(
    table: &Table,
    i: usize,
    read: impl FnOnce(&ShardState) -> R + Send + 'static,
) -> Result<R, CheckpointError> {
    crate::export::gather_one(table, i, read)
        .await
        .ok_or_else(|| CheckpointError::Io(io::Error::other("a shard has stopped")))
}

/// Writes one part of shard `i` and frees it on that shard; returns its (series, stream) rows.
async fn write_part(
    table: &Table,
    i: usize,
    writer: &offthread::Writer,
    batches: Result<offthread::ShardBatches, arrow_schema::ArrowError>,
) -> Result<(u64, u64), CheckpointError> {
    let part = batches.map_err(|e| CheckpointError::Format(e.to_string()))?;
    let rows = (part[0].num_rows() as u64, part[1].num_rows() as u64);
    let (part, written) = writer.write(part).await?;
    // Freed on the shard that built it, which then hands the pages back.
    table.free_on_shard(i, part, crate::memory::release_freed);
    written.map(|()| rows)
}

/// Picks and loads the checkpoint to start from.
fn restore(
    checkpoint_dir: &Path,
    wal_dir: &Path,
    durability: Durability,
    metrics: &StorageMetrics,
    make_states: &impl Fn(u64) -> Vec<ShardState>,
) -> io::Result<Restored> {
    let files = checkpoint::list(checkpoint_dir)?;
    if durability == Durability::None && !wal::segments(wal_dir)?.is_empty() {
        // Records never replayed now could only be replayed wrongly later (onto a state that
        // already holds them), if the service is switched back to `durability: wal`.
        tracing::warn!("durability: none: deleting the WAL a `durability: wal` run left");
        wal::remove_before(wal_dir, u64::MAX)?;
    }
    let segments = wal::segments(wal_dir)?;
    let fresh = |start: u64| Restored {
        states: make_states(start),
        state_start_ns: start,
        replay_from: None,
        checkpoint_ns: 0,
        restore_once: None,
    };
    // Newest first. With a WAL the two newest are restorable (the WAL is kept from the second
    // newest on); without one only a clean-shutdown checkpoint that is the newest file is.
    let candidates = match durability {
        Durability::Wal => 2,
        Durability::None => 1,
    };
    for (rank, (_, path)) in files.iter().rev().enumerate() {
        let meta = match checkpoint::read_meta(path) {
            Ok(m) => m,
            Err(e) => {
                set_aside(path, &e, metrics);
                continue;
            }
        };
        if rank >= candidates {
            break;
        }
        let usable = match durability {
            Durability::Wal => meta.clean_shutdown || meta.wal_position.is_some(),
            Durability::None => meta.clean_shutdown,
        };
        if !usable {
            tracing::warn!(path = %path.display(), "newest checkpoint was not written by a clean shutdown and there is no WAL: starting every series from zero");
            break;
        }
        let mut states = make_states(meta.state_start_ns);
        match checkpoint::load(path, &mut states) {
            Ok(meta) => {
                let (replay_from, restore_once) = match durability {
                    // A checkpoint without a WAL position was written with `durability: none`,
                    // which removes the WAL at start: any segment now there came after it.
                    Durability::Wal => (Some(meta.wal_position.unwrap_or_default()), None),
                    // A clean checkpoint may be restored once (marked when serving begins).
                    Durability::None => (None, Some(path.clone())),
                };
                tracing::info!(path = %path.display(), series = meta.series, streams = meta.streams, "restored checkpoint");
                metrics.restored_series.set(meta.series as i64);
                return Ok(Restored {
                    states,
                    state_start_ns: meta.state_start_ns,
                    replay_from,
                    checkpoint_ns: meta.created_ns,
                    restore_once,
                });
            }
            Err(e) => set_aside(path, &e, metrics),
        }
    }
    let had_history = !files.is_empty();
    match durability {
        // Nothing was ever checkpointed (so no segment was ever deleted): the whole WAL is the
        // whole history.
        Durability::Wal if !had_history => {
            let start = segments
                .first()
                .and_then(|(_, p)| wal::segment_state_start(p).ok())
                .unwrap_or_else(crate::unix_ns);
            let mut r = fresh(start);
            r.replay_from = Some(Position::default());
            Ok(r)
        }
        _ => {
            if !segments.is_empty() {
                tracing::warn!(segments = segments.len(), "WAL cannot be replayed onto an empty state (the checkpoint it continues is gone): deleting it");
                wal::remove_before(wal_dir, u64::MAX)?;
            }
            // Older checkpoints are stale now; restoring one after the next crash would serve
            // counters below what was scraped.
            for (_, path) in checkpoint::list(checkpoint_dir)? {
                checkpoint::set_aside(&path, ".stale")?;
                tracing::warn!(path = %path.display(), "checkpoint too old to restore exactly: renamed *.stale");
            }
            Ok(fresh(crate::unix_ns()))
        }
    }
}

fn set_aside(path: &Path, e: &CheckpointError, metrics: &StorageMetrics) {
    metrics.checkpoints_set_aside.inc();
    match checkpoint::set_aside(path, ".corrupt") {
        Ok(to) => {
            tracing::error!(path = %path.display(), set_aside_as = %to.display(), error = %e, "unreadable checkpoint set aside")
        }
        Err(re) => {
            tracing::error!(path = %path.display(), error = %e, rename_error = %re, "unreadable checkpoint could not be set aside")
        }
    }
}
