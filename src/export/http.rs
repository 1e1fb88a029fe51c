//! The scrape and API listener: `/metrics` (aggregated series), `/internal/metrics` (our own),
//! and the Prometheus-style health endpoints.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use flate2::write::GzEncoder;

use super::arrow::{ipc_stream, shard_batch, Filter};
use super::gather;
use super::gzip_parts;
use super::prometheus::{encode_shard, stitch_pieces, Format};
use super::scrape_body;
use crate::aggregate::table::Table;
use crate::auth::Guard;
use crate::telemetry::Telemetry;

/// What the HTTP handlers share.
pub struct AppState {
    pub table: Arc<Table>,
    pub telemetry: Arc<Telemetry>,
    pub ready: AtomicBool,
}

/// The routes, each behind its door: `scrape` for `/metrics` and `/internal/metrics` (open
/// without `auth.scrape_token_file`), `read` for `/api/v1/*` (the state itself, every service
/// and label value). Health and readiness stay open, so probes need no secret.
pub fn router(state: Arc<AppState>, scrape: Guard, read: Guard) -> Router {
    let scrapes = Router::new()
        .route("/metrics", get(metrics))
        .route("/internal/metrics", get(internal_metrics))
        .route_layer(axum::middleware::from_fn_with_state(scrape, require));
    let api = Router::new()
        .route("/api/v1/snapshot", get(snapshot))
        .route("/api/v1/cardinality", get(super::report::cardinality))
        .route(
            "/api/v1/cardinality/label_names",
            get(super::report::label_names),
        )
        .route(
            "/api/v1/cardinality/label_values",
            get(super::report::label_values),
        )
        .route_layer(axum::middleware::from_fn_with_state(read, require));
    Router::new()
        .merge(scrapes)
        .merge(api)
        .route("/-/healthy", get(|| async { "spanagg is healthy\n" }))
        .route("/-/ready", get(ready))
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Turns away a request without its door's bearer token (401, counted).
async fn require(
    State(door): State<Guard>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if door.admit(authorization).is_ok() {
        return next.run(req).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::WWW_AUTHENTICATE, "Bearer realm=\"spanagg\""),
        ],
        format!("{}\n", door.message()),
    )
        .into_response()
}

/// A 405 that says what it is (axum's own has no body and no Content-Type). axum still adds
/// the `Allow` header.
pub async fn method_not_allowed() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "method not allowed\n",
    )
        .into_response()
}

/// The router the HTTP listener serves from the start: until `app` is set (the state is being
/// restored) `/-/healthy` says so with 200 and everything else answers 503; then `app` serves.
pub fn front(app: Arc<std::sync::OnceLock<Router>>) -> Router {
    Router::new().fallback(dispatch).with_state(app)
}

async fn dispatch(
    State(app): State<Arc<std::sync::OnceLock<Router>>>,
    req: axum::extract::Request,
) -> Response {
    match app.get() {
        Some(router) => match tower_service::Service::call(&mut router.clone(), req).await {
            Ok(res) => res,
            Err(never) => match never {},
        },
        None if req.uri().path() == "/-/healthy" => {
            (StatusCode::OK, "spanagg is restoring its state\n").into_response()
        }
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "spanagg is restoring its state\n",
        )
            .into_response(),
    }
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "spanagg is ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "spanagg is starting\n").into_response()
    }
}

fn wants_gzip(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',').any(|p| {
                let mut it = p.split(';');
                let enc = it.next().unwrap_or("").trim();
                let q_zero = it.any(|q| q.trim().replace(' ', "") == "q=0");
                enc.eq_ignore_ascii_case("gzip") && !q_zero
            })
        })
}

fn body_response(headers: &HeaderMap, content_type: &'static str, text: String) -> Response {
    let gzipped = wants_gzip(headers)
        .then(|| {
            let mut enc = GzEncoder::new(
                Vec::with_capacity(text.len() / 8),
                flate2::Compression::fast(),
            );
            enc.write_all(text.as_bytes()).and_then(|()| enc.finish())
        })
        .and_then(Result::ok);
    let gzip = gzipped.is_some();
    let mut res = match gzipped {
        Some(gz) => gz.into_response(),
        None => text.into_response(),
    };
    set_headers(&mut res, content_type, gzip);
    res
}

