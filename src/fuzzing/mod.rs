//! The bodies of the fuzz targets in `fuzz/`, kept in the library so that `tests/fuzz_corpus.rs`
//! replays the committed corpus and every past crash on a stable toolchain, in the test
//! command. Each target takes what a client or a file controls, sends it down the same path
//! the server takes, and panics (a crash for the fuzzer, a failure for the test) when a
//! promise breaks: never on input, only on a violated invariant. Each says whether the input
//! got through (series made, a file loaded), so the test can tell a seed that still reaches
//! the deep end from one refused at the door.
//!
//! Invariants checked on every input that gets as far as a shard:
//! - a request's points are never fewer than the pricing walk counted (admission relies on it);
//! - the borrowed views read every field exactly as prost decodes it (`views`), and a body
//!   brought to regular form is regular;
//! - applying the same request again changes nothing a scrape shows (retries never count twice);
//! - both expositions pass the strict reader in `exposition` and hold every series once.

#![allow(clippy::panic)]

pub mod exposition;
pub mod views;

use std::path::PathBuf;
use std::sync::Arc;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
use opentelemetry_proto::tonic::metrics::v1::{
    metric::Data, number_data_point, AggregationTemporality, Histogram, HistogramDataPoint, Metric,
    NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;

use crate::aggregate::shard::{ShardConfig, ShardState};
use crate::config::{DEFAULT_BY, DEFAULT_WITHOUT};
use crate::export::gzip_parts;
use crate::export::prometheus::{encode_shard, stitch, Format};
use crate::ingest::otlp::{count_points, InputLimits, Projection};
use crate::ingest::view::OtlpBody;
use crate::ingest::{json, wire};
use crate::storage::{checkpoint, replay, wal};
use crate::workload::{kv, single_shard_batch_at};

/// The server clock the targets judge points by: 2026-01-01T00:00:00Z.
pub const NOW_NS: u64 = 1_767_225_600_000_000_000;

/// The largest body the targets decode: the server's default `max_request_bytes` would let a
/// fuzzer spend its time allocating, not finding bugs.
const MAX_BODY: usize = 1 << 20;

/// An OTLP protobuf body as `/v1/metrics` and `MetricsService/Export` receive it.
pub fn otlp_protobuf(data: &[u8]) -> bool {
    let limits = InputLimits::default();
    let Ok(cost) = wire::cost(data) else {
        return false;
    };
    if cost.points > limits.max_points_per_request {
        return false;
    }
    let body = if cost.regular {
        bytes::Bytes::copy_from_slice(data)
    } else {
        let Ok((fixed, _)) = wire::regularize(data, &cost) else {
            return false;
        };
        let again = wire::cost(&fixed).unwrap_or_else(|e| panic!("regularized: {e}"));
        assert!(
            again.regular,
            "a regularized body is not regular: {again:?}"
        );
        fixed
    };
    let req = <ExportMetricsServiceRequest as prost::Message>::decode(&body[..])
        .unwrap_or_else(|e| panic!("a regular body does not decode: {e}"));
    let body = OtlpBody::regular(body);
    views::assert_same(&req, &body);
    let points = count_points(body.view());
    assert!(
        points <= cost.points,
        "the pricing walk counted {} points, the request holds {points}",
        cost.points
    );
    apply_and_check(body)
}

/// An OTLP/JSON body as `/v1/metrics` receives it with `Content-Type: application/json`.
pub fn otlp_json(data: &[u8]) -> bool {
    let Ok(req) = json::decode(data) else {
        return false;
    };
    // What JSON decoded must price and decode as protobuf too: the WAL logs it that way.
    let body = OtlpBody::encode(&req);
    // The server refuses what the walk refuses (JSON may nest deeper): a WAL record it logged
    // would not replay.
    let Ok(cost) = wire::cost(body.bytes()) else {
        return false;
    };
    assert!(cost.regular, "prost's encoding is regular: {cost:?}");
    views::assert_same(&req, &body);
    assert!(count_points(body.view()) <= cost.points);
    if cost.points > InputLimits::default().max_points_per_request {
        return false;
    }
    apply_and_check(body)
}

/// A WAL segment file as replay finds it after a crash: each record it hands on is decoded as
/// start-up replay decodes it and applied.
pub fn wal_segment(data: &[u8]) -> bool {
    let dir = Scratch::new("wal");
    let Ok(()) = std::fs::write(dir.0.join(format!("{:020}.wal", 1)), data) else {
        return false;
    };
    let mut bodies = Vec::new();
    let from = wal::Position {
        segment: 0,
        offset: 0,
    };
    let replayed = wal::replay(&dir.0, from, |kind, payload| {
        let (kind, _accepted, payload) = wal::split_timed(kind, payload);
        bodies.extend(replay::record_body(kind, payload.to_vec(), MAX_BODY));
    });
    if replayed.is_err() {
        return false;
    }
    let mut applied = false;
    for body in bodies {
        applied |= otlp_protobuf(&body);
    }
    applied
}

/// A checkpoint file as the start-up restore finds it: loaded into fresh shards, it is either
/// refused or gives shards whose exposition is valid.
pub fn checkpoint(data: &[u8]) -> bool {
    let dir = Scratch::new("checkpoint");
    let path = dir.0.join(checkpoint::file_name(1));
    let Ok(()) = std::fs::write(&path, data) else {
        return false;
    };
    let mut states = vec![new_state(), new_state()];
    let loaded = checkpoint::load(&path, &mut states).is_ok();
    if loaded {
        expose(&states);
    }
    loaded
}

/// Names, units, descriptions and attributes made of the input, sent as a counter and a
/// histogram from two pods: whatever they hold, the scrape must stay valid.
pub fn exposition(data: &[u8]) -> bool {
    let mut fields = data.split(|b| *b == 0xff).map(String::from_utf8_lossy);
    let mut next = || fields.next().map(|s| s.into_owned()).unwrap_or_default();
    let (name, unit, help) = (next(), next(), next());
    let mut attributes = Vec::new();
    for _ in 0..8 {
        let (k, v) = (next(), next());
        if k.is_empty() && v.is_empty() {
            break;
        }
        attributes.push(kv(&k, v));
    }
    let value = |i: usize| {
        let mut b = [0u8; 8];
        for (j, x) in b.iter_mut().enumerate() {
            *x = data.get(i * 8 + j).copied().unwrap_or(0);
        }
        f64::from_le_bytes(b)
    };
    let bounds: Vec<f64> = (0..data.first().map_or(0, |b| b % 5))
        .map(|i| value(i as usize))
        .collect();
    let mut resource_metrics = Vec::new();
    for pod in ["a", "b"] {
        let mut attrs = attributes.clone();
        attrs.push(kv("k8s.pod.name", pod));
        let point = |kind: u64| NumberDataPoint {
            attributes: attrs.clone(),
            start_time_unix_nano: NOW_NS - 10_000_000_000,
            time_unix_nano: NOW_NS,
            value: Some(if kind == 0 {
                number_data_point::Value::AsInt(data.len() as i64)
            } else {
                number_data_point::Value::AsDouble(value(7).abs())
            }),
            ..Default::default()
        };
        let sum = Metric {
            name: name.clone(),
            unit: unit.clone(),
            description: help.clone(),
            data: Some(Data::Sum(Sum {
                data_points: vec![point(u64::from(data.len().is_multiple_of(2)))],
                aggregation_temporality: AggregationTemporality::Delta as i32,
                is_monotonic: true,
            })),
            ..Default::default()
        };
        // Now and then under the counter's own name: two kinds, one family name.
        let histogram = Metric {
            name: if data.len().is_multiple_of(3) {
                name.clone()
            } else {
                format!("{name}.duration")
            },
            unit: unit.clone(),
            description: help.clone(),
            data: Some(Data::Histogram(Histogram {
                data_points: vec![HistogramDataPoint {
                    attributes: attrs.clone(),
                    start_time_unix_nano: NOW_NS - 10_000_000_000,
                    time_unix_nano: NOW_NS,
                    count: bounds.len() as u64 + 1,
                    sum: Some(value(6)),
                    bucket_counts: vec![1; bounds.len() + 1],
                    explicit_bounds: bounds.clone(),
                    ..Default::default()
                }],
                aggregation_temporality: AggregationTemporality::Delta as i32,
            })),
            ..Default::default()
        };
        resource_metrics.push(ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![kv("service.name", help.clone())],
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope::default()),
                metrics: vec![sum, histogram],
                ..Default::default()
            }],
            ..Default::default()
        });
    }
    apply_and_check(OtlpBody::encode(&ExportMetricsServiceRequest {
        resource_metrics,
    }))
}

