//! A connection as the servers see it: plain or TLS, holding its listener slot, and guarded
//! against clients that stop moving.
//!
//! Invariants: a write (or flush) that makes no progress for `write_timeout` fails, so a
//! client that stops reading its responses frees its slot; with `read_idle`, a connection on
//! which nothing arrives for that long fails (gRPC: the server's keepalive pings make an
//! honest idle client answer well within it); and when the listener's drain ends, every read
//! and write fails at once, so no connection outlives the stop.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio::time::Sleep;

use super::ListenMetrics;
use tokio_rustls::server::TlsStream;

/// A connection of either kind.
pub enum Conn {
    Plain(TcpStream),
    // Boxed: a TLS session is over a kilobyte, a TCP stream a few words.
    Tls(Box<TlsStream<TcpStream>>),
}

/// What fails a stalled connection, what says the drain is over, and where it is counted.
#[derive(Clone)]
pub struct Deadlines {
    pub write_timeout: Duration,
    pub read_idle: Option<Duration>,
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
    read_idle: Option<Duration>,
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
            read_idle: deadlines.read_idle,
            write_stall: None,
            write_armed: false,
            read_stall: None,
            read_armed: false,
            closed,
            metrics: deadlines.metrics,
            listener: deadlines.listener,
        }
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
        let deadline = tokio::time::Instant::now() + after;
        let timer = stall.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !*armed {
            timer.as_mut().reset(deadline);
            *armed = true;
        }
        timer.as_mut().poll(cx).is_ready()
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
        match this.io().poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.read_armed = false;
                Poll::Ready(r)
            }
            Poll::Pending => {
                if let Some(idle) = this.read_idle {
                    if Guarded::stalled(&mut this.read_stall, &mut this.read_armed, idle, cx) {
                        this.metrics.timed_out(this.listener, "idle");
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "nothing arrived for the idle timeout",
                        )));
                    }
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .write_with(cx, |io, cx| io.poll_write(cx, buf))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .write_with(cx, |io, cx| io.poll_write_vectored(cx, bufs))
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
