//! What one hostile or unlucky client can send to the real binary without breaking the scrape,
//! moving a counter backwards or poisoning a stream: reserved and colliding attribute names,
//! negative sums, clocks far ahead, OTLP/JSON's string doubles. Every test here failed before
//! the fix it guards.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, HashSet};

use common::*;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use prost::Message;

const SECOND: u64 = 1_000_000_000;

/// Every sample line's series (name and labels) must be unique, and a bucket line holds one `le`.
fn assert_no_duplicate_series(scrape: &str) {
    let mut seen = HashSet::new();
    for line in scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, _) = line.rsplit_once(' ').unwrap();
        assert!(seen.insert(series.to_owned()), "duplicate series {series}");
        let les = series.matches(",le=").count() + series.matches("{le=").count();
        assert!(les <= 1, "two le labels: {series}");
        assert!(
            !series.contains(",__") && !series.contains("{__"),
            "reserved: {series}"
        );
    }
}

/// Edits every point's attributes of a request.
fn with_attrs(
    mut req: ExportMetricsServiceRequest,
    edit: impl Fn(&mut Vec<KeyValue>),
) -> ExportMetricsServiceRequest {
    for m in req
        .resource_metrics
        .iter_mut()
        .flat_map(|r| r.scope_metrics.iter_mut())
        .flat_map(|s| s.metrics.iter_mut())
    {
        match m.data.as_mut() {
            Some(Data::Sum(s)) => s
                .data_points
                .iter_mut()
                .for_each(|p| edit(&mut p.attributes)),
            Some(Data::Histogram(h)) => h
                .data_points
                .iter_mut()
                .for_each(|p| edit(&mut p.attributes)),
            _ => {}
        }
    }
    req
}

#[test]
fn reserved_and_colliding_attribute_names_keep_one_valid_series() {
    let s = Spanagg::start("");
    let t = now_ns() - 60 * SECOND;
    // Pod a: `le` and `__name__` on its points, and `http.method`.
    let a = with_attrs(cart_delta("a", 2, [1, 1, 0, 0, 0], 3.0, t), |attrs| {
        attrs.push(kv("le", "0.5"));
        attrs.push(kv("__name__", "evil"));
        attrs.push(kv("http.method", "GET"));
        attrs.push(kv("otel_metric_overflow", "true"));
    });
    // Pod b: the same labels as Prometheus sees them: `http_method`, an empty attribute.
    let b = with_attrs(cart_delta("b", 3, [0, 3, 0, 0, 0], 4.0, t), |attrs| {
        attrs.push(kv("le", "0.5"));
        attrs.push(kv("__name__", "evil"));
        attrs.push(kv("http_method", "GET"));
        attrs.push(kv("otel_metric_overflow", "true"));
        attrs.push(kv("empty", ""));
    });
    s.post_ok(&a.encode_to_vec());
    s.post_ok(&b.encode_to_vec());
    let scrape = s.scrape();
    assert_no_duplicate_series(&scrape);
    check_scrape(&scrape, &HashMap::new());
    let calls: Vec<&str> = scrape
        .lines()
        .filter(|l| l.starts_with("traces_span_metrics_calls_total{"))
        .collect();
    assert_eq!(calls.len(), 1, "one merged series: {calls:?}");
    assert!(calls[0].ends_with(" 5"), "{}", calls[0]);
    // `le` is reserved on histograms only: a counter keeps it as it is.
    for label in [
        "exported___name__=\"evil\"",
        ",le=\"0.5\"",
        "exported_otel_metric_overflow=\"true\"",
        "http_method=\"GET\"",
    ] {
        assert!(calls[0].contains(label), "{label} in {}", calls[0]);
    }
    assert!(!calls[0].contains("empty="), "an empty value is no label");
    let inf = scrape
        .lines()
        .find(|l| l.contains("_bucket{") && l.contains("le=\"+Inf\""))
        .unwrap();
    assert!(
        inf.ends_with(" 5") && inf.contains("exported_le=\"0.5\""),
        "{inf}"
    );
    // Both pods' two points carried reserved names.
    assert_eq!(
        s.internal("spanagg_points_relabeled_total{why=\"reserved_name\"}"),
        4.0
    );
}

