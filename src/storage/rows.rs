//! Checkpoint rows back into a shard: typed access to the columns of a batch read from Parquet
//! (`Columns`) and the restore of each kind of row. Everything here is input from a file, so
//! every access is checked and a bad row is an error, never a panic.

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float64Type, Int32Type, TimestampNanosecondType, UInt16Type, UInt32Type, UInt64Type,
};
use arrow_array::{Array, RecordBatch};

use crate::aggregate::key::{FamilyDesc, Kind};
use crate::aggregate::series::{CounterValue, CumulativeState, CumulativeValue};
use crate::aggregate::shard::{ShardState, StreamState, ValueRecord};
use crate::aggregate::window::Window;
use crate::columnar::FIXED_LABELS;

/// Why a batch could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("column `{0}` is missing or has the wrong type")]
    Column(&'static str),
    #[error("row {row}: {what}")]
    Row { row: usize, what: String },
}

fn row_err(row: usize, what: impl std::fmt::Display) -> ReadError {
    ReadError::Row {
        row,
        what: what.to_string(),
    }
}

/// Typed access to the columns of one checkpoint batch.
pub struct Columns<'a> {
    b: &'a RecordBatch,
}

/// A string from a dictionary column.
fn dict_str<'a>(
    b: &'a RecordBatch,
    name: &'static str,
    i: usize,
) -> Result<Option<&'a str>, ReadError> {
    let col = b.column_by_name(name).ok_or(ReadError::Column(name))?;
    let d = col
        .as_dictionary_opt::<Int32Type>()
        .ok_or(ReadError::Column(name))?;
    if d.is_null(i) {
        return Ok(None);
    }
    let values = d
        .values()
        .as_string_opt::<i32>()
        .ok_or(ReadError::Column(name))?;
    let k = usize::try_from(d.keys().value(i)).map_err(|_| ReadError::Column(name))?;
    if k >= values.len() {
        return Err(ReadError::Column(name));
    }
    Ok(Some(values.value(k)))
}

fn prim<'a, T: arrow_array::types::ArrowPrimitiveType>(
    b: &'a RecordBatch,
    name: &'static str,
) -> Result<&'a arrow_array::PrimitiveArray<T>, ReadError> {
    b.column_by_name(name)
        .and_then(|c| c.as_primitive_opt::<T>())
        .ok_or(ReadError::Column(name))
}

fn opt<T: arrow_array::types::ArrowPrimitiveType>(
    a: &arrow_array::PrimitiveArray<T>,
    i: usize,
) -> Option<T::Native> {
    a.is_valid(i).then(|| a.value(i))
}

fn list_values<T: arrow_array::types::ArrowPrimitiveType>(
    b: &RecordBatch,
    name: &'static str,
    i: usize,
) -> Result<Option<Vec<T::Native>>, ReadError> {
    let l = b
        .column_by_name(name)
        .and_then(|c| c.as_list_opt::<i32>())
        .ok_or(ReadError::Column(name))?;
    if l.is_null(i) {
        return Ok(None);
    }
    let v = l.value(i);
    let p = v.as_primitive_opt::<T>().ok_or(ReadError::Column(name))?;
    if p.null_count() > 0 {
        return Err(row_err(i, format!("null inside `{name}`")));
    }
    Ok(Some(p.values().to_vec()))
}

impl<'a> Columns<'a> {
    pub fn new(b: &'a RecordBatch) -> Self {
        Self { b }
    }

    pub fn rows(&self) -> usize {
        self.b.num_rows()
    }

