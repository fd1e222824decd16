//! A request for a job, from a client's `Run` or a webhook's trigger,
//! checked before anything is created: what ends up on a worker's git
//! command line is bounded text that cannot pass for an option.

use super::record::{now_ms, JobRecord, JobState, StepRecord, TriggerRecord, PIPELINE_STEP_KEY};
use crate::webhook::{Provider, Trigger, TriggerEvent};

/// Bytes of a repository URL or ref.
pub const MAX_REQUEST_TEXT_BYTES: usize = 1024;

/// Which of a forge's clone URLs webhook jobs use: the one the workers'
/// credentials fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CloneUrl {
    /// `git@host:owner/name.git`, with the workers' SSH key.
    #[default]
    Ssh,
    /// `https://host/owner/name.git`, with the workers' credentials file.
    Https,
}

/// What a job is asked to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRequest {
    /// The instance it runs on.
    pub instance: String,
    /// Clone URL.
    pub repository: String,
    /// Full ref or branch name.
    pub git_ref: String,
    /// The exact commit, if known.
    pub commit: Option<String>,
    /// What asked for it.
    pub trigger: TriggerRecord,
}

/// A field of a job request that is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct RequestError {
    /// `repository`, `git_ref`, `commit` or `instance_name`.
    pub field: &'static str,
    /// What is wrong.
    pub message: String,
}

fn refuse(field: &'static str, message: impl Into<String>) -> RequestError {
    RequestError {
        field,
        message: message.into(),
    }
}

fn check_text(field: &'static str, text: &str) -> Result<(), RequestError> {
    if text.is_empty() {
        return Err(refuse(field, "is empty"));
    }
    if text.len() > MAX_REQUEST_TEXT_BYTES {
        return Err(refuse(
            field,
            format!(
                "is {} bytes, more than the limit of {MAX_REQUEST_TEXT_BYTES}",
                text.len()
            ),
        ));
    }
    if text.starts_with('-') {
        return Err(refuse(field, format!("{text:?} starts with '-'")));
    }
    if text.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(refuse(
            field,
            format!("{text:?} holds a space or control character"),
        ));
    }
    Ok(())
}

fn check_repository(url: &str) -> Result<(), RequestError> {
    check_text("repository", url)?;
    let scp_like = url
        .split_once(':')
        .is_some_and(|(host, path)| host.contains('@') && !host.contains('/') && !path.is_empty());
    let schemes = ["ssh://", "https://", "http://", "file://", "git://"];
    if !(scp_like || schemes.iter().any(|s| url.starts_with(s))) {
        return Err(refuse(
            "repository",
            format!("{url:?} is not a clone URL (ssh://, user@host:path, https://, http://, git://, file://)"),
        ));
    }
    Ok(())
}

fn check_ref(name: &str) -> Result<(), RequestError> {
    check_text("git_ref", name)?;
    let bad_char = name
        .chars()
        .any(|c| matches!(c, '~' | '^' | ':' | '?' | '*' | '[' | '\\'));
    let bad_component = name
        .split('/')
        .any(|c| c.is_empty() || c.starts_with('.') || c.ends_with(".lock"));
    if bad_char || bad_component || name.contains("..") || name.contains("@{") {
        return Err(refuse(
            "git_ref",
            format!("{name:?} is not a valid git ref"),
        ));
    }
    Ok(())
}

fn check_commit(sha: &str) -> Result<(), RequestError> {
    let hex = sha
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !(sha.len() == 40 || sha.len() == 64) || !hex {
        let shown: String = sha.chars().take(80).collect();
        return Err(refuse(
            "commit",
            format!("{shown:?} is not a commit id (40 or 64 lowercase hex digits)"),
        ));
    }
    Ok(())
}

impl JobRequest {
    /// A client's `Run`.
    pub fn run(instance: &str, repository: &str, git_ref: &str, commit: &str) -> JobRequest {
        JobRequest {
            instance: instance.to_string(),
            repository: repository.to_string(),
            git_ref: git_ref.to_string(),
            commit: (!commit.is_empty()).then(|| commit.to_string()),
            trigger: TriggerRecord {
                source: "api".into(),
                event: "run".into(),
                delivery: None,
            },
        }
    }

    /// A webhook delivery's trigger, cloned through `clone_url`.
    pub fn from_trigger(trigger: &Trigger, instance: &str, clone_url: CloneUrl) -> JobRequest {
        let event = match &trigger.event {
            TriggerEvent::Push => "push".to_string(),
            TriggerEvent::PullRequest { number, action, .. } => {
                format!("pull_request #{number} ({action})")
            }
        };
        JobRequest {
            instance: instance.to_string(),
            repository: match clone_url {
                CloneUrl::Ssh => trigger.repository.ssh.clone(),
                CloneUrl::Https => trigger.repository.https.clone(),
            },
            git_ref: trigger.git_ref.to_string(),
            commit: Some(trigger.commit.to_string()),
            trigger: TriggerRecord {
                source: match trigger.provider {
                    Provider::GitHub => "github",
                    Provider::GitLab => "gitlab",
                }
                .into(),
                event,
                delivery: trigger.delivery.clone(),
            },
        }
    }

    /// Checks the request and makes the new job's record: queued, with its
    /// pipeline step waiting.
    pub fn into_record(self) -> Result<JobRecord, RequestError> {
        check_repository(&self.repository)?;
        check_ref(&self.git_ref)?;
        if let Some(commit) = &self.commit {
            check_commit(commit)?;
        }
        Ok(JobRecord {
            id: uuid::Uuid::new_v4().to_string(),
            instance: self.instance,
            repository: self.repository,
            git_ref: self.git_ref,
            commit: self.commit,
            trigger: self.trigger,
            state: JobState::Queued,
            message: String::new(),
            created_ms: now_ms(),
            finished_ms: None,
            pipeline_file: None,
            steps: vec![StepRecord::new(PIPELINE_STEP_KEY, vec![])],
            token_hashes: vec![],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_requests_refuse_what_could_reach_git_as_an_option_or_be_unbounded() {
        let ok = |repo: &str, r: &str, c: &str| JobRequest::run("main", repo, r, c).into_record();
        for repo in [
            "ssh://git@host/r.git",
            "git@github.com:o/r.git",
            "https://h/r.git",
            "file:///tmp/r.git",
        ] {
            assert!(ok(repo, "refs/heads/main", "").is_ok(), "{repo}");
        }
        assert!(ok("file:///r", "main", &"a".repeat(40)).is_ok());
        for (repo, r, c, field) in [
            ("--upload-pack=x", "main", "", "repository"),
            ("/tmp/r", "main", "", "repository"),
            ("https://h/r x", "main", "", "repository"),
            ("file:///r", "-x", "", "git_ref"),
            ("file:///r", "a..b", "", "git_ref"),
            ("file:///r", "", "", "git_ref"),
            ("file:///r", "main", "abc", "commit"),
            ("file:///r", "main", &"A".repeat(40), "commit"),
        ] {
            let err = ok(repo, r, c).unwrap_err();
            assert_eq!(err.field, field, "{repo} {r} {c}: {err}");
        }
        let long = format!("https://h/{}", "a".repeat(MAX_REQUEST_TEXT_BYTES));
        assert!(ok(&long, "main", "").unwrap_err().message.contains("limit"));
    }
}
