//! OTLP/JSON → the protobuf types, by the proto3 JSON mapping as the OTLP spec applies it:
//! lowerCamelCase names (the proto names are accepted too), 64-bit integers as strings or
//! numbers, doubles as numbers or strings (`"3.5"`, `"NaN"`, `"Infinity"`, `"-Infinity"`), enums
//! by name or number, `null` as the default, unknown fields ignored.
//!
//! Why not the derived serde of `opentelemetry-proto`: it refuses string doubles and non-finite
//! values, and a refusal inside a flattened `oneof` drops the whole metric silently. Here a
//! non-finite value decodes as such and validation rejects that one point (`non_finite`); a
//! value of the wrong JSON type is a 400 that names its path. Nesting is bounded by
//! `serde_json`'s recursion limit, which also bounds the recursion over `AnyValue`.

use base64::Engine as _;
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{
    any_value, AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList,
};
use opentelemetry_proto::tonic::metrics::v1::{
    metric::Data, number_data_point, ExponentialHistogram, ExponentialHistogramDataPoint, Gauge,
    Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
    Summary, SummaryDataPoint,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use serde_json::{Map, Value};

type Obj = Map<String, Value>;
type Res<T> = Result<T, String>;

/// Decodes an OTLP/JSON `ExportMetricsServiceRequest`. The error names the path of the value
/// that could not be read.
pub fn decode(body: &[u8]) -> Res<ExportMetricsServiceRequest> {
    let v: Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let o = obj(&v).map_err(|e| format!("request: {e}"))?;
    Ok(ExportMetricsServiceRequest {
        resource_metrics: list(o, "resourceMetrics", "resource_metrics", resource_metrics)?,
    })
}

/// The response as OTLP/JSON: `rejectedDataPoints` is an int64, so a string.
pub fn encode_response(resp: &ExportMetricsServiceResponse) -> Vec<u8> {
    let body = match &resp.partial_success {
        Some(p) => serde_json::json!({
            "partialSuccess": {
                "rejectedDataPoints": p.rejected_data_points.to_string(),
                "errorMessage": p.error_message,
            }
        }),
        None => serde_json::json!({}),
    };
    body.to_string().into_bytes()
}

/// Standard or URL-safe base64, padded or not: proto3 JSON accepts each.
fn base64_any(s: &str) -> Option<Vec<u8>> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    let cfg = GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    [
        GeneralPurpose::new(&base64::alphabet::STANDARD, cfg),
        GeneralPurpose::new(&base64::alphabet::URL_SAFE, cfg),
    ]
    .iter()
    .find_map(|e| e.decode(s).ok())
}

/// A client's text quoted in an error, cut short: a 400 is never as large as the request.
fn quote(s: &str) -> String {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    if end < s.len() {
        format!("{:?}…", &s[..end])
    } else {
        format!("{s:?}")
    }
}

fn obj(v: &Value) -> Res<&Obj> {
    v.as_object()
        .ok_or_else(|| format!("expected an object, got {}", kind(v)))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A field by its JSON name or its proto name; `null` counts as absent.
fn field<'a>(o: &'a Obj, camel: &str, snake: &str) -> Option<&'a Value> {
    o.get(camel)
        .or_else(|| o.get(snake))
        .filter(|v| !v.is_null())
}

/// Reads a field with `f`, naming the field in an error.
fn get<'a, T: Default>(
    o: &'a Obj,
    camel: &str,
    snake: &str,
    f: impl FnOnce(&'a Value) -> Res<T>,
) -> Res<T> {
    match field(o, camel, snake) {
        Some(v) => f(v).map_err(|e| format!("{camel}: {e}")),
        None => Ok(T::default()),
    }
}

