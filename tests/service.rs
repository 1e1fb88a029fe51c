//! End-to-end behaviour of the real binary over OTLP/gRPC and OTLP/HTTP: the exact cross-pod
//! merge, exactly-once under retries, partial success, refusals, and clean shutdown.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Gauge, Metric, NumberDataPoint,
};
use prost::Message;

const DELTA: AggregationTemporality = AggregationTemporality::Delta;
const CUMULATIVE: AggregationTemporality = AggregationTemporality::Cumulative;

async fn grpc_export(
    s: &Spanagg,
    req: ExportMetricsServiceRequest,
) -> Result<ExportMetricsServiceResponse, tonic::Status> {
    let mut client = MetricsServiceClient::connect(format!("http://{}", s.grpc))
        .await
        .unwrap();
    client.export(req).await.map(|r| r.into_inner())
}

fn http_export(
    s: &Spanagg,
    req: &ExportMetricsServiceRequest,
) -> (u16, ExportMetricsServiceResponse) {
    let (status, _, body) = s.post_otlp("application/x-protobuf", &[], &req.encode_to_vec());
    (
        status,
        ExportMetricsServiceResponse::decode(&body[..]).unwrap_or_default(),
    )
}

const CALLS: &str = "traces_span_metrics_calls_total{service_name=\"checkout\",span_kind=\"SPAN_KIND_SERVER\",span_name=\"GET /cart\",status_code=\"STATUS_CODE_UNSET\"}";
const COUNT: &str = "traces_span_metrics_duration_milliseconds_count{service_name=\"checkout\",span_kind=\"SPAN_KIND_SERVER\",span_name=\"GET /cart\",status_code=\"STATUS_CODE_UNSET\"}";
const INF: &str = "traces_span_metrics_duration_milliseconds_bucket{service_name=\"checkout\",span_kind=\"SPAN_KIND_SERVER\",span_name=\"GET /cart\",status_code=\"STATUS_CODE_UNSET\",le=\"+Inf\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deltas_from_many_pods_merge_exactly_and_retries_count_once() {
    let s = Spanagg::start("");
    let t0 = now_ns() - 60_000_000_000;
    let step = 10_000_000_000;
    // 3 pods over gRPC, 3 over HTTP, 4 intervals each.
    for pod in 0..6u64 {
        for i in 0..4u64 {
            let req = spanmetrics(
                "checkout",
                &format!("pod-{pod}"),
                &[route(
                    "GET /cart",
                    pod + i,
                    [1, 2, 0, 0, pod],
                    10.0 + pod as f64,
                )],
                t0 + i * step,
                t0 + (i + 1) * step,
                DELTA,
            );
            if pod < 3 {
                let r = grpc_export(&s, req).await.unwrap();
                assert!(r.partial_success.is_none(), "{r:?}");
            } else {
                let (status, r) = http_export(&s, &req);
                assert_eq!(status, 200);
                assert!(r.partial_success.is_none(), "{r:?}");
            }
        }
    }
    // Σ over pods 0..6 and i 0..4 of (pod + i) = 4*15 + 6*6 = 96
    let text = s.scrape();
    assert_eq!(sample_value(&text, CALLS), Some(96.0), "{text}");
    // buckets per delta: 3 + pod → Σ 4*(18 + 15) = 132
    assert_eq!(sample_value(&text, COUNT), Some(132.0));
    assert_eq!(sample_value(&text, INF), Some(132.0));
    assert!(
        !text.contains("pod-"),
        "per-instance labels are dropped: {text}"
    );

    // The same deltas again (a client retry) over both protocols: nothing changes.
    for pod in [0u64, 4] {
        let req = spanmetrics(
            "checkout",
            &format!("pod-{pod}"),
            &[route("GET /cart", pod, [1, 2, 0, 0, pod], 10.0)],
            t0,
            t0 + step,
            DELTA,
        );
        if pod == 0 {
            grpc_export(&s, req).await.unwrap();
        } else {
            assert_eq!(http_export(&s, &req).0, 200);
        }
    }
    assert_eq!(s.scrape(), text, "retries changed the output");
    assert_eq!(
        s.internal("spanagg_points_total{outcome=\"duplicate\"}"),
        4.0
    );
    assert_eq!(s.stop().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_delta_filling_a_hole_is_applied_and_a_gap_is_counted() {
    let s = Spanagg::start("");
    let t0 = now_ns() - 60_000_000_000;
    let step = 10_000_000_000;
    let send = |i: u64, calls: u64| {
        spanmetrics(
            "checkout",
            "p",
            &[route("GET /cart", calls, [1, 0, 0, 0, 0], 1.0)],
            t0 + i * step,
            t0 + (i + 1) * step,
            DELTA,
        )
    };
    grpc_export(&s, send(0, 1)).await.unwrap();
    grpc_export(&s, send(2, 100)).await.unwrap(); // gap: interval 1 not yet here
    grpc_export(&s, send(1, 10)).await.unwrap(); // late, fills the hole
    grpc_export(&s, send(1, 10)).await.unwrap(); // retry of the late one
    assert_eq!(sample_value(&s.scrape(), CALLS), Some(111.0));
    assert_eq!(
        s.internal("spanagg_points_total{outcome=\"applied_after_gap\"}"),
        2.0
    );
    assert_eq!(
        s.internal("spanagg_points_total{outcome=\"applied_late\"}"),
        2.0
    );
    assert_eq!(
        s.internal("spanagg_points_total{outcome=\"duplicate\"}"),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_and_gzip_bodies_are_accepted() {
    let s = Spanagg::start("");
    let t0 = now_ns() - 60_000_000_000;
    let req = cart_delta("p1", 7, [0, 1, 1, 0, 0], 20.0, t0);
    let json = serde_json::to_vec(&req).unwrap();
    let text = String::from_utf8_lossy(&json);
    assert!(
        text.contains("\"timeUnixNano\""),
        "camelCase OTLP/JSON: {text}"
    );
    let (status, headers, body) = s.post_otlp(
        "application/json",
        &[("Content-Encoding", "gzip")],
        &gzip(&json),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(headers
        .iter()
        .any(|(k, v)| k == "content-type" && v == "application/json"));
    // A hand-written OTLP/JSON body: 64-bit integers as strings, enum as a number.
    let hand = format!(
        r#"{{"resourceMetrics":[{{"resource":{{"attributes":[{{"key":"service.name","value":{{"stringValue":"checkout"}}}}]}},
        "scopeMetrics":[{{"metrics":[{{"name":"traces.span.metrics.calls","sum":{{"aggregationTemporality":1,"isMonotonic":true,
        "dataPoints":[{{"attributes":[{{"key":"span.name","value":{{"stringValue":"GET /cart"}}}},
        {{"key":"span.kind","value":{{"stringValue":"SPAN_KIND_SERVER"}}}},{{"key":"status.code","value":{{"stringValue":"STATUS_CODE_UNSET"}}}}],
        "startTimeUnixNano":"{}","timeUnixNano":"{}","asInt":"5"}}]}}}}]}}]}}]}}"#,
        t0,
        t0 + 1_000_000_000
    );
    let (status, _, body) = s.post_otlp("application/json", &[], hand.as_bytes());
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(sample_value(&s.scrape(), CALLS), Some(12.0));
    assert_eq!(
        s.internal("spanagg_requests_total{protocol=\"http_json\",outcome=\"success\"}"),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_points_get_partial_success_and_the_rest_is_applied() {
    let s = Spanagg::start("");
    let t0 = now_ns() - 60_000_000_000;
    let mut req = cart_delta("p1", 3, [1, 0, 0, 0, 0], 1.0, t0);
    let metrics = &mut req.resource_metrics[0].scope_metrics[0].metrics;
    metrics.push(Metric {
        name: "queue.depth".into(),
        data: Some(Data::Gauge(Gauge {
            data_points: vec![NumberDataPoint::default(), NumberDataPoint::default()],
        })),
        ..Default::default()
    });
    // A histogram point whose count disagrees with its buckets.
    let mut bad = spanmetrics(
        "checkout",
        "p1",
        &[route("GET /bad", 1, [1, 0, 0, 0, 0], 1.0)],
        t0,
        t0 + 1_000_000_000,
        DELTA,
    );
    if let Some(Data::Histogram(h)) = &mut bad.resource_metrics[0].scope_metrics[0].metrics[1].data
    {
        h.data_points[0].count = 99;
    }
    metrics.push(bad.resource_metrics[0].scope_metrics[0].metrics[1].clone());
    let r = grpc_export(&s, req.clone()).await.unwrap();
    let ps = r.partial_success.unwrap();
    assert_eq!(ps.rejected_data_points, 3);
    assert!(
        ps.error_message.contains("gauges are not aggregated"),
        "{}",
        ps.error_message
    );
    assert!(
        ps.error_message.contains("count is not the sum"),
        "{}",
        ps.error_message
    );
    assert_eq!(sample_value(&s.scrape(), CALLS), Some(3.0));
    assert_eq!(
        s.internal("spanagg_points_rejected_total{reason=\"unsupported_gauge\"}"),
        2.0
    );
    assert_eq!(
        s.internal("spanagg_points_rejected_total{reason=\"count_mismatch\"}"),
        1.0
    );
    // Over HTTP the same partial success, and nothing added twice.
    let (status, r) = http_export(&s, &req);
    assert_eq!(status, 200);
    assert_eq!(r.partial_success.unwrap().rejected_data_points, 3);
    assert_eq!(sample_value(&s.scrape(), CALLS), Some(3.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_bodies_are_refused_counted_and_harmless() {
    let s = Spanagg::start("");
    let t0 = now_ns() - 60_000_000_000;
    let req = cart_delta("p1", 4, [1, 0, 0, 0, 0], 1.0, t0);
    assert_eq!(http_export(&s, &req).0, 200);
    let before = s.scrape();

    let (status, _, body) = s.post_otlp(
        "application/x-protobuf",
        &[],
        b"\xff\xff\xff\xffnot protobuf",
    );
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("undecodable protobuf"));
    let (status, _, body) = s.post_otlp("application/json", &[], b"{\"resourceMetrics\": 7}");
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("undecodable OTLP/JSON"));
    let (status, _, _) = s.post_otlp("text/plain", &[], b"hello");
    assert_eq!(status, 415);
    let (status, _, _) = s.post_otlp(
        "application/x-protobuf",
        &[("Content-Encoding", "gzip")],
        b"\x1f\x8bnot gzip",
    );
    assert_eq!(status, 400);

    // gRPC with a body that is not an ExportMetricsServiceRequest.
    let (status, headers, _) = raw_grpc(&s, None, b"\xff\xff\xff\xff".to_vec()).await;
    assert_eq!(status, 200);
    assert_eq!(
        grpc_status(&headers),
        Some(3),
        "INVALID_ARGUMENT: {headers:?}"
    );
    // gRPC with a corrupt and a truncated gzip message: the client's fault, not INTERNAL.
    for bad in [
        b"\x1f\x8bnot gzip".to_vec(),
        gzip(b"0123456789")[..12].to_vec(),
    ] {
        let (_, headers, _) = raw_grpc(&s, Some("gzip"), bad).await;
        assert_eq!(
            grpc_status(&headers),
            Some(3),
            "INVALID_ARGUMENT: {headers:?}"
        );
    }

    assert_eq!(s.scrape(), before, "held data unchanged");
    assert_eq!(
        s.internal(
            "spanagg_requests_total{protocol=\"http_protobuf\",outcome=\"invalid_argument\"}"
        ),
        3.0
    );
    assert_eq!(
        s.internal("spanagg_requests_total{protocol=\"http_json\",outcome=\"invalid_argument\"}"),
        1.0
    );
    assert_eq!(
        s.internal("spanagg_requests_total{protocol=\"grpc\",outcome=\"invalid_argument\"}"),
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_bombs_are_refused_on_both_protocols_without_expanding() {
    let s = Spanagg::start("max_request_bytes: 4MiB\n");
    let expanded = 1usize << 30; // 1 GiB of zeros in about 1 MiB of gzip
    let bomb = gzip_bomb(expanded);
    assert!(bomb.len() < 2 << 20);
    let rss_before = s.peak_rss();

    let (status, _, body) = s.post_otlp(
        "application/x-protobuf",
        &[("Content-Encoding", "gzip")],
        &bomb,
    );
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));
    let (status, headers, _) = raw_grpc(&s, Some("gzip"), bomb.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(
        grpc_status(&headers),
        Some(8),
        "RESOURCE_EXHAUSTED: {headers:?}"
    );
    // Uncompressed and over the limit: the same code.
    let (_, headers, _) = raw_grpc(&s, None, vec![0u8; 5 << 20]).await;
    assert_eq!(grpc_status(&headers), Some(8), "{headers:?}");

    let grew = s.peak_rss().saturating_sub(rss_before);
    assert!(
        grew < 128 << 20,
        "peak RSS grew by {grew} bytes for a {expanded}-byte bomb"
    );
    assert_eq!(
        s.internal("spanagg_requests_total{protocol=\"http_protobuf\",outcome=\"too_large\"}"),
        1.0
    );
    assert_eq!(
        s.internal("spanagg_requests_total{protocol=\"grpc\",outcome=\"too_large\"}"),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cumulative_input_is_converted_to_deltas_with_resets() {
    let s = Spanagg::start("");
    // A stream that began after spanagg started counts from its first point.
    let start = now_ns();
    let at = |secs: u64| start + secs * 1_000_000_000;
    let cum = |st: u64, end: u64, calls: u64| {
        spanmetrics(
            "checkout",
            "p1",
            &[route("GET /cart", calls, [calls, 0, 0, 0, 0], calls as f64)],
            st,
            end,
            CUMULATIVE,
        )
    };
    grpc_export(&s, cum(start, at(10), 5)).await.unwrap();
    grpc_export(&s, cum(start, at(20), 8)).await.unwrap();
    grpc_export(&s, cum(start, at(20), 8)).await.unwrap(); // retry: no change
    assert_eq!(sample_value(&s.scrape(), CALLS), Some(8.0));
    // The pod restarts: new start time, counting from 2.
    grpc_export(&s, cum(at(25), at(30), 2)).await.unwrap();
    assert_eq!(sample_value(&s.scrape(), CALLS), Some(10.0));
    assert_eq!(sample_value(&s.scrape(), COUNT), Some(10.0));
    // A stream that started before spanagg: only its growth counts.
    let old = start - 3_600_000_000_000;
    let other = |end: u64, calls: u64| {
        spanmetrics(
            "checkout",
            "p2",
            &[route("GET /cart", calls, [calls, 0, 0, 0, 0], 0.0)],
            old,
            end,
            CUMULATIVE,
        )
    };
    grpc_export(&s, other(at(10), 1000)).await.unwrap();
    grpc_export(&s, other(at(20), 1004)).await.unwrap();
    assert_eq!(sample_value(&s.scrape(), CALLS), Some(14.0));
    assert_eq!(
        s.internal("spanagg_points_total{outcome=\"cumulative_reset\"}"),
        2.0
    );
    assert_eq!(
        s.internal("spanagg_points_total{outcome=\"cumulative_baseline\"}"),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finer_buckets_fold_into_configured_bounds_and_others_are_rejected() {
    let s = Spanagg::start("histogram:\n  bounds:\n    traces.span.metrics.duration: [10, 1000]\n");
    let t0 = now_ns() - 60_000_000_000;
    // BOUNDS = [2, 10, 100, 1000] contains 10 and 1000: folds exactly.
    let req = cart_delta("p1", 1, [1, 2, 3, 4, 5], 10.0, t0);
    let r = grpc_export(&s, req).await.unwrap();
    assert!(r.partial_success.is_none(), "{r:?}");
    let text = s.scrape();
    let b = |le: &str| {
        sample_value(&text, &format!("traces_span_metrics_duration_milliseconds_bucket{{service_name=\"checkout\",span_kind=\"SPAN_KIND_SERVER\",span_name=\"GET /cart\",status_code=\"STATUS_CODE_UNSET\",le=\"{le}\"}}"))
    };
    assert_eq!(
        (b("10"), b("1000"), b("+Inf")),
        (Some(3.0), Some(10.0), Some(15.0)),
        "{text}"
    );
    // Bounds missing 1000 cannot fold exactly: rejected per point.
    let mut req = cart_delta("p2", 1, [1, 1, 1, 1, 1], 1.0, t0);
    if let Some(Data::Histogram(h)) = &mut req.resource_metrics[0].scope_metrics[0].metrics[1].data
    {
        h.data_points[0].explicit_bounds = vec![2.0, 10.0, 100.0, 500.0];
    }
    let r = grpc_export(&s, req).await.unwrap();
    let ps = r.partial_success.unwrap();
    assert_eq!(ps.rejected_data_points, 1);
    assert!(
        ps.error_message.contains("layout_mismatch"),
        "{}",
        ps.error_message
    );
    assert_eq!(
        s.internal("spanagg_points_rejected_total{reason=\"layout_mismatch\"}"),
        1.0
    );
    assert_eq!(sample_value(&s.scrape(), COUNT), Some(15.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_series_expire_and_return_from_zero_with_a_new_created_time() {
    let s = Spanagg::start("series_ttl: 1s\n");
    // Fresh data: with a 1s TTL, anything older is refused as a possible replay.
    let req = |calls: u64| {
        let end = now_ns();
        let req = spanmetrics(
            "checkout",
            "p1",
            &[route("GET /cart", calls, [1, 0, 0, 0, 0], 1.0)],
            end - 100_000_000,
            end,
            DELTA,
        );
        (req, end - 100_000_000)
    };
    grpc_export(&s, req(5).0).await.unwrap();
    assert_eq!(sample_value(&s.scrape(), CALLS), Some(5.0));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while sample_value(&s.scrape(), CALLS).is_some() {
        assert!(std::time::Instant::now() < deadline, "series never expired");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(s.internal("spanagg_series_evicted_total") >= 2.0);
    let (again, start) = req(2);
    grpc_export(&s, again).await.unwrap();
    let (_, headers, body) = http(
        s.http,
        "GET",
        "/metrics",
        &[("Accept", "application/openmetrics-text; version=1.0.0")],
        &[],
    );
    let text = String::from_utf8(body).unwrap();
    assert!(headers
        .iter()
        .any(|(k, v)| k == "content-type" && v.starts_with("application/openmetrics-text")));
    assert_eq!(sample_value(&text, CALLS), Some(2.0));
    let created = sample_value(&text, &CALLS.replace("_total{", "_created{")).unwrap();
    assert!((created - start as f64 / 1e9).abs() < 1e-3, "{text}");
    assert!(text.ends_with("# EOF\n"));
    // The returning series count their one source each: ids of expired series are never
    // confused with new ones.
    let (_, body) = s.get("/api/v1/cardinality");
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(r["totals"]["output_series"], 2, "{body}");
    assert_eq!(r["totals"]["source_streams"], 2, "{body}");
}

#[test]
fn a_bad_config_stops_the_start_naming_the_key_and_reason() {
    let dir = std::env::temp_dir().join(format!("spanagg-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        ("late_delta_window: soon\n", "late_delta_window"),
        (
            "histogram:\n  bounds:\n    m: [1, 1]\n",
            "histogram.bounds.m",
        ),
        ("shards: 0\n", "shards"),
        ("grpc_listn: 127.0.0.1:1\n", "grpc_listn"),
    ];
    for (yaml, key) in cases {
        let path = dir.join("bad.yaml");
        std::fs::write(&path, yaml).unwrap();
        let out = common::cli([
            std::ffi::OsStr::new("serve"),
            "--config".as_ref(),
            path.as_ref(),
        ]);
        assert!(!out.ok, "{yaml}");
        let err = out.stderr;
        assert!(err.contains(key), "{yaml}: {err}");
    }
    let out = common::cli(["--grpc-listen", "not-an-address"]);
    assert!(!out.ok);
    assert!(out.stderr.contains("--grpc-listen"));
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_fed_the_same_deltas_in_different_orders_serve_the_same_output() {
    let (a, b) = (Spanagg::start(""), Spanagg::start(""));
    let t0 = now_ns() - 120_000_000_000;
    let mut reqs = Vec::new();
    for pod in 0..4u64 {
        for i in 0..5u64 {
            reqs.push(spanmetrics(
                "checkout",
                &format!("pod-{pod}"),
                &[route(
                    "GET /cart",
                    pod * 10 + i,
                    [i, 1, 0, pod, 0],
                    1.5 * i as f64,
                )],
                t0 + i * 1_000_000_000,
                t0 + (i + 1) * 1_000_000_000,
                DELTA,
            ));
        }
    }
    for r in &reqs {
        grpc_export(&a, r.clone()).await.unwrap();
    }
    for r in reqs.iter().rev() {
        assert_eq!(http_export(&b, r).0, 200);
    }
    let om = |s: &Spanagg| {
        let (_, _, body) = http(
            s.http,
            "GET",
            "/metrics",
            &[("Accept", "application/openmetrics-text; version=1.0.0")],
            &[],
        );
        String::from_utf8(body).unwrap()
    };
    let (ta, tb) = (om(&a), om(&b));
    assert!(ta.contains("_created{"), "{ta}");
    assert_eq!(ta, tb, "created times and values are deterministic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_and_random_bodies_never_take_the_server_down() {
    let s = Spanagg::start("");
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("fuzz seed {seed} (rerun with FUZZ_SEED={seed})");
    let mut rng = fastrand::Rng::with_seed(seed);
    let t0 = now_ns() - 60_000_000_000;
    let valid = spanmetrics(
        "checkout",
        "p1",
        &[
            route("GET /cart", 3, [1, 2, 0, 0, 0], 1.0),
            route("GET /pay", 1, [0, 0, 1, 0, 0], 9.0),
        ],
        t0,
        t0 + 1_000_000_000,
        DELTA,
    )
    .encode_to_vec();
    let json =
        serde_json::to_vec(&ExportMetricsServiceRequest::decode(&valid[..]).unwrap()).unwrap();
    for i in 0..300 {
        let (base, ct) = if i % 3 == 0 {
            (&json, "application/json")
        } else {
            (&valid, "application/x-protobuf")
        };
        let mut body = base.clone();
        match rng.u8(..3) {
            0 => {
                for _ in 0..rng.usize(1..8) {
                    let at = rng.usize(..body.len());
                    body[at] = rng.u8(..);
                }
            }
            1 => body.truncate(rng.usize(..body.len())),
            _ => body = (0..rng.usize(..512)).map(|_| rng.u8(..)).collect(),
        }
        let (status, _, _) = s.post_otlp(ct, &[], &body);
        assert!(
            matches!(status, 200 | 400),
            "seed {seed} case {i}: status {status}"
        );
        if i % 10 == 0 {
            let req = ExportMetricsServiceRequest::decode(&body[..]);
            if let Ok(req) = req {
                // Whatever decodes must also be safe over gRPC: taken, or refused as invalid.
                if let Err(e) = grpc_export(&s, req).await {
                    assert_eq!(
                        e.code(),
                        tonic::Code::InvalidArgument,
                        "seed {seed} case {i}: {e}"
                    );
                }
            }
        }
    }
    assert_eq!(s.get("/-/healthy").0, 200, "seed {seed}");
    let text = s.scrape();
    check_scrape(&text, &Default::default());
    assert_eq!(s.stop().code(), Some(0), "seed {seed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scrape_is_gzipped_when_asked_and_says_what_it_is() {
    let s = Spanagg::start("");
    let t0 = now_ns() - 60_000_000_000;
    let req = cart_delta("p1", 2, [1, 1, 0, 0, 0], 3.0, t0);
    grpc_export(&s, req).await.unwrap();
    let plain = s.scrape();
    let (status, headers, body) = http(
        s.http,
        "GET",
        "/metrics",
        &[("Accept-Encoding", "gzip")],
        &[],
    );
    assert_eq!(status, 200);
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(header("content-encoding").as_deref(), Some("gzip"));
    assert_eq!(
        header("content-type").as_deref(),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let mut text = String::new();
    #[allow(clippy::disallowed_methods)] // our own response, not client input
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&body[..]), &mut text).unwrap();
    assert_eq!(text, plain);
    assert!(text.contains("# HELP traces_span_metrics_calls_total Number of calls"));
    assert!(text.contains("# TYPE traces_span_metrics_duration_milliseconds histogram"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_bounds_serve_fewer_buckets_exactly_against_a_reference() {
    let s = Spanagg::start(
        "histogram:\n  output_bounds:\n    traces.span.metrics.duration: [10, 1000]\n",
    );
    let seed = fastrand::u64(..);
    println!("seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let t0 = now_ns() - 60_000_000_000;
    // Input bounds [2, 10, 100, 1000]; output [10, 1000]: (-inf,10] = b0+b1, (10,1000] = b2+b3.
    let mut want = [0u64; 3];
    for pod in 0..5 {
        for i in 0..4u64 {
            let b: [u64; 5] = std::array::from_fn(|_| rng.u64(0..50));
            want[0] += b[0] + b[1];
            want[1] += b[2] + b[3];
            want[2] += b[4];
            let req = spanmetrics(
                "checkout",
                &format!("pod-{pod}"),
                &[route("GET /cart", 1, b, 1.0)],
                t0 + i * 1_000_000_000,
                t0 + (i + 1) * 1_000_000_000,
                DELTA,
            );
            assert!(grpc_export(&s, req)
                .await
                .unwrap()
                .partial_success
                .is_none());
        }
    }
    let text = s.scrape();
    let bucket = |le: &str| {
        sample_value(
            &text,
            &format!("traces_span_metrics_duration_milliseconds_bucket{{service_name=\"checkout\",span_kind=\"SPAN_KIND_SERVER\",span_name=\"GET /cart\",status_code=\"STATUS_CODE_UNSET\",le=\"{le}\"}}"),
        )
    };
    assert_eq!(
        bucket("2"),
        None,
        "only the output bounds are served: {text}"
    );
    assert_eq!(bucket("100"), None);
    assert_eq!(bucket("10"), Some(want[0] as f64), "seed {seed}");
    assert_eq!(
        bucket("1000"),
        Some((want[0] + want[1]) as f64),
        "seed {seed}"
    );
    assert_eq!(
        bucket("+Inf"),
        Some((want[0] + want[1] + want[2]) as f64),
        "seed {seed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cardinality_report_counts_a_known_workload_exactly() {
    let s = Spanagg::start("shards: 3\n");
    let t0 = now_ns() - 60_000_000_000;
    // checkout: 6 pods x 4 routes; cart: 2 pods x 10 routes. Two metrics per route.
    let spans: [&'static str; 10] = ["r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7", "r8", "r9"];
    for (service, pods, routes) in [("checkout", 6, 4), ("cart", 2, 10)] {
        for pod in 0..pods {
            let rs: Vec<Route> = spans[..routes]
                .iter()
                .map(|r| route(r, 1, [1, 0, 0, 0, 0], 1.0))
                .collect();
            let req = spanmetrics(
                service,
                &format!("{service}-{pod}"),
                &rs,
                t0,
                t0 + 1_000_000_000,
                DELTA,
            );
            grpc_export(&s, req).await.unwrap();
        }
    }
    let (status, body) = s.get("/api/v1/cardinality");
    assert_eq!(status, 200);
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(r["totals"]["output_series"], 2 * (4 + 10));
    assert_eq!(r["totals"]["source_streams"], 2 * (6 * 4 + 2 * 10));
    assert_eq!(r["totals"]["source_streams_tracked"], 2 * (6 * 4 + 2 * 10));
    let svc = |name: &str| {
        r["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["service"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(svc("checkout")["output_series"], 8);
    assert_eq!(svc("checkout")["source_streams"], 48);
    assert_eq!(svc("checkout")["reduction"], 6.0);
    assert_eq!(svc("cart")["reduction"], 2.0);
    assert_eq!(svc("cart")["span_names"], 10);
    assert_eq!(
        r["services"][0]["service"], "checkout",
        "most source streams first"
    );
    let label = |name: &str| {
        r["labels"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["label"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(label("span_name")["distinct_values"], 10);
    assert_eq!(label("service_name")["distinct_values"], 2);
    assert_eq!(
        r["labels"][0]["label"], "span_name",
        "most distinct values first"
    );
    let calls = r["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["metric"] == "traces_span_metrics_calls")
        .unwrap()
        .clone();
    assert_eq!(calls["output_series"], 14);
    assert_eq!(calls["otel_metric"], "traces.span.metrics.calls");

    let (_, body) = s.get("/api/v1/cardinality?service=cart&top=3");
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(r["totals"]["output_series"], 20);
    assert_eq!(r["services"].as_array().unwrap().len(), 1);
    assert_eq!(
        r["services"][0]["top_span_names"].as_array().unwrap().len(),
        3
    );
    // The OTel name, and the names as scraped, select the same series.
    for metric in [
        "traces.span.metrics.duration",
        "traces_span_metrics_duration_milliseconds_bucket",
    ] {
        let (_, body) = s.get(&format!("/api/v1/cardinality?metric={metric}"));
        let r: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(r["totals"]["output_series"], 14, "{metric}");
        assert_eq!(r["totals"]["source_streams"], 44, "{metric}");
    }

    // The CLI prints the same report as tables, or as JSON for scripts.
    let url = format!("http://{}", s.http);
    let cli = |extra: &[&str]| common::cli_ok(["cardinality", "--url", &url].iter().chain(extra));
    let table = cli(&["--top", "5"]);
    assert!(
        table.contains("output series 28   source streams 88"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("checkout") && l.contains("6.0x")),
        "{table}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&cli(&["--json", "--service", "cart"])).unwrap();
    assert_eq!(json["totals"]["output_series"], 20);
    let down = common::cli(["cardinality", "--url", "http://127.0.0.1:1"]);
    assert!(!down.ok);
    assert!(down.stderr.contains("cannot reach spanagg"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_metrics_with_one_prometheus_name_but_different_types_keep_the_scrape_valid() {
    let s = Spanagg::start("");
    let t0 = now_ns() - 60_000_000_000;
    let mut req = cart_delta("p1", 2, [1, 1, 0, 0, 0], 3.0, t0);
    // Rename the histogram so both translate to `traces_span_metrics_calls`.
    let metrics = &mut req.resource_metrics[0].scope_metrics[0].metrics;
    metrics[1].name = "traces.span.metrics.calls".into();
    metrics[1].unit = "".into();
    grpc_export(&s, req).await.unwrap();
    let text = s.scrape();
    check_scrape(&text, &Default::default());
    assert_eq!(
        text.matches("# TYPE traces_span_metrics_calls").count(),
        1,
        "{text}"
    );
    let internal = s.get("/internal/metrics").1;
    assert!(
        s.internal("spanagg_scrape_family_conflicts_total") >= 1.0,
        "{text}\n{internal}"
    );
}

#[test]
fn wrong_methods_get_a_405_that_says_what_it_is() {
    let s = Spanagg::start("");
    for (addr, method, path) in [
        (s.otlp_http, "GET", "/v1/metrics"),
        (s.http, "POST", "/metrics"),
        (s.http, "DELETE", "/api/v1/snapshot"),
    ] {
        let (status, headers, body) = http(addr, method, path, &[], b"");
        assert_eq!(status, 405, "{method} {path}");
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(
            header("content-type").as_deref(),
            Some("text/plain; charset=utf-8"),
            "{method} {path}: {headers:?}"
        );
        assert!(header("allow").is_some(), "{method} {path}: {headers:?}");
        assert_eq!(body, b"method not allowed\n");
    }
}
