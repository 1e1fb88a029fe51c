//! Typed configuration: the YAML file and CLI flags are parsed once into validated types here,
//! so the rest of the code never sees raw strings. Every field documents its default and who
//! should change it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

use crate::aggregate::layout::{fold_map, BucketLayout};

/// Errors that stop the start. Each names the key and the reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

/// The file as written by a user. Unknown keys are an error so typos do not pass silently.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub grpc_listen: Option<SocketAddr>,
    pub otlp_http_listen: Option<SocketAddr>,
    pub http_listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub shards: Option<usize>,
    pub shard_queue_capacity: Option<usize>,
    #[serde(with = "humantime_opt", default)]
    pub late_delta_window: Option<Duration>,
    #[serde(with = "humantime_opt", default)]
    pub series_ttl: Option<Duration>,
    pub max_request_bytes: Option<ByteSize>,
    pub durability: Option<Durability>,
    #[serde(with = "humantime_opt", default)]
    pub checkpoint_interval: Option<Duration>,
    pub checkpoint_keep: Option<usize>,
    pub wal_segment_size: Option<ByteSize>,
    pub labels: RawLabels,
    pub histogram: RawHistogram,
    pub limits: RawLimits,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    pub max_series_per_service: Option<u64>,
    pub max_series: Option<u64>,
    pub max_source_streams: Option<u64>,
    pub max_memory: Option<ByteSize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLabels {
    pub by: Option<Vec<String>>,
    pub without: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHistogram {
    /// OTel metric name → bucket bounds every output series of that metric uses.
    pub bounds: BTreeMap<String, Vec<f64>>,
    /// OTel metric name → the subset of bounds to serve (fewer buckets, still exact).
    pub output_bounds: BTreeMap<String, Vec<f64>>,
}

mod humantime_opt {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Parses YAML, naming the key of any error (`histogram.bounds.m[1]: invalid type ...`).
fn parse_yaml(text: &str) -> Result<RawConfig, String> {
    let de = serde_norway::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.inner().to_string()
        } else {
            format!("`{path}`: {}", e.inner())
        }
    })
}

/// Resource attributes kept on output series by default: what identifies a service, not a pod.
pub const DEFAULT_BY: &[&str] = &[
    "service.name",
    "service.namespace",
    "deployment.environment",
    "deployment.environment.name",
    "k8s.cluster.name",
];

/// Point attributes dropped by default: they name one instance, and dropping them is the merge.
pub const DEFAULT_WITHOUT: &[&str] = &[
    "service.instance.id",
    "collector.instance.id",
    "k8s.pod.name",
    "k8s.pod.uid",
    "k8s.node.name",
    "host.name",
    "host.id",
    "container.id",
    "process.pid",
    "instance",
    "pod",
];

/// What survives a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Every accepted request is in the write-ahead log before it is acknowledged: a crash
    /// loses nothing that was acknowledged.
    #[default]
    Wal,
    /// No log. A clean shutdown still writes a final checkpoint and restores it exactly; after a
    /// crash every series starts from zero with a new created time.
    None,
}

