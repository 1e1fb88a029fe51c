//! OTel → Prometheus names, per the OpenTelemetry Prometheus compatibility spec: metric names
//! get their unit and `_total` suffixes, characters outside `[a-zA-Z0-9_:]` become `_`, and
//! attribute keys are sanitised the same way (`span.name` → `span_name`). Label names that
//! Prometheus or spanagg reserve are renamed with the `exported_` prefix, as Prometheus renames
//! target labels that clash with its own: no attribute can make a scrape invalid.

/// Replaces every character Prometheus does not allow with `_`, collapses runs of `_` that the
/// replacement created, and prefixes a leading digit.
pub fn sanitize_metric_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 1);
    for c in name.chars() {
        let ok = c.is_ascii_alphanumeric() || c == '_' || c == ':';
        if ok {
            out.push(c);
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// Label keys: like metric names but without `:`; a leading digit gets a `key_` prefix.
pub fn sanitize_label_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 4);
    sanitize_label_key_into(key, &mut out);
    out
}

fn sanitize_label_key_into(key: &str, out: &mut String) {
    for c in key.chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            out.push(c);
        } else {
            out.push('_');
        }
    }
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert_str(0, "key_");
    }
}

/// The label that marks an overflow series (the OpenTelemetry convention); reserved, so a
/// client attribute of that name cannot pose as one.
pub const OVERFLOW_LABEL: &str = "otel_metric_overflow";

/// What Prometheus puts before a label name that clashes with one it reserves.
pub const EXPORTED_PREFIX: &str = "exported_";

/// The output label name of an attribute key, written into `out`: sanitised, then prefixed
/// with `exported_` when the name is reserved — `__*` (Prometheus internals), `le` on a
/// histogram (its bucket label) or `otel_metric_overflow` (spanagg's overflow series).
/// Returns whether it was renamed.
pub fn output_label_name(key: &str, histogram: bool, out: &mut String) -> bool {
    out.clear();
    sanitize_label_key_into(key, out);
    let reserved = out.starts_with("__") || (histogram && out == "le") || out == OVERFLOW_LABEL;
    if reserved {
        out.insert_str(0, EXPORTED_PREFIX);
    }
    reserved
}

/// Whether `name` is a family name spanagg could have made (one `sanitize_metric_name` leaves
/// as it is). Names read back from a file are checked with it before they can reach a scrape.
pub fn is_metric_name(name: &str) -> bool {
    !name.is_empty() && sanitize_metric_name(name) == name
}

/// Whether `name` is an output label name spanagg could have made for a series of this kind.
pub fn is_label_name(name: &str, histogram: bool) -> bool {
    let mut out = String::new();
    name == OVERFLOW_LABEL || (!output_label_name(name, histogram, &mut out) && out == name)
}

/// The Prometheus word for an UCUM unit, or `None` when nothing is appended.
fn unit_word(unit: &str) -> Option<String> {
    // Annotations like `{call}` carry no unit.
    let unit = unit.split('{').next().unwrap_or("").trim();
    if unit.is_empty() || unit == "1" {
        return None;
    }
    let word = |u: &str| -> String {
        match u {
            "d" => "days",
            "h" => "hours",
            "min" => "minutes",
            "s" => "seconds",
            "ms" => "milliseconds",
            "us" => "microseconds",
            "ns" => "nanoseconds",
            "By" => "bytes",
            "KiBy" => "kibibytes",
            "MiBy" => "mebibytes",
            "GiBy" => "gibibytes",
            "KBy" => "kilobytes",
            "MBy" => "megabytes",
            "GBy" => "gigabytes",
            "bit" => "bits",
            "m" => "meters",
            "V" => "volts",
            "A" => "amperes",
            "J" => "joules",
            "W" => "watts",
            "g" => "grams",
            "Cel" => "celsius",
            "Hz" => "hertz",
            "%" => "percent",
            other => other,
        }
        .to_owned()
    };
    Some(match unit.split_once('/') {
        Some((num, per)) => {
            let per = match per {
                "s" => "second",
                "m" => "minute",
                "h" => "hour",
                "d" => "day",
                other => other,
            };
            if num.is_empty() {
                format!("per_{per}")
            } else {
                format!("{}_per_{per}", word(num))
            }
        }
        None => word(unit),
    })
}

