//! Hot-path benchmarks on one core, no threads: decode+validate+key (the wire walk, then
//! `prepare` reading the body through borrowed views), shard apply, both together, and
//! encoding a scrape of 10,000 histogram series.

#![allow(clippy::unwrap_used)] // benchmark inputs are generated here, not client-controlled

use std::io::Write as _;
use std::sync::Arc;

// The same allocator as the service binary, so the numbers are the service's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use flate2::write::GzEncoder;
use prost::Message;
use spanagg::aggregate::shard::{ShardConfig, ShardState};
use spanagg::export::gzip_parts;
use spanagg::export::prometheus::{encode_shard, stitch, Format};
use spanagg::ingest::otlp::{prepare, InputLimits, Projection};
use spanagg::ingest::view::OtlpBody;
use spanagg::ingest::wire;
use spanagg::workload::{request, single_shard_batch, Shape};

const SHAPE: Shape = Shape {
    services: 1,
    routes: 500,
    bounds: 15, // 16 buckets
    counters: false,
};

fn projection() -> Arc<Projection> {
    let c = spanagg::config::Config::default();
    Arc::new(Projection::new(&c.by, &c.without))
}

fn shard() -> ShardState {
    ShardState::new(ShardConfig::default())
}

/// `n` consecutive intervals of one pod, encoded.
fn bodies(n: usize) -> Vec<Bytes> {
    (0..n as u64)
        .map(|i| {
            request(&SHAPE, 0, 1_000 + i * 1_000, 2_000 + i * 1_000)
                .encode_to_vec()
                .into()
        })
        .collect()
}

fn ingest(c: &mut Criterion) {
    let projection = projection();
    let mut g = c.benchmark_group("ingest");
    g.throughput(Throughput::Elements(SHAPE.routes as u64));
    let bodies = bodies(2_000);

    g.bench_function("protobuf_walk_only_500_hist16_points", |b| {
        let mut i = 0;
        b.iter(|| {
            i += 1;
            wire::cost(&bodies[i % bodies.len()]).unwrap()
        })
    });

    g.bench_function("decode_validate_key_500_hist16_points", |b| {
        let mut i = 0;
        let now = spanagg::unix_ns();
        b.iter(|| {
            let body = bodies[i % bodies.len()].clone();
            i += 1;
            assert!(wire::cost(&body).unwrap().regular);
            let req = OtlpBody::regular(body);
            prepare(&req, &projection, &InputLimits::default(), now, 1, |_| 0)
        })
    });

    g.bench_function("shard_apply_500_hist16_points", |b| {
        let mut state = shard();
        let mut i = 0u64;
        b.iter_batched(
            || {
                i += 1;
                let req = request(&SHAPE, 0, i * 1_000, i * 1_000 + 1_000);
                single_shard_batch(req, &projection)
            },
            |batch| state.apply(&batch),
            BatchSize::SmallInput,
        )
    });

    g.bench_function("decode_and_apply_500_hist16_points", |b| {
        let mut state = shard();
        let mut i = 0u64;
        b.iter_batched(
            || {
                i += 1;
                request(&SHAPE, 0, i * 1_000, i * 1_000 + 1_000).encode_to_vec()
            },
            |body| {
                let body = Bytes::from(body);
                assert!(wire::cost(&body).unwrap().regular);
                let batch = single_shard_batch(OtlpBody::regular(body), &projection);
                state.apply(&batch)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn scrape(c: &mut Criterion) {
    let projection = projection();
    let shape = Shape {
        services: 10,
        routes: 1_000,
        bounds: 15,
        counters: false,
    };
    let mut state = shard();
    // 10 services × 1,000 routes = 10,000 histogram series.
    for pod in 0..10 {
        state.apply(&single_shard_batch(
            request(&shape, pod, 1_000, 2_000),
            &projection,
        ));
    }
    assert_eq!(state.series_len(), 10_000);
    let mut g = c.benchmark_group("scrape");
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("encode_text_10k_hist16_series", |b| {
        b.iter(|| stitch(vec![encode_shard(&state, Format::Text, 1)], Format::Text))
    });
    g.bench_function("encode_openmetrics_10k_hist16_series", |b| {
        b.iter(|| {
            stitch(
                vec![encode_shard(&state, Format::OpenMetrics, 1)],
                Format::OpenMetrics,
            )
        })
    });
    // What a Prometheus scrape asks for: gzip. Before: the text, then compressed on one thread.
    g.bench_function("gzip_text_then_compress_10k_hist16_series", |b| {
        b.iter(|| {
            let (text, _) = stitch(vec![encode_shard(&state, Format::Text, 1)], Format::Text);
            let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(text.as_bytes()).unwrap();
            gz.finish().unwrap()
        })
    });
    // Now: deflated on the shard, family by family, as it is rendered.
    g.bench_function("gzip_deflated_on_shard_10k_hist16_series", |b| {
        b.iter(|| {
            let parts = vec![gzip_parts::encode_shard(&state, Format::Text).unwrap()];
            let (pieces, _) = gzip_parts::stitch(parts, Format::Text);
            gzip_parts::gzip(pieces.iter().map(|p| &p.text))
        })
    });
    g.finish();
}

criterion_group!(benches, ingest, scrape);
criterion_main!(benches);
