//! Test harness: runs the real `spanagg` binary on ephemeral loopback ports and talks to it
//! over real sockets. Nothing here imitates the server.

#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric::Data, number_data_point, AggregationTemporality, Histogram, HistogramDataPoint, Metric,
    NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;

pub mod load;

pub const BOUNDS: [f64; 4] = [2.0, 10.0, 100.0, 1000.0];

/// A running spanagg process.
pub struct Spanagg {
    child: Child,
    pub grpc: SocketAddr,
    pub otlp_http: SocketAddr,
    pub http: SocketAddr,
    pub dir: PathBuf,
    pub log: Arc<Mutex<Vec<String>>>,
    /// Leave `dir` in place on drop (the process was stopped to be restarted on it).
    keep_dir: bool,
    /// The thread reading stderr into `log`; done once the process is gone.
    pump: Option<std::thread::JoinHandle<()>>,
}

/// A fresh directory; whoever takes it removes it (a `Spanagg` started in it does on drop).
pub fn temp_dir() -> PathBuf {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir = std::env::temp_dir().join(format!("spanagg-test-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A fresh directory, removed when dropped.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new() -> Self {
        Self(temp_dir())
    }
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

/// Runs `spanagg serve` with `yaml` appended to a config on loopback port 0 with its state in a
/// scratch directory, insists that it refuses to start, and returns what it said.
pub fn serve_refuses(yaml: &str) -> String {
    let dir = Scratch::new();
    let config = dir.path().join("spanagg.yaml");
    std::fs::write(
        &config,
        format!(
            "grpc_listen: 127.0.0.1:0\notlp_http_listen: 127.0.0.1:0\nhttp_listen: 127.0.0.1:0\n\
             data_dir: {}\n{yaml}",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let out = cli(["serve", "--config", config.to_str().unwrap()]);
    assert!(!out.ok, "spanagg started with {yaml}");
    out.stderr
}

fn addr_after(line: &str, marker: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(marker)? + marker.len()..];
    let end = rest.find([' ', ',']).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

impl Spanagg {
    /// Starts the binary with `extra` YAML appended to a config that binds port 0 everywhere.
    pub fn start(extra: &str) -> Self {
        Self::start_in(temp_dir(), extra)
    }

    /// Starts on `dir` (its `data/` holds the state of an earlier run, if any).
    pub fn start_in(dir: PathBuf, extra: &str) -> Self {
        Self::start_in_restoring(dir, extra, |_| {})
    }

    /// Starts on `dir` with more environment variables (`LD_PRELOAD` of `faults_shim`).
    pub fn start_in_with_env(dir: PathBuf, extra: &str, env: &[(&str, &str)]) -> Self {
        Self::launch(dir, extra, env, |_| {})
    }

    /// Like `start_in`; `while_restoring` gets the HTTP address as soon as the process logs that
    /// it is restoring its state (before it serves).
    pub fn start_in_restoring(
        dir: PathBuf,
        extra: &str,
        while_restoring: impl FnOnce(SocketAddr),
    ) -> Self {
        Self::launch(dir, extra, &[], while_restoring)
    }

    fn launch(
        dir: PathBuf,
        extra: &str,
        env: &[(&str, &str)],
        while_restoring: impl FnOnce(SocketAddr),
    ) -> Self {
        let config = dir.join("spanagg.yaml");
        std::fs::write(
            &config,
            format!(
                "grpc_listen: 127.0.0.1:0\notlp_http_listen: 127.0.0.1:0\nhttp_listen: \
                 127.0.0.1:0\ndata_dir: {}\n{extra}",
                dir.join("data").display()
            ),
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_spanagg"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let (restoring_tx, restoring_rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        let pump = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("listening:") {
                    let _ = tx.send(line.clone());
                }
                if line.contains("restoring state") {
                    let _ = restoring_tx.send(line.clone());
                }
                log2.lock().unwrap().push(line);
            }
        });
        if let Ok(line) = restoring_rx.recv_timeout(Duration::from_secs(30)) {
            if let Some(addr) = addr_after(&line, "http=") {
                while_restoring(addr);
            }
        }
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("spanagg did not start: {:?}", log.lock().unwrap()));
        let s = Self {
            child,
            grpc: addr_after(&line, "OTLP/gRPC on ").unwrap(),
            otlp_http: addr_after(&line, "OTLP/HTTP on ").unwrap(),
            http: addr_after(&line, ", HTTP on ").unwrap(),
            dir,
            log,
            keep_dir: false,
            pump: Some(pump),
        };
        // Over TLS this plaintext probe could not talk to it; the TLS tests check on their own.
        if !extra.contains("cert_file:") {
            assert_eq!(s.get("/-/ready").0, 200);
        }
        s
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no shutdown work at all. Returns the directory to restart on.
    pub fn kill9(mut self) -> PathBuf {
        self.keep_dir = true;
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.dir.clone()
    }

    /// SIGTERM, then the directory to restart on.
    pub fn stop_keep(mut self) -> PathBuf {
        self.keep_dir = true;
        let dir = self.dir.clone();
        assert!(self.stop().success(), "spanagg did not exit cleanly");
        dir
    }

    /// The log so far, one string.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Sends SIGTERM and waits for the exit status. Fails if the server's log shows a panic:
    /// tonic and the shard threads catch panics, so one would otherwise pass unnoticed.
    pub fn stop(mut self) -> ExitStatus {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                if let Some(pump) = self.pump.take() {
                    let _ = pump.join();
                }
                let log = self.log_text();
                assert!(!log.contains("panicked"), "a panic in the log:\n{log}");
                return status;
            }
            assert!(Instant::now() < deadline, "spanagg did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        let (status, _, body) = http(self.http, "GET", path, &[], &[]);
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    pub fn scrape(&self) -> String {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200);
        body
    }

    /// The scrape as OpenMetrics (with `_created`).
    pub fn openmetrics(&self) -> String {
        let accept = [("Accept", "application/openmetrics-text; version=1.0.0")];
        let (status, _, body) = http(self.http, "GET", "/metrics", &accept, b"");
        assert_eq!(status, 200);
        String::from_utf8(body).unwrap()
    }

    /// Value of one sample in `/internal/metrics`, 0 when absent.
    pub fn internal(&self, sample: &str) -> f64 {
        sample_value(&self.get("/internal/metrics").1, sample).unwrap_or(0.0)
    }

    /// [`internal`](Self::internal), read again until it shows `want` (for 5 s at most): a
    /// count the server makes right after writing what the client reacts to can trail it.
    pub fn internal_reaching(&self, sample: &str, want: f64) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let v = self.internal(sample);
            if v == want || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident memory of the process now (VmRSS), in bytes.
    pub fn rss(&self) -> u64 {
        self.proc_status_kib("VmRSS:") * 1024
    }

    fn proc_status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with(field)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Peak resident memory of the process (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        self.proc_status_kib("VmHWM:") * 1024
    }

    /// POSTs an OTLP/HTTP protobuf body; returns the status.
    pub fn post_protobuf(&self, body: &[u8]) -> u16 {
        self.post_otlp("application/x-protobuf", &[], body).0
    }

    /// POSTs an OTLP/HTTP protobuf body and insists it is acknowledged.
    pub fn post_ok(&self, body: &[u8]) {
        assert_eq!(self.post_protobuf(body), 200);
    }

    pub fn post_otlp(
        &self,
        content_type: &str,
        extra: &[(&str, &str)],
        body: &[u8],
    ) -> (u16, Vec<(String, String)>, Vec<u8>) {
        let mut headers = vec![("Content-Type", content_type)];
        headers.extend_from_slice(extra);
        http(self.otlp_http, "POST", "/v1/metrics", &headers, body)
    }
}

/// `tests/fixtures/faults.c` built with the system C compiler as a preloadable library in
/// `dir`: fsync faults switched by flag files (see the file).
pub fn faults_shim(dir: &std::path::Path) -> PathBuf {
    let so = dir.join("faults.so");
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/faults.c");
    let built = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&so)
        .arg(src)
        .arg("-ldl")
        .status()
        .expect("a C compiler (cc) for the faults shim");
    assert!(built.success());
    so
}

