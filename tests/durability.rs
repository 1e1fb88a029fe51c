//! Whatever was applied is logged, whatever the reply: with the WAL failing, a request that was
//! applied (and may have been scraped) is logged as soon as the log takes writes again, before
//! anything new is applied; while it cannot, nothing new is applied. After `kill -9` the
//! restart serves exactly what was served, `_created` included. An export is acknowledged only
//! once its record is synced (a preloaded shim fails fsync below the page cache). Without a
//! WAL, a clean stop's checkpoint is restored once, never again after a later crash.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use prost::Message;

const SECOND: u64 = 1_000_000_000;

fn body(pod: &str, calls: u64, t: u64) -> Vec<u8> {
    cart_delta(pod, calls, [calls, 0, 0, 0, 0], calls as f64, t).encode_to_vec()
}

/// Makes WAL segments `from..to` files every write to fails, as on a full disk.
fn full_disk(s: &Spanagg, segments: std::ops::Range<u64>) -> Vec<std::path::PathBuf> {
    segments
        .map(|n| {
            let p = s.dir.join(format!("data/wal/{n:020}.wal"));
            std::os::unix::fs::symlink("/dev/full", &p).unwrap();
            p
        })
        .collect()
}

#[test]
fn an_applied_request_whose_append_failed_is_logged_before_the_next_one() {
    let s = Spanagg::start("");
    let full = full_disk(&s, 1..2);
    let t = now_ns() - 60 * SECOND;
    // Applied (a scrape shows it), not logged: a retryable refusal.
    assert_eq!(s.post_protobuf(&body("a", 7, t)), 503);
    assert!(s.scrape().contains("} 7\n"), "served before it is durable");
    // The next export first logs the held one (on a new segment), then its own.
    s.post_ok(&body("b", 5, t));
    let served = s.openmetrics();
    full.iter().for_each(|p| std::fs::remove_file(p).unwrap());
    let dir = s.kill9();
    let s = Spanagg::start_in(dir, "");
    assert_eq!(
        s.openmetrics(),
        served,
        "the restart serves what was served"
    );
}

#[test]
fn while_the_log_fails_nothing_new_is_applied() {
    let s = Spanagg::start("");
    let full = full_disk(&s, 1..6);
    let t = now_ns() - 60 * SECOND;
    assert_eq!(s.post_protobuf(&body("a", 7, t)), 503);
    let with_a = s.scrape();
    // Refused before it is applied: the scrape does not move.
    assert_eq!(s.post_protobuf(&body("b", 5, t)), 503);
    assert_eq!(
        s.scrape(),
        with_a,
        "a request refused for the log is not applied"
    );
    full.iter().for_each(|p| std::fs::remove_file(p).unwrap());
    // The log takes writes again: a's held record, then c.
    let mut ok = false;
    for _ in 0..5 {
        if s.post_protobuf(&body("c", 3, t)) == 200 {
            ok = true;
            break;
        }
    }
    assert!(ok, "exports resume once the log takes writes");
    let served = s.openmetrics();
    assert!(served.contains("} 10\n"), "a and c, not b: {served}");
    let dir = s.kill9();
    let s = Spanagg::start_in(dir, "");
    assert_eq!(s.openmetrics(), served);
}

