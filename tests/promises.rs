//! Promises the README makes that no other test held the binary to: a gzip-compressed gRPC
//! export (the Collector's default) is applied and replayed from the WAL after `kill -9`; a
//! delta older than `late_delta_window` behind its stream is refused in a partial success and
//! counted, by the configured window; a series' created time is the earliest start of the
//! deltas that built it, whatever order they came in; SIGTERM waits for a request in flight
//! and keeps its data; without configured bounds the first layout holds, a finer one folds
//! into it exactly and an incompatible one is refused per point.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse;
use prost::Message;

const SECOND: u64 = 1_000_000_000;
const CALLS: &str = "traces_span_metrics_calls_total{service_name=\"checkout\",span_kind=\"SPAN_KIND_SERVER\",span_name=\"GET /cart\",status_code=\"STATUS_CODE_UNSET\"}";
const CREATED: &str = "traces_span_metrics_calls_created{service_name=\"checkout\",span_kind=\"SPAN_KIND_SERVER\",span_name=\"GET /cart\",status_code=\"STATUS_CODE_UNSET\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_grpc_export_is_applied_and_replayed_from_the_wal() {
    let s = Spanagg::start("");
    let mut client = MetricsServiceClient::connect(format!("http://{}", s.grpc))
        .await
        .unwrap()
        .send_compressed(tonic::codec::CompressionEncoding::Gzip);
    let t = now_ns() - 10 * SECOND;
    for (pod, calls) in [("a", 3), ("b", 4)] {
        let reply = client
            .export(cart_delta(pod, calls, [calls, 0, 0, 0, 0], 1.0, t))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.partial_success, None, "{reply:?}");
    }
    let served = s.scrape();
    assert_eq!(sample_value(&served, CALLS), Some(7.0), "{served}");
    // Nothing but the WAL holds them: no checkpoint was written yet.
    let s = Spanagg::start_in(s.kill9(), "");
    assert_eq!(
        s.scrape(),
        served,
        "the gRPC requests replayed from the log"
    );
    assert!(
        s.internal("spanagg_wal_replayed_records_total") >= 2.0,
        "replayed, not restored from elsewhere"
    );
    s.stop();
}

fn export(s: &Spanagg, body: &[u8]) -> ExportMetricsServiceResponse {
    let (status, _, reply) = s.post_otlp("application/x-protobuf", &[], body);
    assert_eq!(status, 200);
    ExportMetricsServiceResponse::decode(&reply[..]).unwrap()
}

#[test]
fn a_delta_older_than_the_configured_late_window_is_refused_and_counted() {
    let s = Spanagg::start("late_delta_window: 1m\n");
    let now = now_ns();
    let delta = |calls: u64, start: u64| cart_delta("a", calls, [calls, 0, 0, 0, 0], 1.0, start);
    export(&s, &delta(1, now - 2 * SECOND).encode_to_vec());
    // 30 s behind the stream's newest point: within the window, applied late.
    let late = export(&s, &delta(2, now - 30 * SECOND).encode_to_vec());
    assert_eq!(late.partial_success, None, "{late:?}");
    // 3 minutes behind: outside the configured minute (inside the default ten).
    let reply = export(&s, &delta(4, now - 180 * SECOND).encode_to_vec());
    let partial = reply.partial_success.unwrap();
    assert_eq!(
        partial.rejected_data_points, 2,
        "the counter and the histogram"
    );
    assert!(
        partial.error_message.contains("too_late"),
        "{}",
        partial.error_message
    );
    assert_eq!(
        s.internal("spanagg_points_total{outcome=\"too_late\"}"),
        2.0
    );
    assert_eq!(
        s.internal("spanagg_points_total{outcome=\"applied_late\"}"),
        2.0
    );
    assert_eq!(sample_value(&s.scrape(), CALLS), Some(3.0));
    s.stop();
}

#[test]
fn created_is_the_earliest_start_of_the_deltas_whatever_their_order() {
    let s = Spanagg::start("");
    let t = (now_ns() - 60 * SECOND) / SECOND * SECOND;
    // The later interval first, from one pod; then an earlier one from another pod.
    s.post_ok(&cart_delta("a", 1, [1, 0, 0, 0, 0], 1.0, t + 20 * SECOND).encode_to_vec());
    let created = || sample_value(&s.openmetrics(), CREATED).unwrap();
    assert_eq!(created(), (t / SECOND + 20) as f64);
    s.post_ok(&cart_delta("b", 1, [1, 0, 0, 0, 0], 1.0, t).encode_to_vec());
    assert_eq!(created(), (t / SECOND) as f64, "the earliest start");
    // A later one changes nothing.
    s.post_ok(&cart_delta("c", 1, [1, 0, 0, 0, 0], 1.0, t + 40 * SECOND).encode_to_vec());
    assert_eq!(created(), (t / SECOND) as f64);
    s.stop();
}

