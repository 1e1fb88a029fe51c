//! Output labels of a point — exactly what Prometheus will see — and the keys hashed from them.
//!
//! Invariant: a point's output key is the `SetHash` of the (name, value) pairs of the label set
//! [`canonical`] builds, finished with its family's seed, so two points share a key exactly when
//! a scrape would show them as one series. Names are sanitised and reserved ones renamed
//! (`naming::output_label_name`); an empty value is no label; attributes whose names collide on
//! one point are joined with `;` in raw-key order; a point attribute replaces a kept resource
//! attribute of the same output name. [`Keyer`] hashes without building labels and falls back to
//! [`canonical`] when names collide; a test keeps the two equal.
//!
//! The source key (one pod's stream) hashes the raw attributes: it identifies, it is never shown.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;

use ahash::RandomState;
use opentelemetry_proto::tonic::common::v1::AnyValue;

use super::reason::Reason;
use super::view::{text, AnyValueView, Attrs, KeyValueView, OtlpBody};
use crate::aggregate::key::SetHash;
use crate::aggregate::naming::output_label_name;
use crate::aggregate::shard::{LabelRef, LabelResolver};

/// Which attributes become output labels.
#[derive(Debug)]
pub struct Projection {
    /// Resource attributes kept.
    by: Vec<String>,
    /// Point attributes dropped.
    without: HashSet<String, RandomState>,
}

impl Projection {
    pub fn new(by: &[String], without: &[String]) -> Self {
        Self {
            by: by.to_vec(),
            without: without.iter().cloned().collect(),
        }
    }

    /// The resource attributes kept as labels.
    pub fn kept_resource<'a>(&self, attrs: Attrs<'a>) -> Vec<KeyValueView<'a>> {
        attrs
            .iter()
            .filter(|kv| self.by.iter().any(|b| b == kv.key))
            .collect()
    }

    /// Whether a point attribute becomes a label.
    fn keeps(&self, key: &str) -> bool {
        !self.without.contains(key)
    }
}

/// Bounds on what one attribute may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttributeLimits {
    pub max_attributes: usize,
    pub max_name_len: usize,
    pub max_value_len: usize,
}

impl AttributeLimits {
    /// Judges an attribute by the lengths of its name and its value as label text.
    fn check(&self, key_len: usize, value_len: usize) -> Result<(), Reason> {
        if key_len > self.max_name_len || value_len > self.max_value_len {
            return Err(Reason::AttributeTooLong);
        }
        Ok(())
    }
}

/// Writes an attribute value (an `AnyValue` message) as its label text. Strings are borrowed;
/// the rest use `buf`. Arrays and key-value lists, rare, are decoded and written as JSON.
pub fn value_str<'a>(v: Option<&'a [u8]>, buf: &'a mut String) -> &'a str {
    render(v.map_or(AnyValueView::Empty, AnyValueView::read), buf)
}

/// An attribute value as its label text: strings borrowed, the rest written into `buf`.
fn render<'a>(value: AnyValueView<'a>, buf: &'a mut String) -> &'a str {
    buf.clear();
    match value {
        AnyValueView::String(s) => return s,
        AnyValueView::Bool(b) => buf.push_str(if b { "true" } else { "false" }),
        AnyValueView::Int(i) => {
            let _ = write!(buf, "{i}");
        }
        AnyValueView::Double(d) => {
            let _ = write!(buf, "{d}");
        }
        AnyValueView::Bytes(b) => {
            for byte in b {
                let _ = write!(buf, "{byte:02x}");
            }
        }
        AnyValueView::Other(msg) => {
            let value = <AnyValue as prost::Message>::decode(msg)
                .ok()
                .and_then(|a| a.value);
            if let Some(value) = value {
                let _ = write!(buf, "{}", serde_json::to_string(&value).unwrap_or_default());
            }
        }
        AnyValueView::Empty => {}
    }
    buf
}

