//! A checkpoint reads each shard in parts, the shard ingesting between them, and is still
//! exact: restored and replayed (every batch applied since the checkpoint began, as the WAL
//! would replay it), a shard is the one that kept running, series for series, stream for
//! stream, overflow mark for overflow mark, with series budgets, overflow and the stream limit
//! all reached while the parts were read.

use std::path::PathBuf;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use std::sync::Arc;

use spanagg::aggregate::quota::SeriesQuota;
use spanagg::aggregate::shard::{
    Batch, Outcome, Part, ShardConfig, ShardLimits, ShardState, StreamState,
};
use spanagg::aggregate::window::Window;
use spanagg::ingest::otlp::Projection;
use spanagg::storage::checkpoint::{self, FileWriter, Meta};
use spanagg::storage::columns::part_batches;
use spanagg::workload::{make_cumulative, request, single_shard_batch_at, Shape};

const T: u64 = 1_700_000_000_000_000_000;
const S: u64 = 1_000_000_000;

fn projection(by: &[&str]) -> Arc<Projection> {
    let by: Vec<String> = by.iter().map(|s| s.to_string()).collect();
    Arc::new(Projection::new(&by, &["service.instance.id".to_owned()]))
}

/// Pods merge per service; 7 series per service at most, 90 streams in this shard.
fn config() -> ShardConfig {
    ShardConfig {
        quota: Arc::new(SeriesQuota::new(7, u64::MAX)),
        limits: ShardLimits { streams: 90 },
        ..ShardConfig::default()
    }
}

fn shape(routes: usize) -> Shape {
    Shape {
        services: 2,
        routes,
        bounds: 4,
        counters: true,
    }
}

/// Pod `pod`'s delta over `[start, end)` s after `T`, with `routes` routes, accepted at `end`.
fn delta(pod: usize, routes: usize, start: u64, end: u64) -> Batch {
    let req = request(&shape(routes), pod, T + start * S, T + end * S);
    batch(req, T + end * S)
}

/// Pod `pod`'s running totals since `start`, as of `end`.
fn cumulative(pod: usize, routes: usize, start: u64, end: u64) -> Batch {
    let mut req = request(&shape(routes), pod, T + start * S, T + end * S);
    make_cumulative(&mut req);
    batch(req, T + end * S)
}

fn batch(req: ExportMetricsServiceRequest, at: u64) -> Batch {
    single_shard_batch_at(&req.into(), &projection(&["service.name"]), at, Some(at))
}

type Dump = (Vec<String>, Vec<String>, Vec<(u128, u128, bool)>);

