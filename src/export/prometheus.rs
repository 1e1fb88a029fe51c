//! Prometheus text 0.0.4 and OpenMetrics 1.0 encoders over shard state. Each shard encodes its
//! own series (on its own thread, in parallel) into one part per family; `stitch` joins the
//! parts family by family so every family's lines are contiguous, with one header each.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::aggregate::key::{FamilyDesc, Kind};
use crate::aggregate::naming::unit_suffix;
use crate::aggregate::series::SeriesValue;
use crate::aggregate::shard::ShardState;

/// Exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    OpenMetrics,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Text => "text/plain; version=0.0.4; charset=utf-8",
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// Picks the format from an `Accept` header by q-value; text when nothing better matches.
    pub fn negotiate(accept: Option<&str>) -> Self {
        let Some(accept) = accept else {
            return Self::Text;
        };
        let mut best = (Self::Text, -1.0f32);
        for part in accept.split(',') {
            let mut params = part.split(';');
            let media = params.next().unwrap_or("").trim().to_ascii_lowercase();
            let mut q = 1.0f32;
            let mut version = None;
            for p in params {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                match k.trim() {
                    "q" => q = v.trim().parse().unwrap_or(0.0),
                    "version" => version = Some(v.trim().to_owned()),
                    _ => {}
                }
            }
            let format = match media.as_str() {
                "application/openmetrics-text"
                    if version.as_deref().is_none_or(|v| v.starts_with("1.")) =>
                {
                    Self::OpenMetrics
                }
                "text/plain" | "*/*" | "text/*" => Self::Text,
                _ => continue,
            };
            if q > best.1 {
                best = (format, q);
            }
        }
        best.0
    }
}

/// One shard's lines for one family.
#[derive(Debug, Clone)]
pub struct FamilyPart {
    pub desc: FamilyDesc,
    pub body: String,
}

fn escape_label(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn write_float(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else {
        let _ = write!(out, "{v}");
    }
}

/// `le` values: OpenMetrics wants a canonical float (`1.0`), text keeps Go's shortest form.
fn write_le(out: &mut String, v: f64, format: Format) {
    write_float(out, v);
    if format == Format::OpenMetrics && v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        out.push_str(".0");
    }
}

fn write_labels(
    out: &mut String,
    labels: &[(std::sync::Arc<str>, std::sync::Arc<str>)],
    le: Option<&str>,
) {
    if labels.is_empty() && le.is_none() {
        return;
    }
    out.push('{');
    let mut first = true;
    for (k, v) in labels {
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(k);
        out.push_str("=\"");
        escape_label(out, v);
        out.push('"');
    }
    if let Some(le) = le {
        if !first {
            out.push(',');
        }
        out.push_str("le=\"");
        out.push_str(le);
        out.push('"');
    }
    out.push('}');
}

/// Encodes every series of one shard, grouped by family.
pub fn encode_shard(state: &ShardState, format: Format) -> Vec<FamilyPart> {
    let mut parts: Vec<FamilyPart> = state
        .families()
        .iter()
        .map(|d| FamilyPart {
            desc: d.clone(),
            body: String::new(),
        })
        .collect();
    let mut le = String::new();
    for s in state.series() {
        let Some(part) = parts.get_mut(s.family as usize) else {
            continue;
        };
        let out = &mut part.body;
        let name = &*part.desc.name;
        let created = s.created_ns as f64 / 1e9;
        match &s.value {
            SeriesValue::Counter(c) => {
                out.push_str(name);
                out.push_str("_total");
                write_labels(out, &s.labels, None);
                out.push(' ');
                if c.is_int() {
                    let _ = write!(out, "{}", c.int);
                } else {
                    write_float(out, c.total());
                }
                out.push('\n');
                if format == Format::OpenMetrics {
                    out.push_str(name);
                    out.push_str("_created");
                    write_labels(out, &s.labels, None);
                    out.push(' ');
                    write_float(out, created);
                    out.push('\n');
                }
            }
            SeriesValue::Histogram {
                layout,
                counts,
                sum,
                count,
            } => {
                let bounds = state.layout(*layout);
                let mut cumulative = 0u64;
                for (i, c) in counts.iter().enumerate() {
                    cumulative = cumulative.saturating_add(*c);
                    le.clear();
                    match bounds.get(i) {
                        Some(b) => write_le(&mut le, *b, format),
                        None => le.push_str("+Inf"),
                    }
                    out.push_str(name);
                    out.push_str("_bucket");
                    write_labels(out, &s.labels, Some(&le));
                    let _ = writeln!(out, " {cumulative}");
                }
                out.push_str(name);
                out.push_str("_sum");
                write_labels(out, &s.labels, None);
                out.push(' ');
                write_float(out, *sum);
                out.push('\n');
                out.push_str(name);
                out.push_str("_count");
                write_labels(out, &s.labels, None);
                let _ = writeln!(out, " {count}");
                if format == Format::OpenMetrics {
                    out.push_str(name);
                    out.push_str("_created");
                    write_labels(out, &s.labels, None);
                    out.push(' ');
                    write_float(out, created);
                    out.push('\n');
                }
            }
        }
    }
    parts.retain(|p| !p.body.is_empty());
    parts
}

