//! CI jobs in the server: the job runner over this server's scheduler, CAS,
//! credentials and durable store, and the webhook endpoints' secrets.

use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;
use buildkube_config::{JobArgs, WebhookCloneUrl};
use buildkube_jobs::run::{
    BlobSource, CloneUrl, JobCredentials, JobLimits, JobRunner, MintedToken, NoCredentials,
};
use buildkube_jobs::webhook::{GitHubWebhook, GitLabWebhook, WebhookSecrets};
use buildkube_reapi::Digest;
use buildkube_records::RecordStore;
use buildkube_scheduler::Scheduler;
use bytes::Bytes;

use crate::auth::Authenticator;
use crate::storage::SharedBlobStore;

/// The CAS as the job runner reads it (pipeline files).
struct CasBlobs(SharedBlobStore);

#[async_trait]
impl BlobSource for CasBlobs {
    async fn read_blob(&self, digest: Digest) -> Result<Option<Bytes>, String> {
        self.0.get(&digest).await.map_err(|e| e.to_string())
    }
}

impl JobCredentials for Authenticator {
    fn mint(&self, job_id: &str, instance: &str) -> Option<MintedToken> {
        let (token, hash) = self.mint_job_token(job_id, instance);
        Some(MintedToken { token, hash })
    }

    fn honour(&self, job_id: &str, instance: &str, hash: &str) {
        self.honour_job_token(job_id, instance, hash);
    }

    fn revoke(&self, job_id: &str) {
        self.revoke_job_tokens(job_id);
    }
}

/// The job runner of a server: its jobs kept in `records`.
pub fn runner(
    args: &JobArgs,
    scheduler: Arc<Scheduler>,
    cas: SharedBlobStore,
    auth: Option<Arc<Authenticator>>,
    records: Arc<dyn RecordStore>,
) -> JobRunner {
    let credentials: Arc<dyn JobCredentials> = match auth {
        Some(auth) => auth,
        None => Arc::new(NoCredentials),
    };
    JobRunner::new(
        scheduler,
        Arc::new(CasBlobs(cas)),
        credentials,
        Some(records),
        JobLimits {
            max_unfinished_per_instance: args.max_unfinished_jobs,
            retain_finished: args.retain_finished_jobs.max(1),
            ..JobLimits::default()
        },
    )
}

/// The webhook endpoints a server serves, and where their jobs run.
#[derive(Debug, Clone)]
pub struct Webhooks {
    /// `POST /webhooks/github`, if a secret file is set.
    pub github: Option<GitHubWebhook>,
    /// `POST /webhooks/gitlab`, if a token file is set.
    pub gitlab: Option<GitLabWebhook>,
    /// The instance webhook jobs run on.
    pub instance: String,
    /// Which of the delivery's clone URLs the job clones.
    pub clone_url: CloneUrl,
}

impl Webhooks {
    /// Reads the secret files `args` names; an unreadable or empty one is
    /// an error naming it and its flag.
    pub fn load(args: &JobArgs, first_instance: &str) -> anyhow::Result<Webhooks> {
        let github = args
            .github_webhook_secret_file
            .as_ref()
            .map(|path| WebhookSecrets::from_file(path).map(GitHubWebhook::new))
            .transpose()
            .context("--github-webhook-secret-file")?;
        let gitlab = args
            .gitlab_webhook_token_file
            .as_ref()
            .map(|path| WebhookSecrets::from_file(path).map(GitLabWebhook::new))
            .transpose()
            .context("--gitlab-webhook-token-file")?;
        Ok(Webhooks {
            github,
            gitlab,
            instance: args
                .webhook_instance
                .clone()
                .unwrap_or_else(|| first_instance.to_string()),
            clone_url: match args.webhook_clone_url {
                WebhookCloneUrl::Ssh => CloneUrl::Ssh,
                WebhookCloneUrl::Https => CloneUrl::Https,
            },
        })
    }
}
