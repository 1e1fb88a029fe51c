//! A shard's state as records and back: what a checkpoint writes (every output series and every
//! source stream with its key) and how a restore rebuilds the shard from them, through the
//! series store's and the source table's own interfaces.

use crate::aggregate::key::{FamilyDesc, Kind};
use crate::aggregate::layout::BucketLayout;
use crate::aggregate::naming::{is_label_name, is_metric_name};
use crate::aggregate::series::{BucketCounts, CounterValue, CumulativeState, Series, SeriesValue};
use crate::aggregate::window::Window;

use super::store::NewSeries;
use super::{service_in, ShardState};

/// One output series with what it takes to rebuild it.
pub struct SeriesRecord<'a> {
    /// The stored key (bits 64..96 cleared; see `keytable.rs`).
    pub key: u128,
    pub family: &'a FamilyDesc,
    pub series: &'a Series,
    /// Bucket bounds of a histogram series; empty for counters.
    pub bounds: &'a [f64],
}

/// The exactly-once state of one source stream.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamState {
    Delta(Window),
    /// The last point; `feeds`: whether it feeds its series yet (a stream only baselined does
    /// not, though its points carry the series' key).
    Cumulative {
        last: CumulativeState,
        feeds: bool,
    },
}

/// Why a record could not be restored: the file is not one this code wrote, or is damaged.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("key {0:032x} appears twice")]
    Duplicate(u128),
    #[error("histogram bounds: {0}")]
    Bounds(String),
    #[error("{counts} bucket counts for {bounds} bounds")]
    Shape { counts: usize, bounds: usize },
    #[error("more series than ids")]
    Ids,
    #[error("counter total or histogram sum {0}")]
    Value(f64),
    /// A family or label name that no scrape could serve (spanagg never writes one).
    #[error("invalid {0} name {1:?}")]
    Name(&'static str, String),
}

/// One of the parts a checkpoint reads a shard in, one visit each, so that it holds one part
/// rather than the shard's whole state.
///
/// A series is in the part its key falls in, and every stream that feeds it (or fed it, or
/// would) is read with it: replay's exactly-once check is per stream, so a series read at
/// another instant than its streams would lose or double what was applied in between. Parts
/// read at different instants are as exact as shards read one after another (`storage`
/// explains why); overflow marks go with the series their points carry, pods with the last
/// part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub index: u32,
    pub of: u32,
}

impl Part {
    pub const WHOLE: Self = Self { index: 0, of: 1 };

    /// Whether rows keyed by the series of stored key `key` are in this part (rows without one,
    /// which a shard cut in parts has none of, go with the last).
    pub fn holds(self, key: Option<u128>) -> bool {
        match key {
            _ if self.of <= 1 => true,
            // The low half: shards route by the top bits, so these are spread within one.
            Some(k) => ((u128::from(k as u64) * u128::from(self.of)) >> 64) as u32 == self.index,
            None => self.is_last(),
        }
    }

    pub fn is_last(self) -> bool {
        self.index.saturating_add(1) >= self.of
    }

    /// All the parts of a shard, in reading order.
    pub fn all(of: u32) -> impl Iterator<Item = Self> {
        (0..of.max(1)).map(move |index| Self { index, of })
    }
}

/// A series value as a checkpoint holds it.
pub enum ValueRecord<'a> {
    Counter(CounterValue),
    Histogram {
        bounds: &'a [f64],
        counts: &'a [u64],
        sum: f64,
        input_buckets: u16,
    },
}

