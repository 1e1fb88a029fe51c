//! The cardinality API: `/api/v1/cardinality` (the report) and the Mimir-style
//! `/api/v1/cardinality/label_names` and `/api/v1/cardinality/label_values`, all summarised
//! shard by shard on the shard threads and merged here.

use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::gather;
use super::http::AppState;
use crate::cardinality::{Merged, Scope, ShardSummary};

/// Default length of the report's lists.
const DEFAULT_TOP: usize = 10;

/// Labels one `label_values` request may name. Each costs a sort of all its values; a URI may
/// otherwise repeat one name thousands of times.
const MAX_LABEL_NAMES: usize = 64;

/// Query parameters shared by the three endpoints (`label_names[]` may repeat).
#[derive(Debug, Default)]
struct Params {
    scope: Scope,
    top: Option<usize>,
    label_names: Vec<String>,
}

fn params(q: Option<String>) -> Result<Params, Box<Response>> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(q.as_deref().unwrap_or(""))
        .map_err(|e| Box::new(bad(format!("bad query string: {e}"))))?;
    let mut p = Params::default();
    for (k, v) in pairs {
        match k.as_str() {
            "service" => p.scope.service = Some(v),
            "metric" => p.scope.metric = Some(v),
            "top" | "limit" => {
                p.top = Some(
                    v.parse()
                        .map_err(|_| bad(format!("{k} must be a number")))?,
                )
            }
            "label_names[]" | "label_names" => {
                if !p.label_names.contains(&v) {
                    p.label_names.push(v);
                }
                if p.label_names.len() > MAX_LABEL_NAMES {
                    return Err(Box::new(bad(format!(
                        "at most {MAX_LABEL_NAMES} label_names per request"
                    ))));
                }
            }
            _ => return Err(Box::new(bad(format!("unknown parameter `{k}`")))),
        }
    }
    Ok(p)
}

fn bad(message: String) -> Response {
    (StatusCode::BAD_REQUEST, format!("{message}\n")).into_response()
}

async fn merged(state: &AppState, scope: Scope) -> Result<Merged, Response> {
    let scope = Arc::new(scope);
    match gather(&state.table, move |s| ShardSummary::of(s, &scope)).await {
        Some(parts) => Ok(Merged::new(parts)),
        None => Err((
            StatusCode::SERVICE_UNAVAILABLE,
            "shards are shutting down\n",
        )
            .into_response()),
    }
}

fn json(v: &impl Serialize) -> Response {
    match serde_json::to_vec_pretty(v) {
        Ok(body) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("report failed: {e}\n"),
        )
            .into_response(),
    }
}

/// `?service= &metric= &top=`: the report.
pub async fn cardinality(State(state): State<Arc<AppState>>, RawQuery(q): RawQuery) -> Response {
    let p = match params(q) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    match merged(&state, p.scope).await {
        Ok(m) => json(&m.report(p.top.unwrap_or(DEFAULT_TOP).max(1))),
        Err(r) => r,
    }
}

/// `?limit=`: label names with their distinct value counts.
pub async fn label_names(State(state): State<Arc<AppState>>, RawQuery(q): RawQuery) -> Response {
    let p = match params(q) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    match merged(&state, p.scope).await {
        Ok(m) => json(&m.label_names(p.top.unwrap_or(20).max(1))),
        Err(r) => r,
    }
}

/// `?label_names[]=span_name&limit=`: the values of those labels with their series counts.
pub async fn label_values(State(state): State<Arc<AppState>>, RawQuery(q): RawQuery) -> Response {
    let p = match params(q) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    if p.label_names.is_empty() {
        return bad("give at least one label_names[]=NAME".into());
    }
    match merged(&state, p.scope).await {
        Ok(m) => json(&m.label_values(&p.label_names, p.top.unwrap_or(20).max(1))),
        Err(r) => r,
    }
}
