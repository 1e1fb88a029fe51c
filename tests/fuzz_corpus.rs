//! Every input in `fuzz/corpus/<target>` (the seeds) and `fuzz/regressions/<target>` (each crash
//! the fuzzer ever found, kept once fixed) run through the fuzz targets on every test run, so a
//! fixed crash stays fixed without a nightly toolchain. `scripts/fuzz` runs the fuzzer itself.
//!
//! The seeds come from the real writers (OTLP encoders, the WAL writer, the checkpoint writer):
//! `SPANAGG_WRITE_SEEDS=1 cargo test --test fuzz_corpus -- --ignored` rewrites them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use prost::Message;
use spanagg::aggregate::shard::{ShardConfig, ShardState};
use spanagg::fuzzing::{self, NOW_NS};
use spanagg::ingest::otlp::Projection;
use spanagg::storage::{checkpoint, columns, wal, StorageMetrics};
use spanagg::workload::{make_cumulative, request, single_shard_batch, Shape};

/// A fuzz target: whether the input got through.
type Target = fn(&[u8]) -> bool;

const TARGETS: [(&str, Target); 5] = [
    ("otlp_protobuf", fuzzing::otlp_protobuf),
    ("otlp_json", fuzzing::otlp_json),
    ("wal_segment", fuzzing::wal_segment),
    ("checkpoint", fuzzing::checkpoint),
    ("exposition", fuzzing::exposition),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    out.sort();
    out
}

/// A panic anywhere but in the Parquet and Arrow readers, which the checkpoint loader turns
/// into "damaged file" on purpose: one in spanagg's own restore code would be hidden too.
static OWN_PANIC: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[test]
fn the_corpus_and_every_past_crash_pass_every_target() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let file = info.location().map_or("", |l| l.file());
        if !(file.contains("/parquet-") || file.contains("/arrow-")) {
            OWN_PANIC.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        default_hook(info);
    }));
    for (name, target) in TARGETS {
        let seeds = files(&fuzz_dir().join("corpus").join(name));
        assert!(seeds.len() >= 3, "{name}: the seed corpus is missing");
        let mut through = 0;
        for path in seeds
            .iter()
            .chain(&files(&fuzz_dir().join("regressions").join(name)))
        {
            let data = std::fs::read(path).unwrap();
            // A failure names the input: `cargo fuzz run <target> <file>` reproduces it.
            eprintln!("{name}: {}", path.display());
            through += usize::from(target(&data));
            assert!(
                !OWN_PANIC.load(std::sync::atomic::Ordering::Relaxed),
                "{name}: {} panicked in spanagg's own code",
                path.display()
            );
        }
        // Seeds the writers made must get all the way in, or the fuzzer starts at the door.
        assert!(through >= 2, "{name}: only {through} inputs got through");
    }
}

/// A small span-metrics request from `pod`, ending at the targets' clock.
fn spans(pod: usize) -> ExportMetricsServiceRequest {
    let shape = Shape {
        services: 2,
        routes: 3,
        bounds: 4,
        counters: true,
    };
    request(&shape, pod, NOW_NS - 10_000_000_000, NOW_NS)
}

#[test]
#[ignore = "rewrites the committed seeds: SPANAGG_WRITE_SEEDS=1"]
fn write_seeds() {
    if std::env::var_os("SPANAGG_WRITE_SEEDS").is_none() {
        return;
    }
    let mut cumulative = spans(1);
    make_cumulative(&mut cumulative);
    let requests = [spans(0), cumulative, Default::default()];
    let corpus = fuzz_dir().join("corpus");
    let put = |target: &str, name: &str, data: &[u8]| {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), data).unwrap();
    };
    for (i, req) in requests.iter().enumerate() {
        put(
            "otlp_protobuf",
            &format!("request-{i}"),
            &req.encode_to_vec(),
        );
        let json = serde_json::to_vec(req).unwrap();
        spanagg::ingest::json::decode(&json).expect("our JSON decodes");
        put("otlp_json", &format!("request-{i}.json"), &json);
    }

    // The WAL writer's own segments: plain, snappy and gzip records, timed and not.
    let dir = tempdir("wal");
    let wal = wal::Wal::start(&dir, 1, NOW_NS, 1 << 20, StorageMetrics::default()).unwrap();
    let body = spans(2).encode_to_vec();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &body).unwrap();
    let records = [
        (wal::KIND_METRICS, body.clone()),
        (
            wal::KIND_METRICS_SNAPPY,
            snap::raw::Encoder::new().compress_vec(&body).unwrap(),
        ),
        (wal::KIND_METRICS_GZIP, gz.finish().unwrap()),
    ];
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        for (kind, payload) in &records {
            let (kind, payload) = wal::timed(*kind, NOW_NS, payload);
            wal.append(kind, payload).await.unwrap();
        }
        wal.append(wal::KIND_METRICS, Bytes::from(body.clone()))
            .await
            .unwrap();
    });
    drop(wal);
    for (i, (_, path)) in wal::segments(&dir).unwrap().iter().enumerate() {
        put(
            "wal_segment",
            &format!("segment-{i}"),
            &std::fs::read(path).unwrap(),
        );
    }
    // Torn: the last record cut short.
    let whole = std::fs::read(&wal::segments(&dir).unwrap()[0].1).unwrap();
    put("wal_segment", "torn", &whole[..whole.len() - 7]);
    put(
        "wal_segment",
        "header-only",
        &whole[..wal::HEADER_LEN as usize],
    );

    // Checkpoints as the writer makes them, of a shard fed deltas and cumulative points.
    let projection = Arc::new(Projection::new(
        &["service.name".to_owned()],
        &["service.instance.id".to_owned()],
    ));
    let mut state = ShardState::new(ShardConfig::default());
    state.now_ns = NOW_NS;
    for req in requests {
        state.apply(&single_shard_batch(req, &projection));
    }
    let dir = tempdir("checkpoint");
    for (i, shards) in [1u32, 2].into_iter().enumerate() {
        let [a, b, c] = columns::shard_batches(&state, 0).unwrap();
        let meta = checkpoint::Meta {
            wal_position: Some(wal::Position::default()),
            state_start_ns: NOW_NS - 60_000_000_000,
            clean_shutdown: i == 0,
            ..checkpoint::Meta::new(shards, a.num_rows() as u64, b.num_rows() as u64, NOW_NS)
        };
        let (path, _) = checkpoint::write(&dir, i as u64 + 1, &meta, &[a, b, c]).unwrap();
        put(
            "checkpoint",
            &format!("shards-{shards}"),
            &std::fs::read(path).unwrap(),
        );
    }
    put("checkpoint", "empty", b"");

    // Names and attributes that once broke scrapes, in the exposition target's layout.
    for (i, fields) in [
        &["calls", "1", "Calls.", "span.name", "GET /a"][..],
        &[
            "duration",
            "ms",
            "a \"quoted\"\\ help\nline",
            "le",
            "0.5",
            "__name__",
            "x",
        ],
        &[
            "9 lives",
            "{s}",
            "",
            "span.name",
            "a\"b\\c\nd",
            "otel_metric_overflow",
            "true",
        ],
    ]
    .into_iter()
    .enumerate()
    {
        let data = fields
            .iter()
            .map(|f| f.as_bytes())
            .collect::<Vec<_>>()
            .join(&0xff_u8);
        put("exposition", &format!("names-{i}"), &data);
    }
}

fn tempdir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("spanagg-seeds-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