/// The Prometheus family name (without the `_total` sample suffix of counters).
pub fn family_name(otel_name: &str, unit: &str) -> String {
    let mut name = sanitize_metric_name(otel_name);
    if let Some(word) = unit_word(unit) {
        let word = sanitize_metric_name(&word);
        let word = word.trim_matches('_');
        if !word.is_empty() && !name.split('_').any(|part| part == word) {
            name.push('_');
            name.push_str(word);
        }
    }
    // A counter family must not itself end in `_total`: the suffix belongs to the sample.
    // A name that is nothing but the suffix keeps it: a family name is never empty.
    if let Some(stripped) = name.strip_suffix("_total") {
        if !stripped.is_empty() {
            name.truncate(stripped.len());
        }
    }
    name
}

/// The unit word as OpenMetrics `# UNIT` wants it, if the family name ends with it.
pub fn unit_suffix(family: &str, unit: &str) -> Option<String> {
    let word = sanitize_metric_name(&unit_word(unit)?);
    family.ends_with(&format!("_{word}")).then_some(word)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_read_back_from_files_are_checked_as_spanagg_makes_them() {
        assert!(is_metric_name("traces_span_metrics_calls") && is_metric_name("a:b__c"));
        for bad in ["", "9a", "a\"b", "a b", "a-b"] {
            assert!(!is_metric_name(bad), "{bad:?}");
        }
        assert!(is_label_name("span_name", true) && is_label_name("le", false));
        assert!(is_label_name(OVERFLOW_LABEL, false) && is_label_name("exported_le", true));
        for bad in ["", "le", "__name__", "a b", "0a", "a\"b"] {
            assert!(!is_label_name(bad, true), "{bad:?}");
        }
    }

    #[test]
    fn spanmetrics_names_translate_per_the_compatibility_spec() {
        assert_eq!(
            family_name("traces.span.metrics.duration", "ms"),
            "traces_span_metrics_duration_milliseconds"
        );
        assert_eq!(
            family_name("traces.span.metrics.duration", "s"),
            "traces_span_metrics_duration_seconds"
        );
        assert_eq!(
            family_name("traces.span.metrics.calls", "{call}"),
            "traces_span_metrics_calls"
        );
        assert_eq!(
            family_name("traces.span.metrics.calls", "1"),
            "traces_span_metrics_calls"
        );
        assert_eq!(family_name("calls_total", ""), "calls");
        assert_eq!(family_name("_total", ""), "_total", "never empty");
        assert_eq!(family_name(".total", ""), "_total");
    }

    #[test]
    fn units_with_per_and_existing_suffix() {
        assert_eq!(family_name("net.io", "By/s"), "net_io_bytes_per_second");
        assert_eq!(
            family_name("duration_seconds", "s"),
            "duration_seconds",
            "no double unit"
        );
    }

    #[test]
    fn label_keys_are_sanitised() {
        assert_eq!(sanitize_label_key("span.name"), "span_name");
        assert_eq!(sanitize_label_key("http.route"), "http_route");
        assert_eq!(sanitize_label_key("1abc"), "key_1abc");
        assert_eq!(sanitize_label_key("a-b/c"), "a_b_c");
    }

    #[test]
    fn reserved_label_names_are_exported() {
        let name = |k: &str, hist: bool| {
            let mut out = String::new();
            let renamed = output_label_name(k, hist, &mut out);
            (out, renamed)
        };
        assert_eq!(name("le", true), ("exported_le".into(), true));
        assert_eq!(
            name("le", false),
            ("le".into(), false),
            "le is only a histogram's"
        );
        assert_eq!(name("__name__", false), ("exported___name__".into(), true));
        assert_eq!(
            name("_.x", false),
            ("exported___x".into(), true),
            "sanitises to __x"
        );
        assert_eq!(
            name("otel_metric_overflow", false),
            ("exported_otel_metric_overflow".into(), true)
        );
        assert_eq!(name("http.method", true), ("http_method".into(), false));
        assert_eq!(name("", false), ("key_".into(), false));
    }

    #[test]
    fn sanitised_names_only_hold_allowed_characters() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..2000 {
            let len = rng.usize(0..12);
            let s: String = (0..len).map(|_| rng.char('\u{20}'..'\u{2FF}')).collect();
            let n = sanitize_metric_name(&s);
            assert!(
                n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "{s:?} -> {n:?}"
            );
            assert!(
                !n.starts_with(|c: char| c.is_ascii_digit()),
                "{s:?} -> {n:?}"
            );
            let k = sanitize_label_key(&s);
            assert!(k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
            assert!(!k.is_empty() && !k.starts_with(|c: char| c.is_ascii_digit()));
            let mut o = String::new();
            output_label_name(&s, true, &mut o);
            assert!(!o.starts_with("__") && o != "le", "{s:?} -> {o:?}");
        }
    }
}
