//! Whatever was applied is logged, whatever the reply; nothing new is applied while the log
//! cannot take it.
//!
//! A request is logged after the shards applied it (see `storage::wal`), so a failed append
//! leaves applied points that a scrape may already have served. Such a record is kept here and
//! appended again, first, before any later request is applied; until that succeeds every new
//! export gets a retryable refusal *before* it is applied. So at most the requests in flight
//! when the log failed are applied and not yet logged, and they are logged as soon as it takes
//! writes again (a new segment, space freed). Only a crash while it still cannot leaves them
//! out of the restored state; their clients got a retryable error and send them again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::view::OtlpBody;
use bytes::Bytes;

use super::{IngestError, Logged};
use crate::storage::wal::{
    timed, timed_with, Wal, KIND_METRICS, KIND_METRICS_GZIP, KIND_METRICS_SNAPPY, KIND_METRICS_ZSTD,
};

/// The WAL as the ingest path writes it.
pub struct Durable {
    wal: Arc<Wal>,
    /// Applied requests whose append failed, oldest first.
    unlogged: tokio::sync::Mutex<Vec<(u8, Bytes)>>,
    failing: AtomicBool,
}

impl Durable {
    pub fn new(wal: Arc<Wal>) -> Self {
        Self {
            wal,
            unlogged: Default::default(),
            failing: AtomicBool::new(false),
        }
    }

    /// Call before applying anything: logs what earlier appends could not, and refuses while
    /// it still cannot.
    pub async fn ready(&self) -> Result<(), IngestError> {
        if !self.failing.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut unlogged = self.unlogged.lock().await;
        while let Some((kind, record)) = unlogged.first().cloned() {
            self.wal.append(kind, record).await.map_err(|e| {
                IngestError::NotDurable(format!("the write-ahead log still fails ({e})"))
            })?;
            unlogged.remove(0);
        }
        self.failing.store(false, Ordering::Release);
        tracing::info!("the write-ahead log takes writes again; applied requests all logged");
        Ok(())
    }

    /// Logs a request the shards applied (in part or whole) with the time it was judged by.
    pub async fn log(
        &self,
        req: &OtlpBody,
        raw: Option<Logged>,
        accepted_ns: u64,
    ) -> Result<(), IngestError> {
        let (kind, record) = record(req, raw, accepted_ns);
        match self.wal.append(kind, record.clone()).await {
            Ok(()) => Ok(()),
            Err(e) => {
                // Before waiting for the lock, so no export passes `ready` meanwhile; and again
                // after, so a `ready` that emptied the list meanwhile cannot leave it cleared.
                self.failing.store(true, Ordering::Release);
                let mut unlogged = self.unlogged.lock().await;
                unlogged.push((kind, record));
                self.failing.store(true, Ordering::Release);
                tracing::error!(
                    error = %e,
                    held = unlogged.len(),
                    "write-ahead log append failed: exports are refused until it is logged"
                );
                Err(IngestError::NotDurable(e.to_string()))
            }
        }
    }
}

/// The record the WAL keeps: the acceptance time, then a compressed body as it came, other
/// protobuf Snappy-compressed.
fn record(req: &OtlpBody, raw: Option<Logged>, accepted_ns: u64) -> (u8, Bytes) {
    let raw = raw.unwrap_or_else(|| Logged::Protobuf(req.bytes().clone()));
    match raw {
        Logged::Gzip(b) => timed(KIND_METRICS_GZIP, accepted_ns, &b),
        Logged::Zstd(b) => timed(KIND_METRICS_ZSTD, accepted_ns, &b),
        Logged::SnappyBlock(b) => timed(KIND_METRICS_SNAPPY, accepted_ns, &b),
        Logged::Protobuf(b) => {
            let max = snap::raw::max_compress_len(b.len());
            timed_with(KIND_METRICS_SNAPPY, accepted_ns, max, |out| {
                snap::raw::Encoder::new().compress(&b, out)
            })
            .unwrap_or_else(|_| timed(KIND_METRICS, accepted_ns, &b))
        }
    }
}
