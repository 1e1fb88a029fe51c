//! The output series of one shard: the series table, the interned tables their labels, families
//! and layouts live in, and how a value is added to a series.
//!
//! Invariants: a live series holds one reference on its family, its label-name list, each of its
//! label values and (a histogram) its output layout; `sweep` gives them back, so interned tables
//! never outlive the last series that used them. Every series carries a [`SeriesId`] as its tag.

use std::sync::Arc;

use crate::aggregate::interned::Interned;
use crate::aggregate::interner::Interner;
use crate::aggregate::key::{FamilyDesc, Labels};
use crate::aggregate::keytable::{stored_key, KeyTable};
use crate::aggregate::layout::LayoutMismatch;
use crate::aggregate::series::{BucketCounts, CounterValue, Series, SeriesValue};

use super::budget::is_overflow;
use super::ids::{SeriesId, SeriesIds};
use super::SERVICE_LABEL;
use crate::aggregate::batch::Outcome;

/// A value to add, borrowed from a batch or a cumulative difference.
pub enum Add<'a> {
    Int(u64),
    Float(f64),
    Hist {
        layout: u32,
        counts: &'a [u64],
        sum: f64,
    },
}

/// Why a value could not be added to its series.
#[derive(Debug)]
pub enum AddError {
    /// The client's bucket bounds do not fold into the series' (refused, counted).
    Layout,
    /// An invariant of spanagg's own failed: a bug, never the client's doing.
    Internal(&'static str),
}

impl From<LayoutMismatch> for AddError {
    fn from(_: LayoutMismatch) -> Self {
        Self::Layout
    }
}

impl AddError {
    pub fn outcome(self) -> Outcome {
        match self {
            Self::Layout => Outcome::LayoutMismatch,
            Self::Internal(what) => internal(what),
        }
    }
}

/// Logs a failed invariant; the point is refused as `internal_error`, not blamed on the client.
pub fn internal(what: &'static str) -> Outcome {
    tracing::error!(
        invariant = what,
        "spanagg bug: a point was refused (internal_error)"
    );
    Outcome::InternalError
}

/// A series the sweep dropped, as its service's budget counted it.
pub struct Gone {
    pub service: Box<str>,
    pub overflow: bool,
}

/// What a new series is built from (see [`Store::create`]).
pub struct NewSeries<'a> {
    pub family: u32,
    /// Sorted by name.
    pub labels: &'a [(String, String)],
    pub value: SeriesValue,
    pub created_ns: u64,
    pub updated_ns: u64,
}

/// The series table of one shard with its interned labels and tables.
pub struct Store {
    /// Families, bucket layouts, fold maps, label-name lists.
    tables: Interned,
    series: KeyTable<Series>,
    strings: Interner,
}

impl Store {
    pub fn new(max_families: usize) -> Self {
        Self {
            tables: Interned::new(max_families),
            series: KeyTable::default(),
            strings: Interner::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.series.len()
    }

    /// Bytes of the series index's allocation (see [`KeyTable::index_bytes`]).
    pub fn index_bytes(&self) -> usize {
        self.series.index_bytes()
    }

    pub fn get(&self, key: u128) -> Option<&Series> {
        self.series.get(key)
    }

    pub fn id(&self, key: u128) -> Option<SeriesId> {
        self.series
            .get_tagged(key)
            .and_then(|(tag, _)| SeriesId::from_tag(tag))
    }

    /// Every series as (stored key, id, series).
    pub fn iter(&self) -> impl Iterator<Item = (u128, Option<SeriesId>, &Series)> {
        self.series
            .iter()
            .map(|(k, tag, s)| (k, SeriesId::from_tag(tag), s))
    }

    pub fn values(&self) -> impl Iterator<Item = &Series> {
        self.series.values()
    }

    pub fn tables(&self) -> &Interned {
        &self.tables
    }

    /// A family's id, interned unheld (freed at `end_batch` unless a series holds it); `None`
    /// past the family cap.
    pub fn family_id(&mut self, desc: &FamilyDesc) -> Option<u32> {
        self.tables.family_id(desc)
    }

    /// A layout's id, interned unheld like [`family_id`](Self::family_id).
    pub fn layout_id(&mut self, bounds: &[f64]) -> u32 {
        self.tables.layout_id(bounds)
    }

    /// A layout's id and its interned bounds, to share (see [`Interned::layout_shared`]).
    pub fn layout_shared(&mut self, bounds: &[f64]) -> (u32, Arc<[f64]>) {
        self.tables.layout_shared(bounds)
    }

    /// Frees what this batch interned that no series holds.
    pub fn end_batch(&mut self) {
        self.tables.end_batch();
    }

    /// A series' labels as (name, value) pairs, sorted by name.
    pub fn labels<'a>(&'a self, labels: &'a Labels) -> impl Iterator<Item = (&'a str, &'a str)> {
        self.tables
            .key_set(labels.keys)
            .iter()
            .zip(labels.values.iter())
            .map(|(k, v)| (self.strings.get(*k), self.strings.get(*v)))
    }

    /// A series' `service_name` label ("" without one).
    pub fn service<'a>(&'a self, labels: &'a Labels) -> &'a str {
        self.labels(labels)
            .find(|(k, _)| *k == SERVICE_LABEL)
            .map_or("", |(_, v)| v)
    }

