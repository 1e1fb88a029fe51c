//! `spanagg inspect FILE`: a checkpoint's footer and a summary of what it holds, read the same
//! way a restore reads it (so a file that inspects cleanly restores cleanly).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;

use super::checkpoint::{self, CheckpointError};
use crate::aggregate::quota::SeriesQuota;
use crate::aggregate::shard::{ShardConfig, ShardState, StreamState};

/// Loads `path` into shards as a restore would.
pub fn load_file(path: &Path) -> Result<(checkpoint::Meta, Vec<ShardState>), CheckpointError> {
    let meta = checkpoint::read_meta(path)?;
    let cfg = ShardConfig {
        late_ns: 0,
        ttl_secs: u32::MAX,
        process_start_ns: meta.state_start_ns,
        bounds: HashMap::new(),
        limits: Default::default(),
        quota: match meta.series_budget {
            0 => Default::default(),
            b => std::sync::Arc::new(SeriesQuota::new(b, u64::MAX)),
        },
        max_families: usize::MAX,
    };
    let mut states: Vec<ShardState> = (0..meta.shards.max(1))
        .map(|_| ShardState::new(cfg.clone()))
        .collect();
    let meta = checkpoint::load(path, &mut states)?;
    // Reports read "now" as when the checkpoint was written.
    for s in &mut states {
        s.now_ns = meta.created_ns;
    }
    Ok((meta, states))
}

/// The text `spanagg inspect` prints.
pub fn inspect(path: &Path) -> Result<String, CheckpointError> {
    let (meta, states) = load_file(path)?;
    let mut out = String::new();
    let _ = writeln!(out, "checkpoint {}", path.display());
    for (k, v) in meta.pairs() {
        let _ = writeln!(out, "  {k:<32} {v}");
    }
    // (metric, service) -> (series, streams)
    let mut rows: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    let mut owner: HashMap<u128, (String, String)> = HashMap::new();
    let (mut oldest, mut newest) = (u64::MAX, 0u64);
    for s in &states {
        for r in s.series_records() {
            let service = s.service(&r.series.labels).to_owned();
            let key = (r.family.name.to_string(), service);
            rows.entry(key.clone()).or_default().0 += 1;
            owner.insert(r.key, key);
            oldest = oldest.min(r.series.created_ns);
            newest = newest.max(r.series.updated_ns);
        }
    }
    let (mut delta, mut cumulative, mut unowned) = (0u64, 0u64, 0u64);
    for s in &states {
        for (_, series, state) in s.stream_records() {
            match state {
                StreamState::Delta(_) => delta += 1,
                StreamState::Cumulative { .. } => cumulative += 1,
            }
            match series.and_then(|k| owner.get(&k)) {
                Some(key) => rows.entry(key.clone()).or_default().1 += 1,
                None => unowned += 1,
            }
        }
    }
    let _ = writeln!(out, "\nseries and source streams by metric and service");
    let _ = writeln!(
        out,
        "  {:<48} {:<24} {:>8} {:>8}",
        "METRIC", "SERVICE", "SERIES", "STREAMS"
    );
    for ((metric, service), (series, streams)) in &rows {
        let _ = writeln!(out, "  {metric:<48} {service:<24} {series:>8} {streams:>8}");
    }
    let series: u64 = rows.values().map(|r| r.0).sum();
    let _ = writeln!(
        out,
        "\ntotal: {series} series, {} source streams ({delta} delta, {cumulative} cumulative, \
         {unowned} feeding no live series)",
        delta + cumulative
    );
    if series > 0 {
        let _ = writeln!(
            out,
            "time range: {} .. {}",
            checkpoint::rfc3339(oldest),
            checkpoint::rfc3339(newest)
        );
    }
    Ok(out)
}
