use super::*;
use crate::aggregate::series::SeriesValue;
use crate::aggregate::shard::{ShardConfig, StreamState};
use crate::ingest::otlp::Projection;
use crate::workload::{make_cumulative, request, single_shard_batch, Shape};
use arrow_array::Array;
use std::sync::Arc;

/// Data time of the test points (a zero timestamp is invalid).
const T: u64 = 1_000_000_000;

/// Pods merge per service: `service.name` kept, `service.instance.id` dropped.
fn projection() -> Arc<Projection> {
    Arc::new(Projection::new(
        &["service.name".to_owned()],
        &["service.instance.id".to_owned()],
    ))
}

/// A shard fed deltas (with a hole in one window) and cumulative points.
fn populated() -> ShardState {
    let mut s = ShardState::new(ShardConfig::default());
    s.now_ns = T + 100;
    let projection = projection();
    let shape = Shape {
        services: 2,
        routes: 5,
        bounds: 16,
        counters: true,
    };
    for pod in 0..4 {
        for (start, end) in [(T, T + 10), (T + 20, T + 30)] {
            s.apply(&single_shard_batch(
                request(&shape, pod, start, end),
                &projection,
            ));
        }
    }
    // Pod 9 sends cumulative points (its start is after the state start, so they count).
    for end in [T + 40, T + 50] {
        let mut req = request(&shape, 9, T + 5, end);
        make_cumulative(&mut req);
        s.apply(&single_shard_batch(req, &projection));
    }
    // Pod 8 (service-2, alone) starts with an unknown start: only a baseline, no series.
    let alone = Shape {
        services: 3,
        ..shape
    };
    let mut req = request(&alone, 8, T + 60, T + 60);
    make_cumulative(&mut req);
    s.apply(&single_shard_batch(req, &projection));
    s
}

type SeriesDump = (
    u128,
    String,
    Vec<(String, String)>,
    Vec<f64>,
    Vec<u64>,
    String,
    u64,
    u64,
);

/// The state in a form that does not depend on internal ids or order.
type StreamDump = (u128, Option<u128>, String);

fn dump(s: &ShardState) -> (Vec<SeriesDump>, Vec<StreamDump>) {
    let mut series: Vec<SeriesDump> = s
        .series_records()
        .map(|r| {
            let labels = s
                .labels(&r.series.labels)
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            let (counts, value) = match &r.series.value {
                SeriesValue::Counter(c) => (vec![], format!("{}+{}", c.int, c.float)),
                SeriesValue::Histogram { counts, sum, .. } => {
                    (counts.iter().collect(), format!("{sum}"))
                }
            };
            (
                r.key,
                format!("{:?}", r.family),
                labels,
                r.bounds.to_vec(),
                counts,
                value,
                r.series.created_ns,
                r.series.updated_ns,
            )
        })
        .collect();
    series.sort_by_key(|a| a.0);
    let mut streams: Vec<StreamDump> = s
        .stream_records()
        // A window's applied ranges are restored; the newest delta's fingerprint is not (a
        // restored window only stops telling retries from second writers until its next delta).
        .map(|(k, sk, st)| {
            let text = match &st {
                StreamState::Delta(w) => format!(
                    "Delta {{ ranges: {:?}, older: {} }}",
                    w.ranges().collect::<Vec<_>>(),
                    if w.ranges_held() > 1 { "Some" } else { "None" }
                ),
                other => format!("{other:?}"),
            };
            (k, sk, text)
        })
        .collect();
    streams.sort();
    (series, streams)
}

fn meta(shards: u32, series: u64, streams: u64) -> Meta {
    Meta {
        wal_position: Some(Position {
            segment: 4,
            offset: 20,
        }),
        state_start_ns: 7,
        clean_shutdown: true,
        ..Meta::new(shards, series, streams, 123)
    }
}

fn write_state(dir: &Path, s: &ShardState) -> PathBuf {
    let [a, b, c] = super::super::columns::shard_batches(s, 0).expect("batches");
    let m = meta(1, a.num_rows() as u64, b.num_rows() as u64);
    write(dir, 1, &m, &[a, b, c]).expect("write").0
}