/// The outcome of one run of the `spanagg` command line.
pub struct Cli {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the `spanagg` binary with `args` and waits for it.
pub fn cli<S: AsRef<std::ffi::OsStr>>(args: impl IntoIterator<Item = S>) -> Cli {
    let out = Command::new(env!("CARGO_BIN_EXE_spanagg"))
        .args(args)
        .output()
        .unwrap();
    Cli {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs the `spanagg` binary with `args`, insists it succeeds, and returns what it printed.
pub fn cli_ok<S: AsRef<std::ffi::OsStr>>(args: impl IntoIterator<Item = S>) -> String {
    let out = cli(args);
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    out.stdout
}

impl Drop for Spanagg {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.keep_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A plain HTTP/1.1 exchange with `Connection: close`.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    // The server may answer (413) before reading a large body; ignore a reset while writing.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let hdrs: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if hdrs
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v == "chunked")
    {
        body = dechunk(&body);
    }
    (status, hdrs, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let len =
            usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap();
        if len == 0 {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + len]);
        b = &b[eol + 2 + len + 2..];
    }
    out
}

/// The value of a sample line that starts with `sample` (name plus optional labels).
pub fn sample_value(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(sample) && l[sample.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

pub fn kv(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.into())),
        }),
        ..Default::default()
    }
}

