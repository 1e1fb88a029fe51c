//! A compact map from 128-bit keys (source streams, output series) to their state, for the
//! million-stream case.
//!
//! Entries live densely in fixed-size chunks; a `hashbrown::HashTable<u32>` indexes them.
//! Compared with a `HashMap<u128, V>` whose buckets hold whole entries at a load factor between
//! 7/16 and 7/8, the empty slack here costs 5 bytes per bucket instead of
//! `size_of::<(u128, V)>() + 1`. Chunks mean growth never copies or frees the entries already
//! there: a table of millions leaves no freed multi-megabyte buffers behind for the allocator
//! to return, and its idle capacity is at most one chunk.
//!
//! The keys are hashes anyone can compute (the key of an attribute set must be the same in
//! every process and after a restart), so a client could search for keys that share a bucket
//! and make every probe of the table walk all of them. Each table therefore places keys by a
//! hash of its own, seeded at random when the table is made.

use hashbrown::HashTable;

/// A stored key: 96 of the key's 128 bits (the low 64 and the high 32) and a 32-bit tag the
/// owner can use (a source stores the id of the series it feeds). `u128` would be 16-byte
/// aligned and pad a 24-byte value to a 48-byte entry; this keeps it at 40. 96 bits still make a
/// collision among a billion keys a one-in-10^10 event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Key {
    lo: u64,
    hi: u32,
    tag: u32,
}

fn split(key: u128, tag: u32) -> Key {
    Key {
        lo: key as u64,
        hi: (key >> 96) as u32,
        tag,
    }
}

/// The key as stored: bits 64..96 come back as zero.
fn join(k: &Key) -> u128 {
    u128::from(k.lo) | (u128::from(k.hi) << 96)
}

/// A key as a table stores it (bits 64..96 cleared): the form to use wherever a key must match
/// one read back from a table or a checkpoint.
pub fn stored_key(key: u128) -> u128 {
    join(&split(key, 0))
}

fn same(a: &Key, b: &Key) -> bool {
    a.lo == b.lo && a.hi == b.hi
}

/// Entries per chunk. The first chunk grows by doubling up to this; later ones are allocated
/// whole, so small tables stay small.
const CHUNK: usize = 1 << 14;

/// A `Vec` in chunks: push, pop and index, never moving what is stored.
#[derive(Debug)]
pub(crate) struct Chunked<T> {
    chunks: Vec<Vec<T>>,
    len: usize,
}

