//! Restarts of the real binary on its own data directory: clean stops, `kill -9` under load and
//! during checkpoints, `durability: none`, and I/O errors on the WAL and checkpoint paths.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::load::{try_post, Load};
use common::{now_ns, Spanagg};
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use prost::Message;
use spanagg::workload::{make_cumulative, request, Shape};

const ROUTES: usize = 20;
const SHAPE: Shape = Shape {
    services: 1,
    routes: ROUTES,
    bounds: 4,
    counters: true,
};
/// Calls (and histogram observations) per route in one `workload::request`.
const PER_REQUEST: u64 = 5;
/// Calls in one `delta` (all routes).
const ONE_DELTA: f64 = (PER_REQUEST * ROUTES as u64) as f64;

/// Sum of every sample of a family in a scrape.
fn total(scrape: &str, prefix: &str) -> f64 {
    scrape
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn calls(s: &Spanagg) -> f64 {
    total(&s.scrape(), "traces_span_metrics_calls_total{")
}

fn observations(s: &Spanagg) -> f64 {
    total(
        &s.scrape(),
        "traces_span_metrics_duration_milliseconds_count{",
    )
}

fn delta(pod: usize, k: u64, t0: u64) -> Vec<u8> {
    let start = t0 + k * 1_000_000;
    request(&SHAPE, pod, start, start + 1_000_000).encode_to_vec()
}

fn cumulative(pod: usize, start: u64, end: u64, calls: i64) -> Vec<u8> {
    let mut req = request(&SHAPE, pod, start, end);
    make_cumulative(&mut req);
    for m in &mut req.resource_metrics[0].scope_metrics[0].metrics {
        if let Some(Data::Sum(sum)) = m.data.as_mut() {
            for p in &mut sum.data_points {
                p.value = Some(
                    opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsInt(calls),
                );
            }
        }
    }
    // Only the counter: a cumulative histogram is not needed for the point being made.
    req.resource_metrics[0].scope_metrics[0]
        .metrics
        .retain(|m| matches!(m.data, Some(Data::Sum(_))));
    req.encode_to_vec()
}

fn checkpoints(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("data/checkpoints"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_clean_restart_serves_exactly_the_same_scrape_and_keeps_exactly_once() {
    let s = Spanagg::start("");
    let t0 = now_ns() - 60_000_000_000;
    for pod in 0..3 {
        for k in 0..4 {
            s.post_ok(&delta(pod, k, t0));
        }
    }
    // A cumulative stream that started after spanagg did: its first point counts.
    let cstart = now_ns();
    s.post_ok(&cumulative(7, cstart, cstart + 1_000, 10));
    let before = s.scrape();
    let dir = s.stop_keep();
    assert!(
        checkpoints(&dir).iter().any(|f| f.ends_with(".parquet")),
        "a clean stop writes a checkpoint: {:?}",
        checkpoints(&dir)
    );

    let s = Spanagg::start_in(dir, "");
    assert_eq!(
        s.scrape(),
        before,
        "the whole scrape is the same after a clean restart"
    );
    // Retries of deltas applied before the restart are still duplicates.
    s.post_ok(&delta(0, 2, t0));
    assert_eq!(s.scrape(), before);
    assert_eq!(
        s.internal("spanagg_points_total{outcome=\"duplicate\"}"),
        40.0
    );
    // The cumulative stream continues from its last value (a difference, not a reset).
    s.post_ok(&cumulative(7, cstart, cstart + 2_000, 13));
    let expected = 3.0 * 4.0 * ONE_DELTA + 13.0 * ROUTES as f64;
    assert_eq!(calls(&s), expected);
    assert_eq!(
        s.internal("spanagg_points_total{outcome=\"cumulative_reset\"}"),
        0.0
    );
}

/// Waits (bounded) until the checkpoint directory holds a temp file, i.e. a checkpoint is being
/// written; returns whether one was seen.
fn wait_for_temp(dir: &std::path::Path, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if checkpoints(dir).iter().any(|f| f.ends_with(".tmp")) {
            return true;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    false
}

#[test]
fn kill_9_under_load_and_mid_checkpoint_loses_and_doubles_nothing() {
    // Many series make a checkpoint take long enough to be killed in the middle of one.
    let cfg = "checkpoint_interval: 300ms\n";
    let (s, addr, load, base) = wide_under_load(cfg, 20_000);
    std::thread::sleep(Duration::from_millis(800));
    let dir = s.kill9();
    // The next checkpoint is held half written (its temp file's fsync waits on a flag), so
    // the second kill lands in the middle of one every time.
    let scratch = common::Scratch::new();
    let (shim, hold) = (
        common::faults_shim(scratch.path()),
        scratch.path().join("hold"),
    );
    std::fs::write(&hold, b"").unwrap();
    let env = [
        ("LD_PRELOAD", shim.to_str().unwrap()),
        ("SPANAGG_HOLD_TMP_FSYNC", hold.to_str().unwrap()),
    ];
    let s = Spanagg::start_in_with_env(dir, cfg, &env);
    *addr.lock().unwrap() = s.otlp_http;
    assert!(
        wait_for_temp(&s.dir, Duration::from_secs(10)),
        "no checkpoint began"
    );
    std::thread::sleep(Duration::from_millis(300));
    let dir = s.kill9();
    assert!(checkpoints(&dir).iter().any(|f| f.ends_with(".tmp")));
    let s = Spanagg::start_in(dir, cfg);
    assert!(
        s.log_text().contains("removed checkpoint temp files"),
        "the killed checkpoint's temp file is cleaned up at start"
    );
    *addr.lock().unwrap() = s.otlp_http;
    std::thread::sleep(Duration::from_millis(500));
    let acked = exactly_once(&s, load, base);
    assert!(acked > 20, "the load ran: {acked} requests");
    assert!(s.log_text().contains("replayed the write-ahead log"));
    eprintln!("acknowledged requests: {acked}");
}

/// A server started with `cfg`, sent one pod's delta over `routes` routes, then four pods'
/// deltas as fast as they are acknowledged (retried across restarts through the returned
/// address); returns the server, that address, the load, and the calls of the wide delta.
fn wide_under_load(cfg: &str, routes: usize) -> (Spanagg, Arc<Mutex<SocketAddr>>, Load, f64) {
    let s = Spanagg::start(cfg);
    let t0 = now_ns() - 60_000_000_000;
    let wide = common::one_service(routes, 4, true);
    s.post_ok(&request(&wide, 999, t0, t0 + 1_000_000).encode_to_vec());
    let addr = Arc::new(Mutex::new(s.otlp_http));
    let load = Load::start(addr.clone(), 4, move |pod, k| delta(100 + pod, k, t0));
    (s, addr, load, routes as f64 * PER_REQUEST as f64)
}

/// Stops the load and checks that `s` holds `base` plus every acknowledged delta exactly once.
fn exactly_once(s: &Spanagg, load: Load, base: f64) -> u64 {
    let acked = load.finish();
    let expected = base + acked as f64 * ONE_DELTA;
    assert_eq!(
        calls(s),
        expected,
        "calls: every acknowledged delta exactly once"
    );
    assert_eq!(observations(s), expected, "histogram counts likewise");
    acked
}

/// The newest number after `key=` on a log line containing `what`.
fn logged(s: &Spanagg, what: &str, key: &str) -> Option<u64> {
    s.log_text()
        .lines()
        .rev()
        .filter(|l| l.contains(what))
        .find_map(|l| l.split(key).nth(1)?.split(' ').next()?.parse().ok())
}

#[test]
fn a_checkpoint_read_in_parts_under_load_restores_exactly_after_kill_9() {
    // Small parts: a checkpoint reads each shard in about ten visits while the load goes on.
    let cfg = "checkpoint_interval: 400ms\ncheckpoint_part_rows: 500\n";
    let (s, addr, load, base) = wide_under_load(cfg, 2_000);
    // Two checkpoints written under the load: the second began after the wide request.
    let deadline = Instant::now() + Duration::from_secs(30);
    let written = |s: &Spanagg| s.log_text().matches("checkpoint written").count();
    while written(&s) < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let parts = logged(&s, "checkpoint written", "parts=").unwrap_or(0);
    assert!(
        parts >= 16,
        "parts per checkpoint: {parts}\n{}",
        s.log_text()
    );
    let dir = s.kill9();

    let s = Spanagg::start_in(dir, cfg);
    *addr.lock().unwrap() = s.otlp_http;
    let series = logged(&s, "restored checkpoint", "series=").unwrap_or(0);
    assert!(
        series >= 4_000,
        "the restored checkpoint holds the state: {series} series"
    );
    // The newest, read in parts: not an older one after it was found unreadable.
    assert!(
        !s.log_text().contains("unreadable checkpoint"),
        "{}",
        s.log_text()
    );
    std::thread::sleep(Duration::from_millis(500));
    exactly_once(&s, load, base);
}

#[test]
fn without_a_wal_a_crash_starts_from_zero_and_a_clean_stop_restores() {
    let cfg = "durability: none\ncheckpoint_interval: 200ms\n";
    let s = Spanagg::start(cfg);
    let t0 = now_ns() - 60_000_000_000;
    s.post_ok(&delta(0, 0, t0));
    let clean_value = calls(&s);
    let dir = s.stop_keep();
    let s = Spanagg::start_in(dir, cfg);
    assert_eq!(
        calls(&s),
        clean_value,
        "a clean stop's checkpoint is restored"
    );
    s.post_ok(&delta(0, 1, t0));
    // Let a periodic checkpoint hold the newer value, then crash.
    std::thread::sleep(Duration::from_millis(600));
    assert!(
        !std::fs::read_dir(s.dir.join("data/wal"))
            .unwrap()
            .any(|_| true),
        "no WAL kept"
    );
    let dir = s.kill9();
    let s = Spanagg::start_in(dir, cfg);
    assert_eq!(calls(&s), 0.0, "no stale value after a crash without a WAL");
    s.post_ok(&delta(0, 2, t0));
    assert_eq!(calls(&s), ONE_DELTA, "counting starts over");
}

#[test]
fn wal_write_errors_refuse_retryably_and_the_retry_counts_once() {
    let s = Spanagg::start("");
    // The first WAL segment is a file every write to fails, as on a full disk.
    let seg1 = s.dir.join(format!("data/wal/{:020}.wal", 1));
    std::os::unix::fs::symlink("/dev/full", &seg1).unwrap();
    let t0 = now_ns() - 60_000_000_000;
    let body = delta(0, 0, t0);
    assert_eq!(
        try_post(s.otlp_http, &body),
        Some(503),
        "not durable: retryable refusal"
    );
    assert_eq!(s.internal("spanagg_wal_write_errors_total"), 1.0);
    assert_eq!(
        try_post(s.otlp_http, &body),
        Some(200),
        "the retry goes to a new segment"
    );
    assert_eq!(calls(&s), ONE_DELTA, "applied once, not twice");
    std::fs::remove_file(&seg1).unwrap();
    let dir = s.kill9();
    let s = Spanagg::start_in(dir, "");
    assert_eq!(calls(&s), ONE_DELTA, "the retry was logged");
}

#[test]
fn checkpoint_io_errors_are_counted_and_ingestion_goes_on() {
    let s = Spanagg::start("checkpoint_interval: 200ms\n");
    let t0 = now_ns() - 60_000_000_000;
    s.post_ok(&delta(0, 0, t0));
    let dir = s.dir.join("data/checkpoints");
    let moved = s.dir.join("data/checkpoints.moved");
    std::fs::rename(&dir, &moved).unwrap();
    std::fs::write(&dir, b"not a directory").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.internal("spanagg_checkpoint_failures_total{reason=\"io\"}") == 0.0 {
        assert!(Instant::now() < deadline, "no checkpoint failure counted");
        std::thread::sleep(Duration::from_millis(50));
    }
    s.post_ok(&delta(0, 1, t0));
    assert_eq!(calls(&s), 2.0 * ONE_DELTA);
    // While they fail, no success is recorded; once the directory is back, a new checkpoint
    // file (not one from before the failure) and a later success time.
    let last_success = || s.internal("spanagg_checkpoint_last_success_timestamp_seconds");
    let success_before = last_success();
    std::fs::remove_file(&dir).unwrap();
    std::fs::rename(&moved, &dir).unwrap();
    let files_before = checkpoints(&s.dir);
    let failed_at = s.internal("spanagg_checkpoint_failures_total{reason=\"io\"}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while last_success() <= success_before {
        assert!(Instant::now() < deadline, "checkpoints did not resume");
        std::thread::sleep(Duration::from_millis(50));
    }
    let new_file = checkpoints(&s.dir)
        .into_iter()
        .any(|f| f.ends_with(".parquet") && !files_before.contains(&f));
    assert!(new_file, "{:?}", checkpoints(&s.dir));
    assert!(failed_at >= 1.0);
}

#[test]
fn a_corrupt_newest_checkpoint_is_set_aside_and_the_previous_one_plus_wal_is_exact() {
    let cfg = "checkpoint_interval: 200ms\n";
    let s = Spanagg::start(cfg);
    let t0 = now_ns() - 60_000_000_000;
    for k in 0..3 {
        s.post_ok(&delta(0, k, t0));
        std::thread::sleep(Duration::from_millis(300));
    }
    let expected = calls(&s);
    let dir = s.stop_keep();
    let files: Vec<String> = checkpoints(&dir);
    assert!(files.len() >= 2, "{files:?}");
    let newest = dir.join("data/checkpoints").join(files.last().unwrap());
    let len = std::fs::metadata(&newest).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&newest)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let s = Spanagg::start_in(dir, cfg);
    assert_eq!(
        calls(&s),
        expected,
        "previous checkpoint + WAL replay is exact"
    );
    assert_eq!(s.internal("spanagg_checkpoints_set_aside_total"), 1.0);
    assert!(checkpoints(&s.dir).iter().any(|f| f.ends_with(".corrupt")));
}

#[test]
fn inspect_prints_the_footer_and_a_summary() {
    let s = Spanagg::start("");
    let t0 = now_ns() - 60_000_000_000;
    s.post_ok(&delta(0, 0, t0));
    let dir = s.stop_keep();
    let file = checkpoints(&dir).pop().unwrap();
    let path = dir.join("data/checkpoints").join(file);
    let text = common::cli_ok([std::ffi::OsStr::new("inspect"), path.as_ref()]);
    assert!(
        text.lines().any(|l| {
            l.trim_start().starts_with("spanagg.clean_shutdown") && l.ends_with("true")
        }),
        "{text}"
    );
    // One pod, ROUTES routes: the calls family has ROUTES series, each fed by one stream.
    let row: Vec<&str> = text
        .lines()
        .find(|l| l.contains("traces_span_metrics_calls ") && l.contains("service-0"))
        .unwrap_or_else(|| panic!("no calls row: {text}"))
        .split_whitespace()
        .collect();
    assert_eq!(row[2..], [ROUTES.to_string(), ROUTES.to_string()], "{text}");
    assert!(
        text.contains(&format!("total: {} series", 2 * ROUTES)),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);

    let bad = common::cli(["inspect", "/etc/hostname"]);
    assert!(!bad.ok);
    assert!(bad.stderr.contains("spanagg:"));
}

#[test]
fn requests_from_every_transport_and_encoding_are_replayed_after_a_kill() {
    let s = Spanagg::start("");
    let t0 = now_ns() - 60_000_000_000;
    // OTLP/HTTP protobuf (logged Snappy-compressed), gzip (logged as sent), JSON (re-encoded).
    let (status, _, _) = s.post_otlp("application/x-protobuf", &[], &delta(0, 0, t0));
    assert_eq!(status, 200);
    let gz = common::gzip(&delta(0, 1, t0));
    let (status, _, _) = s.post_otlp(
        "application/x-protobuf",
        &[("Content-Encoding", "gzip")],
        &gz,
    );
    assert_eq!(status, 200);
    let start = t0 + 2_000_000;
    let json = serde_json::to_vec(&request(&SHAPE, 0, start, start + 1_000_000)).unwrap();
    let (status, _, _) = s.post_otlp("application/json", &[], &json);
    assert_eq!(status, 200);
    let expected = 3.0 * ONE_DELTA;
    assert_eq!(calls(&s), expected);
    let dir = s.kill9();
    let s = Spanagg::start_in(dir, "");
    assert_eq!(calls(&s), expected, "all three records replayed");
    assert_eq!(s.internal("spanagg_wal_replayed_records_total"), 3.0);
    assert_eq!(
        s.internal("spanagg_points_received_total{protocol=\"wal_replay\"}"),
        3.0 * 2.0 * ROUTES as f64
    );
}

#[test]
fn the_cardinality_report_from_a_checkpoint_file_equals_the_live_one() {
    let s = Spanagg::start("");
    let t0 = now_ns() - 60_000_000_000;
    for pod in 0..3 {
        s.post_ok(&delta(pod, 0, t0));
    }
    // A cumulative stream only baselined (it started before spanagg): tracked, feeds nothing.
    s.post_ok(&cumulative(8, 1_000, t0, 10));
    let (status, live) = s.get("/api/v1/cardinality?top=100");
    assert_eq!(status, 200);
    let dir = s.stop_keep();
    let file = checkpoints(&dir).pop().unwrap();
    let path = dir.join("data/checkpoints").join(file);
    let run = |extra: &[&str]| {
        let args = ["cardinality", "--top", "100", "--file"].map(std::ffi::OsStr::new);
        common::cli_ok(
            args.into_iter()
                .chain([path.as_os_str()])
                .chain(extra.iter().map(std::ffi::OsStr::new)),
        )
    };
    let offline: serde_json::Value = serde_json::from_str(&run(&["--json"])).unwrap();
    let live: serde_json::Value = serde_json::from_str(&live).unwrap();
    assert_eq!(
        offline, live,
        "the CLI on the checkpoint says what the server said"
    );
    assert_eq!(live["totals"]["source_streams"], 3 * 2 * ROUTES as u64);
    assert_eq!(
        live["services"][0]["pods"], 4,
        "three delta pods and the cumulative one"
    );
    assert_eq!(
        live["totals"]["source_streams_tracked"],
        3 * 2 * ROUTES as u64 + ROUTES as u64
    );
    assert!(run(&[]).contains("service-0"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn idle_restarts_never_send_new_records_behind_the_replay_position() {
    // Two clean stops with nothing in between checkpoint the same WAL position and prune the
    // segments before it; what the third run logs must still be replayed after a crash.
    let s = Spanagg::start("");
    let t0 = now_ns() - 60_000_000_000;
    s.post_ok(&delta(0, 0, t0));
    let s = Spanagg::start_in(s.stop_keep(), "");
    let s = Spanagg::start_in(s.stop_keep(), "");
    s.post_ok(&delta(0, 1, t0));
    let s = Spanagg::start_in(s.kill9(), "");
    assert_eq!(calls(&s), 2.0 * ONE_DELTA);
}

#[test]
fn switching_durability_between_runs_neither_loses_nor_doubles() {
    let t0 = now_ns() - 60_000_000_000;
    // wal → none: the WAL of the first run is dropped, the clean checkpoint is exact.
    let s = Spanagg::start("");
    s.post_ok(&delta(0, 0, t0));
    let s = Spanagg::start_in(s.stop_keep(), "durability: none\n");
    assert_eq!(calls(&s), ONE_DELTA);
    // none → wal: what the wal run logs after the none run's clean checkpoint is replayed.
    let s = Spanagg::start_in(s.stop_keep(), "");
    s.post_ok(&delta(0, 1, t0));
    let s = Spanagg::start_in(s.kill9(), "");
    assert_eq!(calls(&s), 2.0 * ONE_DELTA);
}

#[test]
fn with_no_exactly_restorable_checkpoint_the_state_starts_from_zero_for_good() {
    let cfg = "checkpoint_interval: 200ms\n";
    let s = Spanagg::start(cfg);
    let t0 = now_ns() - 60_000_000_000;
    for k in 0..4 {
        s.post_ok(&delta(0, k, t0));
        std::thread::sleep(Duration::from_millis(250));
    }
    let dir = s.stop_keep();
    let files = checkpoints(&dir);
    assert!(files.len() >= 3, "{files:?}");
    // The two newest are unreadable: the oldest one is stale (the WAL after it is gone).
    for f in &files[files.len() - 2..] {
        std::fs::write(dir.join("data/checkpoints").join(f), b"garbage").unwrap();
    }
    let s = Spanagg::start_in(dir, cfg);
    assert_eq!(calls(&s), 0.0, "a reset, never a stale value");
    assert_eq!(s.internal("spanagg_checkpoints_set_aside_total"), 2.0);
    assert!(checkpoints(&s.dir).iter().any(|f| f.ends_with(".stale")));
    s.post_ok(&delta(0, 10, t0));
    let s = Spanagg::start_in(s.kill9(), cfg);
    assert_eq!(calls(&s), ONE_DELTA, "the stale checkpoint stays out");
}

#[test]
fn a_second_spanagg_on_the_same_data_dir_is_refused() {
    let s = Spanagg::start("");
    let data = s.dir.join("data");
    let out = common::cli([
        "--grpc-listen",
        "127.0.0.1:0",
        "--otlp-http-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(!out.ok);
    let err = out.stderr;
    assert!(err.contains("in use by another spanagg"), "{err}");
    assert_eq!(s.get("/-/ready").0, 200, "the first one is unharmed");
}

#[test]
fn health_answers_while_a_long_wal_is_replayed_and_readiness_waits() {
    let s = Spanagg::start("");
    let t0 = now_ns() - 60_000_000_000;
    let wide = common::one_service(20_000, 4, true);
    for k in 0..10u64 {
        let start = t0 + k * 1_000_000;
        s.post_ok(&request(&wide, 0, start, start + 1_000_000).encode_to_vec());
    }
    let expected = calls(&s);
    let mut seen = None;
    let s = Spanagg::start_in_restoring(s.kill9(), "", |http| {
        let get = |path: &str| common::http(http, "GET", path, &[], &[]).0;
        seen = Some((get("/-/healthy"), get("/-/ready"), get("/metrics")));
    });
    let (healthy, ready, metrics) = seen.expect("the restoring line names the HTTP address");
    assert_eq!(healthy, 200, "alive while restoring");
    assert_eq!(ready, 503, "not ready until the state is back");
    assert_eq!(metrics, 503, "no partial scrape while restoring");
    assert_eq!(calls(&s), expected);
    assert_eq!(s.get("/-/ready").0, 200);
}

#[test]
fn a_sigterm_during_start_up_still_stops_cleanly_with_a_final_checkpoint() {
    use std::io::BufRead;
    let s = Spanagg::start("");
    let t0 = now_ns() - 60_000_000_000;
    // A WAL long enough that the replay is still running when the signal comes.
    let wide = common::one_service(20_000, 4, true);
    for k in 0..10u64 {
        let start = t0 + k * 1_000_000;
        s.post_ok(&request(&wide, 0, start, start + 1_000_000).encode_to_vec());
    }
    let expected = calls(&s);
    let dir = s.kill9();
    // Signal the process while it restores (before it serves), as an impatient operator or a
    // rolling update would.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_spanagg"))
        .arg("serve")
        .arg("--config")
        .arg(dir.join("spanagg.yaml"))
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        stderr
            .lines()
            .map_while(Result::ok)
            .try_for_each(|l| tx.send(l))
    });
    let mut log = Vec::new();
    let mut signalled_at = None;
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(60)) {
        let restoring = line.contains("restoring state");
        log.push(line);
        if restoring {
            signalled_at = Some(log.len());
            std::process::Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .unwrap();
        }
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}: {log:#?}");
    let signalled_at = signalled_at.expect("never saw the restore begin");
    let replayed = log
        .iter()
        .position(|l| l.contains("replayed the write-ahead log"));
    assert!(
        replayed.is_some_and(|at| at >= signalled_at),
        "the signal came after the replay, not during it: {log:#?}"
    );
    assert!(
        log.iter().any(|l| l.contains("checkpoint written")),
        "{log:#?}"
    );
    let s = Spanagg::start_in(dir, "");
    assert_eq!(calls(&s), expected);
}
