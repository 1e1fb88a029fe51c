//! Unit tests of the OTLP/JSON decoder (`json.rs`).

use super::*;

fn hist_point(request: &ExportMetricsServiceRequest, i: usize) -> &HistogramDataPoint {
    match &request.resource_metrics[0].scope_metrics[0].metrics[0].data {
        Some(Data::Histogram(h)) => &h.data_points[i],
        other => panic!("not a histogram: {other:?}"),
    }
}

fn one_metric(metric: &str) -> String {
    format!(r#"{{"resourceMetrics":[{{"scopeMetrics":[{{"metrics":[{metric}]}}]}}]}}"#)
}

#[test]
fn doubles_may_be_strings_and_non_finite_values_survive_decoding() {
    let body = one_metric(
        r#"{"name":"d","histogram":{"aggregationTemporality":"AGGREGATION_TEMPORALITY_DELTA",
            "dataPoints":[
              {"startTimeUnixNano":"1","timeUnixNano":"2","count":"1","sum":"3.5",
               "bucketCounts":["1","0"],"explicitBounds":[5]},
              {"startTimeUnixNano":1,"timeUnixNano":2,"count":1,"sum":"NaN",
               "bucketCounts":[1,0],"explicitBounds":["Infinity"]},
              {"start_time_unix_nano":"1","time_unix_nano":"2","count":"0","sum":"-Infinity",
               "bucket_counts":[],"explicit_bounds":[]}]}}"#,
    );
    let req = decode(body.as_bytes()).unwrap();
    let m = &req.resource_metrics[0].scope_metrics[0].metrics[0];
    assert!(matches!(&m.data, Some(Data::Histogram(h)) if h.aggregation_temporality == 1));
    let p = hist_point(&req, 0);
    assert_eq!(
        (p.sum, p.count, &p.bucket_counts[..]),
        (Some(3.5), 1, &[1, 0][..])
    );
    let p = hist_point(&req, 1);
    assert!(p.sum.unwrap().is_nan());
    assert_eq!(p.explicit_bounds, vec![f64::INFINITY]);
    let p = hist_point(&req, 2);
    assert_eq!(p.sum, Some(f64::NEG_INFINITY));
    assert_eq!(
        p.start_time_unix_nano, 1,
        "proto field names are accepted too"
    );
}

#[test]
fn number_values_int_and_double_in_every_spelling() {
    let body = one_metric(
        r#"{"name":"c","sum":{"aggregationTemporality":1,"isMonotonic":true,"dataPoints":[
             {"asDouble":"5.5"},{"asDouble":2},{"asInt":"-3"},{"asInt":7},{"asInt":8.0},{}]}}"#,
    );
    let req = decode(body.as_bytes()).unwrap();
    let Some(Data::Sum(s)) = &req.resource_metrics[0].scope_metrics[0].metrics[0].data else {
        panic!("not a sum");
    };
    use number_data_point::Value as V;
    let values: Vec<_> = s.data_points.iter().map(|p| p.value).collect();
    assert_eq!(
        values,
        vec![
            Some(V::AsDouble(5.5)),
            Some(V::AsDouble(2.0)),
            Some(V::AsInt(-3)),
            Some(V::AsInt(7)),
            Some(V::AsInt(8)),
            None
        ]
    );
    assert!(s.is_monotonic);
}

