//! The task that drives one job from its pipeline step to its outcome: it
//! queues steps in the scheduler, follows their progress, applies the
//! decisions of [`super::plan`], and is the only writer of the job's record.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use buildkube_proto::worker as wire;
use buildkube_reapi::Digest;
use buildkube_scheduler::{NewStep, StepOutcome, StepProgress};
use tokio::sync::{mpsc, watch};

use super::plan::{end_attempt, AfterAttempt, AttemptEnd, RanAttempt};
use super::record::{
    ms_of_timestamp, now_ms, ArtifactRecord, AttemptRecord, JobRecord, JobState, StepEvent,
    StepState, PIPELINE_STEP_KEY,
};
use super::server_side::MintedToken;
use super::Inner;
use crate::pipeline::{limits, Pipeline, Retry, Step};

/// Progress of one attempt of one step, forwarded from the scheduler.
struct Progress {
    key: String,
    attempt: u32,
    progress: StepProgress,
}

/// Updates of a step's operation, forwarded to the driver until it finishes.
const PROGRESS_BUFFER: usize = 64;

struct Driver {
    inner: Arc<Inner>,
    job: JobRecord,
    pipeline: Option<Pipeline>,
    /// The token given to the command steps this driver queues (minted
    /// when the first is queued).
    token: Option<MintedToken>,
    progress_tx: mpsc::Sender<Progress>,
    /// Forwarders of the steps queued or running, by key.
    forwarders: HashMap<String, tokio::task::JoinHandle<()>>,
}

/// Drives job `id` until it finished or is cancelled. `resume`: the job was
/// restored after a restart and its steps may be queued or running already.
pub(super) async fn drive(
    inner: Arc<Inner>,
    id: String,
    mut cancel: watch::Receiver<Option<String>>,
    resume: bool,
) {
    let Some(job) = inner
        .table
        .lock()
        .unwrap()
        .by_id
        .get(&id)
        .map(|e| e.record.borrow().clone())
    else {
        return;
    };
    let (progress_tx, mut progress_rx) = mpsc::channel(PROGRESS_BUFFER);
    let mut driver = Driver {
        inner,
        job,
        pipeline: None,
        token: None,
        progress_tx,
        forwarders: HashMap::new(),
    };
    if resume {
        driver.resume().await;
    } else {
        driver.start_pipeline_step(1).await;
    }
    let stopping = stopped(driver.inner.stopping.subscribe());
    tokio::pin!(stopping);
    while !driver.job.state.is_finished() {
        tokio::select! {
            Some(progress) = progress_rx.recv() => driver.on_progress(progress).await,
            Ok(()) = cancel.changed() => {
                let why = cancel.borrow().clone();
                if let Some(why) = why {
                    driver.cancel(&why).await;
                }
            }
            // The server stops: the job stays as stored, to resume at the next start.
            () = &mut stopping => {
                driver.detach();
                return;
            }
        }
    }
    driver.finished().await;
}

impl Driver {
    /// Publishes and stores the record; a finished job's is published by
    /// [`Driver::finished`], once its credentials are revoked and it is
    /// booked, so whoever sees it finished sees all of that done.
    async fn publish(&self) {
        if !self.job.state.is_finished() {
            self.inner.publish(&self.job).await;
        }
    }

    /// Picks a resumed job up where the restart left it.
    async fn resume(&mut self) {
        let pipeline_step = self.job.step(PIPELINE_STEP_KEY).cloned();
        if pipeline_step
            .as_ref()
            .is_some_and(|s| s.state == StepState::Succeeded)
        {
            match self.read_pipeline().await {
                Ok(pipeline) => self.pipeline = Some(pipeline),
                Err(message) => {
                    self.fail_job(message).await;
                    return;
                }
            }
        }
        let in_flight: Vec<(String, u32, String)> = self
            .job
            .steps
            .iter()
            .filter(|s| matches!(s.state, StepState::Queued | StepState::Running))
            .filter_map(|s| {
                let attempt = s.current()?;
                Some((s.key.clone(), attempt.attempt, attempt.operation.clone()))
            })
            .collect();
        for (key, attempt, operation) in in_flight {
            match self.inner.scheduler.watch_step(&operation) {
                Some(progress) => self.forward(&key, attempt, progress),
                None => {
                    tracing::warn!(job = %self.job.id, step = %key, %operation, "the step's operation did not survive the restart; running it again");
                    if let Some(attempt) = self.job.step_mut(&key).and_then(|s| s.current_mut()) {
                        attempt.ended = true;
                        attempt.timeline.push(StepEvent {
                            name: "lost in a server restart".into(),
                            start_ms: now_ms(),
                            end_ms: None,
                            worker: None,
                        });
                    }
                    self.start_attempt(&key, attempt + 1).await;
                }
            }
        }
        match pipeline_step.map(|s| s.state) {
            Some(StepState::Waiting) => self.start_pipeline_step(1).await,
            Some(StepState::Succeeded) => self.advance().await,
            _ => {}
        }
        self.publish().await;
    }

