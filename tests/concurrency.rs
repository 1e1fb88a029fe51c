//! Several clients export over both protocols while scrapes run in a loop: every scrape holds
//! the invariants (no counter goes down, histograms whole, families contiguous) and the final
//! totals are exact.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::metrics::v1::AggregationTemporality;
use prost::Message;

const ROUTES: [&str; 4] = ["GET /a", "GET /b", "POST /c", "PUT /d"];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scrapes_during_concurrent_exports_hold_every_invariant() {
    let s = Arc::new(Spanagg::start("shards: 3\n"));
    let t0 = now_ns() - 300_000_000_000;
    let steps = 200u64;
    let done = Arc::new(AtomicBool::new(false));

    let scraper = {
        let s = s.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let mut prev = HashMap::new();
            let mut scrapes = 0;
            while !done.load(Ordering::Relaxed) || scrapes < 3 {
                prev = check_scrape(&s.scrape(), &prev);
                scrapes += 1;
            }
            scrapes
        })
    };

    let mut clients = Vec::new();
    for pod in 0..6u64 {
        let s = s.clone();
        clients.push(tokio::spawn(async move {
            let mut grpc = MetricsServiceClient::connect(format!("http://{}", s.grpc))
                .await
                .unwrap();
            for i in 0..steps {
                let routes: Vec<Route> = ROUTES
                    .iter()
                    .map(|r| route(r, 1 + pod, [1, pod, 0, 1, 0], 2.5))
                    .collect();
                let req = spanmetrics(
                    "svc",
                    &format!("pod-{pod}"),
                    &routes,
                    t0 + i * 1_000_000_000,
                    t0 + (i + 1) * 1_000_000_000,
                    AggregationTemporality::Delta,
                );
                if pod % 2 == 0 {
                    grpc.export(req).await.unwrap();
                } else {
                    let s2 = s.clone();
                    let body = req.encode_to_vec();
                    let (status, _, _) = tokio::task::spawn_blocking(move || {
                        s2.post_otlp("application/x-protobuf", &[], &body)
                    })
                    .await
                    .unwrap();
                    assert_eq!(status, 200);
                }
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let scrapes = tokio::task::spawn_blocking(move || scraper.join().unwrap())
        .await
        .unwrap();
    assert!(scrapes >= 3);

    let text = s.scrape();
    for r in ROUTES {
        let calls = sample_value(
            &text,
            &format!("traces_span_metrics_calls_total{{service_name=\"svc\",span_kind=\"SPAN_KIND_SERVER\",span_name=\"{r}\",status_code=\"STATUS_CODE_UNSET\"}}"),
        );
        // Σ over pods of (1 + pod) per step = 21 per step.
        assert_eq!(calls, Some((21 * steps) as f64), "{r}");
        let count = sample_value(
            &text,
            &format!("traces_span_metrics_duration_milliseconds_count{{service_name=\"svc\",span_kind=\"SPAN_KIND_SERVER\",span_name=\"{r}\",status_code=\"STATUS_CODE_UNSET\"}}"),
        );
        // Σ over pods of (2 + pod) = 27 per step.
        assert_eq!(count, Some((27 * steps) as f64), "{r}");
    }
}
