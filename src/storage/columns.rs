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

use super::lazy::{Lazy, Zeros};
use crate::aggregate::key::Kind;
use crate::aggregate::series::{CumulativeValue, SeriesValue};
use crate::aggregate::shard::{Part, ShardState, StreamState};
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

type Dict = StringDictionaryBuilder<Int32Type>;

fn dict_builder(rows: usize) -> Dict {
    Dict::with_capacity(rows, 16, 256)
}

fn ts_builder(rows: usize) -> TimestampNanosecondBuilder {
    TimestampNanosecondBuilder::with_capacity(rows).with_timezone("UTC")
}

/// Column builders for one batch. Past the key, every column is [`Lazy`]: a batch of one kind
/// of row pays nothing for the columns its rows leave null.
struct Builders {
    record: Dict,
    shard: UInt32Builder,
    key_lo: UInt64Builder,
    key_hi: UInt32Builder,
    family: Lazy<Vec<Dict>>,
    fixed: Lazy<Vec<Dict>>,
    labels: Lazy<LabelMapBuilder>,
    created: Lazy<TimestampNanosecondBuilder>,
    updated: Lazy<TimestampNanosecondBuilder>,
    value: Lazy<Float64Builder>,
    int_total: Lazy<UInt64Builder>,
    float_total: Lazy<Float64Builder>,
    count: Lazy<UInt64Builder>,
    sum: Lazy<Float64Builder>,
    bounds: Lazy<ListBuilder<Float64Builder>>,
    counts: Lazy<ListBuilder<UInt64Builder>>,
    input_buckets: Lazy<UInt16Builder>,
    series_lo: Lazy<UInt64Builder>,
    series_hi: Lazy<UInt32Builder>,
    temporality: Lazy<Dict>,
    applied: Lazy<ListBuilder<StructBuilder>>,
    last_start: Lazy<TimestampNanosecondBuilder>,
    last_end: Lazy<TimestampNanosecondBuilder>,
}

impl Builders {
    /// Builders sized for `rows` rows up front: grown by doubling instead, the builders of
    /// 80k stream rows leave up to twice their size behind, and the checkpoint's transient is
    /// mostly these buffers.
    fn with_capacity(rows: usize) -> Self {
        const FAMILY: usize = 5;
        Self {
            record: dict_builder(rows),
            shard: UInt32Builder::with_capacity(rows),
            key_lo: UInt64Builder::with_capacity(rows),
            key_hi: UInt32Builder::with_capacity(rows),
            family: Lazy::wide(FAMILY, rows, |n| {
                (0..FAMILY).map(|_| dict_builder(n)).collect()
            }),
            fixed: Lazy::wide(FIXED_LABELS.len(), rows, |n| {
                FIXED_LABELS.iter().map(|_| dict_builder(n)).collect()
            }),
            labels: Lazy::new(rows, |n| {
                MapBuilder::with_capacity(None, StringBuilder::new(), StringBuilder::new(), n)
            }),
            created: Lazy::new(rows, ts_builder),
            updated: Lazy::new(rows, ts_builder),
            value: Lazy::new(rows, Float64Builder::with_capacity),
            int_total: Lazy::new(rows, UInt64Builder::with_capacity),
            float_total: Lazy::new(rows, Float64Builder::with_capacity),
            count: Lazy::new(rows, UInt64Builder::with_capacity),
            sum: Lazy::new(rows, Float64Builder::with_capacity),
            bounds: Lazy::new(rows, |n| {
                ListBuilder::with_capacity(Float64Builder::new(), n)
            }),
            counts: Lazy::new(rows, |n| {
                ListBuilder::with_capacity(UInt64Builder::new(), n)
            }),
            input_buckets: Lazy::new(rows, UInt16Builder::with_capacity),
            series_lo: Lazy::new(rows, UInt64Builder::with_capacity),
            series_hi: Lazy::new(rows, UInt32Builder::with_capacity),
            temporality: Lazy::new(rows, dict_builder),
            // One range per delta stream in the common case; grown past that by doubling.
            applied: Lazy::new(rows, |n| {
                ListBuilder::with_capacity(StructBuilder::from_fields(range_fields(), n), n)
            }),
            last_start: Lazy::new(rows, ts_builder),
            last_end: Lazy::new(rows, ts_builder),
        }
    }

    fn key(&mut self, record: &str, shard: u32, key: u128) {
        self.record.append_value(record);
        self.shard.append_value(shard);
        self.key_lo.append_value(key as u64);
        self.key_hi.append_value((key >> 96) as u32);
    }

    fn no_series_columns(&mut self) {
        self.family.null();
        self.fixed.null();
        self.labels.null();
        self.created.null();
        self.updated.null();
    }

    fn no_stream_columns(&mut self) {
        self.series_key(None);
        self.no_stream_state();
    }

    fn series_key(&mut self, key: Option<u128>) {
        self.series_lo.option(key.map(|k| k as u64));
        self.series_hi.option(key.map(|k| (k >> 96) as u32));
    }

    fn no_stream_state(&mut self) {
        self.temporality.null();
        self.applied.null();
        self.last_start.null();
        self.last_end.null();
    }

    fn counter(&mut self, int: Option<u64>, float: Option<f64>) {
        let any = int.is_some() || float.is_some();
        self.value
            .option(any.then(|| int.unwrap_or(0) as f64 + float.unwrap_or(0.0)));
        self.int_total.option(int);
        self.float_total.option(float);
        self.count.null();
        self.sum.null();
        self.bounds.null();
        self.counts.null();
        self.input_buckets.null();
    }

