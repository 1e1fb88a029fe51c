//! Self metrics of the WAL, checkpoints and restore. Handles are cheap clones of shared atomics:
//! the WAL thread and the checkpoint task update them, `/internal/metrics` reads them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Reason = Vec<(&'static str, &'static str)>;

/// Why a checkpoint failed (the `reason` label).
pub const FAILURE_REASONS: [&str; 5] = ["disk_full", "io", "encode", "format", "moved"];

#[derive(Clone)]
pub struct StorageMetrics {
    pub wal_bytes: Counter,
    pub wal_records: Counter,
    pub wal_fsync: Histogram,
    pub wal_errors: Counter,
    pub wal_segments_created: Counter,
    pub wal_truncated: Counter,
    pub wal_corrupt: Counter,
    pub wal_replayed: Counter,
    pub checkpoint_duration: Histogram,
    pub checkpoint_size: Gauge,
    checkpoint_last_success: Gauge<f64, AtomicU64>,
    checkpoint_age: Gauge<f64, AtomicU64>,
    last_success_ns: Arc<AtomicU64>,
    checkpoint_failures: Family<Reason, Counter>,
    pub checkpoints_set_aside: Counter,
    pub restore_duration: Gauge<f64, AtomicU64>,
    pub restored_series: Gauge,
}

impl Default for StorageMetrics {
    fn default() -> Self {
        let failures = Family::<Reason, Counter>::default();
        for r in FAILURE_REASONS {
            drop(failures.get_or_create(&vec![("reason", r)]));
        }
        Self {
            wal_bytes: Counter::default(),
            wal_records: Counter::default(),
            wal_fsync: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            wal_errors: Counter::default(),
            wal_segments_created: Counter::default(),
            wal_truncated: Counter::default(),
            wal_corrupt: Counter::default(),
            wal_replayed: Counter::default(),
            checkpoint_duration: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            checkpoint_size: Gauge::default(),
            checkpoint_last_success: Gauge::default(),
            checkpoint_age: Gauge::default(),
            last_success_ns: Arc::new(AtomicU64::new(0)),
            checkpoint_failures: failures,
            checkpoints_set_aside: Counter::default(),
            restore_duration: Gauge::default(),
            restored_series: Gauge::default(),
        }
    }
}

impl StorageMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "wal_bytes",
            "Bytes appended to the write-ahead log",
            self.wal_bytes.clone(),
        );
        r.register(
            "wal_records",
            "Requests appended to the write-ahead log",
            self.wal_records.clone(),
        );
        r.register(
            "wal_fsync_duration_seconds",
            "Time of one WAL fsync (one group commit)",
            self.wal_fsync.clone(),
        );
        r.register(
            "wal_write_errors",
            "WAL writes or fsyncs that failed (those exports got a retryable error)",
            self.wal_errors.clone(),
        );
        r.register(
            "wal_segments_created",
            "WAL segment files begun",
            self.wal_segments_created.clone(),
        );
        r.register(
            "wal_truncated_tails",
            "Torn or corrupt WAL tails cut off at start (never-acknowledged writes)",
            self.wal_truncated.clone(),
        );
        r.register(
            "wal_corrupt_records",
            "Damaged WAL records (or runs of them) with readable records after them, skipped at \
             start: acknowledged requests lost; the segment is kept as *.wal.corrupt",
            self.wal_corrupt.clone(),
        );
        r.register(
            "wal_replayed_records",
            "WAL records replayed at start",
            self.wal_replayed.clone(),
        );
        r.register(
            "checkpoint_duration_seconds",
            "Time to write one checkpoint",
            self.checkpoint_duration.clone(),
        );
        r.register(
            "checkpoint_size_bytes",
            "Size of the last checkpoint written",
            self.checkpoint_size.clone(),
        );
        r.register(
            "checkpoint_last_success_timestamp_seconds",
            "When the last checkpoint was written (0: none yet by this process)",
            self.checkpoint_last_success.clone(),
        );
        r.register(
            "checkpoint_age_seconds",
            "Seconds since the last checkpoint this process wrote (since start if none)",
            self.checkpoint_age.clone(),
        );
        r.register(
            "checkpoint_failures",
            "Checkpoints that failed, by reason (disk_full, io, encode, format, moved)",
            self.checkpoint_failures.clone(),
        );
        r.register(
            "checkpoints_set_aside",
            "Unreadable checkpoints renamed to *.corrupt at start",
            self.checkpoints_set_aside.clone(),
        );
        r.register(
            "restore_duration_seconds",
            "Time to load the checkpoint at start (WAL replay not included)",
            self.restore_duration.clone(),
        );
        r.register(
            "restored_series",
            "Output series loaded from the checkpoint at start",
            self.restored_series.clone(),
        );
    }

    pub fn checkpoint_success(&self, now_ns: u64) {
        self.last_success_ns.store(now_ns, Ordering::Relaxed);
        self.checkpoint_last_success.set(now_ns as f64 / 1e9);
    }

    pub fn checkpoint_failed(&self, reason: &'static str) {
        self.checkpoint_failures
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }

    /// Refreshes the age gauge; `since_ns` is the process start, used until a first success.
    pub fn refresh_age(&self, now_ns: u64, since_ns: u64) {
        let last = match self.last_success_ns.load(Ordering::Relaxed) {
            0 => since_ns,
            t => t,
        };
        self.checkpoint_age
            .set(now_ns.saturating_sub(last) as f64 / 1e9);
    }
}
