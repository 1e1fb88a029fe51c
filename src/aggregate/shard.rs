//! One shard's state and the apply logic. A shard is owned by exactly one thread (see
//! `table.rs`), so everything here is plain data: no locks, no atomics except the published
//! stats. Every point of one output series lands in the same shard, and so do all the source
//! streams that feed it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use ahash::RandomState;

use super::key::{FamilyDesc, Kind, Labels};
use super::layout::{fold_map, LayoutMismatch};
use super::series::{
    cumulative_step, CounterValue, CumulativeDelta, CumulativeState, CumulativeValue, Point,
    PointValue, Series, SeriesValue, SourceKind, SourceState, Temporality,
};
use super::window::{Verdict, Window};

/// Turns a point's opaque `label_ref` into output labels (sanitised keys, sorted). Called only
/// when a point creates a new series, so the hot path never builds labels.
pub trait LabelResolver: Send + Sync {
    fn labels(&self, label_ref: [u32; 4]) -> Vec<(String, String)>;
}

/// Points for one shard from one request, and how to report back.
pub struct Batch {
    pub families: Arc<[FamilyDesc]>,
    pub layouts: Arc<[Arc<[f64]>]>,
    pub counts: Vec<u64>,
    pub points: Vec<Point>,
    pub labels: Arc<dyn LabelResolver>,
    pub done: Box<dyn FnOnce(BatchResult) + Send>,
}

/// What happened to one point in a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied = 0,
    AppliedAfterGap,
    AppliedLate,
    CumulativeReset,
    /// First point of a cumulative stream that began before we started: only remembered.
    CumulativeBaseline,
    /// A cumulative point not newer than the last one.
    CumulativeStale,
    Duplicate,
    TooLate,
    LayoutMismatch,
}

impl Outcome {
    pub const COUNT: usize = 9;
    pub const ALL: [Outcome; Self::COUNT] = [
        Self::Applied,
        Self::AppliedAfterGap,
        Self::AppliedLate,
        Self::CumulativeReset,
        Self::CumulativeBaseline,
        Self::CumulativeStale,
        Self::Duplicate,
        Self::TooLate,
        Self::LayoutMismatch,
    ];
    /// Refused: reported to the client in the partial success.
    pub fn rejected(self) -> bool {
        matches!(self, Self::TooLate | Self::LayoutMismatch)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::AppliedAfterGap => "applied_after_gap",
            Self::AppliedLate => "applied_late",
            Self::CumulativeReset => "cumulative_reset",
            Self::CumulativeBaseline => "cumulative_baseline",
            Self::CumulativeStale => "cumulative_stale",
            Self::Duplicate => "duplicate",
            Self::TooLate => "too_late",
            Self::LayoutMismatch => "layout_mismatch",
        }
    }
}

/// Per-outcome counts of one batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchResult {
    pub counts: [u32; Outcome::COUNT],
}

impl BatchResult {
    pub fn add(&mut self, other: &BatchResult) {
        for (a, b) in self.counts.iter_mut().zip(other.counts) {
            *a += b;
        }
    }
    pub fn get(&self, o: Outcome) -> u32 {
        self.counts[o as usize]
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
}

type Map<K, V> = HashMap<K, V, RandomState>;
type FoldResult = Result<Arc<[u16]>, LayoutMismatch>;

/// A value to add, borrowed from a batch or a cumulative difference.
enum Add<'a> {
    Int(u64),
    Float(f64),
    Hist {
        layout: u32,
        counts: &'a [u64],
        sum: f64,
        count: u64,
    },
}

/// The state of one shard.
pub struct ShardState {
    cfg: ShardConfig,
    families: Vec<FamilyDesc>,
    family_index: Map<(Arc<str>, Kind), u32>,
    layouts: Vec<Arc<[f64]>>,
    layout_index: Map<Box<[u64]>, u32>,
    folds: Map<(u32, u32), FoldResult>,
    series: Vec<Option<Series>>,
    free: Vec<u32>,
    series_index: Map<u128, u32>,
    sources: Map<u128, SourceState>,
    strings: HashSet<Arc<str>, RandomState>,
    /// Shard clock in seconds, advanced by the owner thread.
    pub clock: u32,
}

impl ShardState {
    pub fn new(cfg: ShardConfig) -> Self {
        Self {
            cfg,
            families: Vec::new(),
            family_index: Map::default(),
            layouts: Vec::new(),
            layout_index: Map::default(),
            folds: Map::default(),
            series: Vec::new(),
            free: Vec::new(),
            series_index: Map::default(),
            sources: Map::default(),
            strings: HashSet::default(),
            clock: 0,
        }
    }

    pub fn ttl_secs(&self) -> u32 {
        self.cfg.ttl_secs
    }
    pub fn series_len(&self) -> usize {
        self.series_index.len()
    }
    pub fn sources_len(&self) -> usize {
        self.sources.len()
    }
    pub fn families(&self) -> &[FamilyDesc] {
        &self.families
    }
    pub fn layout(&self, id: u32) -> &[f64] {
        self.layouts.get(id as usize).map_or(&[], |l| l)
    }
    /// Every live series, in no particular order.
    pub fn series(&self) -> impl Iterator<Item = &Series> {
        self.series.iter().flatten()
    }

