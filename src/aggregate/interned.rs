//! What a shard interns besides label values: metric families, bucket layouts, fold maps
//! between layouts, and label-name lists.
//!
//! Invariants: a metric family, a bucket layout or a label-name list lives exactly as long as a
//! series holds it (reference counts); one interned only to judge a point (a point that was then
//! refused, a layout folded into another) is freed at the end of its batch, a layout with the
//! fold maps that name it. So what a client sends costs memory only while series use it, and a
//! burst of junk metric names stops blocking new ones once its series expire. At most
//! `max_families` families are live per shard: past it a point of a new family is refused.
//! Freed ids are reused (a freed family is an empty placeholder meanwhile); ids of live entries
//! never change.

use std::collections::HashMap;
use std::sync::Arc;

use ahash::RandomState;

use super::interner::Interner;
use super::key::{FamilyDesc, Kind};
use super::layout::{fold_map, LayoutMismatch};

type Map<K, V> = HashMap<K, V, RandomState>;
pub type FoldResult = Result<Arc<[u16]>, LayoutMismatch>;

/// The interned tables of one shard.
#[derive(Debug)]
pub struct Interned {
    families: Vec<FamilyDesc>,
    family_index: Map<(Arc<str>, Kind), u32>,
    /// Series holding each family.
    family_refs: Vec<u32>,
    free_families: Vec<u32>,
    /// Families interned during the current batch: freed at its end unless a series holds them.
    fresh_families: Vec<u32>,
    max_families: usize,
    layouts: Vec<Arc<[f64]>>,
    /// Series holding each layout, and whether the id is in use at all.
    layout_refs: Vec<(u32, bool)>,
    layout_index: Map<Box<[u64]>, u32>,
    free_layouts: Vec<u32>,
    /// Freed layouts whose fold maps are not purged yet: not reused before `purge`.
    freed_layouts: Vec<u32>,
    /// Layouts interned during the current batch: freed at its end unless a series holds them.
    fresh_layouts: Vec<u32>,
    folds: Map<(u32, u32), FoldResult>,
    /// Label-name lists (ids into the shard's string interner).
    key_sets: Vec<Box<[u32]>>,
    key_set_refs: Vec<u32>,
    key_set_index: Map<Box<[u32]>, u32>,
    free_key_sets: Vec<u32>,
}

impl Interned {
    pub fn new(max_families: usize) -> Self {
        Self {
            families: Vec::new(),
            family_index: Map::default(),
            family_refs: Vec::new(),
            free_families: Vec::new(),
            fresh_families: Vec::new(),
            max_families,
            layouts: Vec::new(),
            layout_refs: Vec::new(),
            layout_index: Map::default(),
            free_layouts: Vec::new(),
            freed_layouts: Vec::new(),
            fresh_layouts: Vec::new(),
            folds: Map::default(),
            key_sets: Vec::new(),
            key_set_refs: Vec::new(),
            key_set_index: Map::default(),
            free_key_sets: Vec::new(),
        }
    }

    pub fn families(&self) -> &[FamilyDesc] {
        &self.families
    }

    pub fn family(&self, id: u32) -> Option<&FamilyDesc> {
        self.families.get(id as usize)
    }

    /// The id of a family, interning it; `None` for a new family past `max_families`. Until a
    /// series holds it (`hold_family`), it lives only until the end of the current batch.
    pub fn family_id(&mut self, desc: &FamilyDesc) -> Option<u32> {
        if let Some(&id) = self.family_index.get(&(desc.name.clone(), desc.kind)) {
            return Some(id);
        }
        if self.family_index.len() >= self.max_families {
            return None;
        }
        let id = match self.free_families.pop() {
            Some(id) => {
                self.families[id as usize] = desc.clone();
                self.family_refs[id as usize] = 0;
                id
            }
            None => {
                self.families.push(desc.clone());
                self.family_refs.push(0);
                (self.families.len() - 1) as u32
            }
        };
        self.family_index.insert((desc.name.clone(), desc.kind), id);
        self.fresh_families.push(id);
        Some(id)
    }

