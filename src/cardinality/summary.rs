//! One shard's share of a cardinality report (`ShardSummary::of`, run on the shard's own
//! thread) and how shares add up. The report's own shape is `report.rs`.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::Scope;
use crate::aggregate::shard::ShardState;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub output_series: u64,
    pub source_streams: u64,
}

impl Counts {
    fn add(&mut self, series: u64, streams: u64) {
        self.output_series += series;
        self.source_streams += streams;
    }
}

/// Estimated scrape cost: samples and exposition bytes per scrape, before aggregation (every
/// pod's series, as a per-pod scrape or the Prometheus tier spanagg replaces would see them)
/// and after (what spanagg serves). Bytes assume the output labels on both sides (per-pod series
/// carry more, so `bytes_before` is a floor).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cost {
    pub samples_before: u64,
    pub samples_after: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Histogram samples `histogram.output_bounds` (or coarser merge bounds) saves after
    /// aggregation: input buckets minus served buckets.
    pub samples_saved_by_output_bounds: u64,
}

impl Cost {
    pub(super) fn add(&mut self, o: &Cost) {
        self.samples_before += o.samples_before;
        self.samples_after += o.samples_after;
        self.bytes_before += o.bytes_before;
        self.bytes_after += o.bytes_after;
        self.samples_saved_by_output_bounds += o.samples_saved_by_output_bounds;
    }

    /// One output series fed by `streams` source streams.
    fn of(
        series: &crate::aggregate::series::Series,
        family: &str,
        labels: u64,
        streams: u64,
    ) -> Cost {
        use crate::aggregate::series::SeriesValue;
        // name{labels} value\n; histogram lines add a suffix and an `le` label.
        let (after, input, line) = match &series.value {
            SeriesValue::Counter(_) => (1, 1, family.len() as u64 + 6 + labels + 12),
            SeriesValue::Histogram {
                counts,
                input_buckets,
                ..
            } => {
                let served = counts.len() as u64;
                let input = u64::from(*input_buckets).max(served);
                (
                    served + 2,
                    input + 2,
                    family.len() as u64 + 7 + labels + 12 + 10,
                )
            }
        };
        Cost {
            samples_before: streams * input,
            samples_after: after,
            bytes_before: streams * input * line,
            bytes_after: after * line,
            samples_saved_by_output_bounds: input - after,
        }
    }
}

/// One service's numbers in a summary.
#[derive(Debug, Default)]
pub(super) struct ServiceAcc {
    pub(super) counts: Counts,
    pub(super) spans: HashMap<String, Counts>,
    /// Resource identities (pods) seen sending to it.
    pub(super) pods: HashSet<u64>,
    pub(super) cost: Cost,
    /// Points sent to its overflow series.
    pub(super) overflowed: u64,
}

impl ServiceAcc {
    fn absorb(&mut self, o: ServiceAcc) {
        self.counts
            .add(o.counts.output_series, o.counts.source_streams);
        for (span, c) in o.spans {
            self.spans
                .entry(span)
                .or_default()
                .add(c.output_series, c.source_streams);
        }
        self.pods.extend(o.pods);
        self.cost.add(&o.cost);
        self.overflowed += o.overflowed;
    }
}

/// One shard's share of a report, or (absorbed into one another) all shards'.
#[derive(Debug, Default)]
pub struct ShardSummary {
    pub(super) series: u64,
    pub(super) streams_total: u64,
    pub(super) services: HashMap<String, ServiceAcc>,
    pub(super) metrics: HashMap<String, (String, Counts)>,
    pub(super) labels: HashMap<String, LabelAcc>,
    /// `limits.max_series_per_service` (the shards agree on it).
    pub(super) series_budget: u64,
}

/// What one label looks like across series.
#[derive(Debug, Default)]
pub(super) struct LabelAcc {
    pub(super) series: u64,
    /// Series carrying the label that one source stream (one pod) feeds.
    pub(super) single_source: u64,
    /// Series carrying the label that were seen only briefly, a while ago (see `is_brief`).
    pub(super) brief: u64,
    /// Value → series with it.
    pub(super) values: HashMap<String, u64>,
    /// Service → hashes of the distinct values it sends.
    pub(super) by_service: HashMap<String, HashSet<u64>>,
}

impl LabelAcc {
    fn add(&mut self, other: LabelAcc) {
        self.series += other.series;
        self.single_source += other.single_source;
        self.brief += other.brief;
        for (v, n) in other.values {
            *self.values.entry(v).or_default() += n;
        }
        for (svc, hashes) in other.by_service {
            self.by_service.entry(svc).or_default().extend(hashes);
        }
    }
}

