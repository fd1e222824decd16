//! The HTTP side: probes, Prometheus metrics and operation timelines.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use buildkube_config as names;

use crate::farm::Farm;

/// What the HTTP handlers read. The HTTP port serves from the start, before
/// storage is open (which can take long on a large CAS), so that liveness
/// holds while readiness waits: `farm` is set once storage is open.
#[derive(Clone, Default)]
pub struct HttpState {
    /// Shared server state, once storage is open.
    pub farm: Arc<OnceLock<Arc<Farm>>>,
    /// True once the gRPC listener serves.
    pub ready: Arc<AtomicBool>,
}

/// The answer of the routes that need the farm while storage is opening.
fn opening() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, "opening storage\n").into_response()
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
        .route("/operations/{id}", get(operation))
        .with_state(state)
}

async fn readyz(State(state): State<HttpState>) -> Response {
    if state.ready.load(Ordering::Acquire) {
        "ready\n".into_response()
    } else {
        let stage = if state.farm.get().is_some() {
            "starting\n"
        } else {
            "opening storage\n"
        };
        (StatusCode::SERVICE_UNAVAILABLE, stage).into_response()
    }
}

async fn metrics(State(state): State<HttpState>) -> Response {
    let Some(farm) = state.farm.get() else {
        return opening();
    };
    let stats = farm.scheduler.stats();
    // Remote stores do not report usage cheaply: their gauges read 0.
    let (bytes, blobs) = farm.cas.usage().unwrap_or((0, 0));
    (
        [("content-type", "text/plain; version=0.0.4")],
        farm.metrics.render(&stats, bytes, blobs),
    )
        .into_response()
}

async fn recent_operations(
    State(state): State<HttpState>,
    Query(query): Query<RecentQuery>,
) -> Response {
    let Some(farm) = state.farm.get() else {
        return opening();
    };
    Json(farm.scheduler.recent(query.limit.unwrap_or(100))).into_response()
}

async fn operation(State(state): State<HttpState>, Path(id): Path<String>) -> Response {
    let Some(farm) = state.farm.get() else {
        return opening();
    };
    let name = format!("operations/{id}");
    match farm.scheduler.summary_of(&name) {
        Some(summary) => Json(summary).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            format!("operation {name} not found\n"),
        )
            .into_response(),
    }
}
