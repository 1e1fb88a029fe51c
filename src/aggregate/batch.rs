//! What crosses from the ingest edge into a shard: a batch of points with the means to name
//! new series and to report back, and the per-point outcomes the shard reports.

use std::sync::Arc;

use super::key::FamilyDesc;
use super::series::Point;

/// A message's place in a request body, to find it again without walking the request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Span {
    pub at: u32,
    pub len: u32,
}

/// Where a point's labels come from, for its batch's resolver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelRef {
    /// A data point of an OTLP request: its resource's index in the request, and where the
    /// point lies in the body.
    Otlp {
        resource: u32,
        point: Span,
        histogram: bool,
    },
    /// An entry of the resolver's own list (the services of overflow series).
    Entry(u32),
}

/// Turns a point's `label_ref` into output labels (sanitised keys, sorted). Called only when a
/// point creates a new series, so the hot path never builds labels. `None` when the handle is
/// not one this resolver made (a bug: the point is refused as `internal_error`).
pub trait LabelResolver: Send + Sync {
    fn labels(&self, label_ref: LabelRef) -> Option<Vec<(String, String)>>;
}

/// Points for one shard from one request, and how to report back.
pub struct Batch {
    pub families: Arc<[FamilyDesc]>,
    pub layouts: Arc<[Arc<[f64]>]>,
    pub counts: Vec<u64>,
    pub points: Vec<Point>,
    pub labels: Arc<dyn LabelResolver>,
    /// Points for overflow series, sent on by the ingest task: exempt from series budgets.
    pub overflow: bool,
    /// The time to judge the points by (TTLs, returning streams) instead of the shard's clock:
    /// a replayed request's acceptance time.
    pub now_ns: Option<u64>,
    pub done: Box<dyn FnOnce(BatchResult) + Send>,
}

/// What happened to one point in a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied = 0,
    AppliedAfterGap,
    AppliedLate,
    CumulativeReset,
    /// First point of a cumulative stream that began before we started: only remembered.
    CumulativeBaseline,
    /// A cumulative point not newer than the last one.
    CumulativeStale,
    Duplicate,
    TooLate,
    LayoutMismatch,
    /// A new source stream past `limits.max_source_streams`: refused, retryably.
    StreamLimit,
    /// Different values for the interval a stream applied last: a second writer.
    Conflict,
    /// A new metric family past `limits.max_metric_families`.
    FamilyLimit,
    /// An invariant of spanagg's own failed (a bug): logged, never blamed on the client.
    InternalError,
}

impl Outcome {
    pub const COUNT: usize = 13;
    pub const ALL: [Outcome; Self::COUNT] = [
        Self::Applied,
        Self::AppliedAfterGap,
        Self::AppliedLate,
        Self::CumulativeReset,
        Self::CumulativeBaseline,
        Self::CumulativeStale,
        Self::Duplicate,
        Self::TooLate,
        Self::LayoutMismatch,
        Self::StreamLimit,
        Self::Conflict,
        Self::FamilyLimit,
        Self::InternalError,
    ];
    /// Why a refused point (reported to the client in the partial success) was refused, as the client reads it; `None` for the rest.
    pub fn explain(self) -> Option<&'static str> {
        match self {
            Self::TooLate => Some(
                "delta starts before late_delta_window behind its stream's newest point, or \
                 belongs to an unknown stream and is older than series_ttl",
            ),
            Self::LayoutMismatch => {
                Some("bucket bounds do not contain every bound of the output series")
            }
            Self::InternalError => Some(
                "an internal error in spanagg (a bug, not the data): please report it with the \
                 server's log",
            ),
            Self::FamilyLimit => Some(
                "a new metric past limits.max_metric_families (spanagg aggregates span metrics: \
                 send other metrics elsewhere)",
            ),
            Self::Conflict => Some(
                "a second sender with the same identity sent other values for an interval this \
                 stream already applied: give every sidecar a unique identity (service.instance.id \
                 or k8s.pod.name on its resource)",
            ),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::AppliedAfterGap => "applied_after_gap",
            Self::AppliedLate => "applied_late",
            Self::CumulativeReset => "cumulative_reset",
            Self::CumulativeBaseline => "cumulative_baseline",
            Self::CumulativeStale => "cumulative_stale",
            Self::Duplicate => "duplicate",
            Self::TooLate => "too_late",
            Self::LayoutMismatch => "layout_mismatch",
            Self::StreamLimit => "stream_limit",
            Self::Conflict => "conflict",
            Self::FamilyLimit => "family_limit",
            Self::InternalError => "internal_error",
        }
    }
}

/// Per-outcome counts of one batch, and the points it hands back for overflow series.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchResult {
    pub counts: [u32; Outcome::COUNT],
    pub redirect: Option<Box<super::shard::Redirect>>,
}

impl BatchResult {
    /// Adds the counts (redirects are taken separately).
    pub fn add(&mut self, other: &BatchResult) {
        for (a, b) in self.counts.iter_mut().zip(other.counts) {
            *a += b;
        }
    }
    pub fn get(&self, o: Outcome) -> u32 {
        self.counts[o as usize]
    }
}
