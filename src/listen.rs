//! How a listener serves its router: over plain TCP, or over TLS when `tls:` is configured
//! (see `tls.rs`), within the limits of `connections:` (each counted when it acts).
//!
//! Invariants: a listener holds at most `max_per_listener` connections (one over is accepted and
//! closed at once, so it is counted and the client is not left waiting in the backlog); an
//! HTTP/1.1 client gets `header_timeout` to send each request's headers, which also closes a
//! keep-alive connection idle that long; gRPC connections get HTTP/2 keepalive pings and a
//! stream limit. Each server's task ends when `stop` resolves and its connections finish, or
//! `drain_timeout` after it, whichever is first.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::StreamExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::tls::{Tls, TlsIo};

type Served = JoinHandle<Result<(), String>>;

/// `connections:` as written in the config file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConnections {
    pub header_timeout: Option<String>,
    pub body_timeout: Option<String>,
    pub max_per_listener: Option<usize>,
    pub http2_max_concurrent_streams: Option<u32>,
    pub http2_max_header_list_size: Option<bytesize::ByteSize>,
    pub grpc_keepalive_interval: Option<String>,
    pub grpc_keepalive_timeout: Option<String>,
    pub drain_timeout: Option<String>,
}

/// Limits on what one client can hold (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connections {
    /// An HTTP/1.1 request's headers must arrive within this; also the keep-alive idle limit.
    pub header_timeout: Duration,
    /// An OTLP/HTTP request body must arrive within this (408 after).
    pub body_timeout: Duration,
    /// Open connections per listener.
    pub max_per_listener: usize,
    /// Concurrent HTTP/2 streams (gRPC calls) per connection.
    pub http2_max_concurrent_streams: u32,
    /// Bytes of one HTTP/2 header list.
    pub http2_max_header_list_size: u32,
    /// A gRPC connection is pinged after this long without traffic...
    pub grpc_keepalive_interval: Duration,
    /// ...and closed if the ping is not answered within this.
    pub grpc_keepalive_timeout: Duration,
    /// How long a stopping server waits for its open connections before it drops them.
    pub drain_timeout: Duration,
}

impl Default for Connections {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_per_listener: 4096,
            http2_max_concurrent_streams: 100,
            http2_max_header_list_size: 16 * 1024,
            grpc_keepalive_interval: Duration::from_secs(30),
            grpc_keepalive_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

impl Connections {
    /// Applies defaults and checks every value; `Err((key, why))`.
    pub fn from_raw(raw: &RawConnections) -> Result<Self, (String, String)> {
        let d = Self::default();
        let time = |key: &str,
                    v: &Option<String>,
                    default: Duration|
         -> Result<Duration, (String, String)> {
            let Some(v) = v else { return Ok(default) };
            let t = humantime::parse_duration(v)
                .map_err(|e| (format!("connections.{key}"), e.to_string()))?;
            if t < Duration::from_millis(100) || t > Duration::from_secs(3600) {
                return Err((
                    format!("connections.{key}"),
                    "must be between 100ms and 1h".into(),
                ));
            }
            Ok(t)
        };
        let max = raw.max_per_listener.unwrap_or(d.max_per_listener);
        if !(1..=1_000_000).contains(&max) {
            return Err((
                "connections.max_per_listener".into(),
                "must be between 1 and 1000000".into(),
            ));
        }
        let streams = raw
            .http2_max_concurrent_streams
            .unwrap_or(d.http2_max_concurrent_streams);
        if !(1..=10_000).contains(&streams) {
            return Err((
                "connections.http2_max_concurrent_streams".into(),
                "must be between 1 and 10000".into(),
            ));
        }
        let header_list = raw
            .http2_max_header_list_size
            .map_or(u64::from(d.http2_max_header_list_size), |b| b.as_u64());
        if !(1024..=1 << 20).contains(&header_list) {
            return Err((
                "connections.http2_max_header_list_size".into(),
                "must be between 1KiB and 1MiB".into(),
            ));
        }
        Ok(Self {
            header_timeout: time("header_timeout", &raw.header_timeout, d.header_timeout)?,
            body_timeout: time("body_timeout", &raw.body_timeout, d.body_timeout)?,
            max_per_listener: max,
            http2_max_concurrent_streams: streams,
            http2_max_header_list_size: header_list as u32,
            grpc_keepalive_interval: time(
                "grpc_keepalive_interval",
                &raw.grpc_keepalive_interval,
                d.grpc_keepalive_interval,
            )?,
            grpc_keepalive_timeout: time(
                "grpc_keepalive_timeout",
                &raw.grpc_keepalive_timeout,
                d.grpc_keepalive_timeout,
            )?,
            drain_timeout: time("drain_timeout", &raw.drain_timeout, d.drain_timeout)?,
        })
    }
}

type Labels = Vec<(&'static str, &'static str)>;

/// What the limits did, per listener (`grpc`, `otlp_http`, `http`).
#[derive(Clone, Default)]
pub struct ListenMetrics {
    refused: Family<Labels, Counter>,
    timeouts: Family<Labels, Counter>,
}

impl ListenMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "connections_refused",
            "Connections closed at once because the listener held connections.max_per_listener",
            self.refused.clone(),
        );
        r.register(
            "connection_timeouts",
            "Connections or requests cut off by a timeout: header (slow or idle HTTP/1.1), body \
             (slow OTLP/HTTP body), handshake (TLS)",
            self.timeouts.clone(),
        );
        // Every series that can move, at 0 from the start, so increase() sees its first event.
        let timeouts = [
            ("grpc", "handshake"),
            ("otlp_http", "handshake"),
            ("http", "handshake"),
            ("otlp_http", "header"),
            ("http", "header"),
            ("otlp_http", "body"),
        ];
        for (listener, what) in timeouts {
            let _ = self
                .timeouts
                .get_or_create(&vec![("listener", listener), ("what", what)]);
        }
        for listener in ["grpc", "otlp_http", "http"] {
            let _ = self.refused.get_or_create(&vec![("listener", listener)]);
        }
    }

    pub fn refused(&self, listener: &'static str) {
        self.refused
            .get_or_create(&vec![("listener", listener)])
            .inc();
    }

    pub fn timed_out(&self, listener: &'static str, what: &'static str) {
        self.timeouts
            .get_or_create(&vec![("listener", listener), ("what", what)])
            .inc();
    }
}

