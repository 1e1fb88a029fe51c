//! OTLP metrics → core points: validation, normalisation, projection and keying. Everything a
//! client sends is checked here, before it can reach a shard; a bad point is rejected with a
//! reason and never stops the rest of its request.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::Arc;

use ahash::RandomState;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric::Data, number_data_point, AggregationTemporality, HistogramDataPoint, NumberDataPoint,
};

use crate::aggregate::key::{source_seed, FamilyDesc, Kind, SetHash};
use crate::aggregate::layout::BucketLayout;
use crate::aggregate::naming::{family_name, sanitize_label_key};
use crate::aggregate::series::{Point, PointValue, Temporality};
use crate::aggregate::shard::LabelResolver;

/// Why a point was rejected by validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Gauge = 0,
    Summary,
    ExponentialHistogram,
    NonMonotonicSum,
    UnspecifiedTemporality,
    ZeroTimestamp,
    InvalidInterval,
    MissingValue,
    InvalidValue,
    InvalidBounds,
    BucketCountMismatch,
    CountMismatch,
    InvalidSum,
}

impl Reason {
    pub const COUNT: usize = 13;
    pub const ALL: [Reason; Self::COUNT] = [
        Self::Gauge,
        Self::Summary,
        Self::ExponentialHistogram,
        Self::NonMonotonicSum,
        Self::UnspecifiedTemporality,
        Self::ZeroTimestamp,
        Self::InvalidInterval,
        Self::MissingValue,
        Self::InvalidValue,
        Self::InvalidBounds,
        Self::BucketCountMismatch,
        Self::CountMismatch,
        Self::InvalidSum,
    ];
    /// The label value in `/internal/metrics`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gauge => "unsupported_gauge",
            Self::Summary => "unsupported_summary",
            Self::ExponentialHistogram => "unsupported_exponential_histogram",
            Self::NonMonotonicSum => "non_monotonic_sum",
            Self::UnspecifiedTemporality => "unspecified_temporality",
            Self::ZeroTimestamp => "zero_timestamp",
            Self::InvalidInterval => "invalid_interval",
            Self::MissingValue => "missing_value",
            Self::InvalidValue => "invalid_value",
            Self::InvalidBounds => "invalid_bounds",
            Self::BucketCountMismatch => "bucket_count_mismatch",
            Self::CountMismatch => "count_mismatch",
            Self::InvalidSum => "invalid_sum",
        }
    }
    /// What the client reads in the partial success message.
    pub fn explain(self) -> &'static str {
        match self {
            Self::Gauge => "gauges are not aggregated",
            Self::Summary => "summaries are not aggregated",
            Self::ExponentialHistogram => "exponential histograms are not supported yet",
            Self::NonMonotonicSum => "non-monotonic sums are not aggregated",
            Self::UnspecifiedTemporality => "aggregation temporality is unspecified",
            Self::ZeroTimestamp => "start or end timestamp is zero",
            Self::InvalidInterval => "start time is not before end time",
            Self::MissingValue => "data point has no value",
            Self::InvalidValue => "value is negative, NaN or infinite",
            Self::InvalidBounds => "bucket bounds are not finite and strictly increasing",
            Self::BucketCountMismatch => "bucket_counts length is not explicit_bounds length + 1",
            Self::CountMismatch => "count is not the sum of bucket_counts",
            Self::InvalidSum => "histogram sum is missing, NaN or infinite",
        }
    }
}

/// Per-reason rejection counts of one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rejections {
    pub counts: [u64; Reason::COUNT],
}

impl Rejections {
    pub fn add(&mut self, r: Reason, n: u64) {
        self.counts[r as usize] += n;
    }
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
    /// A message naming each reason with its count.
    pub fn message(&self) -> String {
        let mut out = String::new();
        for r in Reason::ALL {
            let n = self.counts[r as usize];
            if n > 0 {
                if !out.is_empty() {
                    out.push_str("; ");
                }
                let _ = write!(
                    out,
                    "{n} point(s) rejected: {} ({})",
                    r.explain(),
                    r.as_str()
                );
            }
        }
        out
    }
}

/// Which attributes become output labels.
#[derive(Debug)]
pub struct Projection {
    /// Resource attributes kept.
    by: Vec<String>,
    /// Point attributes dropped.
    without: HashSet<String, RandomState>,
}

