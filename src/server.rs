//! Wiring: binds the three listeners, starts the shards, serves until the shutdown future
//! resolves, then stops accepting, lets in-flight requests finish, and stops the shards after
//! they applied everything queued.

use crate::auth::{Door, Guard, Tokens};
use crate::listen::ListenMetrics;
use crate::tls::Tls;

/// How often the TLS files are checked for changes (SIGHUP reloads at once).
const TLS_RECHECK: std::time::Duration = std::time::Duration::from_secs(5);
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tonic::service::interceptor::InterceptedService;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::aggregate::quota::SeriesQuota;
use crate::aggregate::shard::{ShardConfig, ShardLimits, ShardState};
use crate::aggregate::table::Table;
use crate::config::Config;
use crate::export::http::AppState;
use crate::ingest::grpc::MetricsGrpc;
use crate::ingest::otlp::Projection;
use crate::ingest::Ingestor;
use crate::storage::replay::replay;
use crate::storage::{Storage, StorageMetrics};
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
    #[error(transparent)]
    Storage(#[from] crate::storage::OpenError),
    #[error(transparent)]
    Auth(#[from] crate::auth::TokenError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot replay the write-ahead log: {0}")]
    Replay(std::io::Error),
    #[error("cannot start the write-ahead log: {0}")]
    Wal(std::io::Error),
    #[error("cannot mark the restored checkpoint as used (it must not be restored twice): {0}")]
    RestoredCheckpoint(std::io::Error),
    #[error("{what} server failed: {message}")]
    Serve { what: &'static str, message: String },
}

/// Addresses actually bound (useful when the config asked for port 0).
#[derive(Debug, Clone)]
pub struct Bound {
    pub grpc: SocketAddr,
    pub otlp_http: SocketAddr,
    pub http: SocketAddr,
    /// The doors that need a bearer token.
    pub tokens: Vec<&'static str>,
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|cause| ServeError::Bind { what, addr, cause })
}

/// Opens the data dir, restores the newest usable checkpoint, starts the shards on it, replays
/// the WAL after it, and starts the WAL writer.
async fn start_state(
    config: &Config,
    listen: ListenMetrics,
) -> Result<(Arc<Table>, Arc<Telemetry>, Storage), ServeError> {
    let base = ShardConfig {
        late_ns: config
            .late_delta_window
            .as_nanos()
            .min(u128::from(u64::MAX)) as u64,
        ttl_secs: config.series_ttl.as_secs().clamp(1, u64::from(u32::MAX)) as u32,
        process_start_ns: crate::unix_ns(),
        bounds: config
            .histogram_bounds
            .iter()
            .map(|(k, v)| (k.clone(), Arc::from(v.bounds())))
            .collect::<HashMap<_, _>>(),
        limits: ShardLimits::share(config.limits.max_source_streams, config.shards.get()),
        quota: Arc::default(),
        max_families: usize::try_from(config.limits.max_metric_families).unwrap_or(usize::MAX),
    };
    let n = config.shards.get();
    let metrics = StorageMetrics::default();
    let (mut storage, restored) = Storage::open(
        &config.data_dir,
        config.durability,
        config.checkpoint_keep,
        config.wal_segment_size,
        metrics.clone(),
        |start| {
            // A fresh quota per attempt: a restore that fails half way leaves no counts behind.
            let quota = Arc::new(SeriesQuota::new(
                config.limits.max_series_per_service,
                config.limits.max_series,
            ));
            (0..n)
                .map(|_| {
                    ShardState::new(ShardConfig {
                        process_start_ns: start,
                        quota: quota.clone(),
                        ..base.clone()
                    })
                })
                .collect()
        },
    )?;
    storage.set_part_rows(config.checkpoint_part_rows);
    let table = Arc::new(
        Table::start_with(restored.states, config.shard_queue_capacity.get())
            .map_err(ServeError::Shards)?,
    );
    let telemetry = Arc::new(Telemetry::with_listeners(
        table.stats(),
        metrics.clone(),
        config.limits,
        listen,
    ));
    if let Some(from) = restored.replay_from {
        let replayer = Ingestor::new(
            table.clone(),
            Projection::new(&config.by, &config.without),
            telemetry.clone(),
            config.max_request_bytes,
        )
        .with_limits(config.input);
        let t = std::time::Instant::now();
        // Replay rebuilds the state at the crash, each record judged by when it was accepted;
        // only then does expiry run, to whole series.
        let sweeps = table.pause_sweeps();
        let stats = replay(
            storage.wal_dir().to_owned(),
            from,
            restored.checkpoint_ns,
            &replayer,
            &metrics,
        )
        .await;
        drop(sweeps);
        let stats = stats.map_err(ServeError::Replay)?;
        tracing::info!(
            records = stats.records,
            truncated_tails = stats.truncated,
            skipped_unknown = stats.skipped,
            seconds = t.elapsed().as_secs_f64(),
            "replayed the write-ahead log"
        );
    }
    storage.start_wal().map_err(ServeError::Wal)?;
    Ok((table, telemetry, storage))
}

/// Keeps `over` true while resident memory is past `limit`, so new exports are refused
/// (retryably) before the process grows further.
async fn watch_memory(
    limit: u64,
    over: Arc<std::sync::atomic::AtomicBool>,
    stop: impl Future<Output = ()>,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => {
                let Some(rss) = crate::telemetry::resident_bytes() else { continue };
                let now = rss > limit;
                if over.swap(now, Ordering::Relaxed) != now {
                    if now {
                        tracing::warn!(rss, limit, "over limits.max_memory: refusing new exports (retryable)");
                    } else {
                        tracing::info!(rss, limit, "back under limits.max_memory: accepting exports");
                    }
                }
            }
        }
    }
}

