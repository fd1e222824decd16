//! Flags of CI jobs: the server's webhook secrets and job bounds, and the
//! connection flags of the `buildkube` client.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::{ClientTlsArgs, DEFAULT_GRPC_PORT, DEFAULT_INSTANCE};

/// The largest webhook delivery body the server accepts (and the one the
/// generated Ingress lets through). GitHub lists up to 2,048 commits in a
/// push payload; this holds that with room.
pub const WEBHOOK_MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// HTTP path of GitHub webhook deliveries on the server's HTTP port.
pub const GITHUB_WEBHOOK_PATH: &str = "/webhooks/github";
/// HTTP path of GitLab webhook deliveries on the server's HTTP port.
pub const GITLAB_WEBHOOK_PATH: &str = "/webhooks/gitlab";
/// HTTP path of a job's JSON (`/jobs/{id}`).
pub const JOBS_PATH: &str = "/jobs";

/// Which clone URL of a forge's payload a webhook job clones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum WebhookCloneUrl {
    /// `git@host:owner/name.git`, with the workers' SSH key.
    #[default]
    Ssh,
    /// `https://host/owner/name.git`, with the workers' credentials file.
    Https,
}

impl WebhookCloneUrl {
    fn as_arg(self) -> &'static str {
        match self {
            WebhookCloneUrl::Ssh => "ssh",
            WebhookCloneUrl::Https => "https",
        }
    }
}

/// The server's CI job flags.
#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct JobArgs {
    /// File of GitHub webhook secrets, one per line (every listed secret is
    /// accepted, for rotation). Set: `POST /webhooks/github` on the HTTP
    /// port starts jobs for signed push and pull_request deliveries. Unset:
    /// that route answers 404.
    #[arg(long, env = "BUILDKUBE_GITHUB_WEBHOOK_SECRET_FILE")]
    pub github_webhook_secret_file: Option<PathBuf>,
    /// File of GitLab webhook tokens, one per line. Set: `POST
    /// /webhooks/gitlab` starts jobs for push and tag push hooks whose
    /// `X-Gitlab-Token` matches one. Unset: 404.
    #[arg(long, env = "BUILDKUBE_GITLAB_WEBHOOK_TOKEN_FILE")]
    pub gitlab_webhook_token_file: Option<PathBuf>,
    /// Instance webhook jobs run on (default: the first --instance).
    #[arg(long, env = "BUILDKUBE_WEBHOOK_INSTANCE")]
    pub webhook_instance: Option<String>,
    /// Which clone URL of the delivery webhook jobs clone: the one the
    /// workers' git credentials fit.
    #[arg(long, env = "BUILDKUBE_WEBHOOK_CLONE_URL", value_enum, default_value_t = WebhookCloneUrl::Ssh)]
    pub webhook_clone_url: WebhookCloneUrl,
    /// Unfinished (queued or running) jobs per instance; beyond it a Run or
    /// a webhook delivery is refused (RESOURCE_EXHAUSTED, HTTP 429).
    #[arg(long, env = "BUILDKUBE_MAX_UNFINISHED_JOBS", default_value_t = 100)]
    pub max_unfinished_jobs: usize,
    /// Finished jobs remembered (and stored); the oldest finished are forgotten first.
    #[arg(long, env = "BUILDKUBE_RETAIN_FINISHED_JOBS", default_value_t = 1000)]
    pub retain_finished_jobs: usize,
}

impl Default for JobArgs {
    fn default() -> Self {
        crate::ServerArgs::default().jobs
    }
}

impl JobArgs {
    /// The flags that differ from the defaults.
    pub(crate) fn push_args(&self, args: &mut Vec<String>) {
        let default = JobArgs::default();
        if let Some(path) = &self.github_webhook_secret_file {
            args.push(format!("--github-webhook-secret-file={}", path.display()));
        }
        if let Some(path) = &self.gitlab_webhook_token_file {
            args.push(format!("--gitlab-webhook-token-file={}", path.display()));
        }
        if let Some(instance) = &self.webhook_instance {
            args.push(format!("--webhook-instance={instance}"));
        }
        if self.webhook_clone_url != default.webhook_clone_url {
            args.push(format!(
                "--webhook-clone-url={}",
                self.webhook_clone_url.as_arg()
            ));
        }
        if self.max_unfinished_jobs != default.max_unfinished_jobs {
            args.push(format!(
                "--max-unfinished-jobs={}",
                self.max_unfinished_jobs
            ));
        }
        if self.retain_finished_jobs != default.retain_finished_jobs {
            args.push(format!(
                "--retain-finished-jobs={}",
                self.retain_finished_jobs
            ));
        }
    }
}

/// How a client reaches the server: endpoint, instance, credential, TLS.
#[derive(Args, Debug, Clone, PartialEq, Default)]
pub struct ClientArgs {
    /// Server gRPC endpoint, e.g. http://buildkube-server:8980, or https://…
    /// for TLS (see --tls-ca-file).
    #[arg(long, global = true, env = "BUILDKUBE_SERVER", default_value_t = format!("http://127.0.0.1:{DEFAULT_GRPC_PORT}"))]
    pub server: String,
    /// Instance the jobs run on.
    #[arg(long, global = true, env = "BUILDKUBE_INSTANCE", default_value = DEFAULT_INSTANCE)]
    pub instance: String,
    /// File holding the bearer token sent to the server (a client
    /// credential with scope `execute` to run and cancel, `read` to watch).
    #[arg(long, global = true, env = "BUILDKUBE_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// TLS towards an https:// server.
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}
