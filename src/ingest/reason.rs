//! Why a data point was rejected before it reached a shard, and the per-request tally that the
//! partial success message and `spanagg_points_rejected_total{reason}` are built from. Every
//! reason is per point: one bad point never costs its request's other points.

use std::fmt::Write as _;

/// Why a point was rejected by validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Gauge = 0,
    Summary,
    ExponentialHistogram,
    NonMonotonicSum,
    UnspecifiedTemporality,
    ZeroTimestamp,
    InvalidInterval,
    MissingValue,
    InvalidValue,
    InvalidBounds,
    BucketCountMismatch,
    CountMismatch,
    InvalidSum,
    NonFinite,
    NegativeSum,
    SumWithoutCount,
    Future,
    TooManyAttributes,
    AttributeTooLong,
    NameTooLong,
    TooManyBuckets,
    MissingName,
}

impl Reason {
    pub const COUNT: usize = 22;
    pub const ALL: [Reason; Self::COUNT] = [
        Self::Gauge,
        Self::Summary,
        Self::ExponentialHistogram,
        Self::NonMonotonicSum,
        Self::UnspecifiedTemporality,
        Self::ZeroTimestamp,
        Self::InvalidInterval,
        Self::MissingValue,
        Self::InvalidValue,
        Self::InvalidBounds,
        Self::BucketCountMismatch,
        Self::CountMismatch,
        Self::InvalidSum,
        Self::NonFinite,
        Self::NegativeSum,
        Self::SumWithoutCount,
        Self::Future,
        Self::TooManyAttributes,
        Self::AttributeTooLong,
        Self::NameTooLong,
        Self::TooManyBuckets,
        Self::MissingName,
    ];
    /// The label value in `/internal/metrics`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gauge => "unsupported_gauge",
            Self::Summary => "unsupported_summary",
            Self::ExponentialHistogram => "unsupported_exponential_histogram",
            Self::NonMonotonicSum => "non_monotonic_sum",
            Self::UnspecifiedTemporality => "unspecified_temporality",
            Self::ZeroTimestamp => "zero_timestamp",
            Self::InvalidInterval => "invalid_interval",
            Self::MissingValue => "missing_value",
            Self::InvalidValue => "invalid_value",
            Self::InvalidBounds => "invalid_bounds",
            Self::BucketCountMismatch => "bucket_count_mismatch",
            Self::CountMismatch => "count_mismatch",
            Self::InvalidSum => "invalid_sum",
            Self::NonFinite => "non_finite",
            Self::NegativeSum => "negative_sum",
            Self::SumWithoutCount => "sum_without_count",
            Self::Future => "future",
            Self::TooManyAttributes => "too_many_attributes",
            Self::AttributeTooLong => "attribute_too_long",
            Self::NameTooLong => "name_too_long",
            Self::TooManyBuckets => "too_many_buckets",
            Self::MissingName => "missing_name",
        }
    }
    /// What the client reads in the partial success message.
    pub fn explain(self) -> &'static str {
        match self {
            Self::Gauge => "gauges are not aggregated",
            Self::Summary => "summaries are not aggregated",
            Self::ExponentialHistogram => "exponential histograms are not supported yet",
            Self::NonMonotonicSum => "non-monotonic sums are not aggregated",
            Self::UnspecifiedTemporality => "aggregation temporality is unspecified",
            Self::ZeroTimestamp => "start or end timestamp is zero",
            Self::InvalidInterval => "start time is not before end time",
            Self::MissingValue => "data point has no value",
            Self::InvalidValue => "value is negative",
            Self::InvalidBounds => "bucket bounds are not strictly increasing",
            Self::BucketCountMismatch => "bucket_counts length is not explicit_bounds length + 1",
            Self::CountMismatch => "count is not the sum of bucket_counts",
            Self::InvalidSum => "histogram sum is missing",
            Self::NonFinite => "a value, sum or bucket bound is NaN or infinite",
            Self::NegativeSum => "histogram sum is negative (a served _sum never decreases)",
            Self::SumWithoutCount => "histogram count is zero but its sum is not",
            Self::Future => {
                "end time lies further ahead of spanagg's clock than limits.max_future_skew \
                 (check the sender's clock and timestamp units)"
            }
            Self::TooManyAttributes => {
                "data point has more attributes than limits.max_attributes_per_point"
            }
            Self::AttributeTooLong => {
                "an attribute key or value is longer than limits.max_label_name_length or \
                 limits.max_label_value_length"
            }
            Self::NameTooLong => {
                "metric name and unit are longer than limits.max_metric_name_length"
            }
            Self::TooManyBuckets => "histogram has more buckets than limits.max_buckets_per_point",
            Self::MissingName => "metric has no name",
        }
    }
}

/// Per-reason rejection counts of one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rejections {
    pub counts: [u64; Reason::COUNT],
}

impl Rejections {
    pub fn add(&mut self, r: Reason, n: u64) {
        self.counts[r as usize] += n;
    }
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
    pub fn get(&self, r: Reason) -> u64 {
        self.counts[r as usize]
    }
    /// A message naming each reason with its count.
    pub fn message(&self) -> String {
        let mut out = String::new();
        for r in Reason::ALL {
            let n = self.counts[r as usize];
            if n > 0 {
                if !out.is_empty() {
                    out.push_str("; ");
                }
                let _ = write!(
                    out,
                    "{n} point(s) rejected: {} ({})",
                    r.explain(),
                    r.as_str()
                );
            }
        }
        out
    }
}
