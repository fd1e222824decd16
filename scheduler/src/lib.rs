//! The scheduler: operations, per-platform queues, and leases to workers.
//!
//! An accepted action becomes an operation in a queue keyed by (instance,
//! platform). Workers long-poll [`Scheduler::lease`]; the best queued action
//! their platform satisfies (lowest priority value, then oldest) is leased to
//! them. A lease lives while the worker sends keep-alives; a lease that times
//! out is requeued (keeping its place) until `max_attempts` hand-outs, then
//! the operation fails with a clear error. Identical in-flight actions
//! (same instance and action digest, cacheable) share one operation.

mod leases;
mod platform;

use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use buildkube_proto::longrunning::{self, operation};
use buildkube_proto::reapi::{self, execution_stage};
use buildkube_proto::rpc;
use buildkube_proto::worker as wire;
use buildkube_reapi::Digest;
use prost::Message;
use tokio::sync::{watch, Notify};

pub use leases::{instance_of_operation, operation_name, LeaseHolder, LeaseRefused};
pub use platform::PlatformKey;

use leases::EndedLeases;

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

/// How an operation ended, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// Ran, exit code 0.
    Success,
    /// Ran, non-zero exit code.
    NonZeroExit,
    /// Could not run (error status).
    Error,
    /// Answered from the action cache.
    Cached,
    /// Cancelled by a client.
    Cancelled,
}

impl Outcome {
    /// Label value in metrics.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::NonZeroExit => "nonzero_exit",
            Outcome::Error => "error",
            Outcome::Cached => "cached",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// A point-in-time view of the scheduler for metrics.
#[derive(Debug, Default, Clone)]
pub struct SchedulerStats {
    /// (instance, platform label) → queued actions, for every (instance,
    /// platform) with an action queued or running (zeros too); a platform
    /// with neither has no entry, so the series stay bounded.
    pub queue_depth: BTreeMap<(String, String), usize>,
    /// (instance, platform) → leased actions; the same keys as `queue_depth`.
    pub running: BTreeMap<(String, String), usize>,
    /// Workers that polled or kept alive within the lease timeout.
    pub workers_connected: usize,
    /// Of those, workers running at least one action.
    pub workers_busy: usize,
    /// (instance, label of the platform the workers offer) → (connected, busy).
    pub workers_by_platform: BTreeMap<(String, String), (usize, usize)>,
    /// Finished operations by outcome, since start.
    pub outcomes: BTreeMap<Outcome, u64>,
}

/// The outcome a worker reports for a lease.
// Short-lived, moved once from the RPC into the scheduler: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum LeaseOutcome {
    /// The action ran.
    Ran(reapi::ActionResult),
    /// The action could not run.
    Failed(rpc::Status),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Queued,
    Executing,
    Completed,
}

struct Operation {
    instance: String,
    action_digest: Digest,
    action: reapi::Action,
    /// Held while unfinished, so that Executes of the same Command share one decoding.
    command: Option<Arc<reapi::Command>>,
    platform: PlatformKey,
    priority: i32,
    seq: u64,
    stage: Stage,
    attempts: u32,
    lease: Option<String>,
    workers_tried: Vec<String>,
    queued_at: SystemTime,
    updates: watch::Sender<longrunning::Operation>,
    timeline: Vec<TimelineEvent>,
    unwatched_since: Option<Instant>,
}

struct LeaseRecord {
    operation: String,
    worker: String,
    /// Name of the worker credential the lease was taken with.
    identity: String,
    deadline: Instant,
}

impl LeaseRecord {
    fn holder(&self) -> LeaseHolder {
        LeaseHolder {
            identity: self.identity.clone(),
            worker_id: self.worker.clone(),
        }
    }

    fn held_by(&self, holder: &LeaseHolder) -> bool {
        self.worker == holder.worker_id && self.identity == holder.identity
    }
}

/// What a lease id names, for a caller that passed the holder check.
enum LeaseState {
    /// A live lease of the caller's, on this operation.
    Active(String),
    /// The caller's lease that expired or was released, on this operation.
    Ended(String),
    /// No lease we know of, and no running operation it could be for.
    Unknown,
}

struct WorkerRecord {
    instance: String,
    /// Metric label of the platform the worker offers.
    platform: String,
    last_seen: Instant,
    leases: HashSet<String>,
}

