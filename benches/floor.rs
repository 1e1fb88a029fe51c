//! The floor of spanagg's ingest work, on one core: what no implementation can skip for the
//! same requests (inflating the body and walking its protobuf once, allocating nothing:
//! `wire::skim`), next to what spanagg does with them (inflate, the checking and pricing walk
//! for admission, validate and key through borrowed views, apply to a shard). The requests are the workload: one pod's delta of 200 routes,
//! a calls counter and a 50-bucket duration histogram per route, as the Collector's exporter
//! compresses it (gzip at its default level, zstd at its default level, or none).
//!
//! `cargo bench --bench floor`; spanagg's time per request over the floor's is the multiple
//! BENCHMARKS.md reports.

#![allow(clippy::unwrap_used)] // benchmark inputs are generated here, not client-controlled

use std::io::Write;
use std::sync::Arc;

// The same allocator as the service binary, so the numbers are the service's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use prost::Message;
use spanagg::aggregate::shard::{ShardConfig, ShardState};
use spanagg::ingest::body::{decode, decode_into, BufPool, Encoding};
use spanagg::ingest::otlp::Projection;
use spanagg::ingest::view::OtlpBody;
use spanagg::ingest::wire;
use spanagg::workload::{request, single_shard_batch, Shape};

const SHAPE: Shape = Shape {
    services: 1,
    routes: 200,
    bounds: 49, // 50 buckets
    counters: true,
};
const LIMIT: usize = 64 << 20;

fn compress(encoding: Encoding, body: &[u8]) -> bytes::Bytes {
    match encoding {
        Encoding::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(body).unwrap();
            e.finish().unwrap().into()
        }
        Encoding::Zstd => zstd::stream::encode_all(body, 3).unwrap().into(),
        _ => bytes::Bytes::copy_from_slice(body),
    }
}

/// `n` consecutive intervals of one pod, compressed.
fn bodies(encoding: Encoding, n: u64) -> Vec<bytes::Bytes> {
    (0..n)
        .map(|i| {
            let req = request(&SHAPE, 0, 1_000 + i * 1_000, 2_000 + i * 1_000);
            compress(encoding, &req.encode_to_vec())
        })
        .collect()
}

fn floor(c: &mut Criterion) {
    let config = spanagg::config::Config::default();
    let projection = Arc::new(Projection::new(&config.by, &config.without));
    let mut g = c.benchmark_group("floor");
    // Input samples as a Prometheus scrape of the pod would count them: per route, the calls
    // counter and the histogram's buckets, _sum and _count.
    g.throughput(Throughput::Elements(
        (SHAPE.routes * (1 + SHAPE.bounds + 1 + 2)) as u64,
    ));
    for (name, encoding) in [
        ("gzip", Encoding::Gzip),
        ("zstd", Encoding::Zstd),
        ("none", Encoding::Identity),
    ] {
        let bodies = bodies(encoding, 200);
        g.bench_function(format!("{name}/floor_inflate_and_walk"), |b| {
            let mut i = 0;
            b.iter(|| {
                i += 1;
                let body = decode(bodies[i % bodies.len()].clone(), encoding, LIMIT).unwrap();
                wire::skim(&body).unwrap()
            })
        });
        g.bench_function(format!("{name}/spanagg_inflate_decode_apply"), |b| {
            let mut state = ShardState::new(ShardConfig::default());
            // As the service does: inflate buffers come from a pool and go back to it.
            let pool = BufPool::default();
            let mut i = 0;
            b.iter_batched(
                || {
                    i += 1;
                    // A new interval each time, as a pod sends: applied, never a duplicate.
                    let req = request(&SHAPE, 0, i * 1_000, i * 1_000 + 1_000);
                    compress(encoding, &req.encode_to_vec())
                },
                |raw| {
                    let body = decode_into(raw, encoding, LIMIT, pool.take()).unwrap();
                    assert!(wire::cost(&body).unwrap().regular);
                    let req = OtlpBody::regular(body);
                    let batch = single_shard_batch(req.clone(), &projection);
                    let result = state.apply(&batch);
                    drop(batch);
                    pool.give(req.into_bytes());
                    result
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, floor);
criterion_main!(benches);
