//! The worker side of the [`Scheduler`]: leasing queued work, keep-alives,
//! results, requeueing, and the periodic reaping of expired leases and
//! unwatched operations.

use std::time::{Duration, Instant};

use buildkube_proto::reapi::{self, execution_stage};
use buildkube_proto::worker as wire;
use buildkube_reapi::Digest;

use crate::lease_table::{LeaseHolder, LeaseRefused, LeaseState};
use crate::operation::{event, failed_response, ran_response, status, worker_events, Stage, Work};
use crate::platform::PlatformKey;
use crate::{LeaseOutcome, Outcome, Scheduler, State};

impl Scheduler {
    /// Takes the best queued work `worker` can run, waiting up to `wait`:
    /// an action its platform satisfies, or a CI step if it also runs steps
    /// (`WorkerInfo.runs_steps`).
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
        let state = &mut *state;
        state.leases.touch_worker(worker);
        // A worker that does not run steps is never handed one, whatever it
        // asks for: the check is here, not in the worker.
        let name = state
            .queues
            .pop_best(&worker.instance_name, offered, worker.runs_steps)?;
        let holder = LeaseHolder {
            identity: identity.to_string(),
            worker_id: worker.worker_id.clone(),
        };
        let op = state.operations.get_mut(&name)?;
        let lease_id =
            state
                .leases
                .grant(&name, &holder, Instant::now() + self.config.lease_timeout);
        op.stage = Stage::Executing;
        op.attempts += 1;
        op.lease = Some(lease_id.clone());
        op.workers_tried.push(worker.worker_id.clone());
        op.timeline.push(event(
            "assigned",
            Some(&worker.worker_id),
            Some(format!("attempt {}", op.attempts)),
        ));
        op.publish(&name, execution_stage::Value::Executing);
        tracing::debug!(operation = %name, work = %op.work.describe(), worker = %worker.worker_id, attempt = op.attempts, "assigned");
        let lease = op.work.lease(
            lease_id,
            name.clone(),
            self.keep_alive_interval(),
            op.attempts,
        );
        state.journal_operation(&name);
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
        state
            .leases
            .check_all_held_by(&holder, progress.iter().map(|p| p.lease_id.as_str()))?;
        state.leases.touch_worker(worker);
        let deadline = Instant::now() + self.config.lease_timeout;
        let mut abandon = Vec::new();
        for p in progress {
            let Some(name) = state.leases.extend(&p.lease_id, deadline) else {
                abandon.push(p.lease_id.clone());
                continue;
            };
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

    /// Checks `holder`'s report on `lease_id` for `operation` (see
    /// [`LeaseTable::check`](crate::lease_table::LeaseTable::check)).
    fn check_lease(
        state: &State,
        holder: &LeaseHolder,
        lease_id: &str,
        operation: &str,
    ) -> Result<LeaseState, LeaseRefused> {
        state.leases.check(holder, lease_id, operation, |name| {
            state
                .operations
                .get(name)
                .is_some_and(|op| op.stage != Stage::Completed)
        })
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
            .filter(|op| op.stage != Stage::Completed)
            .and_then(|op| op.work.cache_key(&op.instance)))
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
        let mut guard = self.state.lock().unwrap();
        let state = &mut *guard;
        let name = match Self::check_lease(state, holder, lease_id, operation)? {
            LeaseState::Active(name) => name,
            LeaseState::Ended(name) => {
                let running = state
                    .operations
                    .get(&name)
                    .is_some_and(|op| op.stage != Stage::Completed);
                if !running || matches!(outcome, LeaseOutcome::Failed(_)) {
                    tracing::info!(worker = worker_id, lease = lease_id, operation = %name, "result for an ended lease dropped");
                    return Ok(false);
                }
                // Take it out of the queue if it was requeued.
                state.queues.remove(&name, &state.operations[&name]);
                state.leases.forget_ended(lease_id);
                name
            }
            LeaseState::Unknown => {
                tracing::info!(worker = worker_id, lease = lease_id, %operation, "result for an unknown lease dropped");
                return Ok(false);
            }
        };
        // A repeated report (a retried call) then finds an ended lease.
        state.leases.release(lease_id);
        let Some(op) = state.operations.get(&name) else {
            return Ok(false);
        };
        let (digest, queued_at) = (op.work.digest(), op.queued_at);
        let is_step = matches!(op.work, Work::Step(_));
        // A result of the wrong kind fails the operation rather than
        // passing as a result it is not.
        let outcome = match (is_step, outcome) {
            (true, LeaseOutcome::Ran(_)) => LeaseOutcome::Failed(status(
                tonic::Code::Internal,
                format!("{worker_id} reported an action result for a CI step"),
            )),
            (false, LeaseOutcome::StepRan(_)) => LeaseOutcome::Failed(status(
                tonic::Code::Internal,
                format!("{worker_id} reported a CI step result for an action"),
            )),
            (_, outcome) => outcome,
        };
        let mut step_result = None;
        let (response, kind) = match outcome {
            LeaseOutcome::StepRan(result) => {
                let kind = if result.exit_code == 0 {
                    Outcome::Success
                } else {
                    Outcome::NonZeroExit
                };
                tracing::debug!(operation = %name, worker = worker_id, exit_code = result.exit_code, "step completed");
                let response = reapi::ExecuteResponse {
                    status: Some(status(tonic::Code::Ok, "")),
                    message,
                    ..Default::default()
                };
                step_result = Some(result);
                (response, kind)
            }
            LeaseOutcome::Ran(result) => {
                let kind = if result.exit_code == 0 {
                    Outcome::Success
                } else {
                    Outcome::NonZeroExit
                };
                tracing::debug!(operation = %name, action = %digest, worker = worker_id, exit_code = result.exit_code, "action completed");
                let response = ran_response(result, queued_at, worker_id, message);
                let metadata = response
                    .result
                    .as_ref()
                    .and_then(|r| r.execution_metadata.as_ref());
                if let (Some(op), Some(metadata)) = (state.operations.get_mut(&name), metadata) {
                    op.timeline.extend(worker_events(metadata, worker_id));
                }
                (response, kind)
            }
            LeaseOutcome::Failed(error) => {
                if error.code == tonic::Code::Unavailable as i32
                    && self.requeue(state, &name, worker_id, &error.message)
                {
                    drop(guard);
                    self.work_available.notify_waiters();
                    return Ok(true);
                }
                tracing::warn!(operation = %name, action = %digest, worker = worker_id, code = error.code, error = %error.message, "action failed to run");
                (failed_response(error, queued_at, message), Outcome::Error)
            }
        };
        state.finish(
            &name,
            response,
            step_result,
            kind,
            "completed",
            Some(worker_id),
            self.config.retain_finished,
        );
        Ok(true)
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
        op.publish(name, execution_stage::Value::Queued);
        state.queues.push(name, op);
        state.journal_operation(name);
    }

