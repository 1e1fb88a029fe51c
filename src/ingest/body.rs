//! Request bodies: reading and decompressing with a hard limit that is enforced while bytes are
//! produced, so a small gzip or zstd bomb is refused after `limit` bytes, never allocated in
//! full. A Snappy block states its length up front: that is checked before anything is
//! allocated for it.
//!
//! The encodings are the ones the Collector's `otlphttp` exporter offers but lz4: gzip, zstd
//! (inflates several times faster than gzip), Snappy, and zlib/deflate. For `snappy` the
//! Collector sends the block format (the framed one before v0.123, or with the
//! `confighttp.framedSnappy` gate), so the first bytes decide, as the Collector's own receiver
//! does. zstd frames in the format before zstd 1.0 are refused: they escape the window limit.

use std::io::Read;
use std::sync::Mutex;

// The `bufread` decoders read the body in place; the `read` ones would copy it through a
// buffer of their own, zeroed for every request.
use flate2::bufread::{MultiGzDecoder, ZlibDecoder};
use zstd::zstd_safe::{DCtx, DParameter, ResetDirective};

use super::IngestError;

/// Request compressions, by their `Content-Encoding` (OTLP/HTTP) or `grpc-encoding` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Zstd,
    Snappy,
    /// zlib-wrapped deflate, as HTTP's `deflate` is (and the Collector's `zlib`/`deflate` send).
    Deflate,
}

/// How a Snappy framed stream starts (its stream identifier chunk). A block starting with these
/// bytes (length 895, then a one-byte literal `0x00`) would hold a body starting with a zero
/// byte, which is neither protobuf (field 0 does not exist) nor JSON.
const SNAPPY_FRAMED_MAGIC: &[u8] = b"\xff\x06\x00\x00sNaPpY";

/// zstd frames may ask for a window of 8 MiB (the Collector's streaming encoder declares that
/// much) or as large as the output may be, whichever is more, up to 128 MiB (zstd's own
/// default limit). The window is reserved up front; a larger one than the output gains nothing.
fn zstd_window_log_max(limit: usize) -> u32 {
    let bits = usize::BITS - limit.saturating_sub(1).leading_zeros();
    bits.clamp(23, 27)
}

impl Encoding {
    /// Parses a `Content-Encoding` (or `grpc-encoding`) header value.
    pub fn parse(header: Option<&str>) -> Result<Self, IngestError> {
        match header.map(|h| h.trim().to_ascii_lowercase()) {
            None => Ok(Self::Identity),
            Some(h) if h.is_empty() || h == "identity" => Ok(Self::Identity),
            Some(h) if h == "gzip" || h == "x-gzip" => Ok(Self::Gzip),
            Some(h) if h == "zstd" => Ok(Self::Zstd),
            Some(h) if h == "deflate" || h == "zlib" => Ok(Self::Deflate),
            Some(h) if h == "snappy" || h == "x-snappy-framed" => Ok(Self::Snappy),
            Some(h) => Err(IngestError::InvalidArgument(format!(
                "unsupported Content-Encoding {h:?} (use gzip, zstd, snappy, deflate or none)"
            ))),
        }
    }
}

/// Whether a `snappy` body is a block (not the framed format).
pub fn snappy_block(raw: &[u8]) -> bool {
    !raw.starts_with(SNAPPY_FRAMED_MAGIC)
}

/// Decompresses `raw` into at most `limit` bytes (an identity body is returned as it is).
pub fn decode(
    raw: bytes::Bytes,
    encoding: Encoding,
    limit: usize,
) -> Result<bytes::Bytes, IngestError> {
    decode_into(raw, encoding, limit, Vec::new())
}