fn positive(key: &str, v: u64) -> Result<u64, ConfigError> {
    if v == 0 {
        return Err(ConfigError::Invalid {
            key: key.to_owned(),
            reason: "must be at least 1".into(),
        });
    }
    Ok(v)
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// OTLP/gRPC listener. Default 127.0.0.1:4317; set 0.0.0.0:4317 to take traffic from pods.
    pub grpc_listen: SocketAddr,
    /// OTLP/HTTP listener. Default 127.0.0.1:4318.
    pub otlp_http_listen: SocketAddr,
    /// Scrape and API listener. Default 127.0.0.1:9464.
    pub http_listen: SocketAddr,
    /// Where state lives. Default `./data`; created at start.
    pub data_dir: PathBuf,
    /// Shard threads. Default: one per core. More than cores only adds context switches.
    pub shards: NonZeroUsize,
    /// Batches queued per shard before exports get a retryable refusal. Default 1024.
    pub shard_queue_capacity: NonZeroUsize,
    /// How far behind a stream's newest end a late delta is still applied. Default 10m; raise it
    /// if exporters retry for longer (the Collector's default `max_elapsed_time` is 5m).
    pub late_delta_window: Duration,
    /// Idle time after which a series is dropped (it restarts from zero). Default 15m.
    pub series_ttl: Duration,
    /// Largest request body after decompression. Default 64 MiB.
    pub max_request_bytes: usize,
    /// `wal` (default) or `none`.
    pub durability: Durability,
    /// Time between checkpoints. Default 60s; a checkpoint also bounds WAL replay at start.
    pub checkpoint_interval: Duration,
    /// Checkpoints kept in the data dir. Default 3.
    pub checkpoint_keep: usize,
    /// A WAL segment is closed and a new one begun past this size. Default 64 MiB.
    pub wal_segment_size: u64,
    /// Resource attributes kept as output labels (`by`). Default [`DEFAULT_BY`].
    pub by: Vec<String>,
    /// Point attributes dropped from output labels (`without`). Default [`DEFAULT_WITHOUT`].
    pub without: Vec<String>,
    /// Bucket layout each output series stores and serves, per OTel metric name:
    /// `histogram.output_bounds` if set, else `histogram.bounds`. Default: none (first point
    /// wins). Points merge into it exactly when their bounds contain all of it.
    pub histogram_bounds: BTreeMap<String, BucketLayout>,
    pub limits: Limits,
}

/// Guard rails: what keeps memory bounded when a client explodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Output series one service may have; points that would create more go to the service's
    /// overflow series. Default 100,000.
    pub max_series_per_service: u64,
    /// Output series in all. Default 1,000,000.
    pub max_series: u64,
    /// Source streams (pods' series) tracked; new ones beyond get a retryable refusal.
    /// Default 10,000,000 (~0.7 GB).
    pub max_source_streams: u64,
    /// Resident memory past which new exports get a retryable refusal. Default: none.
    pub max_memory: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Self::from_raw(RawConfig::default()).expect("built-in defaults are valid")
    }
}