#[test]
fn wrong_types_name_their_path() {
    let body = one_metric(r#"{"name":"c","sum":{"dataPoints":[{},{"timeUnixNano":{}}]}}"#);
    let err = decode(body.as_bytes()).unwrap_err();
    assert!(
        err.contains(
            "resourceMetrics[0].scopeMetrics[0].metrics[0].sum.dataPoints[1].timeUnixNano"
        ),
        "{err}"
    );
    let err =
        decode(one_metric(r#"{"name":"c","sum":{"dataPoints":[{"asDouble":"inf"}]}}"#).as_bytes())
            .unwrap_err();
    assert!(err.contains("asDouble"), "{err}");
    let long = format!(
        "{{\"resourceMetrics\":[{{\"schemaUrl\":7, \"x\":\"{}\"}}]}}",
        "y".repeat(1000)
    );
    assert!(decode(long.as_bytes()).unwrap_err().len() < 200);
    let huge = one_metric(&format!(
        r#"{{"name":"c","sum":{{"dataPoints":[{{"asInt":"{}"}}]}}}}"#,
        "9".repeat(10_000)
    ));
    let err = decode(huge.as_bytes()).unwrap_err();
    assert!(
        err.len() < 300,
        "the error quotes a bounded prefix: {} bytes",
        err.len()
    );
    assert!(decode(b"[]").is_err());
    assert!(decode(b"{\"resourceMetrics\":null}")
        .unwrap()
        .resource_metrics
        .is_empty());
}

#[test]
fn attribute_values_of_every_kind_and_unknown_fields() {
    let body = r#"{"resourceMetrics":[{"resource":{"attributes":[
        {"key":"s","value":{"stringValue":"x"}},
        {"key":"b","value":{"boolValue":true}},
        {"key":"i","value":{"intValue":"42"}},
        {"key":"d","value":{"doubleValue":"1.5"}},
        {"key":"y","value":{"bytesValue":"AQI="}},
        {"key":"a","value":{"arrayValue":{"values":[{"stringValue":"p"}]}}},
        {"key":"k","value":{"kvlistValue":{"values":[{"key":"q","value":{"intValue":1}}]}}},
        {"key":"n","value":{}},
        {"key":"z"}],"unknownField":[1,2]}, "futureField":{}}]}"#;
    let req = decode(body.as_bytes()).unwrap();
    let attrs = &req.resource_metrics[0]
        .resource
        .as_ref()
        .unwrap()
        .attributes;
    use any_value::Value as V;
    let v = |i: usize| attrs[i].value.as_ref().and_then(|v| v.value.clone());
    assert_eq!(v(0), Some(V::StringValue("x".into())));
    assert_eq!(v(1), Some(V::BoolValue(true)));
    assert_eq!(v(2), Some(V::IntValue(42)));
    assert_eq!(v(3), Some(V::DoubleValue(1.5)));
    assert_eq!(v(4), Some(V::BytesValue(vec![1, 2])));
    assert!(matches!(v(5), Some(V::ArrayValue(a)) if a.values.len() == 1));
    assert!(matches!(v(6), Some(V::KvlistValue(k)) if k.values[0].key == "q"));
    for (text, want) in [
        ("AQI", vec![1, 2]),
        ("-_8", vec![0xfb, 0xff]),
        ("-_8=", vec![0xfb, 0xff]),
    ] {
        assert_eq!(base64_any(text), Some(want), "{text}");
    }
    assert_eq!(v(7), None);
    assert!(attrs[8].value.is_none());
}

#[test]
fn refused_kinds_keep_their_point_count() {
    let body = one_metric(r#"{"name":"g","gauge":{"dataPoints":[{"asDouble":"junk"},{}]}}"#);
    let req = decode(body.as_bytes()).unwrap();
    let m = &req.resource_metrics[0].scope_metrics[0].metrics[0];
    assert!(matches!(&m.data, Some(Data::Gauge(g)) if g.data_points.len() == 2));
}

#[test]
fn rejected_data_points_is_an_int64_string() {
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsPartialSuccess;
    let resp = ExportMetricsServiceResponse {
        partial_success: Some(ExportMetricsPartialSuccess {
            rejected_data_points: 3,
            error_message: "why".into(),
        }),
    };
    let v: Value = serde_json::from_slice(&encode_response(&resp)).unwrap();
    assert_eq!(v["partialSuccess"]["rejectedDataPoints"], "3");
    assert_eq!(v["partialSuccess"]["errorMessage"], "why");
    let none = encode_response(&ExportMetricsServiceResponse::default());
    assert_eq!(none, b"{}");
}