impl Projection {
    pub fn new(by: &[String], without: &[String]) -> Self {
        Self {
            by: by.to_vec(),
            without: without.iter().cloned().collect(),
        }
    }

    fn kept_resource<'a>(&self, attrs: &'a [KeyValue]) -> Vec<&'a KeyValue> {
        attrs
            .iter()
            .filter(|kv| self.by.contains(&kv.key))
            .collect()
    }
}

/// Writes an attribute value as its label text. Strings are borrowed; the rest use `buf`.
fn value_str<'a>(v: Option<&'a AnyValue>, buf: &'a mut String) -> &'a str {
    use any_value::Value;
    buf.clear();
    match v.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => return s,
        Some(Value::BoolValue(b)) => buf.push_str(if *b { "true" } else { "false" }),
        Some(Value::IntValue(i)) => {
            let _ = write!(buf, "{i}");
        }
        Some(Value::DoubleValue(d)) => {
            let _ = write!(buf, "{d}");
        }
        Some(Value::BytesValue(b)) => {
            for byte in b {
                let _ = write!(buf, "{byte:02x}");
            }
        }
        Some(other) => {
            let _ = write!(buf, "{}", serde_json::to_string(other).unwrap_or_default());
        }
        None => {}
    }
    buf
}

/// Resolves labels of new series from the request they came in.
pub struct RequestLabels {
    pub req: Arc<ExportMetricsServiceRequest>,
    pub projection: Arc<Projection>,
}

impl LabelResolver for RequestLabels {
    fn labels(&self, [ri, si, mi, pi]: [u32; 4]) -> Vec<(String, String)> {
        let Some(rm) = self.req.resource_metrics.get(ri as usize) else {
            return Vec::new();
        };
        let Some(metric) = rm
            .scope_metrics
            .get(si as usize)
            .and_then(|sm| sm.metrics.get(mi as usize))
        else {
            return Vec::new();
        };
        let attrs: &[KeyValue] = match &metric.data {
            Some(Data::Sum(s)) => s.data_points.get(pi as usize).map(|p| &p.attributes[..]),
            Some(Data::Histogram(h)) => h.data_points.get(pi as usize).map(|p| &p.attributes[..]),
            _ => None,
        }
        .unwrap_or(&[]);
        let resource: &[KeyValue] = rm.resource.as_ref().map_or(&[], |r| &r.attributes[..]);
        let mut pairs: Vec<(String, &str, String)> = Vec::new();
        let mut buf = String::new();
        for kv in self.projection.kept_resource(resource) {
            if attrs.iter().any(|a| a.key == kv.key) {
                continue;
            }
            let v = value_str(kv.value.as_ref(), &mut buf).to_owned();
            pairs.push((sanitize_label_key(&kv.key), &kv.key, v));
        }
        for kv in attrs {
            if self.projection.without.contains(&kv.key) {
                continue;
            }
            let v = value_str(kv.value.as_ref(), &mut buf).to_owned();
            pairs.push((sanitize_label_key(&kv.key), &kv.key, v));
        }
        // Keys that sanitise to the same name are joined with `;` in original-key order.
        pairs.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        let mut out: Vec<(String, String)> = Vec::with_capacity(pairs.len());
        for (k, _, v) in pairs {
            match out.last_mut() {
                Some(last) if last.0 == k => {
                    last.1.push(';');
                    last.1.push_str(&v);
                }
                _ => out.push((k, v)),
            }
        }
        out
    }
}

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
    /// Points skipped because their flags say no value was recorded.
    pub no_value: u64,
    pub received: u64,
}

