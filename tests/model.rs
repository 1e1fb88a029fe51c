//! Model-based test of the sharded table: random delta streams from many pods, delivered with
//! duplicates and reorderings, applied through real shard threads, compared with a plain
//! `BTreeMap` reference that sums each distinct delta once.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use spanagg::aggregate::key::{FamilyDesc, Kind, SetHash};
use spanagg::aggregate::series::{Point, PointValue, SeriesValue, Temporality};
use spanagg::aggregate::shard::{
    Batch, BatchResult, LabelRef, LabelResolver, Outcome, ShardConfig,
};
use spanagg::aggregate::table::Table;

const BOUNDS: [f64; 4] = [1.0, 5.0, 10.0, 50.0];

struct RouteLabels;
impl LabelResolver for RouteLabels {
    fn labels(&self, r: LabelRef) -> Option<Vec<(String, String)>> {
        let LabelRef::Entry(route) = r else {
            return None;
        };
        Some(vec![("route".into(), format!("r{route}"))])
    }
}

fn family(kind: Kind) -> FamilyDesc {
    let name = match kind {
        Kind::Counter => "calls",
        Kind::Histogram => "duration_milliseconds",
    };
    FamilyDesc {
        name: name.into(),
        kind,
        otel_name: name.into(),
        unit: "".into(),
        help: "".into(),
    }
}

/// One delta as a pod would send it.
#[derive(Debug, Clone)]
struct Delta {
    pod: u32,
    route: u32,
    start: u64,
    end: u64,
    calls: u64,
    buckets: [u64; 5],
    sum: f64,
}

fn keys(d: &Delta, fam: &FamilyDesc) -> (u128, u128) {
    let mut out = SetHash::default();
    out.add("route", &format!("r{}", d.route));
    let mut src = SetHash::default();
    src.add("route", &format!("r{}", d.route));
    src.add("pod", &format!("p{}", d.pod));
    (out.finish(fam.key_seed()), src.finish(fam.key_seed() ^ 1))
}

fn send(table: &Table, deltas: &[Delta]) -> BatchResult {
    let families: Arc<[FamilyDesc]> = vec![family(Kind::Counter), family(Kind::Histogram)].into();
    let layouts: Arc<[Arc<[f64]>]> = vec![Arc::<[f64]>::from(&BOUNDS[..])].into();
    let mut per_shard: Vec<(Vec<u64>, Vec<Point>)> = vec![Default::default(); table.len()];
    for d in deltas {
        for (fi, fam) in families.iter().enumerate() {
            let (series, source) = keys(d, fam);
            let (counts, points) = &mut per_shard[table.shard_of(series)];
            let value = if fam.kind == Kind::Counter {
                PointValue::Int(d.calls)
            } else {
                let from = counts.len() as u32;
                counts.extend_from_slice(&d.buckets);
                PointValue::Histogram {
                    layout: 0,
                    counts: (from, counts.len() as u32),
                    sum: d.sum,
                    count: d.buckets.iter().sum(),
                }
            };
            points.push(Point {
                fp: 0,
                series,
                source,
                resource: 0,
                family: fi as u32,
                label_ref: LabelRef::Entry(d.route),
                start_ns: d.start,
                end_ns: d.end,
                temporality: Temporality::Delta,
                value,
            });
        }
    }
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut waits = 0;
    for (shard, (counts, points)) in per_shard.into_iter().enumerate() {
        if points.is_empty() {
            continue;
        }
        let tx = tx.clone();
        let batch = Batch {
            families: families.clone(),
            layouts: layouts.clone(),
            counts,
            points,
            labels: Arc::new(RouteLabels),
            overflow: false,
            now_ns: None,
            done: Box::new(move |r| tx.send(r).unwrap()),
        };
        assert!(table.try_send(shard, batch).is_ok());
        waits += 1;
    }
    let mut total = BatchResult::default();
    for _ in 0..waits {
        total.add(&rx.recv().unwrap());
    }
    total
}

#[derive(Debug, Default, Clone, PartialEq)]
struct Expected {
    calls: u64,
    buckets: [u64; 5],
    sum: f64,
}