/// [`value_str`] as bytes, with a string value's bytes borrowed unchecked: a regular body's
/// strings are UTF-8 (the wire walk checked them), and the keys hash bytes. Every body the
/// keyer reads is regular (`OtlpBody`); were one not, a string that is not UTF-8 would be hashed
/// as its bytes where the labels read it as empty: a wrong key, never a panic.
fn value_bytes<'a>(v: Option<&'a [u8]>, buf: &'a mut String) -> &'a [u8] {
    match v.map_or(Err(AnyValueView::Empty), AnyValueView::read_bytes) {
        Ok(string) => string,
        Err(other) => render(other, buf).as_bytes(),
    }
}

/// A resource's kept attributes as output labels, rendered, named and joined once per request
/// for each kind of point (a `le` is renamed on histograms only): labels of its points' new
/// series are built from these, never by reading or joining the resource again.
#[derive(Debug, Default)]
pub struct ResourceLabels {
    counter: Vec<(String, String)>,
    histogram: Vec<(String, String)>,
}

impl ResourceLabels {
    pub fn new(kept: &[KeyValueView<'_>]) -> Self {
        let mut buf = String::new();
        let rendered: Vec<(&str, String)> = kept
            .iter()
            .map(|kv| (kv.key, value_str(kv.value, &mut buf).to_owned()))
            .collect();
        Self {
            counter: named(rendered.iter().map(|(k, v)| (*k, v.clone())), false),
            histogram: named(rendered.into_iter(), true),
        }
    }

    /// The labels for points of one kind, sorted by name.
    pub fn of(&self, histogram: bool) -> &[(String, String)] {
        if histogram {
            &self.histogram
        } else {
            &self.counter
        }
    }
}

/// (name, raw key, value) triples sorted by name and raw key, names that collide joined.
fn named<'a>(
    kvs: impl Iterator<Item = (&'a str, String)>,
    histogram: bool,
) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, &str, String)> = Vec::new();
    for (key, v) in kvs {
        if v.is_empty() {
            continue;
        }
        let mut name = String::new();
        output_label_name(key, histogram, &mut name);
        pairs.push((name, key, v));
    }
    pairs.sort_unstable();
    let mut out: Vec<(String, String)> = Vec::with_capacity(pairs.len());
    for (k, _, v) in pairs {
        match out.last_mut() {
            Some(last) if last.0 == k => {
                last.1.push(';');
                last.1.push_str(&v);
            }
            _ => out.push((k, v)),
        }
    }
    out
}

/// The output labels of a point, sorted by name (see the module doc for the rules). `resource`
/// is its resource's labels for the point's kind ([`ResourceLabels::of`]).
pub fn canonical(
    histogram: bool,
    resource: &[(String, String)],
    attrs: Attrs<'_>,
    projection: &Projection,
) -> Vec<(String, String)> {
    labels_within(histogram, resource, attrs, projection, usize::MAX).unwrap_or_default()
}

/// [`canonical`], or `None` once a label value is longer than `max_value_len`: checked before
/// a resource value is copied, so a long joined resource value costs its points nothing.
fn labels_within(
    histogram: bool,
    resource: &[(String, String)],
    attrs: Attrs<'_>,
    projection: &Projection,
    max_value_len: usize,
) -> Option<Vec<(String, String)>> {
    let mut buf = String::new();
    let point = attrs
        .iter()
        .filter(|kv| projection.keeps(kv.key))
        .map(|kv| (kv.key, value_str(kv.value, &mut buf).to_owned()));
    let mut out = named(point, histogram);
    if out.iter().any(|(_, v)| v.len() > max_value_len) {
        return None;
    }
    let point_names = out.len();
    for (k, v) in resource {
        if out[..point_names].binary_search_by(|p| p.0.cmp(k)).is_err() {
            if v.len() > max_value_len {
                return None;
            }
            out.push((k.clone(), v.clone()));
        }
    }
    out.sort_unstable();
    Some(out)
}

/// The key of a label set as [`canonical`] built it.
pub fn key_of(labels: &[(String, String)], seed: u64) -> u128 {
    let mut set = SetHash::default();
    for (k, v) in labels {
        set.add(k, v);
    }
    set.finish(seed)
}

