//! spanagg's own metrics, served on `/internal/metrics`. Every labelled counter is resolved to
//! its handle at start, so the ingest path only does atomic adds (no registry lock); shard
//! numbers are read from the shards' published atomics at scrape time.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::aggregate::shard::{BatchResult, Outcome};
use crate::aggregate::table::{ShardStats, APPLY_BUCKETS};
use crate::auth::{Denied, Door};
use crate::ingest::otlp::{Reason, Rejections, Relabeled};
use crate::listen::ListenMetrics;
use crate::storage::StorageMetrics;

mod budget;
pub use budget::{LimitKind, TOP_SERVICES};

/// Which door a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc = 0,
    HttpProtobuf,
    HttpJson,
    /// Requests read back from the write-ahead log at start.
    WalReplay,
}

impl Protocol {
    const ALL: [Protocol; 4] = [
        Self::Grpc,
        Self::HttpProtobuf,
        Self::HttpJson,
        Self::WalReplay,
    ];
    fn as_str(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::HttpProtobuf => "http_protobuf",
            Self::HttpJson => "http_json",
            Self::WalReplay => "wal_replay",
        }
    }
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    Success = 0,
    PartialSuccess,
    InvalidArgument,
    TooLarge,
    Unavailable,
}

impl RequestOutcome {
    const ALL: [RequestOutcome; 5] = [
        Self::Success,
        Self::PartialSuccess,
        Self::InvalidArgument,
        Self::TooLarge,
        Self::Unavailable,
    ];
    fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::PartialSuccess => "partial_success",
            Self::InvalidArgument => "invalid_argument",
            Self::TooLarge => "too_large",
            Self::Unavailable => "unavailable",
        }
    }
}

type Labels2 = Vec<(&'static str, &'static str)>;

/// Handles to every self metric.
pub struct Telemetry {
    registry: Registry,
    requests: Vec<Vec<Counter>>,
    points_received: Vec<Counter>,
    points: Vec<Counter>,
    rejected: Vec<Counter>,
    no_value: Counter,
    /// Points relabeled: [reserved name renamed, colliding names joined].
    relabeled: [Counter; 2],
    invalid_utf8: Counter,
    /// Requests turned away for their bearer token: [door][why].
    denied: Vec<Vec<Counter>>,
    pub scrape_duration: Histogram,
    pub scrape_bytes: Histogram,
    pub family_conflicts: Counter,
    pub storage: StorageMetrics,
    budget: budget::BudgetMetrics,
    start_ns: u64,
}

impl Telemetry {
    pub fn new(
        shards: Vec<Arc<ShardStats>>,
        storage: StorageMetrics,
        limits: crate::config::Limits,
    ) -> Self {
        Self::with_listeners(shards, storage, limits, ListenMetrics::default())
    }

