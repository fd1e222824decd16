//! The worker's HTTP side: `/healthz`, `/readyz` (503 while draining),
//! `/metrics` (Prometheus text) and `/actions` (running leases, JSON).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use buildkube_config::{HEALTHZ_PATH, METRICS_PATH, READYZ_PATH};

use crate::Shared;

/// Path of the JSON list of running actions.
pub const ACTIONS_PATH: &str = "/actions";

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(HEALTHZ_PATH, get(|| async { "ok\n" }))
        .route(READYZ_PATH, get(readyz))
        .route(METRICS_PATH, get(metrics))
        .route(ACTIONS_PATH, get(actions))
        .with_state(shared)
}

async fn readyz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    if shared.metrics.draining.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        shared.metrics.render(&shared.worker_id),
    )
}

async fn actions(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let now = std::time::SystemTime::now();
    let leases = shared.leases.lock().unwrap();
    let mut list: Vec<serde_json::Value> = leases
        .iter()
        .map(|(id, lease)| {
            let (stage, since) = lease.tracker.get();
            serde_json::json!({
                "lease_id": id,
                "operation": lease.operation,
                "action_digest": lease.action_digest,
                "stage": stage.as_str_name(),
                "stage_seconds": now.duration_since(since).unwrap_or_default().as_secs_f64(),
                "running_seconds": now.duration_since(lease.started).unwrap_or_default().as_secs_f64(),
            })
        })
        .collect();
    list.sort_by(|a, b| a["lease_id"].as_str().cmp(&b["lease_id"].as_str()));
    axum::Json(serde_json::json!({ "worker": shared.worker_id, "actions": list }))
}