impl<T> Default for Chunked<T> {
    fn default() -> Self {
        Self {
            chunks: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Chunked<T> {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn get(&self, i: usize) -> Option<&T> {
        self.chunks.get(i / CHUNK)?.get(i % CHUNK)
    }

    pub(crate) fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        self.chunks.get_mut(i / CHUNK)?.get_mut(i % CHUNK)
    }

    pub(crate) fn push(&mut self, v: T) {
        match self.chunks.last_mut() {
            Some(c) if c.len() < CHUNK => c.push(v),
            Some(_) => {
                let mut c = Vec::with_capacity(CHUNK);
                c.push(v);
                self.chunks.push(c);
            }
            None => self.chunks.push(vec![v]),
        }
        self.len += 1;
    }

    fn pop(&mut self) -> Option<T> {
        let last = self.chunks.last_mut()?;
        let v = last.pop()?;
        if last.is_empty() {
            self.chunks.pop();
        }
        self.len -= 1;
        Some(v)
    }

    /// Removes element `i`, moving the last one into its place.
    fn swap_remove(&mut self, i: usize) -> Option<T> {
        let last = self.pop()?;
        if i == self.len {
            return Some(last);
        }
        self.get_mut(i).map(|slot| std::mem::replace(slot, last))
    }

    fn capacity(&self) -> usize {
        self.chunks.iter().map(Vec::capacity).sum()
    }

    fn iter(&self) -> impl Iterator<Item = &T> {
        self.chunks.iter().flatten()
    }
}

/// Dense key → value storage with O(1) lookup, insert and removal (by swap).
#[derive(Debug)]
pub struct KeyTable<V> {
    index: HashTable<u32>,
    entries: Chunked<(Key, V)>,
    place: Placement,
}

impl<V> Default for KeyTable<V> {
    fn default() -> Self {
        Self {
            index: HashTable::new(),
            entries: Chunked {
                chunks: Vec::new(),
                len: 0,
            },
            place: Placement::random(),
        }
    }
}

/// Where a key goes in the index: its two parts, each mixed with this table's random seed,
/// multiplied and the product's halves folded together (foldhash's step), then folded again.
/// Two multiplies: a probe happens twice per point, and a general hasher here cost 8–40% of a
/// shard's apply.
#[derive(Debug, Clone, Copy)]
struct Placement {
    lo: u64,
    hi: u64,
    fin: u64,
}

/// The 128-bit product's halves folded together.
fn fold(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ (p >> 64) as u64
}

impl Placement {
    fn random() -> Self {
        let r = ahash::RandomState::new();
        Self {
            lo: r.hash_one(0u8),
            hi: r.hash_one(1u8),
            fin: r.hash_one(2u8),
        }
    }

    /// A second fold spreads every bit of the first into the low bits the index uses: after
    /// one alone, keys differing only in high bits landed in as few buckets as the seed's
    /// trailing zeros allowed (half of them for half the seeds).
    fn of(&self, key: &Key) -> u64 {
        fold(
            fold(key.lo ^ self.lo, u64::from(key.hi) ^ self.hi),
            self.fin,
        )
    }
}

impl<V> KeyTable<V> {
    pub fn len(&self) -> usize {
        self.entries.len
    }

    pub fn is_empty(&self) -> bool {
        self.entries.len == 0
    }

    fn slot(&self, key: u128) -> Option<usize> {
        let key = split(key, 0);
        let entries = &self.entries;
        self.index
            .find(self.place.of(&key), |&i| {
                entries.get(i as usize).is_some_and(|e| same(&e.0, &key))
            })
            .map(|&i| i as usize)
    }

    /// The value and its tag.
    pub fn get_tagged(&self, key: u128) -> Option<(u32, &V)> {
        self.slot(key)
            .and_then(|i| self.entries.get(i))
            .map(|e| (e.0.tag, &e.1))
    }

    pub fn get(&self, key: u128) -> Option<&V> {
        self.slot(key)
            .and_then(|i| self.entries.get(i))
            .map(|e| &e.1)
    }

    pub fn get_mut(&mut self, key: u128) -> Option<&mut V> {
        let i = self.slot(key)?;
        self.entries.get_mut(i).map(|e| &mut e.1)
    }

    /// The value and its tag, both mutable.
    pub fn get_mut_tagged(&mut self, key: u128) -> Option<(&mut u32, &mut V)> {
        let i = self.slot(key)?;
        self.entries.get_mut(i).map(|e| (&mut e.0.tag, &mut e.1))
    }

    /// Inserts or replaces, with tag 0.
    pub fn insert(&mut self, key: u128, value: V) {
        self.insert_tagged(key, 0, value);
    }

    /// Inserts or replaces value and tag.
    pub fn insert_tagged(&mut self, key: u128, tag: u32, value: V) {
        if let Some(i) = self.slot(key) {
            if let Some(e) = self.entries.get_mut(i) {
                *e = (split(key, tag), value);
            }
            return;
        }
        let key = split(key, tag);
        let idx = self.entries.len as u32;
        self.entries.push((key, value));
        let (entries, place) = (&self.entries, &self.place);
        self.index.insert_unique(place.of(&key), idx, |&i| {
            entries.get(i as usize).map_or(0, |e| place.of(&e.0))
        });
    }

    /// Removes the entry; returns its tag and value.
    pub fn remove(&mut self, key: u128) -> Option<(u32, V)> {
        let i = self.slot(key)?;
        self.remove_at(i)
    }

    /// Removes entry `i` (which must exist), moving the last entry into its place.
    fn remove_at(&mut self, i: usize) -> Option<(u32, V)> {
        let key = self.entries.get(i)?.0;
        if let Ok(e) = self
            .index
            .find_entry(self.place.of(&key), |&j| j as usize == i)
        {
            e.remove();
        }
        let last = self.entries.len - 1;
        if i != last {
            if let Some(&(moved, _)) = self.entries.get(last) {
                let at = self.place.of(&moved);
                if let Some(slot) = self.index.find_mut(at, |&j| j as usize == last) {
                    *slot = i as u32;
                }
            }
        }
        self.entries.swap_remove(i).map(|e| (e.0.tag, e.1))
    }

    /// Keeps the entries for which `keep` is true.
    pub fn retain(&mut self, keep: impl FnMut(u128, &V) -> bool) {
        self.retain_or(keep, |_, _| {});
    }

    /// Keeps the entries for which `keep` is true and hands every other (tag, value) to
    /// `removed`.
    pub fn retain_or(
        &mut self,
        mut keep: impl FnMut(u128, &V) -> bool,
        mut removed: impl FnMut(u32, V),
    ) {
        let mut i = 0;
        while let Some((k, v)) = self.entries.get(i) {
            if keep(join(k), v) {
                i += 1;
            } else if let Some((tag, v)) = self.remove_at(i) {
                removed(tag, v);
            }
        }
        if self.index.capacity() > 4 * self.entries.len.max(1024) {
            let (entries, place) = (&self.entries, &self.place);
            self.index
                .shrink_to_fit(|&i| entries.get(i as usize).map_or(0, |e| place.of(&e.0)));
        }
    }

    /// Entries as (key with bits 64..96 cleared, tag, value).
    pub fn iter(&self) -> impl Iterator<Item = (u128, u32, &V)> {
        self.entries.iter().map(|(k, v)| (join(k), k.tag, v))
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.entries.iter().map(|(_, v)| v)
    }

    /// Bytes of the index's allocation: changes only when the index is reallocated (growing by
    /// doubling frees the old one whole). Not `capacity()`, which moves by one as removals
    /// leave tombstones and inserts reuse them.
    pub fn index_bytes(&self) -> usize {
        self.index.allocation_size()
    }

    /// Bytes held by the table itself (not by what values point to).
    pub fn heap_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<(Key, V)>()
            + self.index.capacity() * (std::mem::size_of::<u32>() + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn keys_a_client_made_to_share_bits_are_spread_and_each_table_places_its_own_way() {
        // Keys alike in every bit a fixed placement could use (here: all but the top 16 of the
        // low word): under one, every probe would walk all of them.
        let keys: Vec<u128> = (0..4096u128).map(|i| i << 48 | 0x1234).collect();
        let (a, b): (KeyTable<()>, KeyTable<()>) = Default::default();
        let buckets = |t: &KeyTable<()>| {
            let mut seen: Vec<u64> = keys
                .iter()
                .map(|&k| t.place.of(&split(k, 0)) & 0xfff)
                .collect();
            seen.sort_unstable();
            seen.dedup();
            seen.len()
        };
        assert!(
            buckets(&a) > 2048,
            "spread over 4096 buckets: {}",
            buckets(&a)
        );
        let moved = keys
            .iter()
            .filter(|&&k| a.place.of(&split(k, 0)) != b.place.of(&split(k, 0)))
            .count();
        assert_eq!(moved, keys.len(), "another table, another placement");
    }

    #[test]
    fn behaves_like_a_hashmap_under_random_operations() {
        let seed = fastrand::u64(..);
        println!("seed {seed}");
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut t = KeyTable::default();
        let mut m = HashMap::new();
        for _ in 0..20_000 {
            let k =
                u128::from(rng.u16(..500)).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835);
            match rng.u8(..4) {
                0 | 1 => {
                    let v = rng.u32(..);
                    t.insert(k, v);
                    m.insert(k, v);
                }
                2 => assert_eq!(t.remove(k).map(|(_, v)| v), m.remove(&k), "seed {seed}"),
                _ => {
                    let cut = rng.u32(..);
                    t.retain(|_, v| *v > cut);
                    m.retain(|_, v| *v > cut);
                }
            }
            assert_eq!(t.len(), m.len(), "seed {seed}");
            assert_eq!(t.get(k), m.get(&k), "seed {seed}");
        }
        for (k, v) in &m {
            assert_eq!(t.get(*k), Some(v), "seed {seed}");
        }
    }

    #[test]
    fn index_bytes_change_only_when_the_index_is_reallocated() {
        let mut t: KeyTable<u64> = KeyTable::default();
        let key = |i: u64| u128::from(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)) << 32 | u128::from(i);
        for i in 0..50_000 {
            t.insert(key(i), i);
        }
        let (bytes, capacity) = (t.index_bytes(), t.index.capacity());
        // Removals and inserts that reuse their slots: the capacity wanders, the bytes do not.
        let mut wandered = false;
        for i in 0..2_000 {
            t.remove(key(i));
            t.insert(key(100_000 + i), i);
            wandered |= t.index.capacity() != capacity;
            assert_eq!(t.index_bytes(), bytes);
        }
        assert!(wandered, "tombstones move the capacity");
        for i in 200_000..260_000 {
            t.insert(key(i), i);
        }
        assert!(t.index_bytes() > bytes, "growing reallocates");
    }

    #[test]
    fn removals_across_chunk_boundaries_keep_every_entry_reachable() {
        let mut t = KeyTable::default();
        let n = 3 * CHUNK as u128 + 17;
        let key = |i: u128| i.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835);
        for i in 0..n {
            t.insert(key(i), i);
        }
        assert_eq!(t.len(), n as usize);
        t.retain(|_, v| v % 3 != 0);
        for i in 0..n {
            assert_eq!(t.get(key(i)).copied(), (i % 3 != 0).then_some(i), "{i}");
        }
        assert!(t.heap_bytes() < (n as usize) * 64);
    }

    #[test]
    fn tags_travel_with_their_entries_through_moves() {
        let mut t = KeyTable::default();
        for i in 0..100u128 {
            t.insert_tagged(i << 100 | i, i as u32 * 7, ());
        }
        t.retain(|k, _| (k & 0xff) % 2 == 0);
        for i in (0..100u128).step_by(2) {
            assert_eq!(
                t.get_tagged(i << 100 | i).map(|(tag, _)| tag),
                Some(i as u32 * 7)
            );
        }
        assert_eq!(t.remove(4 << 100 | 4), Some((28, ())));
    }
}
