//! One shard's state and the apply logic. A shard is owned by exactly one thread (see
//! `table.rs`), so everything here is plain data: no locks, no atomics. Every point of one
//! output series lands in the same shard, and so do all the source streams that feed it.
//!
//! The parts, each with its own invariants: `store` (output series, their interned labels and
//! tables), `sources` (each pod's stream and the series it feeds), `ids` (the handles between
//! the two), `budget` (cardinality budgets and overflow), `persist` (checkpoint records). This
//! module decides, per point, what the parts do; none of them reaches into another.
//!
//! Memory: series and delta sources live in dense key tables; label values are 4-byte ids into
//! a refcounted interner; label names are shared per distinct name list.

use std::collections::HashMap;

use ahash::RandomState;

pub use super::batch::{Batch, BatchResult, LabelRef, LabelResolver, Outcome};
use crate::aggregate::key::{FamilyDesc, Labels};
use crate::aggregate::series::{CumulativeValue, Point, PointValue, Series, Temporality};
use crate::aggregate::window::Verdict;

mod budget;
mod config;
mod ids;
mod persist;
mod pods;
mod sources;
mod store;

use budget::Admit;
use ids::SeriesIds;
use pods::Pods;
use sources::{NewStream, Sources};
use store::{internal, Add, NewSeries, Store};

pub use budget::{overflow_key, OverflowLabels, Redirect, ServiceUse, ShardLimits, OVERFLOW_LABEL};
pub use config::{SeriesFilter, ShardConfig};
pub use persist::{Part, RestoreError, SeriesRecord, StreamState, ValueRecord};

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

/// The state of one shard.
pub struct ShardState {
    cfg: ShardConfig,
    store: Store,
    sources: Sources,
    ids: SeriesIds,
    budget: budget::Budget,
    pods: Pods,
    /// Shard clock in seconds, advanced by the owner thread.
    pub clock: u32,
    /// Wall clock (Unix ns), advanced by the owner thread. Delta streams expire by data time:
    /// a stream whose newest end is older than `now - ttl` is dropped.
    pub now_ns: u64,
}

impl ShardState {
    pub fn new(cfg: ShardConfig) -> Self {
        Self {
            store: Store::new(cfg.max_families),
            budget: budget::Budget::new(cfg.quota.clone(), cfg.limits),
            cfg,
            sources: Sources::default(),
            ids: SeriesIds::default(),
            pods: Pods::default(),
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
        self.store.len()
    }
    /// Bytes of the shard's index allocations: a change means one was reallocated.
    pub fn index_bytes(&self) -> usize {
        self.sources.index_bytes() + self.store.index_bytes()
    }
    pub fn sources_len(&self) -> usize {
        self.sources.len()
    }
    /// Holes delta windows gave up to stay within their limit, since start.
    pub fn holes_given_up(&self) -> u64 {
        self.sources.holes_given_up()
    }
    /// Bytes held by the delta source table (for the memory benchmark).
    pub fn delta_table_bytes(&self) -> usize {
        self.sources.delta_bytes()
    }
    pub fn families(&self) -> &[FamilyDesc] {
        self.store.tables().families()
    }
    pub fn layout(&self, id: u32) -> &[f64] {
        self.store.tables().layout(id)
    }
    /// (layouts, fold maps, label-name lists) interned.
    pub fn table_sizes(&self) -> (usize, usize, usize) {
        self.store.tables().sizes()
    }
    /// Every live series, in no particular order.
    pub fn series(&self) -> impl Iterator<Item = &Series> {
        self.store.values()
    }
    /// The live series that `filter` selects, with their family and source stream count.
    pub fn select<'a>(
        &'a self,
        filter: &'a SeriesFilter,
    ) -> impl Iterator<Item = (&'a Series, &'a FamilyDesc, u32)> + 'a {
        self.series_with_sources().filter_map(move |(s, streams)| {
            let fam = self.store.tables().family(s.family)?;
            if !filter.takes(fam) {
                return None;
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
        self.store
            .iter()
            .map(|(_, id, s)| (s, id.map_or(0, |id| self.ids.sources(id))))
    }

    /// A series' `service_name` label ("" without one): what budgets and reports group by.
    pub fn service<'a>(&'a self, labels: &'a Labels) -> &'a str {
        self.store.service(labels)
    }

    /// A series' labels as (name, value) pairs, sorted by name.
    pub fn labels<'a>(&'a self, labels: &'a Labels) -> impl Iterator<Item = (&'a str, &'a str)> {
        self.store.labels(labels)
    }

    /// Per-service use of this shard.
    pub fn service_use(&self) -> impl Iterator<Item = (&str, ServiceUse)> {
        self.budget.services()
    }

    /// Series, source streams and overflowed points per service (one pass over the series).
    pub fn service_lines(&self) -> Vec<super::table::ServiceLine> {
        let mut streams: Map<&str, u64> = Map::default();
        for (s, n) in self.series_with_sources() {
            *streams.entry(self.service(&s.labels)).or_default() += u64::from(n);
        }
        self.budget
            .services()
            .map(|(k, u)| super::table::ServiceLine {
                service: k.into(),
                series: u.series,
                streams: streams.get(k).copied().unwrap_or(0),
                overflowed: u.overflowed,
            })
            .collect()
    }

    /// This shard's share of the budgets.
    pub fn limits(&self) -> ShardLimits {
        self.budget.limits()
    }

    /// `limits.max_series_per_service`, as the shared quota enforces it.
    pub fn series_budget(&self) -> u64 {
        self.budget.series_budget()
    }

    /// Source streams that go to overflow series (stored keys), the stored output key of their
    /// points, and whether they go to the global overflow series.
    pub fn sticky_streams(&self) -> impl Iterator<Item = (u128, u128, bool)> + '_ {
        self.budget.sticky_streams()
    }

