//! What decoding a protobuf request will cost, read from its wire format without decoding it.
//!
//! A protobuf message can be two bytes on the wire (a tag and a zero length) and a hundred
//! bytes or more once decoded: 7.6 MiB of empty data points decode to ~700 MiB. This walks the
//! request along the OTLP metrics schema, counts every message it holds, and prices each at the
//! size of the struct prost will build for it (twice, for `Vec` growth), plus the body itself
//! for strings and packed numbers. The walk allocates nothing and touches each byte once; a
//! malformed body is an error here, before anything is allocated for it.
//!
//! The same schema walk repairs invalid UTF-8 ([`repair_utf8`]): prost refuses a whole request
//! for one bad string, so a body that fails for that reason is re-encoded with each invalid
//! string field replaced lossily (U+FFFD) and decoded again. The repaired body is what is
//! applied and logged.

use std::mem::size_of;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, EntityRef, InstrumentationScope, KeyValue, KeyValueList,
};
use opentelemetry_proto::tonic::metrics::v1::{
    exponential_histogram_data_point::Buckets, summary_data_point::ValueAtQuantile, Exemplar,
    ExponentialHistogram, ExponentialHistogramDataPoint, Gauge, Histogram, HistogramDataPoint,
    Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, Summary, SummaryDataPoint,
};
use opentelemetry_proto::tonic::resource::v1::Resource;

/// Deeper nesting is refused (prost refuses past 100; `AnyValue` can nest).
const MAX_DEPTH: usize = 64;

/// The messages of the OTLP metrics schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum M {
    Request,
    ResourceMetrics,
    Resource,
    EntityRef,
    ScopeMetrics,
    Scope,
    Metric,
    Gauge,
    Sum,
    Histogram,
    ExpHistogram,
    Summary,
    NumberPoint,
    HistogramPoint,
    ExpHistogramPoint,
    SummaryPoint,
    Buckets,
    Quantile,
    Exemplar,
    KeyValue,
    AnyValue,
    ArrayValue,
    KvList,
}

impl M {
    /// The message a length-delimited field of `self` holds, if it is one.
    fn child(self, field: u64) -> Option<M> {
        use M::*;
        Some(match (self, field) {
            (Request, 1) => ResourceMetrics,
            (ResourceMetrics, 1) => Resource,
            (ResourceMetrics, 2) => ScopeMetrics,
            (Resource, 1) => KeyValue,
            (Resource, 3) => EntityRef,
            (ScopeMetrics, 1) => Scope,
            (ScopeMetrics, 2) => Metric,
            (Scope, 3) => KeyValue,
            (Metric, 5) => Gauge,
            (Metric, 7) => Sum,
            (Metric, 9) => Histogram,
            (Metric, 10) => ExpHistogram,
            (Metric, 11) => Summary,
            (Metric, 12) => KeyValue,
            (Gauge | Sum, 1) => NumberPoint,
            (Histogram, 1) => HistogramPoint,
            (ExpHistogram, 1) => ExpHistogramPoint,
            (Summary, 1) => SummaryPoint,
            (NumberPoint, 7) | (HistogramPoint, 9) | (ExpHistogramPoint, 1) => KeyValue,
            (SummaryPoint, 7) | (Exemplar, 7) | (KvList, 1) => KeyValue,
            (NumberPoint, 5) | (HistogramPoint, 8) | (ExpHistogramPoint, 11) => Exemplar,
            (ExpHistogramPoint, 8 | 9) => Buckets,
            (SummaryPoint, 6) => Quantile,
            (KeyValue, 2) | (ArrayValue, 1) => AnyValue,
            (AnyValue, 5) => ArrayValue,
            (AnyValue, 6) => KvList,
            _ => return None,
        })
    }