    pub fn hold_family(&mut self, id: u32) {
        if let Some(r) = self.family_refs.get_mut(id as usize) {
            *r += 1;
        }
    }

    pub fn release_family(&mut self, id: u32) {
        let Some(r) = self.family_refs.get_mut(id as usize) else {
            return;
        };
        if *r == 0 {
            return;
        }
        *r -= 1;
        if *r == 0 {
            self.free_family(id);
        }
    }

    /// Frees a live family no series holds: its slot becomes an empty placeholder.
    fn free_family(&mut self, id: u32) {
        let Some(desc) = self.families.get(id as usize) else {
            return;
        };
        let key = (desc.name.clone(), desc.kind);
        let live = self.family_index.get(&key) == Some(&id);
        if !live || self.family_refs[id as usize] != 0 {
            return;
        }
        self.family_index.remove(&key);
        self.families[id as usize] = FamilyDesc {
            name: "".into(),
            kind: Kind::Counter,
            otel_name: "".into(),
            unit: "".into(),
            help: "".into(),
        };
        self.free_families.push(id);
    }

    /// Like `family_id`, past the cap too: what a checkpoint holds exists already.
    pub fn family_id_past_cap(&mut self, desc: &FamilyDesc) -> u32 {
        let max = std::mem::replace(&mut self.max_families, usize::MAX);
        let id = self.family_id(desc).unwrap_or(0);
        self.max_families = max;
        id
    }

    pub fn layout(&self, id: u32) -> &[f64] {
        self.layouts.get(id as usize).map_or(&[], |l| l)
    }

    /// [`Self::layout_id`], and the interned bounds to keep beyond the id's life: freeing the
    /// id replaces its slot, never the bounds a holder has.
    pub fn layout_shared(&mut self, bounds: &[f64]) -> (u32, Arc<[f64]>) {
        let id = self.layout_id(bounds);
        let shared = self
            .layouts
            .get(id as usize)
            .cloned()
            .unwrap_or_else(|| bounds.into());
        (id, shared)
    }

    /// The id of a layout, interning it. Until a series holds it (`hold_layout`), it lives
    /// only until the end of the current batch.
    pub fn layout_id(&mut self, bounds: &[f64]) -> u32 {
        let bits: Box<[u64]> = bounds.iter().map(|b| b.to_bits()).collect();
        if let Some(&id) = self.layout_index.get(&bits) {
            return id;
        }
        let id = match self.free_layouts.pop() {
            Some(id) => {
                self.layouts[id as usize] = bounds.into();
                self.layout_refs[id as usize] = (0, true);
                id
            }
            None => {
                self.layouts.push(bounds.into());
                self.layout_refs.push((0, true));
                (self.layouts.len() - 1) as u32
            }
        };
        self.layout_index.insert(bits, id);
        self.fresh_layouts.push(id);
        id
    }

    pub fn hold_layout(&mut self, id: u32) {
        if let Some((r, true)) = self.layout_refs.get_mut(id as usize) {
            *r += 1;
        }
    }

    pub fn release_layout(&mut self, id: u32) {
        let Some((r, true)) = self.layout_refs.get_mut(id as usize) else {
            return;
        };
        if *r == 0 {
            return;
        }
        *r -= 1;
        if *r == 0 {
            self.free_layout(id);
        }
    }

    /// Frees a live layout no series holds.
    fn free_layout(&mut self, id: u32) {
        let Some(slot) = self.layout_refs.get_mut(id as usize) else {
            return;
        };
        if *slot != (0, true) {
            return;
        }
        slot.1 = false;
        let bounds = std::mem::replace(&mut self.layouts[id as usize], Arc::from(&[][..]));
        let bits: Box<[u64]> = bounds.iter().map(|b| b.to_bits()).collect();
        self.layout_index.remove(&bits);
        self.freed_layouts.push(id);
    }