fn escape_help(out: &mut String, help: &str, format: Format) {
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if format == Format::OpenMetrics => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

/// Joins the shards' parts into one exposition, families sorted by name. If two families share
/// a name but not a kind, the first kind wins and the others are left out (and counted in the
/// returned number) so the output stays valid.
pub fn stitch(shard_parts: Vec<Vec<FamilyPart>>, format: Format) -> (String, usize) {
    let mut by_name: BTreeMap<String, Vec<FamilyPart>> = BTreeMap::new();
    for part in shard_parts.into_iter().flatten() {
        by_name
            .entry(part.desc.name.to_string())
            .or_default()
            .push(part);
    }
    let mut out = String::with_capacity(
        by_name
            .values()
            .flatten()
            .map(|p| p.body.len())
            .sum::<usize>()
            + 4096,
    );
    let mut conflicts = 0;
    for (name, parts) in by_name {
        let Some(first) = parts.first() else { continue };
        let kind = first.desc.kind;
        let (type_name, word) = match (kind, format) {
            (Kind::Counter, Format::Text) => (format!("{name}_total"), "counter"),
            (Kind::Counter, Format::OpenMetrics) => (name.clone(), "counter"),
            (Kind::Histogram, _) => (name.clone(), "histogram"),
        };
        let help = parts.iter().map(|p| &*p.desc.help).find(|h| !h.is_empty());
        if let Some(help) = help {
            let _ = write!(out, "# HELP {type_name} ");
            escape_help(&mut out, help, format);
            out.push('\n');
        }
        let _ = writeln!(out, "# TYPE {type_name} {word}");
        if format == Format::OpenMetrics {
            if let Some(unit) = unit_suffix(&name, &first.desc.unit) {
                let _ = writeln!(out, "# UNIT {type_name} {unit}");
            }
        }
        for p in &parts {
            if p.desc.kind != kind {
                conflicts += 1;
                continue;
            }
            out.push_str(&p.body);
        }
    }
    if format == Format::OpenMetrics {
        out.push_str("# EOF\n");
    }
    (out, conflicts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_accept_header_prefers_openmetrics() {
        let prom = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                    version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prom)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(Some("text/plain")), Format::Text);
        assert_eq!(Format::negotiate(None), Format::Text);
        assert_eq!(
            Format::negotiate(Some("text/plain;q=0.9,application/openmetrics-text;q=0.2")),
            Format::Text
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let mut s = String::new();
        escape_label(&mut s, "a\"b\\c\nd");
        assert_eq!(s, "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn openmetrics_le_is_canonical() {
        let mut s = String::new();
        write_le(&mut s, 1.0, Format::OpenMetrics);
        assert_eq!(s, "1.0");
        s.clear();
        write_le(&mut s, 0.25, Format::OpenMetrics);
        assert_eq!(s, "0.25");
        s.clear();
        write_le(&mut s, 1.0, Format::Text);
        assert_eq!(s, "1");
    }
}
