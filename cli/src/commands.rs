//! The commands, over the Jobs service and the CAS.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use buildkube_proto::jobs::{self as api, jobs_client::JobsClient};
use buildkube_reapi::{connect_channel, AuthChannel, CasClient, CasClientError, Digest};
use futures::StreamExt;

use crate::progress::{job_state, step_state, summary, Progress};
use crate::{ArtifactsCommand, Cli, Command, Exit, RunArgs};

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The command line or a file it names is unusable.
    #[error("{0}")]
    Usage(String),
    /// The server could not be reached or refused a call.
    #[error("{call}: {status}")]
    Server {
        /// The call.
        call: &'static str,
        /// What the server (or the transport) said.
        status: String,
    },
    /// A local file could not be written.
    #[error("{0}")]
    LocalFile(String),
}

impl Failure {
    /// The exit code that reports it.
    pub fn exit(&self) -> Exit {
        match self {
            Failure::Usage(_) => Exit::Usage,
            Failure::Server { .. } => Exit::Server,
            Failure::LocalFile(_) => Exit::LocalFile,
        }
    }
}

fn rpc(call: &'static str) -> impl FnOnce(tonic::Status) -> Failure {
    move |status| Failure::Server {
        call,
        status: format!("{:?}: {}", status.code(), status.message()),
    }
}

/// The exit code of a job's outcome (`Success` while it runs).
fn outcome(job: &api::Job) -> Exit {
    match job.state() {
        api::JobState::Failed => Exit::JobFailed,
        api::JobState::Cancelled => Exit::JobCancelled,
        _ => Exit::Success,
    }
}

fn finished(job: &api::Job) -> bool {
    matches!(
        job.state(),
        api::JobState::Succeeded | api::JobState::Failed | api::JobState::Cancelled
    )
}

struct Session {
    instance: String,
    channel: AuthChannel,
    jobs: JobsClient<AuthChannel>,
}

pub(crate) async fn run(cli: Cli) -> Result<Exit, Failure> {
    let client = &cli.client;
    let token = match &client.auth_token_file {
        Some(path) => Some(
            buildkube_config::auth::read_token_file(path)
                .map_err(|e| Failure::Usage(format!("--auth-token-file: {e}")))?,
        ),
        None => None,
    };
    let channel = connect_channel(&client.server, token.as_deref(), &client.tls)
        .map_err(|e| Failure::Usage(format!("--server: {e}")))?;
    let session = Session {
        instance: client.instance.clone(),
        jobs: JobsClient::new(channel.clone()),
        channel,
    };
    match cli.command {
        Command::Run(args) => session.run(args).await,
        Command::Jobs { watch, limit } => session.list(watch, limit).await,
        Command::Logs { follow, job, step } => session.logs(&job, step.as_deref(), follow).await,
        Command::Cancel { job } => session.cancel(&job).await,
        Command::Artifacts(ArtifactsCommand::Download {
            job,
            path,
            output,
            step,
        }) => session.download(&job, &path, output, step.as_deref()).await,
    }
}

impl Session {
    async fn get(&self, job: &str) -> Result<api::Job, Failure> {
        Ok(self
            .jobs
            .clone()
            .get_job(api::GetJobRequest {
                instance_name: self.instance.clone(),
                job_id: job.to_string(),
            })
            .await
            .map_err(rpc("GetJob"))?
            .into_inner())
    }

    async fn run(&self, args: RunArgs) -> Result<Exit, Failure> {
        let job = self
            .jobs
            .clone()
            .run(api::RunRequest {
                instance_name: self.instance.clone(),
                repository: args.repo,
                git_ref: args.git_ref,
                commit: args.commit.unwrap_or_default(),
            })
            .await
            .map_err(rpc("Run"))?
            .into_inner();
        println!("{}", job.id);
        if !args.wait {
            return Ok(Exit::Success);
        }
        let job = self.wait(&job.id).await?;
        Ok(outcome(&job))
    }

    /// Watches a job until it finished, showing its progress on stderr.
    async fn wait(&self, id: &str) -> Result<api::Job, Failure> {
        let mut updates = self
            .jobs
            .clone()
            .watch_job(api::WatchJobRequest {
                instance_name: self.instance.clone(),
                job_id: id.to_string(),
            })
            .await
            .map_err(rpc("WatchJob"))?
            .into_inner();
        let mut progress = Progress::new();
        let mut last = None;
        while let Some(job) = updates.next().await {
            let job = job.map_err(rpc("WatchJob"))?;
            progress.show(&job);
            last = Some(job);
        }
        progress.done();
        match last {
            Some(job) if finished(&job) => Ok(job),
            // The stream ended early (server restart): ask again.
            _ => Box::pin(self.wait(id)).await,
        }
    }

