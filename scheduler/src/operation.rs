//! One operation: the work it runs, where it stands, who watches it, and
//! the longrunning and REAPI messages that show it to clients.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use buildkube_proto::longrunning::{self, operation};
use buildkube_proto::reapi::{self, execution_stage};
use buildkube_proto::rpc;
use buildkube_proto::worker as wire;
use buildkube_reapi::Digest;
use prost::Message;
use tokio::sync::watch;

use crate::platform::PlatformKey;

/// One event of an operation's life, for the timeline on the HTTP side.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TimelineEvent {
    /// What happened: queued, assigned, fetching_inputs, executing, uploading_outputs, completed, requeued, cancelled.
    pub event: String,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u128,
    /// Worker involved, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Free-form detail.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// What the HTTP side shows of an operation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OperationSummary {
    /// Operation name.
    pub name: String,
    /// Instance.
    pub instance: String,
    /// Action digest as `hash/size`.
    pub action_digest: String,
    /// Platform.
    pub platform: String,
    /// QUEUED, EXECUTING or COMPLETED.
    pub stage: &'static str,
    /// Hand-outs so far.
    pub attempts: u32,
    /// Events, oldest first.
    pub timeline: Vec<TimelineEvent>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    Queued,
    Executing,
    Completed,
}

/// What an operation runs: the queued work a worker slot takes. Queues,
/// priorities, leases, requeue and metrics do not look inside it: a CI job
/// step is one more variant, not a second scheduler.
pub(crate) enum Work {
    /// A REAPI action.
    Action(ActionWork),
    /// A step of a CI job (never merged, never cached).
    Step(StepWork),
}

pub(crate) struct ActionWork {
    pub(crate) digest: Digest,
    pub(crate) action: reapi::Action,
    /// Held while unfinished, so that Executes of the same Command share one decoding.
    pub(crate) command: Option<Arc<reapi::Command>>,
}

pub(crate) struct StepWork {
    /// Names the step in logs and on the operations page: the digest of its
    /// spec without the farm token.
    pub(crate) digest: Digest,
    pub(crate) spec: wire::StepSpec,
    /// Hand-outs before a step whose workers keep getting lost fails.
    pub(crate) max_attempts: u32,
    pub(crate) progress: watch::Sender<StepProgress>,
}

/// Where a CI step stands, as its watchers see it.
#[derive(Debug, Clone, PartialEq)]
pub enum StepProgress {
    /// Waiting for a worker; `attempt` hand-outs so far.
    Queued {
        /// Hand-outs so far (0 before the first).
        attempt: u32,
    },
    /// Leased to `worker`.
    Running {
        /// The worker running it.
        worker: String,
        /// Which hand-out this is (1-based).
        attempt: u32,
    },
    /// Done; the last value the channel carries.
    Finished(StepOutcome),
}

/// How a CI step ended.
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutcome {
    /// The worker ran it (whatever the exit code) and reported this.
    Ran(wire::StepResult),
    /// It could not run: its workers were lost beyond its attempts (the
    /// message names every worker tried), it was cancelled, or the worker
    /// refused it.
    Failed(rpc::Status),
}

impl Work {
    /// The key identical work in flight on `instance` shares one operation
    /// under, and its result's action cache entry; `None` for work that
    /// must run on its own and is never cached (`do_not_cache`, steps).
    pub(crate) fn cache_key(&self, instance: &str) -> Option<(String, Digest)> {
        match self {
            Work::Action(a) => (!a.action.do_not_cache).then(|| (instance.to_string(), a.digest)),
            Work::Step(_) => None,
        }
    }

    /// The digest that names the work in logs, metadata and timelines.
    pub(crate) fn digest(&self) -> Digest {
        match self {
            Work::Action(a) => a.digest,
            Work::Step(s) => s.digest,
        }
    }

