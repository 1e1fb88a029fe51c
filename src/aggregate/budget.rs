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

use super::*;

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

#[derive(Debug, Default)]
pub(super) struct Budget {
    pub(super) services: Map<Box<str>, ServiceUse>,
    /// Source streams sent to overflow series.
    sticky: Map<u128, Sticky>,
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
    /// not build their labels to find it; unknown after a restore until its next point.
    target: Option<Box<str>>,
}

/// What the budgets say about one point (see `ShardState::admit`).
pub(super) enum Admit {
    /// Its series exists, there is room for it, or it feeds an overflow series: apply it.
    Go,
    /// Send it on to the overflow series of this service ("" is the global one).
    Overflow(Box<str>),
}

/// Points a shard hands back for their service's overflow series.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Redirect {
    /// The points as they came, but `label_ref[0]` indexes `services` and histogram ranges
    /// index `counts`.
    pub points: Vec<Point>,
    pub counts: Vec<u64>,
    pub services: Vec<Box<str>>,
    /// Index into `services`, so a batch of many services stays linear.
    index: HashMap<Box<str>, u32, ahash::RandomState>,
}

/// The `service_name` label of a point, as its new series would get it.
fn service_of(batch: &Batch, p: &Point) -> Box<str> {
    service_in(&batch.labels.labels(p.label_ref)).into()
}

impl ShardState {
    /// Per-service use of this shard.
    pub fn service_use(&self) -> impl Iterator<Item = (&str, ServiceUse)> {
        self.budget.services.iter().map(|(k, v)| (&**k, *v))
    }

    /// Series, source streams and overflowed points per service (one pass over the series).
    pub fn service_lines(&self) -> Vec<super::super::table::ServiceLine> {
        let mut streams: Map<&str, u64> = Map::default();
        for (s, n) in self.series_with_sources() {
            *streams.entry(self.service(&s.labels)).or_default() += u64::from(n);
        }
        self.budget
            .services
            .iter()
            .map(|(k, u)| super::super::table::ServiceLine {
                service: k.clone(),
                series: u.series,
                streams: streams.get(&**k).copied().unwrap_or(0),
                overflowed: u.overflowed,
            })
            .collect()
    }

    /// This shard's share of the budgets.
    pub fn limits(&self) -> ShardLimits {
        self.cfg.limits
    }

    /// `limits.max_series_per_service`, as the shared quota enforces it.
    pub fn series_budget(&self) -> u64 {
        self.cfg.quota.per_service()
    }

    /// What the series budgets say about `p`. A stream already sent to an overflow series
    /// keeps going there; a point that would create a series goes on if the shared quota
    /// (`quota.rs`) has room (the series is counted when it is created), else to its service's
    /// overflow series (the service is at its limit) or to the one global overflow series,
    /// service "" (all services are at `max_series`).
    pub(super) fn admit(&self, batch: &Batch, p: &Point) -> Admit {
        if batch.overflow {
            return Admit::Go;
        }
        if !self.budget.sticky.is_empty() {
            if let Some(s) = self.budget.sticky.get(&stored_key(p.source)) {
                return Admit::Overflow(match &s.target {
                    Some(t) => t.clone(),
                    None => service_of(batch, p),
                });
            }
        }
        if self.series.get(p.series).is_some() {
            return Admit::Go;
        }
        let service = service_of(batch, p);
        match self.cfg.quota.fits(&service) {
            Ok(()) => Admit::Go,
            Err(Full::Service) => Admit::Overflow(service),
            Err(Full::Global) => Admit::Overflow("".into()),
        }
    }

