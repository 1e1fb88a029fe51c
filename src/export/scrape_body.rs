//! The scrape's body, streamed: the exposition's pieces (`prometheus::stitch_pieces`: each
//! family's header, then the shards' bodies for it) are written as they are, gzipped on the
//! way when the scraper asks, so the exposition is never held twice and each piece is freed
//! once written. What is to be recorded when the body is done (or abandoned by a scraper that
//! hung up) runs then, so a scrape's time includes writing it.

use std::io::{self, Write as _};

use bytes::Bytes;
use flate2::write::GzEncoder;

/// The pieces still to write, and the compressor if the body is gzipped.
pub struct ScrapeBody {
    pieces: std::vec::IntoIter<String>,
    gzip: Option<GzEncoder<Vec<u8>>>,
    done: Option<Box<dyn FnOnce() + Send>>,
}

impl ScrapeBody {
    pub fn new(pieces: Vec<String>, gzip: bool, done: Box<dyn FnOnce() + Send>) -> Self {
        Self {
            pieces: pieces.into_iter(),
            gzip: gzip.then(|| GzEncoder::new(Vec::new(), flate2::Compression::fast())),
            done: Some(done),
        }
    }
}

impl Iterator for ScrapeBody {
    type Item = io::Result<Bytes>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let Some(piece) = self.pieces.next() else {
                // The end: the gzip trailer, once (a plain body has none).
                return self.gzip.take().map(|gz| gz.finish().map(Bytes::from));
            };
            let Some(gz) = &mut self.gzip else {
                return Some(Ok(Bytes::from(piece)));
            };
            if let Err(e) = gz.write_all(piece.as_bytes()) {
                return Some(Err(e));
            }
            let out = std::mem::take(gz.get_mut());
            // The compressor may keep a small piece to itself: then on to the next one.
            if !out.is_empty() {
                return Some(Ok(Bytes::from(out)));
            }
        }
    }
}

impl Drop for ScrapeBody {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            done();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    fn pieces() -> Vec<String> {
        (0..200)
            .map(|i| format!("line {i} {}\n", "x".repeat(i * 37)))
            .collect()
    }

    #[test]
    fn plain_and_gzipped_bodies_are_the_pieces_in_order_and_report_when_done() {
        let want = pieces().concat();
        for gzip in [false, true] {
            let done = Arc::new(AtomicBool::new(false));
            let flag = done.clone();
            let body = ScrapeBody::new(
                pieces(),
                gzip,
                Box::new(move || flag.store(true, Ordering::Relaxed)),
            );
            let bytes: Vec<u8> = body.flat_map(|b| b.unwrap().to_vec()).collect();
            assert!(done.load(Ordering::Relaxed), "done ran once the body was");
            let text = if gzip {
                let gz = crate::ingest::body::Encoding::Gzip;
                let out = crate::ingest::body::decode(bytes.into(), gz, 1 << 20).unwrap();
                String::from_utf8(out.to_vec()).unwrap()
            } else {
                String::from_utf8(bytes).unwrap()
            };
            assert!(text == want, "gzip {gzip}: the body differs");
        }
    }
}
