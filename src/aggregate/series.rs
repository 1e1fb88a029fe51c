//! Values: points as the core receives them, output series, and per-source state (the
//! exactly-once window of a delta stream, or the last values of a cumulative one).

use std::sync::Arc;

use super::batch::LabelRef;
use super::key::Labels;

/// A validated value of one data point. Histogram counts live in the batch's arena.
#[derive(Debug, Clone, PartialEq)]
pub enum PointValue {
    Int(u64),
    Float(f64),
    Histogram {
        /// Index into the batch's layouts.
        layout: u32,
        /// Range into the batch's counts arena: `bounds + 1` buckets.
        counts: (u32, u32),
        sum: f64,
        count: u64,
    },
}

/// Temporality of the stream a point belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Temporality {
    Delta,
    Cumulative,
}

/// One data point, validated and keyed by the ingest edge.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Output key: family + kept labels.
    pub series: u128,
    /// Source key: one pod's stream.
    pub source: u128,
    /// Hash of the resource identity (every resource attribute): which pod sent it.
    pub resource: u64,
    /// Index into the batch's families.
    pub family: u32,
    /// What the batch's label resolver turns into labels for a new series.
    pub label_ref: LabelRef,
    pub start_ns: u64,
    pub end_ns: u64,
    pub temporality: Temporality,
    pub value: PointValue,
    /// Fingerprint of the value (never 0): tells a retry from a second writer.
    pub fp: u32,
}

/// A fingerprint of a point's numbers (never 0, which means "unknown").
pub fn fingerprint(words: impl Iterator<Item = u64>) -> u32 {
    let h = words.fold(0xcbf2_9ce4_8422_2325u64, |h, w| {
        (h ^ w).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(29)
    });
    ((h >> 32) as u32 ^ h as u32) | 1
}

/// A counter that stays exact for integer input and still takes floating-point input.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CounterValue {
    pub int: u64,
    pub float: f64,
}

impl CounterValue {
    /// The value as a float, never below the exact integer part: past 2^53 `int as f64` can
    /// round down, and a counter served exactly as an integer must not then seem to drop
    /// when a float part appears.
    pub fn total(&self) -> f64 {
        let t = self.int as f64 + self.float;
        if (t as u64) < self.int && t < u64::MAX as f64 {
            t.next_up()
        } else {
            t
        }
    }
    pub fn is_int(&self) -> bool {
        self.float == 0.0
    }
}

/// The running value of an output series.
#[derive(Debug, Clone, PartialEq)]
pub enum SeriesValue {
    Counter(CounterValue),
    Histogram {
        /// Shard-local layout id.
        layout: u32,
        /// Per-bucket (not cumulative) counts, `+Inf` last. The count is their sum (validated at
        /// ingest), so it is not stored.
        counts: BucketCounts,
        sum: f64,
        /// Most buckets an input point had (more than `counts` when finer or `output_bounds`
        /// layouts are folded): what the report counts as the per-pod cost.
        input_buckets: u16,
    },
}

/// Bucket counts stored as `u32` until one of them needs more, then as `u64`: a 50-bucket
/// series costs 200 bytes instead of 400 for the first four billion observations per bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BucketCounts {
    Narrow(Box<[u32]>),
    Wide(Box<[u64]>),
}

impl BucketCounts {
    pub fn zeros(n: usize) -> Self {
        Self::Narrow(vec![0; n].into())
    }

