//! The command lines as a new user meets them: help that works however it is asked for, errors
//! that say their cause once, and a load generator that finds spanagg's default ports.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Output};

fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const SPANAGG: &str = env!("CARGO_BIN_EXE_spanagg");
const LOADGEN: &str = env!("CARGO_BIN_EXE_spanagg-loadgen");

#[test]
fn help_is_printed_however_it_is_asked_for() {
    for args in [
        &["--help"][..],
        &["help"],
        &["help", "--help"],
        &["help", "-h"],
    ] {
        let out = run(SPANAGG, args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage: spanagg"),
            "{args:?}"
        );
    }
    let out = run(SPANAGG, &["help", "inspect", "--help"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Usage: spanagg inspect"));
}

/// No cause appears twice in one error line (`a: x: x`).
fn assert_said_once(line: &str) {
    let parts: Vec<&str> = line.trim().split(": ").collect();
    for (i, p) in parts.iter().enumerate().skip(1) {
        assert!(!parts[..i].contains(p), "`{p}` said twice in: {line}");
    }
}

#[test]
fn errors_say_their_cause_once() {
    let scratch = common::Scratch::new();
    let dir = scratch.path();
    let bad_config = dir.join("bad.yaml");
    std::fs::write(&bad_config, "grpc_listen: 1.2.3.4:99999\n").unwrap();
    let not_parquet = dir.join("x.parquet");
    std::fs::write(&not_parquet, "not parquet").unwrap();
    let cases: [&[&str]; 3] = [
        &["inspect", "/nonexistent/checkpoint.parquet"],
        &["inspect", not_parquet.to_str().unwrap()],
        &["serve", "--config", bad_config.to_str().unwrap()],
    ];
    for args in cases {
        let out = run(SPANAGG, args);
        assert!(!out.status.success(), "{args:?}");
        let err = stderr(&out);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert_said_once(&err);
    }
    assert!(stderr(&run(SPANAGG, cases[2])).contains("`grpc_listen`: invalid socket address"));
}

#[test]
fn the_load_generator_uses_the_port_of_its_protocol_and_says_why_requests_fail() {
    // One pod, one interval: the smallest run.
    let loadgen = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--pods", "1", "--intervals", "1"]);
        run(LOADGEN, &all)
    };
    // Nothing listens on port 1: both protocols fail, each saying where and why.
    let out = loadgen(&["--protocol", "grpc"]);
    assert!(
        stderr(&out).contains("for http://127.0.0.1:4317…"),
        "the gRPC default is spanagg's gRPC port: {}",
        stderr(&out)
    );
    let err = stderr(&loadgen(&["--endpoint", "http://127.0.0.1:1"]));
    assert!(
        err.contains("first error (of 1): http://127.0.0.1:1/v1/metrics:")
            && err.contains("onnection refused"),
        "{err}"
    );
    let out = loadgen(&["--protocol", "grpc", "--endpoint", "http://127.0.0.1:1"]);
    let err = stderr(&out);
    assert!(
        err.contains("cannot connect to http://127.0.0.1:1") && err.contains("onnection refused"),
        "{err}"
    );
    assert!(!out.status.success());
    let said: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("encoding "))
        .collect();
    assert_eq!(said.len(), 1, "one line, no backtrace: {err}");
}
