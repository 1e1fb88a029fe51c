//! OTLP/HTTP `POST /v1/metrics`: protobuf or JSON, optionally gzip, zstd or Snappy. Replies use the request's
//! content type; errors carry a `google.rpc.Status` body as the OTLP spec asks.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use http_body_util::{BodyExt, Limited};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceResponse,
};
use prost::Message;

use super::admit::Admission;
use super::body::Encoding;
use super::view::OtlpBody;
use super::{IngestError, Ingestor, Logged};
use crate::auth::Guard;
use crate::listen::ListenMetrics;
use crate::telemetry::Protocol;

/// How long a client should wait before retrying a refused export.
const RETRY_AFTER_SECS: &str = "1";

/// `google.rpc.Status`, the error body of OTLP/HTTP.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Protobuf,
    Json,
}

impl Format {
    fn content_type(self) -> &'static str {
        match self {
            Self::Protobuf => "application/x-protobuf",
            Self::Json => "application/json",
        }
    }
    fn protocol(self) -> Protocol {
        match self {
            Self::Protobuf => Protocol::HttpProtobuf,
            Self::Json => Protocol::HttpJson,
        }
    }
}

/// What the export handler holds: the ingest path, the ingest door's token check, and how
/// long a body may take to arrive.
struct Door {
    ingestor: Arc<Ingestor>,
    guard: Guard,
    body_timeout: Duration,
    metrics: ListenMetrics,
}

pub fn router(
    ingestor: Arc<Ingestor>,
    guard: Guard,
    body_timeout: Duration,
    metrics: ListenMetrics,
) -> Router {
    let door = Door {
        ingestor,
        guard,
        body_timeout,
        metrics,
    };
    Router::new()
        .route("/v1/metrics", post(export))
        .method_not_allowed_fallback(crate::export::http::method_not_allowed)
        .with_state(Arc::new(door))
}

fn error_response(format: Format, e: &IngestError) -> Response {
    let (status, code) = match e {
        IngestError::InvalidArgument(_) => (StatusCode::BAD_REQUEST, 3),
        IngestError::TooLarge { .. } | IngestError::TooCostly(_) => {
            (StatusCode::PAYLOAD_TOO_LARGE, 8)
        }
        IngestError::Unavailable
        | IngestError::ShuttingDown
        | IngestError::NotDurable(_)
        | IngestError::Limit(_) => (StatusCode::SERVICE_UNAVAILABLE, 14),
    };
    let mut res = status_response(format, status, code, e.to_string());
    if status == StatusCode::SERVICE_UNAVAILABLE {
        res.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from_static(RETRY_AFTER_SECS),
        );
    }
    res
}

/// `status` with a `google.rpc.Status` body (gRPC `code`, `message`) in the request's encoding.
fn status_response(format: Format, status: StatusCode, code: i32, message: String) -> Response {
    let body = match format {
        Format::Protobuf => RpcStatus { code, message }.encode_to_vec(),
        Format::Json => serde_json::json!({ "code": code, "message": message })
            .to_string()
            .into_bytes(),
    };
    (
        status,
        [(header::CONTENT_TYPE, format.content_type())],
        body,
    )
        .into_response()
}

async fn export(State(door): State<Arc<Door>>, headers: HeaderMap, body: Body) -> Response {
    let ingestor = &door.ingestor;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = content_type.split(';').next().unwrap_or("").trim();
    let format = match mime.to_ascii_lowercase().as_str() {
        "application/json" => Some(Format::Json),
        "application/x-protobuf" | "application/protobuf" => Some(Format::Protobuf),
        _ => None,
    };
    // The token before anything else is looked at: a client without it is told so (and
    // counted as that, not as a bad request), and costs no decoding.
    let authorization = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
    if door.guard.admit(authorization).is_err() {
        let reply = format.unwrap_or(Format::Protobuf);
        let mut res = status_response(reply, StatusCode::UNAUTHORIZED, 16, door.guard.message());
        res.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"spanagg\""),
        );
        return res;
    }
    let format = match format {
        Some(f) => f,
        None => {
            let err = IngestError::InvalidArgument(format!(
                "unsupported Content-Type {content_type:?}: use application/x-protobuf or \
                 application/json"
            ));
            ingestor.refused(Protocol::HttpProtobuf, &err);
            let mut res = error_response(Format::Protobuf, &err);
            *res.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
            return res;
        }
    };
    let read = read_request(ingestor, format, &headers, body, door.body_timeout).await;
    match read {
        // The admission is held until the reply: the decoded request lives until then.
        Ok((req, raw, admission)) => match ingestor
            .export_detached(format.protocol(), req, raw, admission)
            .await
        {
            Ok(reply) => {
                let resp = ExportMetricsServiceResponse {
                    partial_success: (reply.rejected > 0).then(|| ExportMetricsPartialSuccess {
                        rejected_data_points: i64::try_from(reply.rejected).unwrap_or(i64::MAX),
                        error_message: reply.message,
                    }),
                };
                let body = match format {
                    Format::Protobuf => resp.encode_to_vec(),
                    Format::Json => super::json::encode_response(&resp),
                };
                (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, format.content_type())],
                    body,
                )
                    .into_response()
            }
            Err(e) => error_response(format, &e),
        },
        Err(Unread::Refused(e)) => {
            ingestor.refused(format.protocol(), &e);
            error_response(format, &e)
        }
        Err(Unread::Slow) => {
            door.metrics.timed_out("otlp_http", "body");
            slow_body(format)
        }
    }
}

/// 503, which OTLP exporters retry: an honest client on a slow link loses nothing, and a
/// slowloris client gains nothing from trying again.
fn slow_body(format: Format) -> Response {
    let message = "request body not received within connections.body_timeout: retry".to_owned();
    let mut res = status_response(format, StatusCode::SERVICE_UNAVAILABLE, 14, message);
    let headers = res.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    headers.insert(
        header::RETRY_AFTER,
        HeaderValue::from_static(RETRY_AFTER_SECS),
    );
    res
}

/// Why a request was not read.
enum Unread {
    /// Its body did not arrive within the body timeout.
    Slow,
    Refused(IngestError),
}

impl From<IngestError> for Unread {
    fn from(e: IngestError) -> Self {
        Self::Refused(e)
    }
}

/// The body, within `body_timeout` (a body sent a byte at a time is cut off, not waited for;
/// admission and decoding come after, not under that clock), decoded and admitted.
async fn read_request(
    ingestor: &Ingestor,
    format: Format,
    headers: &HeaderMap,
    body: Body,
    body_timeout: Duration,
) -> Result<(OtlpBody, Option<Logged>, Admission), Unread> {
    let limit = ingestor.max_request_bytes;
    let encoding = Encoding::parse(
        headers
            .get(header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok()),
    )?;
    let collected = tokio::time::timeout(body_timeout, Limited::new(body, limit).collect())
        .await
        .map_err(|_| Unread::Slow)?;
    let raw = collected
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                IngestError::TooLarge { limit }
            } else {
                IngestError::InvalidArgument(format!("cannot read body: {e}"))
            }
        })?
        .to_bytes();
    match format {
        // The protobuf body is what the WAL keeps; a JSON one is re-encoded only if logged.
        Format::Protobuf => {
            let (req, logged, admission) = ingestor.prepare_protobuf(raw, encoding).await?;
            Ok((req, Some(logged), admission))
        }
        Format::Json => {
            let (req, admission) = ingestor.prepare_json(raw, encoding).await?;
            Ok((req, None, admission))
        }
    }
}