/// A repeated message field, each element read by `f`.
fn list<T>(o: &Obj, camel: &str, snake: &str, f: impl Fn(&Obj) -> Res<T>) -> Res<Vec<T>> {
    let Some(v) = field(o, camel, snake) else {
        return Ok(Vec::new());
    };
    let a = v
        .as_array()
        .ok_or_else(|| format!("{camel}: expected an array, got {}", kind(v)))?;
    a.iter()
        .enumerate()
        .map(|(i, e)| {
            obj(e)
                .and_then(&f)
                .map_err(|err| format!("{camel}[{i}].{err}"))
        })
        .collect()
}

fn string(v: &Value) -> Res<String> {
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("expected a string, got {}", kind(v)))
}

fn boolean(v: &Value) -> Res<bool> {
    v.as_bool()
        .ok_or_else(|| format!("expected a boolean, got {}", kind(v)))
}

fn u64_of(v: &Value) -> Res<u64> {
    match v {
        Value::String(s) => s
            .trim()
            .parse()
            .map_err(|_| format!("{} is not a uint64", quote(s))),
        Value::Number(n) => n
            .as_u64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| is_integral(*f, 0.0))
                    .map(|f| f as u64)
            })
            .ok_or_else(|| format!("{n} is not a uint64")),
        other => Err(format!("expected a uint64, got {}", kind(other))),
    }
}

fn i64_of(v: &Value) -> Res<i64> {
    match v {
        Value::String(s) => s
            .trim()
            .parse()
            .map_err(|_| format!("{} is not an int64", quote(s))),
        Value::Number(n) => n
            .as_i64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| is_integral(*f, -TWO_POW_63))
                    .map(|f| f as i64)
            })
            .ok_or_else(|| format!("{n} is not an int64")),
        other => Err(format!("expected an int64, got {}", kind(other))),
    }
}

/// 2^63, exactly.
const TWO_POW_63: f64 = (1u64 << 63) as f64;

/// A float that holds an integer in `[min, 2^63)` (what an int64/uint64 field may take as a
/// JSON number with a fraction of zero).
fn is_integral(f: f64, min: f64) -> bool {
    f.fract() == 0.0 && f >= min && f < TWO_POW_63
}

fn u32_of(v: &Value) -> Res<u32> {
    u32::try_from(u64_of(v)?).map_err(|_| format!("{v} is not a uint32"))
}

/// A double: a number, or a string holding one (`"NaN"`, `"Infinity"` and `"-Infinity"`
/// included). Non-finite values decode as they are: validation rejects their point.
fn f64_of(v: &Value) -> Res<f64> {
    match v {
        Value::Number(n) => n.as_f64().ok_or_else(|| format!("{n} is not a double")),
        Value::String(s) => match s.trim() {
            "NaN" => Ok(f64::NAN),
            "Infinity" => Ok(f64::INFINITY),
            "-Infinity" => Ok(f64::NEG_INFINITY),
            t => t
                .parse::<f64>()
                .ok()
                // Rust also parses "inf" and "nan"; JSON does not know them.
                .filter(|f| f.is_finite())
                .ok_or_else(|| format!("{} is not a double", quote(s))),
        },
        other => Err(format!("expected a double, got {}", kind(other))),
    }
}

fn array_of<T>(v: &Value, f: impl Fn(&Value) -> Res<T>) -> Res<Vec<T>> {
    let a = v
        .as_array()
        .ok_or_else(|| format!("expected an array, got {}", kind(v)))?;
    a.iter()
        .enumerate()
        .map(|(i, e)| f(e).map_err(|err| format!("[{i}]: {err}")))
        .collect()
}

/// An enum by number or by name; `names[i]` is the name of value `i`.
fn enum_of(v: &Value, names: &[&str]) -> Res<i32> {
    match v {
        Value::String(s) => names
            .iter()
            .position(|n| n == s)
            .map(|i| i as i32)
            .ok_or_else(|| format!("unknown enum value {}", quote(s))),
        _ => i32::try_from(i64_of(v)?).map_err(|_| format!("{v} is not an enum value")),
    }
}

