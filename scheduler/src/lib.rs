//! The scheduler: operations, per-platform queues, and leases to workers.
//!
//! An accepted action becomes an operation in a queue keyed by (instance,
//! platform). Workers long-poll [`Scheduler::lease`]; the best queued action
//! their platform satisfies (lowest priority value, then oldest) is leased to
//! them. A lease lives while the worker sends keep-alives; a lease that times
//! out is requeued (keeping its place) until `max_attempts` hand-outs, then
//! the operation fails with a clear error. Identical in-flight actions
//! (same instance and action digest, cacheable) share one operation.
//!
//! The parts, each owning its state under the one [`Scheduler`] lock:
//! `operation` (an operation, the work it runs, its client-facing
//! messages), `queue` (the queues), `lease_table` (leases and workers),
//! `stats` (what metrics read); `leasing` is the worker side of the
//! [`Scheduler`], this file the client side; `journal` records unfinished
//! operations in a [`RecordStore`](buildkube_records::RecordStore) and
//! `restore` brings them back at start ([`Scheduler::restore`]).

mod journal;
mod lease_table;
mod leasing;
mod operation;
mod platform;
mod queue;
mod restore;
mod stats;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use buildkube_proto::longrunning;
use buildkube_proto::reapi::{self, execution_stage};
use buildkube_proto::rpc;
use buildkube_proto::worker as wire;
use buildkube_reapi::Digest;
use tokio::sync::{watch, Notify};

pub use journal::{JournalError, FINISHED_KIND, OPERATION_KIND};
pub use lease_table::{LeaseHolder, LeaseRefused};
pub use operation::{
    instance_of_operation, operation_name, OperationSummary, StepOutcome, StepProgress,
    TimelineEvent,
};
pub use platform::PlatformKey;
pub use stats::{Outcome, SchedulerStats};

use journal::{finished_record, FinishedRecord, Journal};
use lease_table::LeaseTable;
use operation::{
    done_operation, event, pending_operation, status, ActionWork, Operation, Stage, StepWork, Work,
};
use queue::Queues;

/// Tuning of the scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// A lease without keep-alive for this long is requeued.
    pub lease_timeout: Duration,
    /// Hand-outs of one action before it fails.
    pub max_attempts: u32,
    /// Finished operations remembered for Get/Wait/timelines.
    pub retain_finished: usize,
    /// An unfinished operation nobody has watched for this long is cancelled.
    pub orphan_timeout: Duration,
    /// Unfinished operations per instance; [`Scheduler::enqueue`] refuses more.
    pub max_unfinished_per_instance: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            lease_timeout: Duration::from_secs(30),
            max_attempts: 3,
            retain_finished: 10_000,
            orphan_timeout: Duration::from_secs(60),
            max_unfinished_per_instance: 50_000,
        }
    }
}

/// An action accepted for execution.
#[derive(Debug, Clone)]
pub struct NewAction {
    /// Instance it belongs to.
    pub instance: String,
    /// Digest of `action`.
    pub action_digest: Digest,
    /// The action.
    pub action: reapi::Action,
    /// Its command, decoded once and shared by every operation that runs it
    /// (workers fetch it from the CAS by digest).
    pub command: Arc<reapi::Command>,
    /// Lower runs sooner.
    pub priority: i32,
}

/// A CI job step to queue beside the actions.
#[derive(Debug, Clone)]
pub struct NewStep {
    /// Instance whose queues and workers it uses.
    pub instance: String,
    /// Properties a worker must offer to run it.
    pub platform: Vec<(String, String)>,
    /// Lower runs sooner.
    pub priority: i32,
    /// What the worker runs.
    pub spec: wire::StepSpec,
    /// Hand-outs before a step whose workers keep getting lost fails (at least 1).
    pub max_attempts: u32,
}

/// Who holds a step's live lease and what it is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepLeaseInfo {
    /// The lease's holder (credential and worker id).
    pub holder: LeaseHolder,
    /// The step's operation.
    pub operation: String,
    /// `StepSpec.job_id`.
    pub job_id: String,
    /// `StepSpec.step_key`.
    pub step_key: String,
    /// `StepSpec.attempt` (the job's count, not the scheduler's hand-outs).
    pub attempt: u32,
}