    /// Queues attempt `attempt` of the pipeline step.
    async fn start_pipeline_step(&mut self, attempt: u32) {
        self.start_attempt(PIPELINE_STEP_KEY, attempt).await;
    }

    /// The scheduler's request for attempt `attempt` of step `key`.
    fn new_step(&mut self, key: &str, attempt: u32) -> NewStep {
        let job = &self.job;
        let mut spec = wire::StepSpec {
            job_id: job.id.clone(),
            step_key: key.to_string(),
            repository: job.repository.clone(),
            git_ref: job.git_ref.clone(),
            commit: job.commit.clone().unwrap_or_default(),
            instance_name: job.instance.clone(),
            attempt,
            ..Default::default()
        };
        if key == PIPELINE_STEP_KEY {
            spec.set_kind(wire::StepKind::Pipeline);
            spec.timeout = Some(duration(self.inner.limits.pipeline_step_timeout));
            return NewStep {
                instance: job.instance.clone(),
                platform: vec![],
                priority: self.inner.limits.priority,
                spec,
                max_attempts: Retry::default().worker_lost + 1,
            };
        }
        let step: Step = self
            .pipeline
            .as_ref()
            .and_then(|p| p.step(key))
            .cloned()
            .expect("command steps come from the parsed pipeline");
        spec.set_kind(wire::StepKind::Command);
        spec.commands = step.commands.iter().map(|c| c.to_string()).collect();
        spec.env = step
            .env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        spec.timeout = Some(duration(Duration::from_secs(step.timeout_secs)));
        spec.artifact_globs = step.artifacts.iter().map(|g| g.to_string()).collect();
        if self.token.is_none() {
            self.token = self.inner.credentials.mint(&job.id, &job.instance);
            if let Some(token) = &self.token {
                self.job.token_hashes.push(token.hash.clone());
            }
        }
        spec.farm_token = self
            .token
            .as_ref()
            .map(|t| t.token.clone())
            .unwrap_or_default();
        NewStep {
            instance: self.job.instance.clone(),
            platform: step
                .platform
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            priority: self.inner.limits.priority,
            spec,
            max_attempts: step.retry.worker_lost + 1,
        }
    }

    /// Queues attempt `attempt` of step `key` and follows it; a refusal
    /// (the instance's queue is full) fails the step.
    async fn start_attempt(&mut self, key: &str, attempt: u32) {
        let new = self.new_step(key, attempt);
        match self.inner.scheduler.enqueue_step(new) {
            Ok((operation, progress)) => {
                tracing::debug!(job = %self.job.id, step = key, attempt, %operation, "step queued");
                if self.job.state == JobState::Queued {
                    self.job.state = JobState::Running;
                }
                let step = self.job.step_mut(key).expect("the step exists");
                step.state = StepState::Queued;
                step.attempts.push(AttemptRecord {
                    attempt,
                    operation,
                    workers: vec![],
                    log: None,
                    ended: false,
                    timeline: vec![StepEvent {
                        name: "queued".into(),
                        start_ms: now_ms(),
                        end_ms: None,
                        worker: None,
                    }],
                });
                self.forward(key, attempt, progress);
            }
            Err(error) => {
                tracing::warn!(job = %self.job.id, step = key, %error, "could not queue a step");
                let step = self.job.step_mut(key).expect("the step exists");
                step.state = StepState::Failed;
                step.message = format!("could not be queued: {error}");
            }
        }
    }