async fn periodic_checkpoints(
    storage: Arc<Storage>,
    table: Arc<Table>,
    every: std::time::Duration,
    stop: impl Future<Output = ()>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => {
                // Failures are counted and logged inside; the next tick tries again.
                let _ = storage.checkpoint(&table, false).await;
            }
        }
    }
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
    // Before anything slow: a SIGHUP (a certificate renewal hook) during a long restore must
    // not end the process.
    let hup = crate::tls::hangups();
    // Token and certificate files are read first: a typo in one must stop the start, not
    // open a door or fall back to plaintext.
    let tokens = Arc::new(Tokens::load(&config.auth)?);
    let tls = (config.tls.enabled())
        .then(|| Tls::load(&config.tls))
        .transpose()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // The HTTP listener answers health checks while the state is restored (which can take a
    // while with a long WAL); the rest of it, and the OTLP ports, open once the state is back.
    let http_l = bind("HTTP (scrape and API)", config.http_listen).await?;
    let http_addr = http_l.local_addr().unwrap_or(config.http_listen);
    let lazy: Arc<std::sync::OnceLock<axum::Router>> = Default::default();
    let listen = ListenMetrics::default();
    let limits = config.connections;
    let front = crate::export::http::front(lazy.clone());
    let http = crate::listen::http(
        http_l,
        front,
        tls.clone(),
        limits,
        "http",
        listen.clone(),
        stopped(stop_rx.clone()),
    );
    tracing::info!(http = %http_addr, "restoring state; /-/healthy answers meanwhile");
    let (table, telemetry, storage) = start_state(&config, listen.clone()).await?;
    let mut ingestor = Ingestor::new(
        table.clone(),
        Projection::new(&config.by, &config.without),
        telemetry.clone(),
        config.max_request_bytes,
    )
    .with_limits(config.input);
    if let Some(wal) = storage.wal() {
        ingestor = ingestor.with_wal(wal);
    }
    let ingestor = Arc::new(ingestor);

    let grpc_l = bind("OTLP/gRPC", config.grpc_listen).await?;
    let otlp_l = bind("OTLP/HTTP", config.otlp_http_listen).await?;
    // Every listener is bound: from here on the restored state may serve.
    storage
        .consume_restored()
        .map_err(ServeError::RestoredCheckpoint)?;
    let local = |l: &TcpListener, fallback| l.local_addr().unwrap_or(fallback);
    let bound = Bound {
        grpc: local(&grpc_l, config.grpc_listen),
        otlp_http: local(&otlp_l, config.otlp_http_listen),
        http: http_addr,
        tokens: Door::ALL
            .into_iter()
            .filter(|d| tokens.guarded(*d))
            .map(Door::as_str)
            .collect(),
    };

    let guard = |door| Guard::new(tokens.clone(), door, telemetry.clone());
    let app = Arc::new(AppState {
        table: table.clone(),
        telemetry: telemetry.clone(),
        ready: Default::default(),
    });

    // h2's default 64 KiB windows stall every request larger than that on WINDOW_UPDATE round
    // trips; sidecar batches are often bigger.
    let grpc = tonic::transport::Server::builder()
        .initial_stream_window_size(Some(GRPC_STREAM_WINDOW))
        .initial_connection_window_size(Some(GRPC_CONNECTION_WINDOW))
        .max_concurrent_streams(Some(limits.http2_max_concurrent_streams))
        .http2_max_header_list_size(Some(limits.http2_max_header_list_size))
        .http2_keepalive_interval(Some(limits.grpc_keepalive_interval))
        .http2_keepalive_timeout(Some(limits.grpc_keepalive_timeout))
        .timeout(limits.grpc_request_timeout)
        .max_connection_age(limits.grpc_max_connection_age)
        .max_connection_age_grace(limits.drain_timeout)
        .add_service(InterceptedService::new(
            MetricsGrpc::new(ingestor.clone()),
            guard(Door::Ingest),
        ))
        .add_service(InterceptedService::new(
            crate::export::flight::Flight::server(table.clone()),
            guard(Door::Read),
        ));
    let grpc = crate::listen::grpc(
        grpc_l,
        grpc,
        tls.clone(),
        limits,
        listen.clone(),
        stopped(stop_rx.clone()),
    );
    let otlp_router = crate::ingest::http::router(
        ingestor.clone(),
        guard(Door::Ingest),
        limits.body_timeout,
        listen.clone(),
    );
    let otlp_http = crate::listen::http(
        otlp_l,
        otlp_router,
        tls.clone(),
        limits,
        "otlp_http",
        listen,
        stopped(stop_rx.clone()),
    );
    let _ = lazy.set(crate::export::http::router(
        app.clone(),
        guard(Door::Scrape),
        guard(Door::Read),
    ));
    tokio::spawn(crate::tls::watch(tls, hup, TLS_RECHECK));

    if let Some(limit) = config.limits.max_memory {
        tokio::spawn(watch_memory(
            limit,
            ingestor.over_memory.clone(),
            stopped(stop_rx.clone()),
        ));
    }
    let storage = Arc::new(storage);
    let checkpoints = tokio::spawn(periodic_checkpoints(
        storage.clone(),
        table.clone(),
        config.checkpoint_interval,
        stopped(stop_rx.clone()),
    ));

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
    let _ = checkpoints.await;
    // Nothing is accepted any more: this checkpoint is the whole state, restored as it is.
    drop(ingestor);
    if storage.checkpoint(&table, true).await.is_err() {
        tracing::warn!("final checkpoint failed: the next start replays the WAL (if kept)");
    }
    // Last references to the table and the WAL go here; dropping them joins the shard threads
    // (after they applied everything queued) and the WAL writer.
    drop(storage);
    drop(app);
    drop(telemetry);
    drop(table);
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
