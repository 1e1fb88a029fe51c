//! The cardinality report: how many output series and input (per-pod) source streams there are,
//! per service, per metric and per span name, the reduction factor, and the distinct values of
//! every label, flagging labels whose values look unbounded. Each shard summarises its own
//! series (`ShardSummary::of`) on its own thread; `Merged` joins the summaries and answers both
//! the report and the Mimir-style label questions (label names with value counts, values of one
//! label with series counts).

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::aggregate::shard::{SeriesFilter, ShardState};

/// Which series a report covers.
pub type Scope = SeriesFilter;

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
    fn add(&mut self, o: &Cost) {
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
struct ServiceAcc {
    counts: Counts,
    spans: HashMap<String, Counts>,
    /// Resource identities (pods) seen sending to it.
    pods: HashSet<u64>,
    cost: Cost,
    /// Points sent to its overflow series.
    overflowed: u64,
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
    series: u64,
    streams_total: u64,
    services: HashMap<String, ServiceAcc>,
    metrics: HashMap<String, (String, Counts)>,
    labels: HashMap<String, LabelAcc>,
    /// `limits.max_series_per_service` (the shards agree on it).
    series_budget: u64,
}

/// What one label looks like across series.
#[derive(Debug, Default)]
struct LabelAcc {
    series: u64,
    /// Series carrying the label that one source stream (one pod) feeds.
    single_source: u64,
    /// Series carrying the label that were seen only briefly, a while ago (see `is_brief`).
    brief: u64,
    /// Value → series with it.
    values: HashMap<String, u64>,
    /// Service → hashes of the distinct values it sends.
    by_service: HashMap<String, HashSet<u64>>,
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
    fn absorb(&mut self, o: ShardSummary) {
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    pub output_series: u64,
    /// Source streams feeding the reported series.
    pub source_streams: u64,
    /// Source streams tracked in all, whatever the filter (includes cumulative streams that
    /// have only been baselined and feed no series yet).
    pub source_streams_tracked: u64,
    /// source_streams ÷ output_series: how many pod series each served series replaces.
    pub reduction: f64,
    pub scrape: Cost,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NameCounts {
    pub name: String,
    pub output_series: u64,
    pub source_streams: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceReport {
    pub service: String,
    pub output_series: u64,
    pub source_streams: u64,
    pub reduction: f64,
    /// Distinct resource identities (pods) sending to the service within `series_ttl`.
    pub pods: u64,
    pub scrape: Cost,
    /// Points merged into the service's overflow series since they were counted (a service
    /// with any is at its budget).
    pub overflowed_points: u64,
    /// Output series over `limits.max_series_per_service`.
    pub budget_usage: f64,
    /// Span names with the most output series, most first.
    pub top_span_names: Vec<NameCounts>,
    pub span_names: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricReport {
    pub metric: String,
    pub otel_metric: String,
    pub output_series: u64,
    pub source_streams: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelReport {
    pub label: String,
    pub distinct_values: u64,
    pub output_series: u64,
    /// Series with this label that a single source stream (one pod) feeds.
    pub single_source_series: u64,
    /// Series with this label seen only briefly (data spanning at most 2 minutes) and not for
    /// 5 minutes since.
    pub brief_series: u64,
    /// Distinct values that look like ids (digit runs, hex, UUIDs).
    pub id_like_values: u64,
    /// Why the values look unbounded, when they do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unbounded: Option<String>,
    /// Services sending the most distinct values of this label, most first.
    pub top_services: Vec<ServiceValues>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceValues {
    pub service: String,
    pub distinct_values: u64,
}

/// Mimir's `GET /api/v1/cardinality/label_names` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelNames {
    pub label_values_count_total: u64,
    pub label_names_count: u64,
    pub cardinality: Vec<LabelNameCount>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelNameCount {
    pub label_name: String,
    pub label_values_count: u64,
}

/// Mimir's `GET /api/v1/cardinality/label_values` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelValues {
    pub series_count_total: u64,
    pub labels: Vec<LabelValuesOf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelValuesOf {
    pub label_name: String,
    pub label_values_count: u64,
    pub series_count: u64,
    pub cardinality: Vec<ValueCount>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValueCount {
    pub label_value: String,
    pub series_count: u64,
}

/// The whole report, as served on `/api/v1/cardinality`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub totals: Totals,
    /// Services with the most source streams, most first (at most `top`).
    pub services: Vec<ServiceReport>,
    pub metrics: Vec<MetricReport>,
    /// Labels with the most distinct values, most first: ids in span names show up here.
    pub labels: Vec<LabelReport>,
}

fn ratio(streams: u64, series: u64) -> f64 {
    if series == 0 {
        0.0
    } else {
        streams as f64 / series as f64
    }
}

fn by_count<T>(v: &mut [T], key: impl Fn(&T) -> (u64, &str)) {
    v.sort_by(|a, b| {
        let (ca, na) = key(a);
        let (cb, nb) = key(b);
        cb.cmp(&ca).then_with(|| na.cmp(nb))
    });
}

/// The shards' summaries joined, before anything is cut to a top-N.
#[derive(Debug, Default)]
pub struct Merged(ShardSummary);

impl Merged {
    pub fn new(parts: Vec<ShardSummary>) -> Self {
        let mut all = ShardSummary::default();
        for p in parts {
            all.absorb(p);
        }
        Merged(all)
    }

    /// Label names with their distinct value counts, most first (Mimir's `label_names`).
    pub fn label_names(&self, limit: usize) -> LabelNames {
        let mut cardinality: Vec<LabelNameCount> = self
            .0
            .labels
            .iter()
            .map(|(name, acc)| LabelNameCount {
                label_name: name.clone(),
                label_values_count: acc.values.len() as u64,
            })
            .collect();
        by_count(&mut cardinality, |c| (c.label_values_count, &c.label_name));
        let total = cardinality.iter().map(|c| c.label_values_count).sum();
        let names = cardinality.len() as u64;
        cardinality.truncate(limit);
        LabelNames {
            label_values_count_total: total,
            label_names_count: names,
            cardinality,
        }
    }

    /// Values of each named label with their series counts, most first (Mimir's
    /// `label_values`).
    pub fn label_values(&self, names: &[String], limit: usize) -> LabelValues {
        let labels = names
            .iter()
            .map(|name| {
                let acc = self.0.labels.get(name);
                let mut cardinality: Vec<ValueCount> = acc
                    .map(|a| {
                        a.values
                            .iter()
                            .map(|(v, n)| ValueCount {
                                label_value: v.clone(),
                                series_count: *n,
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                by_count(&mut cardinality, |c| (c.series_count, &c.label_value));
                cardinality.truncate(limit);
                LabelValuesOf {
                    label_name: name.clone(),
                    label_values_count: acc.map_or(0, |a| a.values.len() as u64),
                    series_count: acc.map_or(0, |a| a.series),
                    cardinality,
                }
            })
            .collect();
        LabelValues {
            series_count_total: self.0.series,
            labels,
        }
    }

    /// The report, lists cut to `top` entries.
    pub fn report(self, top: usize) -> Report {
        let ShardSummary {
            series,
            streams_total: tracked,
            services,
            metrics,
            labels,
            series_budget,
        } = self.0;
        // Pods and overflow are counted for services without series in scope too; the report
        // lists the services that have some.
        let services: Vec<(String, ServiceAcc)> = services
            .into_iter()
            .filter(|(_, a)| a.counts.output_series > 0)
            .collect();
        let streams: u64 = services.iter().map(|(_, a)| a.counts.source_streams).sum();
        let mut scrape = Cost::default();
        for (_, a) in &services {
            scrape.add(&a.cost);
        }
        let mut services: Vec<ServiceReport> = services
            .into_iter()
            .map(|(service, a)| {
                let c = a.counts;
                let span_names = a.spans.len() as u64;
                let mut top_span_names: Vec<NameCounts> = a
                    .spans
                    .into_iter()
                    .map(|(name, sc)| NameCounts {
                        name,
                        output_series: sc.output_series,
                        source_streams: sc.source_streams,
                    })
                    .collect();
                by_count(&mut top_span_names, |n| (n.output_series, &n.name));
                top_span_names.truncate(top);
                ServiceReport {
                    pods: a.pods.len() as u64,
                    scrape: a.cost,
                    overflowed_points: a.overflowed,
                    budget_usage: ratio(c.output_series, series_budget),
                    service,
                    output_series: c.output_series,
                    source_streams: c.source_streams,
                    reduction: ratio(c.source_streams, c.output_series),
                    top_span_names,
                    span_names,
                }
            })
            .collect();
        by_count(&mut services, |s| (s.source_streams, &s.service));
        services.truncate(top);
        let mut metrics: Vec<MetricReport> = metrics
            .into_iter()
            .map(|(metric, (otel_metric, c))| MetricReport {
                metric,
                otel_metric,
                output_series: c.output_series,
                source_streams: c.source_streams,
            })
            .collect();
        by_count(&mut metrics, |m| (m.output_series, &m.metric));
        let mut labels: Vec<LabelReport> = labels
            .into_iter()
            .map(|(label, acc)| label_report(label, acc, top))
            .collect();
        by_count(&mut labels, |l| (l.distinct_values, &l.label));
        labels.truncate(top);
        Report {
            totals: Totals {
                output_series: series,
                source_streams: streams,
                source_streams_tracked: tracked,
                reduction: ratio(streams, series),
                scrape,
            },
            services,
            metrics,
            labels,
        }
    }
}

fn label_report(label: String, acc: LabelAcc, top: usize) -> LabelReport {
    let distinct = acc.values.len() as u64;
    let id_like = acc.values.keys().filter(|v| looks_like_id(v)).count() as u64;
    // service_name is what the report is broken down by, not a suspect.
    let unbounded = (distinct >= UNBOUNDED_MIN_VALUES && label != "service_name")
        .then(|| {
            if id_like * 2 >= distinct {
                Some(format!("{id_like} of {distinct} values look like ids"))
            } else if acc.single_source * 5 >= acc.series * 4 {
                Some(format!(
                    "{}% of its series are fed by a single pod",
                    acc.single_source * 100 / acc.series.max(1)
                ))
            } else if acc.brief * 5 >= acc.series * 4 {
                Some(format!(
                    "{}% of its series were seen briefly and not since",
                    acc.brief * 100 / acc.series.max(1)
                ))
            } else {
                None
            }
        })
        .flatten();
    let mut top_services: Vec<ServiceValues> = acc
        .by_service
        .into_iter()
        .map(|(service, values)| ServiceValues {
            service,
            distinct_values: values.len() as u64,
        })
        .collect();
    by_count(&mut top_services, |s| (s.distinct_values, &s.service));
    top_services.truncate(top.min(5));
    LabelReport {
        label,
        distinct_values: distinct,
        output_series: acc.series,
        single_source_series: acc.single_source,
        brief_series: acc.brief,
        id_like_values: id_like,
        unbounded,
        top_services,
    }
}

impl Report {
    /// Joins the shards' summaries; lists are cut to `top` entries.
    pub fn merge(parts: Vec<ShardSummary>, top: usize) -> Self {
        Merged::new(parts).report(top)
    }

    /// Labels flagged as unbounded, with why.
    pub fn unbounded_labels(&self) -> impl Iterator<Item = &LabelReport> {
        self.labels.iter().filter(|l| l.unbounded.is_some())
    }
}

#[path = "cardinality_table.rs"]
mod table;

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
