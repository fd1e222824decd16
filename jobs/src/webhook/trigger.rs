//! What starts a pipeline, whichever forge sent it: the repository, the ref
//! and the exact commit to check out, and the event.

use std::fmt;

/// The forge that sent a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// GitHub (or GitHub Enterprise Server).
    GitHub,
    /// GitLab.
    GitLab,
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Provider::GitHub => "GitHub",
            Provider::GitLab => "GitLab",
        })
    }
}

/// The event a pipeline runs for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TriggerEvent {
    /// A branch or tag was pushed.
    Push,
    /// A pull request was opened, reopened or got new commits.
    PullRequest {
        /// Its number.
        number: u64,
        /// `opened`, `reopened` or `synchronize`.
        action: String,
        /// The branch it would merge into, e.g. `main`.
        base_branch: String,
    },
}

/// Where to clone the repository from; the worker picks the URL its
/// credentials fit (an SSH key or an HTTPS credentials file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepositoryUrls {
    /// `owner/name` (GitHub) or `group/project` (GitLab).
    pub name: String,
    /// `https://host/owner/name.git`.
    pub https: String,
    /// `git@host:owner/name.git`.
    pub ssh: String,
}

/// Bytes of a URL, repository name or ref taken from a payload.
pub(super) const MAX_TEXT_BYTES: usize = 1024;

/// Checks text from a payload that ends up on a git command line: bounded,
/// no control characters or spaces, and not an option (a leading `-`).
pub(super) fn check_git_argument(text: &str) -> Result<(), String> {
    if text.is_empty() {
        return Err("is empty".into());
    }
    if text.len() > MAX_TEXT_BYTES {
        return Err(format!(
            "is {} bytes, more than the limit of {MAX_TEXT_BYTES}",
            text.len()
        ));
    }
    if text.starts_with('-') {
        return Err(format!("{text:?} starts with '-'"));
    }
    if text.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!("{text:?} holds a space or control character"));
    }
    Ok(())
}

/// Checks an HTTPS clone URL.
pub(super) fn check_https_url(url: &str) -> Result<(), String> {
    check_git_argument(url)?;
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        return Err(format!("{url:?} is not an http(s) URL"));
    }
    Ok(())
}

/// Checks an SSH clone URL: `ssh://...` or scp-like `user@host:path`.
pub(super) fn check_ssh_url(url: &str) -> Result<(), String> {
    check_git_argument(url)?;
    let scp_like = url
        .split_once(':')
        .is_some_and(|(host, path)| host.contains('@') && !host.contains('/') && !path.is_empty());
    if !(url.starts_with("ssh://") || scp_like) {
        return Err(format!("{url:?} is not an SSH URL"));
    }
    Ok(())
}

/// A full git ref, `refs/heads/main`, `refs/tags/v1`, `refs/pull/7/head`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GitRef(String);

impl GitRef {
    /// The ref.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The branch name if this is `refs/heads/NAME`.
    pub fn branch(&self) -> Option<&str> {
        self.0.strip_prefix("refs/heads/")
    }
}

impl TryFrom<String> for GitRef {
    type Error = String;
    /// Accepts a full ref that `git check-ref-format` would: under `refs/`,
    /// no `..`, `@{`, empty or dot-led components, `.lock` endings, or
    /// `~^:?*[\` characters.
    fn try_from(name: String) -> Result<GitRef, String> {
        check_git_argument(&name)?;
        if !name.starts_with("refs/") {
            return Err(format!("{name:?} is not a full ref (refs/...)"));
        }
        let bad_char = name
            .chars()
            .any(|c| matches!(c, '~' | '^' | ':' | '?' | '*' | '[' | '\\'));
        let bad_component = name
            .split('/')
            .any(|c| c.is_empty() || c.starts_with('.') || c.ends_with(".lock"));
        if bad_char
            || bad_component
            || name.contains("..")
            || name.contains("@{")
            || name.ends_with('.')
        {
            return Err(format!("{name:?} is not a valid git ref"));
        }
        Ok(GitRef(name))
    }
}

impl fmt::Display for GitRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A commit id: 40 (SHA-1) or 64 (SHA-256 repositories) lowercase hex
/// digits, never all zeros (forges send zeros for "no commit": a deletion).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CommitSha(String);

impl CommitSha {
    /// The hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `text` is the all-zeros id forges send for a deleted ref.
    pub(super) fn is_null(text: &str) -> bool {
        !text.is_empty() && text.bytes().all(|b| b == b'0')
    }
}

impl TryFrom<String> for CommitSha {
    type Error = String;
    fn try_from(sha: String) -> Result<CommitSha, String> {
        let hex = sha
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !(sha.len() == 40 || sha.len() == 64) || !hex {
            let shown: String = sha.chars().take(80).collect();
            return Err(format!(
                "{shown:?} is not a commit id (40 or 64 lowercase hex digits)"
            ));
        }
        if CommitSha::is_null(&sha) {
            return Err("is the all-zeros commit id".into());
        }
        Ok(CommitSha(sha))
    }
}

impl fmt::Display for CommitSha {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A delivery that asks for a pipeline run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trigger {
    /// Who sent it.
    pub provider: Provider,
    /// Why.
    pub event: TriggerEvent,
    /// The repository to clone.
    pub repository: RepositoryUrls,
    /// The ref to fetch: the pushed branch or tag, or `refs/pull/N/head`
    /// (GitHub) for a pull request, fetched from the base repository.
    pub git_ref: GitRef,
    /// The commit to check out, exactly.
    pub commit: CommitSha,
    /// The forge's id of the delivery (`X-GitHub-Delivery`,
    /// `X-Gitlab-Event-UUID`), to recognise a redelivery.
    pub delivery: Option<String>,
}
