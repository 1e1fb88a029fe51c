//! What a shard is told: the settings every shard shares, and which series a read covers.

use std::collections::HashMap;
use std::sync::Arc;

use crate::aggregate::key::{FamilyDesc, Kind};
use crate::aggregate::quota::SeriesQuota;

use super::ShardLimits;

/// Which series a read (snapshot, report) covers.
#[derive(Debug, Clone, Default)]
pub struct SeriesFilter {
    /// Only series whose `service_name` label equals this.
    pub service: Option<String>,
    /// Only series of this metric: its OTel name, its Prometheus family name, or a sample name
    /// as scraped (`…_total`, `…_bucket`, `…_sum`, `…_count`, `…_created`).
    pub metric: Option<String>,
}

impl SeriesFilter {
    /// Whether series of `family` pass the metric part of the filter.
    pub fn takes(&self, family: &FamilyDesc) -> bool {
        let Some(m) = self.metric.as_deref() else {
            return true;
        };
        if m == &*family.name || m == &*family.otel_name {
            return true;
        }
        let Some(suffix) = m.strip_prefix(&*family.name) else {
            return false;
        };
        match family.kind {
            Kind::Counter => matches!(suffix, "_total" | "_created"),
            Kind::Histogram => matches!(suffix, "_bucket" | "_sum" | "_count" | "_created"),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metric_filter_takes_every_name_a_user_sees() {
        let family = |name: &str, kind| FamilyDesc {
            name: name.into(),
            kind,
            otel_name: "traces.span.metrics.calls".into(),
            unit: "".into(),
            help: "".into(),
        };
        let calls = family("traces_span_metrics_calls", Kind::Counter);
        let hist = family("traces_span_metrics_duration_milliseconds", Kind::Histogram);
        let filter = |m: &str| SeriesFilter {
            metric: Some(m.into()),
            ..SeriesFilter::default()
        };
        for m in [
            "traces_span_metrics_calls",
            "traces_span_metrics_calls_total",
            "traces.span.metrics.calls",
        ] {
            assert!(filter(m).takes(&calls), "{m}");
        }
        assert!(!filter("traces_span_metrics_calls_bucket").takes(&calls));
        assert!(!filter("traces_span_metrics_call").takes(&calls));
        assert!(filter("traces_span_metrics_duration_milliseconds_bucket").takes(&hist));
        assert!(filter("traces_span_metrics_duration_milliseconds_count").takes(&hist));
        assert!(!filter("traces_span_metrics_duration_milliseconds_total").takes(&hist));
        assert!(SeriesFilter::default().takes(&hist));
    }
}