#[test]
fn a_restart_later_than_series_ttl_rebuilds_the_state_at_the_crash() {
    let s = Spanagg::start("series_ttl: 2s\n");
    let t = now_ns() - SECOND;
    let tenth = |i: u64| {
        spanmetrics(
            "checkout",
            "a",
            &[route("GET /cart", 10, [10, 0, 0, 0, 0], 10.0)],
            t + i * SECOND / 10,
            t + (i + 1) * SECOND / 10,
            opentelemetry_proto::tonic::metrics::v1::AggregationTemporality::Delta,
        )
        .encode_to_vec()
    };
    for i in 0..10 {
        s.post_ok(&tenth(i));
        // A retry of each delta: a duplicate, logged too.
        s.post_ok(&tenth(i));
    }
    let served = s.scrape();
    assert!(served.contains("} 100\n"), "{served}");
    let dir = s.kill9();
    // Down for longer than series_ttl: replay must judge each record by when it was accepted.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let s = Spanagg::start_in(dir, "series_ttl: 2s\n");
    assert_eq!(
        s.scrape(),
        served,
        "the state at the crash, not an empty one"
    );
    assert_eq!(
        s.internal("spanagg_points_total{outcome=\"too_late\"}"),
        0.0
    );
    // Then expiry runs, to whole series: nothing came since, so they go.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while s.scrape().contains("traces_span_metrics_calls_total{") {
        assert!(
            std::time::Instant::now() < deadline,
            "the series never expired"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn a_damaged_record_mid_log_costs_that_record_only_and_is_counted() {
    let s = Spanagg::start("");
    let t = now_ns() - 60 * SECOND;
    for (i, calls) in [(0, 1u64), (1, 20), (2, 300)] {
        s.post_ok(&body("a", calls, t + i * SECOND));
    }
    let dir = s.kill9();
    // Flip one byte inside the second record's payload.
    let wal = dir.join("data/wal");
    let (_, seg) = std::fs::read_dir(&wal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .map(|p| (std::fs::metadata(&p).unwrap().len(), p))
        .max()
        .unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let mut off = 20; // the segment header
    let mut starts = Vec::new();
    while off + 10 <= bytes.len() {
        starts.push(off);
        let len = u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
        off += 10 + len;
    }
    assert_eq!(starts.len(), 3, "three records");
    bytes[starts[1] + 30] ^= 0x20;
    std::fs::write(&seg, &bytes).unwrap();
    let s = Spanagg::start_in(dir, "");
    assert!(
        s.scrape().contains("} 301\n"),
        "records 1 and 3 replayed: {}",
        s.scrape()
    );
    assert_eq!(s.internal("spanagg_wal_corrupt_records_total"), 1.0);
    assert!(seg.with_extension("wal.corrupt").exists());
}

/// The calls total and its `_created` for checkout's `GET /cart`, if served.
fn cart_calls(s: &Spanagg) -> Option<(f64, f64)> {
    let text = s.openmetrics();
    let value = |suffix: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("traces_span_metrics_calls_{suffix}{{")))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    Some((value("total")?, value("created")?))
}

#[test]
fn without_a_wal_a_clean_checkpoint_is_restored_once_and_not_after_a_later_crash() {
    let cfg = "durability: none\n";
    let s = Spanagg::start(cfg);
    let t = now_ns() - 60 * SECOND;
    s.post_ok(&body("a", 10, t));
    let (_, created) = cart_calls(&s).unwrap();
    let s = Spanagg::start_in(s.stop_keep(), cfg);
    assert_eq!(
        cart_calls(&s),
        Some((10.0, created)),
        "the clean stop restored"
    );
    s.post_ok(&body("a", 5, t + SECOND));
    assert_eq!(cart_calls(&s), Some((15.0, created)));
    // A crash before any newer clean checkpoint: 10 under the same `_created` would be a
    // counter going down without a reset; the state starts over instead.
    let s = Spanagg::start_in(s.kill9(), cfg);
    assert_eq!(
        cart_calls(&s),
        None,
        "a stale checkpoint restored a second time"
    );
    s.post_ok(&body("a", 1, t + 2 * SECOND));
    let (calls, again) = cart_calls(&s).unwrap();
    assert_eq!(calls, 1.0);
    assert!(
        again > created,
        "a new created time: {again} after {created}"
    );
    // A clean stop now is restored as usual.
    let s = Spanagg::start_in(s.stop_keep(), cfg);
    assert_eq!(cart_calls(&s), Some((1.0, again)));
    s.stop();
}

#[test]
fn an_export_is_acknowledged_only_once_its_record_is_synced() {
    let scratch = Scratch::new();
    let so = faults_shim(scratch.path());
    let flag = scratch.path().join("fail-fsync");
    let state = scratch.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let s = Spanagg::start_in_with_env(
        state,
        "",
        &[
            ("LD_PRELOAD", so.to_str().unwrap()),
            ("SPANAGG_FAIL_FSYNC", flag.to_str().unwrap()),
        ],
    );
    let t = now_ns() - 60 * SECOND;
    s.post_ok(&body("a", 7, t));
    // The disk now loses what it is asked to sync: the write reaches the page cache, the
    // sync fails, and the export must not be acknowledged.
    std::fs::write(&flag, b"").unwrap();
    assert_eq!(
        s.post_protobuf(&body("b", 5, t)),
        503,
        "acknowledged without a synced record"
    );
    assert!(s.internal("spanagg_wal_write_errors_total") >= 1.0);
    std::fs::remove_file(&flag).unwrap();
    // Once syncs work again the exporter's retry is acknowledged, and counts once.
    let acked = (0..10).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        s.post_protobuf(&body("b", 5, t)) == 200
    });
    assert!(acked, "exports resume once syncs work");
    let served = s.openmetrics();
    assert!(served.contains("_total{service_name=\"checkout\",span_kind=\"SPAN_KIND_SERVER\",span_name=\"GET /cart\",status_code=\"STATUS_CODE_UNSET\"} 12\n"), "{served}");
    let s = Spanagg::start_in(s.kill9(), "");
    assert_eq!(
        s.openmetrics(),
        served,
        "the restart serves what was served"
    );
    s.stop();
}

