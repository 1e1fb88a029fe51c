//! Connection limits on the real binary, as a slow or greedy client meets them: headers sent a
//! byte at a time are cut off `connections.header_timeout` after their first byte on both HTTP
//! ports, keep-alive connections without a request after `connections.idle_timeout` (and not
//! before), a slow OTLP/HTTP body gets a retryable 503 after `connections.body_timeout`, a
//! connection over `connections.max_per_listener` is closed at once, and gRPC advertises its
//! HTTP/2 stream limit and refuses streams over it. Meanwhile a well-behaved exporter's
//! requests go through. Each limit is counted when it acts.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{cart_delta, now_ns, Spanagg};
use prost::Message;

/// Whether the server closed `s` within `within` (a read returns end of stream or an error).
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return start.elapsed() <= within,
        }
    }
}

/// How often a limit cut `listener`'s connections off for `what`.
fn timeouts(s: &Spanagg, listener: &str, what: &str) -> f64 {
    s.internal(&format!(
        "spanagg_connection_timeouts_total{{listener=\"{listener}\",what=\"{what}\"}}"
    ))
}

fn export_ok(s: &Spanagg, pod: &str) {
    let body = cart_delta(pod, 1, [1, 0, 0, 0, 0], 1.0, now_ns() - 5_000_000_000).encode_to_vec();
    assert_eq!(s.post_protobuf(&body), 200);
}

