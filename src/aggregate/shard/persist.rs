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
        let tables = self.store.tables();
        self.store.iter().filter_map(move |(key, _, series)| {
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
        let mut key_of: Vec<Option<u128>> = vec![None; self.ids.bound()];
        for (key, id, _) in self.store.iter() {
            if let Some(slot) = id.and_then(|id| key_of.get_mut(id.index())) {
                *slot = Some(key);
            }
        }
        self.sources
            .records(move |id| key_of.get(id.index()).copied().flatten())
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
