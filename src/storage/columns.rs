//! The checkpoint's Arrow schema, and a shard's state as rows of it (`rows.rs` reads them back).
//!
//! One file, kinds of rows told apart by `record`: `series` rows carry the snapshot columns
//! (so `SELECT ... WHERE record = 'series'` reads like a snapshot) plus what an exact restore
//! needs (the key, the help text, the integer and float parts of a counter); `stream` rows carry
//! a source stream's exactly-once state: the applied ranges of a delta stream, or the last point
//! of a cumulative one (in the value columns); `pod` and `overflowed` rows carry the pods seen and
//! the streams sent to overflow series. `schema/checkpoint.txt` documents every field and a test
//! keeps it true.

use std::sync::Arc;

use arrow_array::builder::{
    Float64Builder, ListBuilder, MapBuilder, StringBuilder, StringDictionaryBuilder, StructBuilder,
    TimestampNanosecondBuilder, UInt16Builder, UInt32Builder, UInt64Builder,
};
use arrow_array::types::Int32Type;
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{ArrowError, DataType, Field, Fields, Schema, SchemaRef};

use crate::aggregate::key::Kind;
use crate::aggregate::series::{CumulativeValue, SeriesValue};
use crate::aggregate::shard::{ShardState, StreamState};
use crate::columnar::{append_labels, dict, doc, label_map, ts, LabelMapBuilder, FIXED_LABELS};

fn list(t: DataType) -> DataType {
    DataType::List(Arc::new(Field::new_list_field(t, true)))
}

fn range_fields() -> Fields {
    vec![
        Field::new("start", DataType::UInt64, false),
        Field::new("end", DataType::UInt64, false),
    ]
    .into()
}

/// The checkpoint schema, field by field.
pub fn checkpoint_schema() -> SchemaRef {
    let series = "series rows";
    let mut fields = vec![
        doc(
            Field::new("record", dict(), false),
            "series (an output series), stream (a source stream's exactly-once state), pod (a resource identity seen; key_lo is its hash, service_name its service) or overflowed (a source stream sent to its service's overflow series; int_total 1: to the global one)",
        ),
        doc(
            Field::new("shard", DataType::UInt32, false),
            "shard that held the row when it was written",
        ),
        doc(
            Field::new("key_lo", DataType::UInt64, false),
            "low 64 bits of the row's 128-bit key (output key for series, source key for streams)",
        ),
        doc(
            Field::new("key_hi", DataType::UInt32, false),
            "top 32 bits of the key (bits 64..96 are not stored)",
        ),
        doc(
            Field::new("metric", dict(), true),
            &format!("{series}: Prometheus family name (without the counter _total suffix)"),
        ),
        doc(
            Field::new("otel_metric", dict(), true),
            &format!("{series}: OTel metric name the family came from"),
        ),
        doc(
            Field::new("kind", dict(), true),
            &format!("{series}: counter or histogram"),
        ),
        doc(
            Field::new("unit", dict(), true),
            &format!("{series}: UCUM unit as sent, may be empty"),
        ),
        doc(
            Field::new("help", dict(), true),
            &format!("{series}: HELP text (the OTel description)"),
        ),
    ];
    for label in FIXED_LABELS {
        fields.push(doc(
            Field::new(label, dict(), true),
            &format!("{series}: output label of that name; null when the series does not have it"),
        ));
    }
    fields.extend([
        doc(
            Field::new("labels", label_map(), true),
            &format!("{series}: every other output label, name to value"),
        ),
        doc(
            Field::new("created", ts(), true),
            &format!("{series}: earliest start time of the deltas that built the series"),
        ),
        doc(
            Field::new("updated", ts(), true),
            &format!("{series}: newest end time applied"),
        ),
        doc(
            Field::new("value", DataType::Float64, true),
            "counter total (series) or last cumulative counter value (cumulative streams)",
        ),
        doc(
            Field::new("int_total", DataType::UInt64, true),
            "integer part of value, kept exact",
        ),
        doc(
            Field::new("float_total", DataType::Float64, true),
            "floating-point part of value",
        ),
        doc(
            Field::new("count", DataType::UInt64, true),
            "histogram observation count (series, or last cumulative point)",
        ),
        doc(
            Field::new("sum", DataType::Float64, true),
            "histogram sum of observations",
        ),
        doc(
            Field::new("bucket_bounds", list(DataType::Float64), true),
            "explicit upper bounds, ascending, +Inf implied",
        ),
        doc(
            Field::new("bucket_counts", list(DataType::UInt64), true),
            "per-bucket (not cumulative) counts, +Inf last",
        ),
        doc(
            Field::new("input_buckets", DataType::UInt16, true),
            "histogram series: most buckets an input (per-pod) point had, before folding to these",
        ),
        doc(
            Field::new("series_key_lo", DataType::UInt64, true),
            "stream rows: key_lo of the series the stream feeds (cumulative: or would feed); null if none; overflowed rows: of the series its points carry",
        ),
        doc(
            Field::new("series_key_hi", DataType::UInt32, true),
            "stream rows: key_hi of that series",
        ),
        doc(
            Field::new("temporality", dict(), true),
            "stream rows: delta, cumulative, or cumulative_baseline (a cumulative stream only baselined: it feeds no series yet)",
        ),
        doc(
            Field::new("applied", list(DataType::Struct(range_fields())), true),
            "delta streams: disjoint [start, end) ns ranges already applied, oldest first",
        ),
        doc(
            Field::new("last_start", ts(), true),
            "cumulative streams: start time of the last point",
        ),
        doc(
            Field::new("last_end", ts(), true),
            "cumulative streams: time of the last point",
        ),
    ]);
    Arc::new(Schema::new(fields))
}

