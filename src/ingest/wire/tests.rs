//! Tests of the wire walk: pricing, regular form, UTF-8 repair.

use super::*;
use crate::workload::{request, Shape};
use opentelemetry_proto::tonic::metrics::v1::NumberDataPoint;
use prost::Message;
use std::mem::size_of;

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
    let c = cost(&body).unwrap();
    assert!(c.bad_utf8 && !c.regular, "{c:?}");
    let (fixed, n) = regularize(&body, &c).unwrap();
    assert_eq!(n, 1);
    let again = cost(&fixed).unwrap();
    assert_eq!(again.points, 6, "every point is still there");
    assert!(again.regular && !again.bad_utf8, "{again:?}");
    let decoded = ExportMetricsServiceRequest::decode(&fixed[..]).unwrap();
    let Some(opentelemetry_proto::tonic::metrics::v1::metric::Data::Histogram(h)) =
        &decoded.resource_metrics[0].scope_metrics[0].metrics[0].data
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
        h.data_points[1].attributes[1].value =
            h.data_points[1].attributes[1].value.clone().map(|_| {
                opentelemetry_proto::tonic::common::v1::AnyValue {
                    value: Some(v.clone()),
                }
            });
    }
    assert_eq!(decoded, want);
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
