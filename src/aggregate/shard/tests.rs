//! Unit tests of one shard's interned tables under hostile layouts and churn.

use std::sync::Arc;

use super::*;
use crate::ingest::otlp::Projection;
use crate::workload::{request, single_shard_batch, Shape};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::metrics::v1::metric::Data;

const T: u64 = 1_000_000_000;

/// A shard at data time `T + 100`.
fn shard(cfg: ShardConfig) -> ShardState {
    let mut s = ShardState::new(cfg);
    s.now_ns = T + 100;
    s
}

/// One pod's points for `routes` routes, 4 bounds each, as one batch of interval `[start, start + 10)`.
fn batch(
    routes: usize,
    counters: bool,
    start: u64,
    edit: impl FnOnce(&mut ExportMetricsServiceRequest),
) -> Batch {
    let shape = Shape {
        services: 1,
        routes,
        bounds: 4,
        counters,
    };
    let mut req = request(&shape, 0, start, start + 10);
    edit(&mut req);
    let projection = Arc::new(Projection::new(&["service.name".to_owned()], &[]));
    single_shard_batch(req, &projection)
}

/// Moves the clock past the TTL and sweeps.
fn expire_all(s: &mut ShardState) {
    s.clock += s.ttl_secs() + 1;
    s.now_ns += u64::from(s.ttl_secs() + 1) * 1_000_000_000;
    s.sweep();
}

#[test]
fn refused_layouts_and_expired_series_leave_no_tables_behind() {
    let mut cfg = ShardConfig::default();
    cfg.bounds.insert(
        "traces.span.metrics.duration".into(),
        Arc::from(&[1.0, 2.25][..]),
    );
    let mut s = shard(cfg);
    // Bounds that do not contain 1 (the first bound is moved): every point is refused.
    for i in 0..200u64 {
        let b = batch(5, false, T + i * 10, |req| {
            if let Some(Data::Histogram(h)) =
                &mut req.resource_metrics[0].scope_metrics[0].metrics[0].data
            {
                for p in &mut h.data_points {
                    p.explicit_bounds[0] = 0.5 + i as f64 / 1000.0; // a new layout per request
                }
            }
        });
        assert_eq!(s.apply(&b).get(Outcome::LayoutMismatch), 5);
    }
    assert_eq!(s.series_len(), 0);
    assert_eq!(
        s.table_sizes(),
        (0, 0, 0),
        "refused points intern nothing that stays"
    );

    // Series that exist hold their layout and label names until they expire.
    s.apply(&batch(5, false, T, |_| {}));
    assert_eq!(s.series_len(), 5);
    let (layouts, _, key_sets) = s.table_sizes();
    assert_eq!(
        (layouts, key_sets),
        (1, 1),
        "the configured layout (the input one only lived through its batch)"
    );
    expire_all(&mut s);
    assert_eq!(s.series_len(), 0);
    assert_eq!(
        s.table_sizes(),
        (0, 0, 0),
        "expired series free their tables"
    );
}

#[test]
fn the_series_quota_counts_exactly_the_series_that_exist() {
    let quota = Arc::new(crate::aggregate::quota::SeriesQuota::new(1000, 1000));
    let mut s = shard(ShardConfig {
        quota: quota.clone(),
        max_families: 1,
        ..ShardConfig::default()
    });
    // Two families, one past the cap: its points are refused and count for nothing.
    let r = s.apply(&batch(5, true, T, |_| {}));
    assert_eq!(r.get(Outcome::FamilyLimit), 5);
    // A retry: duplicates create nothing.
    s.apply(&batch(5, true, T, |_| {}));
    assert_eq!(s.series_len(), 5);
    assert_eq!(quota.usage().0, 5);
    expire_all(&mut s);
    assert_eq!(
        quota.usage(),
        (0, 0),
        "expired series are given back, their service forgotten"
    );
}