#[test]
fn slow_headers_slow_bodies_and_idle_connections_are_cut_off_while_exports_go_on() {
    let s = Spanagg::start(
        "connections:\n  header_timeout: 1s\n  idle_timeout: 3s\n  body_timeout: 1s\n",
    );
    // Slow headers on both HTTP ports: one line, then nothing.
    let mut slow: Vec<TcpStream> = [s.http, s.otlp_http]
        .iter()
        .map(|a| {
            let mut c = TcpStream::connect(a).unwrap();
            c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            c
        })
        .collect();
    // A well-behaved exporter meanwhile.
    export_ok(&s, "pod-a");
    for c in &mut slow {
        assert!(
            closed_within(c, Duration::from_secs(5)),
            "slow headers not cut off"
        );
    }
    assert!(timeouts(&s, "http", "header") >= 1.0);
    assert!(timeouts(&s, "otlp_http", "header") >= 1.0);

    // A slow body: its headers promise 1000 bytes, 10 come.
    let mut c = TcpStream::connect(s.otlp_http).unwrap();
    c.write_all(
        b"POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n\
          Content-Length: 1000\r\n\r\n0123456789",
    )
    .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reply = Vec::new();
    let _ = c.read_to_end(&mut reply);
    assert!(
        String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 503"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    assert_eq!(timeouts(&s, "otlp_http", "body"), 1.0);

    // A keep-alive connection may wait longer than the header limit between requests...
    let mut c = TcpStream::connect(s.http).unwrap();
    let healthy = b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n";
    for _ in 0..2 {
        c.write_all(healthy).unwrap();
        let mut reply = [0u8; 12];
        c.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"HTTP/1.1 200");
        assert!(!closed_within(&mut c, Duration::from_millis(1500)));
    }
    // ...and is closed once idle for the idle limit, counted as idle.
    let idle_before = timeouts(&s, "http", "idle");
    assert!(
        closed_within(&mut c, Duration::from_secs(5)),
        "an idle connection stays open"
    );
    assert_eq!(timeouts(&s, "http", "idle"), idle_before + 1.0);

    // A head begun after a long idle still gets its whole header time...
    let mut c = TcpStream::connect(s.http).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    for b in healthy {
        c.write_all(&[*b]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut reply = [0u8; 12];
    c.read_exact(&mut reply).unwrap();
    assert_eq!(
        &reply, b"HTTP/1.1 200",
        "a head sent within its time after an idle wait"
    );
    // ...and a request followed by a stray CRLF (RFC 9112 §2.2) keeps its connection for the
    // idle limit, not the header limit.
    let mut c = TcpStream::connect(s.http).unwrap();
    c.write_all(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n\r\n")
        .unwrap();
    c.read_exact(&mut reply).unwrap();
    assert!(!closed_within(&mut c, Duration::from_millis(1500)));
    c.write_all(healthy).unwrap();
    let mut rest = Vec::new();
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&rest).contains("HTTP/1.1 200") {
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0, "closed before the second request");
        rest.extend_from_slice(&buf[..n]);
    }

    // Idle time does not lend a slow head more time: its clock starts at its first byte.
    let mut c = TcpStream::connect(s.otlp_http).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let header_before = timeouts(&s, "otlp_http", "header");
    let started = Instant::now();
    for b in b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n" {
        if c.write_all(&[*b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(closed_within(&mut c, Duration::from_secs(3)));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(timeouts(&s, "otlp_http", "header"), header_before + 1.0);
    export_ok(&s, "pod-b");
    s.stop();
}

#[test]
fn a_listener_holds_at_most_its_connections() {
    let s = Spanagg::start("connections:\n  max_per_listener: 3\n  header_timeout: 30s\n");
    // Four connections: whichever comes when three are held is closed at once (the start's
    // probe may still hold a slot for a moment, so which one is not fixed).
    let mut conns: Vec<TcpStream> = (0..4)
        .map(|_| {
            let c = TcpStream::connect(s.http).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            c
        })
        .collect();
    let mut closed = 0;
    for c in &mut conns {
        closed += usize::from(closed_within(c, Duration::from_secs(2)));
    }
    assert_eq!(closed, 1, "three held, one refused");
    drop(conns);
    std::thread::sleep(Duration::from_millis(300));
    // Slots come back when connections close.
    assert!(s.internal("spanagg_connections_refused_total{listener=\"http\"}") >= 1.0);
    s.stop();
}

/// The parameters of the server's first HTTP/2 SETTINGS frame.
fn h2_settings(addr: SocketAddr) -> Vec<(u16, u32)> {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    c.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).unwrap(); // an empty SETTINGS frame
    loop {
        let mut head = [0u8; 9];
        c.read_exact(&mut head).unwrap();
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let mut payload = vec![0u8; len];
        c.read_exact(&mut payload).unwrap();
        if head[3] == 4 && head[4] & 1 == 0 {
            return payload
                .chunks_exact(6)
                .map(|p| {
                    (
                        u16::from_be_bytes([p[0], p[1]]),
                        u32::from_be_bytes([p[2], p[3], p[4], p[5]]),
                    )
                })
                .collect();
        }
    }
}

#[test]
fn grpc_advertises_its_stream_and_header_limits() {
    let s = Spanagg::start(
        "connections:\n  http2_max_concurrent_streams: 7\n  http2_max_header_list_size: 8KiB\n",
    );
    let settings = h2_settings(s.grpc);
    assert!(
        settings.contains(&(0x3, 7)),
        "SETTINGS_MAX_CONCURRENT_STREAMS: {settings:?}"
    );
    assert!(
        settings.contains(&(0x6, 8192)),
        "SETTINGS_MAX_HEADER_LIST_SIZE: {settings:?}"
    );
    s.stop();
}

/// Writes one HTTP/2 frame.
fn h2_frame(c: &mut TcpStream, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = (payload.len() as u32).to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    c.write_all(&f).unwrap();
}

/// An HTTP/2 connection past its preface and first SETTINGS.
fn h2_open(addr: SocketAddr) -> TcpStream {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    h2_frame(&mut c, 4, 0, 0, &[]);
    c
}

/// Opens export call `stream` (HPACK: POST, http, `:path`, `content-type`, then `extra` as
/// literal headers) without sending its body.
fn h2_export(c: &mut TcpStream, stream: u32, extra: &[(&str, &str)]) {
    let path = b"/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";
    let mut headers = vec![0x83, 0x86, 0x04, path.len() as u8];
    headers.extend_from_slice(path);
    headers.extend_from_slice(&[0x0f, 0x10, 16]);
    headers.extend_from_slice(b"application/grpc");
    for (name, value) in extra {
        // Literal without indexing, new name; lengths as HPACK 7-bit prefixed integers.
        headers.push(0);
        for text in [name.as_bytes(), value.as_bytes()] {
            let mut n = text.len();
            if n < 127 {
                headers.push(n as u8);
            } else {
                headers.push(127);
                n -= 127;
                while n >= 128 {
                    headers.push((n % 128) as u8 | 0x80);
                    n /= 128;
                }
                headers.push(n as u8);
            }
            headers.extend_from_slice(text);
        }
    }
    h2_frame(c, 1, 0x4, stream, &headers);
}

/// Reads frames (acknowledging SETTINGS) until `n` streams were reset; their ids and codes.
fn h2_resets(c: &mut TcpStream, n: usize) -> Vec<(u32, u32)> {
    let mut resets = Vec::new();
    while resets.len() < n {
        let mut head = [0u8; 9];
        c.read_exact(&mut head).unwrap();
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let mut payload = vec![0u8; len];
        c.read_exact(&mut payload).unwrap();
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        match head[3] {
            4 if head[4] & 1 == 0 => h2_frame(c, 4, 1, 0, &[]),
            3 => resets.push((stream, u32::from_be_bytes(payload[..4].try_into().unwrap()))),
            7 => panic!("GOAWAY instead of refusing streams: {payload:?}"),
            _ => {}
        }
    }
    resets.sort();
    resets
}

#[test]
fn grpc_refuses_streams_over_its_limits_counts_them_and_serves_the_rest() {
    let s = Spanagg::start(
        "connections:\n  http2_max_concurrent_streams: 3\n  http2_max_header_list_size: 1KiB\n",
    );
    // Eight export calls opened at once, none sending its body: a client ignoring the
    // advertised limit has the last five refused (REFUSED_STREAM, 7), the first three kept.
    let mut c = h2_open(s.grpc);
    for i in 0..8u32 {
        h2_export(&mut c, 2 * i + 1, &[]);
    }
    let refused: Vec<(u32, u32)> = [7, 9, 11, 13, 15].map(|id| (id, 7)).into();
    assert_eq!(h2_resets(&mut c, 5), refused);
    // Counted as the resets are written: the count may trail what the client read.
    assert_eq!(
        s.internal_reaching(
            "spanagg_http2_stream_resets_total{code=\"refused_stream\"}",
            5.0
        ),
        5.0
    );
    // A header list over its limit is answered 431 and reset (PROTOCOL_ERROR, 1).
    let mut big = h2_open(s.grpc);
    h2_export(&mut big, 1, &[("x-padding", &"p".repeat(2048))]);
    assert_eq!(h2_resets(&mut big, 1), [(1, 1)]);
    assert_eq!(
        s.internal_reaching(
            "spanagg_http2_stream_resets_total{code=\"protocol_error\"}",
            1.0
        ),
        1.0
    );
    // Meanwhile a well-behaved exporter goes on.
    export_ok(&s, "pod-a");
    drop((c, big));
    s.stop();
}

#[test]
fn limits_outside_their_range_stop_the_start() {
    for (yaml, key) in [
        (
            "connections:\n  header_timeout: 1ms\n",
            "connections.header_timeout",
        ),
        (
            "connections:\n  max_per_listener: 0\n",
            "connections.max_per_listener",
        ),
        (
            "connections:\n  http2_max_concurrent_streams: 0\n",
            "connections.http2_max_concurrent_streams",
        ),
    ] {
        let err = common::serve_refuses(yaml);
        assert!(err.contains(key), "{yaml}: {err}");
    }
}

#[test]
fn a_client_that_never_lets_go_cannot_hold_the_stop() {
    let s = Spanagg::start("connections:\n  drain_timeout: 1s\n");
    // An HTTP/2 connection on the gRPC port that never reads again (no GOAWAY answer), and an
    // HTTP/1.1 request on the scrape port left half sent.
    let mut h2 = TcpStream::connect(s.grpc).unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .unwrap();
    let mut h1 = TcpStream::connect(s.http).unwrap();
    h1.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let status = s.stop();
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the stop waited {:?}",
        started.elapsed()
    );
    drop((h1, h2));
}

#[test]
fn a_client_that_stops_reading_or_says_nothing_loses_its_connection() {
    let s = Spanagg::start(
        "connections:\n  write_timeout: 1s\n  grpc_keepalive_interval: 300ms\n  \
         grpc_keepalive_timeout: 300ms\n  grpc_idle_timeout: 1s\n",
    );
    // Pipelined requests whose answers are never read: the server's writes stall, then fail.
    let c = TcpStream::connect(s.http).unwrap();
    let mut writer = c.try_clone().unwrap();
    writer
        .set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let flood = std::thread::spawn(move || {
        let req = b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n".repeat(1000);
        let started = Instant::now();
        // Writes stall once both sides' buffers are full (a timeout here, tried again); they
        // fail for good once the server gave up on the connection.
        while started.elapsed() < Duration::from_secs(30) {
            match writer.write(&req) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return true,
            }
        }
        false
    });
    assert!(
        flood.join().unwrap(),
        "a client that never reads kept its connection"
    );
    let _ = c.shutdown(std::net::Shutdown::Both);
    assert!(timeouts(&s, "http", "write") >= 1.0);

    // A TCP connection to the gRPC port that never sends its HTTP/2 preface.
    let mut silent = TcpStream::connect(s.grpc).unwrap();
    assert!(
        closed_within(&mut silent, Duration::from_secs(5)),
        "a silent gRPC connection stays"
    );
    assert!(timeouts(&s, "grpc", "idle") >= 1.0);

    // An honest gRPC client idle for longer than the idle limit answers the pings and exports.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
        let mut client = MetricsServiceClient::connect(format!("http://{}", s.grpc))
            .await
            .unwrap();
        let req = || cart_delta("pod-g", 1, [1, 0, 0, 0, 0], 1.0, now_ns() - 5_000_000_000);
        client.export(req()).await.unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mut later = req();
        later.resource_metrics[0].scope_metrics[0].metrics[0].name = "other".into();
        client.export(later).await.unwrap();
    });
    drop(rt);
    s.stop();
}
