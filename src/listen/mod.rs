//! How a listener serves its router: over plain TCP, or over TLS when `tls:` is configured
//! (see `tls.rs`), within the limits of `connections:` (each counted when it acts).
//!
//! Invariants: a listener holds at most `max_per_listener` connections (one over is accepted and
//! closed at once, so it is counted and the client is not left waiting in the backlog); an
//! HTTP/1.1 client gets `header_timeout` from a request's first byte to send its headers, and a
//! keep-alive connection without a request for `idle_timeout` is closed; gRPC connections get
//! HTTP/2 keepalive pings and a stream limit. Each server's task ends when `stop` resolves and its connections finish, or
//! `drain_timeout` after it, whichever is first.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;

use crate::config::{humantime_opt, within, ConfigError};
use crate::tls::{Alpn, Tls};

mod conn;
mod frames;

use conn::{Conn, Deadlines, Guarded, Reads};

type Served = JoinHandle<Result<(), String>>;

/// `connections:` as written in the config file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConnections {
    #[serde(with = "humantime_opt", default)]
    pub header_timeout: Option<Duration>,
    #[serde(with = "humantime_opt", default)]
    pub idle_timeout: Option<Duration>,
    #[serde(with = "humantime_opt", default)]
    pub body_timeout: Option<Duration>,
    pub max_per_listener: Option<usize>,
    pub http2_max_concurrent_streams: Option<u32>,
    pub http2_max_header_list_size: Option<bytesize::ByteSize>,
    #[serde(with = "humantime_opt", default)]
    pub grpc_keepalive_interval: Option<Duration>,
    #[serde(with = "humantime_opt", default)]
    pub grpc_keepalive_timeout: Option<Duration>,
    #[serde(with = "humantime_opt", default)]
    pub drain_timeout: Option<Duration>,
    #[serde(with = "humantime_opt", default)]
    pub write_timeout: Option<Duration>,
    #[serde(with = "humantime_opt", default)]
    pub grpc_idle_timeout: Option<Duration>,
    #[serde(with = "humantime_opt", default)]
    pub grpc_max_connection_age: Option<Duration>,
    #[serde(with = "humantime_opt", default)]
    pub grpc_request_timeout: Option<Duration>,
}

/// Limits on what one client can hold (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connections {
    /// An HTTP/1.1 request's headers must arrive within this of its first byte.
    pub header_timeout: Duration,
    /// An HTTP/1.1 keep-alive connection without a request this long is closed. Longer than a
    /// one-minute scrape interval, so scrapers keep their connection (and TLS session).
    pub idle_timeout: Duration,
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
    /// A response write that makes no progress this long (the client stopped reading) fails.
    pub write_timeout: Duration,
    /// A gRPC connection on which nothing arrives this long is closed (keepalive pings make an
    /// honest idle client answer well within it).
    pub grpc_idle_timeout: Duration,
    /// A gRPC connection is told to go away (GOAWAY, then `drain_timeout` of grace) at this age.
    pub grpc_max_connection_age: Duration,
    /// One gRPC call, body included, must finish within this (DEADLINE_EXCEEDED).
    pub grpc_request_timeout: Duration,
}

impl Default for Connections {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
            body_timeout: Duration::from_secs(30),
            max_per_listener: 4096,
            http2_max_concurrent_streams: 100,
            http2_max_header_list_size: 16 * 1024,
            grpc_keepalive_interval: Duration::from_secs(30),
            grpc_keepalive_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            grpc_idle_timeout: Duration::from_secs(120),
            grpc_max_connection_age: Duration::from_secs(1800),
            grpc_request_timeout: Duration::from_secs(60),
        }
    }
}

