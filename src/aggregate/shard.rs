//! One shard's state and the apply logic. A shard is owned by exactly one thread (see
//! `table.rs`), so everything here is plain data: no locks, no atomics. Every point of one
//! output series lands in the same shard, and so do all the source streams that feed it.
//!
//! Memory: series and delta sources live in dense [`KeyTable`]s; label values are 4-byte ids
//! into a refcounted [`Interner`]; label names are shared per distinct name list.

use std::collections::HashMap;
use std::sync::Arc;

use ahash::RandomState;

pub use super::batch::{Batch, BatchResult, LabelResolver, Outcome};
use super::interned::Interned;
use super::interner::Interner;
use super::key::{FamilyDesc, Labels, SetHash};
use super::keytable::{stored_key, Chunked, KeyTable};
use super::layout::LayoutMismatch;
use super::quota::{Full, SeriesQuota};
use super::series::{
    cumulative_step, BucketCounts, CounterValue, CumulativeDelta, CumulativeSource,
    CumulativeState, CumulativeValue, Point, PointValue, Series, SeriesValue, Temporality,
    NO_SERIES,
};
use super::window::{Verdict, Window};

#[path = "budget.rs"]
mod budget;
#[path = "persist.rs"]
mod persist;
pub use budget::{overflow_key, OverflowLabels, Redirect, ServiceUse, ShardLimits, OVERFLOW_LABEL};
pub use persist::{RestoreError, SeriesRecord, StreamState, ValueRecord};

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

type Map<K, V> = HashMap<K, V, RandomState>;

/// The output label that names a series' service.
pub const SERVICE_LABEL: &str = "service_name";

/// The service in resolved labels ("" without one).
fn service_in(labels: &[(String, String)]) -> &str {
    labels
        .iter()
        .find(|(k, _)| k == SERVICE_LABEL)
        .map_or("", |(_, v)| v)
}

/// A series id's state: whether its series exists and how many sources hold the id.
#[derive(Debug, Clone, Copy)]
struct IdSlot {
    live: bool,
    sources: u32,
}

/// A pod as the shard saw it.
#[derive(Debug, Clone)]
pub struct Pod {
    pub service: Box<str>,
    touched: u32,
}

/// A value to add, borrowed from a batch or a cumulative difference.
enum Add<'a> {
    Int(u64),
    Float(f64),
    Hist {
        layout: u32,
        counts: &'a [u64],
        sum: f64,
    },
}

/// Why a value could not be added to its series.
#[derive(Debug)]
enum AddError {
    /// The client's bucket bounds do not fold into the series' (refused, counted).
    Layout,
    /// An invariant of spanagg's own failed: a bug, never the client's doing.
    Internal(&'static str),
}

impl From<LayoutMismatch> for AddError {
    fn from(_: LayoutMismatch) -> Self {
        Self::Layout
    }
}

impl AddError {
    fn outcome(self) -> Outcome {
        match self {
            Self::Layout => Outcome::LayoutMismatch,
            Self::Internal(what) => internal(what),
        }
    }
}

/// Logs a failed invariant; the point is refused as `internal_error`, not blamed on the client.
fn internal(what: &'static str) -> Outcome {
    tracing::error!(
        invariant = what,
        "spanagg bug: a point was refused (internal_error)"
    );
    Outcome::InternalError
}

/// The state of one shard.
pub struct ShardState {
    cfg: ShardConfig,
    /// Families, bucket layouts, fold maps, label-name lists.
    tables: Interned,
    series: KeyTable<Series>,
    /// Delta streams: only their exactly-once window (32 bytes in the common case).
    deltas: KeyTable<Window>,
    /// Cumulative streams: their last point.
    cumulative: Map<u128, CumulativeSource>,
    /// Pods (resource identities) seen: their service and when last seen (shard clock).
    pods: Map<u64, Pod>,
    budget: budget::Budget,
    /// Series ids (the series table's tags, also held by the sources that feed a series):
    /// whether the series still exists, and how many sources hold the id. An id is reused only
    /// when both are gone, so a source never counts toward the wrong series.
    ids: Chunked<IdSlot>,
    free_ids: Vec<u32>,
    strings: Interner,
    /// Shard clock in seconds, advanced by the owner thread.
    pub clock: u32,
    /// Wall clock (Unix ns), advanced by the owner thread. Delta streams expire by data time:
    /// a stream whose newest end is older than `now - ttl` is dropped.
    pub now_ns: u64,
}

impl ShardState {
    pub fn new(cfg: ShardConfig) -> Self {
        Self {
            tables: Interned::new(cfg.max_families),
            cfg,
            series: KeyTable::default(),
            deltas: KeyTable::default(),
            cumulative: Map::default(),
            pods: Map::default(),
            budget: budget::Budget::default(),
            ids: Chunked::default(),
            free_ids: Vec::new(),
            strings: Interner::default(),
            clock: 0,
            now_ns: 0,
        }
    }