    /// What the work is, for logs: "action HASH/SIZE" or "step JOB/KEY".
    pub(crate) fn describe(&self) -> String {
        match self {
            Work::Action(a) => format!("action {}", a.digest),
            Work::Step(s) => format!("step {}/{}", s.spec.job_id, s.spec.step_key),
        }
    }

    /// Hand-outs before it fails, if the work sets its own.
    pub(crate) fn max_attempts(&self) -> Option<u32> {
        match self {
            Work::Action(_) => None,
            Work::Step(s) => Some(s.max_attempts),
        }
    }

    /// Drops what only an unfinished operation needs (the action and its
    /// command; a step's commands, environment and credential).
    pub(crate) fn release(&mut self) {
        match self {
            Work::Action(a) => {
                a.action = reapi::Action::default();
                a.command = None;
            }
            Work::Step(s) => {
                s.spec = wire::StepSpec {
                    job_id: std::mem::take(&mut s.spec.job_id),
                    step_key: std::mem::take(&mut s.spec.step_key),
                    attempt: s.spec.attempt,
                    ..Default::default()
                };
            }
        }
    }

    /// The lease that hands this work to a worker.
    pub(crate) fn lease(
        &self,
        lease_id: String,
        operation_name: String,
        keep_alive: Duration,
        attempt: u32,
    ) -> wire::Lease {
        match self {
            Work::Action(a) => wire::Lease {
                lease_id,
                operation_name,
                action_digest: Some(a.digest.to_proto()),
                action: Some(a.action.clone()),
                command_digest: a.action.command_digest.clone(),
                keep_alive_interval: Some(duration_proto(keep_alive)),
                attempt,
                step: None,
            },
            Work::Step(s) => wire::Lease {
                lease_id,
                operation_name,
                keep_alive_interval: Some(duration_proto(keep_alive)),
                attempt,
                step: Some(s.spec.clone()),
                ..Default::default()
            },
        }
    }
}

/// An operation the scheduler tracks, from queued to retired.
pub(crate) struct Operation {
    pub(crate) instance: String,
    pub(crate) work: Work,
    pub(crate) platform: PlatformKey,
    pub(crate) priority: i32,
    /// Order of arrival: FIFO within a priority.
    pub(crate) seq: u64,
    pub(crate) stage: Stage,
    pub(crate) attempts: u32,
    pub(crate) lease: Option<String>,
    pub(crate) workers_tried: Vec<String>,
    pub(crate) queued_at: SystemTime,
    pub(crate) updates: watch::Sender<longrunning::Operation>,
    pub(crate) timeline: Vec<TimelineEvent>,
    pub(crate) unwatched_since: Option<Instant>,
}

impl Operation {
    /// A newly queued operation: no attempt yet, a timeline of one `queued`
    /// event (with `detail`, e.g. what kind of work it is).
    pub(crate) fn queued(
        instance: String,
        work: Work,
        platform: PlatformKey,
        priority: i32,
        seq: u64,
        updates: watch::Sender<longrunning::Operation>,
        detail: Option<String>,
    ) -> Operation {
        Operation {
            instance,
            work,
            platform,
            priority,
            seq,
            stage: Stage::Queued,
            attempts: 0,
            lease: None,
            workers_tried: vec![],
            queued_at: SystemTime::now(),
            updates,
            timeline: vec![event("queued", None, detail)],
            unwatched_since: None,
        }
    }

    /// Tells watchers the operation is at `stage` (not done): queued, or
    /// executing on the last worker tried.
    pub(crate) fn publish(&self, name: &str, stage: execution_stage::Value) {
        self.updates
            .send_replace(pending_operation(name, &self.work.digest(), stage));
        if let Work::Step(step) = &self.work {
            let progress = match (stage, self.workers_tried.last()) {
                (execution_stage::Value::Executing, Some(worker)) => StepProgress::Running {
                    worker: worker.clone(),
                    attempt: self.attempts,
                },
                _ => StepProgress::Queued {
                    attempt: self.attempts,
                },
            };
            step.progress.send_replace(progress);
        }
    }

