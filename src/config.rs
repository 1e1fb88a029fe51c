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
use crate::ingest::otlp::InputLimits;

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
    pub checkpoint_part_rows: Option<usize>,
    pub wal_segment_size: Option<ByteSize>,
    pub labels: RawLabels,
    pub histogram: RawHistogram,
    pub limits: RawLimits,
    pub auth: crate::auth::AuthFiles,
    pub tls: crate::tls::TlsFiles,
    pub connections: crate::listen::RawConnections,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    pub max_series_per_service: Option<u64>,
    pub max_series: Option<u64>,
    pub max_source_streams: Option<u64>,
    pub max_metric_families: Option<u64>,
    pub max_memory: Option<ByteSize>,
    pub max_attributes_per_point: Option<usize>,
    pub max_label_name_length: Option<usize>,
    pub max_label_value_length: Option<usize>,
    pub max_metric_name_length: Option<usize>,
    pub max_buckets_per_point: Option<usize>,
    #[serde(with = "humantime_opt", default)]
    pub max_future_skew: Option<Duration>,
    pub max_points_per_request: Option<u64>,
    pub max_decode_memory: Option<ByteSize>,
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

/// `Option<Duration>` fields written as `30s`, `10m`, `1h30m`.
pub(crate) mod humantime_opt {
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
        let inner = e.inner().to_string();
        if path == "." {
            return inner;
        }
        // The YAML error may name the key itself ("grpc_listen: invalid ..."): say it once.
        let key = path.rsplit('.').next().unwrap_or_default();
        let reason = inner
            .strip_prefix(key)
            .and_then(|r| r.strip_prefix(": "))
            .unwrap_or(&inner);
        format!("`{path}`: {reason}")
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
    /// About how many rows a checkpoint reads from a shard at a time: what a checkpoint holds
    /// on top of the state. Default 65536 (~4.5 MiB of stream rows).
    pub checkpoint_part_rows: usize,
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
    /// What one data point may cost (attributes, name and value lengths, buckets) and how far
    /// ahead of our clock it may end; points past them are refused with a counted reason.
    pub input: InputLimits,
    /// Bearer token files per door (`auth.*`). Default: none, every door open. Read at start.
    pub auth: crate::auth::AuthFiles,
    /// Certificate and key (and client CA for mTLS) for every listener. Default: plaintext.
    pub tls: crate::tls::TlsFiles,
    /// Timeouts and limits per connection and listener (`connections.*`).
    pub connections: crate::listen::Connections,
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
    /// Metric families (name and kind) one shard keeps; points of a new one past it are
    /// refused. Default 10,000 (span metrics are two).
    pub max_metric_families: u64,
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
        raw.tls.check().map_err(|why| invalid("tls", why))?;
        let connections = crate::listen::Connections::from_raw(&raw.connections)?;
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
        // Points find their labels again by 32-bit offsets into the body.
        if max_request_bytes > u64::from(u32::MAX) {
            return Err(invalid("max_request_bytes", "must be below 4GiB".into()));
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
        let checkpoint_part_rows = raw
            .checkpoint_part_rows
            .unwrap_or(crate::storage::PART_ROWS);
        if checkpoint_part_rows == 0 {
            return Err(invalid("checkpoint_part_rows", "must be at least 1".into()));
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
        let input = input_limits(&raw.limits)?;
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
            checkpoint_part_rows,
            wal_segment_size,
            by: raw.labels.by.unwrap_or_else(|| owned(DEFAULT_BY)),
            without: raw.labels.without.unwrap_or_else(|| owned(DEFAULT_WITHOUT)),
            histogram_bounds,
            input,
            auth: raw.auth,
            tls: raw.tls,
            connections,
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
                max_metric_families: positive(
                    "limits.max_metric_families",
                    raw.limits.max_metric_families.unwrap_or(10_000),
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

/// Config key `key`'s value `v` (else `default`), refused outside `min..=max`.
pub(crate) fn within<T: PartialOrd + std::fmt::Debug>(
    key: &str,
    v: Option<T>,
    default: T,
    min: T,
    max: T,
) -> Result<T, ConfigError> {
    match v {
        Some(v) if v < min || v > max => Err(ConfigError::Invalid {
            key: key.to_owned(),
            reason: format!("must be between {min:?} and {max:?}"),
        }),
        v => Ok(v.unwrap_or(default)),
    }
}

/// The per-point limits, each at least what normal spanmetrics needs and at most what keeps
/// the per-point work they bound small.
fn input_limits(raw: &RawLimits) -> Result<InputLimits, ConfigError> {
    let within = |key: &str, v: Option<u64>, default: u64, min: u64, max: u64| {
        within(&format!("limits.{key}"), v, default, min, max)
    };
    let size = |key: &str, v: Option<usize>, default: usize, min: u64, max: u64| {
        within(key, v.map(|v| v as u64), default as u64, min, max).map(|v| v as usize)
    };
    let d = InputLimits::default();
    let mut out = d;
    // Points are checked for attribute names that collide: the count stays small.
    out.attributes.max_attributes = size(
        "max_attributes_per_point",
        raw.max_attributes_per_point,
        d.attributes.max_attributes,
        16,
        1024,
    )?;
    out.attributes.max_name_len = size(
        "max_label_name_length",
        raw.max_label_name_length,
        d.attributes.max_name_len,
        32,
        1 << 20,
    )?;
    out.attributes.max_value_len = size(
        "max_label_value_length",
        raw.max_label_value_length,
        d.attributes.max_value_len,
        64,
        1 << 20,
    )?;
    out.max_metric_name_len = size(
        "max_metric_name_length",
        raw.max_metric_name_length,
        d.max_metric_name_len,
        64,
        1 << 20,
    )?;
    out.max_buckets = size(
        "max_buckets_per_point",
        raw.max_buckets_per_point,
        d.max_buckets,
        2,
        1 << 20,
    )?;
    out.max_future_skew_ns = raw.max_future_skew.map_or(d.max_future_skew_ns, |s| {
        s.as_nanos().min(u128::from(u64::MAX)) as u64
    });
    out.max_points_per_request = within(
        "max_points_per_request",
        raw.max_points_per_request,
        d.max_points_per_request,
        1000,
        u64::MAX,
    )?;
    out.max_decode_memory = within(
        "max_decode_memory",
        raw.max_decode_memory.map(|b| b.as_u64()),
        d.max_decode_memory,
        16 << 20,
        u64::MAX,
    )?;
    Ok(out)
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
