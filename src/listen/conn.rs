//! A connection as the servers see it: plain or TLS, holding its listener slot, and guarded
//! against clients that stop moving.
//!
//! Invariants: a write (or flush) that makes no progress for `write_timeout` fails, so a
//! client that stops reading its responses frees its slot; a pending read fails by the
//! connection's `Reads` policy (gRPC: nothing arrived for the idle limit, which the server's
//! keepalive pings make an honest idle client beat; HTTP/1.1: no request for the idle limit,
//! or a request's head not complete within the header limit of its first byte, however slowly
//! it trickles); and when the listener's drain ends, every read and write fails at once, so
//! no connection outlives the stop.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio::time::{Instant, Sleep};

use super::frames::{reset_reason, FrameWatch};
use super::ListenMetrics;
use tokio_rustls::server::TlsStream;

/// A connection of either kind.
pub enum Conn {
    Plain(TcpStream),
    // Boxed: a TLS session is over a kilobyte, a TCP stream a few words.
    Tls(Box<TlsStream<TcpStream>>),
}

/// When a pending read fails.
#[derive(Debug, Clone, Copy)]
pub enum Reads {
    /// Nothing arrived for this long (gRPC).
    Idle(Duration),
    /// HTTP/1.1: no request begun for `idle` after the last response (or the accept), or a
    /// request's head not complete `header` after its first byte.
    Http { idle: Duration, header: Duration },
}

/// Whether the connection's HTTP/1.1 request is with its handler, and how many have begun, as
/// the server tells it: the connection cannot see where a request's head ends.
#[derive(Debug, Default)]
pub struct InFlight {
    busy: AtomicBool,
    begun: AtomicU64,
}

/// Marks a request in flight until dropped (its handler finished or was abandoned).
pub struct Handling(Arc<InFlight>);

impl InFlight {
    pub fn begin(self: &Arc<Self>) -> Handling {
        self.begun.fetch_add(1, Ordering::Relaxed);
        self.busy.store(true, Ordering::Relaxed);
        Handling(self.clone())
    }
}

impl Drop for Handling {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::Relaxed);
    }
}

/// Where an HTTP/1.1 connection is between requests, as its reads see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No request since this instant (the accept, or the end of the last one).
    Idle(Instant),
    /// A request's first byte came at this instant; its head is still arriving.
    Head(Instant),
    /// The handler has the request.
    Busy,
}

/// What fails a stalled connection, what says the drain is over, and where it is counted.
#[derive(Clone)]
pub struct Deadlines {
    pub write_timeout: Duration,
    pub reads: Reads,
    /// Whether the connection speaks HTTP/2 (gRPC): its refused streams are counted.
    pub http2: bool,
    /// Turns true when the listener's drain is over.
    pub closed: watch::Receiver<bool>,
    pub metrics: ListenMetrics,
    pub listener: &'static str,
}

type Closed = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A connection with its listener slot (free again when it is dropped) and its deadlines.
pub struct Guarded {
    io: Conn,
    _slot: OwnedSemaphorePermit,
    write_timeout: Duration,
    reads: Reads,
    frames: Option<FrameWatch>,
    in_flight: Arc<InFlight>,
    /// Requests begun when the phase was last followed: a change means one came and went
    /// between two looks (hyper need not read while it handles one).
    seen: u64,
    phase: Phase,
    /// The write-stall timer, and whether it runs for the current wait.
    write_stall: Option<Pin<Box<Sleep>>>,
    write_armed: bool,
    /// The read-idle timer, and whether it runs for the current wait.
    read_stall: Option<Pin<Box<Sleep>>>,
    read_armed: bool,
    closed: Closed,
    metrics: ListenMetrics,
    listener: &'static str,
}

impl Guarded {
    pub fn new(io: Conn, slot: OwnedSemaphorePermit, deadlines: Deadlines) -> Self {
        let mut rx = deadlines.closed;
        let closed: Closed = Box::pin(async move {
            // A dropped sender ends the wait too.
            let _ = rx.wait_for(|c| *c).await;
        });
        Self {
            io,
            _slot: slot,
            write_timeout: deadlines.write_timeout,
            reads: deadlines.reads,
            frames: deadlines.http2.then(FrameWatch::default),
            in_flight: Arc::default(),
            seen: 0,
            phase: Phase::Idle(Instant::now()),
            write_stall: None,
            write_armed: false,
            read_stall: None,
            read_armed: false,
            closed,
            metrics: deadlines.metrics,
            listener: deadlines.listener,
        }
    }

    /// The flag the HTTP/1.1 server raises while this connection's request is being handled.
    pub fn in_flight(&self) -> Arc<InFlight> {
        self.in_flight.clone()
    }

    pub fn peer(&self) -> Option<std::net::SocketAddr> {
        match &self.io {
            Conn::Plain(s) => s.peer_addr().ok(),
            Conn::Tls(s) => s.get_ref().0.peer_addr().ok(),
        }
    }

    fn io(&mut self) -> Pin<&mut (dyn AsyncReadWrite + Send + Unpin)> {
        match &mut self.io {
            Conn::Plain(s) => Pin::new(s),
            Conn::Tls(s) => Pin::new(s.as_mut()),
        }
    }

