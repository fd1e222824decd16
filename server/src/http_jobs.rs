//! CI jobs on the HTTP port: the forges' webhooks (`POST /webhooks/github`,
//! `POST /webhooks/gitlab`), authenticated by their signature or token, and
//! the job pages (`GET /jobs/{id}`, `GET /jobs/{id}/steps/{key}/log`) with
//! the same bearer auth as the operation pages.

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use buildkube_config::jobs::{GITHUB_WEBHOOK_PATH, GITLAB_WEBHOOK_PATH};
use buildkube_jobs::run::{JobError, JobRunner};
use buildkube_jobs::webhook::{WebhookError, WebhookOutcome, DEFAULT_MAX_BODY_BYTES};
use buildkube_jobs::Trigger;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use crate::http::HttpState;
use crate::job_logs::{LogRequest, StepLogs};
use crate::jobs::Webhooks;

/// What the job routes need, set once storage is open.
#[derive(Clone)]
pub struct JobsHttp {
    /// The server's jobs.
    pub runner: JobRunner,
    /// Their logs.
    pub logs: StepLogs,
    /// The webhook endpoints.
    pub webhooks: Webhooks,
}

/// The job and webhook routes.
pub(crate) fn routes() -> Router<HttpState> {
    Router::new()
        .route(GITHUB_WEBHOOK_PATH, post(github))
        .route(GITLAB_WEBHOOK_PATH, post(gitlab))
        // One byte over the webhooks' own limit, so they answer 413 themselves.
        .layer(DefaultBodyLimit::max(DEFAULT_MAX_BODY_BYTES + 1))
        .route("/jobs/{id}", get(job))
        .route("/jobs/{id}/steps/{key}/log", get(step_log))
}

fn text(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, format!("{message}\n")).into_response()
}

fn opening() -> Response {
    text(StatusCode::SERVICE_UNAVAILABLE, "opening storage")
}

async fn github(State(state): State<HttpState>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(jobs) = state.jobs.get() else {
        return opening();
    };
    let Some(hook) = &jobs.webhooks.github else {
        return text(
            StatusCode::NOT_FOUND,
            "GitHub webhooks are not enabled on this server (--github-webhook-secret-file)",
        );
    };
    let outcome = hook.receive(&headers, &body);
    delivered(jobs, "GitHub", outcome).await
}

async fn gitlab(State(state): State<HttpState>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(jobs) = state.jobs.get() else {
        return opening();
    };
    let Some(hook) = &jobs.webhooks.gitlab else {
        return text(
            StatusCode::NOT_FOUND,
            "GitLab webhooks are not enabled on this server (--gitlab-webhook-token-file)",
        );
    };
    let outcome = hook.receive(&headers, &body);
    delivered(jobs, "GitLab", outcome).await
}

/// Answers a delivery: a refused one with its status (401 when
/// unauthenticated: nothing is created), an ignored one 200, a run 201
/// with the new job.
async fn delivered(
    jobs: &JobsHttp,
    forge: &str,
    outcome: Result<WebhookOutcome, WebhookError>,
) -> Response {
    let trigger: Trigger = match outcome {
        Err(error) => {
            if error.is_unauthenticated() {
                tracing::warn!(forge, %error, "webhook delivery refused: not authenticated");
            } else {
                tracing::info!(forge, %error, "webhook delivery refused");
            }
            return text(error.status(), error);
        }
        Ok(WebhookOutcome::Ignored { event, reason }) => {
            tracing::debug!(forge, %event, %reason, "webhook delivery runs nothing");
            return Json(serde_json::json!({ "ignored": event, "reason": reason })).into_response();
        }
        Ok(WebhookOutcome::Run(trigger)) => trigger,
    };
    let webhooks = &jobs.webhooks;
    match jobs
        .runner
        .start_for_trigger(&trigger, &webhooks.instance, webhooks.clone_url)
        .await
    {
        Ok(job) => (
            StatusCode::CREATED,
            Json(serde_json::json!({
                "job": job.id,
                "instance": job.instance,
                "repository": job.repository,
                "ref": job.git_ref,
                "commit": job.commit,
            })),
        )
            .into_response(),
        Err(error @ JobError::InstanceFull { .. }) => text(StatusCode::TOO_MANY_REQUESTS, error),
        Err(error) => text(StatusCode::BAD_REQUEST, error),
    }
}

/// The job's record as JSON, without the hashes of its credentials.
async fn job(
    State(state): State<HttpState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let caller = match state.caller(&headers) {
        Ok(caller) => caller,
        Err(response) => return response,
    };
    let Some(jobs) = state.jobs.get() else {
        return opening();
    };
    match jobs.runner.find(&id) {
        Some(job) if caller.may_read(&job.instance) => {
            let mut value = serde_json::to_value(&job).expect("a job record serializes");
            if let Some(object) = value.as_object_mut() {
                object.remove("token_hashes");
            }
            Json(value).into_response()
        }
        // Another instance's job is not shown, nor said to exist.
        _ => text(StatusCode::NOT_FOUND, format!("job {id:?} not found")),
    }
}

#[derive(serde::Deserialize)]
struct LogQuery {
    /// Keep streaming while the step runs (default true).
    follow: Option<bool>,
    /// The attempt (default: the latest).
    attempt: Option<u32>,
}

/// A step's log as text: live while it runs, then from the CAS.
async fn step_log(
    State(state): State<HttpState>,
    headers: HeaderMap,
    Path((id, key)): Path<(String, String)>,
    Query(query): Query<LogQuery>,
) -> Response {
    let caller = match state.caller(&headers) {
        Ok(caller) => caller,
        Err(response) => return response,
    };
    let Some(jobs) = state.jobs.get() else {
        return opening();
    };
    let Some(job) = jobs
        .runner
        .find(&id)
        .filter(|j| caller.may_read(&j.instance))
    else {
        return text(StatusCode::NOT_FOUND, format!("job {id:?} not found"));
    };
    let pieces = jobs.logs.stream(LogRequest {
        instance: job.instance,
        job_id: id,
        step_key: key,
        attempt: query.attempt.unwrap_or(0),
        offset: 0,
        follow: query.follow.unwrap_or(true),
    });
    match pieces {
        Ok(pieces) => {
            let body = ReceiverStream::new(pieces).map(|piece| {
                piece
                    .map(|p| p.data)
                    .map_err(|status| std::io::Error::other(status.message().to_string()))
            });
            (
                [("content-type", "text/plain; charset=utf-8")],
                Body::from_stream(body),
            )
                .into_response()
        }
        Err(status) if status.code() == tonic::Code::NotFound => {
            text(StatusCode::NOT_FOUND, status.message())
        }
        Err(status) => text(StatusCode::TOO_MANY_REQUESTS, status.message()),
    }
}
