//! A strict reader of what `/metrics` serves, for the fuzz targets and the tests: it accepts
//! only expositions that Prometheus 0.0.4 text and OpenMetrics 1.0 parsers accept *and* that
//! make sense as span metrics. It is stricter than the parsers where a looser exposition would
//! still be wrong for a user: every sample belongs to the family whose `# TYPE` came last (and
//! a `# HELP` to the `# TYPE` after it), no sample name is served by two families, no series
//! appears twice (a label with an empty value counts as absent, as Prometheus reads it), no
//! label name is reserved or repeated, counts and sums are neither negative nor NaN, every
//! histogram has a `_sum` and buckets rising to a `+Inf` bucket equal to its `_count`.

use std::collections::{HashMap, HashSet};

use crate::export::prometheus::Format;

/// What a valid exposition held.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Exposed {
    pub families: usize,
    /// Counter and histogram series (a histogram's lines count once).
    pub series: usize,
}

/// The family being read: its name as `# TYPE` gave it, its type, and what was seen of it.
struct Family {
    name: String,
    histogram: bool,
    /// (sample name, labels without `le`) seen, so no series is served twice.
    seen: HashSet<(String, String)>,
    /// The histogram series whose buckets are being read: labels, last `le`, last count.
    buckets: Option<(String, f64, f64)>,
    /// Histogram series whose `+Inf` bucket was read, and that count, until `_count` comes.
    inf: Vec<(String, f64)>,
}

/// Checks `text` as `format` and says what it held, or the first line that is wrong and why.
pub fn check(text: &str, format: Format) -> Result<Exposed, String> {
    let mut out = Exposed::default();
    let mut names: HashSet<String> = HashSet::new();
    // Which family serves each sample name, and the `# HELP` waiting for its `# TYPE`.
    let mut owners: HashMap<String, String> = HashMap::new();
    let mut help_for: Option<String> = None;
    let mut family: Option<Family> = None;
    let mut eof = false;
    if text.is_empty() && format == Format::Text {
        return Ok(out);
    }
    let body = text
        .strip_suffix('\n')
        .ok_or("the exposition does not end with a newline")?;
    for (n, line) in body.split('\n').enumerate() {
        let fail = |why: &str| format!("line {}: {why}: {line:?}", n + 1);
        if eof {
            return Err(fail("a line after `# EOF`"));
        }
        if line == "# EOF" && format == Format::OpenMetrics {
            eof = true;
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let (word, rest) = rest.split_once(' ').ok_or_else(|| fail("a bare comment"))?;
            let (name, value) = rest.split_once(' ').unwrap_or((rest, ""));
            metric_name(name).map_err(|e| fail(&e))?;
            match word {
                "TYPE" => {
                    if let Some(f) = family.take() {
                        close(f).map_err(|e| fail(&e))?;
                    }
                    let histogram = match value {
                        "counter" => false,
                        "histogram" => true,
                        _ => return Err(fail("a type spanagg does not serve")),
                    };
                    if !names.insert(name.to_owned()) {
                        return Err(fail("a second `# TYPE` for one family"));
                    }
                    if owners.get(name).is_some_and(|owner| owner != name) {
                        return Err(fail("a family named like another family's sample"));
                    }
                    if help_for.take().is_some_and(|h| h != name) {
                        return Err(fail("a `# HELP` for another family before it"));
                    }
                    out.families += 1;
                    family = Some(Family {
                        name: name.to_owned(),
                        histogram,
                        seen: HashSet::new(),
                        buckets: None,
                        inf: Vec::new(),
                    });
                }
                "HELP" => {
                    help(value, format).map_err(|e| fail(&e))?;
                    if help_for.replace(name.to_owned()).is_some() {
                        return Err(fail("two `# HELP` lines without a `# TYPE`"));
                    }
                }
                "UNIT" if format == Format::OpenMetrics => {
                    let f = family
                        .as_ref()
                        .ok_or_else(|| fail("`# UNIT` before `# TYPE`"))?;
                    if f.name != name || !name.ends_with(&format!("_{value}")) {
                        return Err(fail("a unit that is not the family name's suffix"));
                    }
                }
                _ => return Err(fail("an unknown comment")),
            }
            continue;
        }
        let f = family
            .as_mut()
            .ok_or_else(|| fail("a sample before any `# TYPE`"))?;
        let (served, begins) = sample(f, line, format).map_err(|e| fail(&e))?;
        if served != f.name && names.contains(&served) {
            return Err(fail("a sample named like another family"));
        }
        let owner = owners.entry(served).or_insert_with(|| f.name.clone());
        if *owner != f.name {
            return Err(fail(&format!("a sample name family {owner} serves too")));
        }
        out.series += begins;
    }
    if format == Format::OpenMetrics && !eof {
        return Err("no `# EOF`".into());
    }
    if help_for.is_some() {
        return Err("a `# HELP` without its `# TYPE`".into());
    }
    if let Some(f) = family {
        close(f)?;
    }
    Ok(out)
}