    fn histogram(
        &mut self,
        bounds: &[f64],
        counts: impl Iterator<Item = u64>,
        sum: f64,
        n: u64,
        input_buckets: Option<u16>,
    ) {
        self.input_buckets.option(input_buckets);
        self.value.null();
        self.int_total.null();
        self.float_total.null();
        self.count.get().append_value(n);
        self.sum.get().append_value(sum);
        let b = self.bounds.get();
        b.values().append_slice(bounds);
        b.append(true);
        let c = self.counts.get();
        counts.for_each(|n| c.values().append_value(n));
        c.append(true);
    }

    fn finish(mut self) -> Result<RecordBatch, ArrowError> {
        let schema = checkpoint_schema();
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(self.record.finish()),
            Arc::new(self.shard.finish()),
            Arc::new(self.key_lo.finish()),
            Arc::new(self.key_hi.finish()),
        ];
        let z = &mut Zeros::default();
        self.family.finish_into(&mut cols, &schema, z)?;
        self.fixed.finish_into(&mut cols, &schema, z)?;
        self.labels.finish_into(&mut cols, &schema, z)?;
        self.created.finish_into(&mut cols, &schema, z)?;
        self.updated.finish_into(&mut cols, &schema, z)?;
        self.value.finish_into(&mut cols, &schema, z)?;
        self.int_total.finish_into(&mut cols, &schema, z)?;
        self.float_total.finish_into(&mut cols, &schema, z)?;
        self.count.finish_into(&mut cols, &schema, z)?;
        self.sum.finish_into(&mut cols, &schema, z)?;
        self.bounds.finish_into(&mut cols, &schema, z)?;
        self.counts.finish_into(&mut cols, &schema, z)?;
        self.input_buckets.finish_into(&mut cols, &schema, z)?;
        self.series_lo.finish_into(&mut cols, &schema, z)?;
        self.series_hi.finish_into(&mut cols, &schema, z)?;
        self.temporality.finish_into(&mut cols, &schema, z)?;
        self.applied.finish_into(&mut cols, &schema, z)?;
        self.last_start.finish_into(&mut cols, &schema, z)?;
        self.last_end.finish_into(&mut cols, &schema, z)?;
        RecordBatch::try_new(schema, cols)
    }
}

/// A shard's series, stream, and pod and overflowed-stream rows (three batches), built on the
/// shard's thread.
pub fn shard_batches(state: &ShardState, shard: u32) -> Result<[RecordBatch; 3], ArrowError> {
    part_batches(state, shard, Part::WHOLE)
}

/// The rows of one part of a shard (see [`Part`]), as [`shard_batches`] gives a whole shard's.
pub fn part_batches(
    state: &ShardState,
    shard: u32,
    part: Part,
) -> Result<[RecordBatch; 3], ArrowError> {
    // Sized for a part's share with room for keys that fall unevenly (pages reserved but never
    // written are never resident); grown past that by doubling.
    let share = |n: usize| match part.of {
        0 | 1 => n,
        of => {
            let even = n.div_ceil(of as usize);
            even + even / 8 + 64
        }
    };
    let mut b = Builders::with_capacity(share(state.series_len()));
    for r in state.series_records_in(part) {
        b.key("series", shard, r.key);
        let f = r.family;
        let kind = match f.kind {
            Kind::Counter => "counter",
            Kind::Histogram => "histogram",
        };
        for (col, v) in
            b.family
                .get()
                .iter_mut()
                .zip([&*f.name, &*f.otel_name, kind, &*f.unit, &*f.help])
        {
            col.append_value(v);
        }
        append_labels(
            state.labels(&r.series.labels),
            b.fixed.get(),
            b.labels.get(),
        )?;
        b.created.get().append_value(ns(r.series.created_ns));
        b.updated.get().append_value(ns(r.series.updated_ns));
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

    let mut b = Builders::with_capacity(share(state.sources_len()));
    for (key, series_key, state) in state.stream_records_in(part) {
        b.key("stream", shard, key);
        b.no_series_columns();
        b.series_key(series_key);
        match state {
            StreamState::Delta(w) => {
                b.temporality.get().append_value("delta");
                b.counter(None, None);
                let applied = b.applied.get();
                for (s, e) in w.ranges() {
                    let r = applied.values();
                    r.field_builder::<UInt64Builder>(0)
                        .ok_or_else(|| ArrowError::SchemaError("applied.start".into()))?
                        .append_value(s);
                    r.field_builder::<UInt64Builder>(1)
                        .ok_or_else(|| ArrowError::SchemaError("applied.end".into()))?
                        .append_value(e);
                    r.append(true);
                }
                applied.append(true);
                b.last_start.null();
                b.last_end.null();
            }
            StreamState::Cumulative { last, feeds } => {
                // A stream only baselined knows its series' key but does not feed it yet.
                b.temporality.get().append_value(if feeds {
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
                b.applied.null();
                b.last_start.get().append_value(ns(last.start_ns));
                b.last_end.get().append_value(ns(last.end_ns));
            }
        }
    }
    let streams = b.finish()?;

    let mut b = Builders::with_capacity(0);
    let pods = state.pods().filter(|_| part.is_last());
    for (pod, service) in pods {
        b.key("pod", shard, u128::from(pod));
        b.family.null();
        for (i, col) in b.fixed.get().iter_mut().enumerate() {
            col.append_option((i == 0).then_some(service));
        }
        b.labels.null();
        b.created.null();
        b.updated.null();
        b.counter(None, None);
        b.no_stream_columns();
    }
    for (source, series, global) in state.sticky_streams_in(part) {
        b.key("overflowed", shard, source);
        b.no_series_columns();
        // int_total 1: to the global overflow series (past limits.max_series).
        b.counter(global.then_some(1), None);
        // Where its points go: the row is routed by it when the shard count changed.
        b.series_key(Some(series));
        b.no_stream_state();
    }
    let pods = b.finish()?;
    Ok([series, streams, pods])
}