    /// Marks a stream as going to an overflow series (as a checkpoint recorded it).
    pub fn restore_sticky(&mut self, source: u128, series: u128, global: bool) {
        self.budget
            .restore_sticky(source, series, global, self.clock);
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
        self.store.end_batch();
        result
    }

    fn apply_points(&mut self, batch: &Batch) -> BatchResult {
        let mut result = BatchResult::default();
        let mut fam_ids: Vec<Option<u32>> = vec![None; batch.families.len()];
        let mut layout_ids: Vec<Option<u32>> = vec![None; batch.layouts.len()];
        let mut last_pod = None;
        for p in &batch.points {
            // The family first: a point past the family cap is refused, not sent to overflow.
            let Some(desc) = batch.families.get(p.family as usize) else {
                continue;
            };
            let fam = match fam_ids[p.family as usize] {
                Some(id) => id,
                None => match self.store.family_id(desc) {
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
            if self.too_late_for_a_new_stream(batch, p) {
                result.counts[Outcome::TooLate as usize] += 1;
                continue;
            }
            let exists = self.store.get(p.series).is_some();
            let service = || service_of(batch, p);
            if let Admit::Overflow(service) = self.budget.admit(batch, p, exists, service) {
                // A replay re-applies what was acknowledged: marks restored from a checkpoint
                // have not aged as the live ones had, so they must not refuse it.
                if batch.now_ns.is_none() && !self.budget.sticky_room(p.source) {
                    result.counts[Outcome::StreamLimit as usize] += 1;
                    continue;
                }
                let out = result.redirect.get_or_insert_with(Default::default);
                self.budget.redirect(batch, p, service, out, self.clock);
                continue;
            }
            let outcome = match p.temporality {
                Temporality::Delta => self.apply_delta(batch, p, fam, exists, &mut layout_ids),
                Temporality::Cumulative => self.apply_cumulative(batch, p, fam, exists),
            };
            result.counts[outcome as usize] += 1;
            // A pod is one whose points leave state here, not any resource a client names.
            // Points of one resource come together: one record per pod and batch.
            if last_pod != Some(p.resource) && self.sources.contains(p.source) {
                last_pod = Some(p.resource);
                let cap = self.budget.limits().streams;
                self.pods
                    .saw(p.resource, self.clock, cap, || service_of(batch, p));
            }
        }
        result
    }

    /// Whether `p` ended longer than the TTL ago: for a stream the shard does not hold, possibly
    /// a replay of something applied before it expired.
    fn older_than_ttl(&self, p: &Point) -> bool {
        p.end_ns.saturating_add(self.ttl_ns()) < self.now_ns
    }

    /// Whether `p` is a delta older than the TTL of a stream this shard does not hold (nor sent
    /// to overflow): refused as `apply_delta` would, but before any budget is consulted. It
    /// creates nothing, and a budget check it passed without using would be judged again on
    /// replay against series created after it (checkpoint parts read later).
    fn too_late_for_a_new_stream(&self, batch: &Batch, p: &Point) -> bool {
        !batch.overflow
            && p.temporality == Temporality::Delta
            && self.older_than_ttl(p)
            && self.sources.window(p.source).is_none()
            && !self.budget.is_sticky(p.source)
    }

    /// Pods seen within the TTL: resource identity hash and service.
    pub fn pods(&self) -> impl Iterator<Item = (u64, &str)> {
        self.pods.iter()
    }

    /// Records a pod read back from a checkpoint.
    pub fn restore_pod(&mut self, resource: u64, service: &str) {
        self.pods.restore(resource, service, self.clock);
    }

    /// The value of `v` to add, its layout interned; `None` if it points outside its batch.
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
                        let id = self.store.layout_id(batch.layouts.get(layout as usize)?);
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

    /// Applies a delta point; `exists`: whether its series does.
    fn apply_delta(
        &mut self,
        batch: &Batch,
        p: &Point,
        fam: u32,
        exists: bool,
        layout_ids: &mut [Option<u32>],
    ) -> Outcome {
        let late = self.cfg.late_ns;
        let verdict = match self.sources.window(p.source) {
            Some(w) => w.classify(p.start_ns, p.end_ns, late, p.fp),
            // A stream we do not know (new, or expired after `series_ttl`) whose delta is older
            // than the TTL could be a replay of something applied before it expired.
            None if self.older_than_ttl(p) => Verdict::TooLate,
            // A cumulative stream turning delta replaces itself: it adds no stream. (Refusing it
            // would also make a replay judge it against streams created after it.)
            None if !self.sources.contains(p.source)
                && !self.budget.stream_room(self.sources.len()) =>
            {
                return Outcome::StreamLimit
            }
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
        match self.add_to_series(batch, p, fam, exists, add, p.start_ns) {
            Ok(id) => {
                self.sources.record_delta(&mut self.ids, p, id, late);
                outcome
            }
            Err(outcome) => outcome,
        }
    }

    /// Applies a cumulative point; `exists`: whether its series does.
    fn apply_cumulative(&mut self, batch: &Batch, p: &Point, fam: u32, exists: bool) -> Outcome {
        let mut interned = None;
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
                // The stream keeps the shard's interned bounds: one allocation per layout on
                // the shard's own thread, whatever request or stream carried it.
                let (id, shared) = self.store.layout_shared(bounds);
                interned = Some(id);
                CumulativeValue::Histogram {
                    bounds: shared,
                    counts: counts.into(),
                    sum: *sum,
                    count: *count,
                }
            }
        };
        let new = NewStream {
            process_start_ns: self.cfg.process_start_ns,
            ttl_ns: self.ttl_ns(),
            now_ns: self.now_ns,
            room: self.budget.stream_room(self.sources.len()),
        };
        let step = match self
            .sources
            .cumulative(&mut self.ids, p, value, self.clock, new)
        {
            Ok(step) => step,
            Err(outcome) => return outcome,
        };
        let add = match &step.value {
            CumulativeValue::Int(i) => Add::Int(*i),
            CumulativeValue::Float(f) => Add::Float(*f),
            CumulativeValue::Histogram {
                bounds,
                counts,
                sum,
                ..
            } => Add::Hist {
                // The point's bounds, as a difference keeps them.
                layout: interned.unwrap_or_else(|| self.store.layout_id(bounds)),
                counts,
                sum: *sum,
            },
        };
        match self.add_to_series(batch, p, fam, exists, add, step.start_ns) {
            Ok(id) => {
                self.sources.link_cumulative(&mut self.ids, p, id);
                step.outcome
            }
            Err(outcome) => outcome,
        }
    }

    /// Adds `add` over `(start_ns, p.end_ns)` to `p`'s series, creating it (and counting it in
    /// its service's budget) unless it `exists`.
    fn add_to_series(
        &mut self,
        batch: &Batch,
        p: &Point,
        fam: u32,
        exists: bool,
        add: Add<'_>,
        start_ns: u64,
    ) -> Result<ids::SeriesId, Outcome> {
        if !exists {
            // Configured output bounds are a histogram's only.
            let configured = match add {
                Add::Hist { .. } => self
                    .store
                    .tables()
                    .family(fam)
                    .and_then(|f| self.cfg.bounds.get(&*f.otel_name))
                    .cloned(),
                Add::Int(_) | Add::Float(_) => None,
            };
            let value = self
                .store
                .empty_value(&add, configured.as_deref())
                .map_err(|_| Outcome::LayoutMismatch)?;
            let Some(labels) = batch.labels.labels(p.label_ref) else {
                return Err(internal("a point's label handle is not its resolver's"));
            };
            let new = NewSeries {
                family: fam,
                labels: &labels,
                value,
                created_ns: start_ns,
                updated_ns: 0,
            };
            if self
                .store
                .create(&mut self.ids, p.series, new, self.clock)
                .is_none()
            {
                return Err(internal("series ids exhausted"));
            }
            let overflow = budget::is_overflow(labels.iter().map(|(k, _)| &k[..]));
            self.budget
                .series_added(service_in(&labels), overflow, self.clock);
        }
        self.store
            .add(p.series, add, start_ns, p.end_ns, self.clock)
            .map_err(|e| e.outcome())
    }

    /// Drops series and sources idle for longer than the TTL; returns (series, sources) dropped.
    pub fn sweep(&mut self) -> (usize, usize) {
        let (now, ttl) = (self.clock, self.cfg.ttl_secs);
        let idle = |touched: u32| now.saturating_sub(touched) > ttl;
        let sources_before = self.sources.len();
        self.pods.sweep(idle);
        let horizon = self.now_ns.saturating_sub(self.ttl_ns());
        self.sources.sweep(&mut self.ids, idle, horizon);
        let gone = self.store.sweep(&mut self.ids, idle);
        for g in &gone {
            self.budget.series_gone(&g.service, g.overflow);
        }
        self.budget.sweep(idle);
        (gone.len(), sources_before - self.sources.len())
    }
}

/// The `service_name` label a new series of `p` would get ("" if its labels cannot be had).
fn service_of(batch: &Batch, p: &Point) -> Box<str> {
    batch
        .labels
        .labels(p.label_ref)
        .map_or_else(|| "".into(), |l| service_in(&l).into())
}

#[cfg(test)]
mod tests;
