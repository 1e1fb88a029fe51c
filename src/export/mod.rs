//! Output edges: the Prometheus/OpenMetrics encoders (pure functions over shard state) and the
//! HTTP listener that serves them with our own telemetry and health endpoints.

pub mod http;
pub mod prometheus;
