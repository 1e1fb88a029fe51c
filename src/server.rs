//! Wiring: binds the three listeners, starts the shards, serves until the shutdown future
//! resolves, then stops accepting, lets in-flight requests finish, and stops the shards after
//! they applied everything queued.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::aggregate::shard::ShardConfig;
use crate::aggregate::table::Table;
use crate::config::Config;
use crate::export::http::AppState;
use crate::ingest::grpc::MetricsGrpc;
use crate::ingest::otlp::Projection;
use crate::ingest::Ingestor;
use crate::telemetry::Telemetry;

const GRPC_STREAM_WINDOW: u32 = 1 << 20;
const GRPC_CONNECTION_WINDOW: u32 = 4 << 20;

/// Why the service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen for {what} on {addr}: {cause}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        cause: std::io::Error,
    },
    #[error("cannot create data directory {path}: {cause}")]
    DataDir {
        path: std::path::PathBuf,
        cause: std::io::Error,
    },
    #[error("cannot start shard threads: {0}")]
    Shards(std::io::Error),
    #[error("{what} server failed: {message}")]
    Serve { what: &'static str, message: String },
}

/// Addresses actually bound (useful when the config asked for port 0).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub grpc: SocketAddr,
    pub otlp_http: SocketAddr,
    pub http: SocketAddr,
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|cause| ServeError::Bind { what, addr, cause })
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos().min(u128::from(u64::MAX)) as u64)
}

/// Runs the service until `shutdown` resolves. `on_bound` learns the bound addresses.
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()>,
    on_bound: impl FnOnce(Bound),
) -> Result<(), ServeError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|cause| ServeError::DataDir {
        path: config.data_dir.clone(),
        cause,
    })?;
    let grpc_l = bind("OTLP/gRPC", config.grpc_listen).await?;
    let otlp_l = bind("OTLP/HTTP", config.otlp_http_listen).await?;
    let http_l = bind("HTTP (scrape and API)", config.http_listen).await?;
    let local = |l: &TcpListener, fallback| l.local_addr().unwrap_or(fallback);
    let bound = Bound {
        grpc: local(&grpc_l, config.grpc_listen),
        otlp_http: local(&otlp_l, config.otlp_http_listen),
        http: local(&http_l, config.http_listen),
    };

    let shard_cfg = ShardConfig {
        late_ns: config
            .late_delta_window
            .as_nanos()
            .min(u128::from(u64::MAX)) as u64,
        ttl_secs: config.series_ttl.as_secs().clamp(1, u64::from(u32::MAX)) as u32,
        process_start_ns: now_ns(),
        bounds: config
            .histogram_bounds
            .iter()
            .map(|(k, v)| (k.clone(), Arc::from(v.bounds())))
            .collect::<HashMap<_, _>>(),
    };
    let table = Arc::new(
        Table::start(
            shard_cfg,
            config.shards.get(),
            config.shard_queue_capacity.get(),
        )
        .map_err(ServeError::Shards)?,
    );
    let telemetry = Arc::new(Telemetry::new(table.stats()));
    let ingestor = Arc::new(Ingestor::new(
        table.clone(),
        Projection::new(&config.by, &config.without),
        telemetry.clone(),
        config.max_request_bytes,
    ));
    let app = Arc::new(AppState {
        table: table.clone(),
        telemetry: telemetry.clone(),
        ready: Default::default(),
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    // h2's default 64 KiB windows stall every request larger than that on WINDOW_UPDATE round
    // trips; sidecar batches are often bigger.
    let grpc = tonic::transport::Server::builder()
        .initial_stream_window_size(Some(GRPC_STREAM_WINDOW))
        .initial_connection_window_size(Some(GRPC_CONNECTION_WINDOW))
        .add_service(MetricsGrpc::new(ingestor.clone()))
        .add_service(crate::export::flight::Flight::server(table.clone()))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(grpc_l),
            stopped(stop_rx.clone()),
        );
    let otlp_http = axum::serve(otlp_l, crate::ingest::http::router(ingestor.clone()))
        .with_graceful_shutdown(stopped(stop_rx.clone()));
    let http = axum::serve(http_l, crate::export::http::router(app.clone()))
        .with_graceful_shutdown(stopped(stop_rx.clone()));

    let grpc = tokio::spawn(async move { grpc.await.map_err(|e| e.to_string()) });
    let otlp_http = tokio::spawn(async move { otlp_http.await.map_err(|e| e.to_string()) });
    let http = tokio::spawn(async move { http.await.map_err(|e| e.to_string()) });

    app.ready.store(true, Ordering::Release);
    on_bound(bound);
    shutdown.await;
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
    app.ready.store(false, Ordering::Release);
    let _ = stop_tx.send(true);

    let mut first_error = None;
    for (what, task) in [
        ("OTLP/gRPC", grpc),
        ("OTLP/HTTP", otlp_http),
        ("HTTP", http),
    ] {
        let res = task.await.map_err(|e| e.to_string()).and_then(|r| r);
        if let Err(message) = res {
            first_error.get_or_insert(ServeError::Serve { what, message });
        }
    }
    // Last references to the table go here; dropping it joins the shard threads after they
    // applied everything queued.
    drop(ingestor);
    drop(app);
    drop(telemetry);
    drop(table);
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