/// [`decode`] into `out` (cleared first; its capacity is what is reused).
// The capped uses: every stream decoder goes through `read_capped`, a Snappy block's claimed
// length is checked before it is allocated.
#[allow(clippy::disallowed_methods)]
pub fn decode_into(
    raw: bytes::Bytes,
    encoding: Encoding,
    limit: usize,
    mut out: Vec<u8>,
) -> Result<bytes::Bytes, IngestError> {
    out.clear();
    match encoding {
        Encoding::Identity => {
            if raw.len() > limit {
                return Err(IngestError::TooLarge { limit });
            }
            Ok(raw)
        }
        // Every member: a gzip body may be several concatenated (RFC 1952).
        Encoding::Gzip => read_capped(MultiGzDecoder::new(&raw[..]), raw.len(), limit, "gzip", out),
        Encoding::Deflate => {
            read_capped(ZlibDecoder::new(&raw[..]), raw.len(), limit, "deflate", out)
        }
        Encoding::Zstd => inflate_zstd(&raw, limit, out, &ZSTD_CONTEXTS),
        Encoding::Snappy if !snappy_block(&raw) => read_capped(
            snap::read::FrameDecoder::new(&raw[..]),
            raw.len(),
            limit,
            "snappy",
            out,
        ),
        Encoding::Snappy => {
            let invalid =
                |e: snap::Error| IngestError::InvalidArgument(format!("invalid snappy body: {e}"));
            let len = snap::raw::decompress_len(&raw).map_err(invalid)?;
            if len > limit {
                return Err(IngestError::TooLarge { limit });
            }
            out.resize(len, 0);
            let n = snap::raw::Decoder::new()
                .decompress(&raw, &mut out)
                .map_err(invalid)?;
            out.truncate(n);
            Ok(out.into())
        }
    }
}

/// A zstd body inflated with a context from `contexts`, given back to them after.
fn inflate_zstd(
    raw: &[u8],
    limit: usize,
    out: Vec<u8>,
    contexts: &ZstdContexts,
) -> Result<bytes::Bytes, IngestError> {
    if has_legacy_zstd_frame(raw) {
        return Err(IngestError::InvalidArgument(
            "invalid zstd body: a frame in the format before zstd 1.0 (not accepted: it \
             ignores the window limit)"
                .into(),
        ));
    }
    let mut context = contexts.take();
    context
        .set_parameter(DParameter::WindowLogMax(zstd_window_log_max(limit)))
        .map_err(|e| {
            let e = zstd::zstd_safe::get_error_name(e);
            IngestError::InvalidArgument(format!("invalid zstd body: {e}"))
        })?;
    let decoder = zstd::stream::read::Decoder::with_context(raw, &mut context);
    let inflated = read_capped(decoder, raw.len(), limit, "zstd", out);
    contexts.keep(context);
    inflated
}

/// zstd decompression contexts kept for the next request: making one allocates and zeroes
/// about 100 KiB, a fifth of the time it takes to inflate a pod's request (BENCHMARKS.md). At
/// most `ZSTD_POOLED` are kept, each only while its buffers are at most `ZSTD_POOLED_BYTES` (a
/// window of 8 MiB, which the Collector's encoder declares, and its blocks): one that read a
/// frame with a larger window is dropped. So the pool holds 18 MiB at worst, whatever clients
/// send, and about a request's inflated size per context with the Collector's frames.
static ZSTD_CONTEXTS: ZstdContexts = ZstdContexts::new();
const ZSTD_POOLED: usize = 2;
const ZSTD_POOLED_BYTES: usize = 9 << 20;

