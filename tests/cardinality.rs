//! The cardinality report and the Mimir-style label endpoints against a real server, on a
//! workload whose shape is known: an exploding service (an id in its span names, one pod) next
//! to a well-behaved one (few routes, several pods).

#![allow(clippy::unwrap_used)]

mod common;

use common::{now_ns, Spanagg};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use prost::Message;
use serde_json::Value;
use spanagg::workload::{request, Shape};

/// Calls `f` with every string attribute of every data point of `req`: (key, value).
fn edit_points(req: &mut ExportMetricsServiceRequest, mut f: impl FnMut(&str, &mut String)) {
    let mut edit = |attrs: &mut Vec<KeyValue>| {
        for kv in attrs.iter_mut() {
            if let Some(any_value::Value::StringValue(v)) =
                kv.value.as_mut().and_then(|v| v.value.as_mut())
            {
                f(&kv.key, v);
            }
        }
    };
    for rm in &mut req.resource_metrics {
        for m in rm
            .scope_metrics
            .iter_mut()
            .flat_map(|sm| sm.metrics.iter_mut())
        {
            match m.data.as_mut() {
                Some(Data::Histogram(h)) => h
                    .data_points
                    .iter_mut()
                    .for_each(|p| edit(&mut p.attributes)),
                Some(Data::Sum(x)) => x
                    .data_points
                    .iter_mut()
                    .for_each(|p| edit(&mut p.attributes)),
                _ => {}
            }
        }
    }
}

/// Renames the service of `req`, on the resource and on every point.
fn rename_service(req: &mut ExportMetricsServiceRequest, service: &str) {
    for r in req
        .resource_metrics
        .iter_mut()
        .filter_map(|rm| rm.resource.as_mut())
    {
        for kv in r
            .attributes
            .iter_mut()
            .filter(|kv| kv.key == "service.name")
        {
            kv.value = Some(AnyValue {
                value: Some(any_value::Value::StringValue(service.into())),
            });
        }
    }
    edit_points(req, |k, v| {
        if k == "service.name" {
            *v = service.into();
        }
    });
}

/// `workload::request` renamed to `service` (resource and point attributes).
fn service_request(service: &str, shape: &Shape, pod: usize, t0: u64) -> Vec<u8> {
    let mut req = request(shape, pod, t0, t0 + 1_000_000);
    rename_service(&mut req, service);
    req.encode_to_vec()
}