/// The state in a form that does not depend on ids or order. A window's fingerprint is not
/// restored (see `checkpoint_tests`), so windows compare by their ranges.
fn dump(s: &ShardState) -> Dump {
    let mut series: Vec<String> = s
        .series_records()
        .map(|r| {
            let labels: Vec<_> = s.labels(&r.series.labels).collect();
            let (v, c, u) = (&r.series.value, r.series.created_ns, r.series.updated_ns);
            format!("{:032x} {labels:?} {v:?} {c} {u}", r.key)
        })
        .collect();
    series.sort();
    let mut streams: Vec<String> = s
        .stream_records()
        .map(|(key, series, state)| {
            let state = match state {
                StreamState::Delta(w) => format!("{:?}", w.ranges().collect::<Vec<_>>()),
                other => format!("{other:?}"),
            };
            format!("{key:032x} {series:?} {state}")
        })
        .collect();
    streams.sort();
    let mut sticky: Vec<_> = s.sticky_streams().collect();
    sticky.sort();
    (series, streams, sticky)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("spanagg-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Reads `live` in `of` parts, applying `during[k]` after part `k` (those past the last part
/// after it); then `after`. Returns the checkpoint restored and every batch since the first part
/// replayed onto it.
fn checkpoint_and_replay(
    live: &mut ShardState,
    of: u32,
    during: &[Vec<Batch>],
    after: &[Batch],
) -> ShardState {
    let dir = scratch(&format!("parts-{of}"));
    let mut w = FileWriter::create(&dir, 1).expect("create");
    let (mut series, mut streams) = (0, 0);
    for part in Part::all(of) {
        let [a, b, c] = part_batches(live, 0, part).expect("part");
        series += a.num_rows() as u64;
        streams += b.num_rows() as u64;
        for batch in [&a, &b, &c] {
            w.write(batch).expect("write");
        }
        let now = part.index as usize;
        let upto = if part.is_last() {
            during.len()
        } else {
            now + 1
        };
        for batch in during.get(now..upto).into_iter().flatten().flatten() {
            live.apply(batch);
        }
    }
    after.iter().for_each(|b| {
        live.apply(b);
    });
    let meta = Meta::new(1, series, streams, T);
    let (path, _) = w.finish(&meta).expect("finish");
    let mut restored = vec![ShardState::new(config())];
    checkpoint::load(&path, &mut restored).expect("load");
    let _ = std::fs::remove_dir_all(&dir);
    let mut r = restored.pop().expect("one shard");
    r.now_ns = live.now_ns;
    for batch in during.iter().flatten().chain(after) {
        r.apply(batch);
    }
    r
}

#[test]
fn a_shard_read_in_parts_while_it_ingests_restores_and_replays_exactly() {
    for of in [1, 2, 3, 5, 8] {
        let mut live = ShardState::new(config());
        live.now_ns = T + 100 * S;
        // Before the checkpoint: pods 0..6 on 3 routes (2 services × 3 routes × 2 metrics = 12
        // series), pods 7 and 8 cumulative, pod 9 cumulative with no start (a baseline only).
        for pod in 0..6 {
            live.apply(&delta(pod, 3, 0, 10));
        }
        live.apply(&cumulative(7, 3, 5, 10));
        live.apply(&cumulative(8, 3, 5, 10));
        live.apply(&cumulative(9, 3, 12, 12));
        let before = dump(&live);
        assert!(
            before.1.iter().any(|s| s.contains("feeds: false")),
            "a baseline"
        );

        let during = vec![
            // The next interval of every pod, and a retry of one already applied.
            (0..6)
                .map(|p| delta(p, 3, 10, 20))
                .chain([delta(0, 3, 0, 10)])
                .collect(),
            // New pods on the old series: new streams only. Pod 7 turns delta: its streams
            // replace themselves, with room left that the streams created later take.
            (10..13)
                .map(|p| delta(p, 3, 10, 20))
                .chain([delta(7, 3, 10, 20)])
                .collect(),
            // Two more routes: new series, past the budget of 7 per service (overflow marks).
            vec![delta(1, 5, 20, 30), delta(2, 5, 20, 30)],
            // Cumulative steps; the baseline's second point makes it count.
            vec![cumulative(8, 4, 5, 30), cumulative(9, 3, 12, 30)],
            // More new pods than the stream limit has room for.
            (13..20).map(|p| delta(p, 3, 20, 30)).collect(),
        ];
        let after = vec![
            delta(0, 3, 20, 30),
            delta(3, 5, 30, 40),
            delta(1, 5, 30, 40),
            delta(20, 3, 30, 40),
        ];
        let restored = checkpoint_and_replay(&mut live, of, &during, &after);
        let (series, streams, sticky) = dump(&live);
        assert!(
            series.len() > before.0.len(),
            "{of} parts: series were created"
        );
        assert!(!sticky.is_empty(), "{of} parts: the budget was reached");
        assert_eq!(
            live.sources_len(),
            90,
            "{of} parts: the stream limit was reached"
        );
        assert_eq!(dump(&restored).0, series, "{of} parts: series");
        assert_eq!(dump(&restored).1, streams, "{of} parts: streams");
        assert_eq!(dump(&restored).2, sticky, "{of} parts: overflow marks");
    }
}

#[test]
fn parts_hold_every_row_once_and_a_stream_without_its_series_key_reads_whole() {
    let mut s = ShardState::new(config());
    s.now_ns = T + 100 * S;
    for pod in 0..6 {
        s.apply(&delta(pod, 3, 0, 10));
    }
    let (series, streams) = (s.series_len(), s.sources_len());
    assert_eq!(s.checkpoint_parts(usize::MAX), 1);
    assert_eq!(series + streams, 48);
    assert_eq!(
        s.checkpoint_parts(1),
        16,
        "at most 16 parts: each is a pass over the shard"
    );
    let of = s.checkpoint_parts(10);
    assert_eq!(of, (series + streams).div_ceil(10) as u32);
    let (mut a, mut b) = (0, 0);
    for part in Part::all(of) {
        let [x, y, _] = part_batches(&s, 0, part).expect("part");
        // About a tenth each: parts that held everything would pass the sums below.
        assert!(
            x.num_rows() + y.num_rows() <= 20,
            "{part:?}: {}",
            x.num_rows() + y.num_rows()
        );
        a += x.num_rows();
        b += y.num_rows();
    }
    assert_eq!((a, b), (series, streams));
    // A delta stream restored without the key of its series.
    s.restore_stream(7, None, StreamState::Delta(Window::new(T, T + 1, 0)))
        .expect("restore");
    assert_eq!(s.checkpoint_parts(1), 1);
}

#[test]
fn a_stream_that_moves_to_another_series_is_counted() {
    let mut s = ShardState::new(config());
    s.now_ns = T + 100 * S;
    let req = request(&shape(1), 0, T, T + 10 * S);
    let by_service = projection(&["service.name"]);
    s.apply(&single_shard_batch_at(
        &req.clone().into(),
        &by_service,
        T,
        None,
    ));
    assert_eq!(s.stream_moves(), 0);
    // The projection changed across a restart: the same streams' points carry other keys.
    let req = request(&shape(1), 0, T + 10 * S, T + 20 * S);
    let by_pod = projection(&["service.name", "k8s.pod.name"]);
    s.apply(&single_shard_batch_at(&req.into(), &by_pod, T, None));
    assert_eq!(
        s.stream_moves(),
        2,
        "the histogram's and the counter's stream"
    );

    // Overflow marks likewise: with no series budget every point goes to overflow.
    let mut s = ShardState::new(ShardConfig {
        quota: Arc::new(SeriesQuota::new(0, u64::MAX)),
        ..config()
    });
    s.now_ns = T + 100 * S;
    let req = request(&shape(1), 0, T, T + 10 * S);
    s.apply(&single_shard_batch_at(&req.into(), &by_service, T, None));
    assert_eq!(s.sticky_streams().count(), 2);
    let req = request(&shape(1), 0, T + 10 * S, T + 20 * S);
    s.apply(&single_shard_batch_at(
        &req.clone().into(),
        &by_service,
        T,
        None,
    ));
    assert_eq!(s.stream_moves(), 0, "marked again under the same key");
    s.apply(&single_shard_batch_at(&req.into(), &by_pod, T, None));
    assert_eq!(s.stream_moves(), 2, "marked again under another key");
}

/// A cumulative stream that turns delta replaces itself, so the stream limit does not refuse
/// it: a replay judges it against streams created after it (in parts read later), and refused
/// there it would be lost.
#[test]
fn a_cumulative_stream_turning_delta_at_the_stream_limit_is_applied() {
    let mut s = ShardState::new(ShardConfig {
        limits: ShardLimits { streams: 6 },
        ..config()
    });
    s.now_ns = T + 100 * S;
    s.apply(&cumulative(7, 3, 5, 10));
    assert_eq!(s.sources_len(), 6, "the limit is reached");
    let r = s.apply(&delta(7, 3, 10, 20));
    assert_eq!(r.get(Outcome::StreamLimit), 0);
    assert_eq!(r.get(Outcome::Applied), 6);
    let r = s.apply(&delta(8, 3, 10, 20));
    assert_eq!(
        r.get(Outcome::StreamLimit),
        6,
        "a new stream is still refused"
    );
}

/// A delta too old for a stream the shard does not know creates nothing, so it is refused
/// before the series budget is consulted: no overflow mark that a replay, judging the budget
/// against series created after it, could set differently.
#[test]
fn a_delta_too_late_for_a_new_stream_is_refused_before_the_series_budget() {
    let mut s = ShardState::new(ShardConfig {
        quota: Arc::new(SeriesQuota::new(0, u64::MAX)),
        ..config()
    });
    // Accepted an hour after it ended: older than the TTL (15 minutes by default).
    let late = |start: u64, end: u64| {
        let req = request(&shape(3), 0, T + start * S, T + end * S);
        batch(req, T + 3_600 * S)
    };
    let r = s.apply(&late(0, 10));
    assert_eq!(r.get(Outcome::TooLate), 6);
    assert!(r.redirect.is_none(), "nothing handed on to overflow");
    assert_eq!(s.sticky_streams().count(), 0);
    // A recent one still goes to overflow, and then the stream stays there.
    let r = s.apply(&delta(0, 3, 10, 20));
    assert_eq!(r.redirect.map(|r| r.points.len()), Some(6));
    let r = s.apply(&late(20, 30));
    assert_eq!(
        r.redirect.map(|r| r.points.len()),
        Some(6),
        "a marked stream's deltas are judged where its window is"
    );
}
