//! OTLP metrics → core points: validation, normalisation, projection and keying. Everything a
//! client sends is checked here, before it can reach a shard; a bad point is rejected with a
//! reason and never stops the rest of its request.

use std::collections::HashMap;
use std::sync::Arc;

use ahash::RandomState;
use opentelemetry_proto::tonic::metrics::v1::AggregationTemporality;

pub use super::labels::{value_str, Projection, Relabeled, RequestLabels, ResourceLabels};
use super::labels::{AttributeLimits, Keyer, ResourcePart};
pub use super::reason::{Reason, Rejections};
use super::view::{
    Attrs, Data, HistogramPoint, MetricView, Number, NumberPoint, OtlpBody, RequestView,
};
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
    /// The kept attributes of each resource, rendered, by the index points carry.
    pub resources: Arc<[ResourceLabels]>,
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
    req: &OtlpBody,
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
        bounds: Vec::new(),
        checked_bounds: None,
        bounds_layout: None,
    };
    let mut resources: Vec<ResourceLabels> = Vec::new();
    let mut keyer = Keyer::new(projection, limits.attributes);
    let mut buf = String::new();
    let latest_end = now_ns.saturating_add(limits.max_future_skew_ns);

    for rm in req.view().resource_metrics() {
        let resource = rm.attributes();
        let mut identity = SetHash::default();
        for kv in resource.iter() {
            identity.add(kv.key, value_str(kv.value, &mut buf));
        }
        let kept = projection.kept_resource(resource);
        let resource_index = resources.len() as u32;
        // Past the limit every point of the resource is refused: nothing to render.
        resources.push(if kept.len() <= limits.attributes.max_attributes {
            ResourceLabels::new(&kept)
        } else {
            ResourceLabels::default()
        });
        // Built on first use: a `by` attribute named `le` is renamed on histograms only.
        let mut parts: [Option<ResourcePart>; 2] = [None, None];
        for sm in rm.scope_metrics() {
            for m in sm.metrics() {
                let Some((kind, temporality, n)) = out.classify(&m) else {
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
                let family = out.family_index(&m, kind);
                let desc = &out.families[family as usize];
                let res = parts[usize::from(histogram)]
                    .get_or_insert_with(|| keyer.resource(&kept, histogram));
                let ctx = MetricCtx {
                    body: req,
                    kept: resources.last().map_or(&[][..], |r| r.of(histogram)),
                    res,
                    histogram,
                    seeds: (desc.key_seed(), source_seed(identity, sm.scope_name, desc)),
                    resource: identity.finish(0) as u64,
                    resource_index,
                    family,
                    temporality,
                    latest_end,
                    max_buckets: limits.max_buckets,
                };
                let Some(data) = m.data else { continue };
                for msg in data.points().messages() {
                    if histogram {
                        let p = HistogramPoint::read(msg);
                        if let Err(r) =
                            histogram_point(&p, msg, &ctx, &mut keyer, &mut out, &shard_of)
                        {
                            out.rej.add(r, 1);
                        } else if p.flags & 1 == 1 {
                            out.no_value += 1;
                        }
                        continue;
                    }
                    match number_point(&NumberPoint::read(msg), msg, &ctx, &mut keyer) {
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
        }
    }
    Prepared {
        families: out.families.into(),
        layouts: out.layouts.into(),
        per_shard: out.per_shard,
        resources: resources.into(),
        rejections: out.rej,
        relabeled: keyer.relabeled,
        no_value: out.no_value,
        received: out.received,
    }
}

/// Data points in a request, whatever their kind: what the fuzz checks hold the walk's count
/// (`wire::cost`) to.
pub fn count_points(req: RequestView<'_>) -> u64 {
    let mut n = 0;
    for rm in req.resource_metrics() {
        for sm in rm.scope_metrics() {
            n += sm.metrics().map(|m| points_of(&m)).sum::<u64>();
        }
    }
    n
}

/// Data points a metric carries, whatever its kind.
fn points_of(m: &MetricView<'_>) -> u64 {
    m.data.map_or(0, |d| d.points().count() as u64)
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
    /// A histogram point's bounds, decoded here for checking and comparing.
    bounds: Vec<f64>,
    /// The wire bytes `bounds` were decoded from, once they passed the layout check: the
    /// points of a metric repeat their bounds, which are then neither decoded nor checked again.
    checked_bounds: Option<&'r [u8]>,
    /// The index in `layouts` of `bounds`, once found: until `bounds` change, their points need
    /// no comparison.
    bounds_layout: Option<u32>,
}

impl<'r> Prep<'r> {
    /// Counts a metric's points as received; the kinds spanagg aggregates come back with their
    /// temporality (`None` when unspecified), the others are rejected here.
    fn classify(&mut self, m: &MetricView<'_>) -> Option<(Kind, Option<Temporality>, u64)> {
        let n = points_of(m);
        self.received += n;
        let (kind, t) = match m.data {
            Some(Data::Sum {
                temporality,
                monotonic: true,
                ..
            }) => (Kind::Counter, temporality),
            Some(Data::Histogram { temporality, .. }) => (Kind::Histogram, temporality),
            Some(data) => {
                let reason = match data {
                    Data::Sum { .. } => Reason::NonMonotonicSum,
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

    fn family_index(&mut self, m: &MetricView<'r>, kind: Kind) -> u32 {
        let key = (m.name, m.unit, kind);
        if let Some(&i) = self.family_index.get(&key) {
            return i;
        }
        let mut help = if m.description.is_empty() {
            format!("{} (OTel), merged across instances by spanagg", m.name)
        } else {
            m.description.to_owned()
        };
        if help.len() > MAX_HELP_LEN {
            let mut cut = MAX_HELP_LEN;
            while !help.is_char_boundary(cut) {
                cut -= 1;
            }
            help.truncate(cut);
        }
        self.families.push(FamilyDesc {
            name: family_name(m.name, m.unit).into(),
            kind,
            otel_name: m.name.into(),
            unit: m.unit.into(),
            help: help.into(),
        });
        let i = (self.families.len() - 1) as u32;
        self.family_index.insert(key, i);
        i
    }

    /// Index of `self.bounds` in the request's layouts. Only the previous layout is reused: a
    /// search over all would let one hostile request cost quadratic time; shards intern by value.
    fn layout(&mut self) -> u32 {
        if let Some(i) = self.bounds_layout {
            return i;
        }
        match self.layouts.last() {
            Some(l) if **l == *self.bounds => {}
            _ => self.layouts.push(self.bounds.as_slice().into()),
        }
        let i = (self.layouts.len() - 1) as u32;
        self.bounds_layout = Some(i);
        i
    }
}

struct MetricCtx<'a> {
    body: &'a OtlpBody,
    /// The kept resource attributes as labels for the metric's kind, and their hashed form.
    kept: &'a [(String, String)],
    res: &'a ResourcePart,
    histogram: bool,
    /// (output key seed, source key seed).
    seeds: (u64, u64),
    /// The resource identity (the pod), as points carry it.
    resource: u64,
    /// The resource's index in `Prepared::resources`, for the labels of new series.
    resource_index: u32,
    family: u32,
    temporality: Temporality,
    /// Points ending after this are refused as `future`.
    latest_end: u64,
    max_buckets: usize,
}

impl MetricCtx<'_> {
    /// The label handle of the point `msg` (a slice of the body).
    fn label_ref(&self, msg: &[u8]) -> LabelRef {
        LabelRef::Otlp {
            resource: self.resource_index,
            point: self.body.span_of(msg),
            histogram: self.histogram,
        }
    }
}

/// Checks timestamps and computes (output key, source key). Timestamps first: a point from a
/// broken clock is refused before anything else is looked at.
fn keys<'r>(
    ctx: &MetricCtx<'_>,
    keyer: &mut Keyer<'r>,
    attrs: Attrs<'r>,
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
    p: &NumberPoint<'r>,
    msg: &[u8],
    ctx: &MetricCtx<'_>,
    keyer: &mut Keyer<'r>,
) -> Result<Option<Point>, Reason> {
    if p.flags & 1 == 1 {
        return Ok(None);
    }
    let value = match p.value {
        Some(Number::Int(i)) => {
            PointValue::Int(u64::try_from(i).map_err(|_| Reason::InvalidValue)?)
        }
        Some(Number::Double(d)) => {
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
    let (series, source) = keys(ctx, keyer, p.attributes, p.start, p.time)?;
    let label_ref = ctx.label_ref(msg);
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
        start_ns: p.start,
        end_ns: p.time,
        temporality: ctx.temporality,
        value,
    }))
}

/// Checks a histogram point's bounds (decoded into `out.bounds`) unless they are the bytes the
/// last checked bounds came from.
fn check_bounds<'r>(
    p: &HistogramPoint<'r>,
    out: &mut Prep<'r>,
    max_buckets: usize,
) -> Result<(), Reason> {
    // Bounded before decoding: a point cannot make this buffer larger than its limit.
    if p.bucket_counts.len() > max_buckets || p.explicit_bounds.len() >= max_buckets {
        return Err(Reason::TooManyBuckets);
    }
    let raw = p.explicit_bounds.bytes();
    if out.checked_bounds == Some(raw) {
        return Ok(());
    }
    out.checked_bounds = None;
    out.bounds_layout = None;
    out.bounds.clear();
    out.bounds.extend(p.explicit_bounds.f64s());
    BucketLayout::check(&out.bounds).map_err(|e| match e {
        LayoutError::NotFinite => Reason::NonFinite,
        _ => Reason::InvalidBounds,
    })?;
    out.checked_bounds = Some(raw);
    Ok(())
}

/// Checks a histogram point's buckets and numbers against its bounds (checked); returns its
/// sum.
fn check_histogram(p: &HistogramPoint<'_>, bounds: &[f64]) -> Result<f64, Reason> {
    let buckets = p.bucket_counts.len();
    if buckets != bounds.len() + 1 {
        return Err(Reason::BucketCountMismatch);
    }
    let total = p
        .bucket_counts
        .u64s()
        .try_fold(0u64, |acc, c| acc.checked_add(c))
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
    p: &HistogramPoint<'r>,
    msg: &[u8],
    ctx: &MetricCtx<'_>,
    keyer: &mut Keyer<'r>,
    out: &mut Prep<'r>,
    shard_of: &impl Fn(u128) -> usize,
) -> Result<(), Reason> {
    if p.flags & 1 == 1 {
        return Ok(());
    }
    check_bounds(p, out, ctx.max_buckets)?;
    let sum = check_histogram(p, &out.bounds)?;
    let (series, source) = keys(ctx, keyer, p.attributes, p.start, p.time)?;
    let layout = out.layout();
    let target = out
        .per_shard
        .get_mut(shard_of(series))
        .ok_or(Reason::InvalidValue)?;
    let from = target.counts.len();
    target.counts.extend(p.bucket_counts.u64s());
    let counts = &target.counts[from..];
    // The count, the sum and the first and last buckets tell two writers' values apart.
    let fp = fingerprint(
        [
            p.count,
            sum.to_bits(),
            counts.first().copied().unwrap_or(0),
            counts.last().copied().unwrap_or(0),
        ]
        .into_iter(),
    );
    let to = target.counts.len() as u32;
    target.points.push(Point {
        fp,
        series,
        source,
        resource: ctx.resource,
        family: ctx.family,
        label_ref: ctx.label_ref(msg),
        start_ns: p.start,
        end_ns: p.time,
        temporality: ctx.temporality,
        value: PointValue::Histogram {
            layout,
            counts: (from as u32, to),
            sum,
            count: p.count,
        },
    });
    Ok(())
}

#[cfg(test)]
#[path = "otlp_tests.rs"]
mod tests;