    /// Whether anyone watches the operation (a client, or a step's job).
    pub(crate) fn watched(&self) -> bool {
        self.updates.receiver_count() > 0
            || matches!(&self.work, Work::Step(s) if s.progress.receiver_count() > 0)
    }

    /// Marks the operation completed with `response` (a step: with
    /// `step_result` if it ran) and tells its watchers; returns its lease,
    /// for the caller to release.
    pub(crate) fn complete(
        &mut self,
        name: &str,
        response: &reapi::ExecuteResponse,
        step_result: Option<wire::StepResult>,
        what: &str,
        worker: Option<&str>,
    ) -> Option<String> {
        self.stage = Stage::Completed;
        self.timeline.push(event(what, worker, None));
        self.updates
            .send_replace(done_operation(name, &self.work.digest(), response));
        if let Work::Step(step) = &self.work {
            let outcome = match step_result {
                Some(result) => StepOutcome::Ran(result),
                None => StepOutcome::Failed(response.status.clone().unwrap_or_else(|| {
                    status(tonic::Code::Unknown, "the step ended without a result")
                })),
            };
            step.progress.send_replace(StepProgress::Finished(outcome));
        }
        // Keep a finished operation's action and command only as long as needed.
        self.work.release();
        self.lease.take()
    }

    /// Its timeline and state for the HTTP side.
    pub(crate) fn summary(&self, name: &str) -> OperationSummary {
        // Worker timestamps arrive with the result, after the server's own
        // events: show everything in the order it happened.
        let mut timeline = self.timeline.clone();
        timeline.sort_by_key(|e| e.at_ms);
        OperationSummary {
            name: name.to_string(),
            instance: self.instance.clone(),
            action_digest: self.work.digest().to_string(),
            platform: self.platform.to_string(),
            stage: match self.stage {
                Stage::Queued => "QUEUED",
                Stage::Executing => "EXECUTING",
                Stage::Completed => "COMPLETED",
            },
            attempts: self.attempts,
            timeline,
        }
    }
}

/// The name of a new operation of `instance`: `INSTANCE/operations/UUID`
/// (`operations/UUID` for the empty instance), as the REAPI suggests, so
/// every name says which instance's scope it is under.
pub fn operation_name(instance: &str) -> String {
    let id = uuid::Uuid::new_v4();
    if instance.is_empty() {
        format!("operations/{id}")
    } else {
        format!("{instance}/operations/{id}")
    }
}

/// The instance an operation name belongs to; `None` if it is not one of
/// ours (instance names cannot contain an `operations` segment, so the split
/// is unambiguous).
pub fn instance_of_operation(name: &str) -> Option<&str> {
    let (instance, id) = match name.strip_prefix("operations/") {
        Some(id) => ("", id),
        None => name.rsplit_once("/operations/")?,
    };
    (!id.is_empty() && !id.contains('/')).then_some(instance)
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
}

/// A timeline event happening now.
pub(crate) fn event(event: &str, worker: Option<&str>, detail: Option<String>) -> TimelineEvent {
    TimelineEvent {
        event: event.to_string(),
        at_ms: now_ms(),
        worker: worker.map(str::to_string),
        detail,
    }
}

/// Timeline events from the worker's own timestamps, which are exact even
/// when a step was too quick to show up in a keep-alive.
pub(crate) fn worker_events(
    metadata: &reapi::ExecutedActionMetadata,
    worker: &str,
) -> Vec<TimelineEvent> {
    let at = |t: &Option<prost_types::Timestamp>| {
        t.as_ref()
            .map(|t| t.seconds.max(0) as u128 * 1000 + (t.nanos.max(0) as u128) / 1_000_000)
    };
    [
        (
            "inputs_fetched",
            at(&metadata.input_fetch_completed_timestamp),
        ),
        ("executed", at(&metadata.execution_completed_timestamp)),
        (
            "outputs_uploaded",
            at(&metadata.output_upload_completed_timestamp),
        ),
    ]
    .into_iter()
    .filter_map(|(name, at_ms)| {
        Some(TimelineEvent {
            event: name.to_string(),
            at_ms: at_ms?,
            worker: Some(worker.to_string()),
            detail: None,
        })
    })
    .collect()
}

