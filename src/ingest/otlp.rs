//! OTLP metrics → core points: validation, normalisation, projection and keying. Everything a
//! client sends is checked here, before it can reach a shard; a bad point is rejected with a
//! reason and never stops the rest of its request.

use std::collections::HashMap;
use std::sync::Arc;

use ahash::RandomState;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::metrics::v1::{
    metric::Data, number_data_point, AggregationTemporality, HistogramDataPoint, Metric,
    NumberDataPoint,
};

pub use super::labels::{value_str, Projection, Relabeled, RequestLabels};
use super::labels::{AttributeLimits, Keyer, ResourcePart};
pub use super::reason::{Reason, Rejections};
use crate::aggregate::batch::LabelRef;
use crate::aggregate::key::{source_seed, FamilyDesc, Kind, SetHash};
use crate::aggregate::layout::{BucketLayout, LayoutError};
use crate::aggregate::naming::family_name;
use crate::aggregate::series::{fingerprint, Point, PointValue, Temporality};

/// What one data point may cost, and how far ahead of the server clock it may end. The
/// defaults never touch what the `spanmetrics` connector sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputLimits {
    pub attributes: AttributeLimits,
    /// Bytes of a metric's name and unit together.
    pub max_metric_name_len: usize,
    /// Buckets (bounds + 1) of one histogram point.
    pub max_buckets: usize,
    /// A point ending later than the server clock plus this is refused as `future`.
    pub max_future_skew_ns: u64,
    /// Data points in one request; more is refused for good (413 / RESOURCE_EXHAUSTED).
    pub max_points_per_request: u64,
    /// Bytes all requests being decoded and applied may hold at once (see `admit`).
    pub max_decode_memory: u64,
}

impl Default for InputLimits {
    fn default() -> Self {
        Self {
            attributes: AttributeLimits {
                max_attributes: 128,
                max_name_len: 256,
                max_value_len: 4096,
            },
            max_metric_name_len: 512,
            max_buckets: 512,
            max_future_skew_ns: 10 * 60 * 1_000_000_000,
            max_points_per_request: 100_000,
            max_decode_memory: 512 << 20,
        }
    }
}

/// Help text kept per family: longer descriptions are cut (at a character boundary).
const MAX_HELP_LEN: usize = 1024;

/// Points of one request for one shard.
#[derive(Debug, Default)]
pub struct ShardPoints {
    pub counts: Vec<u64>,
    pub points: Vec<Point>,
}

/// A request validated, keyed and split by shard.
#[derive(Debug)]
pub struct Prepared {
    pub families: Arc<[FamilyDesc]>,
    pub layouts: Arc<[Arc<[f64]>]>,
    pub per_shard: Vec<ShardPoints>,
    pub rejections: Rejections,
    /// Points whose attributes were renamed or joined on the way to labels.
    pub relabeled: Relabeled,
    /// Points skipped because their flags say no value was recorded.
    pub no_value: u64,
    pub received: u64,
}