fn ns(t: u64) -> i64 {
    i64::try_from(t).unwrap_or(i64::MAX)
}

/// Column builders for one batch.
struct Builders {
    record: StringDictionaryBuilder<Int32Type>,
    shard: UInt32Builder,
    key_lo: UInt64Builder,
    key_hi: UInt32Builder,
    family: [StringDictionaryBuilder<Int32Type>; 5],
    fixed: Vec<StringDictionaryBuilder<Int32Type>>,
    labels: LabelMapBuilder,
    created: TimestampNanosecondBuilder,
    updated: TimestampNanosecondBuilder,
    value: Float64Builder,
    int_total: UInt64Builder,
    float_total: Float64Builder,
    count: UInt64Builder,
    sum: Float64Builder,
    bounds: ListBuilder<Float64Builder>,
    counts: ListBuilder<UInt64Builder>,
    input_buckets: UInt16Builder,
    series_lo: UInt64Builder,
    series_hi: UInt32Builder,
    temporality: StringDictionaryBuilder<Int32Type>,
    applied: ListBuilder<StructBuilder>,
    last_start: TimestampNanosecondBuilder,
    last_end: TimestampNanosecondBuilder,
}

impl Builders {
    /// Builders sized for `rows` rows up front: grown by doubling instead, the builders of
    /// 80k stream rows leave up to twice their size behind, and the checkpoint's transient is
    /// mostly these buffers.
    fn with_capacity(rows: usize) -> Self {
        let t = || TimestampNanosecondBuilder::with_capacity(rows).with_timezone("UTC");
        let d = || StringDictionaryBuilder::<Int32Type>::with_capacity(rows, 16, 256);
        let u64s = || UInt64Builder::with_capacity(rows);
        let f64s = || Float64Builder::with_capacity(rows);
        // Ranges are per delta stream, not per row: left to grow (empty for series rows).
        let range = StructBuilder::from_fields(range_fields(), 0);
        Self {
            record: d(),
            shard: UInt32Builder::with_capacity(rows),
            key_lo: u64s(),
            key_hi: UInt32Builder::with_capacity(rows),
            family: [d(), d(), d(), d(), d()],
            fixed: FIXED_LABELS.iter().map(|_| d()).collect(),
            labels: MapBuilder::with_capacity(
                None,
                StringBuilder::new(),
                StringBuilder::new(),
                rows,
            ),
            created: t(),
            updated: t(),
            value: f64s(),
            int_total: u64s(),
            float_total: f64s(),
            count: u64s(),
            sum: f64s(),
            bounds: ListBuilder::with_capacity(Float64Builder::new(), rows),
            counts: ListBuilder::with_capacity(UInt64Builder::new(), rows),
            input_buckets: UInt16Builder::with_capacity(rows),
            series_lo: u64s(),
            series_hi: UInt32Builder::with_capacity(rows),
            temporality: d(),
            applied: ListBuilder::with_capacity(range, rows),
            last_start: t(),
            last_end: t(),
        }
    }

