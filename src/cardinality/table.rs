//! The report as terminal tables, for `spanagg cardinality`.

use std::fmt::Write as _;

use super::Report;

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
        let c = &t.scrape;
        let _ = writeln!(
            out,
            "samples per scrape {} before aggregation, {} after ({} saved by output bounds); \
             about {} KiB before, {} KiB after\n",
            c.samples_before,
            c.samples_after,
            c.samples_saved_by_output_bounds,
            c.bytes_before / 1024,
            c.bytes_after / 1024
        );
        let _ = writeln!(
            out,
            "{:<32} {:>6} {:>14} {:>14} {:>10} {:>10} {:>11}  top span names",
            "SERVICE",
            "PODS",
            "OUTPUT SERIES",
            "SOURCE STREAMS",
            "REDUCTION",
            "SPAN NAMES",
            "OVERFLOWED"
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
                "{:<32} {:>6} {:>14} {:>14} {:>9.1}x {:>10} {:>11}  {}",
                s.service,
                s.pods,
                s.output_series,
                s.source_streams,
                s.reduction,
                s.span_names,
                s.overflowed_points,
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
            "\n{:<32} {:>16} {:>14}  top services (distinct values)",
            "LABEL", "DISTINCT VALUES", "OUTPUT SERIES"
        );
        for l in &self.labels {
            let top: Vec<String> = l
                .top_services
                .iter()
                .take(3)
                .map(|s| format!("{} ({})", s.service, s.distinct_values))
                .collect();
            let _ = writeln!(
                out,
                "{:<32} {:>16} {:>14}  {}",
                l.label,
                l.distinct_values,
                l.output_series,
                top.join(", ")
            );
            if let Some(why) = &l.unbounded {
                let _ = writeln!(out, "  ^ likely unbounded: {why}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;

    #[test]
    fn the_table_shows_every_service_metric_and_label() {
        let report = Report::merge(Vec::new(), 5);
        assert!(report.table().contains("output series 0"));
        let json = r#"{"totals":{"output_series":4,"source_streams":12,"source_streams_tracked":12,"reduction":3.0,
            "scrape":{"samples_before":36,"samples_after":12,"bytes_before":3600,"bytes_after":1200,"samples_saved_by_output_bounds":0}},
            "services":[{"service":"checkout","output_series":4,"source_streams":12,"reduction":3.0,"pods":3,
            "scrape":{"samples_before":36,"samples_after":12,"bytes_before":3600,"bytes_after":1200,"samples_saved_by_output_bounds":0},
            "overflowed_points":7,"budget_usage":1.0,"top_span_names":[{"name":"GET /cart","output_series":2,"source_streams":6}],"span_names":2}],
            "metrics":[{"metric":"traces_span_metrics_calls","otel_metric":"traces.span.metrics.calls","output_series":2,"source_streams":6}],
            "labels":[{"label":"span_name","distinct_values":2,"output_series":4,"single_source_series":0,"brief_series":0,
            "id_like_values":0,"unbounded":"2 of 2 values look like ids","top_services":[{"service":"checkout","distinct_values":2}]}]}"#;
        let report: Report = serde_json::from_str(json).unwrap();
        let t = report.table();
        assert!(t.contains("reduction 3.0x"), "{t}");
        assert!(t.contains("checkout") && t.contains("GET /cart (2)"), "{t}");
        assert!(t.contains("traces_span_metrics_calls"), "{t}");
        assert!(t.contains("span_name"), "{t}");
        assert!(t.contains("likely unbounded: 2 of 2"), "{t}");
        assert!(t.contains("checkout (2)"), "{t}");
    }
}