/// The headers every negotiated body carries; `Content-Encoding` when `gzip` says it is.
fn set_headers(res: &mut Response, content_type: &'static str, gzip: bool) {
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::VARY,
        HeaderValue::from_static("Accept, Accept-Encoding"),
    );
    if gzip {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
}

async fn metrics(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let started = Instant::now();
    let format = Format::negotiate(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    let gzip = wants_gzip(&headers);
    let built = if gzip {
        gzipped_scrape(&state, format).await
    } else {
        plain_scrape(&state, format).await
    };
    let (body, size, conflicts) = match built {
        Ok(b) => b,
        Err(refusal) => return refusal,
    };
    if conflicts > 0 {
        state.telemetry.family_conflicts.inc_by(conflicts as u64);
    }
    state.telemetry.scrape_bytes.observe(size as f64);
    let mut res = body.into_response();
    set_headers(&mut res, format.content_type(), gzip);
    // The time to build the response (and gzip it), not the scraper's time to read it.
    state
        .telemetry
        .scrape_duration
        .observe(started.elapsed().as_secs_f64());
    res
}

/// A scrape's body, the exposition's length, and the families left out as conflicting.
type Scrape = Result<(axum::body::Body, u64, usize), Response>;

fn shutting_down() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "shards are shutting down\n",
    )
        .into_response()
}

/// Streamed: the pieces are written (and sent home) one by one, never joined into one string.
async fn plain_scrape(state: &AppState, format: Format) -> Scrape {
    let shards = state.table.len();
    let parts = gather(&state.table, move |s| encode_shard(s, format, shards))
        .await
        .ok_or_else(shutting_down)?;
    let (pieces, conflicts) = stitch_pieces(parts, format);
    let size = pieces.iter().map(|p| p.text.len() as u64).sum();
    let pieces = scrape_body::homed(pieces, &state.table);
    let body =
        axum::body::Body::from_stream(futures_util::stream::iter(scrape_body::plain(pieces)));
    Ok((body, size, conflicts))
}

/// Deflated on the shards, family by family, and joined here into one gzip member: the scrape
/// holds the compressed parts, not the text, and a slow reader holds only the joined body.
async fn gzipped_scrape(state: &AppState, format: Format) -> Scrape {
    let failed = |e: std::io::Error| {
        tracing::error!(error = %e, "scrape: compression failed");
        (StatusCode::INTERNAL_SERVER_ERROR, "compression failed\n").into_response()
    };
    let parts = gather(&state.table, move |s| gzip_parts::encode_shard(s, format))
        .await
        .ok_or_else(shutting_down)?
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(failed)?;
    let (pieces, conflicts) = gzip_parts::stitch(parts, format);
    let size = pieces.iter().map(|p| p.text.text_len()).sum();
    let body = gzip_parts::gzip(pieces.iter().map(|p| &p.text));
    scrape_body::send_home(pieces, &state.table);
    Ok((axum::body::Body::from(body), size, conflicts))
}

async fn internal_metrics(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    match state.telemetry.encode() {
        Ok(text) => body_response(
            &headers,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            text,
        ),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n").into_response(),
    }
}

#[derive(Debug, serde::Deserialize)]
struct SnapshotQuery {
    service: Option<String>,
    metric: Option<String>,
}

/// The whole state (or a filtered part) as an Arrow IPC stream, built shard by shard.
async fn snapshot(State(state): State<Arc<AppState>>, Query(q): Query<SnapshotQuery>) -> Response {
    let filter = Arc::new(Filter {
        service: q.service,
        metric: q.metric,
    });
    let Some(results) = gather(&state.table, move |s| shard_batch(s, &filter)).await else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "shards are shutting down\n",
        )
            .into_response();
    };
    let batches = match results.into_iter().collect::<Result<Vec<_>, _>>() {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "snapshot: building a shard's batch failed");
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("snapshot failed: {e}\n"),
            )
                .into_response();
        }
    };
    let body = ipc_stream(&batches);
    // Built on the shards: freed there, and their pages handed back (at most once a second
    // per shard, however often clients ask).
    for (i, b) in batches.into_iter().enumerate() {
        state.table.free_on_shard(i, b, crate::memory::release_soon);
    }
    match body {
        Ok(body) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/vnd.apache.arrow.stream")],
            body,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("snapshot failed: {e}\n"),
        )
            .into_response(),
    }
}