impl Connections {
    /// Applies defaults and checks every value.
    pub fn from_raw(raw: &RawConnections) -> Result<Self, ConfigError> {
        let d = Self::default();
        let (short, long) = (Duration::from_millis(100), Duration::from_secs(3600));
        let time = |key: &str, v: Option<Duration>, default: Duration| {
            within(&format!("connections.{key}"), v, default, short, long)
        };
        let header_list = within(
            "connections.http2_max_header_list_size",
            raw.http2_max_header_list_size.map(|b| b.as_u64()),
            u64::from(d.http2_max_header_list_size),
            1 << 10,
            1 << 20,
        )?;
        let c = Self {
            header_timeout: time("header_timeout", raw.header_timeout, d.header_timeout)?,
            idle_timeout: time("idle_timeout", raw.idle_timeout, d.idle_timeout)?,
            body_timeout: time("body_timeout", raw.body_timeout, d.body_timeout)?,
            max_per_listener: within(
                "connections.max_per_listener",
                raw.max_per_listener,
                d.max_per_listener,
                1,
                1_000_000,
            )?,
            http2_max_concurrent_streams: within(
                "connections.http2_max_concurrent_streams",
                raw.http2_max_concurrent_streams,
                d.http2_max_concurrent_streams,
                1,
                10_000,
            )?,
            http2_max_header_list_size: header_list as u32,
            grpc_keepalive_interval: time(
                "grpc_keepalive_interval",
                raw.grpc_keepalive_interval,
                d.grpc_keepalive_interval,
            )?,
            grpc_keepalive_timeout: time(
                "grpc_keepalive_timeout",
                raw.grpc_keepalive_timeout,
                d.grpc_keepalive_timeout,
            )?,
            drain_timeout: time("drain_timeout", raw.drain_timeout, d.drain_timeout)?,
            write_timeout: time("write_timeout", raw.write_timeout, d.write_timeout)?,
            grpc_idle_timeout: time(
                "grpc_idle_timeout",
                raw.grpc_idle_timeout,
                d.grpc_idle_timeout,
            )?,
            grpc_max_connection_age: time(
                "grpc_max_connection_age",
                raw.grpc_max_connection_age,
                d.grpc_max_connection_age,
            )?,
            grpc_request_timeout: time(
                "grpc_request_timeout",
                raw.grpc_request_timeout,
                d.grpc_request_timeout,
            )?,
        };
        // An honest idle client only sends when pinged: the idle limit must leave it time.
        if c.grpc_idle_timeout <= c.grpc_keepalive_interval + c.grpc_keepalive_timeout {
            return Err(ConfigError::Invalid {
                key: "connections.grpc_idle_timeout".into(),
                reason: "must exceed grpc_keepalive_interval + grpc_keepalive_timeout".into(),
            });
        }
        Ok(c)
    }
}

type Labels = Vec<(&'static str, &'static str)>;

/// What the limits did, per listener (`grpc`, `otlp_http`, `http`).
#[derive(Clone, Default)]
pub struct ListenMetrics {
    refused: Family<Labels, Counter>,
    timeouts: Family<Labels, Counter>,
    resets: Family<Labels, Counter>,
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
            "Connections or requests cut off by a timeout: header (slow HTTP/1.1 headers), body \
             (slow OTLP/HTTP body), write (a client that stopped reading), idle (a silent gRPC \
             connection, or an HTTP/1.1 one without a request), handshake (TLS)",
            self.timeouts.clone(),
        );
        r.register(
            "http2_stream_resets",
            "gRPC streams the server reset, by code: refused_stream (over \
             connections.http2_max_concurrent_streams on their connection), protocol_error (a \
             header list over connections.http2_max_header_list_size, answered 431, or a broken \
             stream), cancel, ...",
            self.resets.clone(),
        );
        for code in ["refused_stream", "protocol_error"] {
            let _ = self.resets.get_or_create(&vec![("code", code)]);
        }
        // Every series that can move, at 0 from the start, so increase() sees its first event.
        let timeouts = [
            ("grpc", "write"),
            ("otlp_http", "write"),
            ("http", "write"),
            ("grpc", "idle"),
            ("otlp_http", "idle"),
            ("http", "idle"),
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

    pub fn stream_reset(&self, code: &'static str) {
        self.resets.get_or_create(&vec![("code", code)]).inc();
    }

    pub fn timed_out(&self, listener: &'static str, what: &'static str) {
        self.timeouts
            .get_or_create(&vec![("listener", listener), ("what", what)])
            .inc();
    }
}