#[test]
fn a_full_disk_is_counted_as_disk_full() {
    let scratch = crate::storage::ScratchDir::new("ckpt-full");
    let dir = scratch.0.clone();
    // The temp file is /dev/full: every write fails with ENOSPC, as on a full disk.
    std::os::unix::fs::symlink("/dev/full", dir.join(format!("{}.tmp", file_name(1)))).unwrap();
    let s = populated();
    let [a, b, c] = super::super::columns::shard_batches(&s, 0).expect("batches");
    let m = meta(1, a.num_rows() as u64, b.num_rows() as u64);
    let err = write(&dir, 1, &m, &[a, b, c]).unwrap_err();
    assert_eq!(err.reason(), "disk_full", "{err}");
}

/// The service writes one shard's part at a time and learns the footer last; a checkpoint it
/// abandons half-way (a stopped shard, an error) must leave no file behind.
#[test]
fn a_checkpoint_written_part_by_part_reads_back_and_an_abandoned_one_leaves_nothing() {
    let scratch = crate::storage::ScratchDir::new("ckpt-parts");
    let dir = scratch.0.clone();
    let s = populated();
    let [a, b, c] = super::super::columns::shard_batches(&s, 0).expect("batches");
    let files = || std::fs::read_dir(&dir).expect("dir").count();

    let mut abandoned = FileWriter::create(&dir, 1).expect("create");
    abandoned.write(&a).expect("write");
    assert_eq!(files(), 1, "the temp file");
    drop(abandoned);
    assert_eq!(files(), 0, "an unfinished checkpoint removes its temp file");

    let mut w = FileWriter::create(&dir, 2).expect("create");
    for batch in [&a, &b, &c] {
        w.write(batch).expect("write");
    }
    let m = meta(1, a.num_rows() as u64, b.num_rows() as u64);
    let (path, size) = w.finish(&m).expect("finish");
    assert_eq!(std::fs::metadata(&path).expect("file").len(), size);
    assert_eq!(files(), 1, "only the finished file");
    assert_eq!(read_meta(&path).expect("footer"), m);
    let mut states = vec![ShardState::new(ShardConfig::default())];
    load(&path, &mut states).expect("load");
    assert_eq!(dump(&states[0]), dump(&s));
}

#[test]
fn state_to_parquet_to_state_is_identical() {
    let scratch = crate::storage::ScratchDir::new("ckpt");
    let dir = scratch.0.clone();
    let before = populated();
    let (series, streams) = dump(&before);
    assert_eq!(series.len(), 2 * 2 * 5, "2 services × 5 routes × 2 metrics");
    assert!(streams.iter().any(|s| s.2.contains("Cumulative")));
    assert!(
        streams.iter().any(|s| s.2.contains("older: Some")),
        "a window with a hole"
    );
    let path = write_state(&dir, &before);
    assert!(!dir.join(format!("{}.tmp", file_name(1))).exists());

    let mut states = vec![ShardState::new(ShardConfig::default())];
    let m = load(&path, &mut states).expect("load");
    assert_eq!(m, meta(1, series.len() as u64, streams.len() as u64));
    assert_eq!(dump(&states[0]), (series, streams));
    assert_eq!(
        (
            before.distinct_cumulative_bounds(),
            states[0].distinct_cumulative_bounds()
        ),
        (1, 1),
        "restored cumulative streams share their bounds"
    );
    let pods = |s: &ShardState| {
        let mut v: Vec<(u64, String)> = s.pods().map(|(k, v)| (k, v.to_owned())).collect();
        v.sort();
        v
    };
    assert_eq!(pods(&states[0]), pods(&before));
    assert_eq!(
        pods(&before).len(),
        6,
        "four delta pods and two cumulative pods"
    );

    // Restored into more shards, every series and stream is still there exactly once.
    let mut four: Vec<ShardState> = (0..4)
        .map(|_| ShardState::new(ShardConfig::default()))
        .collect();
    load(&path, &mut four).expect("load into 4 shards");
    let n: usize = four.iter().map(|s| s.series_len()).sum();
    assert_eq!(n, before.series_len());
    let sources: usize = four.iter().map(|s| s.sources_len()).sum();
    assert_eq!(sources, before.sources_len());
    // Every stream is in the shard its points go to, a stream that feeds no series too.
    let mut seriesless = 0;
    for (i, shard) in four.iter().enumerate() {
        for (_, series, state) in shard.stream_records() {
            let series = series.expect("every stream here knows its output key");
            assert_eq!(crate::aggregate::table::shard_for(series, 4), i);
            if matches!(state, StreamState::Cumulative { .. })
                && !shard.series_records().any(|r| r.key == series)
            {
                seriesless += 1;
            }
        }
    }
    assert!(
        seriesless > 0,
        "the baselined cumulative stream was checked"
    );
}