/// The outcome a worker reports for a lease.
// Short-lived, moved once from the RPC into the scheduler: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum LeaseOutcome {
    /// The action ran.
    Ran(reapi::ActionResult),
    /// The action or step could not run.
    Failed(rpc::Status),
    /// The CI step ran.
    StepRan(wire::StepResult),
}

/// Why [`Scheduler::enqueue`] refused an action.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    /// The instance already has as many unfinished actions as it may.
    #[error("instance {instance:?} already has {limit} actions queued or running (--max-queued-actions); retry later")]
    InstanceFull {
        /// The instance.
        instance: String,
        /// The configured limit.
        limit: usize,
    },
}

#[derive(Default)]
struct State {
    operations: HashMap<String, Operation>,
    /// Cache key of unfinished work → the operation identical work joins.
    in_flight: HashMap<(String, Digest), String>,
    queues: Queues,
    leases: LeaseTable,
    finished: VecDeque<String>,
    outcomes: BTreeMap<Outcome, u64>,
    next_seq: u64,
    /// Instance → operations queued or running.
    unfinished: HashMap<String, usize>,
    /// Where unfinished operations are recorded; `None`: memory only.
    journal: Option<Arc<Journal>>,
    /// Operations that finished before the last restart (at most
    /// `journal::FINISHED_REMEMBERED`), so a client asking is told so.
    finished_before_restart: HashMap<String, FinishedRecord>,
}

impl State {
    /// Marks an operation finished, wakes its watchers, releases its lease.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &mut self,
        name: &str,
        response: reapi::ExecuteResponse,
        step_result: Option<wire::StepResult>,
        outcome: Outcome,
        what: &str,
        worker: Option<&str>,
        retain: usize,
    ) {
        let Some(op) = self.operations.get_mut(name) else {
            return;
        };
        let merge_key = (op.instance.clone(), op.work.digest());
        // Only actions are journaled (a CI job's steps are the job manager's).
        if let (Some(journal), Work::Action(_)) = (&self.journal, &op.work) {
            journal.record_finished(name, &finished_record(&merge_key.1, &response));
        }
        let lease = op.complete(name, &response, step_result, what, worker);
        if let Some(count) = self.unfinished.get_mut(&merge_key.0) {
            *count -= 1;
            if *count == 0 {
                self.unfinished.remove(&merge_key.0);
            }
        }
        if self.in_flight.get(&merge_key).map(String::as_str) == Some(name) {
            self.in_flight.remove(&merge_key);
        }
        if let Some(lease) = lease {
            self.leases.release(&lease);
        }
        *self.outcomes.entry(outcome).or_default() += 1;
        self.retire(name, retain);
    }

    /// Records an unfinished operation's current state in the journal.
    fn journal_operation(&self, name: &str) {
        let (Some(journal), Some(op)) = (&self.journal, self.operations.get(name)) else {
            return;
        };
        let holder = op.lease.as_deref().and_then(|id| self.leases.holder_of(id));
        let holder = holder.map(|h| (h.identity.as_str(), h.worker_id.as_str()));
        if let Some(record) = journal::operation_record(op, holder) {
            journal.record_operation(name, Some(&record));
        }
    }

    fn retire(&mut self, name: &str, retain: usize) {
        self.finished.push_back(name.to_string());
        while self.finished.len() > retain {
            if let Some(old) = self.finished.pop_front() {
                self.operations.remove(&old);
            }
        }
    }
}

/// Operations, queues and leases of every instance this server serves.
pub struct Scheduler {
    state: Mutex<State>,
    work_available: Notify,
    config: SchedulerConfig,
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        if let Some(journal) = self
            .state
            .get_mut()
            .map(|s| s.journal.take())
            .ok()
            .flatten()
        {
            journal.close();
        }
    }
}

impl Scheduler {
    /// A scheduler with no operations, kept in memory only (see
    /// [`Scheduler::restore`] for one that survives a restart).
    pub fn new(config: SchedulerConfig) -> Scheduler {
        Scheduler {
            state: Mutex::new(State::default()),
            work_available: Notify::new(),
            config,
        }
    }

    /// How often workers must send keep-alives.
    pub fn keep_alive_interval(&self) -> Duration {
        (self.config.lease_timeout / 3).max(Duration::from_millis(200))
    }

