//! `checkout-time`: how long a CI step's checkout takes on a worker whose
//! git mirror of the repository is cold (the first job a fresh worker runs)
//! and warm (every later job). Jobs of one repository run one after the
//! other through the Jobs API of a real server with real workers; the
//! figures are the `checkout` phases the workers report in each step's
//! timeline (mirror update, plus the working tree for command steps).
//! Start the workers fresh (an empty --work-dir) for a cold first job.

use std::time::Duration;

use anyhow::{bail, ensure, Context};
use buildkube_proto::jobs::{self as api, jobs_client::JobsClient};
use buildkube_reapi::connect_channel;
use clap::Parser;
use futures::StreamExt as _;
use serde::Serialize;

/// Flags of `checkout-time`.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "checkout-time",
    about = "Checkout time of CI steps with a cold and a warm git mirror"
)]
pub struct CheckoutArgs {
    /// The server's gRPC endpoint.
    #[arg(long, default_value = "http://127.0.0.1:8980")]
    pub grpc: String,
    /// Instance the jobs run on.
    #[arg(long, default_value = "main")]
    pub instance: String,
    /// Clone URL of a repository with a `.buildkube/pipeline.yaml`.
    #[arg(long)]
    pub repo: String,
    /// Ref to run.
    #[arg(long = "ref", default_value = "refs/heads/main")]
    pub git_ref: String,
    /// Jobs to run, one after the other (the first is the cold one).
    #[arg(long, default_value_t = 6)]
    pub count: usize,
    /// Longest wait for one job.
    #[arg(long, default_value_t = 600)]
    pub job_timeout_secs: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// One step's checkout.
#[derive(Debug, Clone, Serialize)]
pub struct CheckoutTime {
    /// 0-based job number.
    pub job: usize,
    /// Step key (`:pipeline` or a pipeline step).
    pub step: String,
    /// Worker that checked out.
    pub worker: String,
    /// Milliseconds of the `checkout` phase.
    pub millis: f64,
}

/// What `checkout-time` measured.
#[derive(Debug, Clone, Serialize)]
pub struct CheckoutReport {
    /// Every checkout, in job order.
    pub checkouts: Vec<CheckoutTime>,
}

impl CheckoutReport {
    /// The report for a terminal: every checkout, then cold vs warm.
    pub fn render_text(&self) -> String {
        let mut text = String::new();
        for c in &self.checkouts {
            text.push_str(&format!(
                "job {:>3}  {:<16} {:<24} checkout {:>9.1} ms\n",
                c.job, c.step, c.worker, c.millis
            ));
        }
        // A worker's first checkout of the repository fills its mirror: the
        // pipeline step's checkout is the mirror update alone, a command
        // step's adds a working tree.
        let mut seen = std::collections::HashSet::new();
        let mut groups: [Vec<f64>; 4] = Default::default();
        for c in &self.checkouts {
            let cold = seen.insert(c.worker.clone());
            let command = c.step != ":pipeline";
            groups[usize::from(command) * 2 + usize::from(!cold)].push(c.millis);
        }
        for (i, name) in [
            "pipeline step, cold mirror",
            "pipeline step, warm mirror",
            "command step, cold mirror",
            "command step, warm mirror",
        ]
        .iter()
        .enumerate()
        {
            if !groups[i].is_empty() {
                text.push_str(&format!("{name}: {}\n", summary(&groups[i])));
            }
        }
        text
    }
}

fn summary(values: &[f64]) -> String {
    if values.is_empty() {
        return "none".into();
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    format!(
        "n={} median {:.1} ms, min {:.1} ms, max {:.1} ms",
        sorted.len(),
        median,
        sorted[0],
        sorted[sorted.len() - 1]
    )
}

fn millis(event: &api::StepEvent) -> Option<f64> {
    let (start, end) = (event.start.as_ref()?, event.end.as_ref()?);
    let ms = |t: &prost_types::Timestamp| t.seconds as f64 * 1e3 + t.nanos as f64 / 1e6;
    Some(ms(end) - ms(start))
}

/// Runs the benchmark.
pub async fn run(args: &CheckoutArgs) -> anyhow::Result<CheckoutReport> {
    ensure!(args.count > 0, "--count must be positive");
    let channel = connect_channel(&args.grpc, None, &Default::default())?;
    let mut jobs = JobsClient::new(channel);
    let mut checkouts = Vec::new();
    for n in 0..args.count {
        let job = jobs
            .run(api::RunRequest {
                instance_name: args.instance.clone(),
                repository: args.repo.clone(),
                git_ref: args.git_ref.clone(),
                commit: String::new(),
            })
            .await
            .context("Run")?
            .into_inner();
        let mut updates = jobs
            .watch_job(api::WatchJobRequest {
                instance_name: args.instance.clone(),
                job_id: job.id.clone(),
            })
            .await
            .context("WatchJob")?
            .into_inner();
        let finished = tokio::time::timeout(Duration::from_secs(args.job_timeout_secs), async {
            let mut last = None;
            while let Some(update) = updates.next().await {
                let update = update.context("WatchJob stream")?;
                let done = !matches!(
                    update.state(),
                    api::JobState::Queued | api::JobState::Running
                );
                last = Some(update);
                if done {
                    break;
                }
            }
            last.context("WatchJob ended without the job")
        })
        .await
        .with_context(|| {
            format!(
                "job {} did not finish in {} s",
                job.id, args.job_timeout_secs
            )
        })??;
        if finished.state() != api::JobState::Succeeded {
            bail!(
                "job {} ended {:?}: {} (the repository needs a pipeline that passes)",
                finished.id,
                finished.state(),
                finished.message
            );
        }
        for step in &finished.steps {
            for event in step.timeline.iter().filter(|e| e.name == "checkout") {
                if let Some(millis) = millis(event) {
                    checkouts.push(CheckoutTime {
                        job: n,
                        step: step.key.clone(),
                        worker: event.worker.clone(),
                        millis,
                    });
                }
            }
        }
    }
    ensure!(!checkouts.is_empty(), "no step reported a checkout phase");
    Ok(CheckoutReport { checkouts })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_checkout_per_worker_counts_as_cold() {
        let c = |job, worker: &str, millis| CheckoutTime {
            job,
            step: ":pipeline".into(),
            worker: worker.into(),
            millis,
        };
        let step = |job, key: &str, worker: &str, millis| CheckoutTime {
            job,
            step: key.into(),
            worker: worker.into(),
            millis,
        };
        let report = CheckoutReport {
            checkouts: vec![
                c(0, "a", 900.0),
                step(0, "build", "a", 300.0),
                c(1, "a", 30.0),
                step(1, "build", "a", 200.0),
                c(2, "b", 800.0),
                c(3, "a", 50.0),
            ],
        };
        let text = report.render_text();
        assert!(
            text.contains(
                "pipeline step, cold mirror: n=2 median 900.0 ms, min 800.0 ms, max 900.0 ms\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "pipeline step, warm mirror: n=2 median 50.0 ms, min 30.0 ms, max 50.0 ms\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "command step, warm mirror: n=2 median 300.0 ms, min 200.0 ms, max 300.0 ms\n"
            ) && !text.contains("command step, cold"),
            "{text}"
        );
    }
}
