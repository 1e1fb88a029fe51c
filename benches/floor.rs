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

use std::hash::{BuildHasher, Hasher};
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
        g.bench_function(format!("{name}/least_aggregator"), |b| {
            let mut least = Least::default();
            let mut i = 0;
            b.iter(|| {
                i += 1;
                let body = decode(bodies[i % bodies.len()].clone(), encoding, LIMIT).unwrap();
                least.aggregate(&body)
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

/// The least an exact aggregator must add to the floor, to say whether a multiple of it is
/// reachable at all: per data point, one hash of its identity (its resource, its metric's
/// name, the bytes of its attributes as they lie, less the pod's own), one probe of a table,
/// and its numbers added to the totals. It checks nothing, keys nothing for retries (spanagg's
/// per-pod windows need a second probe), compares no key bytes on a hit and names no label:
/// a lower bound, not an aggregator anyone should run.
#[derive(Default)]
struct Least {
    index: hashbrown::HashMap<u64, u32, ahash::RandomState>,
    totals: Vec<[u64; 52]>,
}

/// A protobuf field: its number, its fixed or varint value, or its bytes.
fn field<'a>(buf: &mut &'a [u8]) -> (u64, u64, &'a [u8]) {
    let tag = prost::encoding::decode_varint(buf).unwrap();
    match tag & 7 {
        0 => (tag >> 3, prost::encoding::decode_varint(buf).unwrap(), &[]),
        1 => {
            let (v, rest) = buf.split_at(8);
            *buf = rest;
            (tag >> 3, u64::from_le_bytes(v.try_into().unwrap()), &[])
        }
        2 => {
            let len = prost::encoding::decode_varint(buf).unwrap() as usize;
            let (v, rest) = buf.split_at(len);
            *buf = rest;
            (tag >> 3, 0, v)
        }
        _ => panic!("unexpected wire type"),
    }
}

impl Least {
    fn aggregate(&mut self, body: &[u8]) -> usize {
        let seed = ahash::RandomState::with_seeds(1, 2, 3, 4);
        let mut req = body;
        while !req.is_empty() {
            let (_, _, mut rm) = field(&mut req);
            let mut resource = seed.build_hasher();
            while !rm.is_empty() {
                match field(&mut rm) {
                    (1, _, res) => {
                        let mut res = res;
                        while !res.is_empty() {
                            if let (1, _, kv) = field(&mut res) {
                                hash_kept(&mut resource, kv);
                            }
                        }
                    }
                    (2, _, mut sm) => {
                        while !sm.is_empty() {
                            if let (2, _, metric) = field(&mut sm) {
                                self.metric(resource.clone(), metric);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        self.totals.len()
    }

    fn metric(&mut self, mut h: ahash::AHasher, mut metric: &[u8]) {
        while !metric.is_empty() {
            match field(&mut metric) {
                (1, _, name) => h.write(name),
                (7 | 9, _, mut data) => {
                    while !data.is_empty() {
                        if let (1, _, point) = field(&mut data) {
                            self.point(h.clone(), point);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// A calls point (`NumberDataPoint`: attributes 7, value 4 or 6) or a histogram point
    /// (attributes 9, count 4, sum 5, packed buckets 6): the first total is the value or count.
    fn point(&mut self, mut h: ahash::AHasher, mut point: &[u8]) {
        let (mut first, mut sum, mut buckets): (u64, u64, &[u8]) = (0, 0, &[]);
        while !point.is_empty() {
            match field(&mut point) {
                (7 | 9, _, kv) => hash_kept(&mut h, kv),
                (4 | 6, v, []) => first = v,
                (5, v, _) => sum = v,
                (6, _, b) => buckets = b,
                _ => {}
            }
        }
        let key = h.finish();
        let next = self.totals.len() as u32;
        let i = *self.index.entry(key).or_insert(next) as usize;
        if i == self.totals.len() {
            self.totals.push([0; 52]);
        }
        let t = &mut self.totals[i];
        t[0] = t[0].wrapping_add(first);
        t[1] = t[1].wrapping_add(sum); // a float's bits: the add a sum needs costs the same
        for (t, b) in t[2..].iter_mut().zip(buckets.chunks_exact(8)) {
            *t += u64::from_le_bytes(b.try_into().unwrap());
        }
    }
}

/// Hashes an attribute unless it names the pod (the default `without` labels).
fn hash_kept(h: &mut ahash::AHasher, kv: &[u8]) {
    let mut rest = kv;
    let (_, _, key) = field(&mut rest);
    if !spanagg::config::DEFAULT_WITHOUT
        .iter()
        .any(|w| w.as_bytes() == key)
    {
        h.write(kv);
    }
}

criterion_group!(benches, floor);
criterion_main!(benches);