/// A connection with the listener slot it holds; the slot is free again when it is dropped.
pub struct Slotted<T> {
    io: T,
    _slot: OwnedSemaphorePermit,
}

impl<T: AsyncRead + Unpin> AsyncRead for Slotted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Slotted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for Slotted<T> {
    type ConnectInfo = T::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// A connection of either kind, as the servers take it.
pub enum Conn {
    Plain(TcpStream),
    // Boxed: a TLS session is over a kilobyte, a TCP stream a few words.
    Tls(Box<TlsIo>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = Option<std::net::SocketAddr>;
    fn connect_info(&self) -> Self::ConnectInfo {
        match self {
            Conn::Plain(s) => s.peer_addr().ok(),
            Conn::Tls(s) => s.connect_info(),
        }
    }
}

/// Accepts connections (TLS ones once their handshake is done), each holding a slot; one over
/// the limit is closed at once and counted.
fn accept(
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    max: usize,
    name: &'static str,
    metrics: ListenMetrics,
) -> mpsc::Receiver<Slotted<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(max));
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                metrics.refused(name);
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            match &tls {
                None => {
                    let _ = tx
                        .send(Slotted {
                            io: Conn::Plain(tcp),
                            _slot: slot,
                        })
                        .await;
                }
                Some(tls) => {
                    let (tls, tx, metrics) = (tls.clone(), tx.clone(), metrics.clone());
                    tokio::spawn(async move {
                        match tls.handshake(tcp, peer).await {
                            Ok(io) => {
                                let _ = tx
                                    .send(Slotted {
                                        io: Conn::Tls(Box::new(io)),
                                        _slot: slot,
                                    })
                                    .await;
                            }
                            Err(timed_out) => {
                                if timed_out {
                                    metrics.timed_out(name, "handshake");
                                }
                            }
                        }
                    });
                }
            }
        }
    });
    rx
}

/// Serves `router` (HTTP/1.1) on `listener` as `name`.
pub fn http(
    listener: TcpListener,
    router: axum::Router,
    tls: Option<Arc<Tls>>,
    limits: Connections,
    name: &'static str,
    metrics: ListenMetrics,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Served {
    let mut conns = accept(
        listener,
        tls,
        limits.max_per_listener,
        name,
        metrics.clone(),
    );
    tokio::spawn(async move {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .keep_alive(true);
        tokio::pin!(stop);
        loop {
            let conn = tokio::select! {
                _ = &mut stop => break,
                c = conns.recv() => match c {
                    Some(c) => c,
                    None => break,
                },
            };
            let router = router.clone();
            let service = hyper::service::service_fn(move |req| {
                tower_service::Service::call(&mut router.clone(), req)
            });
            let serving = builder.serve_connection(hyper_util::rt::TokioIo::new(conn), service);
            let serving = graceful.watch(serving);
            let metrics = metrics.clone();
            tokio::spawn(async move {
                if let Err(e) = serving.await {
                    if e.is_timeout() {
                        metrics.timed_out(name, "header");
                    }
                }
            });
        }
        drop(conns);
        // In-flight requests finish; a client that holds its connection open cannot hold the
        // stop for longer than the drain timeout.
        let _ = tokio::time::timeout(limits.drain_timeout, graceful.shutdown()).await;
        Ok(())
    })
}

/// Serves the gRPC `router` on `listener` (its HTTP/2 limits set by the caller's builder).
pub fn grpc(
    listener: TcpListener,
    router: tonic::transport::server::Router,
    tls: Option<Arc<Tls>>,
    limits: Connections,
    metrics: ListenMetrics,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Served {
    let conns = accept(listener, tls, limits.max_per_listener, "grpc", metrics);
    tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::ReceiverStream::new(conns).map(Ok::<_, io::Error>);
        let stop = futures_util::FutureExt::shared(Box::pin(stop));
        let serving = router.serve_with_incoming_shutdown(incoming, stop.clone());
        // tonic waits for every connection to go; one that never answers GOAWAY would hold
        // the stop forever, so it waits the drain timeout at most.
        tokio::select! {
            r = serving => r.map_err(|e| e.to_string()),
            _ = async { stop.await; tokio::time::sleep(limits.drain_timeout).await } => {
                tracing::warn!("gRPC connections still open after the drain: closed");
                Ok(())
            }
        }
    })
}