/// One route's numbers in one delta.
#[derive(Debug, Clone)]
pub struct Route {
    pub span: &'static str,
    pub calls: u64,
    pub buckets: [u64; 5],
    pub sum: f64,
}

pub fn route(span: &'static str, calls: u64, buckets: [u64; 5], sum: f64) -> Route {
    Route {
        span,
        calls,
        buckets,
        sum,
    }
}

/// A request shaped like the spanmetrics connector's output for one pod.
pub fn spanmetrics(
    service: &str,
    pod: &str,
    routes: &[Route],
    start: u64,
    end: u64,
    temporality: AggregationTemporality,
) -> ExportMetricsServiceRequest {
    let attrs = |r: &Route| {
        vec![
            kv("service.name", service),
            kv("span.name", r.span),
            kv("span.kind", "SPAN_KIND_SERVER"),
            kv("status.code", "STATUS_CODE_UNSET"),
            kv("collector.instance.id", pod),
        ]
    };
    let calls = Metric {
        name: "traces.span.metrics.calls".into(),
        unit: "{call}".into(),
        description: "Number of calls".into(),
        data: Some(Data::Sum(Sum {
            data_points: routes
                .iter()
                .map(|r| NumberDataPoint {
                    attributes: attrs(r),
                    start_time_unix_nano: start,
                    time_unix_nano: end,
                    value: Some(number_data_point::Value::AsInt(r.calls as i64)),
                    ..Default::default()
                })
                .collect(),
            aggregation_temporality: temporality as i32,
            is_monotonic: true,
        })),
        ..Default::default()
    };
    let duration = Metric {
        name: "traces.span.metrics.duration".into(),
        unit: "ms".into(),
        description: "Duration of spans".into(),
        data: Some(Data::Histogram(Histogram {
            data_points: routes
                .iter()
                .map(|r| HistogramDataPoint {
                    attributes: attrs(r),
                    start_time_unix_nano: start,
                    time_unix_nano: end,
                    count: r.buckets.iter().sum(),
                    sum: Some(r.sum),
                    bucket_counts: r.buckets.to_vec(),
                    explicit_bounds: BOUNDS.to_vec(),
                    ..Default::default()
                })
                .collect(),
            aggregation_temporality: temporality as i32,
        })),
        ..Default::default()
    };
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![
                    kv("service.name", service),
                    kv("k8s.pod.name", pod),
                    kv("service.instance.id", pod),
                ],
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: "spanmetricsconnector".into(),
                    ..Default::default()
                }),
                metrics: vec![calls, duration],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// One pod's one-second delta for checkout's `GET /cart` route: the tests' usual point.
pub fn cart_delta(
    pod: &str,
    calls: u64,
    buckets: [u64; 5],
    sum: f64,
    start: u64,
) -> ExportMetricsServiceRequest {
    spanmetrics(
        "checkout",
        pod,
        &[route("GET /cart", calls, buckets, sum)],
        start,
        start + 1_000_000_000,
        AggregationTemporality::Delta,
    )
}

/// An OTLP/HTTP protobuf reply body.
pub fn export_response(
    body: &[u8],
) -> opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse {
    prost::Message::decode(body).unwrap()
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// A small gzip stream that expands to `size` zero bytes, built without holding them.
pub fn gzip_bomb(size: usize) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let chunk = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len());
        e.write_all(&chunk[..n]).unwrap();
        left -= n;
    }
    e.finish().unwrap()
}

pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// Checks the scrape invariants: each family's lines are contiguous under its `# TYPE`; every
/// histogram is whole (buckets non-decreasing, `+Inf` == `_count`); and no sample went down
/// since `previous`. Returns the samples by full name for the next comparison.
pub fn check_scrape(
    text: &str,
    previous: &std::collections::HashMap<String, f64>,
) -> std::collections::HashMap<String, f64> {
    use std::collections::{HashMap, HashSet};
    let mut samples = HashMap::new();
    let mut seen_families = HashSet::new();
    let mut current: Option<String> = None;
    let mut last_bucket: Option<(String, f64)> = None;
    let mut inf: HashMap<String, f64> = HashMap::new();
    let mut counts: HashMap<String, f64> = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest
                .split(' ')
                .next()
                .unwrap()
                .trim_end_matches("_total")
                .to_owned();
            assert!(
                seen_families.insert(name.clone()),
                "family {name} appears twice"
            );
            current = Some(name);
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value.parse().unwrap();
        let name = series.split('{').next().unwrap();
        let fam = current.as_deref().unwrap();
        assert!(
            name.starts_with(fam),
            "{name} outside its family block {fam}"
        );
        if let Some(prev) = previous.get(series) {
            assert!(value >= *prev, "{series} went down: {prev} -> {value}");
        }
        samples.insert(series.to_owned(), value);
        if name.ends_with("_bucket") {
            let without_le = series.split(",le=").next().unwrap().to_owned();
            if let Some((prev_series, prev_value)) = &last_bucket {
                if *prev_series == without_le {
                    assert!(value >= *prev_value, "bucket decreased in {series}");
                }
            }
            if series.contains("le=\"+Inf\"") {
                inf.insert(without_le.replacen("_bucket", "", 1), value);
            }
            last_bucket = Some((without_le, value));
        } else if name.ends_with("_count") {
            let key = series.replacen("_count", "", 1);
            let key = key.trim_end_matches('}').to_owned();
            counts.insert(key, value);
        }
    }
    for (k, c) in &counts {
        assert_eq!(inf.get(k), Some(c), "+Inf != _count for {k}");
    }
    samples
}

/// A workload shape of one service.
pub fn one_service(routes: usize, bounds: usize, counters: bool) -> spanagg::workload::Shape {
    spanagg::workload::Shape {
        services: 1,
        routes,
        bounds,
        counters,
    }
}

/// Sends one raw gRPC frame over HTTP/2 and returns (HTTP status, headers + trailers).
/// With `encoding`, the frame is flagged compressed and sent with that `grpc-encoding`.
pub async fn raw_grpc(
    s: &Spanagg,
    encoding: Option<&str>,
    payload: Vec<u8>,
) -> (u16, Vec<(String, String)>, ()) {
    raw_grpc_flagged(s, encoding, encoding.is_some(), payload).await
}

/// [`raw_grpc`] with the frame's compressed flag chosen apart from the header.
pub async fn raw_grpc_flagged(
    s: &Spanagg,
    encoding: Option<&str>,
    compressed: bool,
    payload: Vec<u8>,
) -> (u16, Vec<(String, String)>, ()) {
    let mut frame = vec![u8::from(compressed)];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    raw_grpc_bytes(s, encoding, frame).await
}

/// Sends `body` as a gRPC export request's body, as it is (frames and all).
pub async fn raw_grpc_bytes(
    s: &Spanagg,
    encoding: Option<&str>,
    frame: Vec<u8>,
) -> (u16, Vec<(String, String)>, ()) {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let mut req = http::Request::post(format!(
        "http://{}/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
        s.grpc
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers");
    if let Some(encoding) = encoding {
        req = req.header("grpc-encoding", encoding);
    }
    let res = client
        .request(
            req.body(http_body_util::Full::new(bytes::Bytes::from(frame)))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = res.status().as_u16();
    let mut headers: Vec<(String, String)> = res
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let collected = res.into_body().collect().await.unwrap();
    if let Some(t) = collected.trailers() {
        headers.extend(
            t.iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned())),
        );
    }
    (status, headers, ())
}

pub fn grpc_status(headers: &[(String, String)]) -> Option<i32> {
    headers
        .iter()
        .find(|(k, _)| k == "grpc-status")
        .and_then(|(_, v)| v.parse().ok())
}

/// The real ingest stack without sockets: `shards` shards with queues of `capacity`, and an
/// ingestor (1 MiB requests, `service.name` kept, `k8s.pod.name` dropped) over them.
pub fn ingest_stack(
    shards: usize,
    capacity: usize,
) -> (
    Arc<spanagg::aggregate::table::Table>,
    spanagg::ingest::Ingestor,
    Arc<spanagg::telemetry::Telemetry>,
) {
    let table = Arc::new(
        spanagg::aggregate::table::Table::start(
            spanagg::aggregate::shard::ShardConfig::default(),
            shards,
            capacity,
        )
        .unwrap(),
    );
    let telemetry = Arc::new(spanagg::telemetry::Telemetry::new(
        table.stats(),
        Default::default(),
        spanagg::config::Config::default().limits,
    ));
    let ingestor = spanagg::ingest::Ingestor::new(
        table.clone(),
        spanagg::ingest::otlp::Projection::new(&["service.name".into()], &["k8s.pod.name".into()]),
        telemetry.clone(),
        1 << 20,
    );
    (table, ingestor, telemetry)
}