    pub fn record(&self, i: usize) -> Result<&'a str, ReadError> {
        dict_str(self.b, "record", i)?.ok_or_else(|| row_err(i, "record is null"))
    }

    pub fn shard(&self, i: usize) -> Result<u32, ReadError> {
        Ok(prim::<UInt32Type>(self.b, "shard")?.value(i))
    }

    fn key(&self, lo: &'static str, hi: &'static str, i: usize) -> Result<Option<u128>, ReadError> {
        let lo = opt(prim::<UInt64Type>(self.b, lo)?, i);
        let hi = opt(prim::<UInt32Type>(self.b, hi)?, i);
        Ok(lo
            .zip(hi)
            .map(|(lo, hi)| u128::from(lo) | (u128::from(hi) << 96)))
    }

    pub fn row_key(&self, i: usize) -> Result<u128, ReadError> {
        self.key("key_lo", "key_hi", i)?
            .ok_or_else(|| row_err(i, "key is null"))
    }

    pub fn series_key(&self, i: usize) -> Result<Option<u128>, ReadError> {
        self.key("series_key_lo", "series_key_hi", i)
    }

    pub fn family(&self, i: usize) -> Result<FamilyDesc, ReadError> {
        let get = |name| {
            dict_str(self.b, name, i)?.ok_or_else(|| row_err(i, format!("`{name}` is null")))
        };
        let kind = match get("kind")? {
            "counter" => Kind::Counter,
            "histogram" => Kind::Histogram,
            other => return Err(row_err(i, format!("unknown kind `{other}`"))),
        };
        Ok(FamilyDesc {
            name: get("metric")?.into(),
            kind,
            otel_name: get("otel_metric")?.into(),
            unit: get("unit")?.into(),
            help: get("help")?.into(),
        })
    }

    pub fn labels(&self, i: usize) -> Result<Vec<(String, String)>, ReadError> {
        let mut out = Vec::new();
        for name in FIXED_LABELS {
            if let Some(v) = dict_str(self.b, name, i)? {
                out.push((name.to_owned(), v.to_owned()));
            }
        }
        let map = self
            .b
            .column_by_name("labels")
            .and_then(|c| c.as_map_opt())
            .ok_or(ReadError::Column("labels"))?;
        if map.is_valid(i) {
            let entries = map.value(i);
            let keys = entries
                .column(0)
                .as_string_opt::<i32>()
                .ok_or(ReadError::Column("labels"))?;
            let values = entries
                .column(1)
                .as_string_opt::<i32>()
                .ok_or(ReadError::Column("labels"))?;
            for j in 0..entries.len() {
                out.push((keys.value(j).to_owned(), values.value(j).to_owned()));
            }
        }
        Ok(out)
    }

    pub fn times(
        &self,
        start: &'static str,
        end: &'static str,
        i: usize,
    ) -> Result<(u64, u64), ReadError> {
        let get = |name| -> Result<u64, ReadError> {
            let v = opt(prim::<TimestampNanosecondType>(self.b, name)?, i)
                .ok_or_else(|| row_err(i, format!("`{name}` is null")))?;
            u64::try_from(v).map_err(|_| row_err(i, format!("`{name}` is negative")))
        };
        Ok((get(start)?, get(end)?))
    }

    /// The value columns: `Counter` for int/float totals, else a histogram
    /// (bounds, counts, sum, count).
    pub fn value(&self, i: usize) -> Result<Value, ReadError> {
        let int = opt(prim::<UInt64Type>(self.b, "int_total")?, i);
        let float = opt(prim::<Float64Type>(self.b, "float_total")?, i);
        if int.is_some() || float.is_some() {
            return Ok(Value::Counter(int, float));
        }
        let bounds = list_values::<Float64Type>(self.b, "bucket_bounds", i)?;
        let counts = list_values::<UInt64Type>(self.b, "bucket_counts", i)?;
        let sum = opt(prim::<Float64Type>(self.b, "sum")?, i);
        let count = opt(prim::<UInt64Type>(self.b, "count")?, i);
        match (bounds, counts, sum, count) {
            (Some(bounds), Some(counts), Some(sum), Some(count)) => Ok(Value::Histogram {
                bounds,
                counts,
                sum,
                count,
            }),
            _ => Ok(Value::None),
        }
    }

    pub fn temporality(&self, i: usize) -> Result<Option<&'a str>, ReadError> {
        dict_str(self.b, "temporality", i)
    }

    pub fn applied(&self, i: usize) -> Result<Option<Window>, ReadError> {
        let l = self
            .b
            .column_by_name("applied")
            .and_then(|c| c.as_list_opt::<i32>())
            .ok_or(ReadError::Column("applied"))?;
        if l.is_null(i) {
            return Ok(None);
        }
        let v = l.value(i);
        let s = v.as_struct_opt().ok_or(ReadError::Column("applied"))?;
        let starts = s
            .column(0)
            .as_primitive_opt::<UInt64Type>()
            .ok_or(ReadError::Column("applied"))?;
        let ends = s
            .column(1)
            .as_primitive_opt::<UInt64Type>()
            .ok_or(ReadError::Column("applied"))?;
        let ranges: Vec<(u64, u64)> = starts
            .values()
            .iter()
            .copied()
            .zip(ends.values().iter().copied())
            .collect();
        Window::from_ranges(&ranges)
            .map(Some)
            .ok_or_else(|| row_err(i, "applied ranges are empty or not disjoint and sorted"))
    }
}

