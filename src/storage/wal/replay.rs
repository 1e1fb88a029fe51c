//! Reading the log back: every record from a position on, oldest first. A torn tail (a write
//! cut short by a crash: nothing in it was acknowledged) is truncated; damage with readable
//! records after it is skipped, counted and the segment copied aside.

use std::fs::OpenOptions;
use std::io;
use std::path::Path;

use super::format::{
    decode_record, parse_header, HEADER_LEN, KIND_METRICS, KIND_METRICS_GZIP, KIND_METRICS_SNAPPY,
    KIND_METRICS_ZSTD, RECORD_HEADER, RECORD_VERSION, TIMED,
};
use super::{segments, Position};

/// What replay found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplayStats {
    /// Records handed to the callback.
    pub records: u64,
    /// Torn or corrupt tails cut off (one per segment at most).
    pub truncated: u64,
    /// Records skipped because a newer spanagg wrote them (unknown version or kind).
    pub skipped: u64,
    /// Damaged records (or runs of them) with readable records after them: corruption, not a
    /// torn tail. Skipped; the segment is copied aside as `*.wal.corrupt`.
    pub corrupt: u64,
}

/// Where the next record starts after a damaged one at `off`, if the damage spared its length
/// and a readable record follows. No byte-by-byte search for one: payloads hold what clients
/// sent (gzip bodies as they came), and a record forged inside one must never be replayed. A
/// damaged record whose length runs past the end, or whose successor does not read, is a torn
/// tail.
fn next_readable(data: &[u8], off: usize) -> Option<usize> {
    let head = data.get(off..off.checked_add(RECORD_HEADER)?)?;
    let len = u32::from_le_bytes(head[0..4].try_into().ok()?) as usize;
    let next = off.checked_add(RECORD_HEADER)?.checked_add(len)?;
    (next < data.len() && decode_record(&data[next..]).is_some()).then_some(next)
}

/// Reads every record at or after `from`, oldest first, truncating torn tails.
pub fn replay(dir: &Path, from: Position, mut f: impl FnMut(u8, &[u8])) -> io::Result<ReplayStats> {
    let mut stats = ReplayStats::default();
    for (seq, path) in segments(dir)? {
        if seq < from.segment {
            continue;
        }
        // Only regular files: a device or FIFO under a segment's name could read forever.
        if !std::fs::symlink_metadata(&path)?.file_type().is_file() {
            tracing::warn!(path = %path.display(), "not a regular file: skipped");
            continue;
        }
        let data = std::fs::read(&path)?;
        if parse_header(&data).is_none() {
            // Torn while being created (nothing in it was ever acknowledged) or not ours.
            tracing::warn!(path = %path.display(), "WAL segment without a valid header: set aside");
            std::fs::rename(&path, path.with_extension("wal.corrupt"))?;
            stats.truncated += 1;
            continue;
        }
        let start = if seq == from.segment {
            from.offset.max(HEADER_LEN)
        } else {
            HEADER_LEN
        };
        let mut off = usize::try_from(start).unwrap_or(usize::MAX);
        let mut copied_aside = false;
        while off < data.len() {
            match decode_record(&data[off..]) {
                Some((version, kind, payload, used)) => {
                    if version == RECORD_VERSION
                        && matches!(
                            kind & !TIMED,
                            KIND_METRICS
                                | KIND_METRICS_SNAPPY
                                | KIND_METRICS_GZIP
                                | KIND_METRICS_ZSTD
                        )
                        && (kind & TIMED == 0 || payload.len() >= 8)
                    {
                        f(kind, payload);
                        stats.records += 1;
                    } else {
                        stats.skipped += 1;
                    }
                    off += used;
                }
                None => {
                    if let Some(next) = next_readable(&data, off) {
                        // Readable records follow: this is damage, not a write cut short.
                        // Keep a copy of the segment as it is, skip the damage, go on.
                        let aside = path.with_extension("wal.corrupt");
                        if !copied_aside {
                            copied_aside = true;
                            // A copy that fails (a full disk) must not stop the start.
                            if let Err(e) = std::fs::copy(&path, &aside) {
                                tracing::error!(error = %e, "could not copy the damaged segment aside");
                            }
                        }
                        tracing::error!(
                            path = %path.display(),
                            offset = off,
                            skipped_bytes = next - off,
                            copy = %aside.display(),
                            "corrupt WAL record with readable records after it: skipped \
                             (acknowledged requests in it are lost; the segment is copied aside)"
                        );
                        stats.corrupt += 1;
                        off = next;
                        continue;
                    }
                    tracing::warn!(
                        path = %path.display(),
                        offset = off,
                        dropped_bytes = data.len() - off,
                        "torn WAL tail: truncated (those requests were never acknowledged)"
                    );
                    let file = OpenOptions::new().write(true).open(&path)?;
                    file.set_len(off as u64)?;
                    file.sync_all()?;
                    stats.truncated += 1;
                    break;
                }
            }
        }
    }
    Ok(stats)
}