const TEMPORALITY: [&str; 3] = [
    "AGGREGATION_TEMPORALITY_UNSPECIFIED",
    "AGGREGATION_TEMPORALITY_DELTA",
    "AGGREGATION_TEMPORALITY_CUMULATIVE",
];

fn resource_metrics(o: &Obj) -> Res<ResourceMetrics> {
    Ok(ResourceMetrics {
        resource: get(o, "resource", "resource", |v| {
            let r = obj(v)?;
            Ok(Some(Resource {
                attributes: attributes(r)?,
                dropped_attributes_count: get(
                    r,
                    "droppedAttributesCount",
                    "dropped_attributes_count",
                    u32_of,
                )?,
                ..Default::default()
            }))
        })?,
        scope_metrics: list(o, "scopeMetrics", "scope_metrics", scope_metrics)?,
        schema_url: get(o, "schemaUrl", "schema_url", string)?,
    })
}

fn scope_metrics(o: &Obj) -> Res<ScopeMetrics> {
    Ok(ScopeMetrics {
        scope: get(o, "scope", "scope", |v| {
            let s = obj(v)?;
            Ok(Some(InstrumentationScope {
                name: get(s, "name", "name", string)?,
                version: get(s, "version", "version", string)?,
                attributes: attributes(s)?,
                dropped_attributes_count: get(
                    s,
                    "droppedAttributesCount",
                    "dropped_attributes_count",
                    u32_of,
                )?,
            }))
        })?,
        metrics: list(o, "metrics", "metrics", metric)?,
        schema_url: get(o, "schemaUrl", "schema_url", string)?,
    })
}

fn metric(o: &Obj) -> Res<Metric> {
    let temporality = |d: &Obj| {
        get(
            d,
            "aggregationTemporality",
            "aggregation_temporality",
            |v| enum_of(v, &TEMPORALITY),
        )
    };
    let data = if let Some(v) = field(o, "sum", "sum") {
        let d = obj(v).map_err(|e| format!("sum: {e}"))?;
        Some(Data::Sum(Sum {
            data_points: list(d, "dataPoints", "data_points", number_point)
                .map_err(|e| format!("sum.{e}"))?,
            aggregation_temporality: temporality(d).map_err(|e| format!("sum.{e}"))?,
            is_monotonic: get(d, "isMonotonic", "is_monotonic", boolean)
                .map_err(|e| format!("sum.{e}"))?,
        }))
    } else if let Some(v) = field(o, "histogram", "histogram") {
        let d = obj(v).map_err(|e| format!("histogram: {e}"))?;
        Some(Data::Histogram(Histogram {
            data_points: list(d, "dataPoints", "data_points", histogram_point)
                .map_err(|e| format!("histogram.{e}"))?,
            aggregation_temporality: temporality(d).map_err(|e| format!("histogram.{e}"))?,
        }))
    } else if let Some(v) = field(o, "gauge", "gauge") {
        Some(Data::Gauge(Gauge {
            data_points: vec![NumberDataPoint::default(); points(v)],
        }))
    } else if let Some(v) = field(o, "exponentialHistogram", "exponential_histogram") {
        Some(Data::ExponentialHistogram(ExponentialHistogram {
            data_points: vec![ExponentialHistogramDataPoint::default(); points(v)],
            aggregation_temporality: 0,
        }))
    } else {
        field(o, "summary", "summary").map(|v| {
            Data::Summary(Summary {
                data_points: vec![SummaryDataPoint::default(); points(v)],
            })
        })
    };
    Ok(Metric {
        name: get(o, "name", "name", string)?,
        description: get(o, "description", "description", string)?,
        unit: get(o, "unit", "unit", string)?,
        metadata: Vec::new(),
        data,
    })
}

/// How many data points a metric of a kind spanagg refuses holds: only the count is kept, to
/// reject each point with its reason.
fn points(v: &Value) -> usize {
    v.get("dataPoints")
        .or_else(|| v.get("data_points"))
        .and_then(Value::as_array)
        .map_or(0, Vec::len)
}

