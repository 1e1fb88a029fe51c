//! Checkpoint write and restore for 100,000 output series (16 and 50 buckets) fed by
//! 1,000,000 source streams (10 pods per series): build the Arrow batches from a shard, write
//! the Parquet file (with fsync), and load it back into fresh shards; and the cardinality report
//! over the same state (one shard's summary plus the merge).
//!
//! `cargo bench --bench checkpoint` (prints the file size once per layout).

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::Arc;

use arrow_array::{Array, RecordBatch};
use arrow_data::ArrayData;

use criterion::{criterion_group, criterion_main, Criterion};
use spanagg::aggregate::shard::{ShardConfig, ShardState};
use spanagg::cardinality::{Report, Scope, ShardSummary};
use spanagg::ingest::otlp::Projection;
use spanagg::storage::checkpoint::{self, Meta};
use spanagg::storage::columns::shard_batches;
use spanagg::workload::{request, single_shard_batch, Shape};

const T: u64 = 1_700_000_000_000_000_000;

/// 100 pods over 10 services, 10,000 routes each: 100k histogram series, 1M delta streams.
fn state(bounds: usize) -> ShardState {
    let projection = Arc::new(Projection::new(
        &["service.name".to_owned()],
        &["service.instance.id".to_owned()],
    ));
    let shape = Shape {
        services: 10,
        routes: 10_000,
        bounds,
        counters: false,
    };
    let mut s = ShardState::new(ShardConfig::default());
    s.now_ns = T;
    for pod in 0..100 {
        s.apply(&single_shard_batch(
            request(&shape, pod, T - 10_000_000_000, T),
            &projection,
        ));
    }
    assert_eq!(s.series_len(), 100_000);
    assert_eq!(s.sources_len(), 1_000_000);
    s
}

/// Bytes a batch's buffers hold, each allocation counted once (all-null columns share one).
fn held(b: &RecordBatch) -> usize {
    fn walk(d: &ArrayData, seen: &mut HashSet<usize>, total: &mut usize) {
        let nulls = d.nulls().map(|n| n.buffer());
        for buf in d.buffers().iter().chain(nulls) {
            if seen.insert(buf.data_ptr().as_ptr() as usize) {
                *total += buf.capacity();
            }
        }
        d.child_data().iter().for_each(|c| walk(c, seen, total));
    }
    let (mut seen, mut total) = (HashSet::new(), 0);
    for col in b.columns() {
        walk(&col.to_data(), &mut seen, &mut total);
    }
    total
}

fn bench(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("spanagg-bench-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut g = c.benchmark_group("checkpoint_100k_series_1M_streams");
    g.sample_size(10);
    for bounds in [15, 49] {
        let s = state(bounds);
        let write = |seq: u64| {
            let [a, b, pods] = shard_batches(&s, 0).unwrap();
            let rows = (a.num_rows() as u64, b.num_rows() as u64);
            let meta = Meta {
                clean_shutdown: true,
                ..Meta::new(1, rows.0, rows.1, T)
            };
            checkpoint::write(&dir, seq, &meta, &[a, b, pods]).unwrap()
        };
        let (path, size) = write(0);
        println!("{} buckets: checkpoint file {size} bytes", bounds + 1);
        let [series, streams, _] = shard_batches(&s, 0).unwrap();
        println!(
            "{} buckets: Arrow batches hold {} bytes of series rows, {} of stream rows ({} per stream)",
            bounds + 1,
            held(&series),
            held(&streams),
            held(&streams) / streams.num_rows().max(1)
        );
        g.bench_function(format!("write_{}_buckets", bounds + 1), |b| {
            b.iter(|| write(1))
        });
        g.bench_function(format!("cardinality_report_{}_buckets", bounds + 1), |b| {
            b.iter(|| {
                let part = ShardSummary::of(&s, &Scope::default());
                Report::merge(vec![part], 10)
            })
        });
        g.bench_function(format!("restore_{}_buckets", bounds + 1), |b| {
            b.iter(|| {
                let mut states = vec![ShardState::new(ShardConfig::default())];
                checkpoint::load(&path, &mut states).unwrap();
                states
            })
        });
    }
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
