//! The README's self-metric table and the live `/internal/metrics` name the same metrics.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;

#[test]
fn readme_self_metric_table_matches_the_live_output() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme.split("## Self metrics").nth(1).unwrap();
    let documented: BTreeSet<String> = section
        .lines()
        .take_while(|l| !l.starts_with("## "))
        .filter_map(|l| l.strip_prefix("| `"))
        .map(|l| l.split(['`', '{']).next().unwrap().to_owned())
        .collect();

    let s = common::Spanagg::start("");
    let (status, text) = s.get("/internal/metrics");
    assert_eq!(status, 200);
    let live: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let mut parts = l.split(' ');
            let name = parts.next().unwrap();
            match parts.next().unwrap() {
                "counter" => format!("{name}_total"),
                _ => name.to_owned(),
            }
        })
        .collect();
    assert_eq!(documented, live, "README table vs /internal/metrics");
}

#[test]
fn alert_rules_only_use_metrics_spanagg_exports() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let rules = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/alerts/spanagg.rules.yml"
    ))
    .unwrap();
    let mut checked = 0;
    for word in rules.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if !word.starts_with("spanagg_") {
            continue;
        }
        let base = word.trim_end_matches("_bucket");
        assert!(
            readme.contains(&format!("`{base}")),
            "alerts use {word}, which the README table does not list"
        );
        checked += 1;
    }
    assert!(checked >= 5);
}
