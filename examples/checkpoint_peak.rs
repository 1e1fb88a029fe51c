//! What a checkpoint holds on top of the state, by part size: one shard of 1 M delta streams
//! (5,000 pods × 200 points, as one shard of two holds at 5,000 pods × 200 routes) written in
//! parts of about ROWS rows through the real Parquet writer, with every byte allocated counted.
//! `cargo run --release --example checkpoint_peak -- [ROWS]` (default 65536).

// A counting allocator needs `unsafe impl GlobalAlloc`; this measuring tool is not the service.
#![allow(unsafe_code)]
#![allow(clippy::unwrap_used)]
use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use spanagg::aggregate::shard::{Part, ShardConfig, ShardState};
use spanagg::ingest::otlp::Projection;
use spanagg::storage::checkpoint::FileWriter;
use spanagg::storage::columns::part_batches;
use spanagg::workload::{request, single_shard_batch, Shape};

/// mimalloc, counting the bytes live and their peak.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let n = LIVE.fetch_add(l.size(), Relaxed) + l.size();
        PEAK.fetch_max(n, Relaxed);
        unsafe { mimalloc::MiMalloc.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Relaxed);
        unsafe { mimalloc::MiMalloc.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if n > l.size() {
            let v = LIVE.fetch_add(n - l.size(), Relaxed) + n - l.size();
            PEAK.fetch_max(v, Relaxed);
        } else {
            LIVE.fetch_sub(l.size() - n, Relaxed);
        }
        unsafe { mimalloc::MiMalloc.realloc(p, l, n) }
    }
}
#[global_allocator]
static GLOBAL: Counting = Counting;

fn mb(n: usize) -> f64 {
    n as f64 / (1 << 20) as f64
}

fn main() {
    let shape = Shape {
        services: 10,
        routes: 100,
        bounds: 49,
        counters: true,
    };
    let projection = Arc::new(Projection::new(
        &["service.name".to_owned()],
        &["service.instance.id".to_owned()],
    ));
    let mut s = ShardState::new(ShardConfig::default());
    let now = spanagg::unix_ns();
    s.now_ns = now;
    for pod in 0..5000 {
        s.apply(&single_shard_batch(
            request(&shape, pod, now - 20_000_000_000, now - 10_000_000_000),
            &projection,
        ));
    }
    println!(
        "streams {} series {} state live {:.1} MiB",
        s.sources_len(),
        s.series_len(),
        mb(LIVE.load(Relaxed))
    );
    let rows: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(spanagg::storage::PART_ROWS);
    let of = s.checkpoint_parts(rows);
    let dir = std::env::temp_dir().join("ckpt-peak");
    std::fs::create_dir_all(&dir).unwrap();
    let base = LIVE.load(Relaxed);
    PEAK.store(base, Relaxed);
    let mut w = FileWriter::create(&dir, 1).unwrap();
    let mut build_peak = 0;
    let (mut build, mut write) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
    for part in Part::all(of) {
        let t = std::time::Instant::now();
        let b = part_batches(&s, 0, part).unwrap();
        build += t.elapsed();
        let t = std::time::Instant::now();
        build_peak = build_peak.max(LIVE.load(Relaxed) - base);
        for x in &b {
            w.write(x).unwrap();
        }
        write += t.elapsed();
    }
    println!("build {build:?} write {write:?}");
    println!(
        "parts {of}: part held at most {:.1} MiB, peak over state {:.1} MiB",
        mb(build_peak),
        mb(PEAK.load(Relaxed) - base)
    );
}
