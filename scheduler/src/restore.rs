//! Bringing back, at start, the operations the journal recorded: queued
//! ones into their queues in their old order, leased ones as leased to the
//! same worker with a fresh deadline (its keep-alives and result are
//! accepted; if it never comes back the lease expires and the operation is
//! requeued as usual), merge keys and per-instance counts rebuilt.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use buildkube_proto::reapi::execution_stage;
use buildkube_reapi::Digest;
use buildkube_records::{RecordError, RecordStore};
use prost::Message;
use tokio::sync::{watch, Notify};

use crate::journal::{FinishedRecord, Journal, OperationRecord, FINISHED_KIND, OPERATION_KIND};
use crate::lease_table::LeaseHolder;
use crate::operation::{
    event, instance_of_operation, pending_operation, ActionWork, Operation, Stage, Work,
};
use crate::platform::PlatformKey;
use crate::{Scheduler, SchedulerConfig, State};

impl Scheduler {
    /// A scheduler that records its unfinished operations in `store` and
    /// starts with those recorded there by the server that ran before, of
    /// the instances `serves` accepts (others are left in the store, with a
    /// warning). Must run on a tokio runtime (the journal's writer is a task).
    pub async fn restore(
        config: SchedulerConfig,
        store: Arc<dyn RecordStore>,
        serves: impl Fn(&str) -> bool,
    ) -> Result<Scheduler, RecordError> {
        let records = store.load_all(OPERATION_KIND).await?;
        let mut not_served = 0usize;
        let finished = store.load_all(FINISHED_KIND).await?;
        let mut state = State::default();
        let (mut queued, mut leased) = (0usize, 0usize);
        let lease_deadline = Instant::now() + config.lease_timeout;
        for (name, bytes) in records {
            let record = match OperationRecord::decode(bytes.as_ref()) {
                Ok(record) => record,
                Err(error) => {
                    tracing::error!(operation = %name, %error, "unreadable operation record; dropping it (its client will Execute again)");
                    continue;
                }
            };
            if !serves(&record.instance) {
                not_served += 1;
                continue;
            }
            let Some(op) = operation_of(&name, &record) else {
                tracing::error!(operation = %name, "operation record without a valid action digest; dropping it");
                continue;
            };
            state.next_seq = state.next_seq.max(op.seq + 1);
            *state.unfinished.entry(op.instance.clone()).or_default() += 1;
            if let Some(key) = op.work.cache_key(&op.instance) {
                state.in_flight.insert(key, name.clone());
            }
            if let Some(lease_id) = &op.lease {
                let holder = LeaseHolder {
                    identity: record.lease_identity.clone(),
                    worker_id: record.lease_worker.clone(),
                };
                state
                    .leases
                    .restore(lease_id, &name, &holder, &op.instance, lease_deadline);
                leased += 1;
            } else {
                state.queues.push(&name, &op);
                queued += 1;
            }
            state.operations.insert(name, op);
        }
        // Oldest first, so the bound drops the oldest.
        let mut tombstones: Vec<(String, FinishedRecord)> = finished
            .into_iter()
            .filter(|(name, _)| instance_of_operation(name).is_some_and(&serves))
            .filter_map(|(name, bytes)| Some((name, FinishedRecord::decode(bytes.as_ref()).ok()?)))
            .collect();
        tombstones.sort_by_key(|(_, f)| f.finished_at.as_ref().map(|t| (t.seconds, t.nanos)));
        let order: VecDeque<String> = tombstones.iter().map(|(name, _)| name.clone()).collect();
        let finished_count = tombstones.len();
        state.finished_before_restart = tombstones.into_iter().collect();
        let journal = Journal::start(store, order);
        if not_served > 0 {
            tracing::warn!(not_served, "the journal holds operations of instances this server does not serve; left there, not restored");
        }
        tracing::info!(journal = %journal.describe(), restored = queued + leased, queued, leased,
            finished_before_restart = finished_count, "restored unfinished operations");
        state.journal = Some(journal);
        Ok(Scheduler {
            state: Mutex::new(state),
            work_available: Notify::new(),
            config,
        })
    }
}

/// The operation a record describes, as it stood; `None` if the record is unusable.
fn operation_of(name: &str, record: &OperationRecord) -> Option<Operation> {
    let digest = Digest::from_field(record.action_digest.as_ref()).ok()?;
    let leased = !record.lease_id.is_empty();
    let (stage, wire_stage) = if leased {
        (Stage::Executing, execution_stage::Value::Executing)
    } else {
        (Stage::Queued, execution_stage::Value::Queued)
    };
    let (updates, _) = watch::channel(pending_operation(name, &digest, wire_stage));
    let detail = if leased {
        format!(
            "after a server restart, still leased (attempt {})",
            record.attempts
        )
    } else {
        "after a server restart, queued".to_string()
    };
    Some(Operation {
        instance: record.instance.clone(),
        work: Work::Action(ActionWork {
            digest,
            action: record.action.clone().unwrap_or_default(),
            command: None,
        }),
        platform: PlatformKey::from_pairs(
            record
                .platform
                .iter()
                .map(|p| (p.name.clone(), p.value.clone())),
        ),
        priority: record.priority,
        seq: record.seq,
        stage,
        attempts: record.attempts,
        lease: leased.then(|| record.lease_id.clone()),
        workers_tried: record.workers_tried.clone(),
        queued_at: record
            .queued_at
            .and_then(|t| SystemTime::try_from(t).ok())
            .unwrap_or_else(SystemTime::now),
        updates,
        timeline: vec![event(
            "restored",
            leased.then_some(record.lease_worker.as_str()),
            Some(detail),
        )],
        unwatched_since: None,
    })
}