/// Validates and keys every point of `req`, judging timestamps against `now_ns`. `shard_of`
/// routes an output key to its shard.
pub fn prepare(
    req: &ExportMetricsServiceRequest,
    projection: &Projection,
    limits: &InputLimits,
    now_ns: u64,
    shards: usize,
    shard_of: impl Fn(u128) -> usize,
) -> Prepared {
    let mut out = Prep {
        families: Vec::new(),
        family_index: HashMap::default(),
        layouts: Vec::new(),
        per_shard: (0..shards).map(|_| ShardPoints::default()).collect(),
        rej: Rejections::default(),
        no_value: 0,
        received: 0,
    };
    let mut keyer = Keyer::new(projection, limits.attributes);
    let mut buf = String::new();
    let latest_end = now_ns.saturating_add(limits.max_future_skew_ns);

    for (ri, rm) in req.resource_metrics.iter().enumerate() {
        let resource: &[KeyValue] = rm.resource.as_ref().map_or(&[], |r| &r.attributes[..]);
        let mut identity = SetHash::default();
        for kv in resource {
            identity.add(&kv.key, value_str(kv.value.as_ref(), &mut buf));
        }
        let kept = projection.kept_resource(resource);
        // Built on first use: a `by` attribute named `le` is renamed on histograms only.
        let mut parts: [Option<ResourcePart>; 2] = [None, None];
        for (si, sm) in rm.scope_metrics.iter().enumerate() {
            let scope = sm.scope.as_ref().map_or("", |s| &s.name[..]);
            for (mi, m) in sm.metrics.iter().enumerate() {
                let Some((kind, temporality, n)) = out.classify(m) else {
                    continue;
                };
                let histogram = kind == Kind::Histogram;
                if m.name.len() + m.unit.len() > limits.max_metric_name_len {
                    out.rej.add(Reason::NameTooLong, n);
                    continue;
                }
                if m.name.is_empty() {
                    out.rej.add(Reason::MissingName, n);
                    continue;
                }
                let Some(temporality) = temporality else {
                    out.rej.add(Reason::UnspecifiedTemporality, n);
                    continue;
                };
                let family = out.family_index(m, kind);
                let desc = &out.families[family as usize];
                let res = parts[usize::from(histogram)]
                    .get_or_insert_with(|| keyer.resource(&kept, histogram));
                let ctx = MetricCtx {
                    kept: &kept,
                    res,
                    histogram,
                    seeds: (desc.key_seed(), source_seed(identity, scope, desc)),
                    resource: identity.finish(0) as u64,
                    family,
                    temporality,
                    at: [ri as u32, si as u32, mi as u32],
                    latest_end,
                    max_buckets: limits.max_buckets,
                };
                match &m.data {
                    Some(Data::Sum(s)) => {
                        for (pi, p) in s.data_points.iter().enumerate() {
                            match number_point(p, &ctx, pi, &mut keyer) {
                                Ok(Some(point)) => {
                                    if let Some(t) = out.per_shard.get_mut(shard_of(point.series)) {
                                        t.points.push(point);
                                    }
                                }
                                Ok(None) => out.no_value += 1,
                                Err(r) => out.rej.add(r, 1),
                            }
                        }
                    }
                    Some(Data::Histogram(h)) => {
                        for (pi, p) in h.data_points.iter().enumerate() {
                            if let Err(r) =
                                histogram_point(p, &ctx, pi, &mut keyer, &mut out, &shard_of)
                            {
                                out.rej.add(r, 1);
                            } else if p.flags & 1 == 1 {
                                out.no_value += 1;
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    Prepared {
        families: out.families.into(),
        layouts: out.layouts.into(),
        per_shard: out.per_shard,
        rejections: out.rej,
        relabeled: keyer.relabeled,
        no_value: out.no_value,
        received: out.received,
    }
}

/// Data points in a request, whatever their kind.
pub fn count_points(req: &ExportMetricsServiceRequest) -> u64 {
    req.resource_metrics
        .iter()
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics)
        .map(points_of)
        .sum()
}

/// Data points a metric carries, whatever its kind.
fn points_of(m: &Metric) -> u64 {
    (match &m.data {
        Some(Data::Sum(s)) => s.data_points.len(),
        Some(Data::Histogram(h)) => h.data_points.len(),
        Some(Data::Gauge(g)) => g.data_points.len(),
        Some(Data::Summary(s)) => s.data_points.len(),
        Some(Data::ExponentialHistogram(e)) => e.data_points.len(),
        None => 0,
    }) as u64
}

/// A request being prepared.
struct Prep<'r> {
    families: Vec<FamilyDesc>,
    /// (name, unit, kind) → index into `families`: one lookup per metric, whatever the count.
    family_index: HashMap<(&'r str, &'r str, Kind), u32, RandomState>,
    layouts: Vec<Arc<[f64]>>,
    per_shard: Vec<ShardPoints>,
    rej: Rejections,
    no_value: u64,
    received: u64,
}

impl<'r> Prep<'r> {
    /// Counts a metric's points as received; the kinds spanagg aggregates come back with their
    /// temporality (`None` when unspecified), the others are rejected here.
    fn classify(&mut self, m: &Metric) -> Option<(Kind, Option<Temporality>, u64)> {
        let n = points_of(m);
        self.received += n;
        let (kind, t) = match &m.data {
            Some(Data::Sum(s)) if s.is_monotonic => (Kind::Counter, s.aggregation_temporality),
            Some(Data::Histogram(h)) => (Kind::Histogram, h.aggregation_temporality),
            Some(data) => {
                let reason = match data {
                    Data::Sum(_) => Reason::NonMonotonicSum,
                    Data::Gauge(_) => Reason::Gauge,
                    Data::Summary(_) => Reason::Summary,
                    _ => Reason::ExponentialHistogram,
                };
                self.rej.add(reason, n);
                return None;
            }
            None => return None,
        };
        let t = if t == AggregationTemporality::Delta as i32 {
            Some(Temporality::Delta)
        } else if t == AggregationTemporality::Cumulative as i32 {
            Some(Temporality::Cumulative)
        } else {
            None
        };
        Some((kind, t, n))
    }

    fn family_index(&mut self, m: &'r Metric, kind: Kind) -> u32 {
        let key = (m.name.as_str(), m.unit.as_str(), kind);
        if let Some(&i) = self.family_index.get(&key) {
            return i;
        }
        let mut help = if m.description.is_empty() {
            format!("{} (OTel), merged across instances by spanagg", m.name)
        } else {
            m.description.clone()
        };
        if help.len() > MAX_HELP_LEN {
            let mut cut = MAX_HELP_LEN;
            while !help.is_char_boundary(cut) {
                cut -= 1;
            }
            help.truncate(cut);
        }
        self.families.push(FamilyDesc {
            name: family_name(&m.name, &m.unit).into(),
            kind,
            otel_name: m.name.as_str().into(),
            unit: m.unit.as_str().into(),
            help: help.into(),
        });
        let i = (self.families.len() - 1) as u32;
        self.family_index.insert(key, i);
        i
    }

    /// Index of `bounds` in the request's layouts. Only the previous layout is reused: a search
    /// over all would let one hostile request cost quadratic time; shards intern by value.
    fn layout(&mut self, bounds: &[f64]) -> u32 {
        match self.layouts.last() {
            Some(l) if **l == *bounds => {}
            _ => self.layouts.push(bounds.into()),
        }
        (self.layouts.len() - 1) as u32
    }
}

struct MetricCtx<'a> {
    /// The kept resource attributes and their hashed form.
    kept: &'a [&'a KeyValue],
    res: &'a ResourcePart,
    histogram: bool,
    /// (output key seed, source key seed).
    seeds: (u64, u64),
    /// The resource identity (the pod), as points carry it.
    resource: u64,
    family: u32,
    temporality: Temporality,
    /// The metric's indexes in the request (resource, scope, metric), for its points' labels.
    at: [u32; 3],
    /// Points ending after this are refused as `future`.
    latest_end: u64,
    max_buckets: usize,
}

impl MetricCtx<'_> {
    /// The label handle of the metric's point `pi`.
    fn label_ref(&self, pi: usize) -> LabelRef {
        let [resource, scope, metric] = self.at;
        LabelRef::Otlp {
            resource,
            scope,
            metric,
            point: pi as u32,
        }
    }
}

/// Checks timestamps and computes (output key, source key). Timestamps first: a point from a
/// broken clock is refused before anything else is looked at.
fn keys<'r>(
    ctx: &MetricCtx<'_>,
    keyer: &mut Keyer<'r>,
    attrs: &'r [KeyValue],
    start: u64,
    end: u64,
) -> Result<(u128, u128), Reason> {
    if start == 0 || end == 0 {
        return Err(Reason::ZeroTimestamp);
    }
    let bad_interval = match ctx.temporality {
        Temporality::Delta => start >= end,
        Temporality::Cumulative => start > end,
    };
    if bad_interval {
        return Err(Reason::InvalidInterval);
    }
    if end > ctx.latest_end {
        return Err(Reason::Future);
    }
    keyer.point(ctx.res, ctx.kept, attrs, ctx.histogram, ctx.seeds)
}

fn number_point<'r>(
    p: &'r NumberDataPoint,
    ctx: &MetricCtx<'_>,
    pi: usize,
    keyer: &mut Keyer<'r>,
) -> Result<Option<Point>, Reason> {
    if p.flags & 1 == 1 {
        return Ok(None);
    }
    let value = match p.value {
        Some(number_data_point::Value::AsInt(i)) => {
            PointValue::Int(u64::try_from(i).map_err(|_| Reason::InvalidValue)?)
        }
        Some(number_data_point::Value::AsDouble(d)) => {
            if !d.is_finite() {
                return Err(Reason::NonFinite);
            }
            if d < 0.0 {
                return Err(Reason::InvalidValue);
            }
            PointValue::Float(d)
        }
        None => return Err(Reason::MissingValue),
    };
    let (series, source) = keys(
        ctx,
        keyer,
        &p.attributes,
        p.start_time_unix_nano,
        p.time_unix_nano,
    )?;
    let label_ref = ctx.label_ref(pi);
    let fp = fingerprint(std::iter::once(match value {
        PointValue::Int(i) => i,
        PointValue::Float(f) => f.to_bits() ^ 1 << 63,
        PointValue::Histogram { .. } => 0,
    }));
    Ok(Some(Point {
        fp,
        series,
        source,
        resource: ctx.resource,
        family: ctx.family,
        label_ref,
        start_ns: p.start_time_unix_nano,
        end_ns: p.time_unix_nano,
        temporality: ctx.temporality,
        value,
    }))
}