#[test]
fn overflow_marks_and_pods_stay_within_the_stream_share_and_hold_a_name_once() {
    let mut s = shard(ShardConfig {
        quota: Arc::new(crate::aggregate::quota::SeriesQuota::new(3, u64::MAX)),
        limits: ShardLimits { streams: 8 },
        ..ShardConfig::default()
    });
    // Twenty new streams of one service: 3 series fit its budget, 16 streams (twice the share)
    // may be marked for its overflow series, the last is refused as the stream limit would.
    let r = s.apply(&batch(20, false, T, |_| {}));
    assert_eq!(r.get(Outcome::StreamLimit), 1);
    assert_eq!(r.redirect.map_or(0, |r| r.points.len()), 16);
    assert_eq!(s.budget.sticky_names(), (16, 1), "16 marks, one name");
    // A marked stream goes on to its overflow series when the marks are full.
    let r = s.apply(&batch(20, false, T + 10, |_| {}));
    assert_eq!(r.redirect.map_or(0, |r| r.points.len()), 16);
    // A replay is not refused: it re-applies what was acknowledged.
    let mut replay = batch(21, false, T + 20, |_| {});
    replay.now_ns = Some(T + 100);
    let r = s.apply(&replay);
    assert_eq!(r.get(Outcome::StreamLimit), 0);
    assert_eq!(r.redirect.map_or(0, |r| r.points.len()), 18);

    // Pods: those whose points leave state here, within the share, naming their service once.
    let mut s = shard(ShardConfig {
        limits: ShardLimits { streams: 8 },
        ..ShardConfig::default()
    });
    let pods = |from: usize, n: usize, routes: usize, start: u64| {
        let shape = Shape {
            services: 1,
            routes,
            bounds: 4,
            counters: false,
        };
        let mut req = request(&shape, from, start, start + 10);
        for pod in from + 1..from + n {
            let other = request(&shape, pod, start, start + 10);
            req.resource_metrics.extend(other.resource_metrics);
        }
        let projection = Arc::new(Projection::new(&["service.name".to_owned()], &[]));
        single_shard_batch(req, &projection)
    };
    // Twenty pods whose points ended longer than the TTL ago: refused, none remembered.
    s.now_ns = T + u64::from(s.ttl_secs() + 10) * 1_000_000_000;
    let r = s.apply(&pods(100, 20, 1, T));
    assert_eq!(r.get(Outcome::TooLate), 20);
    assert_eq!(s.pods.len(), 0);
    s.now_ns = T + 100;
    // Four pods of two streams fill the share; twenty more are refused, and not remembered.
    s.apply(&pods(200, 4, 2, T));
    let r = s.apply(&pods(300, 20, 1, T));
    assert_eq!(r.get(Outcome::StreamLimit), 20);
    assert_eq!((s.pods.len(), s.pods.names()), (4, 1));
    expire_all(&mut s);
    assert_eq!(
        (s.pods.len(), s.pods.names()),
        (0, 0),
        "forgotten with their name"
    );
}

#[test]
fn cumulative_histogram_streams_share_their_bounds() {
    let mut s = shard(ShardConfig::default());
    let r = s.apply(&batch(20, false, T, crate::workload::make_cumulative));
    assert_eq!(r.get(Outcome::Applied), 20, "counted from their start");
    // Another pod's request with the same bounds: its streams hold the same allocation.
    let shape = Shape {
        services: 1,
        routes: 20,
        bounds: 4,
        counters: false,
    };
    let mut req = request(&shape, 1, T, T + 10);
    crate::workload::make_cumulative(&mut req);
    let projection = Arc::new(Projection::new(&["service.name".to_owned()], &[]));
    s.apply(&single_shard_batch(req, &projection));
    assert_eq!(s.sources.len(), 40);
    assert_eq!(s.sources.distinct_bounds(), 1, "one layout for 40 streams");
}

#[test]
fn a_broken_invariant_is_an_internal_error_not_the_clients_layout_mismatch() {
    let mut s = shard(ShardConfig::default());
    let mut b = batch(2, false, T, |_| {});
    // A point whose counts lie outside its batch: what only a bug in spanagg could produce.
    if let PointValue::Histogram { counts, .. } = &mut b.points[0].value {
        *counts = (1_000, 1_005);
    }
    let r = s.apply(&b);
    assert_eq!(r.get(Outcome::InternalError), 1);
    assert_eq!(r.get(Outcome::LayoutMismatch), 0);
    assert_eq!(r.get(Outcome::Applied), 1, "the other point is applied");
}

#[test]
fn a_label_handle_the_resolver_did_not_make_is_an_internal_error_and_creates_nothing() {
    let quota = Arc::new(crate::aggregate::quota::SeriesQuota::new(1000, 1000));
    let mut s = shard(ShardConfig {
        quota: quota.clone(),
        ..ShardConfig::default()
    });
    let mut b = batch(3, false, T, |_| {});
    // An overflow handle in an OTLP batch: its resolver cannot name the series.
    b.points[0].label_ref = LabelRef::Entry(0);
    let r = s.apply(&b);
    assert_eq!(r.get(Outcome::InternalError), 1);
    assert_eq!(r.get(Outcome::Applied), 2);
    assert_eq!(s.series_len(), 2, "no series without labels");
    assert_eq!(quota.usage().0, 2);
    assert_eq!(
        s.sources_len(),
        2,
        "no stream recorded for the refused point"
    );
}