/// The value columns of one row.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Counter(Option<u64>, Option<f64>),
    Histogram {
        bounds: Vec<f64>,
        counts: Vec<u64>,
        sum: f64,
        count: u64,
    },
    None,
}

/// Restores one series row into `state`; returns a hash of what identifies it (family kind and
/// name, labels), so the caller can refuse a file holding the same series twice.
pub fn restore_series_row(
    state: &mut ShardState,
    c: &Columns<'_>,
    i: usize,
) -> Result<u128, ReadError> {
    let key = c.row_key(i)?;
    let family = c.family(i)?;
    let mut labels = c.labels(i)?;
    let (created, updated) = c.times("created", "updated", i)?;
    let value = c.value(i)?;
    let record = match (&value, family.kind) {
        (Value::Counter(int, float), Kind::Counter) => ValueRecord::Counter(CounterValue {
            int: int.unwrap_or(0),
            float: float.unwrap_or(0.0),
        }),
        (
            Value::Histogram {
                bounds,
                counts,
                sum,
                ..
            },
            Kind::Histogram,
        ) => ValueRecord::Histogram {
            bounds,
            counts,
            sum: *sum,
            input_buckets: opt(prim::<UInt16Type>(c.b, "input_buckets")?, i).unwrap_or(0),
        },
        _ => return Err(row_err(i, "value columns do not match the kind")),
    };
    state
        .restore_series(key, &family, &mut labels, record, created, updated)
        .map_err(|e| row_err(i, e))?;
    // Sorted by the restore; names hold no 0xff byte (UTF-8), so the encoding is unambiguous.
    // The kind counts: a counter and a histogram may share a name and labels (the scrape
    // serves the first and counts the other as a family conflict).
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&[family.kind as u8]);
    h.update(family.name.as_bytes());
    for (k, v) in &labels {
        h.update(&[0xff]);
        h.update(k.as_bytes());
        h.update(&[0xff]);
        h.update(v.as_bytes());
    }
    Ok(h.digest128())
}

/// Restores one pod row into `state`.
pub fn restore_pod_row(state: &mut ShardState, c: &Columns<'_>, i: usize) -> Result<(), ReadError> {
    let key = c.row_key(i)?;
    let service = dict_str(c.b, "service_name", i)?.unwrap_or("");
    state.restore_pod(key as u64, service);
    Ok(())
}

/// Restores one stream row into `state` (after its series).
pub fn restore_stream_row(
    state: &mut ShardState,
    c: &Columns<'_>,
    i: usize,
) -> Result<(), ReadError> {
    let key = c.row_key(i)?;
    let series_key = c.series_key(i)?;
    let stream = match c.temporality(i)? {
        Some("delta") => StreamState::Delta(
            c.applied(i)?
                .ok_or_else(|| row_err(i, "delta stream without applied ranges"))?,
        ),
        Some(t @ ("cumulative" | "cumulative_baseline")) => {
            let (start_ns, end_ns) = c.times("last_start", "last_end", i)?;
            let value = match c.value(i)? {
                Value::Counter(Some(v), None) => CumulativeValue::Int(v),
                Value::Counter(None, Some(v)) => CumulativeValue::Float(v),
                Value::Histogram {
                    bounds,
                    counts,
                    sum,
                    count,
                } => CumulativeValue::Histogram {
                    bounds: state.shared_bounds(&bounds),
                    counts: counts.into(),
                    sum,
                    count,
                },
                _ => return Err(row_err(i, "cumulative stream without a value")),
            };
            StreamState::Cumulative {
                last: CumulativeState {
                    start_ns,
                    end_ns,
                    value,
                },
                feeds: t == "cumulative",
            }
        }
        other => return Err(row_err(i, format!("unknown temporality {other:?}"))),
    };
    state
        .restore_stream(key, series_key, stream)
        .map_err(|e| row_err(i, e))
}