impl ShardState {
    /// Every live series with its key.
    pub fn series_records(&self) -> impl Iterator<Item = SeriesRecord<'_>> {
        self.series_records_in(Part::WHOLE)
    }

    /// The live series of `part`, with their keys.
    pub fn series_records_in(&self, part: Part) -> impl Iterator<Item = SeriesRecord<'_>> {
        let tables = self.store.tables();
        self.store.iter().filter_map(move |(key, _, series)| {
            if !part.holds(Some(key)) {
                return None;
            }
            let family = tables.family(series.family)?;
            let bounds = match &series.value {
                SeriesValue::Histogram { layout, .. } => tables.layout(*layout),
                SeriesValue::Counter(_) => &[],
            };
            Some(SeriesRecord {
                key,
                family,
                series,
                bounds,
            })
        })
    }

    /// Every source stream: its key, the key of the series it feeds (none for a cumulative
    /// stream only baselined, or one whose series expired), and its state.
    pub fn stream_records(&self) -> impl Iterator<Item = (u128, Option<u128>, StreamState)> + '_ {
        self.stream_records_in(Part::WHOLE)
    }

    /// The source streams of `part`, as [`Self::stream_records`] gives them.
    pub fn stream_records_in(
        &self,
        part: Part,
    ) -> impl Iterator<Item = (u128, Option<u128>, StreamState)> + '_ {
        self.sources.records(&self.ids, move |k| part.holds(k))
    }

    /// The overflow marks of `part`: each goes with the series its points carry.
    pub fn sticky_streams_in(&self, part: Part) -> impl Iterator<Item = (u128, u128, bool)> + '_ {
        self.sticky_streams()
            .filter(move |(_, series, _)| part.holds(Some(*series)))
    }

    /// How many parts a checkpoint reads this shard in, each of about `rows` rows; one if any
    /// stream does not know its series' key (restored without it: only read whole is it read
    /// with its series).
    pub fn checkpoint_parts(&self, rows: usize) -> u32 {
        // Each part is a pass over the whole shard: past this many, parts grow instead.
        const MOST: usize = 16;
        let all = self.series_len().saturating_add(self.sources_len());
        let of = all.div_ceil(rows.max(1)).clamp(1, MOST) as u32;
        if of > 1 && self.sources.any_without_part_key(&self.ids) {
            return 1;
        }
        of
    }

    /// Counts the streams and overflow marks that moved to another series' key: a checkpoint
    /// read in parts during which one did may have read it twice, or not at all.
    pub fn stream_moves(&self) -> u64 {
        self.sources.moves() + self.budget.moves()
    }

    /// Rebuilds one series. Labels may come in any order.
    pub fn restore_series(
        &mut self,
        key: u128,
        family: &FamilyDesc,
        labels: &mut [(String, String)],
        value: ValueRecord<'_>,
        created_ns: u64,
        updated_ns: u64,
    ) -> Result<(), RestoreError> {
        if self.store.get(key).is_some() {
            return Err(RestoreError::Duplicate(key));
        }
        let value = match value {
            // Ingest refuses NaN and negative values and sums, so no total spanagg wrote is
            // either (a sum of finite ones may reach +Inf).
            ValueRecord::Counter(c) if c.float.is_nan() || c.float < 0.0 => {
                return Err(RestoreError::Value(c.float));
            }
            ValueRecord::Counter(c) => SeriesValue::Counter(c),
            ValueRecord::Histogram {
                bounds,
                counts,
                sum,
                input_buckets,
            } => {
                BucketLayout::check(bounds).map_err(|e| RestoreError::Bounds(e.to_string()))?;
                if sum.is_nan() || sum < 0.0 {
                    return Err(RestoreError::Value(sum));
                }
                if counts.len() != bounds.len() + 1 {
                    return Err(RestoreError::Shape {
                        counts: counts.len(),
                        bounds: bounds.len(),
                    });
                }
                SeriesValue::Histogram {
                    layout: self.store.layout_id(bounds),
                    counts: BucketCounts::from_counts(counts),
                    sum,
                    input_buckets,
                }
            }
        };
        if !is_metric_name(&family.name) {
            return Err(RestoreError::Name("metric", family.name.to_string()));
        }
        labels.sort_unstable();
        let histogram = family.kind == Kind::Histogram;
        for (i, (k, _)) in labels.iter().enumerate() {
            let repeated = i > 0 && labels[i - 1].0 == *k;
            if repeated || !is_label_name(k, histogram) {
                return Err(RestoreError::Name("label", k.clone()));
            }
        }
        let new = NewSeries {
            family: self.store.restore_family(family),
            labels,
            value,
            created_ns,
            updated_ns,
        };
        if self
            .store
            .create(&mut self.ids, key, new, self.clock)
            .is_none()
        {
            return Err(RestoreError::Ids);
        }
        // A restored series exists whatever the limits say now.
        let overflow = super::budget::is_overflow(labels.iter().map(|(k, _)| &k[..]));
        self.budget
            .series_added(service_in(labels), overflow, self.clock);
        Ok(())
    }

    /// `bounds` as the shard's interned layout, for a restored cumulative stream to hold as
    /// live ones do (one allocation per distinct layout).
    pub fn shared_bounds(&mut self, bounds: &[f64]) -> std::sync::Arc<[f64]> {
        self.store.layout_shared(bounds).1
    }

    /// Distinct allocations of bounds the cumulative histogram streams hold.
    #[cfg(test)]
    pub fn distinct_cumulative_bounds(&self) -> usize {
        self.sources.distinct_bounds()
    }

    /// Rebuilds one source stream; restore its series first.
    pub fn restore_stream(
        &mut self,
        key: u128,
        series_key: Option<u128>,
        state: StreamState,
    ) -> Result<(), RestoreError> {
        if self.sources.contains(key) {
            return Err(RestoreError::Duplicate(key));
        }
        let feeds = !matches!(state, StreamState::Cumulative { feeds: false, .. });
        let id = series_key.filter(|_| feeds).and_then(|k| self.store.id(k));
        self.sources
            .restore(&mut self.ids, key, id, series_key, state, self.clock);
        Ok(())
    }
}