    /// The empty value a new series starts from, for a first addition `add`: a histogram takes
    /// `configured` bounds (the operator's, for its metric) or else the point's own.
    pub fn empty_value(
        &mut self,
        add: &Add<'_>,
        configured: Option<&[f64]>,
    ) -> Result<SeriesValue, LayoutMismatch> {
        Ok(match add {
            Add::Int(_) | Add::Float(_) => SeriesValue::Counter(CounterValue::default()),
            Add::Hist { layout, .. } => {
                let out = configured.map_or(*layout, |b| self.tables.layout_id(b));
                if out != *layout {
                    self.tables.fold(*layout, out)?;
                }
                SeriesValue::Histogram {
                    layout: out,
                    counts: BucketCounts::zeros(self.tables.layout(out).len() + 1),
                    sum: 0.0,
                    input_buckets: 0,
                }
            }
        })
    }

    /// Inserts a series under `key`, holding its family, labels and layout; `None` if no id is
    /// left (nothing is held then).
    pub fn create(
        &mut self,
        ids: &mut SeriesIds,
        key: u128,
        new: NewSeries<'_>,
        clock: u32,
    ) -> Option<SeriesId> {
        let id = ids.alloc(stored_key(key))?;
        if let SeriesValue::Histogram { layout, .. } = &new.value {
            self.tables.hold_layout(*layout);
        }
        self.tables.hold_family(new.family);
        let keys = self.tables.hold_key_set(&mut self.strings, new.labels);
        let values = new
            .labels
            .iter()
            .map(|(_, v)| self.strings.acquire(v))
            .collect();
        let series = Series {
            family: new.family,
            labels: Labels { keys, values },
            created_ns: new.created_ns,
            updated_ns: new.updated_ns,
            touched: clock,
            value: new.value,
        };
        self.series
            .insert_tagged(key, SeriesId::tag(Some(id)), series);
        Some(id)
    }

    /// A family read back from a checkpoint, past the cap too: it existed already.
    pub fn restore_family(&mut self, desc: &FamilyDesc) -> u32 {
        self.tables.family_id_past_cap(desc)
    }

    /// Adds `add` to the series under `key` over `(start_ns, end_ns)`.
    pub fn add(
        &mut self,
        key: u128,
        add: Add<'_>,
        start_ns: u64,
        end_ns: u64,
        clock: u32,
    ) -> Result<SeriesId, AddError> {
        let Some((tag, s)) = self.series.get_mut_tagged(key) else {
            return Err(AddError::Internal("a series just found is gone"));
        };
        let fold = match (&add, &s.value) {
            (Add::Hist { layout, .. }, SeriesValue::Histogram { layout: out, .. })
                if layout != out =>
            {
                Some(self.tables.fold(*layout, *out)?)
            }
            _ => None,
        };
        let Some(id) = SeriesId::from_tag(*tag) else {
            return Err(AddError::Internal("a series has no id"));
        };
        match (&mut s.value, add) {
            (SeriesValue::Counter(c), Add::Int(i)) => c.int = c.int.saturating_add(i),
            // Finite inputs can still add up past f64::MAX: saturate, as integer counts do, so
            // a series is never served as +Inf.
            (SeriesValue::Counter(c), Add::Float(f)) => c.float = (c.float + f).min(f64::MAX),
            (
                SeriesValue::Histogram {
                    counts: out,
                    sum: osum,
                    input_buckets,
                    ..
                },
                Add::Hist { counts, sum, .. },
            ) => {
                let n = u16::try_from(counts.len()).unwrap_or(u16::MAX);
                *input_buckets = (*input_buckets).max(n);
                match fold {
                    None if counts.len() == out.len() => {
                        for (i, c) in counts.iter().enumerate() {
                            out.add(i, *c);
                        }
                    }
                    Some(map) if map.len() == counts.len() => {
                        for (&j, c) in map.iter().zip(counts) {
                            out.add(j as usize, *c);
                        }
                    }
                    _ => return Err(AddError::Internal("bucket counts do not fit their layout")),
                }
                *osum = (*osum + sum).min(f64::MAX);
            }
            _ => {
                return Err(AddError::Internal(
                    "a point's kind differs from its series'",
                ))
            }
        }
        s.created_ns = s.created_ns.min(start_ns);
        s.updated_ns = s.updated_ns.max(end_ns);
        s.touched = clock;
        Ok(id)
    }

    /// Drops the series `idle` says were not touched within the TTL, gives back what they held
    /// and retires their ids; returns what each counted toward.
    pub fn sweep(&mut self, ids: &mut SeriesIds, idle: impl Fn(u32) -> bool) -> Vec<Gone> {
        let mut gone = Vec::new();
        let mut held: Vec<(Option<SeriesId>, u32, u32, Option<u32>)> = Vec::new();
        let strings = &mut self.strings;
        let tables = &self.tables;
        self.series.retain_or(
            |_, s| !idle(s.touched),
            |tag, s| {
                let keys = tables.key_set(s.labels.keys);
                let layout = match &s.value {
                    SeriesValue::Histogram { layout, .. } => Some(*layout),
                    SeriesValue::Counter(_) => None,
                };
                held.push((SeriesId::from_tag(tag), s.family, s.labels.keys, layout));
                let service = keys
                    .iter()
                    .zip(s.labels.values.iter())
                    .find(|(k, _)| strings.get(**k) == SERVICE_LABEL)
                    .map_or_else(|| "".into(), |(_, v)| strings.get(*v).into());
                let overflow = is_overflow(keys.iter().map(|k| strings.get(*k)));
                gone.push(Gone { service, overflow });
                for v in s.labels.values.iter() {
                    strings.release(*v);
                }
            },
        );
        for (id, family, keys, layout) in held {
            if let Some(id) = id {
                ids.series_removed(id);
            }
            self.tables.release_family(family);
            self.tables.release_key_set(&mut self.strings, keys);
            if let Some(l) = layout {
                self.tables.release_layout(l);
            }
        }
        self.tables.purge();
        gone
    }
}
