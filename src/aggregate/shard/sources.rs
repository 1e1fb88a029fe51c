//! The source streams of one shard (one pod's stream of one series each): a delta stream's
//! exactly-once window, a cumulative stream's last point, and which series each feeds.
//!
//! Invariants: a stream is either delta or cumulative, never both (a stream that changes
//! temporality starts over); every link from a stream to a series is counted in [`SeriesIds`],
//! so an id outlives its series while a stream still holds it.

use ahash::RandomState;
use hashbrown::HashMap;

use crate::aggregate::keytable::{stored_key, KeyTable};
use crate::aggregate::series::{
    cumulative_step, CumulativeDelta, CumulativeState, CumulativeValue, Point,
};
use crate::aggregate::window::Window;

use super::ids::{SeriesId, SeriesIds};
use super::persist::StreamState;
use crate::aggregate::batch::Outcome;

/// A cumulative source stream: its last point, and when it was last seen (shard clock).
#[derive(Debug, Clone, PartialEq)]
struct CumulativeSource {
    last: CumulativeState,
    touched: u32,
    /// The series it feeds; none until a difference of it created or reached one.
    series: Option<SeriesId>,
    /// The stored output key of its points: where a checkpoint row of it must go back to,
    /// even while it feeds no series (0: unknown).
    key: u128,
}

/// What decides whether a new cumulative stream's first point counts from its start.
pub struct NewStream {
    /// Streams that started before this are only baselined (`initial_value: auto`).
    pub process_start_ns: u64,
    pub ttl_ns: u64,
    pub now_ns: u64,
    /// Whether the stream budget has room for one more stream.
    pub room: bool,
}

/// A cumulative point turned into a difference to add: from `start_ns`, `value`, reported as
/// `outcome`.
pub struct Step {
    pub start_ns: u64,
    pub value: CumulativeValue,
    pub outcome: Outcome,
}

/// The source streams of one shard.
#[derive(Default)]
pub struct Sources {
    /// Delta streams: only their exactly-once window (24 bytes in the common case).
    deltas: KeyTable<Window>,
    /// Cumulative streams, by stored key (as the key table stores keys, so a checkpoint's
    /// stream rows find their entries again).
    cumulative: HashMap<u128, CumulativeSource, RandomState>,
    /// Streams whose part key changed (see [`Self::moves`]).
    moves: u64,
    /// Holes windows gave up to stay within their limit (see [`Window`]).
    holes_given_up: u64,
}

impl Sources {
    pub fn len(&self) -> usize {
        self.deltas.len() + self.cumulative.len()
    }

    /// Bytes held by the delta stream table (for the memory benchmark).
    pub fn delta_bytes(&self) -> usize {
        self.deltas.heap_bytes()
    }

    /// Bytes of the stream indexes' allocations (see [`KeyTable::index_bytes`]).
    pub fn index_bytes(&self) -> usize {
        self.deltas.index_bytes() + self.cumulative.allocation_size()
    }

    pub fn contains(&self, key: u128) -> bool {
        self.deltas.get(key).is_some() || self.cumulative.contains_key(&stored_key(key))
    }

    /// The window of a delta stream.
    pub fn window(&self, source: u128) -> Option<&Window> {
        self.deltas.get(source)
    }

    /// Records a delta of `p`'s stream applied to the series `id`.
    pub fn record_delta(&mut self, ids: &mut SeriesIds, p: &Point, id: SeriesId, late_ns: u64) {
        if let Some((tag, w)) = self.deltas.get_mut_tagged(p.source) {
            self.holes_given_up += w.record(p.start_ns, p.end_ns, late_ns, p.fp) as u64;
            // The series expired and came back under a new id: follow it.
            let old = SeriesId::from_tag(std::mem::replace(tag, SeriesId::tag(Some(id))));
            if old != Some(id) {
                self.moves += u64::from(moved(old.and_then(|o| ids.key(o)), ids.key(id)));
                ids.relink(old, Some(id));
            }
            return;
        }
        // A stream that changed temporality starts over.
        if let Some(old) = self.cumulative.remove(&stored_key(p.source)) {
            let before = Self::cumulative_part_key(ids, &old);
            self.moves += u64::from(moved(before, ids.key(id)));
            ids.relink(old.series, None);
        }
        ids.relink(None, Some(id));
        let w = Window::new(p.start_ns, p.end_ns, p.fp);
        self.deltas
            .insert_tagged(p.source, SeriesId::tag(Some(id)), w);
    }

