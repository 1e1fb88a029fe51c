//! `spanagg-pods`: simulated pods for side-by-side comparisons (`bench/compare/`). Every
//! `--interval` each pod's span metrics advance by one round of seeded deltas. Each pod's
//! cumulative state is served as Prometheus text at `/pods/{i}/metrics` (for Prometheus or
//! vmagent to scrape), and with `--otlp` the same round goes out as one OTLP delta per pod.
//! `/state` says which round went out when and the calls total after it; `/expected` the exact
//! cluster totals any correct aggregator must serve.
//!
//! Rounds start after `--warmup`, so scrapers can read every pod at zero first, and stop after
//! `--rounds`: the state then holds still while the harness waits for the aggregate to settle.

mod state;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use clap::Parser;
use prost::Message;
use serde::Serialize;
use spanagg::workload::sender::{compress, Compression, Protocol, Sender};
use state::{Pods, Workload};

#[derive(Debug, Parser)]
#[command(name = "spanagg-pods", version)]
struct Args {
    /// Serve pods' expositions, `/state` and `/expected` here.
    #[arg(long, default_value = "127.0.0.1:9400")]
    listen: std::net::SocketAddr,
    #[arg(long, default_value_t = 200)]
    pods: usize,
    #[arg(long, default_value_t = 10)]
    services: usize,
    #[arg(long, default_value_t = 200)]
    routes: usize,
    /// Histogram bounds (buckets = bounds + 1).
    #[arg(long, default_value_t = 50)]
    bounds: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Time between rounds.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Time at round 0 (every pod at zero) before the first round.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Rounds to run; then the state holds still.
    #[arg(long, default_value_t = 24)]
    rounds: u64,
    /// Also push each round as OTLP deltas, one request per pod, over this protocol.
    #[arg(long, value_enum)]
    otlp: Option<Protocol>,
    /// OTLP endpoint (base URL).
    #[arg(long, default_value = "http://127.0.0.1:4318")]
    endpoint: String,
    #[arg(long, value_enum, default_value = "gzip")]
    compression: Compression,
    /// OTLP requests in flight.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
}

/// What the harness reads at `/state`.
#[derive(Debug, Default, Serialize)]
struct Progress {
    round: u64,
    rounds: u64,
    /// Unix ms at which round i + 1 went out: visible to scrapers, its OTLP requests encoded.
    published_ms: Vec<u64>,
    /// The cluster's calls total after round i (index 0: before the first round).
    calls: Vec<u64>,
    samples_per_round: u64,
    otlp_ok: u64,
    otlp_errors: u64,
    otlp_rejected_points: i64,
    /// The latest any round went out after its time (the generator fell behind).
    late_ms_max: u64,
    first_error: Option<String>,
}

struct App {
    pods: RwLock<Pods>,
    progress: RwLock<Progress>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("spanagg-pods: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spanagg-pods: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let w = Workload {
        pods: args.pods,
        services: args.services.max(1),
        routes: args.routes,
        bounds: args.bounds,
        seed: args.seed,
    };
    w.check(args.rounds).map_err(anyhow::Error::msg)?;
    let app = Arc::new(App {
        pods: RwLock::new(Pods::new(w)),
        progress: RwLock::new(Progress {
            rounds: args.rounds,
            calls: vec![0],
            samples_per_round: w.samples_per_round(),
            ..Progress::default()
        }),
    });
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let router = Router::new()
        .route("/pods/{pod}/metrics", get(exposition))
        .route("/state", get(progress))
        .route("/expected", get(expected))
        .with_state(app.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });
    eprintln!(
        "spanagg-pods: {} pods × {} routes × {} buckets on {}; {} rounds of {:?} after {:?}",
        w.pods,
        w.routes,
        w.bounds + 1,
        args.listen,
        args.rounds,
        args.interval,
        args.warmup
    );
    let first = tokio::time::Instant::now() + args.warmup;
    // Rounds are contiguous delta intervals on the wall clock, as a sidecar's are.
    let step = args.interval.as_nanos() as u64;
    let base_ns = spanagg::unix_ns() + args.warmup.as_nanos() as u64 - step;
    let mut senders: Vec<Option<Sender>> = (0..args.concurrency.max(1)).map(|_| None).collect();
    for round in 1..=args.rounds {
        // On a fixed clock: a round that starts late is reported, not absorbed.
        let due = first
            + args
                .interval
                .saturating_mul(u32::try_from(round - 1).unwrap_or(u32::MAX));
        tokio::time::sleep_until(due).await;
        let late_ms = due.elapsed().as_millis() as u64;
        let (app2, otlp, compression) = (app.clone(), args.otlp, args.compression);
        let start = base_ns + (round - 1) * step;
        let (calls, bodies) = tokio::task::spawn_blocking(move || {
            let lock = || anyhow::anyhow!("state lock");
            let calls = app2.pods.write().map_err(|_| lock())?.advance();
            // Encoded under a read lock: scrapes of the pods go on meanwhile.
            let pods = app2.pods.read().map_err(|_| lock())?;
            let bodies = match otlp {
                Some(protocol) => {
                    encode_round(&pods, w.pods, protocol, compression, start, start + step)?
                }
                None => Vec::new(),
            };
            anyhow::Ok((calls, bodies))
        })
        .await??;
        // Out now: scrapers see the round, and its OTLP requests start.
        let now_ms = spanagg::unix_ns() / 1_000_000;
        if let Ok(mut p) = app.progress.write() {
            p.round = round;
            p.published_ms.push(now_ms);
            p.late_ms_max = p.late_ms_max.max(late_ms);
            let before = p.calls.last().copied().unwrap_or(0);
            p.calls.push(before + calls);
        }
        if let Some(protocol) = args.otlp {
            senders = send_round(&app, protocol, &args, bodies, senders).await;
        }
    }
    eprintln!("spanagg-pods: {} rounds done; holding still", args.rounds);
    std::future::pending::<()>().await;
    Ok(())
}

