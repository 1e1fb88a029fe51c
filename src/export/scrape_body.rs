//! The scrape's body, in pieces (`prometheus::stitch_pieces`: each family's header, then the
//! shards' bodies for it): written one by one and freed once written, so the exposition is
//! never joined into one string. A gzipped body is compressed ahead, piece by piece, each freed
//! as it is compressed: a scraper that reads slowly then holds only the compressed bytes (with
//! their length known), not the exposition.

use std::io::{self, Write as _};

use bytes::Bytes;
use flate2::write::GzEncoder;

/// The pieces as the chunks of a body.
pub fn plain(pieces: Vec<String>) -> impl Iterator<Item = io::Result<Bytes>> + Send {
    pieces.into_iter().map(|p| Ok(Bytes::from(p)))
}

/// The pieces gzipped into one buffer, each freed once compressed.
pub fn gzip(pieces: Vec<String>) -> io::Result<Vec<u8>> {
    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    for piece in pieces {
        gz.write_all(piece.as_bytes())?;
    }
    gz.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces() -> Vec<String> {
        (0..200)
            .map(|i| format!("line {i} {}\n", "x".repeat(i * 37)))
            .collect()
    }

    #[test]
    fn plain_and_gzipped_bodies_are_the_pieces_in_order() {
        let want = pieces().concat();
        let plain: Vec<u8> = plain(pieces()).flat_map(|b| b.unwrap().to_vec()).collect();
        assert!(plain == want.as_bytes(), "the plain body differs");
        let gz = gzip(pieces()).unwrap();
        let enc = crate::ingest::body::Encoding::Gzip;
        let text = crate::ingest::body::decode(gz.into(), enc, 1 << 20).unwrap();
        assert!(text == want.as_bytes(), "the gzipped body differs");
    }
}