    /// Like `new`, with the listeners' counters (made before the state, as the HTTP listener
    /// serves health checks while it is restored).
    pub fn with_listeners(
        shards: Vec<Arc<ShardStats>>,
        storage: StorageMetrics,
        limits: crate::config::Limits,
        listen: ListenMetrics,
    ) -> Self {
        let mut registry = Registry::with_prefix("spanagg");
        storage.register(&mut registry);
        listen.register(&mut registry);
        let budget = budget::BudgetMetrics::register(&mut registry, shards.clone(), limits);
        let requests_f = Family::<Labels2, Counter>::default();
        registry.register(
            "requests",
            "OTLP export requests by protocol and outcome",
            requests_f.clone(),
        );
        let requests = Protocol::ALL
            .iter()
            .map(|p| {
                RequestOutcome::ALL
                    .iter()
                    .map(|o| {
                        requests_f
                            .get_or_create(&vec![("protocol", p.as_str()), ("outcome", o.as_str())])
                            .clone()
                    })
                    .collect()
            })
            .collect();
        let denied_f = Family::<Labels2, Counter>::default();
        registry.register(
            "auth_failures",
            "Requests refused with 401 / UNAUTHENTICATED, by door (ingest, read, scrape) and \
             reason (missing or wrong bearer token)",
            denied_f.clone(),
        );
        let denied = Door::ALL
            .iter()
            .map(|d| {
                Denied::ALL
                    .iter()
                    .map(|w| {
                        denied_f
                            .get_or_create(&vec![("door", d.as_str()), ("reason", w.as_str())])
                            .clone()
                    })
                    .collect()
            })
            .collect();
        let received_f = Family::<Labels2, Counter>::default();
        registry.register(
            "points_received",
            "Data points received, by protocol",
            received_f.clone(),
        );
        let points_received = Protocol::ALL
            .iter()
            .map(|p| {
                received_f
                    .get_or_create(&vec![("protocol", p.as_str())])
                    .clone()
            })
            .collect();
        let points_f = Family::<Labels2, Counter>::default();
        registry.register(
            "points",
            "Validated data points by what the shards did with them: applied, applied_after_gap \
             (a gap upstream), applied_late, duplicate (retry dropped), too_late, layout_mismatch, \
             cumulative_reset, cumulative_baseline, cumulative_stale",
            points_f.clone(),
        );
        let points = Outcome::ALL
            .iter()
            .map(|o| {
                points_f
                    .get_or_create(&vec![("outcome", o.as_str())])
                    .clone()
            })
            .collect();
        let rejected_f = Family::<Labels2, Counter>::default();
        registry.register(
            "points_rejected",
            "Data points rejected (reported to the client as partial success), by reason",
            rejected_f.clone(),
        );
        let rejected = Reason::ALL
            .iter()
            .map(|r| r.as_str())
            .chain(
                Outcome::ALL
                    .iter()
                    .filter_map(|o| o.explain().map(|_| o.as_str())),
            )
            .map(|r| rejected_f.get_or_create(&vec![("reason", r)]).clone())
            .collect();
        let no_value = Counter::default();
        registry.register(
            "points_no_recorded_value",
            "Data points skipped because their flags say no value was recorded",
            no_value.clone(),
        );
        let relabeled_f = Family::<Labels2, Counter>::default();
        registry.register(
            "points_relabeled",
            "Data points whose attributes became different label names: reserved names renamed \
             with exported_ (why=reserved_name), names that sanitise alike joined \
             (why=colliding_names)",
            relabeled_f.clone(),
        );
        let relabeled = ["reserved_name", "colliding_names"]
            .map(|w| relabeled_f.get_or_create(&vec![("why", w)]).clone());
        let invalid_utf8 = Counter::default();
        registry.register(
            "invalid_utf8_strings",
            "Strings in OTLP/protobuf requests that were not UTF-8, replaced lossily (U+FFFD) \
             instead of refusing their request",
            invalid_utf8.clone(),
        );
        let scrape_duration = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register(
            "scrape_duration_seconds",
            "Time to build one /metrics response",
            scrape_duration.clone(),
        );
        let scrape_bytes = Histogram::new(exponential_buckets(1024.0, 4.0, 10));
        registry.register(
            "scrape_size_bytes",
            "Bytes of one /metrics response before compression",
            scrape_bytes.clone(),
        );
        let build_info = Family::<Labels2, prometheus_client::metrics::gauge::Gauge>::default();
        registry.register(
            "build_info",
            "Always 1; the version label says which spanagg is running",
            build_info.clone(),
        );
        build_info
            .get_or_create(&vec![("version", env!("CARGO_PKG_VERSION"))])
            .set(1);
        let start = prometheus_client::metrics::gauge::Gauge::<i64>::default();
        registry.register(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch",
            start.clone(),
        );
        start.set((crate::unix_ns() / 1_000_000_000) as i64);
        let family_conflicts = Counter::default();
        registry.register(
            "scrape_family_conflicts",
            "Metric-family parts left out of a scrape because another family of the same name \
             but a different type was served",
            family_conflicts.clone(),
        );
        registry.register_collector(Box::new(ShardCollector { shards }));
        Self {
            registry,
            requests,
            points_received,
            points,
            rejected,
            no_value,
            relabeled,
            invalid_utf8,
            denied,
            scrape_duration,
            scrape_bytes,
            family_conflicts,
            storage,
            budget,
            start_ns: crate::unix_ns(),
        }
    }

    pub fn overflowed(&self, n: u64) {
        if n > 0 {
            self.budget.overflowed.inc_by(n);
        }
    }

    /// The gauge of decode budget in use.
    pub fn decode_memory(&self) -> prometheus_client::metrics::gauge::Gauge {
        self.budget.decode_memory.clone()
    }

    /// A request refused for its bearer token (the token itself is never recorded).
    pub fn denied(&self, door: Door, why: Denied) {
        self.denied[door as usize][why as usize].inc();
    }

    pub fn limit_refusal(&self, k: LimitKind) {
        self.budget.refused(k);
    }

    pub fn request(&self, p: Protocol, o: RequestOutcome) {
        self.requests[p as usize][o as usize].inc();
    }

    pub fn received(&self, p: Protocol, n: u64) {
        self.points_received[p as usize].inc_by(n);
    }

