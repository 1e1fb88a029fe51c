//! Where a checkpoint's memory is allocated and freed, so that its peak is one part of one
//! shard and it leaves the process once the checkpoint is written (BENCHMARKS.md, "Where the
//! soak's RSS went", "The checkpoint's peak at 5,000 pods", "A checkpoint in parts").
//!
//! Shards are read one after another, each in parts (`Part`): a part's Arrow batches are built
//! on its shard's thread, the writer encodes them, and they go back to that shard to drop
//! before the next part is read. So a checkpoint holds one part at a time, not the whole state.
//! Why reading at different instants is exact: `checkpoint_inner` in `storage/mod.rs`.
//!
//! mimalloc returns a page only from the thread that owns it, and only when that thread next
//! calls into the allocator; hence batches dropped on the shard that built them. The Parquet
//! encoder runs on a thread of its own, whose heap is released when it ends (an idle
//! blocking-pool thread would hold it until the next checkpoint). Both then hand the freed
//! pages to the OS at once (`crate::memory`): mimalloc would otherwise purge them only when
//! the thread next collects.

use std::io;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Mutex;

use arrow_array::RecordBatch;
use tokio::sync::oneshot;

use super::checkpoint::{CheckpointError, FileWriter, Meta};

/// One part of a shard: its series, stream, and pod and overflow-mark rows.
pub type ShardBatches = [RecordBatch; 3];

type Written = Result<(PathBuf, u64), CheckpointError>;

enum Msg {
    Part(
        ShardBatches,
        oneshot::Sender<(ShardBatches, Result<(), CheckpointError>)>,
    ),
    Finish(Box<Meta>, oneshot::Sender<Written>),
}

/// Checkpoint `seq`, written part by part on a thread of its own. Dropped before
/// [`finish`](Self::finish), the file is abandoned and removed.
pub struct Writer {
    tx: mpsc::Sender<Msg>,
}

fn stopped() -> CheckpointError {
    CheckpointError::Io(io::Error::other("the checkpoint writer stopped"))
}

impl Writer {
    /// Starts the writer thread (the blocking pool if no thread can be started, rather than
    /// failing every checkpoint); the file is created there.
    pub fn start(dir: PathBuf, seq: u64) -> Self {
        let (tx, rx) = mpsc::channel();
        let work = move || run(dir, seq, rx);
        let slot = std::sync::Arc::new(Mutex::new(Some(work)));
        let on_thread = slot.clone();
        let spawned = std::thread::Builder::new()
            .name("spanagg-checkpoint".into())
            .spawn(move || take_and_run(&on_thread));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the checkpoint thread; using the blocking pool");
            tokio::task::spawn_blocking(move || take_and_run(&slot));
        }
        Self { tx }
    }

    /// Writes one part and gives it back, to be dropped on its shard.
    pub async fn write(
        &self,
        part: ShardBatches,
    ) -> Result<(ShardBatches, Result<(), CheckpointError>), CheckpointError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Part(part, reply))
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())
    }

    /// Writes the footer and gives the file its final name.
    pub async fn finish(self, meta: Meta) -> Written {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Finish(Box::new(meta), reply))
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

fn take_and_run<F: FnOnce()>(slot: &Mutex<Option<F>>) {
    let work = slot.lock().ok().and_then(|mut w| w.take());
    if let Some(work) = work {
        work();
    }
}

fn run(dir: PathBuf, seq: u64, rx: mpsc::Receiver<Msg>) {
    let mut file = match FileWriter::create(&dir, seq) {
        Ok(f) => f,
        Err(e) => {
            // The caller hears of it at its first request, and stops there.
            match rx.recv() {
                Ok(Msg::Part(part, reply)) => drop(reply.send((part, Err(e)))),
                Ok(Msg::Finish(_, reply)) => drop(reply.send(Err(e))),
                Err(_) => {}
            }
            return;
        }
    };
    // Ends when the checkpoint is finished, fails, or is abandoned (the sender dropped); an
    // unfinished file removes itself when dropped.
    while let Ok(msg) = rx.recv() {
        match msg {
            Msg::Part(part, reply) => {
                let written = part.iter().try_for_each(|b| file.write(b));
                let failed = written.is_err();
                let _ = reply.send((part, written));
                if failed {
                    return;
                }
            }
            Msg::Finish(meta, reply) => {
                let written = file.finish(&meta);
                crate::memory::release_freed();
                let _ = reply.send(written);
                return;
            }
        }
    }
}
