//! The README's self-metric table and the live `/internal/metrics` name the same metrics, and
//! every metric an alert rule uses is shown moving when its event happens.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;

#[test]
fn readme_self_metric_table_matches_the_live_output() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme.split("## Self metrics").nth(1).unwrap();
    let documented: BTreeSet<String> = section
        .lines()
        .take_while(|l| !l.starts_with("## "))
        .filter_map(|l| l.strip_prefix("| `"))
        .map(|l| l.split(['`', '{']).next().unwrap().to_owned())
        .collect();

    let s = common::Spanagg::start("");
    let (status, text) = s.get("/internal/metrics");
    assert_eq!(status, 200);
    let live: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let mut parts = l.split(' ');
            let name = parts.next().unwrap();
            match parts.next().unwrap() {
                "counter" => format!("{name}_total"),
                _ => name.to_owned(),
            }
        })
        .collect();
    assert_eq!(documented, live, "README table vs /internal/metrics");
}

#[test]
fn alert_rules_only_use_metrics_spanagg_exports() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let rules = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/alerts/spanagg.rules.yml"
    ))
    .unwrap();
    let mut checked = 0;
    for word in rules.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if !word.starts_with("spanagg_") {
            continue;
        }
        let base = word.trim_end_matches("_bucket");
        assert!(
            readme.contains(&format!("`{base}")),
            "alerts use {word}, which the README table does not list"
        );
        checked += 1;
    }
    assert!(checked >= 5);
}