/// Batches of one temporality leave whole columns null (shared zero buffers, `lazy.rs`): the
/// value columns for delta streams, the applied ranges for cumulative ones.
#[test]
fn states_of_one_temporality_round_trip_with_their_unfilled_columns_null() {
    let shape = Shape {
        services: 2,
        routes: 3,
        bounds: 4,
        counters: true,
    };
    for cumulative in [false, true] {
        let scratch = crate::storage::ScratchDir::new("ckpt-one");
        let mut s = ShardState::new(ShardConfig::default());
        s.now_ns = T + 100;
        for pod in 0..3 {
            let mut req = request(&shape, pod, T + 5, T + 40);
            if cumulative {
                make_cumulative(&mut req);
            }
            s.apply(&single_shard_batch(req, &projection()));
        }
        let [series, streams, _] = super::super::columns::shard_batches(&s, 0).expect("batches");
        let null_columns = |b: &arrow_array::RecordBatch| {
            b.columns()
                .iter()
                .filter(|c| c.null_count() == b.num_rows())
                .count()
        };
        assert!(
            streams.num_rows() > 0 && null_columns(&streams) >= 10,
            "{cumulative}"
        );
        // The unfilled columns are not each a buffer of their own: they share one.
        let shared: std::collections::HashSet<usize> = streams
            .columns()
            .iter()
            .filter(|c| c.null_count() == streams.num_rows())
            .filter_map(|c| {
                c.to_data()
                    .buffers()
                    .first()
                    .map(|b| b.data_ptr().as_ptr() as usize)
            })
            .collect();
        assert_eq!(shared.len(), 1, "cumulative: {cumulative}");
        assert!(
            null_columns(&series) >= 6,
            "the stream columns of series rows"
        );
        let path = write_state(&scratch.0, &s);
        let mut states = vec![ShardState::new(ShardConfig::default())];
        load(&path, &mut states).expect("load");
        assert_eq!(dump(&states[0]), dump(&s), "cumulative: {cumulative}");
    }
}

#[test]
fn a_restored_shard_refuses_the_deltas_it_already_holds() {
    let scratch = crate::storage::ScratchDir::new("ckpt");
    let dir = scratch.0.clone();
    let path = write_state(&dir, &populated());
    let mut states = vec![ShardState::new(ShardConfig::default())];
    load(&path, &mut states).unwrap();
    let projection = projection();
    let shape = Shape {
        services: 2,
        routes: 5,
        bounds: 16,
        counters: true,
    };
    states[0].now_ns = T + 100;
    let r = states[0].apply(&single_shard_batch(
        request(&shape, 0, T, T + 10),
        &projection,
    ));
    assert_eq!(r.get(crate::aggregate::shard::Outcome::Duplicate), 10);
    let r = states[0].apply(&single_shard_batch(
        request(&shape, 0, T + 10, T + 20),
        &projection,
    ));
    assert_eq!(
        r.get(crate::aggregate::shard::Outcome::AppliedLate),
        10,
        "the hole is still open"
    );
}