/// Validates and keys every point of `req`. `shard_of` routes an output key to its shard.
pub fn prepare(
    req: &ExportMetricsServiceRequest,
    projection: &Projection,
    shards: usize,
    shard_of: impl Fn(u128) -> usize,
) -> Prepared {
    let mut families: Vec<FamilyDesc> = Vec::new();
    let mut layouts: Vec<Arc<[f64]>> = Vec::new();
    let mut per_shard: Vec<ShardPoints> = (0..shards).map(|_| ShardPoints::default()).collect();
    let mut rej = Rejections::default();
    let mut no_value = 0u64;
    let mut received = 0u64;
    let mut buf = String::new();

    for (ri, rm) in req.resource_metrics.iter().enumerate() {
        let resource: &[KeyValue] = rm.resource.as_ref().map_or(&[], |r| &r.attributes[..]);
        let mut identity = SetHash::default();
        for kv in resource {
            identity.add(&kv.key, value_str(kv.value.as_ref(), &mut buf));
        }
        let kept: Vec<(&str, u128)> = projection
            .kept_resource(resource)
            .into_iter()
            .map(|kv| {
                let pair = SetHash::pair(&kv.key, value_str(kv.value.as_ref(), &mut buf));
                (kv.key.as_str(), pair)
            })
            .collect();
        let mut kept_hash = SetHash::default();
        for (_, pair) in &kept {
            kept_hash.add_pair(*pair);
        }
        for (si, sm) in rm.scope_metrics.iter().enumerate() {
            let scope = sm.scope.as_ref().map_or("", |s| &s.name[..]);
            for (mi, m) in sm.metrics.iter().enumerate() {
                let (kind, temporality, n) = match &m.data {
                    Some(Data::Sum(s)) => {
                        if !s.is_monotonic {
                            rej.add(Reason::NonMonotonicSum, s.data_points.len() as u64);
                            received += s.data_points.len() as u64;
                            continue;
                        }
                        (
                            Kind::Counter,
                            s.aggregation_temporality,
                            s.data_points.len(),
                        )
                    }
                    Some(Data::Histogram(h)) => (
                        Kind::Histogram,
                        h.aggregation_temporality,
                        h.data_points.len(),
                    ),
                    Some(Data::Gauge(g)) => {
                        rej.add(Reason::Gauge, g.data_points.len() as u64);
                        received += g.data_points.len() as u64;
                        continue;
                    }
                    Some(Data::Summary(s)) => {
                        rej.add(Reason::Summary, s.data_points.len() as u64);
                        received += s.data_points.len() as u64;
                        continue;
                    }
                    Some(Data::ExponentialHistogram(e)) => {
                        rej.add(Reason::ExponentialHistogram, e.data_points.len() as u64);
                        received += e.data_points.len() as u64;
                        continue;
                    }
                    None => continue,
                };
                received += n as u64;
                let temporality = if temporality == AggregationTemporality::Delta as i32 {
                    Temporality::Delta
                } else if temporality == AggregationTemporality::Cumulative as i32 {
                    Temporality::Cumulative
                } else {
                    rej.add(Reason::UnspecifiedTemporality, n as u64);
                    continue;
                };
                let family = family_index(&mut families, m, kind);
                let seed = families[family as usize].key_seed();
                let src_seed = source_seed(identity, scope, &families[family as usize]);
                let ctx = MetricCtx {
                    kept: &kept,
                    kept_hash,
                    projection,
                    resource: identity.finish(0) as u64,
                    seed,
                    src_seed,
                    family,
                    temporality,
                    label_ref: [ri as u32, si as u32, mi as u32, 0],
                };
                match &m.data {
                    Some(Data::Sum(s)) => {
                        for (pi, p) in s.data_points.iter().enumerate() {
                            match number_point(p, &ctx, pi, &mut buf) {
                                Ok(Some(point)) => {
                                    if let Some(t) = per_shard.get_mut(shard_of(point.series)) {
                                        t.points.push(point);
                                    }
                                }
                                Ok(None) => no_value += 1,
                                Err(r) => rej.add(r, 1),
                            }
                        }
                    }
                    Some(Data::Histogram(h)) => {
                        for (pi, p) in h.data_points.iter().enumerate() {
                            if let Err(r) = histogram_point(
                                p,
                                &ctx,
                                pi,
                                &mut buf,
                                &mut layouts,
                                &mut per_shard,
                                &shard_of,
                            ) {
                                rej.add(r, 1);
                            } else if p.flags & 1 == 1 {
                                no_value += 1;
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    Prepared {
        families: families.into(),
        layouts: layouts.into(),
        per_shard,
        rejections: rej,
        no_value,
        received,
    }
}

fn family_index(
    families: &mut Vec<FamilyDesc>,
    m: &opentelemetry_proto::tonic::metrics::v1::Metric,
    kind: Kind,
) -> u32 {
    if let Some(i) = families
        .iter()
        .position(|f| f.kind == kind && *f.otel_name == m.name && *f.unit == m.unit)
    {
        return i as u32;
    }
    families.push(FamilyDesc {
        name: family_name(&m.name, &m.unit).into(),
        kind,
        otel_name: m.name.as_str().into(),
        unit: m.unit.as_str().into(),
        help: if m.description.is_empty() {
            format!("{} (OTel), merged across instances by spanagg", m.name).into()
        } else {
            m.description.as_str().into()
        },
    });
    (families.len() - 1) as u32
}

struct MetricCtx<'a> {
    /// Kept resource attributes: key and pair hash.
    kept: &'a [(&'a str, u128)],
    kept_hash: SetHash,
    projection: &'a Projection,
    /// The resource identity (the pod), as points carry it.
    resource: u64,
    seed: u64,
    src_seed: u64,
    family: u32,
    temporality: Temporality,
    label_ref: [u32; 4],
}

/// Checks timestamps and computes (output key, source key).
fn keys(
    ctx: &MetricCtx<'_>,
    attrs: &[KeyValue],
    start: u64,
    end: u64,
    buf: &mut String,
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
    let mut out = ctx.kept_hash;
    let mut all = SetHash::default();
    for kv in attrs {
        let pair = SetHash::pair(&kv.key, value_str(kv.value.as_ref(), buf));
        all.add_pair(pair);
        if ctx.projection.without.contains(&kv.key) {
            continue;
        }
        // A point attribute overrides a kept resource attribute of the same key.
        if let Some((_, kept)) = ctx.kept.iter().find(|(k, _)| *k == kv.key) {
            out.remove_pair(*kept);
        }
        out.add_pair(pair);
    }
    Ok((out.finish(ctx.seed), all.finish(ctx.src_seed)))
}

fn number_point(
    p: &NumberDataPoint,
    ctx: &MetricCtx<'_>,
    pi: usize,
    buf: &mut String,
) -> Result<Option<Point>, Reason> {
    if p.flags & 1 == 1 {
        return Ok(None);
    }
    let value = match p.value {
        Some(number_data_point::Value::AsInt(i)) => {
            PointValue::Int(u64::try_from(i).map_err(|_| Reason::InvalidValue)?)
        }
        Some(number_data_point::Value::AsDouble(d)) => {
            if !d.is_finite() || d < 0.0 {
                return Err(Reason::InvalidValue);
            }
            PointValue::Float(d)
        }
        None => return Err(Reason::MissingValue),
    };
    let (series, source) = keys(
        ctx,
        &p.attributes,
        p.start_time_unix_nano,
        p.time_unix_nano,
        buf,
    )?;
    let mut label_ref = ctx.label_ref;
    label_ref[3] = pi as u32;
    Ok(Some(Point {
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

fn histogram_point(
    p: &HistogramDataPoint,
    ctx: &MetricCtx<'_>,
    pi: usize,
    buf: &mut String,
    layouts: &mut Vec<Arc<[f64]>>,
    per_shard: &mut [ShardPoints],
    shard_of: &impl Fn(u128) -> usize,
) -> Result<(), Reason> {
    if p.flags & 1 == 1 {
        return Ok(());
    }
    BucketLayout::check(&p.explicit_bounds).map_err(|_| Reason::InvalidBounds)?;
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
    let sum = match p.sum {
        Some(s) if s.is_finite() => s,
        _ => return Err(Reason::InvalidSum),
    };
    let (series, source) = keys(
        ctx,
        &p.attributes,
        p.start_time_unix_nano,
        p.time_unix_nano,
        buf,
    )?;
    let layout = match layouts.last() {
        Some(l) if **l == *p.explicit_bounds => layouts.len() - 1,
        // Only the previous layout is reused: a search over all would let one hostile request
        // cost quadratic time. Shards intern layouts by value anyway.
        _ => {
            layouts.push(p.explicit_bounds.as_slice().into());
            layouts.len() - 1
        }
    };
    let target = per_shard
        .get_mut(shard_of(series))
        .ok_or(Reason::InvalidValue)?;
    let from = target.counts.len() as u32;
    target.counts.extend_from_slice(&p.bucket_counts);
    let to = target.counts.len() as u32;
    let mut label_ref = ctx.label_ref;
    label_ref[3] = pi as u32;
    target.points.push(Point {
        series,
        source,
        resource: ctx.resource,
        family: ctx.family,
        label_ref,
        start_ns: p.start_time_unix_nano,
        end_ns: p.time_unix_nano,
        temporality: ctx.temporality,
        value: PointValue::Histogram {
            layout: layout as u32,
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
