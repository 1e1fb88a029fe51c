//! OTLP/gRPC `MetricsService/Export`. The service is written against tonic's server primitives
//! rather than the generated server so that the body arrives as bytes: an undecodable message is
//! then `INVALID_ARGUMENT` (the generated code would answer `INTERNAL`) and is counted like any
//! other refusal. tonic's size limit bounds a message as it came; compressed messages are
//! inflated here, capped and under the decode budget (`grpc_compression` says why).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceResponse,
};
use prost::Message;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Request, Response, Status};

use super::body::Encoding;
use super::grpc_compression::Unflagged;
use super::{IngestError, Ingestor};
use crate::telemetry::Protocol;

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";

/// Maps the one error classification to gRPC codes.
pub fn status_of(e: &IngestError) -> Status {
    match e {
        IngestError::InvalidArgument(m) => Status::invalid_argument(m.clone()),
        IngestError::TooLarge { .. } | IngestError::TooCostly(_) => {
            Status::resource_exhausted(e.to_string())
        }
        IngestError::Unavailable
        | IngestError::ShuttingDown
        | IngestError::NotDurable(_)
        | IngestError::Limit(_) => Status::unavailable(e.to_string()),
    }
}

/// Decodes to raw bytes, encodes prost messages.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

struct RawDecoder;
struct ProstEncoder;

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Encoder for ProstEncoder {
    type Item = ExportMetricsServiceResponse;
    type Error = Status;
    fn encode(&mut self, item: Self::Item, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.reserve(item.encoded_len());
        item.encode(&mut dst.writer().get_mut())
            .map_err(|e| Status::internal(e.to_string()))
    }
}

impl Codec for RawCodec {
    type Encode = ExportMetricsServiceResponse;
    type Decode = Bytes;
    type Encoder = ProstEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> ProstEncoder {
        ProstEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// The gRPC service, ready for `tonic::transport::Server::add_service`.
#[derive(Clone)]
pub struct MetricsGrpc {
    ingestor: Arc<Ingestor>,
}

impl MetricsGrpc {
    pub fn new(ingestor: Arc<Ingestor>) -> Self {
        Self { ingestor }
    }
}

impl tonic::server::NamedService for MetricsGrpc {
    const NAME: &'static str = "opentelemetry.proto.collector.metrics.v1.MetricsService";
}

/// The handler. With `compressed`, the request's message is in that encoding when its flag
/// (set as the body streamed) says so; `ran` is set once it runs (from then on it counts its
/// own refusals).
#[derive(Clone)]
struct ExportSvc {
    ingestor: Arc<Ingestor>,
    compressed: Option<(Encoding, Arc<AtomicBool>)>,
    ran: Arc<AtomicBool>,
}

impl tonic::server::UnaryService<Bytes> for ExportSvc {
    type Response = ExportMetricsServiceResponse;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Self::Response>, Status>> + Send>>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let ingestor = self.ingestor.clone();
        let encoding = match &self.compressed {
            Some((encoding, flag)) if flag.load(Ordering::Relaxed) => *encoding,
            _ => Encoding::Identity,
        };
        self.ran.store(true, Ordering::Relaxed);
        Box::pin(async move {
            // The admission is held until the reply: the decoded request lives until then.
            let prepared = ingestor
                .prepare_protobuf(request.into_inner(), encoding)
                .await;
            let (req, logged, admission) = match prepared {
                Ok(p) => p,
                Err(err) => {
                    ingestor.refused(Protocol::Grpc, &err);
                    return Err(status_of(&err));
                }
            };
            match ingestor
                .export_detached(Protocol::Grpc, req, Some(logged), admission)
                .await
            {
                Ok(reply) => Ok(Response::new(ExportMetricsServiceResponse {
                    partial_success: (reply.rejected > 0).then(|| ExportMetricsPartialSuccess {
                        rejected_data_points: i64::try_from(reply.rejected).unwrap_or(i64::MAX),
                        error_message: reply.message,
                    }),
                })),
                Err(e) => Err(status_of(&e)),
            }
        })
    }
}

/// Whether tonic's INTERNAL says it could not read the request's message, by tonic's wording.
fn is_unreadable_message(headers: &http::HeaderMap) -> bool {
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(|m| m.replace("%20", " "))
        .unwrap_or_default();
    // Not "Missing request message": tonic says that too when the client cancelled the
    // stream part way, which is no bad request.
    [
        "Unexpected EOF decoding stream",
        "protocol error: received message",
    ]
    .iter()
    .any(|p| message.starts_with(p))
}

impl<B> tower_service::Service<http::Request<B>> for MetricsGrpc
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != EXPORT_PATH {
            return Box::pin(async { Ok(Status::unimplemented("unknown method").into_http()) });
        }
        let ingestor = self.ingestor.clone();
        let ours = req
            .headers()
            .get("grpc-encoding")
            .and_then(|v| v.to_str().ok())
            .and_then(grpc_encoding);
        Box::pin(async move {
            let res = match ours {
                // Compressed messages are inflated by the handler, under the decode budget;
                // tonic sees them as they came, flagged uncompressed (`grpc_compression`).
                Some(encoding) => {
                    let (mut parts, body) = req.into_parts();
                    parts.headers.remove("grpc-encoding");
                    let body = Unflagged::new(body);
                    let flag = body.compressed();
                    let req = http::Request::from_parts(parts, body);
                    serve(&ingestor, req, Some((encoding, flag))).await
                }
                None => serve(&ingestor, req, None).await,
            };
            Ok(res)
        })
    }
}