#[test]
fn a_negative_or_countless_sum_is_refused_and_sum_never_goes_down() {
    let s = Spanagg::start("");
    let t = now_ns() - 60 * SECOND;
    s.post_ok(&cart_delta("a", 1, [1, 0, 0, 0, 0], 9.0, t).encode_to_vec());
    let negative = cart_delta("a", 1, [1, 0, 0, 0, 0], -100.0, t + SECOND);
    let (status, _, body) = s.post_otlp("application/json", &[], &json_of(&negative));
    assert_eq!(status, 200);
    let reply: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        reply["partialSuccess"]["rejectedDataPoints"], "1",
        "{reply}"
    );
    let msg = reply["partialSuccess"]["errorMessage"].as_str().unwrap();
    assert!(msg.contains("negative_sum"), "{msg}");
    let countless = cart_delta("a", 1, [0, 0, 0, 0, 0], 4.0, t + 2 * SECOND);
    let (_, _, body) = s.post_otlp("application/x-protobuf", &[], &countless.encode_to_vec());
    let reply = export_response(&body);
    let partial = reply.partial_success.unwrap();
    assert!(
        partial.error_message.contains("sum_without_count"),
        "{partial:?}"
    );
    let scrape = s.scrape();
    let sum = sample_value(
        &scrape,
        "traces_span_metrics_duration_milliseconds_sum{service_name=\"checkout\",span_kind=\"SPAN_KIND_SERVER\",span_name=\"GET /cart\",status_code=\"STATUS_CODE_UNSET\"}",
    );
    assert_eq!(sum, Some(9.0), "{scrape}");
    assert_eq!(
        s.internal("spanagg_points_rejected_total{reason=\"negative_sum\"}"),
        1.0
    );
    assert_eq!(
        s.internal("spanagg_points_rejected_total{reason=\"sum_without_count\"}"),
        1.0
    );
}

/// The request as OTLP/JSON, by the proto3 JSON mapping (with string doubles for `sum`).
fn json_of(req: &ExportMetricsServiceRequest) -> Vec<u8> {
    let attrs = |a: &[opentelemetry_proto::tonic::common::v1::KeyValue]| -> serde_json::Value {
        a.iter()
            .map(|kv| {
                let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                    Some(
                        opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s),
                    ) => s.clone(),
                    _ => String::new(),
                };
                serde_json::json!({"key": kv.key, "value": {"stringValue": v}})
            })
            .collect()
    };
    let rm = &req.resource_metrics[0];
    let metrics: Vec<serde_json::Value> = rm.scope_metrics[0]
        .metrics
        .iter()
        .map(|m| match &m.data {
            Some(Data::Sum(s)) => serde_json::json!({
                "name": m.name, "unit": m.unit,
                "sum": {"aggregationTemporality": s.aggregation_temporality, "isMonotonic": true,
                  "dataPoints": s.data_points.iter().map(|p| serde_json::json!({
                    "attributes": attrs(&p.attributes),
                    "startTimeUnixNano": p.start_time_unix_nano.to_string(),
                    "timeUnixNano": p.time_unix_nano.to_string(),
                    "asInt": match p.value { Some(opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsInt(i)) => i.to_string(), _ => "0".into() },
                  })).collect::<Vec<_>>()}}),
            Some(Data::Histogram(h)) => serde_json::json!({
                "name": m.name, "unit": m.unit,
                "histogram": {"aggregationTemporality": "AGGREGATION_TEMPORALITY_DELTA",
                  "dataPoints": h.data_points.iter().map(|p| serde_json::json!({
                    "attributes": attrs(&p.attributes),
                    "startTimeUnixNano": p.start_time_unix_nano.to_string(),
                    "timeUnixNano": p.time_unix_nano.to_string(),
                    "count": p.count.to_string(),
                    "sum": p.sum.map(|s| s.to_string()),
                    "bucketCounts": p.bucket_counts.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
                    "explicitBounds": p.explicit_bounds,
                  })).collect::<Vec<_>>()}}),
            _ => serde_json::Value::Null,
        })
        .collect();
    serde_json::json!({"resourceMetrics": [{
        "resource": {"attributes": attrs(&rm.resource.as_ref().unwrap().attributes)},
        "scopeMetrics": [{"scope": {"name": "spanmetricsconnector"}, "metrics": metrics}],
    }]})
    .to_string()
    .into_bytes()
}

