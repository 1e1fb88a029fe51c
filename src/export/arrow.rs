//! The state as Arrow: one row per output series. Each shard builds the `RecordBatch` of its own
//! series on its own thread (between ingest batches), so a snapshot pauses ingestion for at most
//! one shard's copy. The schema is a contract: `schema/snapshot.txt` is its documented form and
//! a test fails if the two drift apart.

use std::sync::Arc;

use arrow_array::builder::{
    Float64Builder, ListBuilder, MapBuilder, StringBuilder, StringDictionaryBuilder,
    TimestampNanosecondBuilder, UInt64Builder,
};
use arrow_array::types::Int32Type;
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{ArrowError, DataType, Field, Schema, SchemaRef};

use crate::aggregate::key::Kind;
use crate::aggregate::series::SeriesValue;
use crate::aggregate::shard::{SeriesFilter, ShardState};
use crate::columnar::{append_labels, dict, doc, label_map, ts};
pub use crate::columnar::{schema_text, FIXED_LABELS};

/// The snapshot schema, field by field.
pub fn snapshot_schema() -> SchemaRef {
    let mut fields = vec![
        doc(
            Field::new("metric", dict(), false),
            "Prometheus family name (without the counter _total suffix)",
        ),
        doc(
            Field::new("otel_metric", dict(), false),
            "OTel metric name the family came from",
        ),
        doc(
            Field::new("kind", dict(), false),
            "counter (monotonic sum) or histogram (explicit buckets)",
        ),
        doc(
            Field::new("unit", dict(), false),
            "UCUM unit as sent, may be empty",
        ),
    ];
    for label in FIXED_LABELS {
        fields.push(doc(
            Field::new(label, dict(), true),
            "output label of that name; null when the series does not have it",
        ));
    }
    fields.extend([
        doc(
            Field::new("labels", label_map(), false),
            "every other output label, name to value",
        ),
        doc(
            Field::new("created", ts(), false),
            "earliest start time of the deltas that built the series (OpenMetrics _created)",
        ),
        doc(
            Field::new("updated", ts(), false),
            "newest end time applied to the series",
        ),
        doc(
            Field::new("value", DataType::Float64, true),
            "counter total since created (calls for traces.span.metrics.calls); null for histograms",
        ),
        doc(
            Field::new("count", DataType::UInt64, true),
            "histogram observation count (equals the +Inf bucket); null for counters",
        ),
        doc(
            Field::new("sum", DataType::Float64, true),
            "histogram sum of observations; null for counters",
        ),
        doc(
            Field::new(
                "bucket_bounds",
                DataType::List(Arc::new(Field::new_list_field(DataType::Float64, true))),
                true,
            ),
            "explicit upper bounds, ascending, +Inf implied; null for counters",
        ),
        doc(
            Field::new(
                "bucket_counts",
                DataType::List(Arc::new(Field::new_list_field(DataType::UInt64, true))),
                true,
            ),
            "per-bucket (not cumulative) counts, one more than bounds (+Inf last); null for counters",
        ),
    ]);
    Arc::new(Schema::new(fields))
}

/// Which series a snapshot includes.
pub type Filter = SeriesFilter;

/// The `RecordBatch` of one shard's series that pass `filter`.
pub fn shard_batch(state: &ShardState, filter: &Filter) -> Result<RecordBatch, ArrowError> {
    let mut metric = StringDictionaryBuilder::<Int32Type>::new();
    let mut otel = StringDictionaryBuilder::<Int32Type>::new();
    let mut kind = StringDictionaryBuilder::<Int32Type>::new();
    let mut unit = StringDictionaryBuilder::<Int32Type>::new();
    let mut fixed: Vec<StringDictionaryBuilder<Int32Type>> = FIXED_LABELS
        .iter()
        .map(|_| StringDictionaryBuilder::new())
        .collect();
    let mut labels = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
    let mut created = TimestampNanosecondBuilder::new().with_timezone("UTC");
    let mut updated = TimestampNanosecondBuilder::new().with_timezone("UTC");
    let mut value = Float64Builder::new();
    let mut count = UInt64Builder::new();
    let mut sum = Float64Builder::new();
    let mut bounds = ListBuilder::new(Float64Builder::new());
    let mut counts = ListBuilder::new(UInt64Builder::new());

    for (s, fam, _) in state.select(filter) {
        metric.append_value(&*fam.name);
        otel.append_value(&*fam.otel_name);
        kind.append_value(match fam.kind {
            Kind::Counter => "counter",
            Kind::Histogram => "histogram",
        });
        unit.append_value(&*fam.unit);
        append_labels(state.labels(&s.labels), &mut fixed, &mut labels)?;
        created.append_value(i64::try_from(s.created_ns).unwrap_or(i64::MAX));
        updated.append_value(i64::try_from(s.updated_ns).unwrap_or(i64::MAX));
        match &s.value {
            SeriesValue::Counter(c) => {
                value.append_value(c.total());
                count.append_null();
                sum.append_null();
                bounds.append_null();
                counts.append_null();
            }
            SeriesValue::Histogram {
                layout,
                counts: c,
                sum: total,
                ..
            } => {
                value.append_null();
                count.append_value(c.total());
                sum.append_value(*total);
                bounds.values().append_slice(state.layout(*layout));
                bounds.append(true);
                c.for_each(|n| counts.values().append_value(n));
                counts.append(true);
            }
        }
    }
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(metric.finish()),
        Arc::new(otel.finish()),
        Arc::new(kind.finish()),
        Arc::new(unit.finish()),
    ];
    columns.extend(fixed.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
    columns.extend([
        Arc::new(labels.finish()) as ArrayRef,
        Arc::new(created.finish()),
        Arc::new(updated.finish()),
        Arc::new(value.finish()),
        Arc::new(count.finish()),
        Arc::new(sum.finish()),
        Arc::new(bounds.finish()),
        Arc::new(counts.finish()),
    ]);
    RecordBatch::try_new(snapshot_schema(), columns)
}

/// Writes batches as one Arrow IPC stream.
pub fn ipc_stream(batches: &[RecordBatch]) -> Result<Vec<u8>, ArrowError> {
    let schema = snapshot_schema();
    let mut w = arrow_ipc::writer::StreamWriter::try_new(Vec::new(), &schema)?;
    for b in batches.iter().filter(|b| b.num_rows() > 0) {
        w.write(b)?;
    }
    w.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_file_documents_the_code_schema_exactly() {
        assert_eq!(
            crate::columnar::documented_fields("snapshot.txt"),
            schema_text(&snapshot_schema()),
            "schema/snapshot.txt and the code disagree: update one to match the other"
        );
    }
}