    /// Hands `p` back for the overflow series of `service`.
    pub(super) fn redirect(
        &mut self,
        batch: &Batch,
        p: &Point,
        service: Box<str>,
        out: &mut Redirect,
    ) {
        let sticky = Sticky {
            series: stored_key(p.series),
            touched: self.clock,
            target: Some(service.clone()),
        };
        self.budget.sticky.insert(stored_key(p.source), sticky);
        let clock = self.clock;
        let u = self.budget.services.entry(service.clone()).or_default();
        u.overflowed += 1;
        u.touched = clock;
        let idx = match out.index.get(&service) {
            Some(&i) => i as usize,
            None => {
                out.index.insert(service.clone(), out.services.len() as u32);
                out.services.push(service);
                out.services.len() - 1
            }
        };
        let mut q = p.clone();
        q.label_ref = [idx as u32, 0, 0, 0];
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

    /// Whether a new source stream would pass this shard's stream budget.
    pub(super) fn stream_room(&self) -> bool {
        (self.sources_len() as u64) < self.cfg.limits.streams
    }

    /// Counts a new series of `service` (an overflow series, in the shard's use only: the
    /// shared quota does not count those, see `quota.rs`).
    pub(super) fn series_added(&mut self, service: &str, overflow: bool) {
        if !overflow {
            self.cfg.quota.force(service);
        }
        match self.budget.services.get_mut(service) {
            Some(u) => u.series += 1,
            None => {
                self.budget.services.insert(
                    service.into(),
                    ServiceUse {
                        series: 1,
                        overflowed: 0,
                        touched: self.clock,
                    },
                );
            }
        }
    }

    /// Counts a series of `service` gone; `overflow` as it was added.
    pub(super) fn series_gone(&mut self, service: &str, overflow: bool) {
        if !overflow {
            self.cfg.quota.give_back(service);
        }
        if let Some(u) = self.budget.services.get_mut(service) {
            u.series = u.series.saturating_sub(1);
            if u.series == 0 && u.overflowed == 0 {
                self.budget.services.remove(service);
            }
        }
    }

    /// Source streams that go to overflow series (stored keys), the stored output key of their
    /// points, and whether they go to the global overflow series.
    pub fn sticky_streams(&self) -> impl Iterator<Item = (u128, u128, bool)> + '_ {
        self.budget
            .sticky
            .iter()
            .map(|(k, s)| (*k, s.series, s.target.as_deref() == Some("")))
    }

    /// Marks a stream as going to an overflow series (as a checkpoint recorded it).
    pub fn restore_sticky(&mut self, source: u128, series: u128, global: bool) {
        let sticky = Sticky {
            series: stored_key(series),
            touched: self.clock,
            target: global.then(|| "".into()),
        };
        self.budget.sticky.insert(stored_key(source), sticky);
    }

    /// Forgets sticky streams idle for longer than the TTL, and services with no series whose
    /// last overflowed point is as old.
    pub(super) fn sweep_sticky(&mut self) {
        let (now, ttl) = (self.clock, self.cfg.ttl_secs);
        let idle = |touched: u32| now.saturating_sub(touched) > ttl;
        self.budget.sticky.retain(|_, s| !idle(s.touched));
        self.budget
            .services
            .retain(|_, u| u.series > 0 || !idle(u.touched));
    }
}

/// Resolves the labels of overflow series: `otel_metric_overflow="true"` and the service.
pub struct OverflowLabels {
    pub services: Vec<Box<str>>,
}

pub use crate::aggregate::naming::OVERFLOW_LABEL;

/// Whether a series with these label names is an overflow series.
pub(super) fn is_overflow<'a>(mut names: impl Iterator<Item = &'a str>) -> bool {
    names.any(|k| k == OVERFLOW_LABEL)
}

impl LabelResolver for OverflowLabels {
    fn labels(&self, label_ref: [u32; 4]) -> Vec<(String, String)> {
        let service = self
            .services
            .get(label_ref[0] as usize)
            .map_or("", |s| &**s);
        let mut labels = vec![(OVERFLOW_LABEL.to_owned(), "true".to_owned())];
        // An empty value is no label, as for every other series.
        if !service.is_empty() {
            labels.push((SERVICE_LABEL.to_owned(), service.to_owned()));
        }
        labels
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
