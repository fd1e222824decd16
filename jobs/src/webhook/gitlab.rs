//! GitLab deliveries: push and tag push hooks, authenticated by the secret
//! token GitLab sends as `X-Gitlab-Token`.

use http::HeaderMap;
use serde::Deserialize;

use super::trigger::{check_https_url, check_ssh_url, MAX_TEXT_BYTES};
use super::{
    bad_field, check_size, delivery_header, event_header, parse_payload, CommitSha, GitRef,
    Provider, RepositoryUrls, Trigger, TriggerEvent, WebhookError, WebhookOutcome, WebhookSecrets,
    DEFAULT_MAX_BODY_BYTES,
};

/// The token header.
pub const TOKEN_HEADER: &str = "X-Gitlab-Token";
/// The header naming the event (`Push Hook`, `Tag Push Hook`, ...).
pub const EVENT_HEADER: &str = "X-Gitlab-Event";
/// The header carrying the delivery's UUID.
pub const DELIVERY_HEADER: &str = "X-Gitlab-Event-UUID";

/// The GitLab webhook endpoint's logic, without the HTTP server.
#[derive(Debug, Clone)]
pub struct GitLabWebhook {
    secrets: WebhookSecrets,
    max_body_bytes: usize,
}

#[derive(Deserialize)]
struct PushPayload {
    object_kind: String,
    #[serde(rename = "ref")]
    git_ref: String,
    /// The commit the ref points at after the push; null when it was deleted.
    checkout_sha: Option<String>,
    after: String,
    project: Project,
}

#[derive(Deserialize)]
struct Project {
    path_with_namespace: String,
    git_http_url: String,
    git_ssh_url: String,
}

impl GitLabWebhook {
    /// An endpoint accepting deliveries carrying any of `secrets` as token,
    /// up to [`DEFAULT_MAX_BODY_BYTES`].
    pub fn new(secrets: WebhookSecrets) -> GitLabWebhook {
        GitLabWebhook {
            secrets,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }

    /// The same, with another body size limit.
    pub fn with_max_body_bytes(self, max_body_bytes: usize) -> GitLabWebhook {
        GitLabWebhook {
            max_body_bytes,
            ..self
        }
    }

    /// The largest body accepted; the HTTP layer should stop reading there.
    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }

    /// Checks a delivery's size and token, then reads its event.
    pub fn receive(
        &self,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<WebhookOutcome, WebhookError> {
        check_size(body, self.max_body_bytes)?;
        // A token that is not visible ASCII cannot be a secret from the file
        // either, but is compared all the same: the answer must not depend
        // on which check refused it.
        let token = headers
            .get(TOKEN_HEADER)
            .ok_or(WebhookError::MissingCredential {
                header: TOKEN_HEADER,
            })?;
        if !self.secrets.is_token(token.as_bytes()) {
            return Err(WebhookError::BadCredential {
                header: TOKEN_HEADER,
            });
        }
        let event = event_header(headers, EVENT_HEADER)?;
        let delivery = delivery_header(headers, DELIVERY_HEADER);
        match event.as_str() {
            "Push Hook" | "Tag Push Hook" => push(&event, body, delivery),
            _ => Ok(WebhookOutcome::Ignored {
                event,
                reason: "pipelines run on push and tag push hooks".into(),
            }),
        }
    }
}

fn push(
    event: &str,
    body: &[u8],
    delivery: Option<String>,
) -> Result<WebhookOutcome, WebhookError> {
    let payload: PushPayload = parse_payload(event, body)?;
    if !matches!(payload.object_kind.as_str(), "push" | "tag_push") {
        let kind: String = payload.object_kind.chars().take(64).collect();
        return Err(bad_field(
            event,
            "object_kind",
            format!("{kind:?} is not push or tag_push"),
        ));
    }
    let checkout_sha = match payload.checkout_sha {
        Some(sha) if !CommitSha::is_null(&payload.after) => sha,
        _ => {
            return Ok(WebhookOutcome::Ignored {
                event: event.to_string(),
                reason: "the ref was deleted".into(),
            })
        }
    };
    let git_ref = GitRef::try_from(payload.git_ref).map_err(|m| bad_field(event, "ref", m))?;
    let commit =
        CommitSha::try_from(checkout_sha).map_err(|m| bad_field(event, "checkout_sha", m))?;
    let project = payload.project;
    if project.path_with_namespace.is_empty() || project.path_with_namespace.len() > MAX_TEXT_BYTES
    {
        return Err(bad_field(
            event,
            "project.path_with_namespace",
            "is empty or too long",
        ));
    }
    check_https_url(&project.git_http_url)
        .map_err(|m| bad_field(event, "project.git_http_url", m))?;
    check_ssh_url(&project.git_ssh_url).map_err(|m| bad_field(event, "project.git_ssh_url", m))?;
    Ok(WebhookOutcome::Run(Trigger {
        provider: Provider::GitLab,
        event: TriggerEvent::Push,
        repository: RepositoryUrls {
            name: project.path_with_namespace,
            https: project.git_http_url,
            ssh: project.git_ssh_url,
        },
        git_ref,
        commit,
        delivery,
    }))
}
