//! A job as the server keeps it: what started it, where each step stands,
//! every attempt with its worker and timeline. Plain data, serialized as it
//! is into the durable store, shown to clients as `buildkube.jobs.v1.Job`.

use std::time::SystemTime;

use buildkube_proto::jobs as api;
use buildkube_reapi::Digest;
use serde::{Deserialize, Serialize};

/// The key the pipeline step is shown with: it reads the pipeline file, so
/// it exists before any of the pipeline's steps (whose keys cannot start
/// with `:`).
pub const PIPELINE_STEP_KEY: &str = ":pipeline";

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    /// Created; the pipeline step has not started.
    Queued,
    /// A step is queued or running.
    Running,
    /// Every step passed.
    Succeeded,
    /// The pipeline could not be read or a step failed.
    Failed,
    /// Someone cancelled it.
    Cancelled,
}

impl JobState {
    /// Whether the job is over.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    fn to_proto(self) -> api::JobState {
        match self {
            JobState::Queued => api::JobState::Queued,
            JobState::Running => api::JobState::Running,
            JobState::Succeeded => api::JobState::Succeeded,
            JobState::Failed => api::JobState::Failed,
            JobState::Cancelled => api::JobState::Cancelled,
        }
    }
}

/// Where a step stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StepState {
    /// Waiting for the steps it depends on.
    Waiting,
    /// An attempt waits for a worker.
    Queued,
    /// An attempt runs on a worker.
    Running,
    /// Passed.
    Succeeded,
    /// Failed for good (retries spent).
    Failed,
    /// Not run: a step it depends on did not pass.
    Skipped,
    /// The job was cancelled before the step finished.
    Cancelled,
}

impl StepState {
    /// Whether the step will not change any more.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            StepState::Succeeded | StepState::Failed | StepState::Skipped | StepState::Cancelled
        )
    }

    fn to_proto(self) -> api::StepState {
        match self {
            StepState::Waiting => api::StepState::Waiting,
            StepState::Queued => api::StepState::Queued,
            StepState::Running => api::StepState::Running,
            StepState::Succeeded => api::StepState::Succeeded,
            StepState::Failed => api::StepState::Failed,
            StepState::Skipped => api::StepState::Skipped,
            StepState::Cancelled => api::StepState::Cancelled,
        }
    }
}

/// What started a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TriggerRecord {
    /// `api`, `github` or `gitlab`.
    pub source: String,
    /// `run`, `push`, `pull_request #7 (synchronize)`.
    pub event: String,
    /// The forge's delivery id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<String>,
}

/// One event of a step's timeline, times in milliseconds since the epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepEvent {
    /// `queued`, `running`, `checkout`, `hooks:pre-command`, `command`, `upload`, `finished`, `requeued`.
    pub name: String,
    /// When it started.
    pub start_ms: u64,
    /// When it ended; `None` for an instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_ms: Option<u64>,
    /// The worker, if one was involved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
}

/// One attempt of a step: one scheduler operation (which may itself be
/// handed to several workers when workers are lost).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// 1-based.
    pub attempt: u32,
    /// The scheduler operation running it.
    pub operation: String,
    /// Workers it was handed to, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workers: Vec<String>,
    /// Its events, in order.
    #[serde(default)]
    pub timeline: Vec<StepEvent>,
    /// Its whole log in the CAS, once it ran.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_digest_text"
    )]
    pub log: Option<Digest>,
    /// Whether it is over (ran, failed or was cancelled).
    #[serde(default)]
    pub ended: bool,
}

/// A file a step kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactRecord {
    /// Path relative to the working tree.
    pub path: String,
    /// Its bytes in the CAS.
    #[serde(with = "digest_text")]
    pub digest: Digest,
}

/// One step of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Its key ([`PIPELINE_STEP_KEY`] for the pipeline step).
    pub key: String,
    /// Keys of the steps it waits for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// Where it stands.
    pub state: StepState,
    /// The latest attempt's exit code, once one ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Why it failed, was skipped or cancelled.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Every attempt, in order.
    #[serde(default)]
    pub attempts: Vec<AttemptRecord>,
    /// Reruns spent on listed exit codes.
    #[serde(default)]
    pub exit_code_reruns: u32,
    /// The latest attempt's log in the CAS.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_digest_text"
    )]
    pub log: Option<Digest>,
    /// The latest attempt's artifacts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<ArtifactRecord>,
}

impl StepRecord {
    /// A step that has not started.
    pub fn new(key: &str, depends_on: Vec<String>) -> StepRecord {
        StepRecord {
            key: key.to_string(),
            depends_on,
            state: StepState::Waiting,
            exit_code: None,
            message: String::new(),
            attempts: Vec::new(),
            exit_code_reruns: 0,
            log: None,
            artifacts: Vec::new(),
        }
    }

