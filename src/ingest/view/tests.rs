//! The views read what prost decodes, find their messages again by span, and never panic on
//! bytes that are not a regular body.

use super::*;
use crate::fuzzing::views::assert_same;
use crate::ingest::wire;
use crate::workload::{kv, request, Shape};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, ArrayValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;

fn spanmetrics() -> ExportMetricsServiceRequest {
    let shape = Shape {
        services: 2,
        routes: 5,
        bounds: 6,
        counters: true,
    };
    request(&shape, 3, 1_000, 2_000)
}

#[test]
fn a_spanmetrics_request_reads_as_prost_decodes_it() {
    let req = spanmetrics();
    let body = OtlpBody::encode(&req);
    assert!(wire::cost(body.bytes()).unwrap().regular);
    assert_same(&req, &body);
    let rm = body.view().resource_metrics().next().unwrap();
    let m: Vec<_> = rm.scope_metrics().flat_map(|s| s.metrics()).collect();
    assert_eq!(m.len(), 2, "a histogram and a counter");
    assert_eq!(crate::ingest::otlp::count_points(body.view()), 10);
    let Some(Data::Histogram { points, .. }) = m[0].data else {
        panic!("no histogram first")
    };
    assert_eq!(points.count(), 5);
    let p = HistogramPoint::read(points.messages().next().unwrap());
    assert_eq!(p.bucket_counts.len(), 7);
    assert_eq!(p.explicit_bounds.len(), 6);
    assert_eq!(p.attributes.len(), 5);
    assert_eq!(p.attributes.iter().next().unwrap().key, "service.name");
}

#[test]
fn every_kind_of_value_and_number_reads_as_prost_decodes_it() {
    let mut req = spanmetrics();
    let values = [
        any_value::Value::StringValue("s".into()),
        any_value::Value::BoolValue(true),
        any_value::Value::IntValue(-7),
        any_value::Value::DoubleValue(-0.0),
        any_value::Value::BytesValue(vec![0, 255]),
        any_value::Value::ArrayValue(ArrayValue {
            values: vec![AnyValue {
                value: Some(any_value::Value::IntValue(1)),
            }],
        }),
    ];
    let metrics = &mut req.resource_metrics[0].scope_metrics[0].metrics;
    for m in metrics.iter_mut() {
        if let Some(metric::Data::Sum(s)) = &mut m.data {
            s.data_points[0].value = Some(number_data_point::Value::AsDouble(f64::NAN));
            s.data_points[0].flags = 1;
            for (i, v) in values.iter().enumerate() {
                s.data_points[0].attributes.push(KeyValue {
                    key: format!("k{i}"),
                    value: Some(AnyValue {
                        value: Some(v.clone()),
                    }),
                    ..Default::default()
                });
            }
            s.data_points[0].attributes.push(KeyValue {
                key: "none".into(),
                value: None,
                ..Default::default()
            });
        }
    }
    assert_same(&req, &OtlpBody::encode(&req));
}

#[test]
fn spans_find_a_message_again_and_nothing_outside_the_body() {
    let body = OtlpBody::encode(&spanmetrics());
    let rm = body.view().resource_metrics().next().unwrap();
    let span = body.span_of(rm.resource);
    assert_eq!(body.at(span), Some(rm.resource));
    assert_eq!(body.span_of(&[]), Span::default());
    let outside = [1u8, 2, 3];
    assert_eq!(body.at(body.span_of(&outside)), None);
    assert_eq!(
        body.at(Span {
            at: u32::MAX,
            len: u32::MAX
        }),
        None
    );
}