    /// Steps `p`'s cumulative stream to `value`: the difference to add, or why there is none.
    pub fn cumulative(
        &mut self,
        ids: &mut SeriesIds,
        p: &Point,
        value: CumulativeValue,
        clock: u32,
        new: NewStream,
    ) -> Result<Step, Outcome> {
        let source = stored_key(p.source);
        if let Some(src) = self.cumulative.get_mut(&source) {
            src.touched = clock;
            return match cumulative_step(&mut src.last, p.start_ns, p.end_ns, value) {
                CumulativeDelta::Stale => Err(Outcome::CumulativeStale),
                CumulativeDelta::Baseline => Err(Outcome::CumulativeBaseline),
                CumulativeDelta::Delta {
                    start_ns,
                    reset,
                    value,
                } => Ok(Step {
                    start_ns,
                    value,
                    outcome: if reset {
                        Outcome::CumulativeReset
                    } else {
                        Outcome::Applied
                    },
                }),
            };
        }
        match self.deltas.remove(p.source) {
            // A stream that changed temporality starts over.
            Some((tag, _)) => {
                let old = SeriesId::from_tag(tag);
                let after = Some(stored_key(p.series));
                self.moves += u64::from(moved(old.and_then(|o| ids.key(o)), after));
                ids.relink(old, None);
            }
            None if !new.room => return Err(Outcome::StreamLimit),
            None => {}
        }
        let last = CumulativeState {
            start_ns: p.start_ns,
            end_ns: p.end_ns,
            value: value.clone(),
        };
        let src = CumulativeSource {
            last,
            touched: clock,
            series: None,
            key: stored_key(p.series),
        };
        self.cumulative.insert(source, src);
        // Counted from its start only if all of it is new to us: it began after we did
        // (`initial_value: auto`), its start is known (start == time has no rate), and it began
        // within the TTL (older, it may be a stream that expired here while its series lived
        // on, and its whole lifetime was counted before).
        let returning = p.start_ns.saturating_add(new.ttl_ns) < new.now_ns;
        if p.start_ns <= new.process_start_ns || p.start_ns == p.end_ns || returning {
            return Err(Outcome::CumulativeBaseline);
        }
        Ok(Step {
            start_ns: p.start_ns,
            value,
            outcome: Outcome::Applied,
        })
    }

    /// Records that `p`'s cumulative stream feeds the series `id` (again, if it came back).
    pub fn link_cumulative(&mut self, ids: &mut SeriesIds, p: &Point, id: SeriesId) {
        if let Some(src) = self.cumulative.get_mut(&stored_key(p.source)) {
            if src.series == Some(id) {
                return;
            }
            let before = Self::cumulative_part_key(ids, src);
            let old = src.series.replace(id);
            self.moves += u64::from(moved(before, ids.key(id)));
            ids.relink(old, Some(id));
        }
    }

    /// Drops cumulative streams `idle` says were not seen within the TTL, and delta streams
    /// whose newest end is before `horizon`.
    pub fn sweep(&mut self, ids: &mut SeriesIds, idle: impl Fn(u32) -> bool, horizon: u64) {
        self.cumulative.retain(|_, s| {
            let keep = !idle(s.touched);
            if !keep {
                ids.relink(s.series, None);
            }
            keep
        });
        self.deltas.retain_or(
            |_, w| w.newest_end() >= horizon,
            |tag, _| ids.relink(SeriesId::from_tag(tag), None),
        );
    }

