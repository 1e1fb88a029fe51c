//! The cardinality report and the Mimir-style label endpoints against a real server, on a
//! workload whose shape is known: an exploding service (an id in its span names, one pod) next
//! to a well-behaved one (few routes, several pods).

#![allow(clippy::unwrap_used)]

mod common;

use common::{now_ns, Spanagg};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue};
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use prost::Message;
use serde_json::Value;
use spanagg::workload::{request, Shape};

/// `workload::request` renamed to `service` (resource and point attributes).
fn service_request(service: &str, shape: &Shape, pod: usize, t0: u64) -> Vec<u8> {
    let mut req = request(shape, pod, t0, t0 + 1_000_000);
    let rename = |attrs: &mut Vec<opentelemetry_proto::tonic::common::v1::KeyValue>| {
        for kv in attrs.iter_mut().filter(|kv| kv.key == "service.name") {
            kv.value = Some(AnyValue {
                value: Some(any_value::Value::StringValue(service.into())),
            });
        }
    };
    let rm = &mut req.resource_metrics[0];
    if let Some(r) = rm.resource.as_mut() {
        rename(&mut r.attributes);
    }
    for m in &mut rm.scope_metrics[0].metrics {
        match m.data.as_mut() {
            Some(Data::Histogram(h)) => h
                .data_points
                .iter_mut()
                .for_each(|p| rename(&mut p.attributes)),
            Some(Data::Sum(s)) => s
                .data_points
                .iter_mut()
                .for_each(|p| rename(&mut p.attributes)),
            _ => {}
        }
    }
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
    let wide = Shape {
        services: 1,
        routes: 3_000,
        bounds: 4,
        counters: false,
    };
    let (status, _, _) = s.post_otlp(
        "application/x-protobuf",
        &[],
        &service_request("explode", &wide, 0, t0),
    );
    assert_eq!(status, 200);
    // "cart": three pods, five routes.
    let narrow = Shape {
        services: 1,
        routes: 5,
        bounds: 4,
        counters: false,
    };
    for pod in 1..=3 {
        let (status, _, _) = s.post_otlp(
            "application/x-protobuf",
            &[],
            &service_request("cart", &narrow, pod, t0),
        );
        assert_eq!(status, 200);
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
    let shape = Shape {
        services: 1,
        routes: 5,
        bounds: 4,
        counters: true,
    };
    for pod in 0..3 {
        let (status, _, _) = s.post_otlp(
            "application/x-protobuf",
            &[],
            &service_request("cart", &shape, pod, t0),
        );
        assert_eq!(status, 200);
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