#[test]
fn irregular_bodies_are_read_after_prost_brings_them_to_regular_form() {
    let req = spanmetrics();
    let regular = req.encode_to_vec();
    // A second `Resource` in the first `ResourceMetrics`: prost merges the two.
    let extra = Resource {
        attributes: vec![kv("k8s.cluster.name", "c1")],
        ..Default::default()
    };
    let mut rm = req.resource_metrics[0].encode_to_vec();
    rm.push(0x0a);
    prost::encoding::encode_varint(extra.encoded_len() as u64, &mut rm);
    extra.encode(&mut rm).unwrap();
    let mut body = vec![0x0a];
    prost::encoding::encode_varint(rm.len() as u64, &mut body);
    body.extend_from_slice(&rm);
    let cost = wire::cost(&body).unwrap();
    assert!(!cost.regular && !cost.bad_utf8, "{cost:?}");
    let (fixed, repaired) = wire::regularize(&body, &cost).unwrap();
    assert_eq!(repaired, 0);
    assert!(wire::cost(&fixed).unwrap().regular);
    let merged = ExportMetricsServiceRequest::decode(&body[..]).unwrap();
    assert_eq!(
        merged.resource_metrics[0]
            .resource
            .as_ref()
            .unwrap()
            .attributes
            .len(),
        req.resource_metrics[0]
            .resource
            .as_ref()
            .unwrap()
            .attributes
            .len()
            + 1
    );
    let fixed = OtlpBody::regular(fixed);
    assert_same(&merged, &fixed);
    assert_eq!(
        fixed
            .view()
            .resource_metrics()
            .next()
            .unwrap()
            .attributes()
            .len(),
        3
    );
    // The regular body itself is regular and left alone.
    assert!(wire::cost(&regular).unwrap().regular);
}

#[test]
fn unpacked_buckets_and_a_second_oneof_member_are_irregular() {
    use opentelemetry_proto::tonic::metrics::v1::HistogramDataPoint;
    let point = HistogramDataPoint {
        count: 2,
        sum: Some(1.0),
        bucket_counts: vec![1, 1],
        explicit_bounds: vec![0.5],
        ..Default::default()
    };
    let packed = point.encode_to_vec();
    // bucket_counts (field 6) unpacked: one fixed64 per tag.
    let mut unpacked = HistogramDataPoint {
        bucket_counts: vec![],
        ..point.clone()
    }
    .encode_to_vec();
    for c in [1u64, 1] {
        unpacked.push(6 << 3 | 1);
        unpacked.extend_from_slice(&c.to_le_bytes());
    }
    let wrap = |p: &[u8]| {
        let h = [&[0x0a][..], &len(p.len()), p].concat(); // Histogram.data_points
        let m = [&[0x4a][..], &len(h.len()), &h].concat(); // Metric.histogram
        let sm = [&[0x12][..], &len(m.len()), &m].concat(); // ScopeMetrics.metrics
        let rm = [&[0x12][..], &len(sm.len()), &sm].concat(); // ResourceMetrics.scope_metrics
        [&[0x0a][..], &len(rm.len()), &rm].concat()
    };
    assert!(wire::cost(&wrap(&packed)).unwrap().regular);
    let body = wrap(&unpacked);
    let cost = wire::cost(&body).unwrap();
    assert!(!cost.regular);
    let (fixed, _) = wire::regularize(&body, &cost).unwrap();
    let req = ExportMetricsServiceRequest::decode(&body[..]).unwrap();
    assert_same(&req, &OtlpBody::regular(fixed));
    // A sum and a histogram in one metric: the oneof is set twice.
    let two = [&[0x3a, 0x00][..], &[0x4a, 0x00]].concat();
    let sm = [&[0x12][..], &len(two.len()), &two].concat();
    let rm = [&[0x12][..], &len(sm.len()), &sm].concat();
    let body = [&[0x0a][..], &len(rm.len()), &rm].concat();
    assert!(!wire::cost(&body).unwrap().regular);
}

fn len(n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_varint(n as u64, &mut out);
    out
}

#[test]
fn views_never_panic_on_bytes_that_are_not_a_regular_body() {
    let good = OtlpBody::encode(&spanmetrics()).into_bytes();
    let mut seed = 7u64;
    for cut in (0..good.len()).step_by(7) {
        for flip in [0usize, 3, 11] {
            let mut b = good[..cut].to_vec();
            if let Some(x) = b.get_mut(cut.saturating_sub(flip + 1)) {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                *x ^= (seed >> 33) as u8;
            }
            let body = OtlpBody::regular(Bytes::from(b));
            let _ = crate::ingest::otlp::count_points(body.view());
            for rm in body.view().resource_metrics() {
                let _ = rm.attributes().iter().count();
                for m in rm.scope_metrics().flat_map(|s| s.metrics()) {
                    for msg in m.data.map(|d| d.points()).iter().flat_map(|p| p.messages()) {
                        let h = HistogramPoint::read(msg);
                        let _ = h.bucket_counts.u64s().sum::<u64>();
                        let n = NumberPoint::read(msg);
                        for kv in n.attributes.iter() {
                            let _ = kv.value.map(AnyValueView::read);
                        }
                    }
                }
            }
        }
    }
}