/// The encoding spanagg inflates itself for a `grpc-encoding` name (the names OTLP/HTTP takes);
/// `None` for identity and for names tonic will refuse as unimplemented.
fn grpc_encoding(name: &str) -> Option<Encoding> {
    Encoding::parse(Some(name))
        .ok()
        .filter(|e| *e != Encoding::Identity)
}

/// One export through tonic's unary handling, with its refusals counted and mapped.
async fn serve<B>(
    ingestor: &Arc<Ingestor>,
    req: http::Request<B>,
    compressed: Option<(Encoding, Arc<AtomicBool>)>,
) -> http::Response<tonic::body::Body>
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    let limit = ingestor.max_request_bytes;
    let mut grpc = tonic::server::Grpc::new(RawCodec)
        .send_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Zstd)
        .max_decoding_message_size(limit);
    let ran = Arc::new(AtomicBool::new(false));
    let svc = ExportSvc {
        ingestor: ingestor.clone(),
        compressed,
        ran: ran.clone(),
    };
    let mut res = grpc.unary(svc, req).await;
    // What spanagg reads (tonic, configured to inflate nothing itself, would say identity).
    res.headers_mut().insert(
        "grpc-accept-encoding",
        http::HeaderValue::from_static("gzip,zstd,snappy,deflate,identity"),
    );
    if ran.load(Ordering::Relaxed) {
        return res;
    }
    // Size limits are enforced by tonic before our handler runs: count them here, and
    // answer RESOURCE_EXHAUSTED for an uncompressed oversized message too (tonic says
    // OUT_OF_RANGE), so clients see one code for "too large".
    let code = res
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok());
    if matches!(code, Some(8) | Some(11)) {
        ingestor.refused(Protocol::Grpc, &IngestError::TooLarge { limit });
        res.headers_mut()
            .insert("grpc-status", http::HeaderValue::from_static("8"));
    } else if code == Some(13) && is_unreadable_message(res.headers()) {
        // tonic could not read a message (a length prefix past the data, a bad flag byte):
        // the client's fault, as a bad body is on OTLP/HTTP. INVALID_ARGUMENT
        // is not retried; INTERNAL would be, forever. Other INTERNAL errors (a stream reset)
        // stay as they are.
        let err = IngestError::InvalidArgument("unreadable gRPC message".into());
        ingestor.refused(Protocol::Grpc, &err);
        res.headers_mut()
            .insert("grpc-status", http::HeaderValue::from_static("3"));
    } else if code == Some(12) {
        // An encoding spanagg does not read: UNIMPLEMENTED, with the ones it does in
        // `grpc-accept-encoding`. Counted as the client's error.
        let err = IngestError::InvalidArgument("unsupported grpc-encoding".into());
        ingestor.refused(Protocol::Grpc, &err);
    }
    res
}