    /// Queues an action, or joins an identical one in flight. Returns the
    /// operation name and a receiver of its updates; refuses a new operation
    /// when its instance has `max_unfinished_per_instance` already.
    pub fn enqueue(
        &self,
        new: NewAction,
    ) -> Result<(String, watch::Receiver<longrunning::Operation>), EnqueueError> {
        // Command.platform is deprecated, but it is what clients before REAPI
        // v2.2 (Bazel 4) send.
        #[allow(deprecated)]
        let platform = PlatformKey::from_proto(
            new.action
                .platform
                .as_ref()
                .filter(|p| !p.properties.is_empty())
                .or(new.command.platform.as_ref()),
        );
        let work = Work::Action(ActionWork {
            digest: new.action_digest,
            action: new.action,
            command: Some(new.command),
        });
        let merge_key = work.cache_key(&new.instance);
        let mut state = self.state.lock().unwrap();
        if let Some(name) = merge_key.as_ref().and_then(|key| state.in_flight.get(key)) {
            if let Some(op) = state.operations.get(name) {
                tracing::debug!(operation = %name, action = %new.action_digest, "merged with in-flight action");
                return Ok((name.clone(), op.updates.subscribe()));
            }
        }
        let limit = self.config.max_unfinished_per_instance;
        let unfinished = state.unfinished.entry(new.instance.clone()).or_default();
        if *unfinished >= limit {
            tracing::warn!(instance = %new.instance, limit, action = %new.action_digest, "instance queue full; refusing the action");
            return Err(EnqueueError::InstanceFull {
                instance: new.instance,
                limit,
            });
        }
        *unfinished += 1;
        let name = operation_name(&new.instance);
        let seq = state.next_seq;
        state.next_seq += 1;
        let (updates, receiver) = watch::channel(pending_operation(
            &name,
            &new.action_digest,
            execution_stage::Value::Queued,
        ));
        tracing::debug!(operation = %name, action = %new.action_digest, instance = %new.instance, %platform, "action queued");
        let op = Operation::queued(
            new.instance,
            work,
            platform,
            new.priority,
            seq,
            updates,
            None,
        );
        state.queues.push(&name, &op);
        state.operations.insert(name.clone(), op);
        if let Some(key) = merge_key {
            state.in_flight.insert(key, name.clone());
        }
        state.journal_operation(&name);
        drop(state);
        self.work_available.notify_waiters();
        Ok((name, receiver))
    }

    /// Queues a CI job step beside the actions (never merged with other
    /// work). Returns the operation name and a receiver of its progress;
    /// refuses it when its instance has `max_unfinished_per_instance`
    /// operations already.
    pub fn enqueue_step(
        &self,
        new: NewStep,
    ) -> Result<(String, watch::Receiver<StepProgress>), EnqueueError> {
        let platform = PlatformKey::from_pairs(new.platform);
        // The farm token is a secret: it stays out of the step's name.
        let digest = Digest::of_message(&wire::StepSpec {
            farm_token: String::new(),
            ..new.spec.clone()
        });
        let what = format!("step {}/{}", new.spec.job_id, new.spec.step_key);
        let (progress, receiver) = watch::channel(StepProgress::Queued { attempt: 0 });
        let work = Work::Step(StepWork {
            digest,
            spec: new.spec,
            max_attempts: new.max_attempts.max(1),
            progress,
        });
        let mut state = self.state.lock().unwrap();
        let limit = self.config.max_unfinished_per_instance;
        let unfinished = state.unfinished.entry(new.instance.clone()).or_default();
        if *unfinished >= limit {
            tracing::warn!(instance = %new.instance, limit, "instance queue full; refusing the {what}");
            return Err(EnqueueError::InstanceFull {
                instance: new.instance,
                limit,
            });
        }
        *unfinished += 1;
        let name = operation_name(&new.instance);
        let seq = state.next_seq;
        state.next_seq += 1;
        let (updates, _) = watch::channel(pending_operation(
            &name,
            &digest,
            execution_stage::Value::Queued,
        ));
        tracing::debug!(operation = %name, instance = %new.instance, %platform, "{what} queued");
        let no_step_worker = !state.leases.has_step_worker(&new.instance);
        if no_step_worker {
            tracing::warn!(operation = %name, instance = %new.instance, %platform,
                "{what} queued, but no connected worker of the instance runs CI steps (worker flag --run-steps); it waits for one");
        }
        let mut op = Operation::queued(
            new.instance,
            work,
            platform,
            new.priority,
            seq,
            updates,
            Some(what),
        );
        if no_step_worker {
            op.timeline.push(event(
                "waiting",
                None,
                Some("no connected worker runs CI steps (--run-steps)".into()),
            ));
        }
        state.queues.push(&name, &op);
        state.operations.insert(name.clone(), op);
        drop(state);
        self.work_available.notify_waiters();
        Ok((name, receiver))
    }

