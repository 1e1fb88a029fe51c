//! Memory per source stream and per output series, measured on one shard in-process:
//! `cargo run --release --example memory -- STREAMS_PODS ROUTES SERVICES BOUNDS`
//! (`CUMULATIVE=1` in the environment: the pods send cumulative points instead of deltas).
//! Builds the state through the real ingest path (prepare + apply) and reports RSS growth.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use spanagg::aggregate::shard::{ShardConfig, ShardState};
use spanagg::ingest::otlp::Projection;
use spanagg::telemetry::resident_bytes;
use spanagg::workload::{make_cumulative, request, single_shard_batch, Shape};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn arg(i: usize, default: usize) -> usize {
    std::env::args()
        .nth(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let (pods, routes, services, bounds) = (arg(1, 2000), arg(2, 500), arg(3, 1), arg(4, 15));
    let shape = Shape {
        services,
        routes,
        bounds,
        counters: false,
    };
    let c = spanagg::config::Config::default();
    let projection = Arc::new(Projection::new(&c.by, &c.without));
    let mut state = ShardState::new(ShardConfig::default());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    state.now_ns = now;
    let before = resident_bytes().unwrap_or(0);
    for pod in 0..pods {
        let mut req = request(&shape, pod, now - 20_000_000_000, now - 10_000_000_000);
        if std::env::var_os("CUMULATIVE").is_some() {
            make_cumulative(&mut req);
        }
        state.apply(&single_shard_batch(req, &projection));
    }
    let after = resident_bytes().unwrap_or(0);
    let grew = after.saturating_sub(before) as f64;
    println!(
        "source_streams={} output_series={} buckets={} rss_growth_mib={:.1} bytes_per_stream_all_in={:.1} delta_table_bytes_per_stream={:.1}",
        state.sources_len(),
        state.series_len(),
        bounds + 1,
        grew / (1 << 20) as f64,
        grew / state.sources_len() as f64,
        state.delta_table_bytes() as f64 / state.sources_len() as f64,
    );
}