/// Every pod's delta for the round just taken, encoded (and for HTTP compressed).
fn encode_round(
    pods: &Pods,
    n: usize,
    protocol: Protocol,
    compression: Compression,
    start: u64,
    end: u64,
) -> anyhow::Result<Vec<Bytes>> {
    (0..n)
        .map(|pod| {
            let raw = pods
                .delta_request(pod, start, end)
                .ok_or_else(|| anyhow::anyhow!("no delta for pod {pod}"))?
                .encode_to_vec();
            Ok(match protocol {
                Protocol::Http => compress(&raw, compression)?,
                Protocol::Grpc => Bytes::from(raw),
            })
        })
        .collect()
}

/// Sends one round's requests over `senders` (connected on first use, kept for the next
/// round as an exporter keeps its connection); counts what came back.
async fn send_round(
    app: &Arc<App>,
    protocol: Protocol,
    args: &Args,
    bodies: Vec<Bytes>,
    senders: Vec<Option<Sender>>,
) -> Vec<Option<Sender>> {
    let bodies = Arc::new(bodies);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for sender in senders {
        let (app, bodies, next) = (app.clone(), bodies.clone(), next.clone());
        let (endpoint, compression) = (args.endpoint.clone(), args.compression);
        workers.push(tokio::spawn(async move {
            let mut sender = match sender {
                Some(s) => Ok(s),
                None => Sender::connect(protocol, &endpoint, compression)
                    .await
                    .map_err(|e| format!("{e:#}")),
            };
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(body) = bodies.get(i) else {
                    return sender.ok();
                };
                // Every request this worker would have sent counts as failed if it cannot connect.
                let answer = match &mut sender {
                    Ok(s) => s.send(body.clone()).await,
                    Err(e) => Err(e.clone()),
                };
                record(
                    &app,
                    answer.map(|r| r.partial_success.map_or(0, |p| p.rejected_data_points)),
                );
            }
        }));
    }
    let mut kept = Vec::with_capacity(workers.len());
    for w in workers {
        kept.push(w.await.ok().flatten());
    }
    kept
}

fn record(app: &App, answer: Result<i64, String>) {
    if let Ok(mut p) = app.progress.write() {
        match answer {
            Ok(rejected) => {
                p.otlp_ok += 1;
                p.otlp_rejected_points += rejected;
            }
            Err(e) => {
                p.otlp_errors += 1;
                p.first_error.get_or_insert(e);
            }
        }
    }
}

async fn exposition(State(app): State<Arc<App>>, Path(pod): Path<usize>) -> Response {
    let text = app.pods.read().ok().and_then(|p| p.exposition(pod));
    match text {
        Some(t) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            t,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such pod\n").into_response(),
    }
}

async fn progress(State(app): State<Arc<App>>) -> Response {
    match app.progress.read() {
        Ok(p) => json(&*p),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn expected(State(app): State<Arc<App>>) -> Response {
    let e = app.pods.read().ok().map(|p| p.expected());
    match e {
        Some(e) => json(&e),
        None => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

fn json<T: Serialize>(value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
