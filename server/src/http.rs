//! The HTTP side: probes, operation timelines, jobs and webhooks on
//! `--http-listen`; probes and Prometheus metrics on `--metrics-listen`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use buildkube_config as names;

use crate::auth::{Authenticator, Caller, Identity};
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
    /// The credentials, with `--auth-config`: then the operation pages need
    /// a client token with the `read` scope (they name actions and workers).
    pub auth: Option<Arc<Authenticator>>,
    /// CI jobs and webhooks, once storage is open.
    pub jobs: Arc<OnceLock<crate::http_jobs::JobsHttp>>,
}

impl HttpState {
    /// The client calling, or 401 when auth is on and the request has no
    /// valid token, 403 for a worker credential.
    #[allow(clippy::result_large_err)]
    pub(crate) fn caller(&self, headers: &HeaderMap) -> Result<Caller, Response> {
        let Some(auth) = &self.auth else {
            return Ok(Caller::Open);
        };
        match auth.resolve(
            headers
                .get(names::AUTHORIZATION_HEADER)
                .map(|v| v.as_bytes()),
        ) {
            Caller::Unauthenticated(why) => Err((
                StatusCode::UNAUTHORIZED,
                [("www-authenticate", "Bearer")],
                format!("{why}\n"),
            )
                .into_response()),
            Caller::Known(Identity::Worker { name }) => Err((
                StatusCode::FORBIDDEN,
                format!("worker credential `{name}` cannot read operations; use a client credential with scope `read`\n"),
            )
                .into_response()),
            caller => Ok(caller),
        }
    }
}

/// The answer of the routes that need the farm while storage is opening.
fn opening() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, "opening storage\n").into_response()
}

#[derive(serde::Deserialize)]
struct RecentQuery {
    limit: Option<usize>,
}

/// Routes of `--http-listen`: `/healthz`, `/readyz`, `/operations`,
/// `/operations/{id}`, and the job and webhook routes of [`crate::http_jobs`].
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route(names::HEALTHZ_PATH, get(|| async { "ok\n" }))
        .route(names::READYZ_PATH, get(readyz))
        .route("/operations", get(recent_operations))
        .route("/operations/{id}", get(operation))
        .merge(crate::http_jobs::routes())
        .with_state(state)
}

/// Routes of `--metrics-listen`: `/metrics`, and the probes (plain HTTP, so
/// the kubelet reaches them whatever TLS the other listeners require).
pub fn metrics_router(state: HttpState) -> Router {
    Router::new()
        .route(names::METRICS_PATH, get(metrics))
        .route(names::HEALTHZ_PATH, get(|| async { "ok\n" }))
        .route(names::READYZ_PATH, get(readyz))
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

/// The operations of the instances the caller may read.
async fn recent_operations(
    State(state): State<HttpState>,
    headers: HeaderMap,
    Query(query): Query<RecentQuery>,
) -> Response {
    let caller = match state.caller(&headers) {
        Ok(caller) => caller,
        Err(response) => return response,
    };
    let Some(farm) = state.farm.get() else {
        return opening();
    };
    let limit = query.limit.unwrap_or(100);
    Json(farm.scheduler.recent(limit, |i| caller.may_read(i))).into_response()
}

/// One operation, by the id that ends its name (`INSTANCE/operations/ID`).
async fn operation(
    State(state): State<HttpState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let caller = match state.caller(&headers) {
        Ok(caller) => caller,
        Err(response) => return response,
    };
    let name = format!("operations/{id}");
    let Some(farm) = state.farm.get() else {
        return opening();
    };
    match farm.scheduler.summary_by_id(&id) {
        Some(summary) if caller.may_read(&summary.instance) => Json(summary).into_response(),
        Some(summary) => (
            StatusCode::FORBIDDEN,
            format!(
                "this credential lacks scope `read` on instance {:?}\n",
                summary.instance
            ),
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            format!("operation {name} not found\n"),
        )
            .into_response(),
    }
}
