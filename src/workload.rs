//! Synthetic spanmetrics-shaped workloads for the load generator and the benchmarks: what one
//! pod's `spanmetrics` connector sends for one interval (a calls counter and a duration
//! histogram per route), with deterministic values so totals are known.

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric::Data, number_data_point, AggregationTemporality, Histogram, HistogramDataPoint, Metric,
    NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use std::sync::Arc;

pub mod sender;

use crate::aggregate::shard::Batch;
use crate::ingest::otlp::{prepare, InputLimits, Projection, RequestLabels};
use crate::ingest::view::OtlpBody;

/// Shape of the generated load.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Distinct services (routes are spread over them).
    pub services: usize,
    /// Routes (span names) per pod and interval.
    pub routes: usize,
    /// Explicit bucket bounds per histogram (buckets = bounds + 1).
    pub bounds: usize,
    /// Whether to include the calls counter next to each histogram.
    pub counters: bool,
}

/// A string attribute.
pub fn kv(k: &str, v: impl Into<String>) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.into())),
        }),
        ..Default::default()
    }
}

/// `n` bounds growing by half each: 1, 1.5, 2.25, … milliseconds.
pub fn bounds(n: usize) -> Vec<f64> {
    (0..n).map(|i| 1.5f64.powi(i as i32)).collect()
}

/// Data points in one request of `shape`.
pub fn points_per_request(shape: &Shape) -> usize {
    shape.routes * if shape.counters { 2 } else { 1 }
}

/// One pod's delta for interval `[start, end)`. Pod `p` belongs to service `p % services`, so
/// pods of one service merge: output series = services × routes per metric. Every histogram point has 5 attributes
/// (service.name, span.name, span.kind, status.code, service.instance.id) and `bounds + 1`
/// buckets, each bucket count 1; every calls point has value 1 per bucket.
pub fn request(shape: &Shape, pod: usize, start: u64, end: u64) -> ExportMetricsServiceRequest {
    let b = bounds(shape.bounds);
    let service = format!("service-{}", pod % shape.services.max(1));
    let attrs = |r: usize| {
        vec![
            kv("service.name", service.clone()),
            kv("span.name", format!("GET /api/v1/route/{r}")),
            kv("span.kind", "SPAN_KIND_SERVER"),
            kv("status.code", "STATUS_CODE_UNSET"),
            kv("service.instance.id", format!("pod-{pod}")),
        ]
    };
    let hist = Metric {
        name: "traces.span.metrics.duration".into(),
        unit: "ms".into(),
        data: Some(Data::Histogram(Histogram {
            data_points: (0..shape.routes)
                .map(|r| HistogramDataPoint {
                    attributes: attrs(r),
                    start_time_unix_nano: start,
                    time_unix_nano: end,
                    count: b.len() as u64 + 1,
                    sum: Some(b.iter().sum::<f64>() + 1.0),
                    bucket_counts: vec![1; b.len() + 1],
                    explicit_bounds: b.clone(),
                    ..Default::default()
                })
                .collect(),
            aggregation_temporality: AggregationTemporality::Delta as i32,
        })),
        ..Default::default()
    };
    let mut metrics = vec![hist];
    if shape.counters {
        metrics.push(Metric {
            name: "traces.span.metrics.calls".into(),
            data: Some(Data::Sum(Sum {
                data_points: (0..shape.routes)
                    .map(|r| NumberDataPoint {
                        attributes: attrs(r),
                        start_time_unix_nano: start,
                        time_unix_nano: end,
                        value: Some(number_data_point::Value::AsInt(b.len() as i64 + 1)),
                        ..Default::default()
                    })
                    .collect(),
                aggregation_temporality: AggregationTemporality::Delta as i32,
                is_monotonic: true,
            })),
            ..Default::default()
        });
    }
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![
                    kv("service.name", service.clone()),
                    kv("k8s.pod.name", format!("pod-{pod}")),
                ],
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: "spanmetricsconnector".into(),
                    ..Default::default()
                }),
                metrics,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// Marks every metric of `req` cumulative (its values then read as running totals).
pub fn make_cumulative(req: &mut ExportMetricsServiceRequest) {
    let cumulative = AggregationTemporality::Cumulative as i32;
    for m in req
        .resource_metrics
        .iter_mut()
        .flat_map(|rm| rm.scope_metrics.iter_mut())
        .flat_map(|sm| sm.metrics.iter_mut())
    {
        match m.data.as_mut() {
            Some(Data::Histogram(h)) => h.aggregation_temporality = cumulative,
            Some(Data::Sum(x)) => x.aggregation_temporality = cumulative,
            _ => {}
        }
    }
}

/// The whole request as one shard's batch, for driving a `ShardState` directly (benchmarks and
/// the memory example); nobody waits for its result.
pub fn single_shard_batch(req: impl Into<OtlpBody>, projection: &Arc<Projection>) -> Batch {
    single_shard_batch_at(&req.into(), projection, crate::unix_ns(), None)
}

/// [`single_shard_batch`] judged at `now_ns`; `at` is the batch's own clock (a replay's), if any.
pub fn single_shard_batch_at(
    req: &OtlpBody,
    projection: &Arc<Projection>,
    now_ns: u64,
    at: Option<u64>,
) -> Batch {
    let p = prepare(req, projection, &InputLimits::default(), now_ns, 1, |_| 0);
    let part = p.per_shard.into_iter().next().unwrap_or_default();
    Batch {
        families: p.families,
        layouts: p.layouts,
        counts: part.counts,
        points: part.points,
        labels: Arc::new(RequestLabels {
            body: req.clone(),
            resources: p.resources,
            projection: projection.clone(),
        }),
        overflow: false,
        now_ns: at,
        done: Box::new(|_| {}),
    }
}