    /// Forwards the step's progress to the driver until it finished.
    fn forward(&mut self, key: &str, attempt: u32, mut progress: watch::Receiver<StepProgress>) {
        let tx = self.progress_tx.clone();
        let key_owned = key.to_string();
        let handle = tokio::spawn(async move {
            loop {
                let current = progress.borrow_and_update().clone();
                let done = matches!(current, StepProgress::Finished(_));
                let message = Progress {
                    key: key_owned.clone(),
                    attempt,
                    progress: current,
                };
                if tx.send(message).await.is_err() || done {
                    return;
                }
                if progress.changed().await.is_err() {
                    return;
                }
            }
        });
        if let Some(old) = self.forwarders.insert(key.to_string(), handle) {
            old.abort();
        }
    }

    async fn on_progress(&mut self, update: Progress) {
        let Some(step) = self.job.step_mut(&update.key) else {
            return;
        };
        let current = step.current().map(|a| a.attempt);
        if current != Some(update.attempt) || step.state.is_finished() {
            return; // an older attempt's news
        }
        match update.progress {
            StepProgress::Queued { attempt: handouts } => {
                if step.state == StepState::Running {
                    step.state = StepState::Queued;
                    if let Some(a) = step.current_mut() {
                        a.timeline.push(StepEvent {
                            name: format!("requeued after hand-out {handouts}: worker lost"),
                            start_ms: now_ms(),
                            end_ms: None,
                            worker: a.workers.last().cloned(),
                        });
                    }
                    self.publish().await;
                }
            }
            StepProgress::Running { worker, .. } => {
                let already = step.state == StepState::Running
                    && step
                        .current()
                        .is_some_and(|a| a.workers.last() == Some(&worker));
                if !already {
                    step.state = StepState::Running;
                    if let Some(a) = step.current_mut() {
                        a.workers.push(worker.clone());
                        a.timeline.push(StepEvent {
                            name: "running".into(),
                            start_ms: now_ms(),
                            end_ms: None,
                            worker: Some(worker),
                        });
                    }
                    self.publish().await;
                }
            }
            StepProgress::Finished(outcome) => {
                let worker = step.current().and_then(|a| a.workers.last().cloned());
                self.forwarders.remove(&update.key);
                self.on_attempt_end(&update.key, attempt_end(outcome, worker))
                    .await;
            }
        }
    }

    async fn on_attempt_end(&mut self, key: &str, end: AttemptEnd) {
        let retry = if key == PIPELINE_STEP_KEY {
            Retry::default()
        } else {
            self.pipeline
                .as_ref()
                .and_then(|p| p.step(key))
                .map(|s| s.retry.clone())
                .unwrap_or_default()
        };
        let ran = match &end {
            AttemptEnd::Ran(ran) => Some(ran.clone()),
            AttemptEnd::Failed { .. } => None,
        };
        let step = self.job.step_mut(key).expect("the step exists");
        let after = end_attempt(step, end, &retry);
        let attempt = step.attempts.len() as u32;
        tracing::info!(job = %self.job.id, step = key, attempt, ?after, "step attempt ended");
        match after {
            AfterAttempt::Rerun => self.start_attempt(key, attempt + 1).await,
            AfterAttempt::Passed if key == PIPELINE_STEP_KEY => {
                let ran = ran.expect("a passed attempt ran");
                if self.job.commit.is_none() {
                    self.job.commit = ran.commit.filter(|c| !c.is_empty());
                }
                self.job.pipeline_file = ran.pipeline_file;
                match self.read_pipeline().await {
                    Ok(pipeline) => {
                        self.job.add_pipeline_steps(&pipeline);
                        self.pipeline = Some(pipeline);
                        // Every step is stored and visible (waiting) before
                        // any is queued: no worker leases a step that
                        // watchers and a restarted server do not know of.
                        self.publish().await;
                    }
                    Err(message) => {
                        let step = self.job.step_mut(key).expect("the step exists");
                        step.state = StepState::Failed;
                        step.message = message.clone();
                        self.fail_job(message).await;
                        return;
                    }
                }
            }
            _ => {}
        }
        self.advance().await;
        self.publish().await;
    }

    /// Skips what a failure blocks, queues what may start, settles the outcome.
    async fn advance(&mut self) {
        self.job.skip_blocked_steps();
        for key in self.job.ready_steps() {
            self.start_attempt(&key, 1).await;
        }
        // A step refused by the scheduler fails at once: skip its dependants too.
        self.job.skip_blocked_steps();
        if self.job.settle() {
            tracing::info!(job = %self.job.id, state = ?self.job.state, message = %self.job.message, "job finished");
        }
    }

