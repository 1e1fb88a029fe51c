//! A full shard queue is a retryable refusal: HTTP 503 with Retry-After, gRPC UNAVAILABLE,
//! counted, and nothing lost or doubled once the shard catches up and the clients retry. The real ingest stack runs on real
//! sockets; the only trick is holding the one shard busy with a read that waits.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{now_ns, route, spanmetrics};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::metrics::v1::AggregationTemporality;
use prost::Message;
use spanagg::aggregate::table::Table;
use spanagg::auth::{Door, Guard};
use spanagg::ingest::grpc::MetricsGrpc;
use spanagg::ingest::Ingestor;
use spanagg::storage::wal::{self, Wal};
use spanagg::telemetry::{Protocol, Telemetry};

/// The real ingest stack over `shards` shards with queues of `capacity`, logging to a WAL in
/// `dir` if given. Returns the table, the ingestor and its telemetry.
fn stack(
    shards: usize,
    capacity: usize,
    dir: Option<&std::path::Path>,
) -> (Arc<Table>, Arc<Ingestor>, Arc<Telemetry>) {
    let (table, mut ingestor, telemetry) = common::ingest_stack(shards, capacity);
    if let Some(dir) = dir {
        let wal = Wal::start(dir, 1, 0, 1 << 20, Default::default()).unwrap();
        ingestor = ingestor.with_wal(Arc::new(wal));
    }
    (table, Arc::new(ingestor), telemetry)
}

/// Holds the shards `which` selects: each runs a read that waits until the sender is used.
fn hold(
    table: &Table,
    which: impl Fn(usize) -> bool + Send + Sync + 'static,
) -> std::sync::mpsc::Sender<()> {
    let (release, hold) = std::sync::mpsc::channel::<()>();
    let hold = std::sync::Mutex::new(hold);
    table.visit(move |i, _| {
        if which(i) {
            let _ = hold.lock().unwrap().recv();
        }
    });
    release
}

/// A fresh directory for a WAL.
fn wal_dir(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "spanagg-{name}-{}-{}",
        std::process::id(),
        now_ns()
    ))
}

/// Records in the WAL at `dir` (every append was synced before its export returned).
fn wal_records(dir: &std::path::Path) -> usize {
    let mut records = 0;
    wal::replay(dir, wal::Position::default(), |_, _| records += 1).unwrap();
    records
}

