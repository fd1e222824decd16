//! GitHub deliveries: `push` and `pull_request`, signed with HMAC-SHA256 of
//! the body under the webhook's secret, sent as `X-Hub-Signature-256:
//! sha256=<64 hex digits>`.

use http::HeaderMap;
use serde::Deserialize;

use super::trigger::{check_https_url, check_ssh_url, MAX_TEXT_BYTES};
use super::{
    bad_field, check_size, delivery_header, event_header, header, parse_payload, CommitSha, GitRef,
    Provider, RepositoryUrls, Trigger, TriggerEvent, WebhookError, WebhookOutcome, WebhookSecrets,
    DEFAULT_MAX_BODY_BYTES,
};

/// The signature header.
pub const SIGNATURE_HEADER: &str = "X-Hub-Signature-256";
/// The header naming the event (`push`, `pull_request`, `ping`, ...).
pub const EVENT_HEADER: &str = "X-GitHub-Event";
/// The header carrying the delivery's GUID.
pub const DELIVERY_HEADER: &str = "X-GitHub-Delivery";

/// Pull request actions that run the pipeline: new commits to test.
const RUN_ON_ACTIONS: [&str; 3] = ["opened", "reopened", "synchronize"];

/// The GitHub webhook endpoint's logic, without the HTTP server.
#[derive(Debug, Clone)]
pub struct GitHubWebhook {
    secrets: WebhookSecrets,
    max_body_bytes: usize,
}

#[derive(Deserialize)]
struct Repository {
    full_name: String,
    clone_url: String,
    ssh_url: String,
}

#[derive(Deserialize)]
struct PushPayload {
    #[serde(rename = "ref")]
    git_ref: String,
    after: String,
    #[serde(default)]
    deleted: bool,
    repository: Repository,
}

#[derive(Deserialize)]
struct PullRequestPayload {
    action: String,
    number: u64,
    pull_request: PullRequest,
    repository: Repository,
}

#[derive(Deserialize)]
struct PullRequest {
    head: Head,
    base: Base,
}

#[derive(Deserialize)]
struct Head {
    sha: String,
}

#[derive(Deserialize)]
struct Base {
    #[serde(rename = "ref")]
    branch: String,
}

impl GitHubWebhook {
    /// An endpoint accepting deliveries signed with any of `secrets`, up to
    /// [`DEFAULT_MAX_BODY_BYTES`].
    pub fn new(secrets: WebhookSecrets) -> GitHubWebhook {
        GitHubWebhook {
            secrets,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }

    /// The same, with another body size limit.
    pub fn with_max_body_bytes(self, max_body_bytes: usize) -> GitHubWebhook {
        GitHubWebhook {
            max_body_bytes,
            ..self
        }
    }

    /// The largest body accepted; the HTTP layer should stop reading there.
    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }

    /// Checks a delivery's size and signature, then reads its event.
    pub fn receive(
        &self,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<WebhookOutcome, WebhookError> {
        check_size(body, self.max_body_bytes)?;
        self.verify_signature(headers, body)?;
        let event = event_header(headers, EVENT_HEADER)?;
        let delivery = delivery_header(headers, DELIVERY_HEADER);
        match event.as_str() {
            "push" => push(&event, body, delivery),
            "pull_request" => pull_request(&event, body, delivery),
            "ping" => Ok(ignored(&event, "GitHub's test delivery")),
            _ => Ok(ignored(&event, "pipelines run on push and pull_request")),
        }
    }

    fn verify_signature(&self, headers: &HeaderMap, body: &[u8]) -> Result<(), WebhookError> {
        let malformed = |reason| WebhookError::MalformedSignature {
            header: SIGNATURE_HEADER,
            reason,
        };
        if headers.get(SIGNATURE_HEADER).is_none() {
            return Err(WebhookError::MissingCredential {
                header: SIGNATURE_HEADER,
            });
        }
        let value = header(headers, SIGNATURE_HEADER).ok_or(malformed("it is not ASCII text"))?;
        let hex_digits = value
            .strip_prefix("sha256=")
            .ok_or(malformed("it does not start with sha256="))?;
        if hex_digits.len() != 64 {
            return Err(malformed("it is not 64 hex digits after sha256="));
        }
        let signature = hex::decode(hex_digits)
            .map_err(|_| malformed("it is not 64 hex digits after sha256="))?;
        if !self.secrets.signs(body, &signature) {
            return Err(WebhookError::BadCredential {
                header: SIGNATURE_HEADER,
            });
        }
        Ok(())
    }
}

fn ignored(event: &str, reason: &str) -> WebhookOutcome {
    WebhookOutcome::Ignored {
        event: event.to_string(),
        reason: reason.to_string(),
    }
}

fn repository_urls(
    event: &str,
    path: &str,
    repo: Repository,
) -> Result<RepositoryUrls, WebhookError> {
    if repo.full_name.is_empty() || repo.full_name.len() > MAX_TEXT_BYTES {
        return Err(bad_field(
            event,
            &format!("{path}.full_name"),
            "is empty or too long",
        ));
    }
    check_https_url(&repo.clone_url)
        .map_err(|m| bad_field(event, &format!("{path}.clone_url"), m))?;
    check_ssh_url(&repo.ssh_url).map_err(|m| bad_field(event, &format!("{path}.ssh_url"), m))?;
    Ok(RepositoryUrls {
        name: repo.full_name,
        https: repo.clone_url,
        ssh: repo.ssh_url,
    })
}

fn push(
    event: &str,
    body: &[u8],
    delivery: Option<String>,
) -> Result<WebhookOutcome, WebhookError> {
    let payload: PushPayload = parse_payload(event, body)?;
    if payload.deleted || CommitSha::is_null(&payload.after) {
        return Ok(ignored(event, "the ref was deleted"));
    }
    let git_ref = GitRef::try_from(payload.git_ref).map_err(|m| bad_field(event, "ref", m))?;
    let commit = CommitSha::try_from(payload.after).map_err(|m| bad_field(event, "after", m))?;
    Ok(WebhookOutcome::Run(Trigger {
        provider: Provider::GitHub,
        event: TriggerEvent::Push,
        repository: repository_urls(event, "repository", payload.repository)?,
        git_ref,
        commit,
        delivery,
    }))
}

fn pull_request(
    event: &str,
    body: &[u8],
    delivery: Option<String>,
) -> Result<WebhookOutcome, WebhookError> {
    let payload: PullRequestPayload = parse_payload(event, body)?;
    if !RUN_ON_ACTIONS.contains(&payload.action.as_str()) {
        let action: String = payload.action.chars().take(64).collect();
        return Ok(ignored(
            event,
            &format!("action {action:?}: pipelines run when a pull request is opened, reopened or synchronized"),
        ));
    }
    // The head may live in a fork; GitHub keeps it in the base repository
    // as refs/pull/N/head too, so the base repository's URLs and
    // credentials serve every pull request.
    let git_ref = GitRef::try_from(format!("refs/pull/{}/head", payload.number))
        .map_err(|m| bad_field(event, "number", m))?;
    let commit = CommitSha::try_from(payload.pull_request.head.sha)
        .map_err(|m| bad_field(event, "pull_request.head.sha", m))?;
    let base_branch = payload.pull_request.base.branch;
    if base_branch.is_empty() || base_branch.len() > MAX_TEXT_BYTES {
        return Err(bad_field(
            event,
            "pull_request.base.ref",
            "is empty or too long",
        ));
    }
    Ok(WebhookOutcome::Run(Trigger {
        provider: Provider::GitHub,
        event: TriggerEvent::PullRequest {
            number: payload.number,
            action: payload.action,
            base_branch,
        },
        repository: repository_urls(event, "repository", payload.repository)?,
        git_ref,
        commit,
        delivery,
    }))
}
