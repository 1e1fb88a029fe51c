//! The cardinality report: how many output series and input (per-pod) source streams there are,
//! per service, per metric and per span name, the reduction factor, and the distinct values of
//! every label. Each shard summarises its own series (`ShardSummary::of`) on its own thread;
//! `Report::merge` joins the summaries.

use std::collections::{BTreeMap, HashMap, HashSet};

use std::fmt::Write as _;

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

/// One shard's share of a report.
#[derive(Debug, Default)]
pub struct ShardSummary {
    series: u64,
    streams_total: u64,
    services: HashMap<String, (Counts, HashMap<String, Counts>)>,
    metrics: HashMap<String, (String, Counts)>,
    labels: HashMap<String, (u64, HashSet<String>)>,
}

impl ShardSummary {
    /// Summarises the series of one shard that fall in `scope`.
    pub fn of(state: &ShardState, scope: &Scope) -> Self {
        let mut s = ShardSummary {
            streams_total: state.sources_len() as u64,
            ..Default::default()
        };
        for (series, fam, streams) in state.select(scope) {
            let mut service = "";
            let mut span = "";
            for (k, v) in state.labels(&series.labels) {
                match k {
                    "service_name" => service = v,
                    "span_name" => span = v,
                    _ => {}
                }
            }
            let streams = u64::from(streams);
            s.series += 1;
            let svc = s.services.entry(service.to_owned()).or_default();
            svc.0.add(1, streams);
            svc.1.entry(span.to_owned()).or_default().add(1, streams);
            s.metrics
                .entry(fam.name.to_string())
                .or_insert_with(|| (fam.otel_name.to_string(), Counts::default()))
                .1
                .add(1, streams);
            for (k, v) in state.labels(&series.labels) {
                let l = s.labels.entry(k.to_owned()).or_default();
                l.0 += 1;
                if !l.1.contains(v) {
                    l.1.insert(v.to_owned());
                }
            }
        }
        s
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

impl Report {
    /// Joins the shards' summaries; lists are cut to `top` entries.
    pub fn merge(parts: Vec<ShardSummary>, top: usize) -> Self {
        let mut series = 0;
        let mut tracked = 0;
        let mut services: BTreeMap<String, (Counts, HashMap<String, Counts>)> = BTreeMap::new();
        let mut metrics: BTreeMap<String, (String, Counts)> = BTreeMap::new();
        let mut labels: BTreeMap<String, (u64, HashSet<String>)> = BTreeMap::new();
        for p in parts {
            series += p.series;
            tracked += p.streams_total;
            for (name, (c, spans)) in p.services {
                let e = services.entry(name).or_default();
                e.0.add(c.output_series, c.source_streams);
                for (span, sc) in spans {
                    e.1.entry(span)
                        .or_default()
                        .add(sc.output_series, sc.source_streams);
                }
            }
            for (name, (otel, c)) in p.metrics {
                metrics
                    .entry(name)
                    .or_insert_with(|| (otel, Counts::default()))
                    .1
                    .add(c.output_series, c.source_streams);
            }
            for (name, (n, values)) in p.labels {
                let e = labels.entry(name).or_default();
                e.0 += n;
                e.1.extend(values);
            }
        }
        let streams: u64 = services.values().map(|(c, _)| c.source_streams).sum();
        let mut services: Vec<ServiceReport> = services
            .into_iter()
            .map(|(service, (c, spans))| {
                let span_names = spans.len() as u64;
                let mut top_span_names: Vec<NameCounts> = spans
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
            .map(|(label, (n, values))| LabelReport {
                label,
                distinct_values: values.len() as u64,
                output_series: n,
            })
            .collect();
        by_count(&mut labels, |l| (l.distinct_values, &l.label));
        labels.truncate(top);
        Report {
            totals: Totals {
                output_series: series,
                source_streams: streams,
                source_streams_tracked: tracked,
                reduction: ratio(streams, series),
            },
            services,
            metrics,
            labels,
        }
    }
}

impl Report {
    /// The report as terminal tables, for `spanagg cardinality`.
    pub fn table(&self) -> String {
        let t = &self.totals;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "output series {}   source streams {}   reduction {:.1}x   (streams tracked {})\n",
            t.output_series, t.source_streams, t.reduction, t.source_streams_tracked
        );
        let _ = writeln!(
            out,
            "{:<32} {:>14} {:>14} {:>10} {:>10}  top span names",
            "SERVICE", "OUTPUT SERIES", "SOURCE STREAMS", "REDUCTION", "SPAN NAMES"
        );
        for s in &self.services {
            let top: Vec<String> = s
                .top_span_names
                .iter()
                .take(3)
                .map(|n| format!("{} ({})", n.name, n.output_series))
                .collect();
            let _ = writeln!(
                out,
                "{:<32} {:>14} {:>14} {:>9.1}x {:>10}  {}",
                s.service,
                s.output_series,
                s.source_streams,
                s.reduction,
                s.span_names,
                top.join(", ")
            );
        }
        let _ = writeln!(
            out,
            "\n{:<48} {:>14} {:>14}",
            "METRIC", "OUTPUT SERIES", "SOURCE STREAMS"
        );
        for m in &self.metrics {
            let _ = writeln!(
                out,
                "{:<48} {:>14} {:>14}",
                m.metric, m.output_series, m.source_streams
            );
        }
        let _ = writeln!(
            out,
            "\n{:<32} {:>16} {:>14}",
            "LABEL", "DISTINCT VALUES", "OUTPUT SERIES"
        );
        for l in &self.labels {
            let _ = writeln!(
                out,
                "{:<32} {:>16} {:>14}",
                l.label, l.distinct_values, l.output_series
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_every_service_metric_and_label() {
        let report = Report::merge(Vec::new(), 5);
        assert!(report.table().contains("output series 0"));
        let json = r#"{"totals":{"output_series":4,"source_streams":12,"source_streams_tracked":12,"reduction":3.0},
            "services":[{"service":"checkout","output_series":4,"source_streams":12,"reduction":3.0,
            "top_span_names":[{"name":"GET /cart","output_series":2,"source_streams":6}],"span_names":2}],
            "metrics":[{"metric":"traces_span_metrics_calls","otel_metric":"traces.span.metrics.calls","output_series":2,"source_streams":6}],
            "labels":[{"label":"span_name","distinct_values":2,"output_series":4}]}"#;
        let report: Report = serde_json::from_str(json).unwrap();
        let t = report.table();
        assert!(t.contains("reduction 3.0x"), "{t}");
        assert!(t.contains("checkout") && t.contains("GET /cart (2)"), "{t}");
        assert!(t.contains("traces_span_metrics_calls"), "{t}");
        assert!(t.contains("span_name"), "{t}");
    }
}