/// A series is *brief* when all its data spans at most this long…
pub const BRIEF_SPAN_NS: u64 = 120_000_000_000;
/// …and nothing came for at least this long: a value that appeared once and went (request ids,
/// per-run names). Such series linger until `series_ttl` and cost all the while.
pub const BRIEF_QUIET_NS: u64 = 300_000_000_000;

fn is_brief(s: &crate::aggregate::series::Series, now_ns: u64) -> bool {
    s.updated_ns.saturating_sub(s.created_ns) <= BRIEF_SPAN_NS
        && now_ns.saturating_sub(s.updated_ns) >= BRIEF_QUIET_NS
}

/// A label with at least this many distinct values can be flagged as unbounded.
pub const UNBOUNDED_MIN_VALUES: u64 = 100;

/// Whether a label value looks like an id: a run of 4+ digits, a hex run of 8+ characters with
/// a digit in it, or a UUID. Ids in span names (`GET /users/12345`) are the classic explosion.
pub fn looks_like_id(v: &str) -> bool {
    v.split(|c: char| !c.is_ascii_alphanumeric()).any(|tok| {
        let digits = tok.bytes().filter(u8::is_ascii_digit).count();
        (tok.len() >= 4 && digits == tok.len())
            || (tok.len() >= 8 && digits > 0 && tok.bytes().all(|b| b.is_ascii_hexdigit()))
    })
}

impl ShardSummary {
    /// Summarises the series of one shard that fall in `scope`.
    pub fn of(state: &ShardState, scope: &Scope) -> Self {
        let mut s = ShardSummary {
            streams_total: state.sources_len() as u64,
            series_budget: state.series_budget(),
            ..Default::default()
        };
        let in_scope = |service: &str| scope.service.as_deref().is_none_or(|want| want == service);
        for (service, u) in state.service_use() {
            if u.overflowed > 0 && in_scope(service) {
                s.services.entry(service.to_owned()).or_default().overflowed += u.overflowed;
            }
        }
        for (pod, service) in state.pods() {
            if in_scope(service) {
                s.services
                    .entry(service.to_owned())
                    .or_default()
                    .pods
                    .insert(pod);
            }
        }
        for (series, fam, streams) in state.select(scope) {
            let (mut service, mut span, mut label_bytes) = ("", "", 0u64);
            for (k, v) in state.labels(&series.labels) {
                match k {
                    "service_name" => service = v,
                    "span_name" => span = v,
                    _ => {}
                }
                label_bytes += (k.len() + v.len() + 4) as u64;
            }
            let streams = u64::from(streams);
            let brief = is_brief(series, state.now_ns);
            s.series += 1;
            let svc = s.services.entry(service.to_owned()).or_default();
            svc.counts.add(1, streams);
            svc.spans
                .entry(span.to_owned())
                .or_default()
                .add(1, streams);
            svc.cost
                .add(&Cost::of(series, &fam.name, label_bytes, streams));
            s.metrics
                .entry(fam.name.to_string())
                .or_insert_with(|| (fam.otel_name.to_string(), Counts::default()))
                .1
                .add(1, streams);
            for (k, v) in state.labels(&series.labels) {
                let l = s.labels.entry(k.to_owned()).or_default();
                l.series += 1;
                if streams == 1 {
                    l.single_source += 1;
                }
                if brief {
                    l.brief += 1;
                }
                match l.values.get_mut(v) {
                    Some(n) => *n += 1,
                    None => {
                        l.values.insert(v.to_owned(), 1);
                    }
                }
                l.by_service
                    .entry(service.to_owned())
                    .or_default()
                    .insert(xxhash_rust::xxh3::xxh3_64(v.as_bytes()));
            }
        }
        s
    }

    /// Adds another shard's summary to this one.
    pub(super) fn absorb(&mut self, o: ShardSummary) {
        self.series += o.series;
        self.streams_total += o.streams_total;
        self.series_budget = self.series_budget.max(o.series_budget);
        for (name, acc) in o.services {
            self.services.entry(name).or_default().absorb(acc);
        }
        for (name, (otel, c)) in o.metrics {
            self.metrics
                .entry(name)
                .or_insert_with(|| (otel, Counts::default()))
                .1
                .add(c.output_series, c.source_streams);
        }
        for (name, acc) in o.labels {
            self.labels.entry(name).or_default().add(acc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_recognised_and_routes_are_not() {
        for id in [
            "GET /users/12345",
            "/orders/9f86d081884c7d65",
            "/x/123e4567-e89b-12d3-a456-426614174000",
        ] {
            assert!(looks_like_id(id), "{id}");
        }
        for route in [
            "GET /users/{id}",
            "POST /checkout",
            "GET /api/v1/route",
            "deadbeef",
        ] {
            assert!(!looks_like_id(route), "{route}");
        }
    }
}