/// Serves OTLP/HTTP for `ingestor` on a loopback port.
async fn serve_http(ingestor: &Arc<Ingestor>, telemetry: &Arc<Telemetry>) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    // No token files: the ingest door is open, as by default.
    let open = Guard::new(Arc::default(), Door::Ingest, telemetry.clone());
    let app = spanagg::ingest::http::router(
        ingestor.clone(),
        open,
        std::time::Duration::from_secs(30),
        Default::default(),
    );
    tokio::spawn(async move { axum::serve(l, app).await });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_shard_queue_refuses_with_a_retryable_error_on_both_protocols() {
    let (table, ingestor, telemetry) = stack(1, 1, None);
    let http_addr = serve_http(&ingestor, &telemetry).await;
    let grpc_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = grpc_l.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(MetricsGrpc::new(ingestor.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(grpc_l)),
    );

    // Hold the shard: it runs this read and waits until we let go.
    let release = hold(&table, |_| true);

    let t0 = now_ns() - 60_000_000_000;
    let req = |pod: &str, i: u64| {
        spanmetrics(
            "svc",
            pod,
            &[route("GET /", 1, [1, 0, 0, 0, 0], 1.0)],
            t0 + i,
            t0 + i + 1,
            AggregationTemporality::Delta,
        )
    };
    // OTLP/HTTP export on a blocking thread, so a held shard does not hold the runtime.
    let post = |pod: &str| {
        let body = req(pod, 0).encode_to_vec();
        tokio::task::spawn_blocking(move || {
            let ct = [("Content-Type", "application/x-protobuf")];
            common::http(http_addr, "POST", "/v1/metrics", &ct, &body)
        })
    };
    // The first export fills the queue (capacity 1) and waits for the shard.
    let first = post("a");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, headers, _) = post("b").await.unwrap();
    assert_eq!(status, 503);
    assert!(
        headers.iter().any(|(k, v)| k == "retry-after" && v == "1"),
        "{headers:?}"
    );

    let mut client = MetricsServiceClient::connect(format!("http://{grpc_addr}"))
        .await
        .unwrap();
    let err = client.export(req("c", 0)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");

    release.send(()).unwrap();
    assert_eq!(first.await.unwrap().0, 200, "the queued export completes");
    // The refused exports succeed on retry, and nothing was lost or counted twice: one call
    // from each of a, b and c.
    client.export(req("c", 0)).await.unwrap();
    assert_eq!(post("b").await.unwrap().0, 200);
    let calls = spanagg::export::gather(&table, |s| {
        s.series()
            .map(|x| match &x.value {
                spanagg::aggregate::series::SeriesValue::Counter(c) => c.total(),
                _ => 0.0,
            })
            .sum::<f64>()
    })
    .await
    .unwrap();
    assert_eq!(calls.iter().sum::<f64>(), 3.0);
    let text = telemetry.encode().unwrap();
    assert!(
        text.contains(
            "spanagg_requests_total{protocol=\"http_protobuf\",outcome=\"unavailable\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains("spanagg_requests_total{protocol=\"grpc\",outcome=\"unavailable\"} 1"),
        "{text}"
    );
}

/// Whatever was applied is logged, whatever the reply: a request that one shard applied and
/// another refused (its queue full) is in the WAL, so a crash cannot take back what was served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_applied_on_one_shard_and_refused_on_another_is_logged() {
    let dir = wal_dir("partial");
    let (table, ingestor, _) = stack(2, 1, Some(&dir));
    // Hold shard 1 only.
    let release = hold(&table, |i| i == 1);
    let t0 = now_ns() - 60_000_000_000;
    // Twenty routes spread over both shards.
    let routes: Vec<_> = (0..20)
        .map(|r| {
            route(
                Box::leak(format!("GET /{r}").into_boxed_str()),
                1,
                [1, 0, 0, 0, 0],
                1.0,
            )
        })
        .collect();
    let req = |pod: &str| {
        spanmetrics(
            "svc",
            pod,
            &routes,
            t0,
            t0 + 1,
            AggregationTemporality::Delta,
        )
    };
    // A fills shard 1's queue and waits for it.
    let a = {
        let ingestor = ingestor.clone();
        let r = req("a");
        tokio::spawn(async move {
            ingestor
                .export(Protocol::HttpProtobuf, r.into(), None)
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // B: shard 0 applies its part, shard 1's queue is full: refused, retryably.
    let b = ingestor
        .export(Protocol::HttpProtobuf, req("b").into(), None)
        .await;
    assert!(
        matches!(b, Err(spanagg::ingest::IngestError::Unavailable)),
        "{b:?}"
    );
    release.send(()).unwrap();
    assert!(a.await.unwrap().is_ok());
    assert_eq!(
        wal_records(&dir),
        2,
        "both requests are logged, the refused one too"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A client that hangs up while its export is being applied cannot cancel the logging: what
/// the shards applied is in the WAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_mid_export_cannot_keep_it_out_of_the_log() {
    use std::io::Write;

    let dir = wal_dir("hangup");
    let (table, ingestor, telemetry) = stack(1, 4, Some(&dir));
    let http_addr = serve_http(&ingestor, &telemetry).await;
    // Hold the shard, so the export waits between sending its batch and logging it.
    let release = hold(&table, |_| true);
    let body = spanmetrics(
        "svc",
        "a",
        &[route("GET /", 1, [1, 0, 0, 0, 0], 1.0)],
        now_ns() - 60_000_000_000,
        now_ns() - 59_000_000_000,
        AggregationTemporality::Delta,
    )
    .encode_to_vec();
    tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(http_addr).unwrap();
        let head = format!(
            "POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(&body).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        // Hang up while the export waits for the shard.
        drop(s);
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    release.send(()).unwrap();
    // The export, now on its own, logs once the shard has applied it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        wal_records(&dir),
        1,
        "the applied request is logged though its client left"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