    fn key(&mut self, record: &str, shard: u32, key: u128) {
        self.record.append_value(record);
        self.shard.append_value(shard);
        self.key_lo.append_value(key as u64);
        self.key_hi.append_value((key >> 96) as u32);
    }

    fn no_series_columns(&mut self) -> Result<(), ArrowError> {
        self.family.iter_mut().for_each(|b| b.append_null());
        self.fixed.iter_mut().for_each(|b| b.append_null());
        self.labels.append(false)?;
        self.created.append_null();
        self.updated.append_null();
        Ok(())
    }

    fn no_stream_columns(&mut self) {
        self.series_key(None);
        self.no_stream_state();
    }

    fn series_key(&mut self, key: Option<u128>) {
        self.series_lo.append_option(key.map(|k| k as u64));
        self.series_hi.append_option(key.map(|k| (k >> 96) as u32));
    }

    fn no_stream_state(&mut self) {
        self.temporality.append_null();
        self.applied.append_null();
        self.last_start.append_null();
        self.last_end.append_null();
    }

    fn counter(&mut self, int: Option<u64>, float: Option<f64>) {
        let any = int.is_some() || float.is_some();
        self.value
            .append_option(any.then(|| int.unwrap_or(0) as f64 + float.unwrap_or(0.0)));
        self.int_total.append_option(int);
        self.float_total.append_option(float);
        self.count.append_null();
        self.sum.append_null();
        self.bounds.append_null();
        self.counts.append_null();
        self.input_buckets.append_null();
    }

    fn histogram(
        &mut self,
        bounds: &[f64],
        counts: impl Iterator<Item = u64>,
        sum: f64,
        n: u64,
        input_buckets: Option<u16>,
    ) {
        self.input_buckets.append_option(input_buckets);
        self.value.append_null();
        self.int_total.append_null();
        self.float_total.append_null();
        self.count.append_value(n);
        self.sum.append_value(sum);
        self.bounds.values().append_slice(bounds);
        self.bounds.append(true);
        counts.for_each(|c| self.counts.values().append_value(c));
        self.counts.append(true);
    }

    fn finish(mut self) -> Result<RecordBatch, ArrowError> {
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(self.record.finish()),
            Arc::new(self.shard.finish()),
            Arc::new(self.key_lo.finish()),
            Arc::new(self.key_hi.finish()),
        ];
        cols.extend(
            self.family
                .iter_mut()
                .map(|b| Arc::new(b.finish()) as ArrayRef),
        );
        cols.extend(
            self.fixed
                .iter_mut()
                .map(|b| Arc::new(b.finish()) as ArrayRef),
        );
        cols.extend([
            Arc::new(self.labels.finish()) as ArrayRef,
            Arc::new(self.created.finish()),
            Arc::new(self.updated.finish()),
            Arc::new(self.value.finish()),
            Arc::new(self.int_total.finish()),
            Arc::new(self.float_total.finish()),
            Arc::new(self.count.finish()),
            Arc::new(self.sum.finish()),
            Arc::new(self.bounds.finish()),
            Arc::new(self.counts.finish()),
            Arc::new(self.input_buckets.finish()),
            Arc::new(self.series_lo.finish()),
            Arc::new(self.series_hi.finish()),
            Arc::new(self.temporality.finish()),
            Arc::new(self.applied.finish()),
            Arc::new(self.last_start.finish()),
            Arc::new(self.last_end.finish()),
        ]);
        RecordBatch::try_new(checkpoint_schema(), cols)
    }
}

