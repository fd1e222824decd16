//! Leases: which worker holds which operation until when, the leases that
//! ended (so their holder's late result can be told from a forged one), and
//! the workers that take them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use buildkube_proto::worker as wire;

use crate::platform::PlatformKey;

/// Ended leases remembered so their holder's late result can be told from a
/// forged one.
const ENDED_LEASES_REMEMBERED: usize = 10_000;

/// Who holds a lease: the worker credential it came with (`open` without
/// auth) and the worker's self-reported id. KeepAlive and Complete for the
/// lease must come from both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHolder {
    /// Name of the worker credential.
    pub identity: String,
    /// `WorkerInfo.worker_id`.
    pub worker_id: String,
}

impl std::fmt::Display for LeaseHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "worker {} (credential {})",
            self.worker_id, self.identity
        )
    }
}

/// A KeepAlive or Complete that does not come from the lease's holder.
#[derive(Debug, Clone, thiserror::Error)]
#[error("lease {lease_id:?} (operation {operation:?}): {reason}")]
pub struct LeaseRefused {
    /// The lease id the caller named.
    pub lease_id: String,
    /// The operation involved.
    pub operation: String,
    /// Why it is refused.
    pub reason: String,
}

/// A live lease.
pub(crate) struct LeaseRecord {
    pub(crate) operation: String,
    pub(crate) holder: LeaseHolder,
    pub(crate) deadline: Instant,
}

/// What a lease id names, for a caller that passed the holder check.
pub(crate) enum LeaseState {
    /// A live lease of the caller's, on this operation.
    Active(String),
    /// The caller's lease that expired or was released, on this operation.
    Ended(String),
    /// No lease we know of, and no running operation it could be for.
    Unknown,
}

/// A worker that polled or kept alive lately.
pub(crate) struct WorkerRecord {
    pub(crate) instance: String,
    /// Metric label of the platform the worker offers.
    pub(crate) platform: String,
    pub(crate) last_seen: Instant,
    /// It runs CI job steps (`WorkerInfo.runs_steps`).
    pub(crate) runs_steps: bool,
    /// Ids of the leases it holds.
    pub(crate) leases: HashSet<String>,
}

/// Leases that expired or were released, with their holder, oldest
/// forgotten first.
#[derive(Default)]
struct EndedLeases {
    by_id: HashMap<String, (LeaseHolder, String)>,
    order: VecDeque<String>,
}

impl EndedLeases {
    fn remember(&mut self, lease_id: String, holder: LeaseHolder, operation: String) {
        if self
            .by_id
            .insert(lease_id.clone(), (holder, operation))
            .is_none()
        {
            self.order.push_back(lease_id);
        }
        while self.order.len() > ENDED_LEASES_REMEMBERED {
            if let Some(old) = self.order.pop_front() {
                self.by_id.remove(&old);
            }
        }
    }

    fn get(&self, lease_id: &str) -> Option<&(LeaseHolder, String)> {
        self.by_id.get(lease_id)
    }

    fn forget(&mut self, lease_id: &str) {
        // The order entry stays until it ages out; `remember` re-adds only unknown ids.
        self.by_id.remove(lease_id);
    }
}

/// Live leases, ended leases and the workers holding them.
#[derive(Default)]
pub(crate) struct LeaseTable {
    active: HashMap<String, LeaseRecord>,
    ended: EndedLeases,
    workers: HashMap<String, WorkerRecord>,
}

impl LeaseTable {
    /// Records that `worker` polled or kept alive just now.
    pub(crate) fn touch_worker(&mut self, worker: &wire::WorkerInfo) {
        let record = self.workers.entry(worker.worker_id.clone()).or_insert_with(|| {
            tracing::info!(worker = %worker.worker_id, instance = %worker.instance_name, runs_steps = worker.runs_steps, "worker connected");
            WorkerRecord {
                instance: worker.instance_name.clone(),
                platform: String::new(),
                last_seen: Instant::now(),
                runs_steps: worker.runs_steps,
                leases: HashSet::new(),
            }
        });
        record.last_seen = Instant::now();
        record.runs_steps = worker.runs_steps;
        record.instance = worker.instance_name.clone();
        record.platform = PlatformKey::from_proto(worker.platform.as_ref()).label();
    }

    /// Leases `operation` to `holder` until `deadline`; returns the lease id
    /// (122 random bits: it cannot be guessed).
    pub(crate) fn grant(
        &mut self,
        operation: &str,
        holder: &LeaseHolder,
        deadline: Instant,
    ) -> String {
        let lease_id = uuid::Uuid::new_v4().to_string();
        self.active.insert(
            lease_id.clone(),
            LeaseRecord {
                operation: operation.to_string(),
                holder: holder.clone(),
                deadline,
            },
        );
        if let Some(w) = self.workers.get_mut(&holder.worker_id) {
            w.leases.insert(lease_id.clone());
        }
        lease_id
    }

    /// Puts back a lease that was live when the server stopped: same id and
    /// holder, a fresh `deadline`. Its worker is known from now on (it may
    /// keep the lease alive and complete it), serving `instance`.
    pub(crate) fn restore(
        &mut self,
        lease_id: &str,
        operation: &str,
        holder: &LeaseHolder,
        instance: &str,
        deadline: Instant,
    ) {
        self.active.insert(
            lease_id.to_string(),
            LeaseRecord {
                operation: operation.to_string(),
                holder: holder.clone(),
                deadline,
            },
        );
        self.workers
            .entry(holder.worker_id.clone())
            .or_insert_with(|| WorkerRecord {
                instance: instance.to_string(),
                platform: String::new(),
                last_seen: Instant::now(),
                // Unknown until it polls; only a poll may say it runs steps.
                runs_steps: false,
                leases: HashSet::new(),
            })
            .leases
            .insert(lease_id.to_string());
    }