    /// Bytes of the struct prost builds for one such message.
    fn size(self) -> usize {
        match self {
            M::Request => size_of::<ExportMetricsServiceRequest>(),
            M::ResourceMetrics => size_of::<ResourceMetrics>(),
            M::Resource => size_of::<Resource>(),
            M::EntityRef => size_of::<EntityRef>(),
            M::ScopeMetrics => size_of::<ScopeMetrics>(),
            M::Scope => size_of::<InstrumentationScope>(),
            M::Metric => size_of::<Metric>(),
            M::Gauge => size_of::<Gauge>(),
            M::Sum => size_of::<Sum>(),
            M::Histogram => size_of::<Histogram>(),
            M::ExpHistogram => size_of::<ExponentialHistogram>(),
            M::Summary => size_of::<Summary>(),
            M::NumberPoint => size_of::<NumberDataPoint>(),
            M::HistogramPoint => size_of::<HistogramDataPoint>(),
            M::ExpHistogramPoint => size_of::<ExponentialHistogramDataPoint>(),
            M::SummaryPoint => size_of::<SummaryDataPoint>(),
            M::Buckets => size_of::<Buckets>(),
            M::Quantile => size_of::<ValueAtQuantile>(),
            M::Exemplar => size_of::<Exemplar>(),
            M::KeyValue => size_of::<KeyValue>(),
            M::AnyValue => size_of::<AnyValue>(),
            M::ArrayValue => size_of::<ArrayValue>(),
            M::KvList => size_of::<KeyValueList>(),
        }
    }

    /// Whether a length-delimited field of `self` is a `string` (as opposed to bytes, packed
    /// numbers or a message).
    fn is_string(self, field: u64) -> bool {
        matches!(
            (self, field),
            (M::ResourceMetrics | M::ScopeMetrics, 3)
                | (M::Scope, 1 | 2)
                | (M::Metric, 1..=3)
                | (M::KeyValue | M::AnyValue, 1)
                | (M::EntityRef, 1..=4)
        )
    }

    fn is_point(self) -> bool {
        matches!(
            self,
            M::NumberPoint | M::HistogramPoint | M::ExpHistogramPoint | M::SummaryPoint
        )
    }
}

/// What a request will cost to decode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cost {
    /// Data points of every kind.
    pub points: u64,
    /// Estimated bytes of the decoded request, the body included.
    pub bytes: u64,
}

