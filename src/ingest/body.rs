//! Request bodies: reading and decompressing with a hard limit that is enforced while bytes are
//! produced, so a small gzip bomb is refused after `limit` bytes, never allocated in full.

use std::io::Read;

use flate2::read::GzDecoder;

use super::IngestError;

/// Content encodings an OTLP/HTTP client may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
}

impl Encoding {
    /// Parses a `Content-Encoding` header value.
    pub fn parse(header: Option<&str>) -> Result<Self, IngestError> {
        match header.map(|h| h.trim().to_ascii_lowercase()) {
            None => Ok(Self::Identity),
            Some(h) if h.is_empty() || h == "identity" => Ok(Self::Identity),
            Some(h) if h == "gzip" || h == "x-gzip" => Ok(Self::Gzip),
            Some(h) => Err(IngestError::InvalidArgument(format!(
                "unsupported Content-Encoding {h:?} (use gzip or none)"
            ))),
        }
    }
}

/// Decompresses `raw` into at most `limit` bytes (an identity body is returned as it is).
pub fn decode(
    raw: bytes::Bytes,
    encoding: Encoding,
    limit: usize,
) -> Result<bytes::Bytes, IngestError> {
    match encoding {
        Encoding::Identity => {
            if raw.len() > limit {
                return Err(IngestError::TooLarge { limit });
            }
            Ok(raw)
        }
        Encoding::Gzip => {
            // Grow as data arrives; the estimate only avoids early reallocations.
            let mut out = Vec::with_capacity(raw.len().saturating_mul(4).min(limit));
            #[allow(clippy::disallowed_methods)] // the one capped use: `.take` bounds the output
            let mut reader = GzDecoder::new(&raw[..]).take(limit as u64 + 1);
            reader
                .read_to_end(&mut out)
                .map_err(|e| IngestError::InvalidArgument(format!("invalid gzip body: {e}")))?;
            if out.len() > limit {
                return Err(IngestError::TooLarge { limit });
            }
            Ok(out.into())
        }
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

    #[test]
    fn unknown_encodings_are_refused_by_name() {
        let err = Encoding::parse(Some("br")).unwrap_err().to_string();
        assert!(err.contains("br"), "{err}");
        assert_eq!(Encoding::parse(Some("GZIP")).unwrap(), Encoding::Gzip);
    }
}