    /// Counts as given, narrow if every one fits in `u32`.
    pub fn from_counts(counts: &[u64]) -> Self {
        match counts.iter().map(|&c| u32::try_from(c)).collect() {
            Ok(narrow) => Self::Narrow(narrow),
            Err(_) => Self::Wide(counts.into()),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Self::Narrow(c) => c.len(),
            Self::Wide(c) => c.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, i: usize) -> u64 {
        match self {
            Self::Narrow(c) => c.get(i).map_or(0, |v| u64::from(*v)),
            Self::Wide(c) => c.get(i).copied().unwrap_or(0),
        }
    }

    /// Adds `v` to bucket `i` (ignored if out of range), widening on overflow. A count never
    /// wraps: past `u64::MAX` it stays there (it never goes down either).
    pub fn add(&mut self, i: usize, v: u64) {
        match self {
            Self::Narrow(c) => {
                let Some(slot) = c.get_mut(i) else { return };
                match u32::try_from(u64::from(*slot).saturating_add(v)) {
                    Ok(n) => *slot = n,
                    Err(_) => {
                        let wide: Box<[u64]> = c.iter().map(|x| u64::from(*x)).collect();
                        *self = Self::Wide(wide);
                        self.add(i, v);
                    }
                }
            }
            Self::Wide(c) => {
                if let Some(slot) = c.get_mut(i) {
                    *slot = slot.saturating_add(v);
                }
            }
        }
    }

    /// The histogram's count: the sum of its buckets, saturating like each bucket does.
    pub fn total(&self) -> u64 {
        let mut t = 0u64;
        self.for_each(|c| t = t.saturating_add(c));
        t
    }

    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }

    /// Calls `f` with every count in order; the width is matched once, not per bucket.
    pub fn for_each(&self, mut f: impl FnMut(u64)) {
        match self {
            Self::Narrow(c) => c.iter().for_each(|v| f(u64::from(*v))),
            Self::Wide(c) => c.iter().for_each(|v| f(*v)),
        }
    }
}

/// One output series.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Shard-local family id.
    pub family: u32,
    pub labels: Labels,
    /// Earliest start of the deltas that built it, so replicas fed the same data agree.
    pub created_ns: u64,
    /// Newest end time applied.
    pub updated_ns: u64,
    /// Shard clock (seconds) of the last point: drives the idle TTL.
    pub touched: u32,
    pub value: SeriesValue,
}

/// Last cumulative values of one source stream.
#[derive(Debug, Clone, PartialEq)]
pub struct CumulativeState {
    pub start_ns: u64,
    pub end_ns: u64,
    pub value: CumulativeValue,
}

#[derive(Debug, Clone, PartialEq)]
pub enum CumulativeValue {
    Int(u64),
    Float(f64),
    Histogram {
        /// Shared with the request's layout (and every stream whose last point it carried):
        /// a stream's own copy would be about half its state.
        bounds: Arc<[f64]>,
        counts: Box<[u64]>,
        sum: f64,
        count: u64,
    },
}

/// The difference between two cumulative points, or why there is none.
#[derive(Debug, Clone, PartialEq)]
pub enum CumulativeDelta {
    /// Not newer than the last point (an older start, or an end not after the last end): a
    /// retry or reordering. Dropped, state unchanged.
    Stale,
    /// A restart with an unknown start (start == time): its rate contribution is zero, so it
    /// only becomes the new baseline.
    Baseline,
    /// A delta to apply over `(start, end)`; `reset` when the stream restarted.
    Delta {
        start_ns: u64,
        reset: bool,
        value: CumulativeValue,
    },
}

impl CumulativeValue {
    /// `self - prev`, or `None` if any part went down (a reset) or the layouts differ.
    fn minus(&self, prev: &CumulativeValue) -> Option<CumulativeValue> {
        match (self, prev) {
            (Self::Int(a), Self::Int(b)) => a.checked_sub(*b).map(Self::Int),
            (Self::Float(a), Self::Float(b)) => (a >= b).then(|| Self::Float(a - b)),
            (
                Self::Histogram {
                    bounds,
                    counts,
                    sum,
                    count,
                },
                Self::Histogram {
                    bounds: pb,
                    counts: pc,
                    sum: ps,
                    count: pn,
                },
            ) => {
                // A sum that went down would serve a decreasing `_sum`: a reset too.
                let same = Arc::ptr_eq(bounds, pb) || bounds == pb;
                if !same || count < pn || sum < ps {
                    return None;
                }
                let diff: Option<Box<[u64]>> = counts
                    .iter()
                    .zip(pc.iter())
                    .map(|(a, b)| a.checked_sub(*b))
                    .collect();
                Some(Self::Histogram {
                    bounds: bounds.clone(),
                    counts: diff?,
                    sum: sum - ps,
                    count: count - pn,
                })
            }
            _ => None,
        }
    }
}