    pub fn invalid_utf8(&self, n: u64) {
        self.invalid_utf8.inc_by(n);
    }

    pub fn relabeled(&self, r: &Relabeled) {
        for (c, n) in self.relabeled.iter().zip([r.reserved, r.colliding]) {
            if n > 0 {
                c.inc_by(n);
            }
        }
    }

    pub fn rejections(&self, r: &Rejections, no_value: u64) {
        for (i, n) in r.counts.iter().enumerate() {
            if *n > 0 {
                self.rejected[i].inc_by(*n);
            }
        }
        if no_value > 0 {
            self.no_value.inc_by(no_value);
        }
    }

    pub fn outcomes(&self, r: &BatchResult) {
        for o in Outcome::ALL {
            let n = r.get(o);
            if n == 0 {
                continue;
            }
            self.points[o as usize].inc_by(u64::from(n));
            // The refused outcomes (those the client is told about) follow the reasons, in
            // `Outcome::ALL` order, as registered above.
            if o.explain().is_none() {
                continue;
            }
            let nth = Outcome::ALL
                .iter()
                .filter(|x| x.explain().is_some())
                .position(|x| *x == o)
                .unwrap_or(0);
            self.rejected[Reason::COUNT + nth].inc_by(u64::from(n));
        }
    }

    /// Prometheus text of all self metrics.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        self.storage.refresh_age(crate::unix_ns(), self.start_ns);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Reads shard stats and the process's memory at scrape time.
#[derive(Debug)]
struct ShardCollector {
    shards: Vec<Arc<ShardStats>>,
}

fn total(shards: &[Arc<ShardStats>], f: impl Fn(&ShardStats) -> u64) -> u64 {
    shards.iter().map(|s| f(s)).sum()
}

impl prometheus_client::collector::Collector for ShardCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.shards;
        let gauges: [(&str, &str, u64); 2] = [
            (
                "output_series",
                "Output series held (one per service/route/kind/status/kept labels)",
                total(s, |x| x.series.load(Ordering::Relaxed)),
            ),
            (
                "source_streams",
                "Input source streams tracked (one per pod series)",
                total(s, |x| x.sources.load(Ordering::Relaxed)),
            ),
        ];
        for (name, help, v) in gauges {
            let m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(v as i64).encode(m)?;
        }
        let counters: [(&str, &str, u64); 4] = [
            (
                "series_evicted",
                "Output series dropped after idling for series_ttl",
                total(s, |x| x.evicted_series.load(Ordering::Relaxed)),
            ),
            (
                "source_streams_evicted",
                "Source streams dropped after idling for series_ttl",
                total(s, |x| x.evicted_sources.load(Ordering::Relaxed)),
            ),
            (
                "delta_holes_given_up",
                "Holes in delta streams' applied intervals filled unapplied, to keep each stream \
                 within its limit of holes; a late delta for one is dropped as a duplicate",
                total(s, |x| x.holes_given_up.load(Ordering::Relaxed)),
            ),
            (
                "shard_batches",
                "Batches applied by the shards",
                total(s, |x| x.batches.load(Ordering::Relaxed)),
            ),
        ];
        for (name, help, v) in counters {
            let m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(v).encode(m)?;
        }
        let mut m = encoder.encode_descriptor(
            "shard_queue_depth",
            "Batches waiting in each shard's queue",
            None,
            MetricType::Gauge,
        )?;
        for (i, shard) in s.iter().enumerate() {
            let label = [("shard", i.to_string())];
            let fam = m.encode_family(&label)?;
            ConstGauge::new(shard.queue_depth.load(Ordering::Relaxed) as i64).encode(fam)?;
        }
        let m = encoder.encode_descriptor(
            "shard_apply_duration_seconds",
            "Time a shard took to apply one batch",
            None,
            MetricType::Histogram,
        )?;
        let buckets: Vec<(f64, u64)> = APPLY_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .enumerate()
            .map(|(i, b)| (b, total(s, |x| x.apply_buckets[i].load(Ordering::Relaxed))))
            .collect();
        let count = buckets.iter().map(|b| b.1).sum();
        let sum = total(s, |x| x.apply_ns_sum.load(Ordering::Relaxed)) as f64 / 1e9;
        let mut m = m;
        m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)?;
        if let Some(rss) = resident_bytes() {
            let m = encoder.encode_descriptor(
                "process_resident_memory_bytes",
                "Resident memory of the spanagg process",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(rss as i64).encode(m)?;
        }
        Ok(())
    }
}

/// Resident set size from `/proc/self/statm` (Linux); `None` elsewhere.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}