/// An attribute key as an output label name.
#[derive(Debug, Clone, Copy)]
struct Name {
    /// Output name id: raw keys that sanitise alike share it.
    id: u32,
    /// Hash of the raw key (for the source key).
    raw_hash: u64,
    /// This raw key was renamed because its name is reserved.
    renamed: bool,
    /// It is a point attribute that becomes a label (not in `labels.without`).
    kept: bool,
}

/// The kept resource attributes of one resource, hashed once for all its points.
#[derive(Debug, Default)]
pub struct ResourcePart {
    /// (output name id, pair hash), empty values left out.
    pairs: Vec<(u32, u128)>,
    /// Two kept attributes share an output name: keys take the slow path.
    collide: bool,
    /// A kept attribute breaks a limit: every point of the resource is refused.
    error: Option<Reason>,
    /// A kept attribute's name is reserved and was renamed.
    renamed: bool,
}

/// Points whose labels were not what their attributes said, by why (counted, not refused).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Relabeled {
    /// A name Prometheus or spanagg reserves was renamed with `exported_`.
    pub reserved: u64,
    /// Attributes whose names sanitise alike were joined into one label.
    pub colliding: u64,
}

/// Computes output and source keys for the points of one request. Output names are sanitised
/// once per distinct raw key and request.
pub struct Keyer<'r> {
    projection: &'r Projection,
    limits: AttributeLimits,
    /// (raw key, histogram) → its output name.
    index: HashMap<(&'r [u8], bool), Name, RandomState>,
    /// Output name → id: raw keys that sanitise alike share one id.
    name_ids: HashMap<String, u32, RandomState>,
    /// Hash of each output name, by id.
    names: Vec<u64>,
    /// The name last found at each attribute position: points of one metric repeat their keys
    /// in the same order, so most lookups are one string comparison, not a hash.
    by_position: Vec<Option<(&'r [u8], bool, Name)>>,
    pub relabeled: Relabeled,
    name_buf: String,
    value_buf: String,
    scratch: Vec<(u32, u128)>,
}

impl<'r> Keyer<'r> {
    pub fn new(projection: &'r Projection, limits: AttributeLimits) -> Self {
        Self {
            projection,
            limits,
            index: HashMap::default(),
            name_ids: HashMap::default(),
            names: Vec::new(),
            by_position: Vec::new(),
            relabeled: Relabeled::default(),
            name_buf: String::new(),
            value_buf: String::new(),
            scratch: Vec::new(),
        }
    }

    fn name(&mut self, raw: &'r [u8], histogram: bool) -> Name {
        if let Some(&v) = self.index.get(&(raw, histogram)) {
            return v;
        }
        let key = text(raw);
        let renamed = output_label_name(key, histogram, &mut self.name_buf);
        let id = match self.name_ids.get(&self.name_buf) {
            Some(&id) => id,
            None => {
                let id = self.names.len() as u32;
                self.names.push(SetHash::key_hash(&self.name_buf));
                self.name_ids.insert(self.name_buf.clone(), id);
                id
            }
        };
        let v = Name {
            id,
            raw_hash: SetHash::key_hash(key),
            renamed,
            kept: self.projection.keeps(key),
        };
        self.index.insert((raw, histogram), v);
        v
    }

    /// `name`, remembered by attribute position.
    fn name_at(&mut self, i: usize, key: &'r [u8], histogram: bool) -> Name {
        if let Some(Some((k, h, n))) = self.by_position.get(i) {
            if *h == histogram && *k == key {
                return *n;
            }
        }
        let n = self.name(key, histogram);
        if i < 64 {
            if self.by_position.len() <= i {
                self.by_position.resize(i + 1, None);
            }
            self.by_position[i] = Some((key, histogram, n));
        }
        n
    }

    /// Hashes the kept attributes of a resource for points of one kind.
    pub fn resource(&mut self, kept: &[KeyValueView<'r>], histogram: bool) -> ResourcePart {
        let mut part = ResourcePart::default();
        if kept.len() > self.limits.max_attributes {
            part.error = Some(Reason::TooManyAttributes);
            return part;
        }
        for kv in kept {
            let Name { id, renamed, .. } = self.name(kv.key.as_bytes(), histogram);
            let v = value_bytes(kv.value, &mut self.value_buf);
            if let Err(r) = self.limits.check(kv.key.len(), v.len()) {
                part.error = Some(r);
            }
            if v.is_empty() {
                continue;
            }
            part.collide |= part.pairs.iter().any(|(i, _)| *i == id);
            part.renamed |= renamed;
            let pair = SetHash::pair_with(self.names[id as usize], v);
            part.pairs.push((id, pair));
        }
        part
    }

    /// (output key, source key) of a point. `resource` is the kept part `res` was built from,
    /// as labels for the point's kind.
    pub fn point(
        &mut self,
        res: &ResourcePart,
        resource: &[(String, String)],
        attrs: Attrs<'r>,
        histogram: bool,
        seeds: (u64, u64),
    ) -> Result<(u128, u128), Reason> {
        if let Some(r) = res.error {
            return Err(r);
        }
        if attrs.len() > self.limits.max_attributes {
            return Err(Reason::TooManyAttributes);
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        let mut collide = res.collide;
        let mut renamed = res.renamed;
        let mut mask = 0u64;
        let mut source = SetHash::default();
        for (i, kv) in attrs.raw().enumerate() {
            let Name {
                id,
                raw_hash,
                renamed: name_renamed,
                kept,
            } = self.name_at(i, kv.key, histogram);
            let v = value_bytes(kv.value, &mut self.value_buf);
            self.limits.check(kv.key.len(), v.len())?;
            source.add_pair(SetHash::pair_with(raw_hash, v));
            if v.is_empty() || !kept {
                continue;
            }
            let bit = 1u64 << (id & 63);
            if mask & bit != 0 && scratch.iter().any(|(i, _)| *i == id) {
                collide = true;
            }
            renamed |= name_renamed;
            mask |= bit;
            scratch.push((id, SetHash::pair_with(self.names[id as usize], v)));
        }
        self.relabeled.reserved += u64::from(renamed);
        self.relabeled.colliding += u64::from(collide);
        let output = if collide {
            // Joined values may be longer than any one attribute.
            let within = labels_within(
                histogram,
                resource,
                attrs,
                self.projection,
                self.limits.max_value_len,
            );
            let Some(labels) = within else {
                self.scratch = scratch;
                return Err(Reason::AttributeTooLong);
            };
            key_of(&labels, seeds.0)
        } else {
            let mut out = SetHash::default();
            for (_, pair) in &scratch {
                out.add_pair(*pair);
            }
            for (id, pair) in &res.pairs {
                let shadowed =
                    mask & (1u64 << (id & 63)) != 0 && scratch.iter().any(|(i, _)| i == id);
                if !shadowed {
                    out.add_pair(*pair);
                }
            }
            out.finish(seeds.0)
        };
        self.scratch = scratch;
        Ok((output, source.finish(seeds.1)))
    }
}

/// Resolves labels of new series from the request they came in.
pub struct RequestLabels {
    pub body: OtlpBody,
    /// Each resource's kept attributes, by the index points carry.
    pub resources: Arc<[ResourceLabels]>,
    pub projection: Arc<Projection>,
}

impl LabelResolver for RequestLabels {
    fn labels(&self, label_ref: LabelRef) -> Option<Vec<(String, String)>> {
        let LabelRef::Otlp {
            resource,
            point,
            histogram,
        } = label_ref
        else {
            return None;
        };
        let resource = self.resources.get(resource as usize)?.of(histogram);
        let point = self.body.at(point)?;
        // The attributes field of a histogram point, or of a number point.
        let attrs = Attrs::of(point, if histogram { 9 } else { 7 });
        Some(canonical(histogram, resource, attrs, &self.projection))
    }
}

#[cfg(test)]
#[path = "labels_tests.rs"]
mod tests;
