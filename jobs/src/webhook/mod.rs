//! Webhook deliveries that start a pipeline: GitHub `push` and
//! `pull_request` (signed with HMAC-SHA256 in `X-Hub-Signature-256`) and
//! GitLab push (`X-Gitlab-Token`), turned into a typed [`Trigger`].
//!
//! A delivery is checked in this order, so an unauthenticated request costs
//! at most one HMAC over a bounded body and creates nothing: size, then
//! signature or token, then event and payload. The HTTP layer maps each
//! [`WebhookError`] to its status with [`WebhookError::status`] (401 for a
//! bad or missing signature).

pub mod github;
pub mod gitlab;
mod secrets;
mod trigger;

#[cfg(test)]
mod tests;

use std::fmt;

use http::{HeaderMap, StatusCode};

pub use github::GitHubWebhook;
pub use gitlab::GitLabWebhook;
pub use secrets::{SecretsFileError, WebhookSecrets, MAX_SECRETS, MAX_SECRETS_FILE_BYTES};
pub use trigger::{CommitSha, GitRef, Provider, RepositoryUrls, Trigger, TriggerEvent};

/// The largest delivery body accepted by default
/// ([`buildkube_config::jobs::WEBHOOK_MAX_BODY_BYTES`]); the endpoint holds
/// no more than this per request.
pub const DEFAULT_MAX_BODY_BYTES: usize = buildkube_config::jobs::WEBHOOK_MAX_BODY_BYTES;

/// What a delivery asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookOutcome {
    /// Run the pipeline of this commit.
    Run(Trigger),
    /// An authentic delivery that starts nothing: a ping, a branch deleted,
    /// a pull request closed or labelled, an event we do not run on.
    Ignored {
        /// The event, as its header named it.
        event: String,
        /// Why nothing runs.
        reason: String,
    },
}

/// Why a delivery was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// The body is larger than the endpoint accepts.
    #[error("the delivery is {size} bytes, more than the limit of {max}")]
    BodyTooLarge {
        /// The body's size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The signature or token header is absent.
    #[error("{header} is missing")]
    MissingCredential {
        /// The header that should carry it.
        header: &'static str,
    },
    /// The signature header is not `sha256=` and 64 hex digits.
    #[error("{header} is malformed: {reason}")]
    MalformedSignature {
        /// The header.
        header: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The signature or token matches none of the secrets.
    #[error("{header} matches no webhook secret")]
    BadCredential {
        /// The header that carried it.
        header: &'static str,
    },
    /// The header naming the event is absent or not text.
    #[error("{header} is missing")]
    MissingEvent {
        /// The header.
        header: &'static str,
    },
    /// The body does not hold the event's payload.
    #[error("{event} payload: {path}: {message}")]
    Payload {
        /// The event.
        event: String,
        /// The field, e.g. `repository.clone_url`.
        path: String,
        /// What is wrong.
        message: String,
    },
}

impl WebhookError {
    /// Whether the delivery failed authentication (nothing in it may be
    /// trusted or acted on).
    pub fn is_unauthenticated(&self) -> bool {
        matches!(
            self,
            WebhookError::MissingCredential { .. }
                | WebhookError::MalformedSignature { .. }
                | WebhookError::BadCredential { .. }
        )
    }

    /// The HTTP status to answer with: 413 too large, 401 unauthenticated,
    /// 400 for an authentic delivery we cannot read.
    pub fn status(&self) -> StatusCode {
        match self {
            WebhookError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            e if e.is_unauthenticated() => StatusCode::UNAUTHORIZED,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

fn check_size(body: &[u8], max: usize) -> Result<(), WebhookError> {
    if body.len() > max {
        return Err(WebhookError::BodyTooLarge {
            size: body.len(),
            max,
        });
    }
    Ok(())
}

/// A header's value as text, if present and visible ASCII.
fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The header naming the event, bounded (it is echoed in errors).
fn event_header(headers: &HeaderMap, name: &'static str) -> Result<String, WebhookError> {
    match header(headers, name) {
        Some(event) if !event.is_empty() && event.len() <= 64 => Ok(event.to_string()),
        _ => Err(WebhookError::MissingEvent { header: name }),
    }
}

/// A delivery id header, kept only if short and printable.
fn delivery_header(headers: &HeaderMap, name: &str) -> Option<String> {
    header(headers, name)
        .filter(|id| !id.is_empty() && id.len() <= 128)
        .map(str::to_string)
}

/// Parses a payload, naming the field that does not fit.
fn parse_payload<'a, T: serde::Deserialize<'a>>(
    event: &str,
    body: &'a [u8],
) -> Result<T, WebhookError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        WebhookError::Payload {
            event: event.to_string(),
            path: if path == "." {
                "(top level)".into()
            } else {
                path
            },
            message: e.inner().to_string(),
        }
    })
}

/// An error about a field whose value parsed but is not acceptable.
fn bad_field(event: &str, path: &str, message: impl fmt::Display) -> WebhookError {
    WebhookError::Payload {
        event: event.to_string(),
        path: path.to_string(),
        message: message.to_string(),
    }
}
