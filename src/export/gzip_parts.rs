//! A gzipped scrape built from parts deflated on the shards, as pigz builds one file from
//! blocks compressed apart. Prometheus and Alloy ask for gzip on every scrape. Rendering the
//! whole exposition as text and compressing it on the I/O thread held the text at its full size
//! (20 MB at 200 pods × 200 routes) for a body a twentieth of that. Here each shard renders a
//! family 256 KiB at a time straight into a deflater, so a scrape holds the compressed parts and
//! a little scratch, and the shards compress in parallel.
//!
//! Invariants: every [`Segment`] is raw deflate that ends byte-aligned with no final block and
//! refers to nothing before it (deflated from a fresh state and ended by a sync flush, or stored
//! blocks), so segments concatenate into one valid stream in any order; [`gzip`] closes that
//! stream with an empty final block and a trailer of the CRC-32 (combined from the segments'
//! own) and the length, mod 2^32 (RFC 1952).

use std::io;

use flate2::{Compress, Compression, Crc, FlushCompress};

use super::prometheus::{FamilyPart, Format, Piece, Renderer};
use crate::aggregate::series::Series;
use crate::aggregate::shard::ShardState;

/// Text gathered before it is deflated: large enough for the deflater to work in long runs,
/// small next to a family's text.
const SCRATCH: usize = 256 << 10;
/// A family's text under this is stored, not deflated: starting a deflated segment resets the
/// compressor (~300 KB of state zeroed), which must not cost more than the text is worth when
/// a client has made thousands of small families.
const SMALL: usize = 16 << 10;
/// Input per call to the compressor, and room for its output before each. miniz writes a block
/// (at most ~85 KB) straight to the caller's buffer only when that much room is free; otherwise
/// it keeps part of the block inside, and a sync flush then returns before it is done. With room
/// for two blocks and at most one block's worth of input per call, that never happens.
const STEP: usize = 16 << 10;
const ROOM: usize = 256 << 10;
/// What a sync flush ends with: an empty stored block.
const SYNC_MARK: [u8; 4] = [0, 0, 0xff, 0xff];

/// Some text as raw deflate ending byte-aligned (a sync flush, or stored blocks), with its
/// CRC-32 and length.
#[derive(Debug, Default)]
pub struct Segment {
    bytes: Vec<u8>,
    crc: Crc,
    len: u64,
}

impl Segment {
    /// Length of the text it holds.
    pub fn text_len(&self) -> u64 {
        self.len
    }

    /// Length deflated.
    pub fn deflated_len(&self) -> usize {
        self.bytes.len()
    }

    /// `text` in stored (uncompressed) blocks: for headers and small families.
    pub fn stored(text: &[u8]) -> Self {
        let mut bytes = Vec::with_capacity(text.len() + 5 * text.len().div_ceil(0xffff));
        for chunk in text.chunks(0xffff) {
            let n = chunk.len() as u16;
            // BFINAL 0, BTYPE 00, padded to the byte; then LEN and its complement.
            bytes.push(0);
            bytes.extend_from_slice(&n.to_le_bytes());
            bytes.extend_from_slice(&(!n).to_le_bytes());
            bytes.extend_from_slice(chunk);
        }
        let mut crc = Crc::new();
        crc.update(text);
        Self {
            bytes,
            crc,
            len: text.len() as u64,
        }
    }
}

/// Deflates text into segments, one after another, with one compressor state.
pub struct Deflater {
    z: Compress,
    out: Vec<u8>,
    segment: Segment,
}

impl Default for Deflater {
    fn default() -> Self {
        Self {
            z: Compress::new(Compression::fast(), false),
            out: vec![0; ROOM],
            segment: Segment::default(),
        }
    }
}

impl Deflater {
    /// Adds `text` to the segment being made.
    pub fn write(&mut self, text: &[u8]) -> io::Result<()> {
        self.segment.crc.update(text);
        self.segment.len += text.len() as u64;
        for chunk in text.chunks(STEP) {
            self.call(chunk, FlushCompress::None)?;
        }
        Ok(())
    }

    /// Ends the segment being made and starts the next from a fresh state.
    pub fn segment(&mut self) -> io::Result<Segment> {
        self.call(&[], FlushCompress::Sync)?;
        if !self.segment.bytes.ends_with(&SYNC_MARK) {
            return Err(io::Error::other("deflate: a sync flush did not complete"));
        }
        self.z.reset();
        let mut done = std::mem::take(&mut self.segment);
        done.bytes.shrink_to_fit();
        Ok(done)
    }

    /// `text` deflated as a segment of its own.
    pub fn segment_of(&mut self, text: &[u8]) -> io::Result<Segment> {
        self.write(text)?;
        self.segment()
    }