fn new_state() -> ShardState {
    let mut s = ShardState::new(ShardConfig::default());
    s.now_ns = NOW_NS;
    s
}

/// Validates, keys and applies `req` to a fresh shard, then again as a retry would. Says
/// whether any series came of it.
fn apply_and_check(req: OtlpBody) -> bool {
    let owned = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let projection = Arc::new(Projection::new(&owned(DEFAULT_BY), &owned(DEFAULT_WITHOUT)));
    let mut state = [new_state()];
    state[0].apply(&single_shard_batch_at(
        &req,
        &projection,
        NOW_NS,
        Some(NOW_NS),
    ));
    let first = expose(&state);
    state[0].apply(&single_shard_batch_at(
        &req,
        &projection,
        NOW_NS,
        Some(NOW_NS),
    ));
    let again = expose(&state);
    assert!(
        first == again,
        "a retry changed the scrape:\n{first}\n---\n{again}"
    );
    state[0].series_len() > 0
}

/// Both expositions of `states` stitched as a scrape stitches its shards, checked; returns the
/// OpenMetrics one.
fn expose(states: &[ShardState]) -> String {
    let mut om = String::new();
    for format in [Format::Text, Format::OpenMetrics] {
        let parts = states
            .iter()
            .map(|s| encode_shard(s, format, states.len()))
            .collect();
        let (text, conflicts) = stitch(parts, format);
        // The gzipped scrape (deflated on the shards) is the same text.
        let parts = states
            .iter()
            .map(|s| gzip_parts::encode_shard(s, format).expect("deflated"))
            .collect();
        let (pieces, gz_conflicts) = gzip_parts::stitch(parts, format);
        let gz = gzip_parts::gzip(pieces.iter().map(|p| &p.text));
        let unzipped =
            crate::ingest::body::decode(gz.into(), crate::ingest::body::Encoding::Gzip, 1 << 30)
                .expect("a valid gzip member");
        assert!(
            unzipped == text.as_bytes() && gz_conflicts == conflicts,
            "the gzipped scrape differs"
        );
        let got = exposition::check(&text, format)
            .unwrap_or_else(|e| panic!("invalid {format:?} exposition: {e}\n{text}"));
        let series: usize = states.iter().map(ShardState::series_len).sum();
        if conflicts == 0 {
            assert_eq!(got.series, series, "series served:\n{text}");
        }
        om = text;
    }
    om
}

/// A directory of its own per call, removed afterwards (the fuzzer runs one input at a time
/// per process; the test may run targets on several threads).
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("spanagg-fuzz-{what}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::create_dir_all(&dir);
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