/// Checks a histogram point's shape and numbers; returns its sum.
fn check_histogram(p: &HistogramDataPoint, max_buckets: usize) -> Result<f64, Reason> {
    if p.bucket_counts.len() > max_buckets || p.explicit_bounds.len() >= max_buckets {
        return Err(Reason::TooManyBuckets);
    }
    BucketLayout::check(&p.explicit_bounds).map_err(|e| match e {
        LayoutError::NotFinite => Reason::NonFinite,
        _ => Reason::InvalidBounds,
    })?;
    if p.bucket_counts.len() != p.explicit_bounds.len() + 1 {
        return Err(Reason::BucketCountMismatch);
    }
    let total = p
        .bucket_counts
        .iter()
        .try_fold(0u64, |acc, c| acc.checked_add(*c))
        .ok_or(Reason::CountMismatch)?;
    if total != p.count {
        return Err(Reason::CountMismatch);
    }
    match p.sum {
        None => Err(Reason::InvalidSum),
        Some(s) if !s.is_finite() => Err(Reason::NonFinite),
        // `-0.0 < 0.0` is false: a negative zero is a zero.
        Some(s) if s < 0.0 => Err(Reason::NegativeSum),
        Some(s) if p.count == 0 && s != 0.0 => Err(Reason::SumWithoutCount),
        Some(s) => Ok(s + 0.0),
    }
}

