//! Prometheus text 0.0.4 and OpenMetrics 1.0 encoders over shard state. Each shard encodes its
//! own series (on its own thread, in parallel) into one part per family; `stitch` joins the
//! parts family by family so every family's lines are contiguous, with one header each.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;

use crate::aggregate::key::{FamilyDesc, Kind};
use crate::aggregate::naming::unit_suffix;
use crate::aggregate::series::{Series, SeriesValue};
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
            // q=0 says "not acceptable".
            if q <= 0.0 || q.is_nan() {
                continue;
            }
            if q > best.1 {
                best = (format, q);
            }
        }
        best.0
    }
}

/// One shard's lines for one family: text, or a deflated segment of it (`gzip_parts`).
#[derive(Debug, Clone)]
pub struct FamilyPart<B = String> {
    pub desc: FamilyDesc,
    pub body: B,
}

fn escape_label(out: &mut String, v: &str) {
    if !v.contains(['\\', '"', '\n']) {
        out.push_str(v);
        return;
    }
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

/// `k="v",k2="v2"` without braces, rendered once per series and reused on every line.
fn render_labels<'a>(out: &mut String, labels: impl Iterator<Item = (&'a str, &'a str)>) {
    out.clear();
    for (i, (k, v)) in labels.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(k);
        out.push_str("=\"");
        escape_label(out, v);
        out.push('"');
    }
}

/// One sample line: `name{labels} value`.
fn line(out: &mut String, name: &str, suffix: &str, labels: &str, value: impl FnOnce(&mut String)) {
    out.push_str(name);
    out.push_str(suffix);
    if !labels.is_empty() {
        out.push('{');
        out.push_str(labels);
        out.push('}');
    }
    out.push(' ');
    value(out);
    out.push('\n');
}

fn push_u64(out: &mut String, v: u64) {
    out.push_str(itoa::Buffer::new().format(v));
}

/// The most bytes one series is assumed to take when a family's body is sized.
const MAX_SERIES_ESTIMATE: usize = 16 << 10;

/// The most one scrape reserves ahead, over all shards and families (each of `shards` takes
/// an equal share, as they encode at once): a family's first series can be a client's
/// oversized one (long label values), and its size times a large family must not become a
/// huge allocation. Past it, bodies grow by doubling (at most twice their length), as they did
/// before they were sized.
const MAX_RESERVED_AHEAD: usize = 64 << 20;

/// Renders series one at a time, keeping what a scrape shares between them: the `le` label
/// texts per layout (`le="0.5"`), and scratch for a series' labels and bucket prefix.
pub(super) struct Renderer<'a> {
    state: &'a ShardState,
    format: Format,
    le_cache: HashMap<u32, Vec<String>>,
    labels: String,
    prefix: String,
}

impl<'a> Renderer<'a> {
    pub(super) fn new(state: &'a ShardState, format: Format) -> Self {
        Self {
            state,
            format,
            le_cache: HashMap::new(),
            labels: String::new(),
            prefix: String::new(),
        }
    }

    /// Appends every line of series `s` of family `name` to `out`.
    pub(super) fn series(&mut self, out: &mut String, name: &str, s: &Series) {
        let (state, format) = (self.state, self.format);
        let labels = &mut self.labels;
        render_labels(labels, state.labels(&s.labels));
        let created = s.created_ns as f64 / 1e9;
        match &s.value {
            SeriesValue::Counter(c) => {
                line(out, name, "_total", labels, |o| {
                    if c.is_int() {
                        push_u64(o, c.int);
                    } else {
                        write_float(o, c.total());
                    }
                });
            }
            SeriesValue::Histogram {
                layout,
                counts,
                sum,
                ..
            } => {
                let les = self.le_cache.entry(*layout).or_insert_with(|| {
                    let bounds = state.layout(*layout);
                    (0..=bounds.len())
                        .map(|i| {
                            let mut le = String::from("le=\"");
                            match bounds.get(i) {
                                Some(b) => write_le(&mut le, *b, format),
                                None => le.push_str("+Inf"),
                            }
                            le.push('"');
                            le
                        })
                        .collect()
                });
                let mut cumulative = 0u64;
                // `_bucket{labels,` is the same on every bucket line of the series.
                let prefix = &mut self.prefix;
                prefix.clear();
                prefix.push_str(name);
                prefix.push_str("_bucket{");
                if !labels.is_empty() {
                    prefix.push_str(labels);
                    prefix.push(',');
                }
                let mut les = les.iter();
                counts.for_each(|c| {
                    cumulative = cumulative.saturating_add(c);
                    let Some(le) = les.next() else { return };
                    out.push_str(prefix);
                    out.push_str(le);
                    out.push_str("} ");
                    push_u64(out, cumulative);
                    out.push('\n');
                });
                line(out, name, "_sum", labels, |o| write_float(o, *sum));
                // The count is the +Inf bucket: equal by construction, as a scrape must show.
                line(out, name, "_count", labels, |o| push_u64(o, cumulative));
            }
        }
        if format == Format::OpenMetrics {
            line(out, name, "_created", labels, |o| write_float(o, created));
        }
    }
}