pub(crate) fn any<M: Message>(type_name: &str, message: &M) -> prost_types::Any {
    prost_types::Any {
        type_url: format!("type.googleapis.com/{type_name}"),
        value: message.encode_to_vec(),
    }
}

pub(crate) fn status(code: tonic::Code, message: impl Into<String>) -> rpc::Status {
    rpc::Status {
        code: code as i32,
        message: message.into(),
        details: vec![],
    }
}

fn metadata(stage: execution_stage::Value, digest: &Digest) -> prost_types::Any {
    any(
        "build.bazel.remote.execution.v2.ExecuteOperationMetadata",
        &reapi::ExecuteOperationMetadata {
            stage: stage as i32,
            action_digest: Some(digest.to_proto()),
            ..Default::default()
        },
    )
}

/// A finished operation carrying `response`.
pub(crate) fn done_operation(
    name: &str,
    digest: &Digest,
    response: &reapi::ExecuteResponse,
) -> longrunning::Operation {
    longrunning::Operation {
        name: name.to_string(),
        metadata: Some(metadata(execution_stage::Value::Completed, digest)),
        done: true,
        result: Some(operation::Result::Response(any(
            "build.bazel.remote.execution.v2.ExecuteResponse",
            response,
        ))),
    }
}

pub(crate) fn pending_operation(
    name: &str,
    digest: &Digest,
    stage: execution_stage::Value,
) -> longrunning::Operation {
    longrunning::Operation {
        name: name.to_string(),
        metadata: Some(metadata(stage, digest)),
        done: false,
        result: None,
    }
}

fn duration_proto(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// The response for a result the worker reports: its metadata gets the
/// queued time (and the worker, if the worker left it out).
pub(crate) fn ran_response(
    mut result: reapi::ActionResult,
    queued_at: SystemTime,
    worker: &str,
    message: String,
) -> reapi::ExecuteResponse {
    let metadata = result
        .execution_metadata
        .get_or_insert_with(Default::default);
    metadata.queued_timestamp = Some(queued_at.into());
    if metadata.worker.is_empty() {
        metadata.worker = worker.to_string();
    }
    reapi::ExecuteResponse {
        result: Some(result),
        status: Some(status(tonic::Code::Ok, "")),
        message,
        ..Default::default()
    }
}

/// The response for work that could not run: what the command produced
/// before it failed (timeout, stdio cap) travels as an ActionResult detail
/// of the error; clients show it.
pub(crate) fn failed_response(
    error: rpc::Status,
    queued_at: SystemTime,
    message: String,
) -> reapi::ExecuteResponse {
    let partial = error
        .details
        .iter()
        .find(|any| {
            any.type_url
                .ends_with("/build.bazel.remote.execution.v2.ActionResult")
        })
        .and_then(|any| reapi::ActionResult::decode(any.value.as_slice()).ok())
        .map(|mut result| {
            let metadata = result
                .execution_metadata
                .get_or_insert_with(Default::default);
            metadata.queued_timestamp = Some(queued_at.into());
            result
        });
    reapi::ExecuteResponse {
        result: partial,
        status: Some(error),
        message,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_names_carry_their_instance() {
        for instance in ["main", "team/ci", ""] {
            let name = operation_name(instance);
            assert_eq!(instance_of_operation(&name), Some(instance), "{name}");
        }
        for bad in ["", "operations/", "main/operations/a/b", "main/x", "nope"] {
            assert_eq!(instance_of_operation(bad), None, "{bad}");
        }
    }
}
