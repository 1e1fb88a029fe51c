//! Start-up replay: WAL records after the restored checkpoint go through the same ingest path
//! as live requests (counted under `protocol="wal_replay"`), in log order, before serving.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;

use super::wal::{self, Position, ReplayStats};
use super::StorageMetrics;
use crate::ingest::body::{decode, Encoding};
use crate::ingest::{IngestError, Ingestor};
use crate::telemetry::Protocol;

/// Gzip and zstd records inflate to at least this much on replay, whatever `max_request_bytes` is now.
const REPLAY_MIN_LIMIT: usize = 1 << 30;

/// Snappy writes at most 64 bytes per 3-byte copy element: no valid record inflates past this
/// many times its size (plus its header).
const SNAPPY_MAX_RATIO: usize = 22;

/// The request body a record holds, inflated as it was logged, or `None` if it cannot be. The
/// CRC vouches only for what was written: a snappy length field is checked against what the
/// record could hold before anything is allocated for it (not against a setting, which may
/// have been lowered since); a gzip or zstd body is inflated in steps, up to `limit`.
pub fn record_body(kind: u8, record: Vec<u8>, limit: usize) -> Option<Vec<u8>> {
    match kind {
        wal::KIND_METRICS_SNAPPY => {
            let len = snap::raw::decompress_len(&record).ok()?;
            if len
                > record
                    .len()
                    .saturating_mul(SNAPPY_MAX_RATIO)
                    .saturating_add(16)
            {
                return None;
            }
            #[allow(clippy::disallowed_methods)] // the claimed length was checked just above
            snap::raw::Decoder::new().decompress_vec(&record).ok()
        }
        wal::KIND_METRICS_GZIP => decode(record.into(), Encoding::Gzip, limit)
            .ok()
            .map(Vec::from),
        wal::KIND_METRICS_ZSTD => decode(record.into(), Encoding::Zstd, limit)
            .ok()
            .map(Vec::from),
        _ => Some(record),
    }
}

/// Replays `dir` from `from` into `ingestor` (which must not log to the WAL itself). Each
/// record is judged by when it was accepted, but never earlier than `floor_ns` (when the
/// restored checkpoint was written): a record accepted before it and logged after it (held
/// while the log failed) must meet the windows as the checkpoint has them, where a stream
/// that expired since would otherwise look new.
pub async fn replay(
    dir: PathBuf,
    from: Position,
    floor_ns: u64,
    ingestor: &Ingestor,
    metrics: &StorageMetrics,
) -> std::io::Result<ReplayStats> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(u8, Option<u64>, Vec<u8>)>(64);
    let reader = tokio::task::spawn_blocking(move || {
        wal::replay(&dir, from, |kind, payload| {
            // A timed record starts with the time it was accepted: it is judged by that time
            // (TTLs, late windows, clock skew), not by when replay runs.
            let (kind, accepted, payload) = wal::split_timed(kind, payload);
            // The receiver only goes away if the start is abandoned.
            let _ = tx.blocking_send((kind, accepted, payload.to_vec()));
        })
    });
    let mut undecodable = 0u64;
    // A gzip record logged under a larger `max_request_bytes` must still inflate after the
    // limit was lowered.
    let limit = ingestor.max_request_bytes.max(REPLAY_MIN_LIMIT);
    while let Some((kind, accepted, record)) = rx.recv().await {
        metrics.wal_replayed.inc();
        let Some(payload) = record_body(kind, record, limit) else {
            undecodable += 1;
            continue;
        };
        let Ok(body) = crate::ingest::wire::read(Bytes::from(payload)) else {
            undecodable += 1;
            continue;
        };
        let req = crate::ingest::view::OtlpBody::regular(body);
        // A full shard queue is waited out: replay must apply every record.
        while let Err(IngestError::Unavailable) = ingestor
            .export_at(
                Protocol::WalReplay,
                req.clone(),
                None,
                accepted.map(|t| t.max(floor_ns)),
            )
            .await
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    if undecodable > 0 {
        tracing::warn!(
            records = undecodable,
            "WAL records with a valid CRC did not decode: skipped"
        );
    }
    let stats = reader
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??;
    metrics.wal_truncated.inc_by(stats.truncated);
    metrics.wal_corrupt.inc_by(stats.corrupt);
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snappy_records_inflate_by_what_they_hold_not_by_a_setting() {
        // Zeros compress as far as snappy goes: still under the ratio.
        let body = vec![0u8; 4 << 20];
        let record = snap::raw::Encoder::new().compress_vec(&body).unwrap();
        assert!(
            body.len() <= record.len() * SNAPPY_MAX_RATIO,
            "{}",
            record.len()
        );
        let got = record_body(wal::KIND_METRICS_SNAPPY, record, 1024);
        assert_eq!(
            got.map(|b| b.len()),
            Some(body.len()),
            "whatever the limit now"
        );
        // A header claiming a gibibyte from a few bytes is refused before allocating.
        let mut lying = Vec::new();
        let mut n = 1u64 << 30;
        while n >= 0x80 {
            lying.push((n as u8) | 0x80);
            n >>= 7;
        }
        lying.push(n as u8);
        lying.extend_from_slice(&[0; 8]);
        assert_eq!(
            record_body(wal::KIND_METRICS_SNAPPY, lying, usize::MAX),
            None
        );
    }
}