    /// The holder of a live lease.
    pub(crate) fn holder_of(&self, lease_id: &str) -> Option<&LeaseHolder> {
        self.active.get(lease_id).map(|r| &r.holder)
    }

    /// Ends a live lease (completed, expired, or its operation finished):
    /// the one release path. Its holder is remembered, so that a repeated
    /// or late report from it is told from a forged one.
    pub(crate) fn release(&mut self, lease_id: &str) -> Option<LeaseRecord> {
        let record = self.active.remove(lease_id)?;
        if let Some(w) = self.workers.get_mut(&record.holder.worker_id) {
            w.leases.remove(lease_id);
        }
        self.ended.remember(
            lease_id.to_string(),
            record.holder.clone(),
            record.operation.clone(),
        );
        Some(record)
    }

    /// Forgets an ended lease once its late result was accepted.
    pub(crate) fn forget_ended(&mut self, lease_id: &str) {
        self.ended.forget(lease_id);
    }

    /// Refuses the first of `lease_ids` that is live and held by someone else.
    pub(crate) fn check_all_held_by<'a>(
        &self,
        holder: &LeaseHolder,
        lease_ids: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), LeaseRefused> {
        for lease_id in lease_ids {
            if let Some(record) = self.active.get(lease_id) {
                if record.holder != *holder {
                    return Err(LeaseRefused {
                        lease_id: lease_id.to_string(),
                        operation: record.operation.clone(),
                        reason: format!("held by {}, not {holder}", record.holder),
                    });
                }
            }
        }
        Ok(())
    }

    /// Moves a live lease's deadline; returns its operation, or `None` if
    /// the lease is not live.
    pub(crate) fn extend(&mut self, lease_id: &str, deadline: Instant) -> Option<String> {
        let record = self.active.get_mut(lease_id)?;
        record.deadline = deadline;
        Some(record.operation.clone())
    }

    /// The operation and holder of a live lease.
    pub(crate) fn live(&self, lease_id: &str) -> Option<(&str, &LeaseHolder)> {
        self.active
            .get(lease_id)
            .map(|r| (r.operation.as_str(), &r.holder))
    }

    /// Live leases whose deadline passed.
    pub(crate) fn expired(&self, now: Instant) -> Vec<String> {
        self.active
            .iter()
            .filter(|(_, r)| r.deadline <= now)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Checks that `holder` may report on `lease_id` for `operation`: its
    /// live lease, or one of its leases that ended. Anyone else's lease, or
    /// a lease id nobody was given for a running operation (`running`
    /// tells), is refused.
    pub(crate) fn check(
        &self,
        holder: &LeaseHolder,
        lease_id: &str,
        operation: &str,
        running: impl FnOnce(&str) -> bool,
    ) -> Result<LeaseState, LeaseRefused> {
        let refuse = |operation: &str, reason: String| LeaseRefused {
            lease_id: lease_id.to_string(),
            operation: operation.to_string(),
            reason,
        };
        if let Some(record) = self.active.get(lease_id) {
            if record.holder != *holder {
                return Err(refuse(
                    &record.operation,
                    format!("held by {}, not {holder}", record.holder),
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
        if let Some((ended_holder, ended_operation)) = self.ended.get(lease_id) {
            if ended_holder != holder {
                return Err(refuse(
                    ended_operation,
                    format!("it was held by {ended_holder}, not {holder}"),
                ));
            }
            return Ok(LeaseState::Ended(ended_operation.clone()));
        }
        if running(operation) {
            return Err(refuse(
                operation,
                format!("no such lease was given to {holder} or anyone"),
            ));
        }
        Ok(LeaseState::Unknown)
    }

    /// The operations of the live leases.
    pub(crate) fn leased_operations(&self) -> impl Iterator<Item = &str> {
        self.active.values().map(|r| r.operation.as_str())
    }

    /// Workers seen within `fresh`, or holding a lease.
    pub(crate) fn live_workers(&self, fresh: Duration) -> impl Iterator<Item = &WorkerRecord> {
        self.workers
            .values()
            .filter(move |w| w.last_seen.elapsed() < fresh || !w.leases.is_empty())
    }

    /// Whether a worker of `instance` that runs CI steps is known (it polled
    /// lately or holds a lease; silent ones are forgotten by the reaper).
    pub(crate) fn has_step_worker(&self, instance: &str) -> bool {
        self.workers
            .values()
            .any(|w| w.runs_steps && w.instance == instance)
    }

    /// Forgets workers silent for `silent` that hold no lease.
    pub(crate) fn forget_silent_workers(&mut self, now: Instant, silent: Duration) {
        self.workers.retain(|id, w| {
            let keep = now.duration_since(w.last_seen) < silent || !w.leases.is_empty();
            if !keep {
                tracing::info!(worker = %id, "worker gone");
            }
            keep
        });
    }

    /// The instance a worker serves.
    pub(crate) fn worker_instance(&self, worker_id: &str) -> Option<String> {
        self.workers.get(worker_id).map(|w| w.instance.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ended_leases_are_bounded() {
        let mut ended = EndedLeases::default();
        let holder = LeaseHolder {
            identity: "open".into(),
            worker_id: "w".into(),
        };
        for i in 0..ENDED_LEASES_REMEMBERED + 5 {
            ended.remember(i.to_string(), holder.clone(), "op".into());
        }
        assert!(ended.get("0").is_none());
        assert!(ended
            .get(&(ENDED_LEASES_REMEMBERED + 4).to_string())
            .is_some());
        assert_eq!(ended.by_id.len(), ENDED_LEASES_REMEMBERED);
    }
}
