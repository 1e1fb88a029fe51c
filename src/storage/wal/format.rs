//! The WAL's on-disk format: the segment header, the record framing, record kinds, and the
//! `TIMED` prefix. Writer and replay both go through here, so the two cannot drift apart.

use std::fs::File;
use std::io;
use std::path::Path;

use bytes::Bytes;

pub const MAGIC: &[u8; 8] = b"SPANWAL\0";
pub const SEGMENT_VERSION: u32 = 1;
/// Bytes before the first record of a segment.
pub const HEADER_LEN: u64 = 8 + 4 + 8;
pub const RECORD_VERSION: u8 = 1;
pub const RECORD_HEADER: usize = 4 + 4 + 1 + 1;
/// Record kinds: an `ExportMetricsServiceRequest`, as is or Snappy-compressed (the raw
/// protobuf repeats every attribute key per point and compresses several-fold; writing less is
/// what keeps the log's cost on ingest small).
pub const KIND_METRICS: u8 = 1;
pub const KIND_METRICS_SNAPPY: u8 = 2;
/// The request body exactly as a client gzip-compressed it (nothing to compress again).
pub const KIND_METRICS_GZIP: u8 = 3;
/// The request body exactly as a client zstd-compressed it.
pub const KIND_METRICS_ZSTD: u8 = 4;
/// Added to a kind: the payload starts with the time the request was accepted (u64 LE ns),
/// which replay judges it by, however long after the crash it runs.
pub const TIMED: u8 = 0x10;

/// A `TIMED` record of `kind`: the acceptance time, then `body`.
pub fn timed(kind: u8, accepted_ns: u64, body: &[u8]) -> (u8, Bytes) {
    let mut out = Vec::with_capacity(8 + body.len());
    out.extend_from_slice(&accepted_ns.to_le_bytes());
    out.extend_from_slice(body);
    (kind | TIMED, Bytes::from(out))
}

/// A `TIMED` record of `kind` whose body `write` puts into the buffer it is given (at most
/// `max` bytes) and says how many it wrote.
pub fn timed_with<E>(
    kind: u8,
    accepted_ns: u64,
    max: usize,
    write: impl FnOnce(&mut [u8]) -> Result<usize, E>,
) -> Result<(u8, Bytes), E> {
    let mut out = vec![0u8; 8 + max];
    out[..8].copy_from_slice(&accepted_ns.to_le_bytes());
    let n = write(&mut out[8..])?;
    out.truncate(8 + n);
    Ok((kind | TIMED, Bytes::from(out)))
}

/// A replayed record's kind without the `TIMED` bit, its acceptance time if it has one, and
/// its body.
pub fn split_timed(kind: u8, payload: &[u8]) -> (u8, Option<u64>, &[u8]) {
    match payload.split_first_chunk::<8>() {
        Some((at, rest)) if kind & TIMED != 0 => {
            (kind & !TIMED, Some(u64::from_le_bytes(*at)), rest)
        }
        _ => (kind & !TIMED, None, payload),
    }
}

pub fn encode_record(buf: &mut Vec<u8>, kind: u8, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "record over 4 GiB"))?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&[RECORD_VERSION, kind]);
    crc.update(payload);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&crc.finalize().to_le_bytes());
    buf.push(RECORD_VERSION);
    buf.push(kind);
    buf.extend_from_slice(payload);
    Ok(())
}

/// One record at the start of `data`: (version, kind, payload, bytes used), or `None` if it is
/// short or its CRC does not match.
pub fn decode_record(data: &[u8]) -> Option<(u8, u8, &[u8], usize)> {
    let head = data.get(..RECORD_HEADER)?;
    let len = u32::from_le_bytes(head[0..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(head[4..8].try_into().ok()?);
    let body = data.get(8..RECORD_HEADER.checked_add(len)?)?;
    (crc32fast::hash(body) == crc).then(|| (body[0], body[1], &body[2..], RECORD_HEADER + len))
}

/// The state start recorded in a segment's header.
pub fn segment_state_start(path: &Path) -> io::Result<u64> {
    use std::io::Read;
    let mut header = [0u8; HEADER_LEN as usize];
    File::open(path)?.read_exact(&mut header)?;
    parse_header(&header)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not a WAL segment"))
}

/// The state start of a segment that begins with a header this code wrote.
pub fn parse_header(data: &[u8]) -> Option<u64> {
    let header = data.get(..HEADER_LEN as usize)?;
    let version = u32::from_le_bytes(header[8..12].try_into().ok()?);
    (&header[..8] == MAGIC && version == SEGMENT_VERSION)
        .then(|| header[12..20].try_into().ok().map(u64::from_le_bytes))
        .flatten()
}
