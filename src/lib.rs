//! spanagg: a cluster-level aggregator for OpenTelemetry span metrics.
//!
//! Sidecars push span-metric deltas over OTLP; spanagg merges them exactly across pods in
//! single-writer shards and serves one series per service/route on a Prometheus endpoint.
//! `aggregate` is the synchronous core; `ingest` and `export` are the async edges around it;
//! `storage` keeps the WAL and Parquet checkpoints; `server` wires them together. See `ARCHITECTURE.md` for one point's path through it.

pub mod aggregate;
pub mod auth;
pub mod cardinality;
pub mod columnar;
pub mod config;
pub mod export;
#[doc(hidden)]
pub mod fuzzing;
pub mod ingest;
pub mod listen;
pub mod memory;
pub mod server;
pub mod storage;
pub mod telemetry;
pub mod tls;
pub mod workload;

/// Wall-clock time as Unix nanoseconds (0 before 1970, saturating far in the future).
pub fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos().min(u128::from(u64::MAX)) as u64)
}