#[test]
fn json_string_doubles_apply_and_non_finite_points_are_refused_alone() {
    let s = Spanagg::start("");
    let t = now_ns() - 60 * SECOND;
    let req = spanmetrics(
        "checkout",
        "a",
        &[
            route("GET /ok", 2, [1, 1, 0, 0, 0], 3.5),
            route("GET /nan", 1, [1, 0, 0, 0, 0], 1.0),
        ],
        t,
        t + SECOND,
        opentelemetry_proto::tonic::metrics::v1::AggregationTemporality::Delta,
    );
    let mut body: serde_json::Value = serde_json::from_slice(&json_of(&req)).unwrap();
    // The second histogram point's sum is "NaN"; the first's stays the string "3.5".
    let points =
        &mut body["resourceMetrics"][0]["scopeMetrics"][0]["metrics"][1]["histogram"]["dataPoints"];
    assert_eq!(points[0]["sum"], "3.5");
    points[1]["sum"] = "NaN".into();
    let (status, _, reply) = s.post_otlp("application/json", &[], body.to_string().as_bytes());
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&reply));
    let reply: serde_json::Value = serde_json::from_slice(&reply).unwrap();
    assert_eq!(
        reply["partialSuccess"]["rejectedDataPoints"], "1",
        "{reply}"
    );
    let scrape = s.scrape();
    let ok_sum = scrape
        .lines()
        .find(|l| {
            l.starts_with("traces_span_metrics_duration_milliseconds_sum{") && l.contains("GET /ok")
        })
        .unwrap();
    assert!(ok_sum.ends_with(" 3.5"), "{ok_sum}");
    assert!(!scrape.contains("GET /nan\",status_code=\"STATUS_CODE_UNSET\"} NaN"));
    // The NaN route's calls counter is a valid sibling: applied.
    let calls = scrape
        .lines()
        .find(|l| l.starts_with("traces_span_metrics_calls_total{") && l.contains("GET /nan"))
        .unwrap();
    assert!(calls.ends_with(" 1"), "{calls}");
    assert_eq!(
        s.internal("spanagg_points_rejected_total{reason=\"non_finite\"}"),
        1.0
    );
}

#[test]
fn json_with_more_points_than_the_request_limit_is_refused_for_good() {
    let s = Spanagg::start("limits:\n  max_points_per_request: 1000\n");
    let t = now_ns() - 60 * SECOND;
    // 501 routes (one span, repeated): a counter point and a histogram point each.
    let routes: Vec<_> = (0..501)
        .map(|_| route("GET /many", 1, [1, 0, 0, 0, 0], 1.0))
        .collect();
    let req = spanmetrics(
        "checkout",
        "a",
        &routes,
        t,
        t + SECOND,
        opentelemetry_proto::tonic::metrics::v1::AggregationTemporality::Delta,
    );
    let (status, _, reply) = s.post_otlp("application/json", &[], &json_of(&req));
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&reply));
    assert!(String::from_utf8_lossy(&reply).contains("1002 data points"));
    assert!(!s.scrape().contains("GET /many"), "nothing applied");
}