fn histogram_point<'r>(
    p: &'r HistogramDataPoint,
    ctx: &MetricCtx<'_>,
    pi: usize,
    keyer: &mut Keyer<'r>,
    out: &mut Prep<'_>,
    shard_of: &impl Fn(u128) -> usize,
) -> Result<(), Reason> {
    if p.flags & 1 == 1 {
        return Ok(());
    }
    let sum = check_histogram(p, ctx.max_buckets)?;
    let (series, source) = keys(
        ctx,
        keyer,
        &p.attributes,
        p.start_time_unix_nano,
        p.time_unix_nano,
    )?;
    let layout = out.layout(&p.explicit_bounds);
    let target = out
        .per_shard
        .get_mut(shard_of(series))
        .ok_or(Reason::InvalidValue)?;
    let from = target.counts.len() as u32;
    target.counts.extend_from_slice(&p.bucket_counts);
    let to = target.counts.len() as u32;
    let label_ref = ctx.label_ref(pi);
    // The count, the sum and the first and last buckets tell two writers' values apart.
    let fp = fingerprint(
        [
            p.count,
            sum.to_bits(),
            p.bucket_counts.first().copied().unwrap_or(0),
            p.bucket_counts.last().copied().unwrap_or(0),
        ]
        .into_iter(),
    );
    target.points.push(Point {
        fp,
        series,
        source,
        resource: ctx.resource,
        family: ctx.family,
        label_ref,
        start_ns: p.start_time_unix_nano,
        end_ns: p.time_unix_nano,
        temporality: ctx.temporality,
        value: PointValue::Histogram {
            layout,
            counts: (from, to),
            sum,
            count: p.count,
        },
    });
    Ok(())
}

#[cfg(test)]
#[path = "otlp_tests.rs"]
mod tests;
