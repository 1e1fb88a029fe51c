//! Every request compression the Collector's exporters offer, through the binary: gzip, zstd,
//! Snappy (block and framed) and deflate on OTLP/HTTP; gzip, zstd and Snappy on OTLP/gRPC. Each
//! export is applied exactly once, logged in the WAL as it came or re-encoded, and replayed
//! exactly after `kill -9`; a bomb in each new encoding is refused at the limit on both
//! protocols and counted, and a corrupt body is the client's error, not a retry.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;

use common::*;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use prost::Message;
use tonic::codec::CompressionEncoding;

const SECOND: u64 = 1_000_000_000;
const CALLS: &str = "traces_span_metrics_calls_total{service_name=\"checkout\",span_kind=\"SPAN_KIND_SERVER\",span_name=\"GET /cart\",status_code=\"STATUS_CODE_UNSET\"}";

fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(data, 3).unwrap()
}

fn snappy_framed(data: &[u8]) -> Vec<u8> {
    let mut e = snap::write::FrameEncoder::new(Vec::new());
    e.write_all(data).unwrap();
    e.into_inner().unwrap()
}

fn snappy_block(data: &[u8]) -> Vec<u8> {
    snap::raw::Encoder::new().compress_vec(data).unwrap()
}

fn deflate(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Pod `pod`'s delta of `calls` for checkout's `GET /cart`.
fn delta(pod: &str, calls: u64) -> ExportMetricsServiceRequest {
    cart_delta(pod, calls, [calls, 0, 0, 0, 0], 1.0, now_ns() - 10 * SECOND)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_encoding_is_applied_once_and_replayed_from_the_wal() {
    let s = Spanagg::start("");
    type Compress = fn(&[u8]) -> Vec<u8>;
    let http: [(&str, Compress); 6] = [
        ("gzip", gzip),
        ("zstd", zstd),
        ("snappy", snappy_block),
        ("snappy", snappy_framed),
        ("x-snappy-framed", snappy_framed),
        ("deflate", deflate),
    ];
    let mut expected = 0;
    for (i, (encoding, compress)) in http.iter().enumerate() {
        let calls = i as u64 + 1;
        let body = compress(&delta(&format!("http-{i}"), calls).encode_to_vec());
        let (status, _, reply) = s.post_otlp(
            "application/x-protobuf",
            &[("Content-Encoding", encoding)],
            &body,
        );
        assert_eq!(
            status,
            200,
            "{encoding}: {}",
            String::from_utf8_lossy(&reply)
        );
        assert_eq!(export_response(&reply).partial_success, None, "{encoding}");
        expected += calls;
    }
    for (i, encoding) in [CompressionEncoding::Gzip, CompressionEncoding::Zstd]
        .into_iter()
        .enumerate()
    {
        let calls = 10 + i as u64;
        let mut client = MetricsServiceClient::connect(format!("http://{}", s.grpc))
            .await
            .unwrap()
            .send_compressed(encoding);
        let reply = client
            .export(delta(&format!("grpc-{i}"), calls))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.partial_success, None, "{encoding:?}");
        expected += calls;
    }
    // Snappy, framed, as the Collector's gRPC exporter sends it (tonic has no client for it).
    let body = snappy_framed(&delta("grpc-snappy", 20).encode_to_vec());
    let (status, headers, _) = raw_grpc(&s, Some("snappy"), body).await;
    assert_eq!(
        (status, grpc_status(&headers)),
        (200, Some(0)),
        "{headers:?}"
    );
    expected += 20;
    // A message sent uncompressed under `grpc-encoding: snappy` (its flag says so) is read as it is.
    let body = delta("grpc-snappy-plain", 30).encode_to_vec();
    let (_, headers, _) = raw_grpc_flagged(&s, Some("snappy"), false, body).await;
    assert_eq!(grpc_status(&headers), Some(0), "{headers:?}");
    expected += 30;

    let served = s.scrape();
    assert_eq!(
        sample_value(&served, CALLS),
        Some(expected as f64),
        "{served}"
    );
    // Nothing but the WAL holds them: no checkpoint was written yet.
    let s = Spanagg::start_in(s.kill9(), "");
    assert_eq!(s.scrape(), served, "every encoding replayed from the log");
    assert_eq!(
        s.internal("spanagg_wal_replayed_records_total"),
        (http.len() + 4) as f64
    );
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bombs_and_corrupt_bodies_in_every_new_encoding_are_refused_and_counted() {
    let s = Spanagg::start("max_request_bytes: 4MiB\n");
    let zeros = vec![0u8; 64 << 20];
    let rss_before = s.peak_rss();
    let http: [(&str, Vec<u8>); 2] = [("zstd", zstd(&zeros)), ("snappy", snappy_framed(&zeros))];
    for (encoding, bomb) in &http {
        assert!(bomb.len() < 4 << 20, "{encoding} bomb fits the limit");
        let (status, _, _) = s.post_otlp(
            "application/x-protobuf",
            &[("Content-Encoding", encoding)],
            bomb,
        );
        assert_eq!(status, 413, "{encoding}");
    }
    // A block that claims 4 GiB: refused from its length field.
    let lying = b"\xff\xff\xff\xff\x0f\x00".to_vec();
    let (status, _, _) = s.post_otlp(
        "application/x-protobuf",
        &[("Content-Encoding", "snappy")],
        &lying,
    );
    assert_eq!(status, 413);
    for (encoding, bomb) in [("zstd", zstd(&zeros)), ("snappy", snappy_framed(&zeros))] {
        let (status, headers, _) = raw_grpc(&s, Some(encoding), bomb).await;
        assert_eq!(
            (status, grpc_status(&headers)),
            (200, Some(8)),
            "{encoding}: {headers:?}"
        );
    }
    let grew = s.peak_rss().saturating_sub(rss_before);
    assert!(
        grew < 128 << 20,
        "peak RSS grew by {grew} bytes for 64 MiB bombs"
    );
    assert_eq!(
        s.internal("spanagg_requests_total{protocol=\"http_protobuf\",outcome=\"too_large\"}"),
        3.0
    );
    assert_eq!(
        s.internal("spanagg_requests_total{protocol=\"grpc\",outcome=\"too_large\"}"),
        2.0
    );

    // Corrupt: INVALID_ARGUMENT / 400, which exporters do not retry.
    let junk = b"\x28\xb5\x2f\xfd\x00\x01\x02\x03 not really".to_vec();
    for encoding in ["zstd", "snappy", "deflate"] {
        let (status, _, _) = s.post_otlp(
            "application/x-protobuf",
            &[("Content-Encoding", encoding)],
            &junk,
        );
        assert_eq!(status, 400, "{encoding}");
    }
    // Header names as clients spell them: case and spaces do not matter.
    for encoding in ["zstd", "snappy", "Gzip", " deflate "] {
        let (_, headers, _) = raw_grpc(&s, Some(encoding), junk.clone()).await;
        assert_eq!(grpc_status(&headers), Some(3), "{encoding}: {headers:?}");
    }
    // An encoding nobody reads: UNIMPLEMENTED, saying which ones are.
    let (_, headers, _) = raw_grpc(&s, Some("lz4"), junk.clone()).await;
    assert_eq!(grpc_status(&headers), Some(12), "{headers:?}");
    let accepted = headers.iter().find(|(k, _)| k == "grpc-accept-encoding");
    assert!(
        accepted.is_some_and(|(_, v)| v.contains("gzip")),
        "{headers:?}"
    );
    assert_eq!(
        s.internal(
            "spanagg_requests_total{protocol=\"http_protobuf\",outcome=\"invalid_argument\"}"
        ),
        3.0
    );
    assert_eq!(
        s.internal("spanagg_requests_total{protocol=\"grpc\",outcome=\"invalid_argument\"}"),
        5.0
    );
    // Still serving: a good export after all of it.
    s.post_ok(&delta("after", 1).encode_to_vec());
    assert_eq!(sample_value(&s.scrape(), CALLS), Some(1.0));
    s.stop();
}

/// Compressed gRPC messages are inflated by the handler once the stream has ended, under the
/// decode budget, not as they arrive: streams that send a tiny zstd bomb and never end hold
/// only what they sent. (tonic inflated them at once and held the result until the stream
/// ended, which these never do: 20 × 16 MiB, the limit.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_streams_with_compressed_bombs_hold_only_what_they_sent() {
    use http_body_util::StreamBody;
    let s = Spanagg::start("max_request_bytes: 16MiB\n");
    let bomb = zstd(&vec![0u8; 32 << 20]);
    let mut frame = vec![1u8];
    frame.extend_from_slice(&(bomb.len() as u32).to_be_bytes());
    frame.extend_from_slice(&bomb);
    let rss_before = s.rss();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<StreamBody<
            tokio_stream::wrappers::ReceiverStream<
                Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>,
            >,
        >>();
    let mut senders = Vec::new();
    let mut replies = Vec::new();
    for _ in 0..20 {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(Ok(http_body::Frame::data(bytes::Bytes::from(
            frame.clone(),
        ))))
        .await
        .unwrap();
        senders.push(tx); // kept: the stream never ends
        let req = http::Request::post(format!(
            "http://{}/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
            s.grpc
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-encoding", "zstd")
        .body(StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .unwrap();
        replies.push(tokio::spawn(client.request(req)));
    }
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let grew = s.rss().saturating_sub(rss_before);
    assert!(
        grew < 48 << 20,
        "RSS grew by {grew} bytes while 20 streams held a 16 MiB zstd bomb each"
    );
    // Ended, each is inflated by the handler and refused at the limit.
    drop(senders);
    for r in replies {
        let res = r.await.unwrap().unwrap();
        let headers: Vec<_> = res
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let (_, tail) = {
            use http_body_util::BodyExt;
            (
                (),
                res.into_body().collect().await.unwrap().trailers().cloned(),
            )
        };
        let status = tail
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| {
                headers
                    .iter()
                    .find(|(k, _)| k == "grpc-status")
                    .map(|(_, v)| v)
            })
            .and_then(|v| v.to_str().ok().map(str::to_owned));
        assert_eq!(status.as_deref(), Some("8"), "RESOURCE_EXHAUSTED");
    }
    assert_eq!(
        s.internal("spanagg_requests_total{protocol=\"grpc\",outcome=\"too_large\"}"),
        20.0
    );
    s.stop();
}

/// tonic's refusals before the handler runs are the client's errors: INVALID_ARGUMENT, counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_grpc_messages_are_invalid_arguments() {
    let s = Spanagg::start("");
    // A length prefix past the data, and a flag byte that is neither 0 nor 1.
    let mut lying = vec![0u8, 0, 0, 1, 0];
    lying.extend_from_slice(b"short");
    let bad_flag = vec![7u8, 0, 0, 0, 1, 0x0a];
    for frame in [lying, bad_flag] {
        let (_, headers, _) = raw_grpc_bytes(&s, None, frame).await;
        assert_eq!(grpc_status(&headers), Some(3), "{headers:?}");
    }
    assert_eq!(
        s.internal("spanagg_requests_total{protocol=\"grpc\",outcome=\"invalid_argument\"}"),
        2.0
    );
    s.stop();
}

/// A compressed body that must wait for the decode budget is not held while it waits: it is
/// inflated again once admitted, to the same bytes. (The ingest stack without sockets.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_body_waiting_for_the_budget_is_inflated_again_to_the_same_bytes() {
    use spanagg::ingest::body::Encoding;
    use spanagg::ingest::otlp::InputLimits;
    use spanagg::ingest::Ingestor;
    use spanagg::workload::{request, Shape};
    use std::sync::Arc;

    let shape = Shape {
        services: 1,
        routes: 200,
        bounds: 49,
        counters: true,
    };
    let body = request(&shape, 0, 1_000, 2_000).encode_to_vec();
    let cost = Ingestor::price_protobuf(&body).unwrap().bytes;
    let (_table, ingestor, _) = ingest_stack(1, 16);
    let ingestor = Arc::new(ingestor.with_limits(InputLimits {
        max_decode_memory: cost * 3 / 2,
        ..InputLimits::default()
    }));
    // The plain body takes most of the budget and holds it.
    let (_, held, _) = ingestor
        .inflate_and_admit(
            body.clone().into(),
            Encoding::Identity,
            Ingestor::price_protobuf,
        )
        .await
        .unwrap();
    let waiting = {
        let ingestor = ingestor.clone();
        let zstd = bytes::Bytes::from(zstd(&body));
        tokio::spawn(async move {
            ingestor
                .inflate_and_admit(zstd, Encoding::Zstd, Ingestor::price_protobuf)
                .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "it waits for room");
    drop(held);
    let (inflated, _admission, _) = waiting.await.unwrap().unwrap();
    assert!(inflated[..] == body[..], "inflated again to the same bytes");
}