    /// An error if the drain is over.
    fn check_closed(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        self.closed.as_mut().poll(cx).is_ready().then(|| {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed: the drain is over",
            )
        })
    }

    /// Whether an operation pending since the last progress has waited `after`. The timer is
    /// armed once per wait (`armed`) and reused, so a busy connection allocates none.
    fn stalled(
        stall: &mut Option<Pin<Box<Sleep>>>,
        armed: &mut bool,
        after: Duration,
        cx: &mut Context<'_>,
    ) -> bool {
        let deadline = Instant::now() + after;
        let timer = stall.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !*armed {
            timer.as_mut().reset(deadline);
            *armed = true;
        }
        timer.as_mut().poll(cx).is_ready()
    }

    /// Follows the first `n` bytes of `bufs`, just written, for HTTP/2 stream resets.
    fn watch(&mut self, bufs: &[io::IoSlice<'_>], mut n: usize) {
        let Some(frames) = &mut self.frames else {
            return;
        };
        let metrics = &self.metrics;
        for b in bufs {
            let part = &b[..n.min(b.len())];
            frames.scan(part, |code| metrics.stream_reset(reset_reason(code)));
            n -= part.len();
            if n == 0 {
                break;
            }
        }
    }

    /// Whether `deadline` has passed, waking the task when it does.
    fn past(stall: &mut Option<Pin<Box<Sleep>>>, deadline: Instant, cx: &mut Context<'_>) -> bool {
        let timer = stall.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        timer.as_mut().poll(cx).is_ready()
    }

    /// Follows an HTTP/1.1 connection's phase: the handler's flag and count, bytes read
    /// outside a request (`read_bytes`), bytes written (`wrote`: the response to the last one).
    fn advance(&mut self, read_bytes: bool, wrote: bool) {
        let busy = self.in_flight.busy.load(Ordering::Relaxed);
        let begun = self.in_flight.begun.load(Ordering::Relaxed);
        let new_request = std::mem::replace(&mut self.seen, begun) != begun;
        let now = Instant::now;
        self.phase = match (self.phase, busy, read_bytes) {
            (_, true, _) => Phase::Busy,
            // Bytes outside a request begin one (or are the rest of a body nobody read, which
            // the header limit bounds as well).
            (Phase::Busy | Phase::Idle(_), false, true) => Phase::Head(now()),
            (Phase::Head(_), false, true) if new_request => Phase::Head(now()),
            // A request ended (seen, or come and gone unseen), or a response is still being
            // written after it: idle from now.
            (Phase::Busy, false, false) => Phase::Idle(now()),
            (_, false, false) if new_request => Phase::Idle(now()),
            (Phase::Idle(_), false, false) if wrote => Phase::Idle(now()),
            (p, false, _) => p,
        };
    }

    /// After `n` bytes of a response were written.
    fn wrote(&mut self, n: usize) {
        if n > 0 && matches!(self.reads, Reads::Http { .. }) {
            self.advance(false, true);
        }
    }

    /// Why a read pending now should fail, if it should: what it is counted as and says.
    fn read_expired(&mut self, cx: &mut Context<'_>) -> Option<(&'static str, &'static str)> {
        match self.reads {
            Reads::Idle(idle) => {
                Self::stalled(&mut self.read_stall, &mut self.read_armed, idle, cx)
                    .then_some(("idle", "nothing arrived for the idle timeout"))
            }
            Reads::Http { idle, header } => {
                self.advance(false, false);
                let (deadline, why) = match self.phase {
                    Phase::Busy => return None,
                    Phase::Idle(since) => {
                        (since + idle, ("idle", "no request for the idle timeout"))
                    }
                    Phase::Head(first) => (
                        first + header,
                        (
                            "header",
                            "request headers not complete within the header timeout",
                        ),
                    ),
                };
                Self::past(&mut self.read_stall, deadline, cx).then_some(why)
            }
        }
    }

    fn write_with<T>(
        &mut self,
        cx: &mut Context<'_>,
        op: impl FnOnce(
            Pin<&mut (dyn AsyncReadWrite + Send + Unpin)>,
            &mut Context<'_>,
        ) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if let Some(e) = self.check_closed(cx) {
            return Poll::Ready(Err(e));
        }
        match op(self.io(), cx) {
            Poll::Ready(r) => {
                self.write_armed = false;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let after = self.write_timeout;
                if Self::stalled(&mut self.write_stall, &mut self.write_armed, after, cx) {
                    self.metrics.timed_out(self.listener, "write");
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client stopped reading",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

/// Both halves, as one object-safe trait.
pub trait AsyncReadWrite: AsyncRead + AsyncWrite {}
impl<T: AsyncRead + AsyncWrite> AsyncReadWrite for T {}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.check_closed(cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        match this.io().poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.read_armed = false;
                if matches!(this.reads, Reads::Http { .. }) {
                    this.advance(buf.filled().len() > before, false);
                }
                Poll::Ready(r)
            }
            Poll::Pending => match this.read_expired(cx) {
                Some((what, why)) => {
                    this.metrics.timed_out(this.listener, what);
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, why)))
                }
                None => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = this.write_with(cx, |io, cx| io.poll_write(cx, buf));
        if let Poll::Ready(Ok(n)) = r {
            this.watch(&[io::IoSlice::new(buf)], n);
            this.wrote(n);
        }
        r
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = this.write_with(cx, |io, cx| io.poll_write_vectored(cx, bufs));
        if let Poll::Ready(Ok(n)) = r {
            this.watch(bufs, n);
            this.wrote(n);
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().write_with(cx, |io, cx| io.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A TLS shutdown writes close_notify: a client that stopped reading stalls it too.
        self.get_mut().write_with(cx, |io, cx| io.poll_shutdown(cx))
    }
}

impl tonic::transport::server::Connected for Guarded {
    type ConnectInfo = Option<std::net::SocketAddr>;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer()
    }
}
