//! The HTTP side: probes, Prometheus metrics and operation timelines.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use buildkube_config as names;

use crate::farm::Farm;

/// What the HTTP handlers read.
#[derive(Clone)]
pub struct HttpState {
    /// Shared server state.
    pub farm: Arc<Farm>,
    /// True once the gRPC listener serves.
    pub ready: Arc<AtomicBool>,
}

#[derive(serde::Deserialize)]
struct RecentQuery {
    limit: Option<usize>,
}

/// Routes: `/healthz`, `/readyz`, `/metrics`, `/operations`, `/operations/{id}`.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route(names::HEALTHZ_PATH, get(|| async { "ok\n" }))
        .route(names::READYZ_PATH, get(readyz))
        .route(names::METRICS_PATH, get(metrics))
        .route("/operations", get(recent_operations))
        .route("/operations/:id", get(operation))
        .with_state(state)
}

async fn readyz(State(state): State<HttpState>) -> Response {
    if state.ready.load(Ordering::Acquire) {
        "ready\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    }
}

async fn metrics(State(state): State<HttpState>) -> Response {
    let stats = state.farm.scheduler.stats();
    // Remote stores do not report usage cheaply: their gauges read 0.
    let (bytes, blobs) = state.farm.cas.usage().unwrap_or((0, 0));
    (
        [("content-type", "text/plain; version=0.0.4")],
        state.farm.metrics.render(&stats, bytes, blobs),
    )
        .into_response()
}

async fn recent_operations(
    State(state): State<HttpState>,
    Query(query): Query<RecentQuery>,
) -> Response {
    Json(state.farm.scheduler.recent(query.limit.unwrap_or(100))).into_response()
}

async fn operation(State(state): State<HttpState>, Path(id): Path<String>) -> Response {
    let name = format!("operations/{id}");
    match state.farm.scheduler.summary_of(&name) {
        Some(summary) => Json(summary).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            format!("operation {name} not found\n"),
        )
            .into_response(),
    }
}