    /// Reads and parses the pipeline file the pipeline step reported.
    async fn read_pipeline(&self) -> Result<Pipeline, String> {
        let Some(digest) = self.job.pipeline_file else {
            return Err(format!(
                "the pipeline step reported no {} file",
                crate::pipeline::PIPELINE_PATH
            ));
        };
        read_pipeline(self.inner.blobs.as_ref(), digest).await
    }

    async fn fail_job(&mut self, message: String) {
        tracing::info!(job = %self.job.id, %message, "job failed");
        self.job.finish(JobState::Failed, message);
        self.publish().await;
    }

    /// Cancels the job: stops every queued and running step's operation.
    async fn cancel(&mut self, why: &str) {
        for step in &self.job.steps {
            if matches!(step.state, StepState::Queued | StepState::Running) {
                if let Some(attempt) = step.current() {
                    self.inner
                        .scheduler
                        .cancel(&attempt.operation, &format!("job cancelled: {why}"));
                }
            }
        }
        tracing::info!(job = %self.job.id, reason = why, "job cancelled");
        self.job
            .finish(JobState::Cancelled, format!("cancelled: {why}"));
        self.publish().await;
    }

    /// Stops following the job's steps, leaving its record as it is.
    fn detach(self) {
        for (_, forwarder) in self.forwarders {
            forwarder.abort();
        }
    }

    /// The job ended: its credentials are revoked and it is booked as finished.
    async fn finished(self) {
        for (_, forwarder) in self.forwarders {
            forwarder.abort();
        }
        self.inner.credentials.revoke(&self.job.id);
        self.inner
            .retire(&self.job.id, &self.job.instance, true)
            .await;
        self.inner.publish(&self.job).await;
    }
}

async fn stopped(mut stopping: watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stop| *stop).await;
}

/// Reads pipeline file `digest` (at most the pipeline limit) and parses it.
pub(super) async fn read_pipeline(
    blobs: &dyn super::BlobSource,
    digest: Digest,
) -> Result<Pipeline, String> {
    let path = crate::pipeline::PIPELINE_PATH;
    if digest.size() > limits::MAX_PIPELINE_FILE_BYTES as u64 {
        return Err(format!(
            "{path} is {} bytes, more than the limit of {}",
            digest.size(),
            limits::MAX_PIPELINE_FILE_BYTES
        ));
    }
    let bytes = match blobs.read_blob(digest).await {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return Err(format!("{path} ({digest}) is missing from the CAS")),
        Err(e) => return Err(format!("reading {path} ({digest}) from the CAS: {e}")),
    };
    Pipeline::from_bytes(&bytes).map_err(|e| e.to_string())
}

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// The scheduler's outcome as the plan sees it.
fn attempt_end(outcome: StepOutcome, worker: Option<String>) -> AttemptEnd {
    match outcome {
        StepOutcome::Ran(result) => AttemptEnd::Ran(ran_attempt(result, worker)),
        StepOutcome::Failed(status) => AttemptEnd::Failed {
            cancelled: status.code == tonic::Code::Cancelled as i32,
            message: status.message,
        },
    }
}

fn ran_attempt(result: wire::StepResult, worker: Option<String>) -> RanAttempt {
    let digest = |d: Option<&buildkube_proto::reapi::Digest>| Digest::from_field(d).ok();
    RanAttempt {
        exit_code: result.exit_code,
        message: result.message,
        log: digest(result.log.as_ref()),
        artifacts: result
            .artifacts
            .iter()
            .filter_map(|a| {
                Some(ArtifactRecord {
                    path: a.path.clone(),
                    digest: digest(a.digest.as_ref())?,
                })
            })
            .collect(),
        commit: (!result.commit.is_empty()).then_some(result.commit),
        pipeline_file: digest(result.pipeline_file.as_ref()),
        phases: result
            .phases
            .iter()
            .map(|p| StepEvent {
                name: p.name.clone(),
                start_ms: p.start.as_ref().map(ms_of_timestamp).unwrap_or(0),
                end_ms: p.end.as_ref().map(ms_of_timestamp),
                worker: worker.clone(),
            })
            .collect(),
        worker,
    }
}
