//! What the scheduler counts for metrics: queue depths, running work,
//! workers, outcomes.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::queue::QueueKey;
use crate::State;

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

impl SchedulerStats {
    /// Counts `state`; workers seen within `fresh` (or holding a lease) are connected.
    pub(crate) fn of(state: &State, fresh: Duration) -> SchedulerStats {
        let mut stats = SchedulerStats {
            outcomes: state.outcomes.clone(),
            ..Default::default()
        };
        for (key, depth) in state.queues.depths() {
            let labels = key.metric_labels();
            *stats.queue_depth.entry(labels.clone()).or_default() += depth;
            stats.running.entry(labels).or_default();
        }
        for name in state.leases.leased_operations() {
            if let Some(op) = state.operations.get(name) {
                let labels = QueueKey::of(op).metric_labels();
                stats.queue_depth.entry(labels.clone()).or_default();
                *stats.running.entry(labels).or_default() += 1;
            }
        }
        for w in state.leases.live_workers(fresh) {
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
        stats
    }
}