/// Accepts connections (TLS ones once their handshake is done), each holding a slot; one over
/// the limit is closed at once and counted.
fn accept(
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    alpn: Alpn,
    max: usize,
    deadlines: Deadlines,
) -> mpsc::Receiver<Guarded> {
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(max));
    let (name, metrics) = (deadlines.listener, deadlines.metrics.clone());
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                // Stop listening once the server is gone, not at the next connection.
                _ = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: wait, do not spin.
                        tracing::warn!(listener = name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                metrics.refused(name);
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            match &tls {
                None => {
                    let conn = Guarded::new(Conn::Plain(tcp), slot, deadlines.clone());
                    let _ = tx.send(conn).await;
                }
                Some(tls) => {
                    let (tls, tx, metrics) = (tls.clone(), tx.clone(), metrics.clone());
                    let deadlines = deadlines.clone();
                    tokio::spawn(async move {
                        match tls.handshake(alpn, tcp, peer).await {
                            Ok(io) => {
                                let conn = Guarded::new(Conn::Tls(Box::new(io)), slot, deadlines);
                                let _ = tx.send(conn).await;
                            }
                            Err(true) => metrics.timed_out(name, "handshake"),
                            Err(false) => {}
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
    let (closed_tx, closed) = tokio::sync::watch::channel(false);
    let deadlines = Deadlines {
        write_timeout: limits.write_timeout,
        reads: Reads::Http {
            idle: limits.idle_timeout,
            header: limits.header_timeout,
        },
        http2: false,
        closed,
        metrics: metrics.clone(),
        listener: name,
    };
    let mut conns = accept(
        listener,
        tls,
        Alpn::Http1,
        limits.max_per_listener,
        deadlines,
    );
    tokio::spawn(async move {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let mut builder = hyper::server::conn::http1::Builder::new();
        // hyper's header timer runs from the start of the wait for a request, idle time
        // included: the connection's own timers (see `conn`) act first; this is a backstop.
        builder
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(limits.idle_timeout + limits.header_timeout)
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
            let (router, in_flight) = (router.clone(), conn.in_flight());
            let service = hyper::service::service_fn(move |req| {
                let handling = in_flight.begin();
                let response = tower_service::Service::call(&mut router.clone(), req);
                async move {
                    let r = response.await;
                    drop(handling);
                    r
                }
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
        // In-flight requests finish; what is still open after the drain fails at its next read
        // or write, so no connection (and no request in it) outlives the stop.
        if tokio::time::timeout(limits.drain_timeout, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(
                listener = name,
                "connections still open after the drain: closed"
            );
            let _ = closed_tx.send(true);
        }
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
    let (closed_tx, closed) = tokio::sync::watch::channel(false);
    let deadlines = Deadlines {
        write_timeout: limits.write_timeout,
        // The keepalive pings make an honest idle client send within this.
        reads: Reads::Idle(limits.grpc_idle_timeout),
        http2: true,
        closed,
        metrics,
        listener: "grpc",
    };
    let conns = accept(listener, tls, Alpn::H2, limits.max_per_listener, deadlines);
    tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::ReceiverStream::new(conns).map(Ok::<_, io::Error>);
        let stop = futures_util::FutureExt::shared(Box::pin(stop));
        let serving = router.serve_with_incoming_shutdown(incoming, stop.clone());
        // tonic waits for every connection to go; one that never answers GOAWAY would hold
        // the stop forever, so after the drain every connection's I/O fails.
        tokio::pin!(serving);
        tokio::select! {
            r = &mut serving => return r.map_err(|e| e.to_string()),
            _ = async { stop.await; tokio::time::sleep(limits.drain_timeout).await } => {}
        }
        tracing::warn!(
            listener = "grpc",
            "connections still open after the drain: closed"
        );
        let _ = closed_tx.send(true);
        serving.await.map_err(|e| e.to_string())
    })
}
