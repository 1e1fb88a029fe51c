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

#[test]
fn the_kubernetes_example_config_is_a_valid_spanagg_config() {
    use serde::Deserialize;
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kubernetes/spanagg.yaml"
    ))
    .unwrap();
    let mut found = 0;
    for doc in serde_norway::Deserializer::from_str(&text) {
        let value = serde_norway::Value::deserialize(doc).unwrap();
        let Some(cfg) = value
            .get("data")
            .and_then(|d| d.get("spanagg.yaml"))
            .and_then(|v| v.as_str())
        else {
            continue;
        };
        let dir = std::env::temp_dir().join(format!("spanagg-deploy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("spanagg.yaml");
        std::fs::write(&path, cfg).unwrap();
        let c = spanagg::config::Config::from_file(&path).unwrap();
        assert_eq!(c.grpc_listen.to_string(), "0.0.0.0:4317");
        std::fs::remove_dir_all(&dir).ok();
        found += 1;
    }
    assert_eq!(found, 1);
}
