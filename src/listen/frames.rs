//! Reads the HTTP/2 frames the gRPC server writes, to count what its HTTP/2 library does
//! without telling anyone: the streams it resets, by error code. `REFUSED_STREAM` is a stream
//! over `http2_max_concurrent_streams`; `PROTOCOL_ERROR` one whose header list is over
//! `http2_max_header_list_size` (answered 431 first) or that broke the protocol.
//!
//! Invariant: it sees every byte the server writes, in order, from the first (a server sends no
//! preface string, so its first byte begins a frame); it keeps 13 bytes at most and never
//! changes what is written.

const RST_STREAM: u8 = 0x3;
const FRAME_HEADER: usize = 9;

/// The name of a reset's error code (RFC 9113 §7), as a label.
pub fn reset_reason(code: u32) -> &'static str {
    match code {
        0x0 => "no_error",
        0x1 => "protocol_error",
        0x2 => "internal_error",
        0x7 => "refused_stream",
        0x8 => "cancel",
        0xb => "enhance_your_calm",
        _ => "other",
    }
}

/// Where the server's output stream is: in a frame header, or so many payload bytes into a
/// frame.
#[derive(Debug, Default)]
pub struct FrameWatch {
    /// A frame header and, for `RST_STREAM`, its 4-byte error code, as far as they came.
    head: [u8; FRAME_HEADER + 4],
    have: usize,
    /// Payload bytes of the current frame still to pass.
    skip: usize,
}

impl FrameWatch {
    /// Follows `written`, calling `reset` with the error code of each stream reset in it.
    pub fn scan(&mut self, mut written: &[u8], mut reset: impl FnMut(u32)) {
        while !written.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(written.len());
                self.skip -= n;
                written = &written[n..];
                continue;
            }
            let want = if self.have >= FRAME_HEADER && self.head[3] == RST_STREAM {
                FRAME_HEADER + 4
            } else {
                FRAME_HEADER
            };
            let n = (want - self.have).min(written.len());
            self.head[self.have..self.have + n].copy_from_slice(&written[..n]);
            self.have += n;
            written = &written[n..];
            if self.have < want {
                continue;
            }
            let len = usize::from(self.head[0]) << 16
                | usize::from(self.head[1]) << 8
                | usize::from(self.head[2]);
            if want == FRAME_HEADER && self.head[3] == RST_STREAM && len >= 4 {
                // Read its error code next.
                continue;
            }
            if want > FRAME_HEADER {
                let code =
                    u32::from_be_bytes([self.head[9], self.head[10], self.head[11], self.head[12]]);
                reset(code);
                self.skip = len - 4;
            } else {
                self.skip = len;
            }
            self.have = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, 0, 0, 0, 0, 1];
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn resets_are_seen_however_the_writes_split_them() {
        let mut out = frame(0x4, &[0, 3, 0, 0, 0, 100]);
        out.extend(frame(RST_STREAM, &[0, 0, 0, 7]));
        out.extend(frame(0x0, &[7; 40]));
        out.extend(frame(RST_STREAM, &[0, 0, 0, 8]));
        out.extend(frame(RST_STREAM, &[0, 0, 0, 7]));
        for chunk in [1, 2, 5, 9, 13, out.len()] {
            let mut w = FrameWatch::default();
            let mut codes = Vec::new();
            for c in out.chunks(chunk) {
                w.scan(c, |code| codes.push(reset_reason(code)));
            }
            let want = ["refused_stream", "cancel", "refused_stream"];
            assert_eq!(codes, want, "written {chunk} bytes at a time");
            assert_eq!((w.have, w.skip), (0, 0));
        }
    }
}
