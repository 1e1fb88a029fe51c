//! Unit tests of config parsing and validation (`config.rs`).

use super::*;

fn parse(yaml: &str) -> Result<Config, ConfigError> {
    let raw = parse_yaml(yaml).map_err(|message| ConfigError::Parse {
        path: PathBuf::from("test.yaml"),
        message,
    })?;
    Config::from_raw(raw)
}

#[test]
fn type_errors_name_the_key() {
    let err = parse("late_delta_window: soon").unwrap_err().to_string();
    assert!(err.contains("`late_delta_window`"), "{err}");
    let err = parse("labels:\n  by: 7\n").unwrap_err().to_string();
    assert!(err.contains("`labels.by`"), "{err}");
    let err = parse("max_request_bytes: lots").unwrap_err().to_string();
    assert!(err.contains("`max_request_bytes`"), "{err}");
}

#[test]
fn defaults_bind_loopback_and_drop_instance_labels() {
    let c = Config::default();
    assert_eq!(c.grpc_listen.to_string(), "127.0.0.1:4317");
    assert_eq!(c.otlp_http_listen.to_string(), "127.0.0.1:4318");
    assert_eq!(c.http_listen.to_string(), "127.0.0.1:9464");
    assert_eq!(c.max_request_bytes, 64 << 20);
    assert!(c.without.iter().any(|k| k == "k8s.pod.name"));
    assert_eq!(c.late_delta_window, Duration::from_secs(600));
}

#[test]
fn unknown_key_is_named_in_the_error() {
    let err = parse("grpc_lisen: 1.2.3.4:1").unwrap_err().to_string();
    assert!(err.contains("grpc_lisen"), "{err}");
}

#[test]
fn unsorted_bounds_name_the_metric_key() {
    let err = parse("histogram:\n  bounds:\n    m: [2, 1]\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("histogram.bounds.m"), "{err}");
    assert!(err.contains("strictly increasing"), "{err}");
}

#[test]
fn durations_and_sizes_parse_in_human_units() {
    let c = parse("late_delta_window: 2m\nseries_ttl: 1h\nmax_request_bytes: 1MiB\n").unwrap();
    assert_eq!(c.late_delta_window, Duration::from_secs(120));
    assert_eq!(c.series_ttl, Duration::from_secs(3600));
    assert_eq!(c.max_request_bytes, 1 << 20);
    // Labels are found again by 32-bit offsets into a request.
    let err = parse("max_request_bytes: 4GiB\n").unwrap_err().to_string();
    assert!(err.contains("below 4GiB"), "{err}");
    assert!(parse("max_request_bytes: 4095MiB\n").is_ok());
}

#[test]
fn the_shipped_example_parses_and_matches_the_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("spanagg.example.yaml");
    let c = Config::from_file(&path).unwrap();
    let d = Config::default();
    assert_eq!(c.grpc_listen, d.grpc_listen);
    assert_eq!(c.late_delta_window, d.late_delta_window);
    assert_eq!(c.series_ttl, d.series_ttl);
    assert_eq!(c.max_request_bytes, d.max_request_bytes);
    assert_eq!(c.by, d.by);
    assert_eq!(c.without, d.without);
    assert_eq!(c.shard_queue_capacity, d.shard_queue_capacity);
    assert_eq!(c.durability, d.durability);
    assert_eq!(c.checkpoint_interval, d.checkpoint_interval);
    assert_eq!(c.checkpoint_keep, d.checkpoint_keep);
    assert_eq!(c.checkpoint_part_rows, d.checkpoint_part_rows);
    assert_eq!(c.wal_segment_size, d.wal_segment_size);
    assert_eq!(c.limits, d.limits);
    assert_eq!(c.input, d.input);
}

#[test]
fn limits_parse_and_refuse_nonsense() {
    let c = parse("limits:\n  max_series_per_service: 10\n  max_memory: 1GiB\n").unwrap();
    assert_eq!(c.limits.max_series_per_service, 10);
    assert_eq!(c.limits.max_memory, Some(1 << 30));
    let err = parse("limits:\n  max_series: 0\n").unwrap_err().to_string();
    assert!(err.contains("limits.max_series"), "{err}");
    let err = parse("limits:\n  max_memory: 1KiB\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("limits.max_memory"), "{err}");
    let c = parse("limits:\n  max_label_value_length: 100\n  max_future_skew: 1m\n").unwrap();
    assert_eq!(c.input.attributes.max_value_len, 100);
    assert_eq!(c.input.max_future_skew_ns, 60_000_000_000);
    assert_eq!(c.input.max_buckets, InputLimits::default().max_buckets);
    let err = parse("limits:\n  max_buckets_per_point: 1\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("limits.max_buckets_per_point"), "{err}");
    let err = parse("limits:\n  max_serie: 1\n").unwrap_err().to_string();
    assert!(err.contains("max_serie"), "{err}");
}

#[test]
fn durability_is_wal_or_none() {
    assert_eq!(Config::default().durability, Durability::Wal);
    assert_eq!(
        parse("durability: none").unwrap().durability,
        Durability::None
    );
    let err = parse("durability: fsync").unwrap_err().to_string();
    assert!(err.contains("`durability`"), "{err}");
    let err = parse("checkpoint_keep: 0").unwrap_err().to_string();
    assert!(err.contains("`checkpoint_keep`"), "{err}");
    let err = parse("checkpoint_part_rows: 0").unwrap_err().to_string();
    assert!(err.contains("`checkpoint_part_rows`"), "{err}");
}

#[test]
fn output_bounds_must_be_a_subset_of_the_merge_bounds() {
    let c =
        parse("histogram:\n  bounds:\n    m: [1, 2, 5, 10]\n  output_bounds:\n    m: [2, 10]\n")
            .unwrap();
    assert_eq!(c.histogram_bounds["m"].bounds(), &[2.0, 10.0]);
    let err = parse("histogram:\n  bounds:\n    m: [1, 2, 5, 10]\n  output_bounds:\n    m: [3]\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("histogram.output_bounds.m"), "{err}");
    assert!(err.contains("subset"), "{err}");
}

#[test]
fn zero_shards_is_refused() {
    let err = parse("shards: 0").unwrap_err().to_string();
    assert!(err.contains("`shards`"), "{err}");
}
