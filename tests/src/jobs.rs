//! Following CI jobs through the Jobs API.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use buildkube_proto::jobs::{self as api, jobs_client::JobsClient};
use buildkube_reapi::AuthChannel;
use futures::StreamExt as _;

/// Whether `job` has ended (passed, failed or cancelled).
pub fn job_finished(job: &api::Job) -> bool {
    matches!(
        job.state(),
        api::JobState::Succeeded | api::JobState::Failed | api::JobState::Cancelled
    )
}

/// Watches job `id` of `instance` (WatchJob) until `done` holds and returns
/// it then; fails naming `what` and the last state seen after `timeout`.
pub async fn watch_job_until(
    jobs: &mut JobsClient<AuthChannel>,
    instance: &str,
    id: &str,
    what: &str,
    timeout: Duration,
    done: impl Fn(&api::Job) -> bool,
) -> Result<api::Job> {
    let mut updates = jobs
        .watch_job(api::WatchJobRequest {
            instance_name: instance.into(),
            job_id: id.into(),
        })
        .await?
        .into_inner();
    let mut last = None;
    let waited = tokio::time::timeout(timeout, async {
        while let Some(job) = updates.next().await {
            let job = job?;
            let ok = done(&job);
            last = Some(job);
            if ok {
                return anyhow::Ok(true);
            }
        }
        anyhow::Ok(false)
    })
    .await;
    let last = last.context("WatchJob sends the job at once")?;
    match waited {
        Ok(Ok(true)) => Ok(last),
        Ok(Ok(false)) => bail!("WatchJob ended before {what}: {last:#?}"),
        Ok(Err(error)) => Err(error.context(format!("watching job {id} for {what}"))),
        Err(_) => bail!("waiting for {what} for {timeout:?}: {last:#?}"),
    }
}