impl Config {
    /// Reads and validates a YAML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            path: path.to_owned(),
            cause,
        })?;
        let raw = parse_yaml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })?;
        Self::from_raw(raw)
    }

    /// Applies defaults and validates every field.
    pub fn from_raw(raw: RawConfig) -> Result<Self, ConfigError> {
        let invalid = |key: &str, reason: String| ConfigError::Invalid {
            key: key.to_owned(),
            reason,
        };
        let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        let shards = NonZeroUsize::new(raw.shards.unwrap_or(cores))
            .ok_or_else(|| invalid("shards", "must be at least 1".into()))?;
        let shard_queue_capacity = NonZeroUsize::new(raw.shard_queue_capacity.unwrap_or(1024))
            .ok_or_else(|| invalid("shard_queue_capacity", "must be at least 1".into()))?;
        let late_delta_window = raw.late_delta_window.unwrap_or(Duration::from_secs(600));
        let series_ttl = raw.series_ttl.unwrap_or(Duration::from_secs(900));
        if series_ttl.is_zero() {
            return Err(invalid("series_ttl", "must be greater than zero".into()));
        }
        let max_request_bytes = raw.max_request_bytes.unwrap_or(ByteSize::mib(64)).as_u64();
        if max_request_bytes < 1024 {
            return Err(invalid("max_request_bytes", "must be at least 1KiB".into()));
        }
        let max_request_bytes = usize::try_from(max_request_bytes)
            .map_err(|_| invalid("max_request_bytes", "too large for this platform".into()))?;
        let checkpoint_interval = raw.checkpoint_interval.unwrap_or(Duration::from_secs(60));
        if checkpoint_interval < Duration::from_millis(100) {
            return Err(invalid(
                "checkpoint_interval",
                "must be at least 100ms".into(),
            ));
        }
        let checkpoint_keep = raw.checkpoint_keep.unwrap_or(3);
        if checkpoint_keep == 0 {
            return Err(invalid("checkpoint_keep", "must be at least 1".into()));
        }
        let wal_segment_size = raw.wal_segment_size.unwrap_or(ByteSize::mib(64)).as_u64();
        if wal_segment_size < 4096 {
            return Err(invalid("wal_segment_size", "must be at least 4KiB".into()));
        }
        let mut histogram_bounds = BTreeMap::new();
        for (metric, bounds) in raw.histogram.bounds {
            let layout = BucketLayout::try_new(bounds)
                .map_err(|e| invalid(&format!("histogram.bounds.{metric}"), e.to_string()))?;
            histogram_bounds.insert(metric, layout);
        }
        for (metric, bounds) in raw.histogram.output_bounds {
            let key = format!("histogram.output_bounds.{metric}");
            let layout = BucketLayout::try_new(bounds).map_err(|e| invalid(&key, e.to_string()))?;
            // Serving a subset of the merge layout keeps the fold exact; anything else cannot be.
            if let Some(merge) = histogram_bounds.get(&metric) {
                if fold_map(merge.bounds(), layout.bounds()).is_err() {
                    return Err(invalid(
                        &key,
                        format!("must be a subset of histogram.bounds.{metric}"),
                    ));
                }
            }
            histogram_bounds.insert(metric, layout);
        }
        let owned = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        Ok(Config {
            grpc_listen: raw.grpc_listen.unwrap_or(([127, 0, 0, 1], 4317).into()),
            otlp_http_listen: raw
                .otlp_http_listen
                .unwrap_or(([127, 0, 0, 1], 4318).into()),
            http_listen: raw.http_listen.unwrap_or(([127, 0, 0, 1], 9464).into()),
            data_dir: raw.data_dir.unwrap_or_else(|| PathBuf::from("./data")),
            shards,
            shard_queue_capacity,
            late_delta_window,
            series_ttl,
            max_request_bytes,
            durability: raw.durability.unwrap_or_default(),
            checkpoint_interval,
            checkpoint_keep,
            wal_segment_size,
            by: raw.labels.by.unwrap_or_else(|| owned(DEFAULT_BY)),
            without: raw.labels.without.unwrap_or_else(|| owned(DEFAULT_WITHOUT)),
            histogram_bounds,
            limits: Limits {
                max_series_per_service: positive(
                    "limits.max_series_per_service",
                    raw.limits.max_series_per_service.unwrap_or(100_000),
                )?,
                max_series: positive(
                    "limits.max_series",
                    raw.limits.max_series.unwrap_or(1_000_000),
                )?,
                max_source_streams: positive(
                    "limits.max_source_streams",
                    raw.limits.max_source_streams.unwrap_or(10_000_000),
                )?,
                max_memory: match raw.limits.max_memory.map(|b| b.as_u64()) {
                    Some(b) if b < 64 << 20 => {
                        return Err(invalid(
                            "limits.max_memory",
                            "must be at least 64MiB".into(),
                        ))
                    }
                    other => other,
                },
            },
        })
    }
}

#[cfg(test)]
mod tests {
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
        assert_eq!(c.wal_segment_size, d.wal_segment_size);
        assert_eq!(c.limits, d.limits);
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
    }

    #[test]
    fn output_bounds_must_be_a_subset_of_the_merge_bounds() {
        let c = parse(
            "histogram:\n  bounds:\n    m: [1, 2, 5, 10]\n  output_bounds:\n    m: [2, 10]\n",
        )
        .unwrap();
        assert_eq!(c.histogram_bounds["m"].bounds(), &[2.0, 10.0]);
        let err =
            parse("histogram:\n  bounds:\n    m: [1, 2, 5, 10]\n  output_bounds:\n    m: [3]\n")
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
}