    /// Drops the fold maps that name freed layouts (one pass for all of them), then lets
    /// their ids be reused.
    pub fn purge(&mut self) {
        if self.freed_layouts.is_empty() {
            return;
        }
        let freed: std::collections::HashSet<u32, RandomState> =
            self.freed_layouts.iter().copied().collect();
        self.folds
            .retain(|(a, b), _| !freed.contains(a) && !freed.contains(b));
        self.free_layouts.append(&mut self.freed_layouts);
    }

    /// Frees the families and layouts interned during this batch that no series holds.
    pub fn end_batch(&mut self) {
        while let Some(id) = self.fresh_layouts.pop() {
            self.free_layout(id);
        }
        while let Some(id) = self.fresh_families.pop() {
            self.free_family(id);
        }
        self.purge();
    }

    /// How the buckets of layout `input` fold into `output`, cached. The cache holds at most
    /// [`MAX_FOLDS`] maps: pairs of layouts held grow as their product, and a client giving
    /// each series its own layout and sending every layout to every series would otherwise
    /// fill it with a map (up to ~1 KiB) per pair. When full it starts over, so such a client
    /// costs others at most one fold per [`MAX_FOLDS`] of its own, not one per point.
    pub fn fold(&mut self, input: u32, output: u32) -> FoldResult {
        if let Some(r) = self.folds.get(&(input, output)) {
            return r.clone();
        }
        let r = fold_map(self.layout(input), self.layout(output)).map(Arc::from);
        if self.folds.len() >= MAX_FOLDS {
            self.folds.clear();
        }
        self.folds.insert((input, output), r.clone());
        r
    }

    /// The label-name list of sorted `names`, held once more (release it with the series).
    pub fn hold_key_set(&mut self, strings: &mut Interner, names: &[(String, String)]) -> u32 {
        let ids: Vec<u32> = names.iter().map(|(k, _)| strings.acquire(k)).collect();
        if let Some(&id) = self.key_set_index.get(&ids[..]) {
            for s in ids {
                strings.release(s);
            }
            self.key_set_refs[id as usize] += 1;
            return id;
        }
        let ids: Box<[u32]> = ids.into();
        let id = match self.free_key_sets.pop() {
            Some(id) => {
                self.key_sets[id as usize] = ids.clone();
                self.key_set_refs[id as usize] = 1;
                id
            }
            None => {
                self.key_sets.push(ids.clone());
                self.key_set_refs.push(1);
                (self.key_sets.len() - 1) as u32
            }
        };
        self.key_set_index.insert(ids, id);
        id
    }

    pub fn release_key_set(&mut self, strings: &mut Interner, id: u32) {
        let Some(r) = self.key_set_refs.get_mut(id as usize) else {
            return;
        };
        if *r == 0 {
            return;
        }
        *r -= 1;
        if *r > 0 {
            return;
        }
        let names = std::mem::take(&mut self.key_sets[id as usize]);
        self.key_set_index.remove(&names);
        for s in names.iter() {
            strings.release(*s);
        }
        self.free_key_sets.push(id);
    }

    /// The names (string ids) of a label-name list.
    pub fn key_set(&self, id: u32) -> &[u32] {
        self.key_sets.get(id as usize).map_or(&[], |k| k)
    }

    /// (layouts, fold maps, label-name lists) held: what tests and reports check.
    pub fn sizes(&self) -> (usize, usize, usize) {
        (
            self.layout_index.len(),
            self.folds.len(),
            self.key_set_index.len(),
        )
    }
}