#[test]
fn json_nested_deeper_than_protobuf_may_be_is_refused_not_applied_and_lost_on_replay() {
    let s = Spanagg::start("");
    // JSON allows this depth; its protobuf form would be refused when the WAL replays it.
    let mut value = serde_json::json!({"stringValue": "x"});
    for _ in 0..40 {
        value = serde_json::json!({"arrayValue": {"values": [value]}});
    }
    let t = now_ns() - 60 * SECOND;
    let body = serde_json::json!({"resourceMetrics": [{
        "resource": {"attributes": [{"key": "service.name", "value": value}]},
        "scopeMetrics": [{"metrics": [{"name": "calls", "sum": {
            "aggregationTemporality": 1, "isMonotonic": true,
            "dataPoints": [{"startTimeUnixNano": t.to_string(),
                "timeUnixNano": (t + SECOND).to_string(), "asInt": "1"}]}}]}]}]});
    let (status, _, reply) = s.post_otlp("application/json", &[], body.to_string().as_bytes());
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&reply));
    assert!(
        String::from_utf8_lossy(&reply).contains("nested too deep"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    assert!(!s.scrape().contains("calls"), "nothing applied");
}

#[test]
fn a_clock_in_2100_is_refused_and_does_not_poison_its_stream() {
    let s = Spanagg::start("limits:\n  max_future_skew: 1m\n");
    let t = now_ns() - 60 * SECOND;
    let year_2100 = 4_102_444_800 * SECOND;
    let mut poisoned = cart_delta("a", 7, [7, 0, 0, 0, 0], 7.0, t);
    for m in poisoned.resource_metrics[0].scope_metrics[0]
        .metrics
        .iter_mut()
    {
        match m.data.as_mut() {
            Some(Data::Sum(x)) => x.data_points[0].time_unix_nano = year_2100,
            Some(Data::Histogram(h)) => h.data_points[0].time_unix_nano = year_2100,
            _ => {}
        }
    }
    let (status, _, body) = s.post_otlp("application/x-protobuf", &[], &poisoned.encode_to_vec());
    assert_eq!(status, 200);
    let reply = export_response(&body);
    assert_eq!(reply.partial_success.unwrap().rejected_data_points, 2);
    // The stream's next ordinary delta is applied, not refused as too late.
    s.post_ok(&cart_delta("a", 2, [2, 0, 0, 0, 0], 2.0, t + SECOND).encode_to_vec());
    let scrape = s.scrape();
    assert!(
        scrape
            .lines()
            .any(|l| l.starts_with("traces_span_metrics_calls_total{") && l.ends_with(" 2")),
        "{scrape}"
    );
    assert_eq!(
        s.internal("spanagg_points_rejected_total{reason=\"future\"}"),
        2.0
    );
    assert_eq!(
        s.internal("spanagg_points_total{outcome=\"too_late\"}"),
        0.0
    );
}

/// A request of `n` empty number data points: 2 bytes each on the wire, ~100 decoded.
fn empty_points(n: usize) -> Vec<u8> {
    fn len(n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        prost::encoding::encode_varint(n as u64, &mut out);
        out
    }
    let sum = [0x0a, 0x00].repeat(n);
    let sum = [&[0x3a][..], &len(sum.len()), &sum].concat();
    let metric = [&[0x0a, 0x01, b'm'][..], &sum].concat(); // name "m", sum
    let scope = [&[0x12][..], &len(metric.len()), &metric].concat();
    let rm = [&[0x12][..], &len(scope.len()), &scope].concat();
    [&[0x0a][..], &len(rm.len()), &rm].concat()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_request_of_millions_of_empty_points_is_refused_before_decoding() {
    let s = Spanagg::start("");
    let body = empty_points(4_000_000);
    let gz = gzip(&body);
    assert!(
        gz.len() < 64 << 10,
        "7.6 MiB of protobuf in {} bytes of gzip",
        gz.len()
    );
    let rss_before = s.peak_rss();
    let (status, _, reply) = s.post_otlp(
        "application/x-protobuf",
        &[("Content-Encoding", "gzip")],
        &gz,
    );
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&reply));
    assert!(String::from_utf8_lossy(&reply).contains("max_points_per_request"));
    // The same as gRPC (gzip, as the Collector sends it): RESOURCE_EXHAUSTED, not retried.
    let mut client = opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient::connect(format!("http://{}", s.grpc))
        .await
        .unwrap()
        .send_compressed(tonic::codec::CompressionEncoding::Gzip)
        .max_encoding_message_size(64 << 20);
    let req = ExportMetricsServiceRequest::decode(&body[..]).unwrap();
    let err = client.export(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    let grew = s.peak_rss().saturating_sub(rss_before);
    assert!(grew < 100 << 20, "peak RSS grew by {} MiB", grew >> 20);
    assert_eq!(
        s.internal("spanagg_requests_total{protocol=\"http_protobuf\",outcome=\"too_large\"}"),
        1.0
    );
    // A request within the limits still goes through.
    s.post_ok(&cart_delta("a", 1, [1, 0, 0, 0, 0], 1.0, now_ns() - 60 * SECOND).encode_to_vec());
}

#[test]
fn a_request_costlier_than_the_whole_decode_budget_is_refused_for_good() {
    let s =
        Spanagg::start("limits:\n  max_decode_memory: 16MiB\n  max_points_per_request: 1000000\n");
    // 300,000 empty points: 600 KB on the wire, ~30 MiB decoded.
    let (status, _, reply) = s.post_otlp("application/x-protobuf", &[], &empty_points(300_000));
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&reply));
    assert!(String::from_utf8_lossy(&reply).contains("max_decode_memory"));
    // 50,000 fit, and are each refused as what they are (no value).
    let (status, _, _) = s.post_otlp("application/x-protobuf", &[], &empty_points(50_000));
    assert_eq!(status, 200);
    assert_eq!(
        s.internal("spanagg_decode_memory_in_use_bytes"),
        0.0,
        "returned"
    );
}