    async fn list(&self, watch: bool, limit: u32) -> Result<Exit, Failure> {
        let terminal = std::io::stdout().is_terminal();
        let mut shown: HashMap<String, String> = HashMap::new();
        loop {
            let jobs = self
                .jobs
                .clone()
                .list_jobs(api::ListJobsRequest {
                    instance_name: self.instance.clone(),
                    page_size: limit,
                    page_token: String::new(),
                })
                .await
                .map_err(rpc("ListJobs"))?
                .into_inner()
                .jobs;
            if !watch {
                print_table(&jobs);
                return Ok(Exit::Success);
            }
            if terminal {
                print!("\x1b[2J\x1b[H");
                print_table(&jobs);
            } else {
                // A line per job whose state changed, oldest first.
                for job in jobs.iter().rev() {
                    let line = summary(job);
                    if shown.get(&job.id) != Some(&line) {
                        println!("{line}");
                        shown.insert(job.id.clone(), line);
                    }
                }
            }
            let _ = std::io::stdout().flush();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn logs(&self, id: &str, step: Option<&str>, follow: bool) -> Result<Exit, Failure> {
        let mut job = self.get(id).await?;
        let keys: Vec<String> = match step {
            Some(key) => vec![key.to_string()],
            None => job.steps.iter().map(|s| s.key.clone()).collect(),
        };
        let mut keys = std::collections::VecDeque::from(keys);
        let mut printed: Vec<String> = Vec::new();
        while let Some(key) = keys.pop_front() {
            let mut attempt = 1;
            loop {
                let Some(current) = job.steps.iter().find(|s| s.key == key).cloned() else {
                    return Err(Failure::Usage(format!(
                        "job {id} has no step {key:?}; its steps are {}",
                        job.steps
                            .iter()
                            .map(|s| s.key.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                };
                if current.attempts < attempt {
                    if !follow || is_done(&current) {
                        if current.attempts == 0 && step.is_none() {
                            eprintln!("--- {key}: {}", step_state(&current));
                        }
                        break;
                    }
                    // Not started yet: wait for the job to move.
                    job = self.next_change(&job).await?;
                    continue;
                }
                if step.is_none() || current.attempts > 1 {
                    eprintln!("--- {key} (attempt {attempt})");
                }
                self.print_log(id, &key, attempt, follow).await?;
                attempt += 1;
                job = self.get(id).await?;
            }
            printed.push(key);
            if step.is_none() {
                // Steps added once the pipeline file was read.
                for s in &job.steps {
                    if !printed.contains(&s.key) && !keys.contains(&s.key) {
                        keys.push_back(s.key.clone());
                    }
                }
            }
        }
        if !follow {
            return Ok(Exit::Success);
        }
        if step.is_some() {
            return Ok(Exit::Success);
        }
        let job = self.wait_quietly(id).await?;
        eprintln!("job {id} {}{}", job_state(&job), message(&job));
        Ok(outcome(&job))
    }

    /// Waits until `job` changes (or finished), by watching it.
    async fn next_change(&self, job: &api::Job) -> Result<api::Job, Failure> {
        let mut updates = self
            .jobs
            .clone()
            .watch_job(api::WatchJobRequest {
                instance_name: self.instance.clone(),
                job_id: job.id.clone(),
            })
            .await
            .map_err(rpc("WatchJob"))?
            .into_inner();
        let mut latest = job.clone();
        while let Some(update) = updates.next().await {
            let update = update.map_err(rpc("WatchJob"))?;
            if update != *job {
                return Ok(update);
            }
            latest = update;
        }
        Ok(latest)
    }

    async fn wait_quietly(&self, id: &str) -> Result<api::Job, Failure> {
        let mut job = self.get(id).await?;
        while !finished(&job) {
            job = self.next_change(&job).await?;
        }
        Ok(job)
    }

    async fn print_log(
        &self,
        id: &str,
        key: &str,
        attempt: u32,
        follow: bool,
    ) -> Result<(), Failure> {
        let mut chunks = self
            .jobs
            .clone()
            .stream_logs(api::StreamLogsRequest {
                instance_name: self.instance.clone(),
                job_id: id.to_string(),
                step_key: key.to_string(),
                follow,
                attempt,
                offset: 0,
            })
            .await
            .map_err(rpc("StreamLogs"))?
            .into_inner();
        let mut stdout = std::io::stdout();
        let mut expected = 0u64;
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(rpc("StreamLogs"))?;
            if chunk.offset > expected {
                eprintln!(
                    "--- {key}: {} bytes not kept live (the whole log is stored when the step ends)",
                    chunk.offset - expected
                );
            } else if chunk.offset < expected {
                eprintln!("--- {key}: the step restarted on another worker");
            }
            expected = chunk.offset + chunk.data.len() as u64;
            stdout
                .write_all(&chunk.data)
                .and_then(|()| stdout.flush())
                .map_err(|e| Failure::LocalFile(format!("writing the log to stdout: {e}")))?;
        }
        Ok(())
    }

    async fn cancel(&self, id: &str) -> Result<Exit, Failure> {
        let job = self
            .jobs
            .clone()
            .cancel_job(api::CancelJobRequest {
                instance_name: self.instance.clone(),
                job_id: id.to_string(),
            })
            .await
            .map_err(rpc("CancelJob"))?
            .into_inner();
        eprintln!("job {id} {}{}", job_state(&job), message(&job));
        Ok(outcome(&job))
    }

    async fn download(
        &self,
        id: &str,
        path: &str,
        output: Option<PathBuf>,
        step: Option<&str>,
    ) -> Result<Exit, Failure> {
        let job = self.get(id).await?;
        let found: Vec<(&str, &api::Artifact)> = job
            .steps
            .iter()
            .filter(|s| step.is_none_or(|k| k == s.key))
            .flat_map(|s| s.artifacts.iter().map(move |a| (s.key.as_str(), a)))
            .filter(|(_, a)| a.path == path)
            .collect();
        let (key, artifact) = match found.as_slice() {
            [one] => *one,
            [] => {
                let all: Vec<String> = job
                    .steps
                    .iter()
                    .flat_map(|s| {
                        s.artifacts
                            .iter()
                            .map(move |a| format!("{}:{}", s.key, a.path))
                    })
                    .collect();
                return Err(Failure::Usage(format!(
                    "job {id} has no artifact {path:?}{}; its artifacts: {}",
                    step.map(|k| format!(" in step {k}")).unwrap_or_default(),
                    if all.is_empty() {
                        "none".into()
                    } else {
                        all.join(", ")
                    }
                )));
            }
            several => {
                let keys: Vec<&str> = several.iter().map(|(k, _)| *k).collect();
                return Err(Failure::Usage(format!(
                    "steps {} of job {id} each kept {path:?}; choose one with --step",
                    keys.join(", ")
                )));
            }
        };
        let digest = Digest::from_field(artifact.digest.as_ref()).map_err(|e| Failure::Server {
            call: "GetJob",
            status: format!("artifact {path:?} of step {key}: {e}"),
        })?;
        let output = output.unwrap_or_else(|| {
            PathBuf::from(
                std::path::Path::new(path)
                    .file_name()
                    .unwrap_or(std::ffi::OsStr::new("artifact")),
            )
        });
        // Written beside the target and renamed once verified: a failed
        // download leaves no partial file under the artifact's name.
        let partial = output.with_file_name(format!(
            ".{}.partial-{}",
            output
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            std::process::id()
        ));
        let cas = CasClient::new(self.channel.clone(), &self.instance);
        let result = cas.download_to_file(digest, &partial).await;
        if let Err(error) = result {
            let _ = std::fs::remove_file(&partial);
            return Err(match error {
                CasClientError::Io { .. } => Failure::LocalFile(error.to_string()),
                other => Failure::Server {
                    call: "ByteStream.Read",
                    status: other.to_string(),
                },
            });
        }
        std::fs::rename(&partial, &output).map_err(|e| {
            let _ = std::fs::remove_file(&partial);
            Failure::LocalFile(format!("writing {}: {e}", output.display()))
        })?;
        eprintln!(
            "{path} ({digest}) from step {key} written to {}",
            output.display()
        );
        Ok(Exit::Success)
    }
}

fn is_done(step: &api::JobStep) -> bool {
    matches!(
        step.state(),
        api::StepState::Succeeded
            | api::StepState::Failed
            | api::StepState::Skipped
            | api::StepState::Cancelled
    )
}

fn message(job: &api::Job) -> String {
    if job.message.is_empty() {
        String::new()
    } else {
        format!(": {}", job.message)
    }
}

fn print_table(jobs: &[api::Job]) {
    println!(
        "{:<36}  {:<9}  {:<24}  {:<12}  STEPS",
        "JOB", "STATE", "REF", "COMMIT"
    );
    for job in jobs {
        let steps: Vec<String> = job
            .steps
            .iter()
            .map(|s| format!("{}:{}", s.key, step_state(s)))
            .collect();
        let commit: String = job.commit.chars().take(12).collect();
        println!(
            "{:<36}  {:<9}  {:<24}  {:<12}  {}",
            job.id,
            job_state(job),
            job.git_ref,
            commit,
            steps.join(" ")
        );
    }
}