    /// Requeues an operation whose worker gave it back (e.g. killed at its
    /// drain deadline), if it has attempts left. Returns whether it did.
    fn requeue(&self, state: &mut State, name: &str, worker: &str, why: &str) -> bool {
        let Some(op) = state.operations.get(name) else {
            return false;
        };
        let max_attempts = op.work.max_attempts().unwrap_or(self.config.max_attempts);
        if op.stage == Stage::Completed || op.attempts >= max_attempts {
            return false;
        }
        tracing::warn!(operation = %name, work = %op.work.describe(), worker, reason = why, "worker gave the work back; requeueing");
        Self::put_back(state, name, worker, why);
        true
    }

    /// Requeues leases whose worker went quiet, fails actions out of attempts,
    /// forgets silent workers and cancels operations nobody watches.
    /// Called about once a second.
    pub fn reap(&self) {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap();
        let state_ref = &mut *state;
        let mut requeued = false;
        for lease_id in state_ref.leases.expired(now) {
            // Its holder may still deliver a late result; nobody else may.
            let Some(record) = state_ref.leases.release(&lease_id) else {
                continue;
            };
            let worker = record.holder.worker_id;
            let Some(op) = state_ref.operations.get_mut(&record.operation) else {
                continue;
            };
            op.lease = None;
            let (max_attempts, limit) = match op.work.max_attempts() {
                Some(own) => (own, format!("its max attempts {own}")),
                None => (
                    self.config.max_attempts,
                    format!("--max-attempts={}", self.config.max_attempts),
                ),
            };
            if op.attempts >= max_attempts {
                let message = format!(
                    "{} was lost by its worker {} times (workers: {}); giving up after {limit}",
                    op.work.describe(),
                    op.attempts,
                    op.workers_tried.join(", "),
                );
                tracing::error!(operation = %record.operation, %worker, "{message}");
                let response = reapi::ExecuteResponse {
                    status: Some(status(tonic::Code::Aborted, message)),
                    ..Default::default()
                };
                state_ref.finish(
                    &record.operation,
                    response,
                    None,
                    Outcome::Error,
                    "lost",
                    Some(&worker),
                    self.config.retain_finished,
                );
                continue;
            }
            tracing::warn!(operation = %record.operation, work = %op.work.describe(), %worker, attempt = op.attempts, "lease expired; requeueing");
            Self::put_back(state_ref, &record.operation, &worker, "lease expired");
            requeued = true;
        }
        state_ref
            .leases
            .forget_silent_workers(now, self.config.lease_timeout * 2);
        // Operations no client watches any more are cancelled after a grace period
        // (clients reconnect with WaitExecution within it).
        let mut orphans = Vec::new();
        for (name, op) in state_ref.operations.iter_mut() {
            if op.stage == Stage::Completed {
                continue;
            }
            if op.watched() {
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
}