#[test]
fn without_a_wal_a_failed_start_keeps_the_clean_checkpoint_and_older_ones_never_come_back() {
    let t = now_ns() - 60 * SECOND;
    // Two clean stops with the WAL: two clean checkpoints, 10 and then 15.
    let s = Spanagg::start("");
    s.post_ok(&body("a", 10, t));
    let s = Spanagg::start_in(s.stop_keep(), "");
    s.post_ok(&body("a", 5, t + SECOND));
    let dir = s.stop_keep();
    // Switched to `durability: none`, a start that fails before serving (its gRPC port is
    // taken) must not use up the clean checkpoint.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std::fs::write(
        dir.join("spanagg.yaml"),
        format!(
            "grpc_listen: 127.0.0.1:0\notlp_http_listen: 127.0.0.1:0\nhttp_listen: \
             127.0.0.1:0\ndata_dir: {}\ndurability: none\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    let failed = std::process::Command::new(env!("CARGO_BIN_EXE_spanagg"))
        .args(["serve", "--config"])
        .arg(dir.join("spanagg.yaml"))
        .args(["--grpc-listen", &taken.local_addr().unwrap().to_string()])
        .output()
        .unwrap();
    assert!(!failed.status.success());
    drop(taken);
    let s = Spanagg::start_in(dir, "durability: none\n");
    assert_eq!(
        cart_calls(&s).map(|c| c.0),
        Some(15.0),
        "restored after the failed start"
    );
    s.post_ok(&body("a", 1, t + 2 * SECOND));
    // A crash: neither the restored checkpoint (15) nor the older clean one (10) comes back.
    let s = Spanagg::start_in(s.kill9(), "durability: none\n");
    assert_eq!(
        cart_calls(&s),
        None,
        "an older clean checkpoint restored after a crash"
    );
    s.stop();
}

#[test]
fn logged_requests_replay_after_max_request_bytes_is_lowered() {
    let s = Spanagg::start("");
    let wide = one_service(400, 4, true);
    let t = now_ns() - 60 * SECOND;
    let big = spanagg::workload::request(&wide, 0, t, t + SECOND).encode_to_vec();
    assert!(big.len() > 64 << 10, "{} bytes", big.len());
    s.post_ok(&big);
    let served = s.openmetrics();
    // Acknowledged under the old limit, logged (snappy): a lower limit must not drop it.
    let s = Spanagg::start_in(s.kill9(), "max_request_bytes: 16KiB\n");
    assert!(
        s.openmetrics() == served,
        "the logged request was not replayed"
    );
    s.stop();
}