    /// Compresses `input` (at most `STEP` bytes) into the segment, with `ROOM` free each time.
    fn call(&mut self, mut input: &[u8], flush: FlushCompress) -> io::Result<()> {
        loop {
            let (before_in, before_out) = (self.z.total_in(), self.z.total_out());
            // A slice, not `compress_vec`: flate2 zero-fills a Vec's spare room on every call.
            self.z
                .compress(input, &mut self.out, flush)
                .map_err(io::Error::other)?;
            let taken = (self.z.total_in() - before_in) as usize;
            let made = (self.z.total_out() - before_out) as usize;
            input = input.get(taken..).unwrap_or_default();
            let made = self.out.get(..made).unwrap_or_default();
            self.segment.bytes.extend_from_slice(made);
            // With room left over, all the input is taken and any flush written.
            if input.is_empty() && made.len() < ROOM {
                return Ok(());
            }
            if taken == 0 && made.is_empty() {
                return Err(io::Error::other("deflate: no progress"));
            }
        }
    }
}

/// Every series of a shard by family, each family's text deflated as one segment (stored, if
/// it is small).
pub fn encode_shard(state: &ShardState, format: Format) -> io::Result<Vec<FamilyPart<Segment>>> {
    let families = state.families();
    // In the shard's series order within each family, as the text encoder writes them.
    let mut by_family: Vec<Vec<&Series>> = vec![Vec::new(); families.len()];
    for s in state.series() {
        if let Some(f) = by_family.get_mut(s.family as usize) {
            f.push(s);
        }
    }
    let mut render = Renderer::new(state, format);
    let mut deflater = Deflater::default();
    let mut scratch = String::with_capacity(SCRATCH + (16 << 10));
    let mut parts = Vec::new();
    for (desc, series) in families.iter().zip(&by_family) {
        if series.is_empty() {
            continue;
        }
        let mut deflating = false;
        for s in series {
            render.series(&mut scratch, &desc.name, s);
            if scratch.len() >= SCRATCH {
                deflater.write(scratch.as_bytes())?;
                scratch.clear();
                deflating = true;
            }
        }
        let body = if !deflating && scratch.len() < SMALL {
            Segment::stored(scratch.as_bytes())
        } else {
            deflater.segment_of(scratch.as_bytes())?
        };
        scratch.clear();
        parts.push(FamilyPart {
            desc: desc.clone(),
            body,
        });
    }
    Ok(parts)
}

/// The gzip member of the segments in order: header, segments, an empty final block, trailer.
pub fn gzip<'a>(segments: impl IntoIterator<Item = &'a Segment> + Clone) -> Vec<u8> {
    // Sized once: the header, the segments, the final block and the trailer.
    let size = 10
        + segments
            .clone()
            .into_iter()
            .map(|s| s.bytes.len())
            .sum::<usize>()
        + 10;
    let mut out = Vec::with_capacity(size);
    // No name, no mtime, no flags; OS "unknown".
    out.extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff]);
    let mut crc = Crc::new();
    let mut len = 0u64;
    for s in segments {
        out.extend_from_slice(&s.bytes);
        crc.combine(&s.crc);
        len += s.len;
    }
    // BFINAL = 1, fixed Huffman codes, and at once the end-of-block code.
    out.extend_from_slice(&[0x03, 0x00]);
    out.extend_from_slice(&crc.sum().to_le_bytes());
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out
}