fn metric_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':');
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        return Err(format!("invalid metric name {name:?}"));
    }
    Ok(())
}

fn label_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!("invalid label name {name:?}"));
    }
    if name.starts_with("__") {
        return Err(format!("reserved label name {name:?}"));
    }
    Ok(())
}

/// A `# HELP` text: only the escapes the format knows.
fn help(text: &str, format: Format) -> Result<(), String> {
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('\\' | 'n') => {}
                Some('"') if format == Format::OpenMetrics => {}
                _ => return Err("an invalid escape in `# HELP`".into()),
            }
        } else if c == '"' && format == Format::OpenMetrics {
            return Err("an unescaped quote in `# HELP`".into());
        }
    }
    Ok(())
}

/// The value of a float field, as Go's `ParseFloat` and the OpenMetrics ABNF read it.
fn float(text: &str) -> Result<f64, String> {
    match text {
        "NaN" => Ok(f64::NAN),
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        _ if text
            .chars()
            .all(|c| c.is_ascii_digit() || "+-.eE".contains(c)) =>
        {
            text.parse().map_err(|_| format!("invalid number {text:?}"))
        }
        _ => Err(format!("invalid number {text:?}")),
    }
}

/// Reads `{k="v",...}`: the label text without a histogram's `le`, and `le`'s value if present
/// (on a counter `le` is a label like any other).
fn labels(text: &str, histogram: bool) -> Result<(String, Option<String>), String> {
    let mut rest = text;
    let mut names = HashSet::new();
    let mut kept = String::new();
    let mut le = None;
    while !rest.is_empty() {
        let (name, after) = rest.split_once("=\"").ok_or("a label without `=\"`")?;
        label_name(name)?;
        if !names.insert(name) {
            return Err(format!("label {name:?} twice"));
        }
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    _ => return Err("an invalid escape in a label value".into()),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => return Err("an unterminated label value".into()),
            }
        };
        rest = &after[end + 1..];
        rest = match rest.strip_prefix(',') {
            Some(r) if !r.is_empty() => r,
            Some(_) => return Err("a trailing comma".into()),
            None if rest.is_empty() => rest,
            None => return Err("labels not separated by a comma".into()),
        };
        if name == "le" && histogram {
            le = Some(value);
        } else if !value.is_empty() {
            kept.push_str(name);
            kept.push('=');
            kept.push_str(&format!("{value:?},"));
        }
    }
    Ok((kept, le))
}

/// One sample line of family `f`; returns its sample name and how many series it begins.
fn sample(f: &mut Family, line: &str, format: Format) -> Result<(String, usize), String> {
    let (head, value) = line.rsplit_once(' ').ok_or("a sample without a value")?;
    let value = float(value)?;
    let (name, labels_text) = match head.split_once('{') {
        Some((name, rest)) => (
            name,
            rest.strip_suffix('}')
                .ok_or("labels without a closing brace")?,
        ),
        None => (head, ""),
    };
    metric_name(name)?;
    let (kept, le) = labels(labels_text, f.histogram)?;
    let suffix = name
        .strip_prefix(f.name.as_str())
        .ok_or("a sample of another family than its `# TYPE`")?;
    let om = format == Format::OpenMetrics;
    let allowed: &[&str] = match (f.histogram, om) {
        (false, false) => &[""],
        (false, true) => &["_total", "_created"],
        (true, false) => &["_bucket", "_sum", "_count"],
        (true, true) => &["_bucket", "_sum", "_count", "_created"],
    };
    if !allowed.contains(&suffix) {
        return Err(format!("sample suffix {suffix:?} in this family"));
    }
    if le.is_some() != (suffix == "_bucket") {
        return Err("`le` on a sample that is not a bucket, or a bucket without it".into());
    }
    // Counts, sums and created times: spanagg refuses negative and NaN input for all of them.
    if value < 0.0 || value.is_nan() {
        return Err("a negative or NaN count, sum or created time".into());
    }
    if let Some(le) = le {
        let bound = float(&le).map_err(|e| format!("`le`: {e}"))?;
        if value.is_nan() || value < 0.0 || value.fract() != 0.0 {
            return Err("a bucket count that is not a whole number".into());
        }
        match f.buckets.take() {
            Some((labels, last_le, last)) if labels == kept => {
                if bound.is_nan() || bound <= last_le || value < last {
                    return Err("buckets not rising".into());
                }
            }
            Some(_) => return Err("a histogram's buckets end without `+Inf`".into()),
            None => {
                if !f.seen.insert(("_bucket".into(), kept.clone())) {
                    return Err("a series served twice".into());
                }
            }
        }
        if bound == f64::INFINITY {
            f.inf.push((kept, value));
        } else {
            f.buckets = Some((kept, bound, value));
        }
        // The series is counted at its `_count`.
        return Ok((name.to_owned(), 0));
    }
    if f.buckets.is_some() {
        return Err("a histogram's buckets end without `+Inf`".into());
    }
    if suffix == "_count" {
        if !f.seen.contains(&("_sum".to_owned(), kept.clone())) {
            return Err("a histogram without its `_sum`".into());
        }
        let at = f.inf.iter().position(|(l, _)| *l == kept);
        let (_, inf) = f
            .inf
            .swap_remove(at.ok_or("`_count` without buckets before it")?);
        if inf != value {
            return Err("`_count` differs from the `+Inf` bucket".into());
        }
    }
    if !f.seen.insert((suffix.to_owned(), kept)) {
        return Err("a series served twice".into());
    }
    let begins = suffix == "_count" || (!f.histogram && suffix != "_created");
    Ok((name.to_owned(), usize::from(begins)))
}

