//! An OTLP metrics client for the load generators: sends already-encoded requests over
//! OTLP/HTTP or OTLP/gRPC, compressed as an exporter would, and reads the answer.
//!
//! Bodies are `Bytes` the caller encoded (and, for HTTP, compressed with [`compress`]) so a
//! generator can keep encoding out of its timed loop. gRPC compression is tonic's, applied per
//! message as the Collector's gRPC exporter does.

use std::io::Write as _;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse;
use prost::Message;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

/// OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    Http,
    Grpc,
}

/// Request compression, as the Collector's exporters offer it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    fn header(self) -> Option<&'static str> {
        match self {
            Compression::None => None,
            Compression::Gzip => Some("gzip"),
            Compression::Zstd => Some("zstd"),
        }
    }
}

/// `raw` compressed for an OTLP/HTTP body (`Content-Encoding` from [`Sender`]). gzip at the
/// fast level and zstd at level 1, the Collector's defaults.
pub fn compress(raw: &[u8], compression: Compression) -> std::io::Result<Bytes> {
    Ok(Bytes::from(match compression {
        Compression::None => raw.to_vec(),
        Compression::Gzip => {
            let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            z.write_all(raw)?;
            z.finish()?
        }
        Compression::Zstd => zstd::bulk::compress(raw, 1)?,
    }))
}

/// How long one request may take, as an exporter's `timeout` (the Collector's is 5 s; this
/// leaves room for a server under flat-out load).
pub const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

const EXPORT: &str = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";

/// One connection's worth of client (HTTP keeps a pool; gRPC one HTTP/2 channel).
pub struct Sender {
    transport: Transport,
    compression: Compression,
    timeout: std::time::Duration,
}

enum Transport {
    Http {
        client: Client<HttpConnector, Full<Bytes>>,
        url: String,
    },
    Grpc(tonic::client::Grpc<tonic::transport::Channel>),
}

impl Sender {
    /// Connects to `endpoint` (a base URL: `http://127.0.0.1:4318`, or `:4317` for gRPC).
    pub async fn connect(
        protocol: Protocol,
        endpoint: &str,
        compression: Compression,
    ) -> anyhow::Result<Self> {
        let transport = match protocol {
            Protocol::Http => Transport::Http {
                client: Client::builder(TokioExecutor::new()).build_http(),
                url: format!("{}/v1/metrics", endpoint.trim_end_matches('/')),
            },
            Protocol::Grpc => {
                let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())?
                    .initial_stream_window_size(1 << 20)
                    .initial_connection_window_size(4 << 20)
                    .connect()
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot connect to {endpoint}: {}", chain(&e)))?;
                let mut grpc = tonic::client::Grpc::new(channel);
                grpc = match compression {
                    Compression::None => grpc,
                    Compression::Gzip => grpc.send_compressed(CompressionEncoding::Gzip),
                    Compression::Zstd => grpc.send_compressed(CompressionEncoding::Zstd),
                };
                Transport::Grpc(grpc)
            }
        };
        Ok(Sender {
            transport,
            compression,
            timeout: SEND_TIMEOUT,
        })
    }

    /// How long one request may take (default [`SEND_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends one request: an encoded `ExportMetricsServiceRequest`, already compressed for
    /// HTTP, uncompressed for gRPC. `Err` carries what the server or the transport said, or
    /// that no answer came within the timeout (a server that hangs does not stall the
    /// generator).
    pub async fn send(&mut self, body: Bytes) -> Result<ExportMetricsServiceResponse, String> {
        let timeout = self.timeout;
        tokio::time::timeout(timeout, self.send_once(body))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
    }

    async fn send_once(&mut self, body: Bytes) -> Result<ExportMetricsServiceResponse, String> {
        match &mut self.transport {
            Transport::Grpc(grpc) => {
                grpc.ready()
                    .await
                    .map_err(|e| format!("gRPC channel: {e}"))?;
                let path = http::uri::PathAndQuery::from_static(EXPORT);
                grpc.unary(tonic::Request::new(body), path, RawClientCodec)
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(|s| format!("gRPC {:?}: {}", s.code(), s.message()))
            }
            Transport::Http { client, url } => {
                let mut req = http::Request::post(url.as_str())
                    .header("content-type", "application/x-protobuf");
                if let Some(encoding) = self.compression.header() {
                    req = req.header("content-encoding", encoding);
                }
                let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
                let res = client
                    .request(req)
                    .await
                    .map_err(|e| format!("{url}: {}", chain(&e)))?;
                let status = res.status();
                let bytes = res
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .map_err(|e| format!("{url}: reading the answer: {e}"))?;
                if !status.is_success() {
                    let text: String = String::from_utf8_lossy(&bytes)
                        .trim()
                        .chars()
                        .take(200)
                        .collect();
                    return Err(format!("HTTP {status}: {text}"));
                }
                ExportMetricsServiceResponse::decode(bytes)
                    .context("the answer is not an ExportMetricsServiceResponse")
                    .map_err(|e| format!("{e:#}"))
            }
        }
    }
}

/// An error and its sources, joined: transport errors keep their reason in a source.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// Sends pre-encoded request bytes; decodes the response. Keeps encoding out of the timed loop.
#[derive(Debug, Clone, Copy)]
struct RawClientCodec;
struct RawEncoder;
struct ResponseDecoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for ResponseDecoder {
    type Item = ExportMetricsServiceResponse;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        ExportMetricsServiceResponse::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

impl Codec for RawClientCodec {
    type Encode = Bytes;
    type Decode = ExportMetricsServiceResponse;
    type Encoder = RawEncoder;
    type Decoder = ResponseDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> ResponseDecoder {
        ResponseDecoder
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_server_that_never_answers_is_given_up_on() {
        // Accepts the connection, reads nothing, answers nothing.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let held = tokio::spawn(async move { listener.accept().await });
        let mut sender =
            Sender::connect(Protocol::Http, &format!("http://{addr}"), Compression::None)
                .await
                .unwrap()
                .with_timeout(std::time::Duration::from_millis(200));
        // Without the timeout this would wait for ever: the outer bound fails the test instead.
        let err = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            sender.send(Bytes::from_static(b"")),
        )
        .await
        .expect("the sender gives up by itself")
        .unwrap_err();
        assert!(err.contains("no answer within 200ms"), "{err}");
        held.abort();
    }
}