fn read_table(table: &Table) -> BTreeMap<String, Expected> {
    let (tx, rx) = crossbeam_channel::unbounded();
    table.visit(move |_, s| {
        let mut out = Vec::new();
        for series in s.series() {
            let route = s
                .labels(&series.labels)
                .find(|(k, _)| *k == "route")
                .unwrap()
                .1
                .to_string();
            out.push((route, series.value.clone()));
        }
        tx.send(out).unwrap();
    });
    let mut got: BTreeMap<String, Expected> = BTreeMap::new();
    for _ in 0..table.len() {
        for (route, v) in rx.recv().unwrap() {
            let e = got.entry(route).or_default();
            match v {
                SeriesValue::Counter(c) => e.calls += c.int,
                SeriesValue::Histogram { counts, sum, .. } => {
                    for (a, b) in e.buckets.iter_mut().zip(counts.iter()) {
                        *a += b;
                    }
                    e.sum += sum;
                }
            }
        }
    }
    got
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn table(shards: usize) -> Table {
    let cfg = ShardConfig {
        late_ns: 1_000_000,
        ttl_secs: 3600,
        ..ShardConfig::default()
    };
    Table::start(cfg, shards, 64).unwrap()
}

#[test]
fn sharded_merge_equals_reference_under_duplicates_and_reordering() {
    let seed: u64 = std::env::var("MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("model seed: {seed} (rerun with MODEL_SEED={seed})");
    let mut rng = fastrand::Rng::with_seed(seed);
    let base = now_ns() - 60_000_000_000;
    for round in 0..5 {
        let pods = rng.u32(1..20);
        let routes = rng.u32(1..15);
        let steps = rng.u64(1..30);
        let t = table(rng.usize(1..5));
        let mut all = Vec::new();
        for pod in 0..pods {
            for route in 0..routes {
                for step in 0..steps {
                    let buckets = [
                        rng.u64(0..5),
                        rng.u64(0..5),
                        0,
                        rng.u64(0..3),
                        rng.u64(0..2),
                    ];
                    all.push(Delta {
                        pod,
                        route,
                        start: base + step * 100,
                        end: base + (step + 1) * 100,
                        calls: rng.u64(0..100),
                        sum: buckets.iter().sum::<u64>() as f64 * 2.5,
                        buckets,
                    });
                }
            }
        }
        let mut reference: BTreeMap<String, Expected> = BTreeMap::new();
        for d in &all {
            let e = reference.entry(format!("r{}", d.route)).or_default();
            e.calls += d.calls;
            for (a, b) in e.buckets.iter_mut().zip(d.buckets) {
                *a += b;
            }
            e.sum += d.sum;
        }
        // Delivery: every delta once, in shuffled order, plus random retries of earlier ones.
        let mut delivery = all.clone();
        rng.shuffle(&mut delivery);
        let dup_count = rng.usize(0..=all.len());
        for _ in 0..dup_count {
            delivery.push(all[rng.usize(..all.len())].clone());
        }
        rng.shuffle(&mut delivery);
        let mut result = BatchResult::default();
        for chunk in delivery.chunks(rng.usize(1..50)) {
            result.add(&send(&t, chunk));
        }
        let got = read_table(&t);
        assert_eq!(got.len(), reference.len(), "seed {seed} round {round}");
        // Every pod feeds every route's two series: each series counts `pods` source streams.
        let (tx, rx) = crossbeam_channel::unbounded();
        t.visit(move |_, s| {
            tx.send(s.series_with_sources().map(|(_, n)| n).collect::<Vec<_>>())
                .unwrap()
        });
        for _ in 0..t.len() {
            for n in rx.recv().unwrap() {
                assert_eq!(n, pods, "seed {seed} round {round}: sources per series");
            }
        }
        for (route, want) in &reference {
            let g = &got[route];
            assert_eq!(g.calls, want.calls, "seed {seed} round {round} {route}");
            assert_eq!(g.buckets, want.buckets, "seed {seed} round {round} {route}");
            assert!((g.sum - want.sum).abs() < 1e-6, "seed {seed} round {round}");
        }
        let applied = result.get(Outcome::Applied)
            + result.get(Outcome::AppliedAfterGap)
            + result.get(Outcome::AppliedLate);
        assert_eq!(
            applied as usize,
            all.len() * 2,
            "seed {seed}: every distinct delta once"
        );
        assert_eq!(
            result.get(Outcome::Duplicate) as usize,
            dup_count * 2,
            "seed {seed}: every retry dropped"
        );
    }
}

#[test]
fn a_replay_of_an_expired_stream_is_refused() {
    // A stream spanagg does not know whose delta ended more than series_ttl ago could be a
    // replay of data applied before the stream expired: refused, never added twice.
    let t = table(1);
    let old = now_ns() - 7_200_000_000_000;
    let d = Delta {
        pod: 1,
        route: 1,
        start: old,
        end: old + 100,
        calls: 3,
        buckets: [1, 0, 0, 0, 0],
        sum: 0.5,
    };
    let r = send(&t, &[d]);
    assert_eq!(r.get(Outcome::TooLate), 2);
    assert!(read_table(&t).is_empty());
}

#[test]
fn a_delta_older_than_the_late_window_is_refused_and_changes_nothing() {
    let t = table(2);
    let d = |start: u64, calls: u64| Delta {
        pod: 1,
        route: 1,
        start,
        end: start + 100,
        calls,
        buckets: [1, 0, 0, 0, 0],
        sum: 0.5,
    };
    let base = now_ns() - 60_000_000_000;
    send(&t, &[d(base + 10_000_000, 5)]);
    let before = read_table(&t);
    let r = send(&t, &[d(base + 1_000, 7)]);
    assert_eq!(r.get(Outcome::TooLate), 2);
    assert_eq!(read_table(&t), before);
    assert_eq!(before["r1"].calls, 5);
}