fn close(f: Family) -> Result<(), String> {
    if f.buckets.is_some() || !f.inf.is_empty() {
        return Err(format!("histogram {} without its `_count`", f.name));
    }
    if f.seen.is_empty() {
        return Err(format!("family {} without samples", f.name));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OM: Format = Format::OpenMetrics;

    #[test]
    fn what_spanagg_serves_is_read() {
        let text = "# TYPE calls counter\ncalls_total{service_name=\"a\\\"b\"} 3\n\
                    calls_created{service_name=\"a\\\"b\"} 1.5\n\
                    # TYPE d_ms histogram\n# UNIT d_ms ms\n\
                    d_ms_bucket{x=\"1\",le=\"1.0\"} 1\nd_ms_bucket{x=\"1\",le=\"+Inf\"} 2\n\
                    d_ms_sum{x=\"1\"} 7\nd_ms_count{x=\"1\"} 2\nd_ms_created{x=\"1\"} 1\n# EOF\n";
        let got = check(text, OM).expect("valid");
        assert_eq!(
            got,
            Exposed {
                families: 2,
                series: 2
            }
        );
    }

    #[test]
    fn each_broken_rule_is_refused() {
        let good = "# TYPE c counter\nc_total{a=\"1\"} 1\n# EOF\n";
        assert!(check(good, OM).is_ok());
        for bad in [
            "# TYPE c counter\nc_total{a=\"1\",a=\"2\"} 1\n# EOF\n",
            "# TYPE c counter\nc_total{__name__=\"x\"} 1\n# EOF\n",
            "# TYPE c counter\nc_total{a=\"1\"} 1\nc_total{a=\"1\"} 2\n# EOF\n",
            "# TYPE c counter\nc_total{a=\"1\"} -1\n# EOF\n",
            "# TYPE c counter\nc_total{a=\"\\x\"} 1\n# EOF\n",
            "# TYPE c counter\nd_total 1\n# EOF\n",
            "# TYPE c counter\nc_total 1\n",
            "# TYPE c counter\nc_total 1\n# EOF\nc_total 1\n",
            "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n# EOF\n",
            "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\n\
             h_count 1\n# EOF\n",
            "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 2\n# EOF\n",
            "# TYPE h histogram\nh_bucket{le=\"+Inf\",le=\"1\"} 1\nh_sum 1\nh_count 1\n# EOF\n",
            "# TYPE h histogram\nh_sum{le=\"1\"} 1\n# EOF\n",
            "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n# EOF\n",
            "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum NaN\nh_count 1\n# EOF\n",
            "# TYPE c counter\nc_total{a=\"1\"} 1\nc_total{a=\"1\",b=\"\"} 1\n# EOF\n",
            "# HELP d x\n# TYPE c counter\nc_total 1\n# EOF\n",
            "# TYPE c counter\nc_total 1\n# TYPE c_total counter\nc_total_total 1\n# EOF\n",
        ] {
            assert!(check(bad, OM).is_err(), "accepted {bad:?}");
        }
    }
}
