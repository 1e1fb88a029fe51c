//! What one stream's numbers do when its sender is unlucky, against the real binary: delayed
//! cumulative retries and restarts with unknown starts, a stream that returns after expiring,
//! float sums that would pass f64::MAX, a second writer under the same identity, and a pod that
//! goes away (its streams expire, the series goes on).

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use prost::Message;

const SECOND: u64 = 1_000_000_000;

/// The calls counter of checkout's `GET /cart` in a scrape.
fn cart_calls(s: &Spanagg) -> Option<f64> {
    sample_value(
        &s.scrape(),
        "traces_span_metrics_calls_total{service_name=\"checkout\",span_kind=\"SPAN_KIND_SERVER\",span_name=\"GET /cart\",status_code=\"STATUS_CODE_UNSET\"}",
    )
}

fn cumulative(pod: &str, start: u64, end: u64, calls: u64) -> Vec<u8> {
    spanmetrics(
        "checkout",
        pod,
        &[route("GET /cart", calls, [calls, 0, 0, 0, 0], calls as f64)],
        start,
        end,
        opentelemetry_proto::tonic::metrics::v1::AggregationTemporality::Cumulative,
    )
    .encode_to_vec()
}

#[test]
fn a_delayed_cumulative_retry_with_an_older_start_is_stale_not_a_reset() {
    let s = Spanagg::start("");
    let now = now_ns();
    let at = |secs_ago: u64| now - secs_ago * SECOND;
    // S1 began before spanagg did: only a baseline.
    s.post_ok(&cumulative("a", at(100), at(90), 50));
    // Restarted at S2: its 5 count.
    s.post_ok(&cumulative("a", at(80), at(70), 5));
    // A delayed retry from before the restart: stale.
    s.post_ok(&cumulative("a", at(100), at(85), 60));
    // The stream goes on from S2: 3 more.
    s.post_ok(&cumulative("a", at(80), at(60), 8));
    // An end not after the last one: stale.
    s.post_ok(&cumulative("a", at(80), at(60), 9));
    assert_eq!(cart_calls(&s), Some(8.0));
    assert_eq!(
        s.internal("spanagg_points_total{outcome=\"cumulative_stale\"}"),
        4.0,
        "two stale points per request (calls and duration)"
    );
    // A restart whose start is unknown (start == time) contributes nothing, then counts on.
    s.post_ok(&cumulative("a", at(50), at(50), 4));
    s.post_ok(&cumulative("a", at(50), at(40), 6));
    assert_eq!(cart_calls(&s), Some(10.0));
}