    pub fn ttl_secs(&self) -> u32 {
        self.cfg.ttl_secs
    }
    fn ttl_ns(&self) -> u64 {
        u64::from(self.cfg.ttl_secs) * 1_000_000_000
    }
    pub fn series_len(&self) -> usize {
        self.series.len()
    }
    pub fn sources_len(&self) -> usize {
        self.deltas.len() + self.cumulative.len()
    }
    /// Bytes held by the delta source table (for the memory benchmark).
    pub fn delta_table_bytes(&self) -> usize {
        self.deltas.heap_bytes()
    }
    pub fn families(&self) -> &[FamilyDesc] {
        self.tables.families()
    }
    pub fn layout(&self, id: u32) -> &[f64] {
        self.tables.layout(id)
    }
    /// (layouts, fold maps, label-name lists) interned.
    pub fn table_sizes(&self) -> (usize, usize, usize) {
        self.tables.sizes()
    }
    /// Every live series, in no particular order.
    pub fn series(&self) -> impl Iterator<Item = &Series> {
        self.series.values()
    }
    /// The live series that `filter` selects, with their family and source stream count.
    pub fn select<'a>(
        &'a self,
        filter: &'a SeriesFilter,
    ) -> impl Iterator<Item = (&'a Series, &'a FamilyDesc, u32)> + 'a {
        self.series_with_sources().filter_map(move |(s, streams)| {
            let fam = self.tables.family(s.family)?;
            if let Some(m) = filter.metric.as_deref() {
                if m != &*fam.name && m != &*fam.otel_name {
                    return None;
                }
            }
            if let Some(want) = filter.service.as_deref() {
                if self.service(&s.labels) != want {
                    return None;
                }
            }
            Some((s, fam, streams))
        })
    }

    /// Every live series with the number of source streams (pods' series) that feed it.
    pub fn series_with_sources(&self) -> impl Iterator<Item = (&Series, u32)> {
        self.series
            .iter()
            .map(|(_, id, s)| (s, self.ids.get(id as usize).map_or(0, |slot| slot.sources)))
    }

    fn alloc_id(&mut self) -> u32 {
        let live = IdSlot {
            live: true,
            sources: 0,
        };
        if let Some(id) = self.free_ids.pop() {
            if let Some(slot) = self.ids.get_mut(id as usize) {
                *slot = live;
            }
            return id;
        }
        self.ids.push(live);
        (self.ids.len() - 1) as u32
    }

    /// Adjusts a series id's source count and frees the id once nothing refers to it.
    fn update_id(&mut self, id: u32, f: impl FnOnce(&mut IdSlot)) {
        let Some(slot) = self.ids.get_mut(id as usize) else {
            return;
        };
        let was_free = !slot.live && slot.sources == 0;
        f(slot);
        if !was_free && !slot.live && slot.sources == 0 {
            self.free_ids.push(id);
        }
    }

    fn source_added(&mut self, id: u32) {
        self.update_id(id, |s| s.sources += 1);
    }

    fn source_removed(&mut self, id: u32) {
        self.update_id(id, |s| s.sources = s.sources.saturating_sub(1));
    }

    fn series_removed(&mut self, id: u32) {
        self.update_id(id, |s| s.live = false);
    }

    /// A series' `service_name` label ("" without one): what budgets and reports group by.
    pub fn service<'a>(&'a self, labels: &'a Labels) -> &'a str {
        self.labels(labels)
            .find(|(k, _)| *k == SERVICE_LABEL)
            .map_or("", |(_, v)| v)
    }

    /// A series' labels as (name, value) pairs, sorted by name.
    pub fn labels<'a>(&'a self, labels: &'a Labels) -> impl Iterator<Item = (&'a str, &'a str)> {
        self.tables
            .key_set(labels.keys)
            .iter()
            .zip(labels.values.iter())
            .map(|(k, v)| (self.strings.get(*k), self.strings.get(*v)))
    }

    /// Applies one batch and returns what happened to each point.
    pub fn apply(&mut self, batch: &Batch) -> BatchResult {
        // A replayed batch is judged by when it was accepted; the clock comes back after.
        let clock_ns = self.now_ns;
        if let Some(at) = batch.now_ns {
            self.now_ns = at;
        }
        let result = self.apply_points(batch);
        self.now_ns = clock_ns;
        self.tables.end_batch();
        result
    }

    fn apply_points(&mut self, batch: &Batch) -> BatchResult {
        let mut result = BatchResult::default();
        let mut fam_ids: Vec<Option<u32>> = vec![None; batch.families.len()];
        let mut layout_ids: Vec<Option<u32>> = vec![None; batch.layouts.len()];
        let mut last_pod = None;
        for p in &batch.points {
            // Points of one resource come together: one lookup per pod and batch.
            if last_pod != Some(p.resource) {
                last_pod = Some(p.resource);
                self.saw_pod(batch, p);
            }
            // The family first: a point past the family cap is refused, not sent to overflow.
            let Some(desc) = batch.families.get(p.family as usize) else {
                continue;
            };
            let fam = match fam_ids[p.family as usize] {
                Some(id) => id,
                None => match self.tables.family_id(desc) {
                    Some(id) => {
                        fam_ids[p.family as usize] = Some(id);
                        id
                    }
                    None => {
                        result.counts[Outcome::FamilyLimit as usize] += 1;
                        continue;
                    }
                },
            };
            if let budget::Admit::Overflow(service) = self.admit(batch, p) {
                let out = result.redirect.get_or_insert_with(Default::default);
                self.redirect(batch, p, service, out);
                continue;
            }
            let outcome = match p.temporality {
                Temporality::Delta => self.apply_delta(batch, p, fam, &mut layout_ids),
                Temporality::Cumulative => self.apply_cumulative(batch, p, fam),
            };
            result.counts[outcome as usize] += 1;
        }
        result
    }

    fn saw_pod(&mut self, batch: &Batch, p: &Point) {
        let clock = self.clock;
        if let Some(pod) = self.pods.get_mut(&p.resource) {
            pod.touched = clock;
            return;
        }
        let labels = batch.labels.labels(p.label_ref);
        self.pods.insert(
            p.resource,
            Pod {
                service: service_in(&labels).into(),
                touched: clock,
            },
        );
    }

    /// Pods seen within the TTL: resource identity hash and service.
    pub fn pods(&self) -> impl Iterator<Item = (u64, &str)> {
        self.pods.iter().map(|(k, p)| (*k, &*p.service))
    }

    /// Records a pod read back from a checkpoint.
    pub fn restore_pod(&mut self, resource: u64, service: &str) {
        let touched = self.clock;
        self.pods.insert(
            resource,
            Pod {
                service: service.into(),
                touched,
            },
        );
    }

    fn batch_add<'a>(
        &mut self,
        batch: &'a Batch,
        v: &PointValue,
        layout_ids: &mut [Option<u32>],
    ) -> Option<Add<'a>> {
        Some(match *v {
            PointValue::Int(i) => Add::Int(i),
            PointValue::Float(f) => Add::Float(f),
            PointValue::Histogram {
                layout,
                counts: (from, to),
                sum,
                ..
            } => {
                let slot = layout_ids.get_mut(layout as usize)?;
                let id = match *slot {
                    Some(id) => id,
                    None => {
                        let bounds = batch.layouts.get(layout as usize)?;
                        let id = self.tables.layout_id(bounds);
                        *slot = Some(id);
                        id
                    }
                };
                Add::Hist {
                    layout: id,
                    counts: batch.counts.get(from as usize..to as usize)?,
                    sum,
                }
            }
        })
    }

    fn apply_delta(
        &mut self,
        batch: &Batch,
        p: &Point,
        fam: u32,
        layout_ids: &mut [Option<u32>],
    ) -> Outcome {
        let late = self.cfg.late_ns;
        let verdict = match self.deltas.get(p.source) {
            Some(w) => w.classify(p.start_ns, p.end_ns, late, p.fp),
            // A stream we do not know (new, or expired after `series_ttl`) whose delta is older
            // than the TTL could be a replay of something applied before it expired.
            None if p.end_ns.saturating_add(self.ttl_ns()) < self.now_ns => Verdict::TooLate,
            None if !self.stream_room() => return Outcome::StreamLimit,
            None => Verdict::Apply,
        };
        let outcome = match verdict {
            Verdict::Apply => Outcome::Applied,
            Verdict::ApplyAfterGap => Outcome::AppliedAfterGap,
            Verdict::ApplyLate => Outcome::AppliedLate,
            Verdict::Duplicate => return Outcome::Duplicate,
            Verdict::TooLate => return Outcome::TooLate,
            Verdict::Conflict => return Outcome::Conflict,
        };
        let Some(add) = self.batch_add(batch, &p.value, layout_ids) else {
            return internal("a point's layout or counts are outside its batch");
        };
        let id = match self.add_to_series(batch, p, fam, add, p.start_ns, p.end_ns) {
            Ok(id) => id,
            Err(e) => return e.outcome(),
        };
        match self.deltas.get_mut_tagged(p.source) {
            Some((tag, w)) => {
                w.record(p.start_ns, p.end_ns, late, p.fp);
                // The series expired and came back under a new id: follow it.
                if *tag != id {
                    let old = std::mem::replace(tag, id);
                    self.source_removed(old);
                    self.source_added(id);
                }
            }
            None => {
                // A stream that changed temporality starts over.
                if let Some(old) = self.cumulative.remove(&stored_key(p.source)) {
                    self.source_removed(old.series);
                }
                self.source_added(id);
                self.deltas
                    .insert_tagged(p.source, id, Window::new(p.start_ns, p.end_ns, p.fp));
            }
        }
        outcome
    }

    fn apply_cumulative(&mut self, batch: &Batch, p: &Point, fam: u32) -> Outcome {
        let value = match &p.value {
            PointValue::Int(i) => CumulativeValue::Int(*i),
            PointValue::Float(f) => CumulativeValue::Float(*f),
            PointValue::Histogram {
                layout,
                counts: (from, to),
                sum,
                count,
            } => {
                let (Some(bounds), Some(counts)) = (
                    batch.layouts.get(*layout as usize),
                    batch.counts.get(*from as usize..*to as usize),
                ) else {
                    return internal("a point's layout or counts are outside its batch");
                };
                CumulativeValue::Histogram {
                    bounds: bounds.to_vec().into(),
                    counts: counts.into(),
                    sum: *sum,
                    count: *count,
                }
            }
        };
        let clock = self.clock;
        // Keyed like the key tables, so a checkpoint's stream rows find their entries again.
        let source = stored_key(p.source);
        let (start, delta, outcome) = match self.cumulative.get_mut(&source) {
            Some(src) => {
                src.touched = clock;
                match cumulative_step(&mut src.last, p.start_ns, p.end_ns, value) {
                    CumulativeDelta::Stale => return Outcome::CumulativeStale,
                    CumulativeDelta::Baseline => return Outcome::CumulativeBaseline,
                    CumulativeDelta::Delta {
                        start_ns,
                        reset,
                        value,
                    } => {
                        let o = if reset {
                            Outcome::CumulativeReset
                        } else {
                            Outcome::Applied
                        };
                        (start_ns, value, o)
                    }
                }
            }
            None => {
                if self.deltas.get(p.source).is_none() && !self.stream_room() {
                    return Outcome::StreamLimit;
                }
                if let Some((id, _)) = self.deltas.remove(p.source) {
                    self.source_removed(id);
                }
                let last = CumulativeState {
                    start_ns: p.start_ns,
                    end_ns: p.end_ns,
                    value: value.clone(),
                };
                self.cumulative.insert(
                    source,
                    CumulativeSource {
                        last,
                        touched: clock,
                        series: NO_SERIES,
                        key: stored_key(p.series),
                    },
                );
                // Counted from its start only if all of it is new to us: it began after we did
                // (`initial_value: auto`), its start is known (start == time has no rate), and
                // it began within the TTL (older, it may be a stream that expired here while
                // its series lived on, and its whole lifetime was counted before).
                let returning = p.start_ns.saturating_add(self.ttl_ns()) < self.now_ns;
                if p.start_ns <= self.cfg.process_start_ns || p.start_ns == p.end_ns || returning {
                    return Outcome::CumulativeBaseline;
                }
                (p.start_ns, value, Outcome::Applied)
            }
        };
        let add = match &delta {
            CumulativeValue::Int(i) => Add::Int(*i),
            CumulativeValue::Float(f) => Add::Float(*f),
            CumulativeValue::Histogram {
                bounds,
                counts,
                sum,
                ..
            } => Add::Hist {
                layout: self.tables.layout_id(bounds),
                counts,
                sum: *sum,
            },
        };
        match self.add_to_series(batch, p, fam, add, start, p.end_ns) {
            Ok(id) => {
                self.link_cumulative(source, id);
                outcome
            }
            Err(e) => e.outcome(),
        }
    }

    /// Records which series a cumulative source feeds (again, if the series came back).
    fn link_cumulative(&mut self, source: u128, id: u32) {
        let old = match self.cumulative.get_mut(&source) {
            Some(src) if src.series != id => std::mem::replace(&mut src.series, id),
            _ => return,
        };
        if old != NO_SERIES {
            self.source_removed(old);
        }
        self.source_added(id);
    }

    fn add_to_series(
        &mut self,
        batch: &Batch,
        p: &Point,
        fam: u32,
        add: Add<'_>,
        start_ns: u64,
        end_ns: u64,
    ) -> Result<u32, AddError> {
        if self.series.get(p.series).is_none() {
            let s = self.new_series(batch, p, fam, &add, start_ns)?;
            let service: Box<str> = self.service(&s.labels).into();
            let overflow = budget::is_overflow(self.labels(&s.labels).map(|(k, _)| k));
            self.series_added(&service, overflow);
            let id = self.alloc_id();
            self.series.insert_tagged(p.series, id, s);
        }
        // The fold map is looked up before borrowing the series mutably.
        let fold = match (&add, self.series.get(p.series).map(|s| &s.value)) {
            (Add::Hist { layout, .. }, Some(SeriesValue::Histogram { layout: out, .. }))
                if layout != out =>
            {
                Some(self.tables.fold(*layout, *out)?)
            }
            _ => None,
        };
        let clock = self.clock;
        let Some((&mut id, s)) = self.series.get_mut_tagged(p.series) else {
            return Err(AddError::Internal("a series just found is gone"));
        };
        match (&mut s.value, add) {
            (SeriesValue::Counter(c), Add::Int(i)) => c.int = c.int.saturating_add(i),
            // Finite inputs can still add up past f64::MAX: saturate, as integer counts do, so
            // a series is never served as +Inf.
            (SeriesValue::Counter(c), Add::Float(f)) => c.float = (c.float + f).min(f64::MAX),
            (
                SeriesValue::Histogram {
                    counts: out,
                    sum: osum,
                    input_buckets,
                    ..
                },
                Add::Hist { counts, sum, .. },
            ) => {
                let n = u16::try_from(counts.len()).unwrap_or(u16::MAX);
                *input_buckets = (*input_buckets).max(n);
                match fold {
                    None if counts.len() == out.len() => {
                        for (i, c) in counts.iter().enumerate() {
                            out.add(i, *c);
                        }
                    }
                    Some(map) if map.len() == counts.len() => {
                        for (&j, c) in map.iter().zip(counts) {
                            out.add(j as usize, *c);
                        }
                    }
                    _ => return Err(AddError::Internal("bucket counts do not fit their layout")),
                }
                *osum = (*osum + sum).min(f64::MAX);
            }
            _ => {
                return Err(AddError::Internal(
                    "a point's kind differs from its series'",
                ))
            }
        }
        s.created_ns = s.created_ns.min(start_ns);
        s.updated_ns = s.updated_ns.max(end_ns);
        s.touched = clock;
        Ok(id)
    }

    fn new_series(
        &mut self,
        batch: &Batch,
        p: &Point,
        fam: u32,
        add: &Add<'_>,
        start_ns: u64,
    ) -> Result<Series, LayoutMismatch> {
        let value = match add {
            Add::Int(_) | Add::Float(_) => SeriesValue::Counter(CounterValue::default()),
            Add::Hist { layout, .. } => {
                let configured = self
                    .tables
                    .family(fam)
                    .and_then(|f| self.cfg.bounds.get(&*f.otel_name))
                    .cloned();
                let out = match configured {
                    Some(b) => self.tables.layout_id(&b),
                    None => *layout,
                };
                if out != *layout {
                    self.tables.fold(*layout, out)?;
                }
                self.tables.hold_layout(out);
                SeriesValue::Histogram {
                    layout: out,
                    counts: BucketCounts::zeros(self.layout(out).len() + 1),
                    sum: 0.0,
                    input_buckets: 0,
                }
            }
        };
        let raw = batch.labels.labels(p.label_ref);
        let keys = self.tables.hold_key_set(&mut self.strings, &raw);
        self.tables.hold_family(fam);
        let values = raw.iter().map(|(_, v)| self.strings.acquire(v)).collect();
        Ok(Series {
            family: fam,
            labels: Labels { keys, values },
            created_ns: start_ns,
            updated_ns: 0,
            touched: self.clock,
            value,
        })
    }

    /// Drops series and sources idle for longer than the TTL; returns (series, sources) dropped.
    pub fn sweep(&mut self) -> (usize, usize) {
        let now = self.clock;
        let ttl = self.cfg.ttl_secs;
        let idle = |touched: u32| now.saturating_sub(touched) > ttl;
        let sources_before = self.sources_len();
        self.pods.retain(|_, p| !idle(p.touched));
        let mut released: Vec<u32> = Vec::new();
        self.cumulative.retain(|_, s| {
            let keep = !idle(s.touched);
            if !keep && s.series != NO_SERIES {
                released.push(s.series);
            }
            keep
        });
        let horizon = self.now_ns.saturating_sub(self.ttl_ns());
        self.deltas
            .retain_or(|_, w| w.newest_end() >= horizon, |id, _| released.push(id));
        for id in released {
            self.source_removed(id);
        }
        let mut dead: Vec<(u32, Box<str>, bool)> = Vec::new();
        let mut held: Vec<(u32, u32, Option<u32>)> = Vec::new();
        let strings = &mut self.strings;
        let tables = &self.tables;
        self.series.retain_or(
            |_, s| !idle(s.touched),
            |id, s| {
                let keys = tables.key_set(s.labels.keys);
                let layout = match &s.value {
                    SeriesValue::Histogram { layout, .. } => Some(*layout),
                    SeriesValue::Counter(_) => None,
                };
                held.push((s.family, s.labels.keys, layout));
                let service = keys
                    .iter()
                    .zip(s.labels.values.iter())
                    .find(|(k, _)| strings.get(**k) == SERVICE_LABEL)
                    .map_or_else(|| "".into(), |(_, v)| strings.get(*v).into());
                let overflow = budget::is_overflow(keys.iter().map(|k| strings.get(*k)));
                dead.push((id, service, overflow));
                for v in s.labels.values.iter() {
                    strings.release(*v);
                }
            },
        );
        for (family, keys, layout) in held {
            self.tables.release_family(family);
            self.tables.release_key_set(&mut self.strings, keys);
            if let Some(l) = layout {
                self.tables.release_layout(l);
            }
        }
        let dropped = dead.len();
        for (id, service, overflow) in dead {
            self.series_removed(id);
            self.series_gone(&service, overflow);
        }
        self.tables.purge();
        self.sweep_sticky();
        (dropped, sources_before - self.sources_len())
    }
}

#[cfg(test)]
#[path = "shard_tests.rs"]
mod tests;