fn get_json(s: &Spanagg, path: &str) -> Value {
    let (status, body) = s.get(path);
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

#[test]
fn ids_in_span_names_are_flagged_and_traced_to_their_service() {
    let s = Spanagg::start("");
    let t0 = now_ns() - 60_000_000_000;
    // "explode": one pod, 3,000 span names "GET /api/v1/route/N" (N ≥ 1000 reads as an id).
    let wide = common::one_service(3_000, 4, false);
    s.post_ok(&service_request("explode", &wide, 0, t0));
    // "cart": three pods, five routes.
    let narrow = common::one_service(5, 4, false);
    for pod in 1..=3 {
        s.post_ok(&service_request("cart", &narrow, pod, t0));
    }

    let r = get_json(&s, "/api/v1/cardinality?top=5");
    let span = r["labels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["label"] == "span_name")
        .unwrap();
    assert_eq!(span["distinct_values"], 3_000);
    assert_eq!(span["output_series"], 3_005);
    assert_eq!(
        span["single_source_series"], 3_000,
        "only cart's series have several pods"
    );
    assert_eq!(span["id_like_values"], 2_000);
    let why = span["unbounded"].as_str().expect("span_name is flagged");
    assert!(why.contains("2000 of 3000 values look like ids"), "{why}");
    assert_eq!(span["top_services"][0]["service"], "explode");
    assert_eq!(span["top_services"][0]["distinct_values"], 3_000);
    assert_eq!(span["top_services"][1]["service"], "cart");
    assert_eq!(span["top_services"][1]["distinct_values"], 5);
    // Bounded labels are not flagged.
    for l in r["labels"].as_array().unwrap() {
        if l["label"] != "span_name" {
            assert!(l.get("unbounded").is_none(), "{l}");
        }
    }
    assert_eq!(r["services"][0]["service"], "explode");
    assert_eq!(r["services"][0]["pods"], 1);
    assert_eq!(r["services"][1]["service"], "cart");
    assert_eq!(r["services"][1]["pods"], 3);
    assert_eq!(r["services"][1]["reduction"], 3.0);

    // Mimir-style: label names with value counts, then the values of one label.
    let names = get_json(&s, "/api/v1/cardinality/label_names?limit=2");
    assert_eq!(names["cardinality"][0]["label_name"], "span_name");
    assert_eq!(names["cardinality"][0]["label_values_count"], 3_000);
    assert_eq!(
        names["cardinality"][1]["label_values_count"], 2,
        "service_name: explode, cart"
    );
    assert_eq!(names["cardinality"].as_array().unwrap().len(), 2);
    assert!(names["label_names_count"].as_u64().unwrap() >= 4);
    let values = get_json(&s, "/api/v1/cardinality/label_values?label_names[]=service_name&label_names[]=span_name&limit=3");
    assert_eq!(values["series_count_total"], 3_005);
    let svc = &values["labels"][0];
    assert_eq!(svc["label_name"], "service_name");
    assert_eq!(svc["cardinality"][0]["label_value"], "explode");
    assert_eq!(svc["cardinality"][0]["series_count"], 3_000);
    assert_eq!(svc["cardinality"][1]["series_count"], 5);
    assert_eq!(
        values["labels"][1]["cardinality"].as_array().unwrap().len(),
        3
    );
    // Filters apply, and bad parameters are a 400, not a guess.
    let cart = get_json(
        &s,
        "/api/v1/cardinality/label_values?label_names[]=span_name&service=cart",
    );
    assert_eq!(cart["labels"][0]["label_values_count"], 5);
    assert_eq!(s.get("/api/v1/cardinality/label_values").0, 400);
    // A name repeated is answered once; past 64 names the request is refused.
    let repeated = "&label_names[]=span_name".repeat(1000);
    let once = get_json(
        &s,
        &format!("/api/v1/cardinality/label_values?limit=1{repeated}"),
    );
    assert_eq!(once["labels"].as_array().unwrap().len(), 1);
    assert_eq!(
        once["labels"][0]["cardinality"].as_array().unwrap().len(),
        1
    );
    let many: String = (0..65).map(|i| format!("&label_names[]=l{i}")).collect();
    let (status, body) = s.get(&format!("/api/v1/cardinality/label_values?{many}"));
    assert_eq!(status, 400, "{body}");
    assert_eq!(s.get("/api/v1/cardinality?top=many").0, 400);
    assert_eq!(s.get("/api/v1/cardinality?colour=red").0, 400);
}

#[test]
fn scrape_cost_before_and_after_counts_samples_exactly_and_what_output_bounds_saves() {
    // Input bounds [1, 1.5, 2.25, 3.375] (5 buckets); serve [1.5, 3.375] (3 buckets).
    let s = Spanagg::start(
        "histogram:\n  output_bounds:\n    traces.span.metrics.duration: [1.5, 3.375]\n",
    );
    let t0 = now_ns() - 60_000_000_000;
    let shape = common::one_service(5, 4, true);
    for pod in 0..3 {
        s.post_ok(&service_request("cart", &shape, pod, t0));
    }
    let r = get_json(&s, "/api/v1/cardinality");
    let cost = &r["services"][0]["scrape"];
    // Before: 15 counter streams × 1 + 15 histogram streams × (5 buckets + sum + count).
    assert_eq!(cost["samples_before"], 15 + 15 * 7);
    // After: 5 counters + 5 histograms × (3 buckets + sum + count).
    assert_eq!(cost["samples_after"], 5 + 5 * 5);
    assert_eq!(cost["samples_saved_by_output_bounds"], 5 * 2);
    let (before, after) = (
        cost["bytes_before"].as_u64().unwrap(),
        cost["bytes_after"].as_u64().unwrap(),
    );
    assert!(before > 4 * after && after > 30 * 40, "{cost}");
    assert_eq!(
        r["totals"]["scrape"], *cost,
        "one service: totals are its numbers"
    );
    assert_eq!(r["services"][0]["pods"], 3);
}

/// Sum of the samples of `prefix` whose line contains `needle`.
fn sum_where(scrape: &str, prefix: &str, needle: &str) -> f64 {
    scrape
        .lines()
        .filter(|l| l.starts_with(prefix) && l.contains(needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_cardinality_explosion_overflows_exactly_and_leaves_other_services_alone() {
    const BUDGET: u64 = 1_000;
    const NAMES: usize = 100_000;
    let s = Spanagg::start(&format!(
        "limits:\n  max_series_per_service: {BUDGET}\n  max_memory: 1GiB\n"
    ));
    let t0 = now_ns() - 60_000_000_000;
    let narrow = common::one_service(5, 4, true);
    let cart = |pod: usize, k: u64| {
        let start = t0 + k * 1_000_000;
        service_request("cart", &narrow, pod, start)
    };
    for pod in 1..=3 {
        s.post_ok(&cart(pod, 0));
    }
    // One client, 100,000 distinct span names, 5,000 per request.
    let chunk = common::one_service(5_000, 4, true);
    let mut bodies = Vec::new();
    for part in 0..NAMES / 5_000 {
        let mut req = request(&chunk, 0, t0, t0 + 1_000_000);
        rename_service(&mut req, "explode");
        edit_points(&mut req, |k, v| {
            if k == "span.name" {
                let n: usize = v.rsplit('/').next().unwrap().parse().unwrap();
                *v = format!("GET /users/{}", part * 5_000 + n);
            }
        });
        bodies.push(req.encode_to_vec());
    }
    for body in &bodies {
        s.post_ok(body);
    }
    for pod in 1..=3 {
        s.post_ok(&cart(pod, 1));
    }
    // A retry of part of the explosion is recognised, overflow or not.
    s.post_ok(&bodies[7]);

    let scrape = s.scrape();
    let calls = "traces_span_metrics_calls_total{";
    let sent = (NAMES as u64 * 5) as f64;
    assert_eq!(
        sum_where(&scrape, calls, "service_name=\"explode\""),
        sent,
        "totals stay exact"
    );
    assert_eq!(
        sum_where(
            &scrape,
            "traces_span_metrics_duration_milliseconds_count{",
            "service_name=\"explode\""
        ),
        sent
    );
    let overflow = sum_where(&scrape, calls, "otel_metric_overflow=\"true\"");
    assert!(
        overflow >= (NAMES as u64 - BUDGET) as f64 * 5.0,
        "the overflow series took the rest: {overflow}"
    );
    let series = scrape
        .lines()
        .filter(|l| l.starts_with(calls) && l.contains("service_name=\"explode\""))
        .count() as u64;
    assert!(
        series <= BUDGET + 1,
        "{series} series for explode: budget {BUDGET} plus its overflow series"
    );
    // The other service is untouched: its own series, exact.
    assert_eq!(
        sum_where(&scrape, calls, "service_name=\"cart\""),
        3.0 * 2.0 * 5.0 * 5.0
    );
    assert_eq!(
        scrape
            .lines()
            .filter(|l| l.starts_with(calls) && l.contains("service_name=\"cart\""))
            .count(),
        5
    );
    assert!(!scrape
        .lines()
        .any(|l| l.contains("otel_metric_overflow") && l.contains("cart")));

    // Memory stayed bounded, and the report names the service and the label.
    assert!(
        s.peak_rss() < 1 << 30,
        "peak RSS {} MiB",
        s.peak_rss() >> 20
    );
    let r = get_json(&s, "/api/v1/cardinality");
    let explode = r["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["service"] == "explode")
        .unwrap();
    assert!(explode["overflowed_points"].as_u64().unwrap() >= (NAMES as u64 - BUDGET) * 2);
    assert!(explode["budget_usage"].as_f64().unwrap() >= 1.0);
    let cart_r = r["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["service"] == "cart")
        .unwrap();
    assert_eq!(cart_r["overflowed_points"], 0);
    let span = r["labels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["label"] == "span_name")
        .unwrap();
    assert!(span["unbounded"].is_string(), "{span}");
    assert_eq!(span["top_services"][0]["service"], "explode");
    let internal = s.get("/internal/metrics").1;
    let overflowed = common::sample_value(&internal, "spanagg_points_overflowed_total").unwrap();
    assert!(
        overflowed >= ((NAMES as u64 - BUDGET) * 2) as f64,
        "{overflowed}"
    );
    eprintln!(
        "peak RSS {} MiB, overflowed points {overflowed}",
        s.peak_rss() >> 20
    );
}

#[test]
fn new_streams_past_the_stream_limit_are_refused_retryably_and_live_ones_go_on() {
    let s = Spanagg::start("shards: 1\nlimits:\n  max_source_streams: 20\n");
    let t0 = now_ns() - 60_000_000_000;
    let shape = common::one_service(10, 4, true);
    let post = |pod: usize, k: u64| {
        s.post_otlp(
            "application/x-protobuf",
            &[],
            &service_request("cart", &shape, pod, t0 + k * 1_000_000),
        )
        .0
    };
    assert_eq!(post(0, 0), 200, "20 streams: at the limit, all taken");
    assert_eq!(post(1, 0), 503, "a second pod's 20 new streams do not fit");
    assert_eq!(
        post(1, 0),
        503,
        "still not: live streams are never evicted for new ones"
    );
    assert_eq!(post(0, 1), 200, "the streams already held go on");
    assert_eq!(
        s.internal("spanagg_limit_refusals_total{limit=\"source_streams\"}"),
        2.0
    );
    assert_eq!(s.internal("spanagg_source_streams"), 20.0);
    let scrape = s.scrape();
    assert_eq!(
        sum_where(&scrape, "traces_span_metrics_calls_total{", "cart"),
        2.0 * 10.0 * 5.0
    );
}

#[test]
fn past_the_memory_limit_exports_are_refused_retryably_until_memory_is_back_under() {
    let s = Spanagg::start("series_ttl: 2s\nlimits:\n  max_memory: 64MiB\n");
    let t0 = now_ns() - 60_000_000_000;
    // New series, batch after batch: each is taken until the process is past 64 MiB, then
    // the next is refused retryably as over the memory limit (not for any other reason).
    let wide = common::one_service(5_000, 30, true);
    let mut k = 0;
    loop {
        let body = service_request(&format!("big-{k}"), &wide, 0, t0);
        let (status, _, reply) = s.post_otlp("application/x-protobuf", &[], &body);
        if status == 503 {
            assert!(String::from_utf8_lossy(&reply).contains("memory limit"));
            break;
        }
        assert_eq!(status, 200, "batch {k}");
        k += 1;
        assert!(k < 200, "never refused at {} MiB", s.rss() >> 20);
    }
    assert!(s.internal("spanagg_limit_refusals_total{limit=\"memory\"}") >= 1.0);
    assert_eq!(s.get("/-/ready").0, 200, "still serving scrapes");
    // The wide series expire (series_ttl) and their memory goes: exports are taken again.
    let small = common::one_service(1, 4, true);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        k += 1;
        let body = service_request("small", &small, 1, now_ns() - 1_000_000_000 + k as u64);
        if s.post_protobuf(&body) == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still refused at {} MiB",
            s.rss() >> 20
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(s.log_text().contains("back under limits.max_memory"));
}

/// `GET /api/v1/cardinality`'s entry for the `span_name` label.
fn span_label(s: &Spanagg) -> Value {
    let r = get_json(s, "/api/v1/cardinality");
    r["labels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["label"] == "span_name")
        .unwrap()
        .clone()
}

/// Rewrites span names `.../N` as words of letters: values that do not look like ids.
fn span_names_as_words(req: &mut ExportMetricsServiceRequest, offset: usize) {
    edit_points(req, |k, v| {
        if k == "span.name" {
            let n: usize = v.rsplit('/').next().unwrap().parse::<usize>().unwrap() + offset;
            let word: String = [n / 26, n % 26]
                .iter()
                .map(|d| (b'a' + *d as u8) as char)
                .collect();
            *v = format!("job run {word}");
        }
    });
}

#[test]
fn values_fed_by_a_single_pod_are_flagged_on_their_own() {
    let s = Spanagg::start("");
    let t0 = now_ns() - 60_000_000_000;
    // 120 span names, words not ids, recent, each from one pod; 10 others from three pods.
    let mut req = request(
        &common::one_service(120, 4, false),
        0,
        t0,
        t0 + 1_000_000_000,
    );
    span_names_as_words(&mut req, 0);
    s.post_ok(&req.encode_to_vec());
    for pod in 1..=3 {
        let mut req = request(
            &common::one_service(10, 4, false),
            pod,
            t0,
            t0 + 1_000_000_000,
        );
        span_names_as_words(&mut req, 500);
        s.post_ok(&req.encode_to_vec());
    }
    let span = span_label(&s);
    assert_eq!(span["distinct_values"], 130);
    assert_eq!(span["id_like_values"], 0);
    assert_eq!(span["brief_series"], 0);
    assert_eq!(span["single_source_series"], 120);
    let why = span["unbounded"].as_str().expect("flagged");
    assert!(
        why.contains("92% of its series are fed by a single pod"),
        "{why}"
    );
}

#[test]
fn values_seen_once_long_ago_are_flagged_as_unbounded() {
    let s = Spanagg::start("");
    // 150 span names without digits, each from two pods, all from one interval 10 minutes ago:
    // not ids, not single-pod, but never seen again.
    let t0 = now_ns() - 600_000_000_000;
    let shape = common::one_service(150, 4, false);
    for pod in 0..2 {
        let mut req = request(&shape, pod, t0, t0 + 1_000_000_000);
        span_names_as_words(&mut req, 0);
        s.post_ok(&req.encode_to_vec());
    }
    let span = span_label(&s);
    assert_eq!(span["distinct_values"], 150);
    assert_eq!(span["id_like_values"], 0);
    assert_eq!(span["single_source_series"], 0);
    assert_eq!(span["brief_series"], 150);
    let why = span["unbounded"].as_str().expect("flagged");
    assert!(why.contains("seen briefly"), "{why}");
}