#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
struct QueueKey {
    instance: String,
    platform: PlatformKey,
}

/// Heap entry: max-heap on Reverse((priority, seq)).
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Queued(std::cmp::Reverse<(i32, u64)>, String);

#[derive(Default)]
struct State {
    operations: HashMap<String, Operation>,
    in_flight: HashMap<(String, Digest), String>,
    queues: BTreeMap<QueueKey, BinaryHeap<Queued>>,
    leases: HashMap<String, LeaseRecord>,
    ended_leases: EndedLeases,
    workers: HashMap<String, WorkerRecord>,
    finished: VecDeque<String>,
    outcomes: BTreeMap<Outcome, u64>,
    next_seq: u64,
    /// Instance → operations queued or running.
    unfinished: HashMap<String, usize>,
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

impl State {
    /// Takes `name` out of the queue `key`, dropping the queue once empty
    /// (so that a platform nobody uses any more leaves no queue or metric series).
    fn unqueue(&mut self, key: &QueueKey, name: &str) {
        if let Some(queue) = self.queues.get_mut(key) {
            queue.retain(|q| q.1 != name);
            if queue.is_empty() {
                self.queues.remove(key);
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

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
}

fn event(event: &str, worker: Option<&str>, detail: Option<String>) -> TimelineEvent {
    TimelineEvent {
        event: event.to_string(),
        at_ms: now_ms(),
        worker: worker.map(str::to_string),
        detail,
    }
}

fn any<M: Message>(type_name: &str, message: &M) -> prost_types::Any {
    prost_types::Any {
        type_url: format!("type.googleapis.com/{type_name}"),
        value: message.encode_to_vec(),
    }
}

fn status(code: tonic::Code, message: impl Into<String>) -> rpc::Status {
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
fn done_operation(
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

fn pending_operation(
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

impl Scheduler {
    /// A scheduler with no operations.
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
        let do_not_cache = new.action.do_not_cache;
        let mut state = self.state.lock().unwrap();
        let merge_key = (new.instance.clone(), new.action_digest);
        if !do_not_cache {
            if let Some(name) = state.in_flight.get(&merge_key) {
                if let Some(op) = state.operations.get(name) {
                    tracing::debug!(operation = %name, action = %new.action_digest, "merged with in-flight action");
                    return Ok((name.clone(), op.updates.subscribe()));
                }
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
        let seq = state.next_seq;
        state.next_seq += 1;
        let (updates, receiver) = watch::channel(pending_operation(
            &name,
            &new.action_digest,
            execution_stage::Value::Queued,
        ));
        tracing::debug!(operation = %name, action = %new.action_digest, instance = %new.instance, %platform, "action queued");
        let key = QueueKey {
            instance: new.instance.clone(),
            platform: platform.clone(),
        };
        state
            .queues
            .entry(key)
            .or_default()
            .push(Queued(std::cmp::Reverse((new.priority, seq)), name.clone()));
        state.operations.insert(
            name.clone(),
            Operation {
                instance: new.instance,
                action_digest: new.action_digest,
                action: new.action,
                command: Some(new.command),
                platform,
                priority: new.priority,
                seq,
                stage: Stage::Queued,
                attempts: 0,
                lease: None,
                workers_tried: vec![],
                queued_at: SystemTime::now(),
                updates,
                timeline: vec![event("queued", None, None)],
                unwatched_since: None,
            },
        );
        if !do_not_cache {
            state.in_flight.insert(merge_key, name.clone());
        }
        drop(state);
        self.work_available.notify_waiters();
        Ok((name, receiver))
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
                action_digest,
                action: reapi::Action::default(),
                command: None,
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
        Self::retire(&mut state, &name, self.config.retain_finished);
        done
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
            .map(|(name, op)| Self::summary(name, op))
            .collect()
    }

    /// Timeline of one operation.
    pub fn summary_of(&self, name: &str) -> Option<OperationSummary> {
        let state = self.state.lock().unwrap();
        state.operations.get(name).map(|op| Self::summary(name, op))
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
            .map(|(name, op)| Self::summary(name, op))
    }

    fn summary(name: &str, op: &Operation) -> OperationSummary {
        // Worker timestamps arrive with the result, after the server's own
        // events: show everything in the order it happened.
        let mut timeline = op.timeline.clone();
        timeline.sort_by_key(|e| e.at_ms);
        OperationSummary {
            name: name.to_string(),
            instance: op.instance.clone(),
            action_digest: op.action_digest.to_string(),
            platform: op.platform.to_string(),
            stage: match op.stage {
                Stage::Queued => "QUEUED",
                Stage::Executing => "EXECUTING",
                Stage::Completed => "COMPLETED",
            },
            attempts: op.attempts,
            timeline,
        }
    }

    /// Cancels an operation. Queued: removed from its queue. Executing: the
    /// worker is told to abandon the lease on its next keep-alive, which kills
    /// the process group. Returns false if the operation is unknown.
    pub fn cancel(&self, name: &str, why: &str) -> bool {
        let mut state = self.state.lock().unwrap();
        let Some(op) = state.operations.get(name) else {
            return false;
        };
        if op.stage == Stage::Completed {
            return true;
        }
        let key = QueueKey {
            instance: op.instance.clone(),
            platform: op.platform.clone(),
        };
        state.unqueue(&key, name);
        tracing::info!(operation = %name, reason = why, "operation cancelled");
        let response = reapi::ExecuteResponse {
            status: Some(status(
                tonic::Code::Cancelled,
                format!("operation cancelled: {why}"),
            )),
            ..Default::default()
        };
        Self::finish(
            &mut state,
            name,
            response,
            Outcome::Cancelled,
            "cancelled",
            None,
            self.config.retain_finished,
        );
        true
    }

    /// Marks an operation finished, wakes its watchers, releases its lease.
    fn finish(
        state: &mut State,
        name: &str,
        response: reapi::ExecuteResponse,
        outcome: Outcome,
        what: &str,
        worker: Option<&str>,
        retain: usize,
    ) {
        let Some(op) = state.operations.get_mut(name) else {
            return;
        };
        op.stage = Stage::Completed;
        op.timeline.push(event(what, worker, None));
        let lease = op.lease.take();
        let done = done_operation(name, &op.action_digest, &response);
        op.updates.send_replace(done);
        let merge_key = (op.instance.clone(), op.action_digest);
        // Keep a finished operation's action and command only as long as needed.
        op.action = reapi::Action::default();
        op.command = None;
        if let Some(count) = state.unfinished.get_mut(&merge_key.0) {
            *count -= 1;
            if *count == 0 {
                state.unfinished.remove(&merge_key.0);
            }
        }
        if state.in_flight.get(&merge_key).map(String::as_str) == Some(name) {
            state.in_flight.remove(&merge_key);
        }
        if let Some(lease) = lease {
            if let Some(record) = state.leases.remove(&lease) {
                if let Some(w) = state.workers.get_mut(&record.worker) {
                    w.leases.remove(&lease);
                }
                let holder = record.holder();
                state.ended_leases.remember(lease, holder, record.operation);
            }
        }
        *state.outcomes.entry(outcome).or_default() += 1;
        Self::retire(state, name, retain);
    }

    fn retire(state: &mut State, name: &str, retain: usize) {
        state.finished.push_back(name.to_string());
        while state.finished.len() > retain {
            if let Some(old) = state.finished.pop_front() {
                state.operations.remove(&old);
            }
        }
    }

    fn touch_worker(state: &mut State, worker: &wire::WorkerInfo) {
        let record = state.workers.entry(worker.worker_id.clone()).or_insert_with(|| {
            tracing::info!(worker = %worker.worker_id, instance = %worker.instance_name, "worker connected");
            WorkerRecord {
                instance: worker.instance_name.clone(),
                platform: String::new(),
                last_seen: Instant::now(),
                leases: HashSet::new(),
            }
        });
        record.last_seen = Instant::now();
        record.instance = worker.instance_name.clone();
        record.platform = PlatformKey::from_proto(worker.platform.as_ref()).label();
    }

    /// Takes the best queued action `worker` can run, waiting up to `wait`.
    /// The lease is bound to `worker.worker_id` and the worker credential
    /// `identity`: only both together may keep it alive or complete it.
    pub async fn lease(
        &self,
        worker: &wire::WorkerInfo,
        identity: &str,
        wait: Duration,
    ) -> Option<wire::Lease> {
        let offered = PlatformKey::from_proto(worker.platform.as_ref());
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.work_available.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(lease) = self.try_lease(worker, identity, &offered) {
                return Some(lease);
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => return None,
            }
        }
    }

    fn try_lease(
        &self,
        worker: &wire::WorkerInfo,
        identity: &str,
        offered: &PlatformKey,
    ) -> Option<wire::Lease> {
        let mut state = self.state.lock().unwrap();
        Self::touch_worker(&mut state, worker);
        let best = state
            .queues
            .iter()
            .filter(|(key, queue)| {
                key.instance == worker.instance_name
                    && !queue.is_empty()
                    && key.platform.satisfied_by(offered)
            })
            .max_by(|(_, a), (_, b)| a.peek().cmp(&b.peek()))
            .map(|(key, _)| key.clone())?;
        let queue = state.queues.get_mut(&best)?;
        let Queued(_, name) = queue.pop()?;
        if queue.is_empty() {
            state.queues.remove(&best);
        }
        // 122 random bits: a lease id cannot be guessed.
        let lease_id = uuid::Uuid::new_v4().to_string();
        let keep_alive = self.keep_alive_interval();
        let op = state.operations.get_mut(&name)?;
        op.stage = Stage::Executing;
        op.attempts += 1;
        op.lease = Some(lease_id.clone());
        op.workers_tried.push(worker.worker_id.clone());
        op.timeline.push(event(
            "assigned",
            Some(&worker.worker_id),
            Some(format!("attempt {}", op.attempts)),
        ));
        op.updates.send_replace(pending_operation(
            &name,
            &op.action_digest,
            execution_stage::Value::Executing,
        ));
        let lease = wire::Lease {
            lease_id: lease_id.clone(),
            operation_name: name.clone(),
            action_digest: Some(op.action_digest.to_proto()),
            action: Some(op.action.clone()),
            command_digest: op.action.command_digest.clone(),
            keep_alive_interval: Some(duration_proto(keep_alive)),
            attempt: op.attempts,
        };
        tracing::debug!(operation = %name, action = %op.action_digest, worker = %worker.worker_id, attempt = op.attempts, "action assigned");
        state.leases.insert(
            lease_id.clone(),
            LeaseRecord {
                operation: name,
                worker: worker.worker_id.clone(),
                identity: identity.to_string(),
                deadline: Instant::now() + self.config.lease_timeout,
            },
        );
        if let Some(w) = state.workers.get_mut(&worker.worker_id) {
            w.leases.insert(lease_id);
        }
        Some(lease)
    }

    /// Extends `worker`'s leases, records progress, and returns the leases the
    /// worker must abandon (unknown, ended, or cancelled). A lease held by
    /// another worker or credential refuses the whole call.
    pub fn keep_alive(
        &self,
        worker: &wire::WorkerInfo,
        identity: &str,
        progress: &[wire::LeaseProgress],
    ) -> Result<Vec<String>, LeaseRefused> {
        let holder = LeaseHolder {
            identity: identity.to_string(),
            worker_id: worker.worker_id.clone(),
        };
        let mut state = self.state.lock().unwrap();
        for p in progress {
            if let Some(record) = state.leases.get(&p.lease_id) {
                if !record.held_by(&holder) {
                    return Err(LeaseRefused {
                        lease_id: p.lease_id.clone(),
                        operation: record.operation.clone(),
                        reason: format!("held by {}, not {holder}", record.holder()),
                    });
                }
            }
        }
        Self::touch_worker(&mut state, worker);
        let deadline = Instant::now() + self.config.lease_timeout;
        let mut abandon = Vec::new();
        for p in progress {
            let Some(record) = state.leases.get_mut(&p.lease_id) else {
                abandon.push(p.lease_id.clone());
                continue;
            };
            record.deadline = deadline;
            let name = record.operation.clone();
            if let Some(op) = state.operations.get_mut(&name) {
                let stage = match wire::Stage::try_from(p.stage).unwrap_or(wire::Stage::Unspecified)
                {
                    wire::Stage::FetchingInputs => Some("fetching_inputs"),
                    wire::Stage::Executing => Some("executing"),
                    wire::Stage::UploadingOutputs => Some("uploading_outputs"),
                    wire::Stage::Unspecified => None,
                };
                if let Some(stage) = stage {
                    if op.timeline.last().map(|e| e.event.as_str()) != Some(stage) {
                        op.timeline
                            .push(event(stage, Some(&worker.worker_id), None));
                    }
                }
            }
        }
        Ok(abandon)
    }

    /// Checks that `holder` may report on `lease_id` for `operation`: its
    /// live lease, or one of its leases that ended. Anyone else's lease, or
    /// a lease id nobody was given for a running operation, is refused.
    fn check_lease(
        state: &State,
        holder: &LeaseHolder,
        lease_id: &str,
        operation: &str,
    ) -> Result<LeaseState, LeaseRefused> {
        let refuse = |operation: &str, reason: String| LeaseRefused {
            lease_id: lease_id.to_string(),
            operation: operation.to_string(),
            reason,
        };
        if let Some(record) = state.leases.get(lease_id) {
            if !record.held_by(holder) {
                return Err(refuse(
                    &record.operation,
                    format!("held by {}, not {holder}", record.holder()),
                ));
            }
            if !operation.is_empty() && operation != record.operation {
                return Err(refuse(
                    operation,
                    format!("the lease is for operation {:?}", record.operation),
                ));
            }
            return Ok(LeaseState::Active(record.operation.clone()));
        }
        if let Some((ended_holder, ended_operation)) = state.ended_leases.get(lease_id) {
            if ended_holder != holder {
                return Err(refuse(
                    ended_operation,
                    format!("it was held by {ended_holder}, not {holder}"),
                ));
            }
            return Ok(LeaseState::Ended(ended_operation.clone()));
        }
        let running = state
            .operations
            .get(operation)
            .is_some_and(|op| op.stage != Stage::Completed);
        if running {
            return Err(refuse(
                operation,
                format!("no such lease was given to {holder} or anyone"),
            ));
        }
        Ok(LeaseState::Unknown)
    }

    /// What the server must do with a result before accepting it: whether
    /// `holder` may complete `lease_id`, and if so, where its result goes in
    /// the action cache (`None`: not cacheable, or nothing to complete).
    pub fn completion_target(
        &self,
        holder: &LeaseHolder,
        lease_id: &str,
        operation: &str,
    ) -> Result<Option<(String, Digest)>, LeaseRefused> {
        let state = self.state.lock().unwrap();
        let name = match Self::check_lease(&state, holder, lease_id, operation)? {
            LeaseState::Active(name) | LeaseState::Ended(name) => name,
            LeaseState::Unknown => return Ok(None),
        };
        Ok(state
            .operations
            .get(&name)
            .filter(|op| op.stage != Stage::Completed && !op.action.do_not_cache)
            .map(|op| (op.instance.clone(), op.action_digest)))
    }

    /// Applies a worker's report. Returns whether it was accepted: the lease
    /// is the holder's live one, or the holder's lease expired while it was
    /// cut off and the action ran but has not finished yet. A report on
    /// someone else's lease, or on a lease id nobody was given for a running
    /// operation, is refused.
    pub fn complete(
        &self,
        holder: &LeaseHolder,
        lease_id: &str,
        operation: &str,
        outcome: LeaseOutcome,
        message: String,
    ) -> Result<bool, LeaseRefused> {
        let worker_id = holder.worker_id.as_str();
        let mut state = self.state.lock().unwrap();
        let name = match Self::check_lease(&state, holder, lease_id, operation)? {
            LeaseState::Active(name) => name,
            LeaseState::Ended(name) => {
                let running = state
                    .operations
                    .get(&name)
                    .is_some_and(|op| op.stage != Stage::Completed);
                if !running || !matches!(outcome, LeaseOutcome::Ran(_)) {
                    tracing::info!(worker = worker_id, lease = lease_id, operation = %name, "result for an ended lease dropped");
                    return Ok(false);
                }
                // Take it out of the queue if it was requeued.
                let op = &state.operations[&name];
                let key = QueueKey {
                    instance: op.instance.clone(),
                    platform: op.platform.clone(),
                };
                state.unqueue(&key, &name);
                state.ended_leases.forget(lease_id);
                name
            }
            LeaseState::Unknown => {
                tracing::info!(worker = worker_id, lease = lease_id, %operation, "result for an unknown lease dropped");
                return Ok(false);
            }
        };
        if let Some(record) = state.leases.remove(lease_id) {
            if let Some(w) = state.workers.get_mut(&record.worker) {
                w.leases.remove(lease_id);
            }
            // A repeated report (a retried call) then finds an ended lease.
            let holder = record.holder();
            state
                .ended_leases
                .remember(lease_id.to_string(), holder, record.operation);
        }
        let Some(op) = state.operations.get(&name) else {
            return Ok(false);
        };
        let queued_at = op.queued_at;
        let digest = op.action_digest;
        let (response, kind) = match outcome {
            LeaseOutcome::Ran(mut result) => {
                let metadata = result
                    .execution_metadata
                    .get_or_insert_with(Default::default);
                metadata.queued_timestamp = Some(queued_at.into());
                if metadata.worker.is_empty() {
                    metadata.worker = worker_id.to_string();
                }
                let kind = if result.exit_code == 0 {
                    Outcome::Success
                } else {
                    Outcome::NonZeroExit
                };
                let worker_times = Self::worker_events(metadata, worker_id);
                if let Some(op) = state.operations.get_mut(&name) {
                    op.timeline.extend(worker_times);
                }
                tracing::debug!(operation = %name, action = %digest, worker = worker_id, exit_code = result.exit_code, "action completed");
                (
                    reapi::ExecuteResponse {
                        result: Some(result),
                        status: Some(status(tonic::Code::Ok, "")),
                        message,
                        ..Default::default()
                    },
                    kind,
                )
            }
            LeaseOutcome::Failed(error) => {
                if error.code == tonic::Code::Unavailable as i32
                    && self.requeue(&mut state, &name, worker_id, &error.message)
                {
                    drop(state);
                    self.work_available.notify_waiters();
                    return Ok(true);
                }
                tracing::warn!(operation = %name, action = %digest, worker = worker_id, code = error.code, error = %error.message, "action failed to run");
                // What the command produced before it failed (timeout, stdio cap)
                // travels as an ActionResult detail; clients show it.
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
                (
                    reapi::ExecuteResponse {
                        result: partial,
                        status: Some(error),
                        message,
                        ..Default::default()
                    },
                    Outcome::Error,
                )
            }
        };
        Self::finish(
            &mut state,
            &name,
            response,
            kind,
            "completed",
            Some(worker_id),
            self.config.retain_finished,
        );
        Ok(true)
    }

    /// Timeline events from the worker's own timestamps, which are exact even
    /// when a step was too quick to show up in a keep-alive.
    fn worker_events(metadata: &reapi::ExecutedActionMetadata, worker: &str) -> Vec<TimelineEvent> {
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

    /// Puts an executing operation back in its queue, keeping its place.
    fn put_back(state: &mut State, name: &str, worker: &str, why: &str) {
        let Some(op) = state.operations.get_mut(name) else {
            return;
        };
        op.stage = Stage::Queued;
        op.lease = None;
        op.timeline
            .push(event("requeued", Some(worker), Some(why.to_string())));
        op.updates.send_replace(pending_operation(
            name,
            &op.action_digest,
            execution_stage::Value::Queued,
        ));
        let key = QueueKey {
            instance: op.instance.clone(),
            platform: op.platform.clone(),
        };
        let entry = Queued(std::cmp::Reverse((op.priority, op.seq)), name.to_string());
        state.queues.entry(key).or_default().push(entry);
    }

    /// Requeues an operation whose worker gave it back (e.g. killed at its
    /// drain deadline), if it has attempts left. Returns whether it did.
    fn requeue(&self, state: &mut State, name: &str, worker: &str, why: &str) -> bool {
        let Some(op) = state.operations.get(name) else {
            return false;
        };
        if op.stage == Stage::Completed || op.attempts >= self.config.max_attempts {
            return false;
        }
        tracing::warn!(operation = %name, action = %op.action_digest, worker, reason = why, "worker gave the action back; requeueing");
        Self::put_back(state, name, worker, why);
        true
    }

    /// Requeues leases whose worker went quiet, fails actions out of attempts,
    /// forgets silent workers and cancels operations nobody watches.
    /// Called about once a second.
    pub fn reap(&self) {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap();
        let expired: Vec<String> = state
            .leases
            .iter()
            .filter(|(_, r)| r.deadline <= now)
            .map(|(id, _)| id.clone())
            .collect();
        let mut requeued = false;
        for lease_id in expired {
            let Some(record) = state.leases.remove(&lease_id) else {
                continue;
            };
            if let Some(w) = state.workers.get_mut(&record.worker) {
                w.leases.remove(&lease_id);
            }
            // Its holder may still deliver a late result; nobody else may.
            state
                .ended_leases
                .remember(lease_id, record.holder(), record.operation.clone());
            let max_attempts = self.config.max_attempts;
            let Some(op) = state.operations.get_mut(&record.operation) else {
                continue;
            };
            op.lease = None;
            if op.attempts >= max_attempts {
                let message = format!(
                    "action {} was lost by its worker {} times (workers: {}); giving up after --max-attempts={}",
                    op.action_digest,
                    op.attempts,
                    op.workers_tried.join(", "),
                    max_attempts
                );
                tracing::error!(operation = %record.operation, action = %op.action_digest, worker = %record.worker, "{message}");
                let response = reapi::ExecuteResponse {
                    status: Some(status(tonic::Code::Aborted, message)),
                    ..Default::default()
                };
                let name = record.operation.clone();
                Self::finish(
                    &mut state,
                    &name,
                    response,
                    Outcome::Error,
                    "lost",
                    Some(&record.worker),
                    self.config.retain_finished,
                );
                continue;
            }
            tracing::warn!(operation = %record.operation, action = %op.action_digest, worker = %record.worker, attempt = op.attempts, "lease expired; requeueing action");
            Self::put_back(
                &mut state,
                &record.operation,
                &record.worker,
                "lease expired",
            );
            requeued = true;
        }
        let silent = self.config.lease_timeout * 2;
        state.workers.retain(|id, w| {
            let keep = now.duration_since(w.last_seen) < silent || !w.leases.is_empty();
            if !keep {
                tracing::info!(worker = %id, "worker gone");
            }
            keep
        });
        // Operations no client watches any more are cancelled after a grace period
        // (clients reconnect with WaitExecution within it).
        let mut orphans = Vec::new();
        for (name, op) in state.operations.iter_mut() {
            if op.stage == Stage::Completed {
                continue;
            }
            if op.updates.receiver_count() > 0 {
                op.unwatched_since = None;
            } else {
                let since = *op.unwatched_since.get_or_insert(now);
                if now.duration_since(since) >= self.config.orphan_timeout {
                    orphans.push(name.clone());
                }
            }
        }
        drop(state);
        for name in orphans {
            self.cancel(&name, "no client has watched it");
        }
        if requeued {
            self.work_available.notify_waiters();
        }
    }

    /// Queue depths, running actions, workers and outcomes.
    pub fn stats(&self) -> SchedulerStats {
        let state = self.state.lock().unwrap();
        let mut stats = SchedulerStats {
            outcomes: state.outcomes.clone(),
            ..Default::default()
        };
        for (key, queue) in &state.queues {
            let label = (key.instance.clone(), key.platform.label());
            *stats.queue_depth.entry(label.clone()).or_default() += queue.len();
            stats.running.entry(label).or_default();
        }
        for record in state.leases.values() {
            if let Some(op) = state.operations.get(&record.operation) {
                let label = (op.instance.clone(), op.platform.label());
                stats.queue_depth.entry(label.clone()).or_default();
                *stats.running.entry(label).or_default() += 1;
            }
        }
        let fresh = self.config.lease_timeout;
        for w in state.workers.values() {
            if w.last_seen.elapsed() < fresh || !w.leases.is_empty() {
                let busy = usize::from(!w.leases.is_empty());
                stats.workers_connected += 1;
                stats.workers_busy += busy;
                let entry = stats
                    .workers_by_platform
                    .entry((w.instance.clone(), w.platform.clone()))
                    .or_default();
                entry.0 += 1;
                entry.1 += busy;
            }
        }
        stats
    }

    /// Instance of a worker, for logs.
    pub fn worker_instance(&self, worker_id: &str) -> Option<String> {
        self.state
            .lock()
            .unwrap()
            .workers
            .get(worker_id)
            .map(|w| w.instance.clone())
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod bounds_tests;
