//! Where a checkpoint's memory is allocated and freed, so that it leaves the process once the
//! checkpoint is written (BENCHMARKS.md, "Where the soak's RSS went").
//!
//! mimalloc returns a page only from the thread that owns it, and only when that thread next
//! calls into the allocator. So each shard's Arrow batches, built on the shard's thread, are
//! handed back to that shard to drop; and the Parquet encoder runs on a thread of its own,
//! whose heap is released when it ends (an idle blocking-pool thread would hold it until the
//! next checkpoint). Both then hand the freed pages to the OS at once (`crate::memory`):
//! mimalloc would otherwise purge them only when the thread next collects.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arrow_array::RecordBatch;

use super::checkpoint::{self, CheckpointError, Meta};
use crate::aggregate::table::Table;

/// One shard's series, stream, and pod rows, in `Table` index order.
pub type ShardBatches = [RecordBatch; 3];

type Written = Result<(PathBuf, u64), CheckpointError>;
type Work = Arc<Mutex<Option<(PathBuf, Meta, Vec<ShardBatches>)>>>;

/// Writes checkpoint `seq` on a thread of its own (on the blocking pool if no thread can be
/// started, rather than failing every checkpoint); gives the batches back with the outcome.
pub async fn write(
    dir: PathBuf,
    seq: u64,
    meta: Meta,
    parts: Vec<ShardBatches>,
) -> Result<(Written, Vec<ShardBatches>), CheckpointError> {
    let work: Work = Arc::new(Mutex::new(Some((dir, meta, parts))));
    let job = move |work: Work| {
        let (dir, meta, parts) = work.lock().ok()?.take()?;
        // Clones share the arrays; the last reference still goes back to its shard.
        let flat: Vec<RecordBatch> = parts.iter().flatten().cloned().collect();
        let written = checkpoint::write(&dir, seq, &meta, &flat);
        drop(flat);
        crate::memory::release_freed();
        Some((written, parts))
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let on_thread = work.clone();
    let spawned = std::thread::Builder::new()
        .name("spanagg-checkpoint".into())
        .spawn(move || {
            let _ = tx.send(job(on_thread));
        });
    let out = match spawned {
        Ok(_) => rx.await.ok().flatten(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the checkpoint thread; using the blocking pool");
            tokio::task::spawn_blocking(move || job(work))
                .await
                .ok()
                .flatten()
        }
    };
    out.ok_or_else(|| CheckpointError::Io(io::Error::other("the checkpoint writer stopped")))
}

/// Drops each shard's batches on that shard's thread. A shard that has stopped cannot take
/// its part; it is then freed wherever the last reference goes.
pub fn drop_on_shards(table: &Table, parts: Vec<ShardBatches>) {
    let slots: Vec<Mutex<Option<ShardBatches>>> =
        parts.into_iter().map(|p| Mutex::new(Some(p))).collect();
    table.visit(move |i, _| {
        if let Some(slot) = slots.get(i) {
            if let Ok(mut part) = slot.lock() {
                if part.take().is_some() {
                    crate::memory::release_freed();
                }
            }
        }
    });
}