    /// Subscribes to a step's progress; `None` if `operation` is not a step
    /// the scheduler still remembers.
    pub fn watch_step(&self, operation: &str) -> Option<watch::Receiver<StepProgress>> {
        let state = self.state.lock().unwrap();
        match &state.operations.get(operation)?.work {
            Work::Step(step) => Some(step.progress.subscribe()),
            Work::Action(_) => None,
        }
    }

    /// The step whose live lease `lease_id` is, if `worker_id` holds it
    /// (the caller still checks the credential in `holder`).
    pub fn step_lease(&self, worker_id: &str, lease_id: &str) -> Option<StepLeaseInfo> {
        let state = self.state.lock().unwrap();
        let (operation, holder) = state.leases.live(lease_id)?;
        if holder.worker_id != worker_id {
            return None;
        }
        let op = state.operations.get(operation)?;
        match &op.work {
            Work::Step(step) if op.stage == Stage::Executing => Some(StepLeaseInfo {
                holder: holder.clone(),
                operation: operation.to_string(),
                job_id: step.spec.job_id.clone(),
                step_key: step.spec.step_key.clone(),
                attempt: step.spec.attempt,
            }),
            _ => None,
        }
    }

    /// Records an operation answered from the action cache and returns it (done).
    pub fn record_cached(
        &self,
        instance: &str,
        action_digest: Digest,
        result: reapi::ActionResult,
    ) -> longrunning::Operation {
        let name = operation_name(instance);
        let response = reapi::ExecuteResponse {
            result: Some(result),
            cached_result: true,
            status: Some(status(tonic::Code::Ok, "")),
            ..Default::default()
        };
        let done = done_operation(&name, &action_digest, &response);
        let mut state = self.state.lock().unwrap();
        *state.outcomes.entry(Outcome::Cached).or_default() += 1;
        let (updates, _) = watch::channel(done.clone());
        state.operations.insert(
            name.clone(),
            Operation {
                instance: instance.to_string(),
                work: Work::Action(ActionWork {
                    digest: action_digest,
                    action: reapi::Action::default(),
                    command: None,
                }),
                platform: PlatformKey::default(),
                priority: 0,
                seq: 0,
                stage: Stage::Completed,
                attempts: 0,
                lease: None,
                workers_tried: vec![],
                queued_at: SystemTime::now(),
                updates,
                timeline: vec![event("completed", None, Some("action cache hit".into()))],
                unwatched_since: None,
            },
        );
        state.retire(&name, self.config.retain_finished);
        done
    }

    /// Waits until every change to operations so far is in the journal
    /// (at once without one). Execute awaits it before it answers with an
    /// operation name, Lease before it hands out a lease, Complete before
    /// it confirms a result, so that what they promise survives a restart.
    pub async fn journal_written(&self) -> Result<(), JournalError> {
        let journal = self.state.lock().unwrap().journal.clone();
        match journal {
            Some(journal) => journal.written(journal.recorded()).await,
            None => Ok(()),
        }
    }

    /// What to tell a client about `name` if it finished before the server
    /// last restarted (its result is not kept; the action cache may hold it).
    pub fn finished_before_restart(&self, name: &str) -> Option<String> {
        let state = self.state.lock().unwrap();
        let finished = state.finished_before_restart.get(name)?;
        let digest = finished
            .action_digest
            .as_ref()
            .and_then(|d| Digest::try_from(d).ok())
            .map_or_else(String::new, |d| format!(" (action {d})"));
        Some(format!(
            "operation {name:?}{digest} finished before the server restarted: {}; its result is not kept across restarts, \
             Execute the action again (a cached result is answered from the action cache)",
            finished.outcome()
        ))
    }

    /// Subscribes to an operation's updates.
    pub fn watch(&self, name: &str) -> Option<watch::Receiver<longrunning::Operation>> {
        self.state
            .lock()
            .unwrap()
            .operations
            .get(name)
            .map(|op| op.updates.subscribe())
    }

