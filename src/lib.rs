//! spanagg: a cluster-level aggregator for OpenTelemetry span metrics.
//!
//! Sidecars push span-metric deltas over OTLP; spanagg merges them exactly across pods in
//! single-writer shards and serves one series per service/route on a Prometheus endpoint.
//! `aggregate` is the synchronous core; `ingest` and `export` are the async edges around it;
//! `storage` keeps the WAL and Parquet checkpoints; `server` wires them together. See `ARCHITECTURE.md` for one point's path through it.

pub mod aggregate;
pub mod cardinality;
pub mod config;
pub mod export;
pub mod ingest;
pub mod server;
pub mod storage;
pub mod telemetry;
pub mod workload;