#[test]
fn a_cumulative_stream_that_returns_after_expiring_is_baselined() {
    let s = Spanagg::start("series_ttl: 2s\n");
    let start = now_ns();
    s.post_ok(&cumulative("a", start, start + SECOND, 10));
    // Pod b keeps the series alive while a's stream expires.
    let mut t = now_ns() - SECOND;
    let until = std::time::Instant::now() + std::time::Duration::from_millis(4500);
    let mut b_calls = 0;
    while std::time::Instant::now() < until {
        s.post_ok(&cart_delta("b", 1, [1, 0, 0, 0, 0], 1.0, t).encode_to_vec());
        t += SECOND;
        b_calls += 1;
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    // a returns with the same start: its lifetime was counted already.
    s.post_ok(&cumulative("a", start, now_ns(), 12));
    assert_eq!(cart_calls(&s), Some((10 + b_calls) as f64));
}

#[test]
fn finite_values_that_add_up_past_f64_max_saturate_instead_of_serving_inf() {
    let s = Spanagg::start("");
    let t = now_ns() - 60 * SECOND;
    for i in 0..3 {
        let mut req = cart_delta("a", 1, [1, 0, 0, 0, 0], 1.7e308, t + i * SECOND);
        if let Some(Data::Sum(x)) = req.resource_metrics[0].scope_metrics[0].metrics[0]
            .data
            .as_mut()
        {
            x.data_points[0].value = Some(
                opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsDouble(
                    1.7e308,
                ),
            );
        }
        s.post_ok(&req.encode_to_vec());
    }
    let scrape = s.scrape();
    assert!(
        !scrape.contains("Inf\n") || !scrape.contains("_total{"),
        "{scrape}"
    );
    for line in scrape
        .lines()
        .filter(|l| l.contains("_total{") || l.contains("_sum{"))
    {
        let v: f64 = line.rsplit_once(' ').unwrap().1.parse().unwrap();
        assert!(v.is_finite() && v > 1e308, "{line}");
    }
}

#[test]
fn a_second_writer_with_the_same_identity_is_a_conflict_not_a_retry() {
    let s = Spanagg::start("");
    let t = now_ns() - 60 * SECOND;
    // Two sidecars whose resources carry only service.name: one identity, two writers.
    let only_service = |calls: u64| {
        let mut req = cart_delta("x", calls, [calls, 0, 0, 0, 0], calls as f64, t);
        let rm = &mut req.resource_metrics[0];
        rm.resource.as_mut().unwrap().attributes = vec![kv("service.name", "checkout")];
        for m in rm.scope_metrics[0].metrics.iter_mut() {
            let strip = |a: &mut Vec<KeyValue>| a.retain(|kv| kv.key != "collector.instance.id");
            match m.data.as_mut() {
                Some(Data::Sum(x)) => x
                    .data_points
                    .iter_mut()
                    .for_each(|p| strip(&mut p.attributes)),
                Some(Data::Histogram(h)) => h
                    .data_points
                    .iter_mut()
                    .for_each(|p| strip(&mut p.attributes)),
                _ => {}
            }
        }
        req.encode_to_vec()
    };
    s.post_ok(&only_service(5));
    let (status, _, body) = s.post_otlp("application/x-protobuf", &[], &only_service(7));
    assert_eq!(status, 200);
    let reply = export_response(&body);
    let partial = reply.partial_success.unwrap();
    assert_eq!(partial.rejected_data_points, 2);
    assert!(
        partial.error_message.contains("(conflict)")
            && partial.error_message.contains("unique identity"),
        "{}",
        partial.error_message
    );
    // A true retry of the first is a duplicate, quietly.
    let (_, _, body) = s.post_otlp("application/x-protobuf", &[], &only_service(5));
    let reply = export_response(&body);
    assert!(reply.partial_success.is_none(), "{reply:?}");
    assert_eq!(cart_calls(&s), Some(5.0));
    assert_eq!(
        s.internal("spanagg_points_total{outcome=\"conflict\"}"),
        2.0
    );
    assert_eq!(
        s.internal("spanagg_points_total{outcome=\"duplicate\"}"),
        2.0
    );
    assert_eq!(
        s.internal("spanagg_points_rejected_total{reason=\"conflict\"}"),
        2.0
    );
}

#[test]
fn a_pod_that_stops_sending_has_its_streams_expire_while_the_series_goes_on() {
    let s = Spanagg::start("series_ttl: 1s\n");
    let base = now_ns() - SECOND;
    let step = 300_000_000;
    let delta = |pod: &str, k: u64| {
        let start = base + k * step;
        spanmetrics(
            "checkout",
            pod,
            &[route("GET /cart", 1, [1, 0, 0, 0, 0], 1.0)],
            start,
            start + step,
            opentelemetry_proto::tonic::metrics::v1::AggregationTemporality::Delta,
        )
        .encode_to_vec()
    };
    s.post_ok(&delta("a", 0));
    s.post_ok(&delta("b", 0));
    assert_eq!(
        s.internal("spanagg_source_streams"),
        4.0,
        "2 pods × 2 metrics"
    );
    // Pod a goes away; b keeps sending, for three TTLs.
    for k in 1..=10 {
        std::thread::sleep(std::time::Duration::from_millis(300));
        s.post_ok(&delta("b", k));
    }
    assert_eq!(
        s.internal("spanagg_source_streams"),
        2.0,
        "a's streams expired"
    );
    assert!(s.internal("spanagg_source_streams_evicted_total") >= 2.0);
    assert_eq!(
        cart_calls(&s),
        Some(12.0),
        "the series keeps a's calls and goes on"
    );
    s.stop();
}