#[test]
fn overflowed_streams_stay_overflowed_across_a_restore() {
    let scratch = crate::storage::ScratchDir::new("ckpt");
    let dir = scratch.0.clone();
    let mut s = ShardState::new(ShardConfig {
        quota: Arc::new(crate::aggregate::quota::SeriesQuota::new(3, u64::MAX)),
        ..ShardConfig::default()
    });
    s.now_ns = T + 100;
    let projection = projection();
    let shape = Shape {
        services: 1,
        routes: 5,
        bounds: 4,
        counters: false,
    };
    let r = s.apply(&single_shard_batch(
        request(&shape, 0, T, T + 10),
        &projection,
    ));
    let redirected = r.redirect.map_or(0, |r| r.points.len());
    assert_eq!(
        redirected, 2,
        "3 series fit the budget, 2 points go to overflow"
    );
    // Past the global budget a stream goes to the global overflow series, and stays there.
    let mut g = ShardState::new(ShardConfig {
        quota: Arc::new(crate::aggregate::quota::SeriesQuota::new(u64::MAX, 2)),
        ..ShardConfig::default()
    });
    g.now_ns = T + 100;
    let r = g.apply(&single_shard_batch(
        request(&shape, 1, T, T + 10),
        &projection,
    ));
    assert_eq!(r.redirect.map(|r| r.services), Some(vec!["".into()]));
    for (s, global) in [(&s, false), (&g, true)] {
        let mut before: Vec<(u128, u128, bool)> = s.sticky_streams().collect();
        before.sort();
        assert!(before.iter().all(|(_, _, g)| *g == global));
        let path = write_state(&dir, s);
        let mut states = vec![ShardState::new(ShardConfig::default())];
        load(&path, &mut states).unwrap();
        let mut after: Vec<(u128, u128, bool)> = states[0].sticky_streams().collect();
        after.sort();
        assert_eq!(after, before);
        // Into another shard count, each mark lands in the shard its points go to.
        let mut four: Vec<ShardState> = (0..4)
            .map(|_| ShardState::new(ShardConfig::default()))
            .collect();
        load(&path, &mut four).unwrap();
        let mut moved = 0;
        for (i, shard) in four.iter().enumerate() {
            for (_, series, _) in shard.sticky_streams() {
                assert_eq!(crate::aggregate::table::shard_for(series, 4), i);
                moved += 1;
            }
        }
        assert_eq!(moved, before.len());
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn truncated_and_corrupt_files_are_errors_not_panics() {
    let scratch = crate::storage::ScratchDir::new("ckpt");
    let dir = scratch.0.clone();
    let path = write_state(&dir, &populated());
    let bytes = std::fs::read(&path).unwrap();
    let fresh = || vec![ShardState::new(ShardConfig::default())];
    // Truncated anywhere: the footer or a page is gone.
    for cut in [
        0,
        4,
        bytes.len() / 3,
        bytes.len() / 2,
        bytes.len() - 9,
        bytes.len() - 1,
    ] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        assert!(load(&path, &mut fresh()).is_err(), "cut at {cut}");
    }
    // Bit flips anywhere are caught (page CRCs, decoding, the restore's own checks), never a
    // panic; a file that still loads gives shards whose scrapes, both formats, pass the strict
    // reader the fuzz targets use (it panics here otherwise).
    let mut loaded = 0;
    for i in 0..256 {
        let mut b = bytes.clone();
        let at = 4 + (i * 7919) % (bytes.len() - 8);
        b[at] ^= 0x5a;
        loaded += usize::from(crate::fuzzing::checkpoint(&b));
    }
    assert!(loaded < 256, "no flip was noticed");
    // A file from another schema is refused by its footer.
    std::fs::write(&path, &bytes).unwrap();
    let mut m = read_meta(&path).unwrap();
    m.schema_hash = "0000".into();
    let [a, b, c] = super::super::columns::shard_batches(&populated(), 0).unwrap();
    let other = write(&dir, 2, &m, &[a, b, c]).unwrap().0;
    let err = load(&other, &mut fresh()).unwrap_err().to_string();
    assert!(err.contains("schema hash"), "{err}");
}

#[test]
fn the_schema_file_documents_the_checkpoint_schema_exactly() {
    assert_eq!(
        crate::columnar::documented_fields("checkpoint.txt"),
        schema_text(&super::super::columns::checkpoint_schema()),
        "schema/checkpoint.txt and the code disagree: update one to match the other"
    );
}

#[test]
#[ignore = "prints the schema lines for schema/checkpoint.txt"]
fn print_schema() {
    print!(
        "{}",
        schema_text(&super::super::columns::checkpoint_schema())
    );
}
