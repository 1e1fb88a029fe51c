//! A compact map from 128-bit keys (source streams, output series) to their state, for the
//! million-stream case.
//!
//! Entries live densely in a `Vec`; a `hashbrown::HashTable<u32>` indexes them. Compared with a
//! `HashMap<u128, V>` whose buckets hold whole entries at a load factor between 7/16 and 7/8,
//! the empty slack here costs 5 bytes per bucket instead of `size_of::<(u128, V)>() + 1`. The
//! keys are already uniform hashes, so they index the table directly.

use hashbrown::HashTable;

/// A key stored as two words: `u128` is 16-byte aligned, which would pad a 24-byte value to a
/// 48-byte entry; two `u64`s keep it at 40.
type Key = [u64; 2];

fn split(key: u128) -> Key {
    [key as u64, (key >> 64) as u64]
}

fn join(k: &Key) -> u128 {
    u128::from(k[0]) | (u128::from(k[1]) << 64)
}

/// Dense key → value storage with O(1) lookup, insert and removal (by swap).
#[derive(Debug)]
pub struct KeyTable<V> {
    index: HashTable<u32>,
    entries: Vec<(Key, V)>,
}

impl<V> Default for KeyTable<V> {
    fn default() -> Self {
        Self {
            index: HashTable::new(),
            entries: Vec::new(),
        }
    }
}

fn h(key: Key) -> u64 {
    key[0] ^ key[1]
}

impl<V> KeyTable<V> {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn slot(&self, key: u128) -> Option<usize> {
        let key = split(key);
        let entries = &self.entries;
        self.index
            .find(h(key), |&i| {
                entries.get(i as usize).is_some_and(|e| e.0 == key)
            })
            .map(|&i| i as usize)
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

    /// Inserts or replaces.
    pub fn insert(&mut self, key: u128, value: V) {
        if let Some(v) = self.get_mut(key) {
            *v = value;
            return;
        }
        let key = split(key);
        let idx = self.entries.len() as u32;
        if self.entries.len() == self.entries.capacity() {
            // Grow by a quarter, not double: amortised O(1) still, with a quarter of the idle
            // capacity that doubling leaves on average in a table of millions.
            self.entries.reserve_exact((self.entries.len() / 4).max(16));
        }
        self.entries.push((key, value));
        let entries = &self.entries;
        self.index.insert_unique(h(key), idx, |&i| {
            entries.get(i as usize).map_or(0, |e| h(e.0))
        });
    }

    pub fn remove(&mut self, key: u128) -> Option<V> {
        let i = self.slot(key)?;
        Some(self.remove_at(i))
    }

    fn remove_at(&mut self, i: usize) -> V {
        let key = self.entries[i].0;
        if let Ok(e) = self.index.find_entry(h(key), |&j| j as usize == i) {
            e.remove();
        }
        let last = self.entries.len() - 1;
        if i != last {
            let moved = self.entries[last].0;
            if let Some(slot) = self.index.find_mut(h(moved), |&j| j as usize == last) {
                *slot = i as u32;
            }
        }
        self.entries.swap_remove(i).1
    }

    /// Keeps the entries for which `keep` is true.
    pub fn retain(&mut self, keep: impl FnMut(u128, &V) -> bool) {
        self.retain_or(keep, |_| {});
    }

    /// Keeps the entries for which `keep` is true and hands every other value to `removed`.
    pub fn retain_or(
        &mut self,
        mut keep: impl FnMut(u128, &V) -> bool,
        mut removed: impl FnMut(V),
    ) {
        let mut i = 0;
        while i < self.entries.len() {
            let (k, v) = &self.entries[i];
            if keep(join(k), v) {
                i += 1;
            } else {
                removed(self.remove_at(i));
            }
        }
        if self.entries.capacity() > 4 * self.entries.len().max(1024) {
            self.entries.shrink_to_fit();
            let entries = &self.entries;
            self.index
                .shrink_to_fit(|&i| entries.get(i as usize).map_or(0, |e| h(e.0)));
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (u128, &V)> {
        self.entries.iter().map(|(k, v)| (join(k), v))
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.entries.iter().map(|(_, v)| v)
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
                2 => assert_eq!(t.remove(k), m.remove(&k), "seed {seed}"),
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
}
