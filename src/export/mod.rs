//! Output edges: the Prometheus/OpenMetrics and Arrow encoders (pure functions over shard state)
//! and the HTTP listener that serves them with our own telemetry and health endpoints.

pub mod arrow;
pub mod http;
pub mod prometheus;