    /// The instance an operation belongs to.
    pub fn instance_of(&self, name: &str) -> Option<String> {
        self.state
            .lock()
            .unwrap()
            .operations
            .get(name)
            .map(|op| op.instance.clone())
    }

    /// The latest state of an operation.
    pub fn get(&self, name: &str) -> Option<longrunning::Operation> {
        self.state
            .lock()
            .unwrap()
            .operations
            .get(name)
            .map(|op| op.updates.borrow().clone())
    }

    /// Operations of the instances `visible` accepts, ordered by name, paged.
    pub fn list(
        &self,
        visible: impl Fn(&str) -> bool,
        page_size: usize,
        page_token: &str,
    ) -> (Vec<longrunning::Operation>, String) {
        let state = self.state.lock().unwrap();
        let mut names: Vec<&String> = state
            .operations
            .iter()
            .filter(|(name, op)| visible(&op.instance) && name.as_str() > page_token)
            .map(|(name, _)| name)
            .collect();
        names.sort();
        let page_size = if page_size == 0 { 1000 } else { page_size };
        let next = if names.len() > page_size {
            names[page_size - 1].clone()
        } else {
            String::new()
        };
        let ops = names
            .into_iter()
            .take(page_size)
            .map(|n| state.operations[n].updates.borrow().clone())
            .collect();
        (ops, next)
    }

    /// Timelines of the most recent operations of the instances `visible`
    /// accepts, newest first.
    pub fn recent(&self, limit: usize, visible: impl Fn(&str) -> bool) -> Vec<OperationSummary> {
        let state = self.state.lock().unwrap();
        let mut ops: Vec<(&String, &Operation)> = state
            .operations
            .iter()
            .filter(|(_, op)| visible(&op.instance))
            .collect();
        ops.sort_by_key(|(_, op)| std::cmp::Reverse(op.timeline.first().map_or(0, |e| e.at_ms)));
        ops.into_iter()
            .take(limit)
            .map(|(name, op)| op.summary(name))
            .collect()
    }

    /// Timeline of one operation.
    pub fn summary_of(&self, name: &str) -> Option<OperationSummary> {
        let state = self.state.lock().unwrap();
        state.operations.get(name).map(|op| op.summary(name))
    }

    /// Timeline of the operation whose name ends in `operations/{id}`,
    /// whatever its instance (for the HTTP page, which names it by id).
    pub fn summary_by_id(&self, id: &str) -> Option<OperationSummary> {
        if id.is_empty() || id.contains('/') {
            return None;
        }
        let suffix = format!("operations/{id}");
        let state = self.state.lock().unwrap();
        state
            .operations
            .iter()
            .find(|(name, _)| {
                name.ends_with(&suffix)
                    && (name.len() == suffix.len()
                        || name[..name.len() - suffix.len()].ends_with('/'))
            })
            .map(|(name, op)| op.summary(name))
    }

    /// Cancels an operation. Queued: removed from its queue. Executing: the
    /// worker is told to abandon the lease on its next keep-alive, which kills
    /// the process group. Returns false if the operation is unknown.
    pub fn cancel(&self, name: &str, why: &str) -> bool {
        let mut state = self.state.lock().unwrap();
        let state = &mut *state;
        let Some(op) = state.operations.get(name) else {
            return false;
        };
        if op.stage == Stage::Completed {
            return true;
        }
        state.queues.remove(name, op);
        tracing::info!(operation = %name, reason = why, "operation cancelled");
        let response = reapi::ExecuteResponse {
            status: Some(status(
                tonic::Code::Cancelled,
                format!("operation cancelled: {why}"),
            )),
            ..Default::default()
        };
        state.finish(
            name,
            response,
            None,
            Outcome::Cancelled,
            "cancelled",
            None,
            self.config.retain_finished,
        );
        true
    }

    /// Queue depths, running actions, workers and outcomes.
    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats::of(&self.state.lock().unwrap(), self.config.lease_timeout)
    }

    /// Instance of a worker, for logs.
    pub fn worker_instance(&self, worker_id: &str) -> Option<String> {
        self.state.lock().unwrap().leases.worker_instance(worker_id)
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod bounds_tests;

#[cfg(test)]
mod step_tests;

#[cfg(test)]
mod restart_tests;
