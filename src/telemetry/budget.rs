//! Budget and per-service self metrics: overflowed points, refusals by limit, and per-service
//! series and streams (the top services by series plus one `other` line, so the label set stays
//! bounded however many services send), with their budget usage.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::aggregate::table::ShardStats;
use crate::config::Limits;

/// Services named in per-service metrics; the rest add up under `service="other"`.
pub const TOP_SERVICES: usize = 20;

/// Which limit refused an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    Memory = 0,
    SourceStreams,
    DecodeMemory,
}

impl LimitKind {
    const ALL: [LimitKind; 3] = [Self::Memory, Self::SourceStreams, Self::DecodeMemory];
    fn as_str(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::SourceStreams => "source_streams",
            Self::DecodeMemory => "decode_memory",
        }
    }
}

type Labels = Vec<(&'static str, &'static str)>;

/// Counters the ingest path bumps.
pub struct BudgetMetrics {
    pub overflowed: Counter,
    refusals: Vec<Counter>,
    /// Bytes of `limits.max_decode_memory` held by requests being decoded and applied.
    pub decode_memory: prometheus_client::metrics::gauge::Gauge,
}

impl BudgetMetrics {
    pub fn register(r: &mut Registry, shards: Vec<Arc<ShardStats>>, limits: Limits) -> Self {
        let overflowed = Counter::default();
        r.register(
            "points_overflowed",
            "Points merged into their service's overflow series because a new series would \
             exceed limits.max_series_per_service or limits.max_series",
            overflowed.clone(),
        );
        let fam = Family::<Labels, Counter>::default();
        r.register(
            "limit_refusals",
            "Exports refused with a retryable error by a limit (memory, source_streams, \
             decode_memory)",
            fam.clone(),
        );
        let refusals = LimitKind::ALL
            .iter()
            .map(|k| fam.get_or_create(&vec![("limit", k.as_str())]).clone())
            .collect();
        let decode_memory = prometheus_client::metrics::gauge::Gauge::default();
        r.register(
            "decode_memory_in_use_bytes",
            "Bytes of limits.max_decode_memory held by requests being decoded and applied",
            decode_memory.clone(),
        );
        r.register_collector(Box::new(ServiceCollector { shards, limits }));
        Self {
            overflowed,
            refusals,
            decode_memory,
        }
    }

    pub fn refused(&self, k: LimitKind) {
        if let Some(c) = self.refusals.get(k as usize) {
            c.inc();
        }
    }
}

#[derive(Debug)]
struct ServiceCollector {
    shards: Vec<Arc<ShardStats>>,
    limits: Limits,
}

fn ratio(v: u64, limit: u64) -> f64 {
    v as f64 / limit.max(1) as f64
}

impl prometheus_client::collector::Collector for ServiceCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut by: HashMap<Box<str>, (u64, u64)> = HashMap::new();
        for s in &self.shards {
            if let Ok(lines) = s.services.lock() {
                for l in lines.iter() {
                    let e = by.entry(l.service.clone()).or_default();
                    e.0 += l.series;
                    e.1 += l.streams;
                }
            }
        }
        let mut rows: Vec<(Box<str>, (u64, u64))> = by.into_iter().collect();
        rows.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then_with(|| a.0.cmp(&b.0)));
        let rest = rows.split_off(rows.len().min(TOP_SERVICES));
        let other = rest
            .iter()
            .fold((0, 0), |acc, (_, (s, t))| (acc.0 + s, acc.1 + t));
        let mut named: Vec<(&str, (u64, u64))> = rows.iter().map(|(k, v)| (&**k, *v)).collect();
        if !rest.is_empty() {
            named.push(("other", other));
        }
        type Pick = fn((u64, u64)) -> u64;
        let per_service: [(&str, &str, Pick); 2] = [
            (
                "service_series",
                "Output series per service (top services by series, the rest as other)",
                |v| v.0,
            ),
            (
                "service_source_streams",
                "Source streams feeding each service's series (top services, the rest as other)",
                |v| v.1,
            ),
        ];
        for (name, help, pick) in per_service {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (service, v) in &named {
                let label = [("service", *service)];
                let fam = m.encode_family(&label)?;
                ConstGauge::new(pick(*v) as i64).encode(fam)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "service_budget_usage_ratio",
            "Output series of each top service over limits.max_series_per_service",
            None,
            MetricType::Gauge,
        )?;
        for (service, (series, _)) in rows.iter().map(|(k, v)| (&**k, v)) {
            let label = [("service", service)];
            let fam = m.encode_family(&label)?;
            ConstGauge::new(ratio(*series, self.limits.max_series_per_service)).encode(fam)?;
        }
        let total = |f: fn(&ShardStats) -> u64| self.shards.iter().map(|s| f(s)).sum::<u64>();
        let mut m = encoder.encode_descriptor(
            "budget_usage_ratio",
            "Use of the global budgets: series over limits.max_series, source_streams over \
             limits.max_source_streams",
            None,
            MetricType::Gauge,
        )?;
        let series = total(|s| s.series.load(Ordering::Relaxed));
        let streams = total(|s| s.sources.load(Ordering::Relaxed));
        for (budget, v) in [
            ("series", ratio(series, self.limits.max_series)),
            (
                "source_streams",
                ratio(streams, self.limits.max_source_streams),
            ),
        ] {
            let label = [("budget", budget)];
            let fam = m.encode_family(&label)?;
            ConstGauge::new(v).encode(fam)?;
        }
        Ok(())
    }
}
