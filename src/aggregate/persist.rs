//! A shard's state as records and back: what a checkpoint writes (every output series and every
//! source stream with its key) and how a restore rebuilds the shard from them. It sits beside
//! `shard.rs` because it reads and rebuilds the shard's private tables (ids, interned labels).

use super::*;
use crate::aggregate::layout::BucketLayout;

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
        self.series.iter().filter_map(move |(key, _, series)| {
            let family = self.tables.family(series.family)?;
            let bounds = match &series.value {
                SeriesValue::Histogram { layout, .. } => self.layout(*layout),
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
        let mut key_of: Vec<Option<u128>> = vec![None; self.ids.len()];
        for (key, id, _) in self.series.iter() {
            if let Some(slot) = key_of.get_mut(id as usize) {
                *slot = Some(key);
            }
        }
        let series_key = move |id: u32| key_of.get(id as usize).copied().flatten();
        let deltas = self
            .deltas
            .iter()
            .map(|(key, id, w)| (key, id, 0, StreamState::Delta(w.clone())));
        // A cumulative stream knows its output key even while it feeds no series (only
        // baselined), so its row goes back to the shard its points go to.
        let cumulative = self.cumulative.iter().map(|(key, s)| {
            let state = StreamState::Cumulative {
                last: s.last.clone(),
                feeds: s.series != NO_SERIES,
            };
            (*key, s.series, s.key, state)
        });
        deltas.chain(cumulative).map(move |(key, id, own, state)| {
            let series = series_key(id).or((own != 0).then_some(own));
            (key, series, state)
        })
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
        if self.series.get(key).is_some() {
            return Err(RestoreError::Duplicate(key));
        }
        let value = match value {
            ValueRecord::Counter(c) => SeriesValue::Counter(c),
            ValueRecord::Histogram {
                bounds,
                counts,
                sum,
                input_buckets,
            } => {
                BucketLayout::check(bounds).map_err(|e| RestoreError::Bounds(e.to_string()))?;
                if counts.len() != bounds.len() + 1 {
                    return Err(RestoreError::Shape {
                        counts: counts.len(),
                        bounds: bounds.len(),
                    });
                }
                SeriesValue::Histogram {
                    layout: {
                        let id = self.tables.layout_id(bounds);
                        self.tables.hold_layout(id);
                        id
                    },
                    counts: BucketCounts::from_counts(counts),
                    sum,
                    input_buckets,
                }
            }
        };
        let fam = self.tables.restore_family(family);
        labels.sort_unstable();
        let keys = self.tables.hold_key_set(&mut self.strings, labels);
        let service = service_in(labels).to_owned();
        // A restored series exists whatever the limits say now.
        self.series_added(
            &service,
            budget::is_overflow(labels.iter().map(|(k, _)| &k[..])),
        );
        let values = labels
            .iter()
            .map(|(_, v)| self.strings.acquire(v))
            .collect();
        let id = self.alloc_id();
        let series = Series {
            family: fam,
            labels: Labels { keys, values },
            created_ns,
            updated_ns,
            touched: self.clock,
            value,
        };
        self.series.insert_tagged(key, id, series);
        Ok(())
    }

    /// Rebuilds one source stream; restore its series first.
    pub fn restore_stream(
        &mut self,
        key: u128,
        series_key: Option<u128>,
        state: StreamState,
    ) -> Result<(), RestoreError> {
        if self.deltas.get(key).is_some() || self.cumulative.contains_key(&key) {
            return Err(RestoreError::Duplicate(key));
        }
        let feeds = !matches!(state, StreamState::Cumulative { feeds: false, .. });
        let id = series_key
            .filter(|_| feeds)
            .and_then(|k| self.series.get_tagged(k))
            .map_or(NO_SERIES, |(id, _)| id);
        if id != NO_SERIES {
            self.source_added(id);
        }
        match state {
            StreamState::Delta(w) => self.deltas.insert_tagged(key, id, w),
            StreamState::Cumulative { last, .. } => {
                self.cumulative.insert(
                    key,
                    CumulativeSource {
                        last,
                        touched: self.clock,
                        series: id,
                        key: series_key.map_or(0, stored_key),
                    },
                );
            }
        }
        Ok(())
    }
}
