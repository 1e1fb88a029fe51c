//! The cardinality report: how many output series and input (per-pod) source streams there are,
//! per service, per metric and per span name, the reduction factor, and the distinct values of
//! every label, flagging labels whose values look unbounded. Each shard summarises its own
//! series (`ShardSummary::of`) on its own thread; `Merged` joins the summaries and answers both
//! the report and the Mimir-style label questions (label names with value counts, values of one
//! label with series counts).

mod report;
mod summary;
mod table;

pub use report::{
    LabelNameCount, LabelNames, LabelReport, LabelValues, LabelValuesOf, Merged, MetricReport,
    NameCounts, Report, ServiceReport, ServiceValues, Totals, ValueCount,
};
pub use summary::{Cost, Counts, ShardSummary};

use crate::aggregate::shard::SeriesFilter;

/// Which series a report covers.
pub type Scope = SeriesFilter;