struct ZstdContexts(Kept<DCtx<'static>, ZSTD_POOLED>);

impl ZstdContexts {
    const fn new() -> Self {
        Self(Kept::new())
    }

    /// A kept context with its session reset (an earlier request may have stopped mid frame:
    /// its parameters could not be set, nor its leftovers be read), or a new one.
    fn take(&self) -> DCtx<'static> {
        self.0
            .take()
            .and_then(|mut context| {
                let reset = context.reset(ResetDirective::SessionOnly);
                reset.is_ok().then_some(context)
            })
            .unwrap_or_else(DCtx::create)
    }

    fn keep(&self, context: DCtx<'static>) {
        if context.sizeof() <= ZSTD_POOLED_BYTES {
            self.0.keep(context);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.len()
    }
}

/// At most `N` values kept for the next request (the pools of this module).
struct Kept<T, const N: usize>(Mutex<Vec<T>>);

impl<T, const N: usize> Kept<T, N> {
    const fn new() -> Self {
        Self(Mutex::new(Vec::new()))
    }

    fn take(&self) -> Option<T> {
        self.0.lock().ok().and_then(|mut kept| kept.pop())
    }

    /// Keeps `value` if fewer than `N` are kept, drops it otherwise.
    fn keep(&self, value: T) {
        if let Ok(mut kept) = self.0.lock() {
            if kept.len() < N {
                kept.push(value);
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().map_or(0, |kept| kept.len())
    }
}

/// Whether a frame of `raw` is in a format before zstd 1.0 (magic numbers v0.2–v0.7). The
/// library decodes those (another dependency builds it with legacy support) without the window
/// limit, into a buffer of up to 128 MiB that the context keeps and does not count in its size:
/// no OTLP exporter sends them, so they are refused before anything is allocated. Frames are
/// walked by their headers until one cannot be sized; the decoder refuses that one itself.
fn has_legacy_zstd_frame(mut raw: &[u8]) -> bool {
    const LEGACY: std::ops::RangeInclusive<u32> = 0xFD2F_B522..=0xFD2F_B527;
    while let Some(magic) = raw.first_chunk::<4>() {
        if LEGACY.contains(&u32::from_le_bytes(*magic)) {
            return true;
        }
        match zstd::zstd_safe::find_frame_compressed_size(raw) {
            Ok(n) if n > 0 && n <= raw.len() => raw = &raw[n..],
            _ => return false,
        }
    }
    false
}

/// Reads `reader` to its end, refusing it once it has produced more than `limit` bytes.
fn read_capped(
    reader: impl Read,
    compressed: usize,
    limit: usize,
    name: &str,
    mut out: Vec<u8>,
) -> Result<bytes::Bytes, IngestError> {
    // Grow as data arrives; the estimate only avoids early reallocations.
    out.reserve(compressed.saturating_mul(4).min(limit));
    let mut reader = reader.take((limit as u64).saturating_add(1));
    reader
        .read_to_end(&mut out)
        .map_err(|e| IngestError::InvalidArgument(format!("invalid {name} body: {e}")))?;
    if out.len() > limit {
        return Err(IngestError::TooLarge { limit });
    }
    Ok(out.into())
}

/// Inflate buffers kept for the next request: a body of the usual size is then inflated into
/// memory that is already there (no chain of reallocations, no fresh pages), which saves 1-3%
/// of the ingest path (BENCHMARKS.md). At most `POOLED` buffers of at most `POOLED_BYTES`
/// capacity each are kept, so the pool holds 32 MiB at worst, whatever the requests were.
pub struct BufPool {
    bufs: Kept<Vec<u8>, POOLED>,
}

const POOLED: usize = 8;
const POOLED_BYTES: usize = 4 << 20;

impl Default for BufPool {
    fn default() -> Self {
        Self { bufs: Kept::new() }
    }
}

impl BufPool {
    /// A buffer to inflate into (empty, with whatever capacity it kept).
    pub fn take(&self) -> Vec<u8> {
        self.bufs.take().unwrap_or_default()
    }

    /// Gives an inflated body back once nothing else holds it (it stays in use otherwise).
    pub fn give(&self, body: bytes::Bytes) {
        let Ok(mut buf) = body.try_into_mut() else {
            return;
        };
        // Cleared first: the conversion then moves no bytes.
        buf.clear();
        if buf.capacity() == 0 || buf.capacity() > POOLED_BYTES {
            return;
        }
        self.bufs.keep(Vec::from(buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use std::io::Write;

    fn gzip(data: &[u8]) -> bytes::Bytes {
        let mut e = GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(data).unwrap();
        e.finish().unwrap().into()
    }

    #[test]
    fn a_gzip_bomb_stops_at_the_limit() {
        let bomb = gzip(&vec![0u8; 50 << 20]);
        assert!(bomb.len() < 100 << 10, "the bomb is small: {}", bomb.len());
        let err = decode(bomb, Encoding::Gzip, 1 << 20).unwrap_err();
        assert!(matches!(err, IngestError::TooLarge { limit } if limit == 1 << 20));
    }

    #[test]
    fn every_member_of_a_gzip_body_is_read() {
        let two = [gzip(b""), gzip(b"second")].concat();
        let body = decode(two.into(), Encoding::Gzip, 1024).unwrap();
        assert_eq!(&body[..], b"second");
    }

    #[test]
    fn the_zstd_window_follows_the_limit_between_8_and_128_mib() {
        assert_eq!(zstd_window_log_max(1 << 20), 23);
        assert_eq!(zstd_window_log_max((16 << 20) + 1), 25);
        assert_eq!(zstd_window_log_max(64 << 20), 26);
        assert_eq!(zstd_window_log_max(usize::MAX), 27);
    }

    #[test]
    fn gzip_within_the_limit_round_trips() {
        let body = decode(gzip(b"hello"), Encoding::Gzip, 1024).unwrap();
        assert_eq!(&body[..], b"hello");
    }

    #[test]
    fn corrupt_gzip_is_invalid_not_a_panic() {
        let err = decode(
            bytes::Bytes::from_static(b"\x1f\x8bnope"),
            Encoding::Gzip,
            1024,
        );
        assert!(matches!(err, Err(IngestError::InvalidArgument(_))));
    }

    fn zstd(data: &[u8]) -> bytes::Bytes {
        zstd::stream::encode_all(data, 19).unwrap().into()
    }

    #[test]
    fn every_encoding_round_trips() {
        let data = b"span metrics ".repeat(1000);
        let mut framed = snap::write::FrameEncoder::new(Vec::new());
        framed.write_all(&data).unwrap();
        let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        zlib.write_all(&data).unwrap();
        let bodies = [
            (Encoding::Gzip, gzip(&data)),
            (Encoding::Zstd, zstd(&data)),
            (
                Encoding::Snappy,
                snap::raw::Encoder::new()
                    .compress_vec(&data)
                    .unwrap()
                    .into(),
            ),
            (Encoding::Snappy, framed.into_inner().unwrap().into()),
            (Encoding::Deflate, zlib.finish().unwrap().into()),
            (Encoding::Identity, bytes::Bytes::from(data.clone())),
        ];
        for (encoding, body) in bodies {
            let out = decode(body, encoding, data.len()).unwrap();
            assert!(out[..] == data[..], "{encoding:?}");
        }
    }

    #[test]
    fn a_zstd_context_kept_for_the_next_request_carries_nothing_over() {
        let data = b"span metrics ".repeat(10_000);
        let whole = zstd(&data);
        let cut = &whole[..whole.len() / 2];
        let bomb = zstd(&vec![0u8; 4 << 20]);
        // A pool of its own, so the context a request left is the one the next one takes.
        let pool = ZstdContexts::new();
        for left_mid_frame in [cut, &bomb[..]] {
            assert!(inflate_zstd(left_mid_frame, 1 << 20, Vec::new(), &pool).is_err());
            assert_eq!(pool.len(), 1, "kept though its frame was not finished");
            let out = inflate_zstd(&whole, 1 << 20, Vec::new(), &pool).unwrap();
            assert!(out[..] == data[..]);
            assert_eq!(pool.len(), 1);
        }
    }

    #[test]
    fn legacy_zstd_frames_are_refused_wherever_they_are() {
        // A v0.7 frame header asking for a 128 MiB window, with no blocks.
        let legacy: &[u8] = b"\x27\xb5\x2f\xfd\x00\x88\xc0\x00\x00";
        let current = zstd(b"hello");
        let skippable = b"\x50\x2a\x4d\x18\x02\x00\x00\x00ab";
        for body in [
            legacy.to_vec(),
            [&current[..], legacy].concat(),
            [&skippable[..], &current[..], legacy].concat(),
        ] {
            let err = decode(body.into(), Encoding::Zstd, 1 << 20).unwrap_err();
            assert!(err.to_string().contains("before zstd 1.0"), "{err}");
        }
        let fine = [&skippable[..], &current[..], &current[..]].concat();
        assert_eq!(
            &decode(fine.into(), Encoding::Zstd, 1 << 20).unwrap()[..],
            b"hellohello"
        );
    }

    #[test]
    fn contexts_are_kept_two_at_most_and_not_after_a_large_window() {
        // A frame declaring a 64 MiB window (no content size to shrink it to).
        let mut e = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        e.set_parameter(zstd::zstd_safe::CParameter::WindowLog(26))
            .unwrap();
        e.include_contentsize(false).unwrap();
        e.write_all(&b"x".repeat(1 << 16)).unwrap();
        let frame = e.finish().unwrap();
        // A pool of its own: the service's is shared by the tests running alongside.
        let pool = ZstdContexts::new();
        let mut context = pool.take();
        context
            .set_parameter(DParameter::WindowLogMax(zstd_window_log_max(64 << 20)))
            .unwrap();
        let mut out = Vec::new();
        zstd::stream::read::Decoder::with_context(&frame[..], &mut context)
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out.len(), 1 << 16);
        assert!(context.sizeof() > ZSTD_POOLED_BYTES, "{}", context.sizeof());
        pool.keep(context);
        assert_eq!(pool.len(), 0, "a context holding a large window is dropped");
        for _ in 0..3 {
            pool.keep(DCtx::create());
        }
        assert_eq!(pool.len(), ZSTD_POOLED);
        let _taken = pool.take();
        assert_eq!(
            pool.len(),
            ZSTD_POOLED - 1,
            "taken from the pool, not made anew"
        );
    }

    #[test]
    fn bombs_stop_at_the_limit_in_every_encoding() {
        let data = vec![0u8; 50 << 20];
        let mut framed = snap::write::FrameEncoder::new(Vec::new());
        framed.write_all(&data).unwrap();
        let bombs = [
            (Encoding::Zstd, zstd(&data)),
            (Encoding::Snappy, framed.into_inner().unwrap().into()),
        ];
        for (encoding, bomb) in bombs {
            assert!(
                bomb.len() < 3 << 20,
                "{encoding:?} is small: {}",
                bomb.len()
            );
            let err = decode(bomb, encoding, 1 << 20).unwrap_err();
            assert!(
                matches!(err, IngestError::TooLarge { .. }),
                "{encoding:?}: {err}"
            );
        }
    }

    #[test]
    fn a_snappy_block_claiming_too_much_is_refused_before_allocating() {
        // A varint length of 4 GiB - 1 and nothing behind it.
        let lying = bytes::Bytes::from_static(b"\xff\xff\xff\xff\x0f\x00");
        let err = decode(lying, Encoding::Snappy, 1 << 20).unwrap_err();
        assert!(matches!(err, IngestError::TooLarge { .. }), "{err}");
        let short = snap::raw::Encoder::new()
            .compress_vec(b"hello, hello")
            .unwrap();
        let err = decode(
            short[..short.len() - 2].to_vec().into(),
            Encoding::Snappy,
            1024,
        );
        assert!(
            matches!(err, Err(IngestError::InvalidArgument(_))),
            "{err:?}"
        );
    }

    #[test]
    fn corrupt_bodies_are_invalid_not_a_panic() {
        for encoding in [Encoding::Zstd, Encoding::Snappy, Encoding::Deflate] {
            for body in [
                &b""[..],
                b"\x28\xb5\x2f\xfd\xff\xff",
                b"\xff\x06\x00\x00sNaPpY\x01",
            ] {
                let err = decode(bytes::Bytes::copy_from_slice(body), encoding, 1024);
                if let Ok(out) = &err {
                    assert!(out.is_empty(), "{encoding:?} {body:?} decoded to {out:?}");
                } else {
                    assert!(
                        matches!(err, Err(IngestError::InvalidArgument(_))),
                        "{err:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_pool_keeps_only_buffers_nothing_else_holds_and_of_bounded_size() {
        let pool = BufPool::default();
        let body = decode_into(gzip(&[7u8; 1000]), Encoding::Gzip, 1 << 20, pool.take()).unwrap();
        let shared = body.clone();
        pool.give(body);
        assert_eq!(
            pool.take().capacity(),
            0,
            "still held elsewhere: not pooled"
        );
        pool.give(shared);
        let reused = pool.take();
        assert!(
            reused.capacity() >= 1000 && reused.is_empty(),
            "pooled once unique"
        );
        pool.give(bytes::Bytes::from(vec![0u8; POOLED_BYTES + 1]));
        assert_eq!(pool.take().capacity(), 0, "too large to keep");
        for _ in 0..POOLED + 3 {
            pool.give(bytes::Bytes::from(vec![0u8; 10]));
        }
        assert_eq!(pool.bufs.len(), POOLED);
        // A reused buffer inflates the same bytes.
        let again = decode_into(gzip(b"again"), Encoding::Gzip, 1024, reused).unwrap();
        assert_eq!(&again[..], b"again");
    }

    #[test]
    fn unknown_encodings_are_refused_by_name() {
        let err = Encoding::parse(Some("br")).unwrap_err().to_string();
        assert!(err.contains("br"), "{err}");
        assert_eq!(Encoding::parse(Some("GZIP")).unwrap(), Encoding::Gzip);
        assert_eq!(Encoding::parse(Some("zstd")).unwrap(), Encoding::Zstd);
        assert_eq!(
            Encoding::parse(Some("x-snappy-framed")).unwrap(),
            Encoding::Snappy
        );
    }
}
