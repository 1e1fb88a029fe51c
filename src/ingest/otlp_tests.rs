//! Unit tests of validation, projection and keying (`otlp.rs`).

use super::*;
use crate::aggregate::shard::{LabelRef, LabelResolver};
use crate::ingest::view::OtlpBody;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric::Data, number_data_point, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;

fn kv(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.into())),
        }),
        ..Default::default()
    }
}

fn projection() -> Projection {
    Projection::new(
        &["service.name".into(), "k8s.cluster.name".into()],
        &["k8s.pod.name".into(), "service.instance.id".into()],
    )
}

fn request(resource: Vec<KeyValue>, metrics: Vec<Metric>) -> ExportMetricsServiceRequest {
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: resource,
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                metrics,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

fn sum(points: Vec<NumberDataPoint>, temporality: i32, monotonic: bool) -> Metric {
    Metric {
        name: "traces.span.metrics.calls".into(),
        data: Some(Data::Sum(Sum {
            data_points: points,
            aggregation_temporality: temporality,
            is_monotonic: monotonic,
        })),
        ..Default::default()
    }
}

fn int_point(attrs: Vec<KeyValue>, v: i64) -> NumberDataPoint {
    NumberDataPoint {
        attributes: attrs,
        start_time_unix_nano: 10,
        time_unix_nano: 20,
        value: Some(number_data_point::Value::AsInt(v)),
        ..Default::default()
    }
}

fn hist(p: HistogramDataPoint) -> Metric {
    Metric {
        name: "traces.span.metrics.duration".into(),
        unit: "ms".into(),
        data: Some(Data::Histogram(Histogram {
            data_points: vec![p],
            aggregation_temporality: AggregationTemporality::Delta as i32,
        })),
        ..Default::default()
    }
}

fn good_hist() -> HistogramDataPoint {
    HistogramDataPoint {
        start_time_unix_nano: 10,
        time_unix_nano: 20,
        count: 3,
        sum: Some(4.5),
        bucket_counts: vec![1, 2, 0],
        explicit_bounds: vec![1.0, 5.0],
        ..Default::default()
    }
}

fn run(req: &ExportMetricsServiceRequest) -> Prepared {
    prepare(
        &OtlpBody::encode(req),
        &projection(),
        &InputLimits::default(),
        crate::unix_ns(),
        1,
        |_| 0,
    )
}

const DELTA: i32 = AggregationTemporality::Delta as i32;

#[test]
fn pods_of_one_service_share_an_output_key_but_not_a_source_key() {
    let point = |pod: &str| {
        request(
            vec![kv("service.name", "checkout"), kv("k8s.pod.name", pod)],
            vec![sum(
                vec![int_point(
                    vec![kv("span.name", "GET /"), kv("service.instance.id", pod)],
                    1,
                )],
                DELTA,
                true,
            )],
        )
    };
    let a = run(&point("a"));
    let b = run(&point("b"));
    let (pa, pb) = (&a.per_shard[0].points[0], &b.per_shard[0].points[0]);
    assert_eq!(pa.series, pb.series);
    assert_ne!(pa.source, pb.source);
}

#[test]
fn labels_keep_by_resource_attributes_and_drop_without_point_attributes() {
    let req = OtlpBody::encode(&request(
        vec![
            kv("service.name", "checkout"),
            kv("k8s.cluster.name", "eu-1"),
            kv("host.arch", "amd64"),
            kv("k8s.pod.name", "p1"),
        ],
        vec![sum(
            vec![int_point(
                vec![
                    kv("span.name", "GET /"),
                    kv("status.code", "STATUS_CODE_OK"),
                    kv("service.instance.id", "p1"),
                ],
                1,
            )],
            DELTA,
            true,
        )],
    ));
    let p = prepare(
        &req,
        &projection(),
        &InputLimits::default(),
        crate::unix_ns(),
        1,
        |_| 0,
    );
    let resolver = RequestLabels {
        body: req,
        resources: p.resources.clone(),
        projection: Arc::new(projection()),
    };
    let at = p.per_shard[0].points[0].label_ref;
    let labels = resolver.labels(at);
    // A handle this resolver did not make, or one outside the request, is a bug, not a
    // series without labels.
    let LabelRef::Otlp { resource, .. } = at else {
        panic!("{at:?}")
    };
    let outside = LabelRef::Otlp {
        resource,
        point: crate::aggregate::batch::Span {
            at: u32::MAX - 4,
            len: 8,
        },
        histogram: false,
    };
    assert_eq!(resolver.labels(outside), None);
    let LabelRef::Otlp { point, .. } = at else {
        panic!("{at:?}")
    };
    let no_resource = LabelRef::Otlp {
        resource: resource + 1,
        point,
        histogram: false,
    };
    assert_eq!(resolver.labels(no_resource), None);
    assert_eq!(resolver.labels(LabelRef::Entry(0)), None);
    let want: Vec<(String, String)> = [
        ("k8s_cluster_name", "eu-1"),
        ("service_name", "checkout"),
        ("span_name", "GET /"),
        ("status_code", "STATUS_CODE_OK"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    assert_eq!(labels, Some(want));
}

#[test]
fn a_point_attribute_overrides_the_resource_attribute_in_the_key_too() {
    let with = |point_service: Option<&str>| {
        let mut attrs = vec![kv("span.name", "GET /")];
        if let Some(s) = point_service {
            attrs.push(kv("service.name", s));
        }
        run(&request(
            vec![kv("service.name", "checkout")],
            vec![sum(vec![int_point(attrs, 1)], DELTA, true)],
        ))
        .per_shard[0]
            .points[0]
            .series
    };
    // The spanmetrics connector repeats service.name on the point: same series either way.
    assert_eq!(with(None), with(Some("checkout")));
    assert_ne!(with(None), with(Some("cart")));
}

#[test]
fn unsupported_kinds_and_bad_numbers_are_rejected_with_their_reason() {
    let bad_start = NumberDataPoint {
        start_time_unix_nano: 20,
        ..int_point(vec![], 1)
    };
    let zero = NumberDataPoint {
        time_unix_nano: 0,
        ..int_point(vec![], 1)
    };
    let nan = NumberDataPoint {
        value: Some(number_data_point::Value::AsDouble(f64::NAN)),
        ..int_point(vec![], 1)
    };
    let missing = NumberDataPoint {
        value: None,
        ..int_point(vec![], 1)
    };
    let req = request(
        vec![],
        vec![
            sum(vec![int_point(vec![], 1)], DELTA, false),
            sum(vec![int_point(vec![], 1)], 0, true),
            sum(
                vec![int_point(vec![], -1), bad_start, zero, nan, missing],
                DELTA,
                true,
            ),
            Metric {
                name: "g".into(),
                data: Some(Data::Gauge(Gauge {
                    data_points: vec![int_point(vec![], 1)],
                })),
                ..Default::default()
            },
        ],
    );
    let p = run(&req);
    let r = &p.rejections;
    assert_eq!(r.counts[Reason::NonMonotonicSum as usize], 1);
    assert_eq!(r.counts[Reason::UnspecifiedTemporality as usize], 1);
    assert_eq!(r.counts[Reason::InvalidValue as usize], 1);
    assert_eq!(r.counts[Reason::NonFinite as usize], 1);
    assert_eq!(r.counts[Reason::InvalidInterval as usize], 1);
    assert_eq!(r.counts[Reason::ZeroTimestamp as usize], 1);
    assert_eq!(r.counts[Reason::MissingValue as usize], 1);
    assert_eq!(r.counts[Reason::Gauge as usize], 1);
    assert_eq!(r.total(), 8);
    assert_eq!(p.received, 8);
    assert!(p.per_shard[0].points.is_empty());
    assert!(r
        .message()
        .contains("gauges are not aggregated (unsupported_gauge)"));
}

#[test]
fn histogram_points_are_checked_bucket_by_bucket() {
    let cases = [
        (
            HistogramDataPoint {
                explicit_bounds: vec![5.0, 1.0],
                ..good_hist()
            },
            Reason::InvalidBounds,
        ),
        (
            HistogramDataPoint {
                explicit_bounds: vec![1.0, f64::INFINITY],
                ..good_hist()
            },
            Reason::NonFinite,
        ),
        (
            HistogramDataPoint {
                bucket_counts: vec![1, 2],
                ..good_hist()
            },
            Reason::BucketCountMismatch,
        ),
        (
            HistogramDataPoint {
                count: 4,
                ..good_hist()
            },
            Reason::CountMismatch,
        ),
        (
            HistogramDataPoint {
                bucket_counts: vec![u64::MAX, 1, 0],
                ..good_hist()
            },
            Reason::CountMismatch,
        ),
        (
            HistogramDataPoint {
                sum: None,
                ..good_hist()
            },
            Reason::InvalidSum,
        ),
        (
            HistogramDataPoint {
                sum: Some(f64::NAN),
                ..good_hist()
            },
            Reason::NonFinite,
        ),
    ];
    for (point, reason) in &cases {
        let p = run(&request(vec![], vec![hist(point.clone())]));
        assert_eq!(p.rejections.counts[*reason as usize], 1, "{point:?}");
        assert!(p.per_shard[0].points.is_empty());
    }
    // Each after a good point of the same number of bounds, in one request: the bounds a good
    // point left checked are no pass for other bounds, and a bad point's are none for the next.
    let mut points = vec![good_hist()];
    for (point, _) in &cases {
        points.extend([point.clone(), good_hist()]);
    }
    let mut metric = hist(good_hist());
    if let Some(Data::Histogram(h)) = &mut metric.data {
        h.data_points = points;
    }
    let p = run(&request(vec![], vec![metric]));
    for (point, reason) in &cases {
        let want = cases.iter().filter(|(_, r)| r == reason).count() as u64;
        assert_eq!(p.rejections.get(*reason), want, "{point:?}");
    }
    assert_eq!(p.rejections.total(), cases.len() as u64);
    assert_eq!(p.per_shard[0].points.len(), cases.len() + 1);
    assert!(
        p.layouts.iter().all(|l| **l == [1.0, 5.0]),
        "{:?}",
        p.layouts
    );
    // Good points whose bounds change and change back: each run gets its layout.
    let wider = HistogramDataPoint {
        bucket_counts: vec![1, 2, 0, 0],
        explicit_bounds: vec![1.0, 5.0, 10.0],
        ..good_hist()
    };
    let mut metric = hist(good_hist());
    if let Some(Data::Histogram(h)) = &mut metric.data {
        h.data_points = vec![good_hist(), wider.clone(), wider, good_hist()];
    }
    let p = run(&request(vec![], vec![metric]));
    assert_eq!(p.rejections.total(), 0);
    let layouts: Vec<&[f64]> = p.layouts.iter().map(|l| &**l).collect();
    assert_eq!(layouts, [&[1.0, 5.0][..], &[1.0, 5.0, 10.0], &[1.0, 5.0]]);
    let used: Vec<u32> = p.per_shard[0]
        .points
        .iter()
        .map(|pt| match pt.value {
            PointValue::Histogram { layout, .. } => layout,
            _ => u32::MAX,
        })
        .collect();
    assert_eq!(used, [0, 1, 1, 2]);
    let ok = run(&request(vec![], vec![hist(good_hist())]));
    assert_eq!(ok.rejections.total(), 0);
    assert_eq!(ok.per_shard[0].counts, vec![1, 2, 0]);
    assert_eq!(
        &*ok.families[0].name,
        "traces_span_metrics_duration_milliseconds"
    );
}

#[test]
fn points_flagged_no_recorded_value_are_skipped_not_rejected() {
    let p = run(&request(
        vec![],
        vec![sum(
            vec![NumberDataPoint {
                flags: 1,
                ..int_point(vec![], 1)
            }],
            DELTA,
            true,
        )],
    ));
    assert_eq!(p.no_value, 1);
    assert_eq!(p.rejections.total(), 0);
    assert!(p.per_shard[0].points.is_empty());
}

#[test]
fn non_string_attribute_values_render_as_label_text() {
    let mut buf = String::new();
    let int = AnyValue {
        value: Some(any_value::Value::IntValue(-42)),
    };
    let int = int.encode_to_vec();
    assert_eq!(value_str(Some(&int), &mut buf), "-42");
    let b = AnyValue {
        value: Some(any_value::Value::BoolValue(true)),
    }
    .encode_to_vec();
    assert_eq!(value_str(Some(&b), &mut buf), "true");
    let list = AnyValue {
        value: Some(any_value::Value::ArrayValue(
            opentelemetry_proto::tonic::common::v1::ArrayValue {
                values: vec![AnyValue {
                    value: Some(any_value::Value::StringValue("a".into())),
                }],
            },
        )),
    }
    .encode_to_vec();
    assert_eq!(
        value_str(Some(&list), &mut buf),
        r#"{"arrayValue":{"values":[{"stringValue":"a"}]}}"#
    );
    assert_eq!(value_str(None, &mut buf), "");
}

#[test]
fn a_counter_and_a_histogram_of_one_name_are_distinct_sources() {
    let mut h = hist(good_hist());
    h.name = "traces.span.metrics.calls".into();
    h.unit = String::new();
    let p = run(&request(
        vec![],
        vec![sum(vec![int_point(vec![], 1)], DELTA, true), h],
    ));
    let points = &p.per_shard[0].points;
    assert_eq!(points.len(), 2);
    assert_ne!(points[0].source, points[1].source);
    assert_ne!(points[0].series, points[1].series);
}

fn reasons(p: &Prepared) -> Vec<(&'static str, u64)> {
    Reason::ALL
        .iter()
        .filter(|r| p.rejections.get(**r) > 0)
        .map(|r| (r.as_str(), p.rejections.get(*r)))
        .collect()
}

#[test]
fn histogram_sums_that_would_move_sum_backwards_are_refused() {
    let with = |edit: &dyn Fn(&mut HistogramDataPoint)| {
        let mut p = good_hist();
        edit(&mut p);
        reasons(&run(&request(vec![], vec![hist(p)])))
    };
    assert_eq!(with(&|p| p.sum = Some(-91.0)), vec![("negative_sum", 1)]);
    assert_eq!(
        with(&|p| {
            p.count = 0;
            p.bucket_counts = vec![0, 0, 0];
            p.sum = Some(3.0);
        }),
        vec![("sum_without_count", 1)]
    );
    assert_eq!(with(&|p| p.sum = Some(f64::NAN)), vec![("non_finite", 1)]);
    assert_eq!(
        with(&|p| p.explicit_bounds = vec![1.0, f64::INFINITY]),
        vec![("non_finite", 1)]
    );
    assert_eq!(
        with(&|p| p.sum = Some(-0.0)),
        vec![],
        "a negative zero is a zero"
    );
    assert_eq!(
        with(&|p| {
            p.explicit_bounds = (0..600).map(f64::from).collect();
            p.bucket_counts = vec![0; 601];
        }),
        vec![("too_many_buckets", 1)]
    );
}

#[test]
fn a_point_from_a_clock_far_ahead_is_refused_before_anything_else() {
    let now = crate::unix_ns();
    let year_2100 = 4_102_444_800_000_000_000u64;
    let mut p = int_point(vec![kv("span.name", "a")], 1);
    p.start_time_unix_nano = now - 1_000;
    p.time_unix_nano = year_2100;
    let mut ok = p.clone();
    ok.time_unix_nano = now + 60_000_000_000; // a minute ahead: within the skew
    let prepared = run(&request(vec![], vec![sum(vec![p, ok], DELTA, true)]));
    assert_eq!(reasons(&prepared), vec![("future", 1)]);
    assert_eq!(prepared.per_shard[0].points.len(), 1);
}

#[test]
fn metric_names_are_bounded_and_counted_per_point() {
    let mut m = sum(
        vec![int_point(vec![], 1), int_point(vec![], 2)],
        DELTA,
        true,
    );
    m.name = "n".repeat(64 << 10);
    let p = run(&request(vec![], vec![m.clone()]));
    assert_eq!(reasons(&p), vec![("name_too_long", 2)]);
    m.name = String::new();
    let p = run(&request(vec![], vec![m]));
    assert_eq!(reasons(&p), vec![("missing_name", 2)]);
}

#[test]
fn families_are_found_by_name_unit_and_kind() {
    let metrics: Vec<Metric> = (0..1000)
        .map(|i| {
            let mut m = sum(vec![int_point(vec![], 1)], DELTA, true);
            m.name = format!("m{}", i % 10);
            m
        })
        .collect();
    let p = run(&request(vec![], metrics));
    assert_eq!(p.families.len(), 10);
    assert_eq!(p.per_shard[0].points.len(), 1000);
}
