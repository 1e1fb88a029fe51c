//! The `spanagg` command line: `serve` (the default) runs the service; `cardinality` and
//! `inspect` report on a running one or a checkpoint file.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use spanagg::config::Config;
use spanagg::server::{serve, Bound};

// Decoding OTLP allocates a string per attribute; mimalloc makes that ~25-35% cheaper than the
// system allocator (see BENCHMARKS.md). Built without transparent huge pages (Cargo.toml).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Cluster-level aggregator for OpenTelemetry span metrics: OTLP deltas in from every pod,
/// an exact cross-pod merge, one small Prometheus scrape endpoint out.
#[derive(Debug, Parser)]
#[command(name = "spanagg", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service (the default when no subcommand is given).
    Serve(ServeArgs),
    /// Print the cardinality report of a running spanagg (or of a checkpoint file, offline):
    /// series and source streams per service, metric and label, and the reduction factor.
    Cardinality(CardinalityArgs),
    /// Print a checkpoint file's footer metadata and a summary of its state (series and
    /// source streams per metric and service, time range).
    Inspect {
        /// A checkpoint: <data_dir>/checkpoints/checkpoint-*.parquet
        file: PathBuf,
    },
}

#[derive(Debug, Args, Clone)]
struct CardinalityArgs {
    /// Base URL of spanagg's HTTP listener.
    #[arg(long, default_value = "http://127.0.0.1:9464")]
    url: String,
    /// Report on this checkpoint file instead of a running server.
    #[arg(long, value_name = "CHECKPOINT", conflicts_with = "url")]
    file: Option<PathBuf>,
    /// Only this service (its service_name label).
    #[arg(long)]
    service: Option<String>,
    /// Only this metric (Prometheus or OTel name).
    #[arg(long)]
    metric: Option<String>,
    /// Entries per list.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Print the JSON report instead of tables.
    #[arg(long)]
    json: bool,
}

/// Fetches the report from a running server.
async fn fetch_report(args: &CardinalityArgs) -> anyhow::Result<String> {
    use http_body_util::BodyExt;
    let mut query = vec![("top", args.top.to_string())];
    if let Some(s) = &args.service {
        query.push(("service", s.clone()));
    }
    if let Some(m) = &args.metric {
        query.push(("metric", m.clone()));
    }
    let url = format!(
        "{}/api/v1/cardinality?{}",
        args.url.trim_end_matches('/'),
        serde_urlencoded::to_string(&query)?
    );
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let res = client
        .get(
            url.parse()
                .with_context(|| format!("bad --url {:?}", args.url))?,
        )
        .await
        .with_context(|| format!("cannot reach spanagg at {}", args.url))?;
    let status = res.status();
    let body = res.into_body().collect().await?.to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    anyhow::ensure!(status.is_success(), "{url} answered {status}: {text}");
    Ok(text)
}

/// The report over a checkpoint file: the same summaries, over shards rebuilt from the file.
fn file_report(args: &CardinalityArgs, path: &std::path::Path) -> anyhow::Result<String> {
    use spanagg::cardinality::{Report, Scope, ShardSummary};
    let (_, states) = spanagg::storage::inspect::load_file(path)
        .with_context(|| format!("cannot read checkpoint {}", path.display()))?;
    let scope = Scope {
        service: args.service.clone(),
        metric: args.metric.clone(),
    };
    let parts = states.iter().map(|s| ShardSummary::of(s, &scope)).collect();
    Ok(serde_json::to_string_pretty(&Report::merge(
        parts,
        args.top.max(1),
    ))?)
}

fn cardinality(args: CardinalityArgs) -> anyhow::Result<()> {
    let text = match &args.file {
        Some(path) => file_report(&args, path)?,
        None => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(fetch_report(&args))?,
    };
    if args.json {
        println!("{text}");
    } else {
        let report: spanagg::cardinality::Report = serde_json::from_str(&text)
            .context("the server's report is not what this spanagg reads")?;
        print!("{}", report.table());
    }
    Ok(())
}

