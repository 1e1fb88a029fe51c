//! Cardinality budgets of one shard: output series per service and in all, and source streams.
//!
//! Each shard enforces its share of a budget (the limit divided by the shard count, rounded up):
//! series spread over shards by hash, so a service reaches about its whole budget before any
//! share is full, and no shard waits on another. A point that would create a series over budget
//! is not applied here: it is handed back (`Redirect`) and the ingest task sends it on to the
//! service's overflow series (`otel_metric_overflow="true"`, `service_name`), which lives in the
//! shard its own key routes to, like any series. Its source stream's exactly-once state lives
//! there too, so the stream is marked *sticky* here and keeps going to the overflow series until
//! it has been idle for the TTL (a stream never flips between two series, and a retry of a delta
//! the overflow series took is still a duplicate).

use std::collections::HashMap;
use std::sync::Arc;

use ahash::RandomState;

use crate::aggregate::key::SetHash;
use crate::aggregate::keytable::stored_key;
use crate::aggregate::quota::{Full, SeriesQuota};
use crate::aggregate::series::{Point, PointValue};

use super::SERVICE_LABEL;
use crate::aggregate::batch::{Batch, LabelRef, LabelResolver};

type Map<K, V> = HashMap<K, V, RandomState>;

/// This shard's share of the limits enforced per shard (series budgets are shared instead,
/// see `quota.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardLimits {
    pub streams: u64,
}

impl Default for ShardLimits {
    /// No limits.
    fn default() -> Self {
        Self { streams: u64::MAX }
    }
}

impl ShardLimits {
    /// Each of `shards` shards' share of `limits.max_source_streams`.
    pub fn share(streams: u64, shards: usize) -> Self {
        Self {
            streams: streams.div_ceil(shards.max(1) as u64),
        }
    }
}

/// One service's use of this shard.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ServiceUse {
    pub series: u64,
    /// Points sent on to the service's overflow series.
    pub overflowed: u64,
    /// Shard clock of the last overflowed point: a service with no series is forgotten once
    /// this is older than the TTL.
    touched: u32,
}

/// A source stream that goes to an overflow series until it is idle for the TTL.
#[derive(Debug, Clone)]
struct Sticky {
    /// The stored output key its points carry: the shard that judges them is that key's, and
    /// a checkpoint row of the mark goes back there.
    series: u128,
    /// Shard clock when last seen.
    touched: u32,
    /// The service whose overflow series it goes to ("" is the global one), so its points need
    /// not build their labels to find it; unknown after a restore until its next point. Shared
    /// with `services`: a mark per stream must not copy a name of up to 4 KiB.
    target: Option<Arc<str>>,
}

/// What the budgets say about one point (see [`Budget::admit`]).
pub enum Admit {
    /// Its series exists, there is room for it, or it feeds an overflow series: apply it.
    Go,
    /// Send it on to the overflow series of this service ("" is the global one).
    Overflow(Box<str>),
}

/// Points a shard hands back for their service's overflow series.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Redirect {
    /// The points as they came, but each `label_ref` is `LabelRef::Entry` of `services` and
    /// histogram ranges index `counts`.
    pub points: Vec<Point>,
    pub counts: Vec<u64>,
    pub services: Vec<Box<str>>,
    /// Index into `services`, so a batch of many services stays linear.
    index: Map<Box<str>, u32>,
}

/// The budgets of one shard.
pub struct Budget {
    services: Map<Arc<str>, ServiceUse>,
    /// Source streams sent to overflow series: at most the shard's stream share.
    sticky: Map<u128, Sticky>,
    /// The series budgets all shards draw from.
    quota: Arc<SeriesQuota>,
    limits: ShardLimits,
    /// Overflow marks set again under another series key.
    moves: u64,
}

impl Budget {
    pub fn new(quota: Arc<SeriesQuota>, limits: ShardLimits) -> Self {
        Self {
            services: Map::default(),
            sticky: Map::default(),
            quota,
            limits,
            moves: 0,
        }
    }

    /// How many times an overflow mark was set again under another series key.
    pub fn moves(&self) -> u64 {
        self.moves
    }

