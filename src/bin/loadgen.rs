//! `spanagg-loadgen`: P pods × R routes × B buckets of spanmetrics-shaped delta histograms and
//! counters over OTLP/HTTP or OTLP/gRPC, at a given rate or flat out. Requests are encoded
//! before the clock starts, so the run measures the server, not the generator's encoder.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::Parser;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use prost::Message;
use spanagg::workload::sender::{compress, Compression, Protocol, Sender};
use spanagg::workload::{points_per_request, request, Shape};

/// Generate spanmetrics-shaped OTLP load against a spanagg (or any OTLP metrics receiver).
#[derive(Debug, Parser)]
#[command(name = "spanagg-loadgen", version)]
struct Args {
    /// OTLP/HTTP base URL or gRPC endpoint. Default: spanagg's default port for `--protocol`
    /// (http://127.0.0.1:4318, or http://127.0.0.1:4317 for grpc).
    #[arg(long)]
    endpoint: Option<String>,
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
    /// Length of one delta interval. The last interval ends now; keep intervals × length
    /// under the server's series_ttl, or older deltas of new streams are refused as replays.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Target data points per second; 0 sends flat out.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Concurrent requests in flight.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Request compression, as the Collector's exporters offer it. OTLP/HTTP bodies are
    /// compressed up front; gRPC messages by tonic as they are sent.
    #[arg(long, value_enum, default_value = "none")]
    compression: Compression,
    /// Shorthand for `--compression gzip`, the Collector's default.
    #[arg(long, conflicts_with = "compression")]
    gzip: bool,
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
    /// What the first failed request was told, so a run of errors says why.
    first_error: std::sync::Mutex<Option<String>>,
}

impl Counts {
    /// Keeps the first error's text (the request is counted as an error by the caller).
    fn error(&self, what: String) {
        if let Ok(mut first) = self.first_error.lock() {
            first.get_or_insert(what);
        }
    }
}

fn main() -> std::process::ExitCode {
    // One line with its causes, as spanagg reports errors.
    match generate(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spanagg-loadgen: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn generate(args: Args) -> anyhow::Result<()> {
    let shape = Shape {
        services: args.services,
        routes: args.routes,
        bounds: args.bounds,
        counters: args.counters,
    };
    let per_req = points_per_request(&shape) as u64;
    let step = args.interval.as_nanos() as u64;
    let base = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64
        - (args.intervals as u64 + 1) * step;
    let endpoint = args.endpoint.clone().unwrap_or_else(|| {
        match args.protocol {
            Protocol::Http => "http://127.0.0.1:4318",
            Protocol::Grpc => "http://127.0.0.1:4317",
        }
        .to_owned()
    });
    eprintln!(
        "encoding {} requests ({} pods × {} intervals, {} points each) for {endpoint}…",
        args.pods * args.intervals,
        args.pods,
        args.intervals,
        per_req
    );
    // Interval-major order: each pod's deltas go out in time order, as a sidecar sends them.
    let mut requests: Vec<ExportMetricsServiceRequest> = Vec::new();
    for i in 0..args.intervals as u64 {
        for pod in 0..args.pods {
            let start = base + i * step;
            requests.push(request(&shape, pod, start, start + step));
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args, endpoint, requests, per_req))
}

async fn run(
    args: Args,
    endpoint: String,
    requests: Vec<ExportMetricsServiceRequest>,
    per_req: u64,
) -> anyhow::Result<()> {
    let counts = Arc::new(Counts::default());
    let total = requests.len();
    let compression = if args.gzip {
        Compression::Gzip
    } else {
        args.compression
    };
    let bodies: Arc<Vec<Bytes>> = Arc::new(
        requests
            .iter()
            .map(|r| {
                let raw = r.encode_to_vec();
                match args.protocol {
                    Protocol::Http => compress(&raw, compression),
                    Protocol::Grpc => Ok(Bytes::from(raw)),
                }
            })
            .collect::<std::io::Result<_>>()?,
    );
    drop(requests);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + args.duration;
    let mut workers = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (counts, next, bodies) = (counts.clone(), next.clone(), bodies.clone());
        let endpoint = endpoint.clone();
        let (protocol, rate) = (args.protocol, args.rate);
        workers.push(tokio::spawn(async move {
            let mut sender = Sender::connect(protocol, &endpoint, compression).await?;
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
                let reply = match sender.send(bodies[i].clone()).await {
                    Ok(r) => Some(r),
                    Err(e) => {
                        counts.error(e);
                        None
                    }
                };
                let ok = reply.is_some();
                if let Some(p) = reply.and_then(|r| r.partial_success) {
                    counts
                        .rejected_points
                        .fetch_add(p.rejected_data_points.max(0) as u64, Ordering::Relaxed);
                }
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
    if let Some(e) = counts.first_error.lock().ok().and_then(|e| e.clone()) {
        eprintln!(
            "first error (of {}): {e}",
            counts.errors.load(Ordering::Relaxed)
        );
    }
    Ok(())
}