/// The scrape's pieces to gzip: each family header stored as it is (headers are small, and
/// this runs on an I/O thread), the shards' segments as they came.
pub fn stitch(
    shard_parts: Vec<Vec<FamilyPart<Segment>>>,
    format: Format,
) -> (Vec<Piece<Segment>>, usize) {
    super::prometheus::stitch_with(shard_parts, format, |text| Segment::stored(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::aggregate::shard::ShardConfig;
    use crate::export::prometheus;
    use crate::ingest::otlp::Projection;
    use crate::workload::{request, single_shard_batch, Shape};

    /// Decodes a gzip member as a request body is, checking its CRC-32 and length.
    fn gunzip(gz: &[u8]) -> Result<String, String> {
        let enc = crate::ingest::body::Encoding::Gzip;
        let text = crate::ingest::body::decode(gz.to_vec().into(), enc, 1 << 30)
            .map_err(|e| format!("{e:?}"))?;
        String::from_utf8(text.to_vec()).map_err(|e| e.to_string())
    }

    #[test]
    fn segments_join_into_one_member_in_any_order() {
        let texts: Vec<String> = vec![
            String::new(),
            "# TYPE a counter\n".into(),
            (0..20_000)
                .map(|i| format!("a_total{{i=\"{i}\"}} {}\n", i * 7))
                .collect(),
            "x".repeat(3 * SCRATCH),
            "tail\n".into(),
        ];
        let mut shared = Deflater::default();
        let segments: Vec<Segment> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                // One deflater for some, a fresh one for others, stored blocks (headers, small
                // families) for the rest.
                match i % 3 {
                    0 => shared.segment_of(t.as_bytes()).expect("deflated"),
                    1 => Deflater::default()
                        .segment_of(t.as_bytes())
                        .expect("deflated"),
                    _ => Segment::stored(t.as_bytes()),
                }
            })
            .collect();
        assert!(segments[3].deflated_len() < SCRATCH, "repeats compress");
        // Stored over more than one block's 65,535 bytes.
        let blocks = texts[2].len().div_ceil(0xffff);
        assert!(blocks > 1);
        assert_eq!(segments[2].deflated_len(), texts[2].len() + 5 * blocks);
        for order in [[0, 1, 2, 3, 4], [4, 2, 0, 3, 1]] {
            let gz = gzip(order.iter().map(|&i| &segments[i]));
            let want: String = order.iter().map(|&i| texts[i].as_str()).collect();
            assert!(gunzip(&gz).expect("a valid member") == want, "{order:?}");
            // The trailer is checked: a wrong CRC is refused, so a passing test means it is right.
            let mut bad = gz.clone();
            let at = bad.len() - 8;
            bad[at] ^= 1;
            assert!(gunzip(&bad).is_err(), "a corrupt CRC must not decode");
        }
        assert!(gunzip(&gzip([])).expect("an empty member").is_empty());
    }

    /// Text that compresses little: the deflater's buffers fill at every size and moment.
    fn hard_text(seed: u64, len: usize) -> String {
        let mut x = seed | 1;
        let mut out = String::with_capacity(len + 32);
        while out.len() < len {
            // xorshift64: cheap, and varied enough to defeat long matches.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.push_str(itoa::Buffer::new().format(x % 100_000_007));
            out.push(if x.is_multiple_of(7) { '\n' } else { ' ' });
        }
        out
    }

    #[test]
    fn every_segment_ends_flushed_whatever_its_size_and_writes() {
        let mut deflater = Deflater::default();
        let mut texts = Vec::new();
        let mut segments = Vec::new();
        // Lengths in fine steps, so that the compressor's internal blocks end at every offset
        // from a segment's end (with too little room, some flushes then come out unfinished).
        for i in 0..2_000u64 {
            let len = 20_000 + i as usize * 29 + (i as usize % 50 / 49) * 5 * SCRATCH;
            let text = hard_text(i + 1, len);
            // Written as the shards write: in pieces of about the scratch size, some odd.
            let step = SCRATCH + (i as usize % 5) * 4_099;
            for chunk in text.as_bytes().chunks(step) {
                deflater.write(chunk).expect("deflated");
            }
            let seg = deflater.segment().expect("flushed");
            assert!(seg.bytes.ends_with(&SYNC_MARK), "segment {i} ({len} bytes)");
            texts.push(text);
            segments.push(seg);
        }
        let want: String = texts.concat();
        assert!(gunzip(&gzip(&segments)).expect("a valid member") == want);
    }

    /// Two shards of a spanmetrics workload, a family of each shard far over the scratch size.
    fn shards() -> Vec<ShardState> {
        let shape = Shape {
            services: 2,
            routes: 300,
            bounds: 49,
            counters: true,
        };
        let projection = Arc::new(Projection::new(&["service.name".into()], &[]));
        (0..2)
            .map(|pod| {
                let mut state = ShardState::new(ShardConfig::default());
                let req = request(&shape, pod, 1_000, 2_000);
                state.apply(&single_shard_batch(req, &projection));
                state
            })
            .collect()
    }

    #[test]
    fn a_gzipped_scrape_is_the_text_scrape_deflated() {
        let states = shards();
        for format in [Format::Text, Format::OpenMetrics] {
            let text_parts = states
                .iter()
                .map(|s| prometheus::encode_shard(s, format, states.len()))
                .collect();
            let (text, text_conflicts) = prometheus::stitch(text_parts, format);
            assert!(text.len() > 8 * SCRATCH, "{} bytes", text.len());
            let parts = states
                .iter()
                .map(|s| encode_shard(s, format).expect("deflated"))
                .collect();
            let (pieces, conflicts) = stitch(parts, format);
            let gz = gzip(pieces.iter().map(|p| &p.text));
            assert_eq!(conflicts, text_conflicts);
            let len: u64 = pieces.iter().map(|p| p.text.text_len()).sum();
            assert_eq!(len, text.len() as u64);
            assert!(gunzip(&gz).expect("a valid member") == text, "{format:?}");
            assert!(
                gz.len() < text.len() / 10,
                "{} of {} bytes",
                gz.len(),
                text.len()
            );
        }
    }
}
