//! Series ids: the handle a source stream holds on the series it feeds.
//!
//! Invariant: an id is reused only when its series is gone *and* no source holds it any more, so
//! a source never counts toward a series it did not feed. A key table stores an id as its 32-bit
//! tag, 0 meaning "none" ([`SeriesId::tag`], [`SeriesId::from_tag`]); nothing else sees that
//! encoding.

use std::num::NonZeroU32;

use crate::aggregate::keytable::Chunked;

/// The id of one live (or recently live) output series in its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeriesId(NonZeroU32);

impl SeriesId {
    /// A dense index.
    pub(super) fn index(self) -> usize {
        self.0.get() as usize - 1
    }

    /// The tag a key table stores for `id`.
    pub fn tag(id: Option<Self>) -> u32 {
        id.map_or(0, |i| i.0.get())
    }

    /// The id a key table's tag stands for.
    pub fn from_tag(tag: u32) -> Option<Self> {
        NonZeroU32::new(tag).map(Self)
    }
}

/// Whether an id's series exists, how many sources hold the id, and the series' stored key
/// (kept while sources hold the id after the series is gone: a checkpoint reads such a stream
/// with the series its points would create again). The key is two words, not a `u128`, so a
/// slot stays 8-aligned.
#[derive(Debug, Clone, Copy)]
struct Slot {
    live: bool,
    sources: u32,
    key: [u64; 2],
}

/// Allocates series ids and counts the sources that hold each.
#[derive(Debug, Default)]
pub struct SeriesIds {
    slots: Chunked<Slot>,
    free: Vec<SeriesId>,
}

impl SeriesIds {
    /// An id for a new series under the stored `key`; `None` only past 2^32 − 1 ids, which no
    /// memory limit reaches.
    pub fn alloc(&mut self, key: u128) -> Option<SeriesId> {
        let live = Slot {
            live: true,
            sources: 0,
            key: [key as u64, (key >> 64) as u64],
        };
        if let Some(id) = self.free.pop() {
            if let Some(slot) = self.slots.get_mut(id.index()) {
                *slot = live;
                return Some(id);
            }
        }
        let id = SeriesId(NonZeroU32::new(u32::try_from(self.slots.len() + 1).ok()?)?);
        self.slots.push(live);
        Some(id)
    }

    /// How many source streams feed the series of `id`.
    pub fn sources(&self, id: SeriesId) -> u32 {
        self.slots.get(id.index()).map_or(0, |s| s.sources)
    }

    /// The stored key of the series `id` is (or was, while a source still holds it) for.
    pub fn key(&self, id: SeriesId) -> Option<u128> {
        let slot = self.slots.get(id.index())?;
        Some(u128::from(slot.key[0]) | u128::from(slot.key[1]) << 64)
    }

    /// The stored key of the series of `id`, if that series exists.
    pub fn live_key(&self, id: SeriesId) -> Option<u128> {
        let live = self.slots.get(id.index())?.live;
        self.key(id).filter(|_| live)
    }

    /// A source moved from feeding `from` to feeding `to` (either may be none).
    pub fn relink(&mut self, from: Option<SeriesId>, to: Option<SeriesId>) {
        if from == to {
            return;
        }
        if let Some(id) = from {
            self.update(id, |s| s.sources = s.sources.saturating_sub(1));
        }
        if let Some(id) = to {
            self.update(id, |s| s.sources += 1);
        }
    }

    /// The series of `id` is gone; the id is free once no source holds it.
    pub fn series_removed(&mut self, id: SeriesId) {
        self.update(id, |s| s.live = false);
    }

    fn update(&mut self, id: SeriesId, f: impl FnOnce(&mut Slot)) {
        let Some(slot) = self.slots.get_mut(id.index()) else {
            return;
        };
        let was_free = !slot.live && slot.sources == 0;
        f(slot);
        if !was_free && !slot.live && slot.sources == 0 {
            self.free.push(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_reused_only_when_its_series_and_all_its_sources_are_gone() {
        let mut ids = SeriesIds::default();
        let a = ids.alloc(7).unwrap();
        ids.relink(None, Some(a));
        ids.series_removed(a);
        let b = ids.alloc(8).unwrap();
        assert_ne!(a, b, "a source still holds a");
        assert_eq!(
            ids.key(a),
            Some(7),
            "the key outlives the series while a source holds it"
        );
        ids.relink(Some(a), None);
        assert_eq!(ids.alloc(u128::MAX), Some(a));
        assert_eq!(ids.sources(a), 0);
        assert_eq!(ids.key(a), Some(u128::MAX));
    }

    #[test]
    fn tags_round_trip_and_zero_is_none() {
        let mut ids = SeriesIds::default();
        let a = ids.alloc(1).unwrap();
        assert_eq!(SeriesId::from_tag(SeriesId::tag(Some(a))), Some(a));
        assert_eq!(SeriesId::from_tag(SeriesId::tag(None)), None);
    }
}