#[derive(Debug, Args, Clone, Default)]
struct ServeArgs {
    /// YAML config file; flags given here override its values.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory for state (WAL, checkpoints). Default: ./data
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// OTLP/gRPC listen address. Default: 127.0.0.1:4317
    #[arg(long, value_name = "ADDR")]
    grpc_listen: Option<SocketAddr>,
    /// OTLP/HTTP listen address. Default: 127.0.0.1:4318
    #[arg(long, value_name = "ADDR")]
    otlp_http_listen: Option<SocketAddr>,
    /// Scrape and API listen address (/metrics, /internal/metrics). Default: 127.0.0.1:9464
    #[arg(long, value_name = "ADDR")]
    http_listen: Option<SocketAddr>,
    /// Log filter, e.g. `info` or `spanagg=debug` (overrides RUST_LOG).
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,
}

fn load_config(args: &ServeArgs) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(d) = &args.data_dir {
        config.data_dir = d.clone();
    }
    if let Some(a) = args.grpc_listen {
        config.grpc_listen = a;
    }
    if let Some(a) = args.otlp_http_listen {
        config.otlp_http_listen = a;
    }
    if let Some(a) = args.http_listen {
        config.http_listen = a;
    }
    Ok(config)
}

/// Installs the SIGINT and SIGTERM handlers now, before the state is restored, and returns
/// what resolves on the first signal. Installed lazily (when first awaited, after start-up), a
/// SIGTERM that came during start-up took the default action and killed the process, skipping
/// the final checkpoint. Call inside the runtime.
#[cfg(unix)]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => tracing::info!("received SIGINT"),
            _ = term.recv() => tracing::info!("received SIGTERM"),
        }
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("received Ctrl-C");
    })
}

fn main() -> std::process::ExitCode {
    // Errors are for operators: one line with its causes, no backtrace.
    match run(Cli::parse_from(help_args(std::env::args_os()))) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spanagg: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `spanagg help --help` (or `-h`) asks for help on `help`: clap's help subcommand takes only
/// subcommand names and refuses the flag, so it is dropped and the top-level help printed.
fn help_args(args: impl Iterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut args: Vec<_> = args.collect();
    if args.get(1).is_some_and(|a| a == "help") {
        args.retain(|a| a != "--help" && a != "-h");
    }
    args
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let args = match cli.command {
        Some(Command::Serve(a)) => a,
        Some(Command::Cardinality(a)) => return cardinality(a),
        Some(Command::Inspect { file }) => {
            let text = spanagg::storage::inspect::inspect(&file)
                .with_context(|| format!("cannot read checkpoint {}", file.display()))?;
            print!("{text}");
            return Ok(());
        }
        None => cli.serve,
    };
    let filter = args
        .log
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".to_owned());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&filter).context("--log")?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = load_config(&args)?;
    tracing::info!(
        shards = config.shards.get(),
        data_dir = %config.data_dir.display(),
        late_delta_window = ?config.late_delta_window,
        series_ttl = ?config.series_ttl,
        "starting spanagg {}",
        env!("CARGO_PKG_VERSION")
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("spanagg-io")
        // Without this, pages freed by a burst of requests stay with the worker that served
        // it until it next collects, often long after (src/memory.rs).
        .on_thread_park(|| {
            spanagg::memory::release_when_idle();
        })
        .build()
        .context("cannot start the async runtime")?;
    let shutdown = {
        let _inside = runtime.enter();
        shutdown_signal()?
    };
    // What a reader of the log needs to trust the start: is it encrypted, which doors are shut.
    let security = match (config.tls.enabled(), config.tls.client_ca_file.is_some()) {
        (false, _) => "plaintext",
        (true, false) => "TLS",
        (true, true) => "TLS with client certificates",
    };
    runtime.block_on(serve(config, shutdown, |b: Bound| {
        tracing::info!(
            security,
            tokens = ?b.tokens,
            "listening: OTLP/gRPC on {}, OTLP/HTTP on {} (POST /v1/metrics), HTTP on {} \
             (GET /metrics, /internal/metrics, /-/healthy, /-/ready)",
            b.grpc,
            b.otlp_http,
            b.http
        );
    }))?;
    tracing::info!("stopped cleanly");
    Ok(())
}