/// A shard's series, stream, and pod and overflowed-stream rows (three batches), built on the
/// shard's thread.
pub fn shard_batches(state: &ShardState, shard: u32) -> Result<[RecordBatch; 3], ArrowError> {
    let mut b = Builders::with_capacity(state.series_len());
    for r in state.series_records() {
        b.key("series", shard, r.key);
        let f = r.family;
        let kind = match f.kind {
            Kind::Counter => "counter",
            Kind::Histogram => "histogram",
        };
        for (col, v) in b
            .family
            .iter_mut()
            .zip([&*f.name, &*f.otel_name, kind, &*f.unit, &*f.help])
        {
            col.append_value(v);
        }
        append_labels(state.labels(&r.series.labels), &mut b.fixed, &mut b.labels)?;
        b.created.append_value(ns(r.series.created_ns));
        b.updated.append_value(ns(r.series.updated_ns));
        match &r.series.value {
            SeriesValue::Counter(c) => b.counter(Some(c.int), Some(c.float)),
            SeriesValue::Histogram {
                counts,
                sum,
                input_buckets,
                ..
            } => b.histogram(
                r.bounds,
                counts.iter(),
                *sum,
                counts.total(),
                Some(*input_buckets),
            ),
        }
        b.no_stream_columns();
    }
    let series = b.finish()?;

    let mut b = Builders::with_capacity(state.sources_len());
    for (key, series_key, state) in state.stream_records() {
        b.key("stream", shard, key);
        b.no_series_columns()?;
        b.series_key(series_key);
        match state {
            StreamState::Delta(w) => {
                b.temporality.append_value("delta");
                b.counter(None, None);
                for &(s, e) in w.ranges() {
                    let r = b.applied.values();
                    r.field_builder::<UInt64Builder>(0)
                        .ok_or_else(|| ArrowError::SchemaError("applied.start".into()))?
                        .append_value(s);
                    r.field_builder::<UInt64Builder>(1)
                        .ok_or_else(|| ArrowError::SchemaError("applied.end".into()))?
                        .append_value(e);
                    r.append(true);
                }
                b.applied.append(true);
                b.last_start.append_null();
                b.last_end.append_null();
            }
            StreamState::Cumulative { last, feeds } => {
                // A stream only baselined knows its series' key but does not feed it yet.
                b.temporality.append_value(if feeds {
                    "cumulative"
                } else {
                    "cumulative_baseline"
                });
                match &last.value {
                    CumulativeValue::Int(i) => b.counter(Some(*i), None),
                    CumulativeValue::Float(f) => b.counter(None, Some(*f)),
                    CumulativeValue::Histogram {
                        bounds,
                        counts,
                        sum,
                        count,
                    } => b.histogram(bounds, counts.iter().copied(), *sum, *count, None),
                }
                b.applied.append_null();
                b.last_start.append_value(ns(last.start_ns));
                b.last_end.append_value(ns(last.end_ns));
            }
        }
    }
    let streams = b.finish()?;

    let mut b = Builders::with_capacity(0);
    for (pod, service) in state.pods() {
        b.key("pod", shard, u128::from(pod));
        b.family.iter_mut().for_each(|c| c.append_null());
        for (i, col) in b.fixed.iter_mut().enumerate() {
            col.append_option((i == 0).then_some(service));
        }
        b.labels.append(false)?;
        b.created.append_null();
        b.updated.append_null();
        b.counter(None, None);
        b.no_stream_columns();
    }
    for (source, series, global) in state.sticky_streams() {
        b.key("overflowed", shard, source);
        b.no_series_columns()?;
        // int_total 1: to the global overflow series (past limits.max_series).
        b.counter(global.then_some(1), None);
        // Where its points go: the row is routed by it when the shard count changed.
        b.series_key(Some(series));
        b.no_stream_state();
    }
    let pods = b.finish()?;
    Ok([series, streams, pods])
}
