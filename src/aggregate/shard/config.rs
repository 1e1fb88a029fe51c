//! What a shard is told: the settings every shard shares, and which series a read covers.

use std::collections::HashMap;
use std::sync::Arc;

use crate::aggregate::quota::SeriesQuota;

use super::ShardLimits;

/// Which series a read (snapshot, report) covers.
#[derive(Debug, Clone, Default)]
pub struct SeriesFilter {
    /// Only series whose `service_name` label equals this.
    pub service: Option<String>,
    /// Only series whose Prometheus family name or OTel metric name equals this.
    pub metric: Option<String>,
}

/// Settings every shard shares.
#[derive(Debug, Clone)]
pub struct ShardConfig {
    pub late_ns: u64,
    pub ttl_secs: u32,
    /// Cumulative streams that started before this are only baselined (`initial_value: auto`).
    pub process_start_ns: u64,
    /// Configured output bounds by OTel metric name.
    pub bounds: HashMap<String, Arc<[f64]>>,
    /// This shard's share of the cardinality budgets (source streams; the series shares are
    /// what reports show per shard).
    pub limits: ShardLimits,
    /// Metric families one shard interns; a point of a new family past it is refused.
    pub max_families: usize,
    /// The series budgets all shards draw from.
    pub quota: Arc<SeriesQuota>,
}

impl Default for ShardConfig {
    /// The built-in config's windows (late 10m, TTL 15m), no configured bounds, no limits, and
    /// a state that began at the epoch: what benchmarks and tests build shards with.
    fn default() -> Self {
        Self {
            late_ns: 600_000_000_000,
            ttl_secs: 900,
            process_start_ns: 0,
            bounds: HashMap::new(),
            limits: ShardLimits::default(),
            max_families: usize::MAX,
            quota: Arc::new(SeriesQuota::default()),
        }
    }
}