    fn intern(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.strings.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        self.strings.insert(a.clone());
        a
    }

    fn family_id(&mut self, desc: &FamilyDesc) -> u32 {
        if let Some(&id) = self.family_index.get(&(desc.name.clone(), desc.kind)) {
            return id;
        }
        let id = self.families.len() as u32;
        self.families.push(desc.clone());
        self.family_index.insert((desc.name.clone(), desc.kind), id);
        id
    }

    fn layout_id(&mut self, bounds: &[f64]) -> u32 {
        let bits: Box<[u64]> = bounds.iter().map(|b| b.to_bits()).collect();
        if let Some(&id) = self.layout_index.get(&bits) {
            return id;
        }
        let id = self.layouts.len() as u32;
        self.layouts.push(bounds.into());
        self.layout_index.insert(bits, id);
        id
    }

    /// Applies one batch and returns what happened to each point.
    pub fn apply(&mut self, batch: &Batch) -> BatchResult {
        let mut result = BatchResult::default();
        let mut fam_ids: Vec<Option<u32>> = vec![None; batch.families.len()];
        let mut layout_ids: Vec<Option<u32>> = vec![None; batch.layouts.len()];
        for p in &batch.points {
            let Some(desc) = batch.families.get(p.family as usize) else {
                continue;
            };
            let fam = match fam_ids[p.family as usize] {
                Some(id) => id,
                None => {
                    let id = self.family_id(desc);
                    fam_ids[p.family as usize] = Some(id);
                    id
                }
            };
            let outcome = match p.temporality {
                Temporality::Delta => self.apply_delta(batch, p, fam, &mut layout_ids),
                Temporality::Cumulative => self.apply_cumulative(batch, p, fam),
            };
            result.counts[outcome as usize] += 1;
        }
        result
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
                count,
            } => {
                let slot = layout_ids.get_mut(layout as usize)?;
                let id = match *slot {
                    Some(id) => id,
                    None => {
                        let bounds = batch.layouts.get(layout as usize)?;
                        let id = self.layout_id(bounds);
                        *slot = Some(id);
                        id
                    }
                };
                Add::Hist {
                    layout: id,
                    counts: batch.counts.get(from as usize..to as usize)?,
                    sum,
                    count,
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
        let verdict = match self.sources.get(&p.source).map(|s| &s.kind) {
            Some(SourceKind::Delta(w)) => w.classify(p.start_ns, p.end_ns, late),
            _ => Verdict::Apply,
        };
        let outcome = match verdict {
            Verdict::Apply => Outcome::Applied,
            Verdict::ApplyAfterGap => Outcome::AppliedAfterGap,
            Verdict::ApplyLate => Outcome::AppliedLate,
            Verdict::Duplicate => return Outcome::Duplicate,
            Verdict::TooLate => return Outcome::TooLate,
        };
        let Some(add) = self.batch_add(batch, &p.value, layout_ids) else {
            return Outcome::LayoutMismatch;
        };
        if self
            .add_to_series(batch, p, fam, add, p.start_ns, p.end_ns)
            .is_err()
        {
            return Outcome::LayoutMismatch;
        }
        let clock = self.clock;
        match self.sources.get_mut(&p.source) {
            Some(SourceState {
                kind: SourceKind::Delta(w),
                touched,
            }) => {
                w.record(p.start_ns, p.end_ns, late);
                *touched = clock;
            }
            _ => {
                self.sources.insert(
                    p.source,
                    SourceState {
                        kind: SourceKind::Delta(Window::new(p.start_ns, p.end_ns)),
                        touched: clock,
                    },
                );
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
                    return Outcome::LayoutMismatch;
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
        let (start, delta, outcome) = match self.sources.get_mut(&p.source) {
            Some(SourceState {
                kind: SourceKind::Cumulative(state),
                touched,
            }) => {
                *touched = clock;
                match cumulative_step(state, p.start_ns, p.end_ns, value) {
                    CumulativeDelta::Stale => return Outcome::CumulativeStale,
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
            _ => {
                let state = CumulativeState {
                    start_ns: p.start_ns,
                    end_ns: p.end_ns,
                    value: value.clone(),
                };
                self.sources.insert(
                    p.source,
                    SourceState {
                        kind: SourceKind::Cumulative(Box::new(state)),
                        touched: clock,
                    },
                );
                if p.start_ns <= self.cfg.process_start_ns {
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
                count,
            } => Add::Hist {
                layout: self.layout_id(bounds),
                counts,
                sum: *sum,
                count: *count,
            },
        };
        match self.add_to_series(batch, p, fam, add, start, p.end_ns) {
            Ok(()) => outcome,
            Err(LayoutMismatch) => Outcome::LayoutMismatch,
        }
    }

    fn fold(&mut self, input: u32, output: u32) -> Result<Arc<[u16]>, LayoutMismatch> {
        if let Some(r) = self.folds.get(&(input, output)) {
            return r.clone();
        }
        let r = fold_map(self.layout(input), self.layout(output)).map(Arc::from);
        self.folds.insert((input, output), r.clone());
        r
    }

    fn add_to_series(
        &mut self,
        batch: &Batch,
        p: &Point,
        fam: u32,
        add: Add<'_>,
        start_ns: u64,
        end_ns: u64,
    ) -> Result<(), LayoutMismatch> {
        let idx = match self.series_index.get(&p.series) {
            Some(&i) => i,
            None => self.create_series(batch, p, fam, &add, start_ns)?,
        };
        // Fold maps are looked up before borrowing the series mutably.
        let fold = match (&add, self.series.get(idx as usize)) {
            (
                Add::Hist { layout, .. },
                Some(Some(Series {
                    value: SeriesValue::Histogram { layout: out, .. },
                    ..
                })),
            ) if layout != out => Some(self.fold(*layout, *out)?),
            _ => None,
        };
        let clock = self.clock;
        let Some(Some(s)) = self.series.get_mut(idx as usize) else {
            return Err(LayoutMismatch);
        };
        match (&mut s.value, add) {
            (SeriesValue::Counter(c), Add::Int(i)) => c.int = c.int.saturating_add(i),
            (SeriesValue::Counter(c), Add::Float(f)) => c.float += f,
            (
                SeriesValue::Histogram {
                    counts: out,
                    sum: osum,
                    count: ocount,
                    ..
                },
                Add::Hist {
                    counts, sum, count, ..
                },
            ) => {
                match fold {
                    None if counts.len() == out.len() => {
                        for (o, c) in out.iter_mut().zip(counts) {
                            *o = o.saturating_add(*c);
                        }
                    }
                    Some(map) if map.len() == counts.len() => {
                        for (&j, c) in map.iter().zip(counts) {
                            if let Some(o) = out.get_mut(j as usize) {
                                *o = o.saturating_add(*c);
                            }
                        }
                    }
                    _ => return Err(LayoutMismatch),
                }
                *osum += sum;
                *ocount = ocount.saturating_add(count);
            }
            _ => return Err(LayoutMismatch),
        }
        s.created_ns = s.created_ns.min(start_ns);
        s.updated_ns = s.updated_ns.max(end_ns);
        s.touched = clock;
        Ok(())
    }

    fn create_series(
        &mut self,
        batch: &Batch,
        p: &Point,
        fam: u32,
        add: &Add<'_>,
        start_ns: u64,
    ) -> Result<u32, LayoutMismatch> {
        let value = match add {
            Add::Int(_) | Add::Float(_) => SeriesValue::Counter(CounterValue::default()),
            Add::Hist { layout, .. } => {
                let configured = self
                    .families
                    .get(fam as usize)
                    .and_then(|f| self.cfg.bounds.get(&*f.otel_name))
                    .cloned();
                let out = match configured {
                    Some(b) => self.layout_id(&b),
                    None => *layout,
                };
                if out != *layout {
                    self.fold(*layout, out)?;
                }
                SeriesValue::Histogram {
                    layout: out,
                    counts: vec![0; self.layout(out).len() + 1].into(),
                    sum: 0.0,
                    count: 0,
                }
            }
        };
        let raw = batch.labels.labels(p.label_ref);
        let labels: Labels = raw
            .iter()
            .map(|(k, v)| (self.intern(k), self.intern(v)))
            .collect();
        let series = Series {
            family: fam,
            labels,
            created_ns: start_ns,
            updated_ns: 0,
            touched: self.clock,
            value,
        };
        let idx = match self.free.pop() {
            Some(i) => {
                self.series[i as usize] = Some(series);
                i
            }
            None => {
                self.series.push(Some(series));
                (self.series.len() - 1) as u32
            }
        };
        self.series_index.insert(p.series, idx);
        Ok(idx)
    }

    /// Drops series and sources idle for longer than the TTL; returns (series, sources) dropped.
    pub fn sweep(&mut self) -> (usize, usize) {
        let now = self.clock;
        let ttl = self.cfg.ttl_secs;
        let idle = |touched: u32| now.saturating_sub(touched) > ttl;
        let sources_before = self.sources.len();
        self.sources.retain(|_, s| !idle(s.touched));
        let mut dropped = 0;
        for (i, slot) in self.series.iter_mut().enumerate() {
            if slot.as_ref().is_some_and(|s| idle(s.touched)) {
                *slot = None;
                self.free.push(i as u32);
                dropped += 1;
            }
        }
        if dropped > 0 {
            let series = &self.series;
            self.series_index
                .retain(|_, i| series.get(*i as usize).is_some_and(Option::is_some));
            self.strings.retain(|s| Arc::strong_count(s) > 1);
        }
        (dropped, sources_before - self.sources.len())
    }
}
