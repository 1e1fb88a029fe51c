//! How a listener serves its router: over plain TCP, or over TLS when `tls:` is configured
//! (see `tls.rs`). Each returns the server's task; it ends when `stop` resolves and the
//! connections in flight finish.

use std::future::Future;
use std::sync::Arc;

use futures_util::StreamExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::tls::{Tls, TlsListener};

type Served = JoinHandle<Result<(), String>>;

/// Serves `router` (HTTP/1.1) on `listener`.
pub fn http(
    listener: TcpListener,
    router: axum::Router,
    tls: Option<Arc<Tls>>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<Served> {
    Ok(match tls {
        None => tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(stop)
                .await
                .map_err(|e| e.to_string())
        }),
        Some(tls) => {
            let listener = TlsListener::new(listener, tls)?;
            tokio::spawn(async move {
                axum::serve(listener, router)
                    .with_graceful_shutdown(stop)
                    .await
                    .map_err(|e| e.to_string())
            })
        }
    })
}

/// Serves the gRPC `router` on `listener`.
pub fn grpc(
    listener: TcpListener,
    router: tonic::transport::server::Router,
    tls: Option<Arc<Tls>>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Served {
    match tls {
        None => tokio::spawn(async move {
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            router
                .serve_with_incoming_shutdown(incoming, stop)
                .await
                .map_err(|e| e.to_string())
        }),
        Some(tls) => tokio::spawn(async move {
            let incoming =
                tokio_stream::wrappers::ReceiverStream::new(crate::tls::accept(listener, tls))
                    .map(|(io, _)| Ok::<_, std::io::Error>(io));
            router
                .serve_with_incoming_shutdown(incoming, stop)
                .await
                .map_err(|e| e.to_string())
        }),
    }
}