/// Why the body cannot be priced: it is not a well-formed protobuf message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed protobuf: {0}")]
pub struct Malformed(&'static str);

/// Prices an `ExportMetricsServiceRequest` body.
pub fn cost(body: &[u8]) -> Result<Cost, Malformed> {
    let mut c = Cost {
        points: 0,
        bytes: (body.len() + M::Request.size()) as u64,
    };
    walk(body, M::Request, 0, &mut c)?;
    Ok(c)
}

fn varint(buf: &mut &[u8]) -> Result<u64, Malformed> {
    prost::encoding::decode_varint(buf).map_err(|_| Malformed("invalid varint"))
}

fn skip(buf: &mut &[u8], n: u64) -> Result<(), Malformed> {
    let n = usize::try_from(n).map_err(|_| Malformed("length out of range"))?;
    if n > buf.len() {
        return Err(Malformed("truncated field"));
    }
    *buf = &buf[n..];
    Ok(())
}

fn walk(mut buf: &[u8], m: M, depth: usize, c: &mut Cost) -> Result<(), Malformed> {
    if depth > MAX_DEPTH {
        return Err(Malformed("nested too deep"));
    }
    while !buf.is_empty() {
        let tag = varint(&mut buf)?;
        let field = tag >> 3;
        if field == 0 {
            return Err(Malformed("field number 0"));
        }
        match tag & 7 {
            0 => {
                varint(&mut buf)?;
            }
            1 => skip(&mut buf, 8)?,
            5 => skip(&mut buf, 4)?,
            2 => {
                let len = varint(&mut buf)?;
                let start = buf;
                skip(&mut buf, len)?;
                let inner = &start[..start.len() - buf.len()];
                match m.child(field) {
                    Some(child) => {
                        c.points += u64::from(child.is_point());
                        // Twice: the `Vec` holding it may have doubled its capacity.
                        c.bytes += 2 * child.size() as u64;
                        walk(inner, child, depth + 1, c)?;
                    }
                    // A string, bytes or packed numbers: their bytes are counted with the body,
                    // plus a `String` header should it be one of many. Packed varints (the
                    // exponential buckets) widen to 8 bytes each.
                    None => {
                        let widen = if m == M::Buckets { 7 } else { 0 };
                        c.bytes += widen * inner.len() as u64 + size_of::<String>() as u64;
                    }
                }
            }
            _ => return Err(Malformed("group or unknown wire type")),
        }
    }
    Ok(())
}

/// A decoded request, and the repaired body if it had to be repaired.
pub struct Decoded {
    pub req: ExportMetricsServiceRequest,
    /// The body with invalid UTF-8 replaced, and how many strings were: log this, not the
    /// original (which would not decode again).
    pub repaired: Option<(Vec<u8>, u64)>,
}

/// Decodes an `ExportMetricsServiceRequest`; a body refused only for invalid UTF-8 in string
/// fields is repaired and decoded again.
pub fn decode(body: &[u8]) -> Result<Decoded, String> {
    use prost::Message;
    match ExportMetricsServiceRequest::decode(body) {
        Ok(req) => Ok(Decoded {
            req,
            repaired: None,
        }),
        Err(e) if e.to_string().contains("UTF-8") => {
            let (fixed, n) = repair_utf8(body).map_err(|m| m.to_string())?;
            let req = ExportMetricsServiceRequest::decode(&fixed[..]).map_err(|e| e.to_string())?;
            Ok(Decoded {
                req,
                repaired: Some((fixed, n)),
            })
        }
        Err(e) => Err(e.to_string()),
    }
}

/// `body` with every string field that is not UTF-8 replaced lossily, and how many were.
pub fn repair_utf8(body: &[u8]) -> Result<(Vec<u8>, u64), Malformed> {
    let mut out = Vec::with_capacity(body.len() + 64);
    let mut replaced = 0;
    rewrite(body, M::Request, 0, &mut out, &mut replaced)?;
    Ok((out, replaced))
}

fn rewrite(
    mut buf: &[u8],
    m: M,
    depth: usize,
    out: &mut Vec<u8>,
    replaced: &mut u64,
) -> Result<(), Malformed> {
    if depth > MAX_DEPTH {
        return Err(Malformed("nested too deep"));
    }
    while !buf.is_empty() {
        let field_start = buf;
        let tag = varint(&mut buf)?;
        let field = tag >> 3;
        if field == 0 {
            return Err(Malformed("field number 0"));
        }
        let copy_field = |buf: &[u8], out: &mut Vec<u8>| {
            out.extend_from_slice(&field_start[..field_start.len() - buf.len()]);
        };
        match tag & 7 {
            0 => {
                varint(&mut buf)?;
                copy_field(buf, out);
            }
            1 => {
                skip(&mut buf, 8)?;
                copy_field(buf, out);
            }
            5 => {
                skip(&mut buf, 4)?;
                copy_field(buf, out);
            }
            2 => {
                let len = varint(&mut buf)?;
                let start = buf;
                skip(&mut buf, len)?;
                let inner = &start[..start.len() - buf.len()];
                if let Some(child) = m.child(field) {
                    let mut sub = Vec::with_capacity(inner.len());
                    rewrite(inner, child, depth + 1, &mut sub, replaced)?;
                    prost::encoding::encode_varint(tag, out);
                    prost::encoding::encode_varint(sub.len() as u64, out);
                    out.extend_from_slice(&sub);
                } else if m.is_string(field) && std::str::from_utf8(inner).is_err() {
                    let fixed = String::from_utf8_lossy(inner);
                    *replaced += 1;
                    prost::encoding::encode_varint(tag, out);
                    prost::encoding::encode_varint(fixed.len() as u64, out);
                    out.extend_from_slice(fixed.as_bytes());
                } else {
                    copy_field(buf, out);
                }
            }
            _ => return Err(Malformed("group or unknown wire type")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{request, Shape};
    use prost::Message;

    #[test]
    fn counts_the_points_of_a_spanmetrics_request_and_prices_it_above_its_decoded_size() {
        let shape = Shape {
            services: 1,
            routes: 50,
            bounds: 16,
            counters: true,
        };
        let body = request(&shape, 3, 1, 2).encode_to_vec();
        let c = cost(&body).unwrap();
        assert_eq!(c.points, 100);
        // A normal request is priced at a small multiple of its size, not a worst case.
        assert!(
            c.bytes > body.len() as u64 && c.bytes < 20 * body.len() as u64,
            "{c:?}"
        );
    }

    #[test]
    fn empty_points_are_priced_at_what_they_decode_to() {
        // 1,000 empty number points: 2 bytes each on the wire.
        let mut sum = Vec::new();
        for _ in 0..1000 {
            sum.extend_from_slice(&[0x0a, 0x00]);
        }
        let metric = [&[0x3a][..], &encode_len(sum.len()), &sum].concat();
        let scope = [&[0x12][..], &encode_len(metric.len()), &metric].concat();
        let rm = [&[0x12][..], &encode_len(scope.len()), &scope].concat();
        let body = [&[0x0a][..], &encode_len(rm.len()), &rm].concat();
        let c = cost(&body).unwrap();
        assert_eq!(c.points, 1000);
        let decoded = ExportMetricsServiceRequest::decode(&body[..]).unwrap();
        let Some(opentelemetry_proto::tonic::metrics::v1::metric::Data::Sum(s)) =
            &decoded.resource_metrics[0].scope_metrics[0].metrics[0].data
        else {
            panic!("not a sum")
        };
        assert_eq!(s.data_points.len(), 1000);
        assert!(
            c.bytes >= 1000 * size_of::<NumberDataPoint>() as u64,
            "{c:?}"
        );
    }

    fn encode_len(n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        prost::encoding::encode_varint(n as u64, &mut out);
        out
    }

    #[test]
    fn invalid_utf8_is_replaced_string_by_string_and_nothing_else_changes() {
        let shape = Shape {
            services: 1,
            routes: 3,
            bounds: 4,
            counters: true,
        };
        let mut req = request(&shape, 3, 1, 2);
        // A marker value, patched into bytes that are not UTF-8 once encoded.
        if let Some(opentelemetry_proto::tonic::metrics::v1::metric::Data::Histogram(h)) =
            &mut req.resource_metrics[0].scope_metrics[0].metrics[0].data
        {
            h.data_points[1].attributes[1].value =
                Some(opentelemetry_proto::tonic::common::v1::AnyValue {
                    value: Some(
                        opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(
                            "MARKER".into(),
                        ),
                    ),
                });
        }
        let mut body = req.encode_to_vec();
        let at = body.windows(6).position(|w| w == b"MARKER").unwrap();
        body[at..at + 6].copy_from_slice(b"GET \xff\xfe");
        assert!(
            ExportMetricsServiceRequest::decode(&body[..]).is_err(),
            "prost refuses it"
        );
        let d = decode(&body).unwrap();
        let (fixed, n) = d.repaired.unwrap();
        assert_eq!(n, 1);
        assert_eq!(
            cost(&fixed).unwrap().points,
            6,
            "every point is still there"
        );
        let Some(opentelemetry_proto::tonic::metrics::v1::metric::Data::Histogram(h)) =
            &d.req.resource_metrics[0].scope_metrics[0].metrics[0].data
        else {
            panic!("not a histogram")
        };
        let v = h.data_points[1].attributes[1]
            .value
            .clone()
            .unwrap()
            .value
            .unwrap();
        assert_eq!(
            v,
            opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(
                "GET \u{FFFD}\u{FFFD}".into()
            )
        );
        // Everything else decodes to what was sent.
        let mut want = req.clone();
        if let Some(opentelemetry_proto::tonic::metrics::v1::metric::Data::Histogram(h)) =
            &mut want.resource_metrics[0].scope_metrics[0].metrics[0].data
        {
            h.data_points[1].attributes[1].value = h.data_points[1].attributes[1]
                .value
                .clone()
                .map(|_| opentelemetry_proto::tonic::common::v1::AnyValue {
                    value: Some(v.clone()),
                });
        }
        assert_eq!(d.req, want);
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        for body in [
            &b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"[..],
            b"\x0a\x05ab",
            b"\x0b",
            b"\x00",
            b"\xff",
        ] {
            assert!(cost(body).is_err(), "{body:?}");
        }
        // Nesting past the limit (AnyValue inside ArrayValue inside AnyValue ...).
        let mut v: Vec<u8> = Vec::new();
        for _ in 0..200 {
            let inner = [&[0x0a][..], &encode_len(v.len()), &v].concat(); // ArrayValue.values
            v = [&[0x2a][..], &encode_len(inner.len()), &inner].concat(); // AnyValue.array_value
        }
        let kv = [&[0x12][..], &encode_len(v.len()), &v].concat();
        let res = [&[0x0a][..], &encode_len(kv.len()), &kv].concat();
        let rm = [&[0x0a][..], &encode_len(res.len()), &res].concat();
        let body = [&[0x0a][..], &encode_len(rm.len()), &rm].concat();
        assert_eq!(cost(&body), Err(Malformed("nested too deep")));
    }
}