/// Sum of every sample of `name` (all label sets) in `/internal/metrics`.
fn total(s: &common::Spanagg, name: &str) -> f64 {
    s.get("/internal/metrics")
        .1
        .lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn the_metrics_the_alerts_use_move_when_their_event_happens() {
    use common::{cart_delta, now_ns, route, spanmetrics};
    use prost::Message;
    const S: u64 = 1_000_000_000;
    let s = common::Spanagg::start(
        "shards: 1\nlimits:\n  max_series_per_service: 4\n  max_source_streams: 8\n",
    );
    let t0 = now_ns() - 60 * S;
    let cart = |pod: &str, calls: u64, start: u64| {
        cart_delta(pod, calls, [calls, 0, 0, 0, 0], 1.0, start).encode_to_vec()
    };
    let mut moved = Vec::new();
    let check = |metric: &'static str, event: &dyn Fn()| {
        let before = total(&s, metric);
        event();
        let after = total(&s, metric);
        assert!(after > before, "{metric} stayed at {before}");
        metric
    };
    s.post_ok(&cart("a", 1, t0));
    // SpanaggDeltaGaps: a delta that skips a second.
    moved.push(check("spanagg_points_total", &|| {
        s.post_ok(&cart("a", 1, t0 + 2 * S))
    }));
    let conflicts = || s.internal("spanagg_points_total{outcome=\"conflict\"}");
    let gaps = s.internal("spanagg_points_total{outcome=\"applied_after_gap\"}");
    assert_eq!(gaps, 2.0, "the counter and the histogram");
    // SpanaggConflictingWriters: the same interval again with other values.
    s.post_ok(&cart("a", 5, t0 + 2 * S));
    assert_eq!(conflicts(), 2.0);
    // SpanaggRejectingPoints: a point refused (a histogram whose buckets do not add up).
    moved.push(check("spanagg_points_rejected_total", &|| {
        let mut req = cart_delta("a", 1, [1, 0, 0, 0, 0], 1.0, t0 + 3 * S);
        req.resource_metrics[0].scope_metrics[0].metrics.truncate(1);
        let metric = &mut req.resource_metrics[0].scope_metrics[0].metrics[0];
        metric.data = cart_delta("a", 1, [1, 0, 0, 0, 0], 1.0, t0).resource_metrics[0]
            .scope_metrics[0]
            .metrics[1]
            .data
            .clone();
        if let Some(opentelemetry_proto::tonic::metrics::v1::metric::Data::Histogram(h)) =
            &mut metric.data
        {
            h.data_points[0].bucket_counts.pop();
        }
        let (status, _, _) = s.post_otlp("application/x-protobuf", &[], &req.encode_to_vec());
        assert_eq!(status, 200, "a partial success");
    }));
    // SpanaggSeriesBudgetExceeded: routes past the service's 4 series go to overflow.
    moved.push(check("spanagg_points_overflowed_total", &|| {
        let routes = [
            route("GET /x", 1, [1, 0, 0, 0, 0], 1.0),
            route("GET /y", 1, [1, 0, 0, 0, 0], 1.0),
        ];
        let req = spanmetrics(
            "checkout",
            "a",
            &routes,
            t0,
            t0 + S,
            opentelemetry_proto::tonic::metrics::v1::AggregationTemporality::Delta,
        );
        s.post_ok(&req.encode_to_vec());
    }));
    // SpanaggRefusingOnLimits and SpanaggRefusingExports: new streams past the 8 allowed.
    moved.push(check("spanagg_limit_refusals_total", &|| {
        s.post_ok(&cart("b", 1, t0));
        assert_eq!(s.post_protobuf(&cart("c", 1, t0)), 503);
    }));
    assert!(
        s.internal("spanagg_requests_total{protocol=\"http_protobuf\",outcome=\"unavailable\"}")
            >= 1.0
    );
    moved.push("spanagg_requests_total");
    // SpanaggSlowScrape: every scrape is timed.
    moved.push(check("spanagg_scrape_duration_seconds_count", &|| {
        s.scrape();
    }));
    // SpanaggCheckpointStale: the age is measured (it drops when a checkpoint is written).
    assert!(total(&s, "spanagg_checkpoint_age_seconds") >= 0.0);
    moved.push("spanagg_checkpoint_age_seconds");
    // SpanaggDeltaHolesGivenUp: pod a's calls sent as 20 disjoint one-nanosecond deltas, one
    // hole after each. Windows publish after the batch is answered, so it is polled.
    let holes = total(&s, "spanagg_delta_holes_given_up_total");
    let mut req = cart_delta("a", 1, [1, 0, 0, 0, 0], 1.0, t0);
    req.resource_metrics[0].scope_metrics[0].metrics.truncate(1);
    if let Some(opentelemetry_proto::tonic::metrics::v1::metric::Data::Sum(calls)) =
        &mut req.resource_metrics[0].scope_metrics[0].metrics[0].data
    {
        let one = calls.data_points[0].clone();
        calls.data_points = (0..20u64)
            .map(|i| {
                let mut p = one.clone();
                p.start_time_unix_nano = t0 + 10 * S + 2 * i;
                p.time_unix_nano = t0 + 10 * S + 2 * i + 1;
                p
            })
            .collect();
    }
    s.post_ok(&req.encode_to_vec());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while total(&s, "spanagg_delta_holes_given_up_total") <= holes {
        assert!(std::time::Instant::now() < deadline, "no hole given up");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    moved.push("spanagg_delta_holes_given_up_total");
    // The WAL alerts' metrics move in tests/durability.rs (a failing fsync, a damaged record).
    moved.extend([
        "spanagg_wal_write_errors_total",
        "spanagg_wal_corrupt_records_total",
    ]);
    let rules = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/alerts/spanagg.rules.yml"
    ))
    .unwrap();
    // The expressions, not the annotations that name metrics to look at.
    let exprs = rules
        .lines()
        .filter(|l| !l.contains("description:") && !l.contains("summary:"));
    for word in exprs.flat_map(|l| l.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))) {
        let base = word.trim_end_matches("_bucket");
        if base.starts_with("spanagg_") {
            let seen = moved.iter().any(|m| m.trim_end_matches("_count") == base);
            assert!(seen, "no test shows {base}, which an alert uses, moving");
        }
    }
    s.stop();
}