fn number_point(o: &Obj) -> Res<NumberDataPoint> {
    let value = if let Some(v) = field(o, "asDouble", "as_double") {
        Some(number_data_point::Value::AsDouble(
            f64_of(v).map_err(|e| format!("asDouble: {e}"))?,
        ))
    } else if let Some(v) = field(o, "asInt", "as_int") {
        Some(number_data_point::Value::AsInt(
            i64_of(v).map_err(|e| format!("asInt: {e}"))?,
        ))
    } else {
        None
    };
    Ok(NumberDataPoint {
        attributes: attributes(o)?,
        start_time_unix_nano: get(o, "startTimeUnixNano", "start_time_unix_nano", u64_of)?,
        time_unix_nano: get(o, "timeUnixNano", "time_unix_nano", u64_of)?,
        exemplars: Vec::new(),
        flags: get(o, "flags", "flags", u32_of)?,
        value,
    })
}

fn histogram_point(o: &Obj) -> Res<HistogramDataPoint> {
    let opt_f64 = |camel: &str| get(o, camel, camel, |v| f64_of(v).map(Some));
    Ok(HistogramDataPoint {
        attributes: attributes(o)?,
        start_time_unix_nano: get(o, "startTimeUnixNano", "start_time_unix_nano", u64_of)?,
        time_unix_nano: get(o, "timeUnixNano", "time_unix_nano", u64_of)?,
        count: get(o, "count", "count", u64_of)?,
        sum: opt_f64("sum")?,
        bucket_counts: get(o, "bucketCounts", "bucket_counts", |v| array_of(v, u64_of))?,
        explicit_bounds: get(o, "explicitBounds", "explicit_bounds", |v| {
            array_of(v, f64_of)
        })?,
        exemplars: Vec::new(),
        flags: get(o, "flags", "flags", u32_of)?,
        min: opt_f64("min")?,
        max: opt_f64("max")?,
    })
}

fn attributes(o: &Obj) -> Res<Vec<KeyValue>> {
    list(o, "attributes", "attributes", key_value)
}

fn key_value(o: &Obj) -> Res<KeyValue> {
    Ok(KeyValue {
        key: get(o, "key", "key", string)?,
        value: get(o, "value", "value", |v| any_value(v).map(Some))?,
        ..Default::default()
    })
}

fn any_value(v: &Value) -> Res<AnyValue> {
    use any_value::Value as V;
    let o = obj(v)?;
    let value = if let Some(v) = field(o, "stringValue", "string_value") {
        V::StringValue(string(v)?)
    } else if let Some(v) = field(o, "boolValue", "bool_value") {
        V::BoolValue(boolean(v)?)
    } else if let Some(v) = field(o, "intValue", "int_value") {
        V::IntValue(i64_of(v)?)
    } else if let Some(v) = field(o, "doubleValue", "double_value") {
        V::DoubleValue(f64_of(v)?)
    } else if let Some(v) = field(o, "bytesValue", "bytes_value") {
        let s = v.as_str().ok_or("bytesValue: expected base64 text")?;
        V::BytesValue(base64_any(s).ok_or("bytesValue: not base64")?)
    } else if let Some(v) = field(o, "arrayValue", "array_value") {
        let values = get(obj(v)?, "values", "values", |a| array_of(a, any_value))?;
        V::ArrayValue(ArrayValue { values })
    } else if let Some(v) = field(o, "kvlistValue", "kvlist_value") {
        V::KvlistValue(KeyValueList {
            values: list(obj(v)?, "values", "values", key_value)?,
        })
    } else {
        return Ok(AnyValue { value: None });
    };
    Ok(AnyValue { value: Some(value) })
}

#[cfg(test)]
#[path = "json_tests.rs"]
mod tests;