/// Encodes every series of one of `shards` shards, grouped by family.
pub fn encode_shard(state: &ShardState, format: Format, shards: usize) -> Vec<FamilyPart> {
    let mut parts: Vec<FamilyPart> = state
        .families()
        .iter()
        .map(|d| FamilyPart {
            desc: d.clone(),
            body: String::new(),
        })
        .collect();
    // Series per family, so each body can be sized once its first series is rendered (then set
    // to 0): grown by doubling, a body holds up to twice its length while the scrape is written.
    let mut left = vec![0usize; parts.len()];
    for s in state.series() {
        if let Some(n) = left.get_mut(s.family as usize) {
            *n += 1;
        }
    }
    let mut reserve_left = MAX_RESERVED_AHEAD / shards.max(1);
    let mut render = Renderer::new(state, format);
    for s in state.series() {
        let Some(part) = parts.get_mut(s.family as usize) else {
            continue;
        };
        let out = &mut part.body;
        render.series(out, &part.desc.name, s);
        // After the family's first series: room for the rest at its size, plus an eighth. The
        // size is capped (a 50-bucket series with long labels is ~10 KiB), and so is what the
        // shard reserves in all: one series with 4 KiB label values first in a family of
        // 500,000 must not reserve gigabytes.
        if let Some(n) = left.get_mut(s.family as usize).filter(|n| **n > 0) {
            let per = out.len().min(MAX_SERIES_ESTIMATE);
            let rest = ((*n - 1).saturating_mul(per).saturating_mul(9) / 8).min(reserve_left);
            out.reserve_exact(rest);
            reserve_left -= rest;
            *n = 0;
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
    let (pieces, conflicts) = stitch_pieces(shard_parts, format);
    (pieces.into_iter().map(|p| p.text).collect(), conflicts)
}

/// A piece of the exposition, and the shard that rendered it (`None`: a family header).
pub struct Piece<T = String> {
    pub text: T,
    pub shard: Option<usize>,
}

/// [`stitch`] as the pieces of the exposition in order (each family's header, then the shards'
/// bodies for it, moved, not copied): a scrape streams them, so the exposition is never held
/// twice.
pub fn stitch_pieces(shard_parts: Vec<Vec<FamilyPart>>, format: Format) -> (Vec<Piece>, usize) {
    stitch_with(shard_parts, format, |text| text)
}

/// [`stitch_pieces`] over bodies of any kind; `header` makes one of each header rendered here.
pub fn stitch_with<B>(
    shard_parts: Vec<Vec<FamilyPart<B>>>,
    format: Format,
    mut header: impl FnMut(String) -> B,
) -> (Vec<Piece<B>>, usize) {
    let mut by_name: BTreeMap<String, Vec<(usize, FamilyPart<B>)>> = BTreeMap::new();
    for (shard, parts) in shard_parts.into_iter().enumerate() {
        for part in parts {
            by_name
                .entry(part.desc.name.to_string())
                .or_default()
                .push((shard, part));
        }
    }
    let mut pieces = Vec::with_capacity(by_name.values().map(|p| p.len() + 1).sum::<usize>() + 1);
    let mut conflicts = 0;
    // Sample names served so far: a family whose samples would reuse one (a counter `x_count`
    // beside a histogram `x`) is left out, or parsers refuse the whole exposition.
    let mut claimed: HashSet<String> = HashSet::new();
    for (name, parts) in by_name {
        let Some((_, first)) = parts.first() else {
            continue;
        };
        let kind = first.desc.kind;
        let suffixes: &[&str] = match kind {
            Kind::Counter => &["", "_total", "_created"],
            Kind::Histogram => &["", "_bucket", "_count", "_sum", "_created"],
        };
        let names: Vec<String> = suffixes.iter().map(|s| format!("{name}{s}")).collect();
        if names.iter().any(|n| claimed.contains(n)) {
            conflicts += parts.len();
            continue;
        }
        claimed.extend(names);
        let (type_name, word) = match (kind, format) {
            (Kind::Counter, Format::Text) => (format!("{name}_total"), "counter"),
            (Kind::Counter, Format::OpenMetrics) => (name.clone(), "counter"),
            (Kind::Histogram, _) => (name.clone(), "histogram"),
        };
        let help = parts
            .iter()
            .map(|(_, p)| &*p.desc.help)
            .find(|h| !h.is_empty());
        let mut out = String::new();
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
        pieces.push(Piece {
            text: header(out),
            shard: None,
        });
        for (shard, p) in parts {
            if p.desc.kind != kind {
                conflicts += 1;
                continue;
            }
            pieces.push(Piece {
                text: p.body,
                shard: Some(shard),
            });
        }
    }
    if format == Format::OpenMetrics {
        pieces.push(Piece {
            text: header("# EOF\n".to_owned()),
            shard: None,
        });
    }
    (pieces, conflicts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(name: &str, kind: Kind, body: &str) -> FamilyPart {
        FamilyPart {
            desc: FamilyDesc {
                name: name.into(),
                kind,
                otel_name: name.into(),
                unit: "".into(),
                help: "".into(),
            },
            body: body.into(),
        }
    }

    /// A family's first series with 4 KiB label values, 5,000 ordinary ones after it: sized at
    /// the first, the body would reserve ~92 MB for ~8 MB of text.
    #[test]
    fn an_oversized_first_series_does_not_size_its_family_past_the_shard_cap() {
        use crate::aggregate::shard::{ShardConfig, ShardState};
        use crate::ingest::otlp::Projection;
        use crate::workload::{request, single_shard_batch, Shape};
        use opentelemetry_proto::tonic::common::v1::any_value::Value;
        use opentelemetry_proto::tonic::metrics::v1::metric::Data;

        let shape = Shape {
            services: 1,
            routes: 5_000,
            bounds: 15,
            counters: false,
        };
        let mut req = request(&shape, 0, 1_000, 2_000);
        let metric = &mut req.resource_metrics[0].scope_metrics[0].metrics[0];
        let Some(Data::Histogram(h)) = metric.data.as_mut() else {
            panic!("the workload's first metric is the histogram");
        };
        for kv in &mut h.data_points[0].attributes {
            if kv.key == "span.name" {
                if let Some(v) = kv.value.as_mut() {
                    v.value = Some(Value::StringValue("x".repeat(4_000)));
                }
            }
        }
        let projection = std::sync::Arc::new(Projection::new(&["service.name".into()], &[]));
        let mut state = ShardState::new(ShardConfig::default());
        state.apply(&single_shard_batch(req, &projection));
        // Alone, or as one of 64 shards (which share the cap: 64 x 64 MiB would be 4 GiB).
        for shards in [1, 64] {
            let parts = encode_shard(&state, Format::Text, shards);
            let body = &parts[0].body;
            assert!(
                body.contains(&"x".repeat(4_000)),
                "the long series is in the family"
            );
            // Reserved ahead up to the share (after the first series' ~74 KB), or grown by
            // doubling.
            let share = MAX_RESERVED_AHEAD / shards;
            assert!(
                body.capacity() <= (share + (1 << 20)).max(2 * body.len()),
                "{} bytes reserved for {} bytes of text as one of {shards} shards",
                body.capacity(),
                body.len()
            );
        }
    }

    #[test]
    fn families_whose_samples_clash_are_left_out_and_counted() {
        let parts = vec![vec![
            part(
                "x",
                Kind::Histogram,
                "x_bucket{le=\"+Inf\"} 1\nx_sum 1\nx_count 1\n",
            ),
            part("x_count", Kind::Counter, "x_count_total 5\n"),
            part("x_sum", Kind::Histogram, "x_sum_bucket{le=\"+Inf\"} 1\n"),
            part("y", Kind::Counter, "y_total 2\n"),
            part("y_created", Kind::Counter, "y_created_total 2\n"),
        ]];
        let (text, conflicts) = stitch(parts, Format::OpenMetrics);
        assert_eq!(conflicts, 3, "{text}");
        assert!(!text.contains("x_count_total") && !text.contains("y_created_total"));
        assert!(text.contains("y_total 2") && text.contains("x_count 1"));
    }

    #[test]
    fn q_zero_is_not_acceptable() {
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;version=1.0.0;q=0")),
            Format::Text
        );
        assert_eq!(
            Format::negotiate(Some(
                "application/openmetrics-text;version=1.0.0;q=0,text/plain;q=0.1"
            )),
            Format::Text
        );
    }

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