/// Fold maps one shard caches. Span metrics fold a handful of layouts into the one configured
/// per metric; a thousand pairs is far more than any sender needs.
pub const MAX_FOLDS: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fold_maps_cached_stay_within_their_cap_and_the_rest_are_still_folded() {
        let mut t = Interned::new(10);
        let outputs: Vec<u32> = (0..40)
            .map(|i| t.layout_id(&[f64::from(i), 1000.0]))
            .collect();
        let inputs: Vec<u32> = (0..40)
            .map(|i| t.layout_id(&[f64::from(i), 500.0, 1000.0]))
            .collect();
        for &o in &outputs {
            for &i in &inputs {
                let folded = t.fold(i, o);
                // Input `j` holds output `k`'s first bound only when j == k.
                assert_eq!(folded.is_ok(), t.layout(i)[0] == t.layout(o)[0]);
            }
        }
        assert_eq!(t.sizes().1, 1600 - MAX_FOLDS, "full at 1024, started over");
        assert!(
            t.fold(inputs[0], outputs[0]).is_ok(),
            "dropped, folded again"
        );
        assert_eq!(t.sizes().1, 1600 - MAX_FOLDS + 1, "and cached again");
    }

    #[test]
    fn layouts_live_while_a_series_holds_them() {
        let mut t = Interned::new(10);
        let kept = t.layout_id(&[1.0, 5.0]);
        t.hold_layout(kept);
        let finer = t.layout_id(&[1.0, 2.0, 5.0]);
        assert!(t.fold(finer, kept).is_ok());
        t.end_batch();
        assert_eq!(
            t.sizes().0,
            1,
            "the finer layout only judged a point: freed"
        );
        assert_eq!(t.sizes().1, 0, "and the fold maps that named it");
        assert_eq!(t.layout(kept), &[1.0, 5.0]);
        // A thousand refused points with random layouts cost nothing after their batch.
        for i in 0..1000 {
            t.layout_id(&[f64::from(i), f64::from(i) + 0.5]);
            t.end_batch();
        }
        assert_eq!(t.sizes().0, 1);
        assert!(t.layouts.len() <= 3, "ids are reused: {}", t.layouts.len());
        t.release_layout(kept);
        assert_eq!(t.sizes().0, 0);
        t.release_layout(kept);
        t.purge();
        assert_eq!(
            t.free_layouts.len(),
            t.layouts.len(),
            "a double release frees once"
        );
    }

    #[test]
    fn label_name_lists_are_counted_and_their_strings_released() {
        let mut strings = Interner::default();
        let mut t = Interned::new(10);
        let names = |n: &[&str]| -> Vec<(String, String)> {
            n.iter().map(|k| ((*k).to_owned(), String::new())).collect()
        };
        let a = t.hold_key_set(&mut strings, &names(&["a", "b"]));
        let b = t.hold_key_set(&mut strings, &names(&["a", "b"]));
        assert_eq!(a, b);
        t.release_key_set(&mut strings, a);
        assert_eq!(t.key_set(a).len(), 2, "still held once");
        t.release_key_set(&mut strings, a);
        assert_eq!(t.sizes().2, 0);
        assert!(t.key_set(a).is_empty());
        let c = t.hold_key_set(&mut strings, &names(&["c"]));
        assert_eq!(c, a, "the id is reused");
        assert_eq!(t.key_set(c).len(), 1);
    }

    #[test]
    fn families_stop_at_the_cap_and_free_with_their_series() {
        let desc = |name: &str| FamilyDesc {
            name: name.into(),
            kind: Kind::Counter,
            otel_name: name.into(),
            unit: "".into(),
            help: "".into(),
        };
        let mut t = Interned::new(2);
        assert_eq!(t.family_id(&desc("a")), Some(0));
        assert_eq!(t.family_id(&desc("b")), Some(1));
        assert_eq!(t.family_id(&desc("c")), None);
        assert_eq!(
            t.family_id(&desc("a")),
            Some(0),
            "known families still pass"
        );
        // Held by series: a and b. c's points were refused.
        t.hold_family(0);
        t.hold_family(1);
        t.end_batch();
        assert_eq!(t.family_id(&desc("c")), None);
        // b's series expire: c fits now, in b's slot.
        t.release_family(1);
        assert!(
            t.family(1).is_some_and(|f| f.name.is_empty()),
            "a placeholder"
        );
        assert_eq!(t.family_id(&desc("c")), Some(1));
        t.end_batch();
        assert_eq!(
            t.family_index.len(),
            1,
            "c held nothing: freed with its batch"
        );
        assert_eq!(t.family_id_past_cap(&desc("d")), 1);
        t.hold_family(1);
        assert_eq!(t.family_id(&desc("e")), None, "a, d: at the cap");
    }
}