    /// Per-service use of this shard.
    pub fn services(&self) -> impl Iterator<Item = (&str, ServiceUse)> {
        self.services.iter().map(|(k, v)| (&**k, *v))
    }

    pub fn limits(&self) -> ShardLimits {
        self.limits
    }

    /// `limits.max_series_per_service`, as the shared quota enforces it.
    pub fn series_budget(&self) -> u64 {
        self.quota.per_service()
    }

    /// What the series budgets say about `p`, whose series exists if `exists`; `service`
    /// names the service its new series would have. A stream already sent to an overflow
    /// series keeps going there; a point that would create a series goes on if the shared
    /// quota (`quota.rs`) has room (the series is counted when it is created), else to its
    /// service's overflow series (the service is at its limit) or to the one global overflow
    /// series, service "" (all services are at `max_series`).
    pub fn admit(
        &self,
        batch: &Batch,
        p: &Point,
        exists: bool,
        service: impl Fn() -> Box<str>,
    ) -> Admit {
        if batch.overflow {
            return Admit::Go;
        }
        if !self.sticky.is_empty() {
            if let Some(s) = self.sticky.get(&stored_key(p.source)) {
                return Admit::Overflow(s.target.as_deref().map_or_else(&service, Box::from));
            }
        }
        if exists {
            return Admit::Go;
        }
        let service = service();
        match self.quota.fits(&service) {
            Ok(()) => Admit::Go,
            Err(Full::Service) => Admit::Overflow(service),
            Err(Full::Global) => Admit::Overflow("".into()),
        }
    }

    /// Whether the stream `source` goes to an overflow series.
    pub fn is_sticky(&self, source: u128) -> bool {
        !self.sticky.is_empty() && self.sticky.contains_key(&stored_key(source))
    }

    /// Whether `source` may be marked sticky: it is, or fewer marks than twice the shard's
    /// share of the stream budget are held. A mark is kept even when the overflow series' shard
    /// then refuses the stream, so without this a client making up streams would add marks for
    /// as long as it sent. Marks live in the shard of the series a stream would have fed, not
    /// of its own: twice the share leaves room for that skew, and a legitimate sender reaches
    /// it only after the stream budget itself refuses new streams.
    pub fn sticky_room(&self, source: u128) -> bool {
        (self.sticky.len() as u64) < self.limits.streams.saturating_mul(2)
            || self.sticky.contains_key(&stored_key(source))
    }

    /// Overflow marks held, and the distinct service names they hold between them.
    #[cfg(test)]
    pub fn sticky_names(&self) -> (usize, usize) {
        let names: std::collections::HashSet<*const u8> = self
            .sticky
            .values()
            .filter_map(|s| s.target.as_ref().map(|t| t.as_ptr()))
            .collect();
        (self.sticky.len(), names.len())
    }

    /// Hands `p` back for the overflow series of `service`, and marks its stream sticky.
    pub fn redirect(
        &mut self,
        batch: &Batch,
        p: &Point,
        service: Box<str>,
        out: &mut Redirect,
        clock: u32,
    ) {
        let name = match self.services.get_key_value(&*service) {
            Some((name, _)) => name.clone(),
            None => {
                let name: Arc<str> = Arc::from(&*service);
                self.services.insert(name.clone(), ServiceUse::default());
                name
            }
        };
        if let Some(u) = self.services.get_mut(&*name) {
            u.overflowed += 1;
            u.touched = clock;
        }
        let sticky = Sticky {
            series: stored_key(p.series),
            touched: clock,
            target: Some(name),
        };
        let series = sticky.series;
        if let Some(old) = self.sticky.insert(stored_key(p.source), sticky) {
            // Marked again under another key (the label projection changed): a checkpoint read
            // in parts may have missed the mark.
            self.moves += u64::from(old.series != series);
        }
        let idx = match out.index.get(&service) {
            Some(&i) => i,
            None => {
                let i = out.services.len() as u32;
                out.index.insert(service.clone(), i);
                out.services.push(service);
                i
            }
        };
        let mut q = p.clone();
        q.label_ref = LabelRef::Entry(idx);
        if let PointValue::Histogram { counts, .. } = &mut q.value {
            let from = out.counts.len() as u32;
            out.counts.extend_from_slice(
                batch
                    .counts
                    .get(counts.0 as usize..counts.1 as usize)
                    .unwrap_or(&[]),
            );
            *counts = (from, out.counts.len() as u32);
        }
        out.points.push(q);
    }

