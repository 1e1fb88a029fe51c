//! Output edges: the Prometheus/OpenMetrics and Arrow encoders (pure functions over shard state)
//! and the HTTP listener that serves them with our own telemetry and health endpoints.

pub mod arrow;
pub mod flight;
pub mod gzip_parts;
pub mod http;
pub mod prometheus;
pub mod report;
pub mod scrape_body;

use crate::aggregate::shard::ShardState;
use crate::aggregate::table::Table;

/// Runs `f` on every shard (on the shard threads, in parallel, each between two ingest batches)
/// and returns the results in shard order; `None` if a shard has stopped.
pub async fn gather<R, F>(table: &Table, f: F) -> Option<Vec<R>>
where
    R: Send + 'static,
    F: Fn(&ShardState) -> R + Send + Sync + 'static,
{
    gather_indexed(table, move |_, s| f(s)).await
}

/// Runs `f` on shard `i` (on its thread, between two ingest batches); `None` if it has stopped.
pub async fn gather_one<R, F>(table: &Table, i: usize, f: F) -> Option<R>
where
    R: Send + 'static,
    F: FnOnce(&ShardState) -> R + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    table.visit_one(i, move |s| {
        let _ = tx.send(f(s));
    });
    rx.await.ok()
}

/// [`gather`], with the shard's index passed to `f`.
pub async fn gather_indexed<R, F>(table: &Table, f: F) -> Option<Vec<R>>
where
    R: Send + 'static,
    F: Fn(usize, &ShardState) -> R + Send + Sync + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let n = table.len();
    table.visit(move |i, s| {
        let _ = tx.send((i, f(i, s)));
    });
    let mut out: Vec<Option<R>> = (0..n).map(|_| None).collect();
    for _ in 0..n {
        let (i, r) = rx.recv().await?;
        if let Some(slot) = out.get_mut(i) {
            *slot = Some(r);
        }
    }
    out.into_iter().collect()
}
