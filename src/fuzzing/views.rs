//! The borrowed views against prost: every field spanagg reads, compared on whatever the
//! fuzzer (or its corpus) makes. A view that reads a field differently from prost would key,
//! validate or label a point differently from what the client sent.

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value::Value, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};

use crate::ingest::otlp::value_str;
use crate::ingest::view::{
    AnyValueView, Attrs, Data, HistogramPoint, Number, NumberPoint, OtlpBody,
};

/// Panics where the views of `body` read anything other than `req`, its prost decoding.
pub fn assert_same(req: &ExportMetricsServiceRequest, body: &OtlpBody) {
    let points: usize = req
        .resource_metrics
        .iter()
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics)
        .map(|m| match &m.data {
            Some(metric::Data::Sum(s)) => s.data_points.len(),
            Some(metric::Data::Histogram(h)) => h.data_points.len(),
            Some(metric::Data::Gauge(g)) => g.data_points.len(),
            Some(metric::Data::Summary(s)) => s.data_points.len(),
            Some(metric::Data::ExponentialHistogram(e)) => e.data_points.len(),
            None => 0,
        })
        .sum();
    assert_eq!(
        crate::ingest::otlp::count_points(body.view()),
        points as u64,
        "points"
    );
    let rms: Vec<_> = body.view().resource_metrics().collect();
    assert_eq!(rms.len(), req.resource_metrics.len(), "resource metrics");
    for (rm, v) in req.resource_metrics.iter().zip(rms) {
        same_attrs(
            rm.resource.as_ref().map_or(&[][..], |r| &r.attributes[..]),
            v.attributes(),
        );
        let sms: Vec<_> = v.scope_metrics().collect();
        assert_eq!(sms.len(), rm.scope_metrics.len(), "scope metrics");
        for (sm, v) in rm.scope_metrics.iter().zip(sms) {
            assert_eq!(v.scope_name, sm.scope.as_ref().map_or("", |s| &s.name[..]));
            let metrics: Vec<_> = v.metrics().collect();
            assert_eq!(metrics.len(), sm.metrics.len(), "metrics");
            for (m, v) in sm.metrics.iter().zip(metrics) {
                assert_eq!(
                    (v.name, v.description, v.unit),
                    (&m.name[..], &m.description[..], &m.unit[..])
                );
                same_data(m.data.as_ref(), v.data);
            }
        }
    }
}

fn same_data(want: Option<&metric::Data>, got: Option<Data<'_>>) {
    use metric::Data as D;
    let (Some(want), Some(got)) = (want, got) else {
        assert_eq!(want.is_none(), got.is_none(), "metric data present");
        return;
    };
    match (want, got) {
        (
            D::Sum(s),
            Data::Sum {
                points,
                temporality,
                monotonic,
            },
        ) => {
            assert_eq!(
                (temporality, monotonic),
                (s.aggregation_temporality, s.is_monotonic)
            );
            let got: Vec<_> = points.messages().map(NumberPoint::read).collect();
            assert_eq!(got.len(), s.data_points.len(), "sum points");
            for (p, g) in s.data_points.iter().zip(got) {
                assert_eq!(
                    (g.start, g.time, g.flags),
                    (p.start_time_unix_nano, p.time_unix_nano, p.flags)
                );
                let value = p.value.map(|v| match v {
                    number_data_point::Value::AsDouble(d) => Number::Double(d),
                    number_data_point::Value::AsInt(i) => Number::Int(i),
                });
                assert_eq!(bits(value), bits(g.value), "number value");
                same_attrs(&p.attributes, g.attributes);
            }
        }
        (
            D::Histogram(h),
            Data::Histogram {
                points,
                temporality,
            },
        ) => {
            assert_eq!(temporality, h.aggregation_temporality);
            let got: Vec<_> = points.messages().map(HistogramPoint::read).collect();
            assert_eq!(got.len(), h.data_points.len(), "histogram points");
            for (p, g) in h.data_points.iter().zip(got) {
                assert_eq!(
                    (g.start, g.time, g.flags, g.count),
                    (p.start_time_unix_nano, p.time_unix_nano, p.flags, p.count)
                );
                assert_eq!(g.sum.map(f64::to_bits), p.sum.map(f64::to_bits), "sum");
                assert_eq!(g.bucket_counts.u64s().collect::<Vec<_>>(), p.bucket_counts);
                let bounds: Vec<u64> = p.explicit_bounds.iter().map(|b| b.to_bits()).collect();
                let got_bounds: Vec<u64> = g.explicit_bounds.f64s().map(f64::to_bits).collect();
                assert_eq!(got_bounds, bounds, "bounds");
                same_attrs(&p.attributes, g.attributes);
            }
        }
        (D::Gauge(g), Data::Gauge(p)) => assert_eq!(p.count(), g.data_points.len()),
        (D::Summary(s), Data::Summary(p)) => assert_eq!(p.count(), s.data_points.len()),
        (D::ExponentialHistogram(e), Data::ExponentialHistogram(p)) => {
            assert_eq!(p.count(), e.data_points.len())
        }
        (want, got) => panic!("metric kinds differ: {want:?} read as {got:?}"),
    }
}

fn bits(n: Option<Number>) -> Option<(bool, u64)> {
    n.map(|n| match n {
        Number::Double(d) => (true, d.to_bits()),
        Number::Int(i) => (false, i as u64),
    })
}

fn same_attrs(want: &[KeyValue], got: Attrs<'_>) {
    assert_eq!(got.len(), want.len(), "attributes");
    assert_eq!(got.iter().count(), want.len(), "attributes read");
    for (kv, g) in want.iter().zip(got.iter()) {
        assert_eq!(g.key, kv.key);
        let read = g.value.map_or(AnyValueView::Empty, AnyValueView::read);
        let value = kv.value.as_ref().and_then(|v| v.value.as_ref());
        let same = match (value, read) {
            (None, AnyValueView::Empty) => true,
            (Some(Value::StringValue(s)), AnyValueView::String(r)) => s == r,
            (Some(Value::BoolValue(b)), AnyValueView::Bool(r)) => *b == r,
            (Some(Value::IntValue(i)), AnyValueView::Int(r)) => *i == r,
            (Some(Value::DoubleValue(d)), AnyValueView::Double(r)) => d.to_bits() == r.to_bits(),
            (Some(Value::BytesValue(b)), AnyValueView::Bytes(r)) => b[..] == *r,
            // Rendered from prost's decoding, as the label text shows it.
            (
                Some(
                    v @ (Value::ArrayValue(_)
                    | Value::KvlistValue(_)
                    | Value::StringValueStrindex(_)),
                ),
                AnyValueView::Other(_),
            ) => {
                let mut buf = String::new();
                value_str(g.value, &mut buf) == serde_json::to_string(v).unwrap_or_default()
            }
            _ => false,
        };
        assert!(same, "attribute {:?}: {value:?} read as {read:?}", kv.key);
    }
}