/// Turns the next cumulative point into a delta, updating `state`.
///
/// A newer start time, or a value that went down under the same start, is a reset: the new
/// value is the delta. An older start time is a delayed retry from before the reset, never a
/// reset itself (that would add a whole lifetime again).
pub fn cumulative_step(
    state: &mut CumulativeState,
    start_ns: u64,
    end_ns: u64,
    value: CumulativeValue,
) -> CumulativeDelta {
    if start_ns < state.start_ns || (start_ns == state.start_ns && end_ns <= state.end_ns) {
        return CumulativeDelta::Stale;
    }
    let diff = (start_ns == state.start_ns)
        .then(|| value.minus(&state.value))
        .flatten();
    let out = match diff {
        Some(d) => CumulativeDelta::Delta {
            start_ns: state.end_ns,
            reset: false,
            value: d,
        },
        None if start_ns == end_ns => CumulativeDelta::Baseline,
        None => CumulativeDelta::Delta {
            start_ns,
            reset: true,
            value: value.clone(),
        },
    };
    *state = CumulativeState {
        start_ns,
        end_ns,
        value,
    };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(start: u64, end: u64, v: u64) -> CumulativeState {
        CumulativeState {
            start_ns: start,
            end_ns: end,
            value: CumulativeValue::Int(v),
        }
    }

    #[test]
    fn bucket_counts_widen_instead_of_overflowing() {
        let mut c = BucketCounts::zeros(2);
        c.add(1, u64::from(u32::MAX));
        assert!(matches!(c, BucketCounts::Narrow(_)));
        c.add(1, 2);
        assert!(matches!(c, BucketCounts::Wide(_)));
        assert_eq!(
            c.iter().collect::<Vec<_>>(),
            vec![0, u64::from(u32::MAX) + 2]
        );
        c.add(5, 1); // out of range: ignored, no panic
    }

    #[test]
    fn a_counter_past_2_pow_53_never_seems_to_drop_when_a_float_part_appears() {
        let exact = (1u64 << 53) + 1;
        let c = CounterValue {
            int: exact,
            float: 0.0,
        };
        assert!(c.is_int());
        let mixed = CounterValue {
            int: exact,
            float: 1e-9,
        };
        assert!(mixed.total() as u64 >= exact, "{}", mixed.total());
        for int in [(1u64 << 60) + 3, u64::MAX - 1, 5] {
            let v = CounterValue { int, float: 0.25 };
            assert!(v.total() as u64 >= int || v.total() >= int as f64, "{int}");
        }
    }

    #[test]
    fn bucket_counts_saturate_instead_of_wrapping() {
        let mut c = BucketCounts::zeros(1);
        c.add(0, 7);
        c.add(0, u64::MAX - 1);
        assert_eq!(c.get(0), u64::MAX);
        c.add(0, u64::MAX);
        assert_eq!(c.get(0), u64::MAX, "never wraps, never panics");
        let mut two = BucketCounts::zeros(2);
        two.add(0, u64::MAX);
        two.add(1, 5);
        assert_eq!(two.total(), u64::MAX, "the count saturates too");
    }

    #[test]
    fn a_cumulative_histogram_sum_going_down_is_a_reset() {
        let h = |sum: f64| CumulativeValue::Histogram {
            bounds: vec![1.0].into(),
            counts: vec![1, 1].into(),
            sum,
            count: 2,
        };
        let mut s = CumulativeState {
            start_ns: 1,
            end_ns: 10,
            value: h(9.0),
        };
        let d = cumulative_step(&mut s, 1, 20, h(5.0));
        assert!(
            matches!(d, CumulativeDelta::Delta { reset: true, .. }),
            "{d:?}"
        );
    }

    #[test]
    fn cumulative_points_become_differences() {
        let mut s = st(1, 10, 5);
        let d = cumulative_step(&mut s, 1, 20, CumulativeValue::Int(8));
        assert_eq!(
            d,
            CumulativeDelta::Delta {
                start_ns: 10,
                reset: false,
                value: CumulativeValue::Int(3)
            }
        );
    }

    #[test]
    fn a_retried_or_older_cumulative_point_is_stale() {
        let mut s = st(1, 10, 5);
        assert_eq!(
            cumulative_step(&mut s, 1, 10, CumulativeValue::Int(5)),
            CumulativeDelta::Stale
        );
        assert_eq!(
            cumulative_step(&mut s, 1, 5, CumulativeValue::Int(2)),
            CumulativeDelta::Stale
        );
        assert_eq!(s, st(1, 10, 5), "state untouched");
    }

    #[test]
    fn an_older_start_is_a_stale_retry_not_a_reset() {
        // (S1, 200, 50), (S2, 400, 5), (S1, 250, 60), (S2, 450, 8): 5 then 3, never 60.
        let mut s = st(1, 200, 50);
        let d = cumulative_step(&mut s, 2, 400, CumulativeValue::Int(5));
        assert!(matches!(
            d,
            CumulativeDelta::Delta {
                reset: true,
                value: CumulativeValue::Int(5),
                ..
            }
        ));
        assert_eq!(
            cumulative_step(&mut s, 1, 250, CumulativeValue::Int(60)),
            CumulativeDelta::Stale
        );
        let d = cumulative_step(&mut s, 2, 450, CumulativeValue::Int(8));
        assert!(matches!(
            d,
            CumulativeDelta::Delta {
                reset: false,
                value: CumulativeValue::Int(3),
                ..
            }
        ));
    }

    #[test]
    fn a_restart_with_an_unknown_start_is_only_a_baseline() {
        let mut s = st(1, 200, 50);
        let d = cumulative_step(&mut s, 300, 300, CumulativeValue::Int(7));
        assert_eq!(d, CumulativeDelta::Baseline);
        assert_eq!(s, st(300, 300, 7));
        let d = cumulative_step(&mut s, 300, 310, CumulativeValue::Int(9));
        assert!(matches!(
            d,
            CumulativeDelta::Delta {
                reset: false,
                value: CumulativeValue::Int(2),
                ..
            }
        ));
    }

    #[test]
    fn a_decrease_or_new_start_time_is_a_reset() {
        let mut s = st(1, 10, 5);
        let d = cumulative_step(&mut s, 1, 20, CumulativeValue::Int(2));
        assert_eq!(
            d,
            CumulativeDelta::Delta {
                start_ns: 1,
                reset: true,
                value: CumulativeValue::Int(2)
            }
        );
        let d = cumulative_step(&mut s, 15, 30, CumulativeValue::Int(7));
        assert_eq!(
            d,
            CumulativeDelta::Delta {
                start_ns: 15,
                reset: true,
                value: CumulativeValue::Int(7)
            }
        );
    }

    #[test]
    fn histogram_differences_are_per_bucket() {
        let h = |c: &[u64], sum: f64| CumulativeValue::Histogram {
            bounds: vec![1.0].into(),
            counts: c.into(),
            sum,
            count: c.iter().sum(),
        };
        let mut s = CumulativeState {
            start_ns: 1,
            end_ns: 10,
            value: h(&[1, 2], 5.0),
        };
        let d = cumulative_step(&mut s, 1, 20, h(&[3, 2], 6.5));
        assert_eq!(
            d,
            CumulativeDelta::Delta {
                start_ns: 10,
                reset: false,
                value: h(&[2, 0], 1.5)
            }
        );
        // One bucket going down is a reset even if the count grew.
        let d = cumulative_step(&mut s, 1, 30, h(&[2, 9], 9.0));
        assert!(matches!(d, CumulativeDelta::Delta { reset: true, .. }));
    }
}