#[test]
fn sigterm_waits_for_a_request_in_flight_and_its_data_survives_the_stop() {
    use std::io::{Read, Write};
    let s = Spanagg::start("");
    let body = cart_delta("a", 4, [4, 0, 0, 0, 0], 1.0, now_ns() - 10 * SECOND).encode_to_vec();
    let mut c = std::net::TcpStream::connect(s.otlp_http).unwrap();
    let head = format!(
        "POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    c.write_all(head.as_bytes()).unwrap();
    c.write_all(&body[..body.len() / 2]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    // The stop begins while the body is half sent...
    let term = std::process::Command::new("kill")
        .args(["-TERM", &s.pid().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    std::thread::sleep(std::time::Duration::from_millis(300));
    // ...and waits for it: the export is acknowledged, and the final checkpoint holds it.
    c.write_all(&body[body.len() / 2..]).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut reply = [0u8; 12];
    c.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"HTTP/1.1 200");
    drop(c);
    let s = Spanagg::start_in(s.stop_keep(), "");
    assert_eq!(sample_value(&s.scrape(), CALLS), Some(4.0));
    s.stop();
}

#[test]
fn without_configured_bounds_the_first_layout_holds_finer_ones_fold_and_others_are_refused() {
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;
    let s = Spanagg::start("");
    let t0 = now_ns() - 60 * SECOND;
    // Pod a sets the series' layout: BOUNDS = [2, 10, 100, 1000].
    s.post_ok(&cart_delta("a", 5, [1, 1, 1, 1, 1], 5.0, t0).encode_to_vec());
    let with_bounds = |pod: &str, bounds: &[f64], counts: Vec<u64>| {
        let mut req = cart_delta(pod, 1, [1, 0, 0, 0, 0], 1.0, t0);
        let metric = &mut req.resource_metrics[0].scope_metrics[0].metrics[1];
        let Some(Data::Histogram(h)) = &mut metric.data else {
            panic!("cart_delta's second metric is its histogram")
        };
        h.data_points[0].count = counts.iter().sum();
        h.data_points[0].explicit_bounds = bounds.to_vec();
        h.data_points[0].bucket_counts = counts;
        req.encode_to_vec()
    };
    // Pod b's finer layout holds every bound of a's: its buckets fold exactly.
    let finer = [1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0];
    let reply = export(
        &s,
        &with_bounds("b", &finer, vec![1, 1, 1, 1, 1, 1, 1, 1, 1]),
    );
    assert_eq!(reply.partial_success, None, "{reply:?}");
    // Pod c's layout lacks 1000: it cannot fold, and is refused per point.
    let reply = export(
        &s,
        &with_bounds("c", &[2.0, 10.0, 100.0, 500.0], vec![1; 5]),
    );
    let partial = reply.partial_success.unwrap();
    assert_eq!(
        partial.rejected_data_points, 1,
        "the histogram, not the counter"
    );
    assert!(partial.error_message.contains("layout_mismatch"));
    assert_eq!(
        s.internal("spanagg_points_total{outcome=\"layout_mismatch\"}"),
        1.0
    );
    let text = s.scrape();
    let bucket = |le: &str| {
        sample_value(&text, &format!("traces_span_metrics_duration_milliseconds_bucket{{service_name=\"checkout\",span_kind=\"SPAN_KIND_SERVER\",span_name=\"GET /cart\",status_code=\"STATUS_CODE_UNSET\",le=\"{le}\"}}"))
    };
    // a: 1 per bucket; b folded: ≤2 gets 2, ≤10 gets 2, ≤100 gets 2, ≤1000 gets 2, +Inf 1.
    let got = ["2", "10", "100", "1000", "+Inf"].map(bucket);
    assert_eq!(got, [3.0, 6.0, 9.0, 12.0, 14.0].map(Some), "{text}");
    s.stop();
}

#[test]
fn a_counter_and_a_histogram_sharing_a_name_and_labels_survive_a_restart() {
    let s = Spanagg::start("");
    let mut req = cart_delta("a", 2, [2, 0, 0, 0, 0], 1.0, now_ns() - 10 * SECOND);
    for m in &mut req.resource_metrics[0].scope_metrics[0].metrics {
        m.name = "shared".into();
        m.unit = String::new();
    }
    s.post_ok(&req.encode_to_vec());
    let served = s.scrape();
    assert!(served.contains("shared"), "{served}");
    // Two families under one name (the scrape serves one and counts the other): the clean
    // stop's checkpoint holds both, and the restart takes it as it is.
    let s = Spanagg::start_in(s.stop_keep(), "");
    assert_eq!(s.internal("spanagg_checkpoints_set_aside_total"), 0.0);
    assert_eq!(s.scrape(), served);
    s.stop();
}
