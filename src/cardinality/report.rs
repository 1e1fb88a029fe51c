//! The cardinality report as served (JSON) and the label questions it answers, built from the
//! shards' summaries joined (`Merged`), lists cut to a top-N.

use serde::{Deserialize, Serialize};

use super::summary::UNBOUNDED_MIN_VALUES;
use super::summary::{looks_like_id, Cost, LabelAcc, ServiceAcc, ShardSummary};

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
                // Ranked by reference; only the `limit` kept are copied.
                let mut ranked: Vec<(&String, u64)> = acc
                    .map(|a| a.values.iter().map(|(v, n)| (v, *n)).collect())
                    .unwrap_or_default();
                by_count(&mut ranked, |&(v, n)| (n, v));
                let cardinality = ranked
                    .into_iter()
                    .take(limit)
                    .map(|(v, n)| ValueCount {
                        label_value: v.clone(),
                        series_count: n,
                    })
                    .collect();
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