    /// The latest attempt.
    pub fn current(&self) -> Option<&AttemptRecord> {
        self.attempts.last()
    }

    /// The latest attempt, mutable.
    pub fn current_mut(&mut self) -> Option<&mut AttemptRecord> {
        self.attempts.last_mut()
    }
}

/// A job: its request, its state, its steps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    /// A UUID.
    pub id: String,
    /// The instance it runs on.
    pub instance: String,
    /// Clone URL.
    pub repository: String,
    /// The ref it was started for.
    pub git_ref: String,
    /// The commit: requested, or resolved by the pipeline step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// What started it.
    pub trigger: TriggerRecord,
    /// Where it stands.
    pub state: JobState,
    /// Why it failed or was cancelled.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Milliseconds since the epoch.
    pub created_ms: u64,
    /// Milliseconds since the epoch, once finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    /// The pipeline file read at `commit`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_digest_text"
    )]
    pub pipeline_file: Option<Digest>,
    /// The pipeline step first, then the pipeline's steps in file order.
    pub steps: Vec<StepRecord>,
    /// SHA-256 (hex) of the farm credentials minted for the job's steps;
    /// kept so that a restarted server honours them until the job ends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub token_hashes: Vec<String>,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    ms_of(SystemTime::now())
}

/// Milliseconds since the Unix epoch of `time`.
pub fn ms_of(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// Milliseconds since the epoch of a protobuf timestamp (0 before the epoch).
pub fn ms_of_timestamp(t: &prost_types::Timestamp) -> u64 {
    t.seconds.max(0) as u64 * 1000 + (t.nanos.max(0) as u64) / 1_000_000
}

impl JobRecord {
    /// The step with `key`.
    pub fn step(&self, key: &str) -> Option<&StepRecord> {
        self.steps.iter().find(|s| s.key == key)
    }

    /// The step with `key`, mutable.
    pub fn step_mut(&mut self, key: &str) -> Option<&mut StepRecord> {
        self.steps.iter_mut().find(|s| s.key == key)
    }

    /// The job as clients see it.
    pub fn to_proto(&self) -> api::Job {
        api::Job {
            id: self.id.clone(),
            instance_name: self.instance.clone(),
            repository: self.repository.clone(),
            git_ref: self.git_ref.clone(),
            commit: self.commit.clone().unwrap_or_default(),
            trigger: Some(api::Trigger {
                source: self.trigger.source.clone(),
                event: self.trigger.event.clone(),
                delivery: self.trigger.delivery.clone().unwrap_or_default(),
            }),
            state: self.state.to_proto() as i32,
            message: self.message.clone(),
            steps: self.steps.iter().map(step_to_proto).collect(),
            created: Some(timestamp(self.created_ms)),
            finished: self.finished_ms.map(timestamp),
            pipeline_file: self.pipeline_file.map(|d| d.to_proto()),
        }
    }
}

fn step_to_proto(step: &StepRecord) -> api::JobStep {
    let mut workers: Vec<String> = Vec::new();
    let mut timeline = Vec::new();
    for attempt in &step.attempts {
        for worker in &attempt.workers {
            if workers.last() != Some(worker) {
                workers.push(worker.clone());
            }
        }
        for event in &attempt.timeline {
            timeline.push(api::StepEvent {
                name: event.name.clone(),
                start: Some(timestamp(event.start_ms)),
                end: event.end_ms.map(timestamp),
                attempt: attempt.attempt,
                worker: event.worker.clone().unwrap_or_default(),
            });
        }
    }
    api::JobStep {
        key: step.key.clone(),
        state: step.state.to_proto() as i32,
        exit_code: step.exit_code.unwrap_or(0),
        attempts: step.attempts.len() as u32,
        workers,
        timeline,
        log: step.log.map(|d| d.to_proto()),
        artifacts: step
            .artifacts
            .iter()
            .map(|a| api::Artifact {
                path: a.path.clone(),
                digest: Some(a.digest.to_proto()),
            })
            .collect(),
        message: step.message.clone(),
        depends_on: step.depends_on.clone(),
    }
}

/// A digest as `HASH/SIZE` text in the record.
mod digest_text {
    use buildkube_reapi::Digest;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(digest: &Digest, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(digest)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

mod optional_digest_text {
    use buildkube_reapi::Digest;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(
        digest: &Option<Digest>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match digest {
            Some(digest) => s.collect_str(digest),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Digest>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| text.parse().map_err(serde::de::Error::custom))
            .transpose()
    }
}
