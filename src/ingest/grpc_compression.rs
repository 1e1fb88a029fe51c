//! Compressed gRPC messages are inflated by spanagg, not by tonic. tonic inflates a message as
//! soon as it is read and then holds it until the request's stream ends: a few KiB of zstd
//! (about 32,000:1) sent on a stream that never ends would hold `max_request_bytes` each, for
//! as long as the request timeout, before any budget saw them. And tonic has no Snappy, which
//! the Collector's `otlp_grpc` exporter offers (`compression: snappy`, the framed format):
//! tonic would answer UNIMPLEMENTED, which the exporter does not retry.
//!
//! So for the encodings spanagg reads (gzip, zstd, Snappy, deflate) the request's
//! `grpc-encoding` is taken off and each message's compressed flag is cleared as the body
//! streams through ([`Unflagged`]): tonic frames and holds the messages as they came (its size
//! limit then bounds the compressed message), and the handler inflates the one it gets with
//! the same capped decoder as OTLP/HTTP, under the decode budget. Invariant: only the first
//! byte of each 5-byte frame header is ever changed, and only from 1 to 0. Whether the first
//! message was compressed is kept in [`Unflagged::compressed`] (an export is one message; a
//! later one is drained by tonic and never read, so it must not change how the first is).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body, Frame};

/// A gRPC request body with the compressed flag of every message cleared.
pub struct Unflagged<B> {
    inner: Pin<Box<B>>,
    /// Bytes of the current frame header seen (0..5); back to 0 once it is whole.
    header_at: u8,
    len: [u8; 4],
    /// Payload bytes of the current message still to pass.
    payload_left: u64,
    /// Set when the first message's flag said it was compressed.
    compressed: Arc<AtomicBool>,
    /// Whether a frame header has begun yet (the next one is the first message's).
    seen_first: bool,
}

impl<B> Unflagged<B> {
    pub fn new(inner: B) -> Self {
        Self {
            inner: Box::pin(inner),
            header_at: 0,
            len: [0; 4],
            payload_left: 0,
            compressed: Arc::default(),
            seen_first: false,
        }
    }

    /// Whether the first message was compressed (shared, to be read after the body).
    pub fn compressed(&self) -> Arc<AtomicBool> {
        self.compressed.clone()
    }

    /// Walks one chunk through the frame state, clearing flags; copies the chunk only if it
    /// holds a set flag.
    fn unflag(&mut self, chunk: Bytes) -> Bytes {
        let mut out: Option<BytesMut> = None;
        let mut i = 0usize;
        while i < chunk.len() {
            if self.payload_left > 0 {
                let skip = usize::try_from(self.payload_left)
                    .unwrap_or(usize::MAX)
                    .min(chunk.len() - i);
                i += skip;
                self.payload_left -= skip as u64;
                continue;
            }
            match self.header_at {
                0 => {
                    if chunk[i] == 1 {
                        out.get_or_insert_with(|| BytesMut::from(&chunk[..]))[i] = 0;
                        if !self.seen_first {
                            self.compressed.store(true, Ordering::Relaxed);
                        }
                    }
                    self.seen_first = true;
                }
                n => self.len[usize::from(n) - 1] = chunk[i],
            }
            i += 1;
            self.header_at += 1;
            if self.header_at == 5 {
                self.header_at = 0;
                self.payload_left = u64::from(u32::from_be_bytes(self.len));
            }
        }
        out.map_or(chunk, BytesMut::freeze)
    }
}

impl<B> Body for Unflagged<B>
where
    B: Body,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let frame = match ready!(self.inner.as_mut().poll_frame(cx)) {
            Some(Ok(f)) => f,
            Some(Err(e)) => return Poll::Ready(Some(Err(e))),
            None => return Poll::Ready(None),
        };
        let frame = match frame.into_data() {
            Ok(mut data) => {
                let chunk = data.copy_to_bytes(data.remaining());
                Frame::data(self.unflag(chunk))
            }
            Err(frame) => match frame.into_trailers() {
                Ok(trailers) => Frame::trailers(trailers),
                // No other kind of frame exists in http-body 1.
                Err(_) => return Poll::Ready(None),
            },
        };
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn frame(flag: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![flag];
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// Every way of cutting two messages into chunks clears both flags and nothing else.
    #[tokio::test]
    async fn flags_are_cleared_wherever_the_chunks_are_cut() {
        // A payload byte of 1 right where a flag would be if lengths were misread.
        let first = frame(1, &[1, 1, 1, 0, 1]);
        let second = frame(1, &[7; 300]);
        let whole: Vec<u8> = [first.clone(), second.clone()].concat();
        let mut expect = whole.clone();
        expect[0] = 0;
        expect[first.len()] = 0;
        for cut_a in 0..whole.len() {
            let cut_b = (cut_a + 3).min(whole.len());
            let chunks: Vec<Result<Frame<Bytes>, std::convert::Infallible>> =
                [&whole[..cut_a], &whole[cut_a..cut_b], &whole[cut_b..]]
                    .into_iter()
                    .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
                    .collect();
            let body = Unflagged::new(StreamBody::new(futures_util::stream::iter(chunks)));
            let got = body.collect().await.unwrap().to_bytes();
            assert!(got[..] == expect[..], "cut at {cut_a}");
        }
    }

    #[tokio::test]
    async fn only_the_first_message_says_whether_it_was_compressed() {
        let whole = [frame(0, b"plain"), frame(1, b"later")].concat();
        let chunks = vec![Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(
            whole,
        )))];
        let body = Unflagged::new(StreamBody::new(futures_util::stream::iter(chunks)));
        let compressed = body.compressed();
        let _ = body.collect().await.unwrap();
        assert!(!compressed.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn an_uncompressed_message_passes_untouched() {
        let whole = frame(0, b"plain");
        let chunks = vec![Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(
            whole.clone(),
        )))];
        let body = Unflagged::new(StreamBody::new(futures_util::stream::iter(chunks)));
        let compressed = body.compressed();
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], &whole[..]);
        assert!(!compressed.load(Ordering::Relaxed));
    }
}
