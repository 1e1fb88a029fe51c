//! Series identity without wire formats: families, label sets, and the two hashes.
//!
//! Both the output key (family + kept labels) and the source key (resource identity, scope,
//! metric, all point attributes) are 128-bit xxh3 hashes. They are stable across processes and
//! versions (the same input gives the same hash anywhere), so they can route, be persisted and be
//! compared between replicas; at 128 bits a collision among billions of keys is not a concern,
//! so the table stores the hash, not the labels, to recognise a key.

use std::sync::Arc;

use xxhash_rust::xxh3::{xxh3_128_with_seed, xxh3_64};

/// What kind of metric a family is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A monotonic sum: served as a Prometheus counter.
    Counter,
    /// An explicit-bucket histogram.
    Histogram,
}

/// One output metric family as the ingest edge described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyDesc {
    /// Prometheus family name, without the counter `_total` suffix.
    pub name: Arc<str>,
    pub kind: Kind,
    /// The OTel metric name it came from (configured bounds are keyed by it).
    pub otel_name: Arc<str>,
    /// UCUM unit as sent.
    pub unit: Arc<str>,
    pub help: Arc<str>,
}

impl FamilyDesc {
    /// Hash of the family identity, the seed of every output key in it.
    pub fn key_seed(&self) -> u64 {
        let kind = match self.kind {
            Kind::Counter => 0u8,
            Kind::Histogram => 1u8,
        };
        xxh3_64(self.name.as_bytes()) ^ u64::from(kind)
    }
}

/// Output labels of a series, as ids into its shard's interner: `keys` names a shared list of
/// label names (sorted), `values` holds one value id per name. Resolve with
/// `ShardState::labels`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labels {
    pub keys: u32,
    pub values: Box<[u32]>,
}

/// Order-independent hash of a set of (key, value) pairs: each pair is hashed on its own and the
/// results are added, so attribute order on the wire does not change the key.
#[derive(Debug, Clone, Copy, Default)]
pub struct SetHash(u128);

impl SetHash {
    /// The hash of one (key, value) pair, to add to one or more sets.
    pub fn pair(key: &str, value: &str) -> u128 {
        Self::pair_with(Self::key_hash(key), value.as_bytes())
    }

    /// A key's part of its pairs' hashes: computed once, used for many values.
    pub fn key_hash(key: &str) -> u64 {
        xxh3_64(key.as_bytes())
    }

    /// `pair(key, value)` for a key whose `key_hash` is known (`value`: the value's UTF-8).
    pub fn pair_with(key_hash: u64, value: &[u8]) -> u128 {
        xxh3_128_with_seed(value, key_hash)
    }

    pub fn add(&mut self, key: &str, value: &str) {
        self.add_pair(Self::pair(key, value));
    }

    pub fn add_pair(&mut self, pair: u128) {
        self.0 = self.0.wrapping_add(pair);
    }

    pub fn remove_pair(&mut self, pair: u128) {
        self.0 = self.0.wrapping_sub(pair);
    }

    /// Combines the set with a seed into the final key.
    pub fn finish(self, seed: u64) -> u128 {
        xxh3_128_with_seed(&self.0.to_le_bytes(), seed)
    }
}

/// Hash of the source identity parts that are not attribute sets: resource, scope, and the
/// metric's identity (name, unit and kind: a pod may send a counter and a histogram of one name).
pub fn source_seed(resource: SetHash, scope: &str, metric: &FamilyDesc) -> u64 {
    let r = resource.finish(0).to_le_bytes();
    xxh3_64(&r)
        ^ xxh3_64(scope.as_bytes()).rotate_left(17)
        ^ xxh3_64(metric.otel_name.as_bytes())
        ^ xxh3_64(metric.unit.as_bytes()).rotate_left(31)
        ^ metric.key_seed().rotate_left(47)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_order_does_not_change_the_key() {
        let mut a = SetHash::default();
        a.add("span.name", "GET /");
        a.add("status.code", "OK");
        let mut b = SetHash::default();
        b.add("status.code", "OK");
        b.add("span.name", "GET /");
        assert_eq!(a.finish(1), b.finish(1));
    }

    #[test]
    fn keys_and_values_do_not_blur_into_each_other() {
        let mut a = SetHash::default();
        a.add("ab", "c");
        let mut b = SetHash::default();
        b.add("a", "bc");
        assert_ne!(a.finish(0), b.finish(0));
        let mut c = SetHash::default();
        c.add("k", "v");
        assert_ne!(c.finish(0), c.finish(1), "the seed separates families");
    }

    #[test]
    fn the_hash_is_stable_across_versions() {
        // Persisted and routed: a change here breaks checkpoints and replicas, so the value
        // is pinned, not recomputed.
        let mut a = SetHash::default();
        a.add("service.name", "checkout");
        assert_eq!(
            format!("{:032x}", a.finish(42)),
            "76f31cfb51af4845fa23cd664735d961"
        );
    }
}