#[test]
fn invalid_utf8_in_one_attribute_costs_nothing_and_survives_a_restart() {
    let s = Spanagg::start("");
    let t = now_ns() - 60 * SECOND;
    let req = spanmetrics(
        "checkout",
        "a",
        &[
            route("GET /MARKER", 2, [2, 0, 0, 0, 0], 2.0),
            route("GET /fine", 3, [3, 0, 0, 0, 0], 3.0),
        ],
        t,
        t + SECOND,
        opentelemetry_proto::tonic::metrics::v1::AggregationTemporality::Delta,
    );
    let mut body = req.encode_to_vec();
    // Both metrics carry the marker: each becomes invalid UTF-8 on the wire.
    let mut patched = 0;
    while let Some(at) = body.windows(6).position(|w| w == b"MARKER") {
        body[at..at + 6].copy_from_slice(b"\xffcart\xfe");
        patched += 1;
    }
    assert_eq!(patched, 2);
    for gzipped in [false, true] {
        let (status, _, reply) = if gzipped {
            s.post_otlp(
                "application/x-protobuf",
                &[("Content-Encoding", "gzip")],
                &gzip(&body),
            )
        } else {
            s.post_otlp("application/x-protobuf", &[], &body)
        };
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&reply));
    }
    let scrape = s.scrape();
    let calls = |span: &str| {
        scrape
            .lines()
            .find(|l| {
                l.starts_with("traces_span_metrics_calls_total{")
                    && l.contains(&format!("span_name=\"{span}\""))
            })
            .map(|l| l.rsplit_once(' ').unwrap().1.to_owned())
    };
    assert_eq!(
        calls("GET /\u{FFFD}cart\u{FFFD}").as_deref(),
        Some("2"),
        "the repaired series, applied once: {scrape}"
    );
    assert_eq!(calls("GET /fine").as_deref(), Some("3"));
    assert_eq!(s.internal("spanagg_invalid_utf8_strings_total"), 4.0);
    // The WAL holds the repaired request: a restart replays it.
    let dir = s.kill9();
    let s = Spanagg::start_in(dir, "");
    assert_eq!(s.scrape(), scrape);
}

#[test]
fn scattered_intervals_hold_a_stream_to_16_holes_and_never_count_twice() {
    let s = Spanagg::start("");
    let t = now_ns() - 60 * SECOND;
    // One stream, a thousand one-nanosecond deltas of one call each, a hole after every one.
    let mut req = cart_delta("a", 1, [1, 0, 0, 0, 0], 1.0, t);
    let metrics = &mut req.resource_metrics[0].scope_metrics[0].metrics;
    metrics.truncate(1);
    let Some(Data::Sum(calls)) = metrics[0].data.as_mut() else {
        panic!("the calls counter comes first")
    };
    let one = calls.data_points[0].clone();
    calls.data_points = (0..1000u64)
        .map(|i| {
            let mut p = one.clone();
            p.start_time_unix_nano = t + 2 * i;
            p.time_unix_nano = t + 2 * i + 1;
            p
        })
        .collect();
    s.post_ok(&req.encode_to_vec());
    assert_eq!(
        s.internal("spanagg_points_total{outcome=\"applied_after_gap\"}"),
        999.0
    );
    // 999 holes, 16 kept: the windows publish after the batch.
    assert_eq!(
        s.internal_reaching("spanagg_delta_holes_given_up_total", 983.0),
        983.0
    );
    // A late delta for a hole given up is dropped; one for a hole still held is applied.
    let late = |start: u64| {
        let mut r = req.clone();
        let Some(Data::Sum(c)) = r.resource_metrics[0].scope_metrics[0].metrics[0]
            .data
            .as_mut()
        else {
            unreachable!()
        };
        c.data_points.truncate(1);
        c.data_points[0].start_time_unix_nano = start;
        c.data_points[0].time_unix_nano = start + 1;
        r.encode_to_vec()
    };
    s.post_ok(&late(t + 1));
    s.post_ok(&late(t + 1997));
    assert_eq!(
        s.internal("spanagg_points_total{outcome=\"duplicate\"}"),
        1.0
    );
    assert_eq!(
        s.internal("spanagg_points_total{outcome=\"applied_late\"}"),
        1.0
    );
    let scrape = s.scrape();
    assert!(
        scrape
            .lines()
            .any(|l| l.starts_with("traces_span_metrics_calls_total{") && l.ends_with(" 1001")),
        "{scrape}"
    );
}
