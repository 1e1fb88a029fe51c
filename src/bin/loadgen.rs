//! `spanagg-loadgen`: P pods × R routes × B buckets of spanmetrics-shaped delta histograms and
//! counters over OTLP/HTTP or OTLP/gRPC, at a given rate or flat out. Requests are encoded
//! before the clock starts, so the run measures the server, not the generator's encoder.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use prost::Message;
use spanagg::workload::{points_per_request, request, Shape};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Protocol {
    Http,
    Grpc,
}

/// Generate spanmetrics-shaped OTLP load against a spanagg (or any OTLP metrics receiver).
#[derive(Debug, Parser)]
#[command(name = "spanagg-loadgen", version)]
struct Args {
    /// OTLP/HTTP base URL or gRPC endpoint.
    #[arg(long, default_value = "http://127.0.0.1:4318")]
    endpoint: String,
    #[arg(long, value_enum, default_value = "http")]
    protocol: Protocol,
    /// Pods (distinct source identities).
    #[arg(long, default_value_t = 50)]
    pods: usize,
    /// Services the pods are spread over.
    #[arg(long, default_value_t = 5)]
    services: usize,
    /// Routes per pod per interval.
    #[arg(long, default_value_t = 100)]
    routes: usize,
    /// Histogram bounds (buckets = bounds + 1).
    #[arg(long, default_value_t = 15)]
    bounds: usize,
    /// Also send the calls counter for each route.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    counters: bool,
    /// Intervals per pod (each pod sends this many contiguous deltas).
    #[arg(long, default_value_t = 40)]
    intervals: usize,
    /// Target data points per second; 0 sends flat out.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Concurrent requests in flight.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Stop after this long even if requests are left.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
}

#[derive(Default)]
struct Counts {
    ok_requests: AtomicU64,
    ok_points: AtomicU64,
    errors: AtomicU64,
    rejected_points: AtomicU64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let shape = Shape {
        services: args.services,
        routes: args.routes,
        bounds: args.bounds,
        counters: args.counters,
    };
    let per_req = points_per_request(&shape) as u64;
    let base = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64
        - (args.intervals as u64 + 1) * 10_000_000_000;
    eprintln!(
        "encoding {} requests ({} pods × {} intervals, {} points each)…",
        args.pods * args.intervals,
        args.pods,
        args.intervals,
        per_req
    );
    // Interval-major order: each pod's deltas go out in time order, as a sidecar sends them.
    let mut requests: Vec<ExportMetricsServiceRequest> = Vec::new();
    for i in 0..args.intervals as u64 {
        for pod in 0..args.pods {
            let start = base + i * 10_000_000_000;
            requests.push(request(&shape, pod, start, start + 10_000_000_000));
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args, requests, per_req))
}

async fn run(
    args: Args,
    requests: Vec<ExportMetricsServiceRequest>,
    per_req: u64,
) -> anyhow::Result<()> {
    let counts = Arc::new(Counts::default());
    let total = requests.len();
    let bodies: Arc<Vec<Bytes>> = Arc::new(match args.protocol {
        Protocol::Http => requests
            .iter()
            .map(|r| Bytes::from(r.encode_to_vec()))
            .collect(),
        Protocol::Grpc => Vec::new(),
    });
    let messages = Arc::new(requests);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + args.duration;
    let mut workers = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (counts, next, bodies, messages) = (
            counts.clone(),
            next.clone(),
            bodies.clone(),
            messages.clone(),
        );
        let endpoint = args.endpoint.clone();
        let (protocol, rate) = (args.protocol, args.rate);
        workers.push(tokio::spawn(async move {
            let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
            let mut grpc = match protocol {
                Protocol::Grpc => Some(
                    MetricsServiceClient::connect(endpoint.clone())
                        .await
                        .context("connecting")?,
                ),
                Protocol::Http => None,
            };
            let url = format!("{}/v1/metrics", endpoint.trim_end_matches('/'));
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= total || Instant::now() >= deadline {
                    return anyhow::Ok(());
                }
                if rate > 0 {
                    // Pace globally: request i is due when i × points / rate seconds passed.
                    let due =
                        started + Duration::from_secs_f64(i as f64 * per_req as f64 / rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                let ok = match &mut grpc {
                    Some(c) => match c.export(messages[i].clone()).await {
                        Ok(r) => {
                            let rejected = r
                                .into_inner()
                                .partial_success
                                .map_or(0, |p| p.rejected_data_points);
                            counts
                                .rejected_points
                                .fetch_add(rejected as u64, Ordering::Relaxed);
                            true
                        }
                        Err(_) => false,
                    },
                    None => {
                        let req = http::Request::post(&url)
                            .header("content-type", "application/x-protobuf")
                            .body(Full::new(bodies[i].clone()))?;
                        match http.request(req).await {
                            Ok(res) => {
                                let ok = res.status().is_success();
                                let _ = res.into_body().collect().await;
                                ok
                            }
                            Err(_) => false,
                        }
                    }
                };
                if ok {
                    counts.ok_requests.fetch_add(1, Ordering::Relaxed);
                    counts.ok_points.fetch_add(per_req, Ordering::Relaxed);
                } else {
                    counts.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for w in workers {
        w.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    let ok_points = counts.ok_points.load(Ordering::Relaxed);
    println!(
        "protocol={:?} requests_ok={} points_ok={} errors={} rejected_points={} seconds={:.2} points_per_second={:.0}",
        args.protocol,
        counts.ok_requests.load(Ordering::Relaxed),
        ok_points,
        counts.errors.load(Ordering::Relaxed),
        counts.rejected_points.load(Ordering::Relaxed),
        secs,
        ok_points as f64 / secs
    );
    Ok(())
}