    /// Whether one more source stream, beside `streams`, passes this shard's stream budget.
    pub fn stream_room(&self, streams: usize) -> bool {
        (streams as u64) < self.limits.streams
    }

    /// Counts a new series of `service` (an overflow series, in the shard's use only: the
    /// shared quota does not count those, see `quota.rs`).
    pub fn series_added(&mut self, service: &str, overflow: bool, clock: u32) {
        if !overflow {
            self.quota.force(service);
        }
        match self.services.get_mut(service) {
            Some(u) => u.series += 1,
            None => {
                let u = ServiceUse {
                    series: 1,
                    overflowed: 0,
                    touched: clock,
                };
                self.services.insert(service.into(), u);
            }
        }
    }

    /// Counts a series of `service` gone; `overflow` as it was added.
    pub fn series_gone(&mut self, service: &str, overflow: bool) {
        if !overflow {
            self.quota.give_back(service);
        }
        if let Some(u) = self.services.get_mut(service) {
            u.series = u.series.saturating_sub(1);
            if u.series == 0 && u.overflowed == 0 {
                self.services.remove(service);
            }
        }
    }

    /// Source streams that go to overflow series (stored keys), the stored output key of their
    /// points, and whether they go to the global overflow series.
    pub fn sticky_streams(&self) -> impl Iterator<Item = (u128, u128, bool)> + '_ {
        self.sticky
            .iter()
            .map(|(k, s)| (*k, s.series, s.target.as_deref() == Some("")))
    }

    /// Marks a stream as going to an overflow series (as a checkpoint recorded it).
    pub fn restore_sticky(&mut self, source: u128, series: u128, global: bool, clock: u32) {
        let sticky = Sticky {
            series: stored_key(series),
            touched: clock,
            target: global.then(|| "".into()),
        };
        self.sticky.insert(stored_key(source), sticky);
    }

    /// Forgets sticky streams `idle` says were not seen within the TTL, and services with no
    /// series whose last overflowed point is as old.
    pub fn sweep(&mut self, idle: impl Fn(u32) -> bool) {
        self.sticky.retain(|_, s| !idle(s.touched));
        self.services
            .retain(|_, u| u.series > 0 || !idle(u.touched));
    }
}

/// Resolves the labels of overflow series: `otel_metric_overflow="true"` and the service.
pub struct OverflowLabels {
    pub services: Vec<Box<str>>,
}

pub use crate::aggregate::naming::OVERFLOW_LABEL;

/// Whether a series with these label names is an overflow series.
pub fn is_overflow<'a>(mut names: impl Iterator<Item = &'a str>) -> bool {
    names.any(|k| k == OVERFLOW_LABEL)
}

impl LabelResolver for OverflowLabels {
    fn labels(&self, label_ref: LabelRef) -> Option<Vec<(String, String)>> {
        let LabelRef::Entry(i) = label_ref else {
            return None;
        };
        let service = self.services.get(i as usize)?;
        let mut labels = vec![(OVERFLOW_LABEL.to_owned(), "true".to_owned())];
        // An empty value is no label, as for every other series.
        if !service.is_empty() {
            labels.push((SERVICE_LABEL.to_owned(), service.to_string()));
        }
        Some(labels)
    }
}

/// The output key of a service's overflow series in a family (`seed` is the family's key seed):
/// the hash of its labels, like every output key.
pub fn overflow_key(service: &str, seed: u64) -> u128 {
    let mut set = SetHash::default();
    set.add(OVERFLOW_LABEL, "true");
    if !service.is_empty() {
        set.add(SERVICE_LABEL, service);
    }
    set.finish(seed)
}