    /// Every stream `keep` takes: its key, the key of the series it feeds (a cumulative stream
    /// only baselined feeds none but still knows its points' key), and its state. `keep` is
    /// given the stream's part key (see [`Self::moves`]), so a state is cloned only if kept.
    pub fn records<'a>(
        &'a self,
        ids: &'a SeriesIds,
        keep: impl Fn(Option<u128>) -> bool + Copy + 'a,
    ) -> impl Iterator<Item = (u128, Option<u128>, StreamState)> + 'a {
        let live = |id: Option<SeriesId>| id.and_then(|id| ids.live_key(id));
        let deltas = self.deltas.iter().filter_map(move |(key, tag, w)| {
            let id = SeriesId::from_tag(tag);
            keep(id.and_then(|id| ids.key(id)))
                .then(|| (key, live(id), StreamState::Delta(w.clone())))
        });
        let cumulative = self.cumulative.iter().filter_map(move |(key, s)| {
            if !keep(Self::cumulative_part_key(ids, s)) {
                return None;
            }
            let state = StreamState::Cumulative {
                last: s.last.clone(),
                feeds: s.series.is_some(),
            };
            let own = (s.key != 0).then_some(s.key);
            Some((*key, live(s.series).or(own), state))
        });
        deltas.chain(cumulative)
    }

    /// Whether any stream has no part key: one restored without its series' key.
    pub fn any_without_part_key(&self, ids: &SeriesIds) -> bool {
        self.deltas
            .iter()
            .any(|(_, tag, _)| SeriesId::from_tag(tag).and_then(|id| ids.key(id)).is_none())
            || self
                .cumulative
                .values()
                .any(|s| Self::cumulative_part_key(ids, s).is_none())
    }

    /// How many times a stream's part key changed. The part key decides which part of a
    /// checkpoint a stream is read in: the key of the series it feeds, or fed (gone while the
    /// stream lives on), or would feed. A stream's points always carry the same key unless the
    /// label projection changed across a restart.
    pub fn moves(&self) -> u64 {
        self.moves
    }

    /// Distinct bucket bound allocations cumulative histogram streams hold.
    #[cfg(test)]
    pub fn distinct_bounds(&self) -> usize {
        let held: std::collections::HashSet<*const f64> = self
            .cumulative
            .values()
            .filter_map(|s| match &s.last.value {
                crate::aggregate::series::CumulativeValue::Histogram { bounds, .. } => {
                    Some(bounds.as_ptr())
                }
                _ => None,
            })
            .collect();
        held.len()
    }

    /// Holes delta windows gave up, since start (see [`Window`]).
    pub fn holes_given_up(&self) -> u64 {
        self.holes_given_up
    }

    /// A cumulative stream's part key (see [`Self::moves`]).
    fn cumulative_part_key(ids: &SeriesIds, s: &CumulativeSource) -> Option<u128> {
        s.series
            .and_then(|id| ids.key(id))
            .or((s.key != 0).then_some(s.key))
    }

    /// Rebuilds one stream feeding `id` (if its series was restored) with points keyed
    /// `series_key`.
    pub fn restore(
        &mut self,
        ids: &mut SeriesIds,
        key: u128,
        id: Option<SeriesId>,
        series_key: Option<u128>,
        state: StreamState,
        clock: u32,
    ) {
        ids.relink(None, id);
        match state {
            StreamState::Delta(w) => self.deltas.insert_tagged(key, SeriesId::tag(id), w),
            StreamState::Cumulative { last, .. } => {
                let src = CumulativeSource {
                    last,
                    touched: clock,
                    series: id,
                    key: series_key.map_or(0, stored_key),
                };
                self.cumulative.insert(stored_key(key), src);
            }
        }
    }
}

/// Whether a stream's part key changed from a known one.
fn moved(before: Option<u128>, after: Option<u128>) -> bool {
    before.is_some() && before != after
}
