//! The queues of waiting operations: one per (instance, platform, kind of
//! work), each ordered by priority (lower first), then by arrival. Actions
//! and CI steps queue apart so that a worker that does not run steps is
//! never handed one; the metrics add the two up.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use crate::operation::{Operation, Work};
use crate::platform::PlatformKey;

/// Which queue an operation waits in.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct QueueKey {
    pub(crate) instance: String,
    pub(crate) platform: PlatformKey,
    /// A queue of CI job steps (only workers that run steps take from it).
    pub(crate) steps: bool,
}

impl QueueKey {
    /// The queue of `op`; the one place a queue key is made.
    pub(crate) fn of(op: &Operation) -> QueueKey {
        QueueKey {
            instance: op.instance.clone(),
            platform: op.platform.clone(),
            steps: matches!(op.work, Work::Step(_)),
        }
    }

    /// (instance, platform label): the labels of its metric series.
    pub(crate) fn metric_labels(&self) -> (String, String) {
        (self.instance.clone(), self.platform.label())
    }
}

/// Heap entry: max-heap on Reverse((priority, seq)), so the lowest
/// priority value, then the oldest, comes first.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Queued(Reverse<(i32, u64)>, String);

/// Every queue. An empty queue is dropped at once, so a platform nobody
/// uses any more leaves no queue or metric series behind.
#[derive(Default)]
pub(crate) struct Queues {
    by_key: BTreeMap<QueueKey, BinaryHeap<Queued>>,
}

impl Queues {
    /// Queues `name` (the operation `op`) in its place: a requeued
    /// operation keeps the place it had.
    pub(crate) fn push(&mut self, name: &str, op: &Operation) {
        self.by_key
            .entry(QueueKey::of(op))
            .or_default()
            .push(Queued(Reverse((op.priority, op.seq)), name.to_string()));
    }

    /// Takes `name` (the operation `op`) out of its queue, if it is there.
    pub(crate) fn remove(&mut self, name: &str, op: &Operation) {
        let key = QueueKey::of(op);
        if let Some(queue) = self.by_key.get_mut(&key) {
            queue.retain(|q| q.1 != name);
            if queue.is_empty() {
                self.by_key.remove(&key);
            }
        }
    }

    /// Takes the first operation of `instance` that a worker offering
    /// `offered` can run, across every queue whose platform it satisfies;
    /// CI steps only if the worker `runs_steps`.
    pub(crate) fn pop_best(
        &mut self,
        instance: &str,
        offered: &PlatformKey,
        runs_steps: bool,
    ) -> Option<String> {
        let best = self
            .by_key
            .iter()
            .filter(|(key, queue)| {
                key.instance == instance
                    && (runs_steps || !key.steps)
                    && !queue.is_empty()
                    && key.platform.satisfied_by(offered)
            })
            .max_by(|(_, a), (_, b)| a.peek().cmp(&b.peek()))
            .map(|(key, _)| key.clone())?;
        let queue = self.by_key.get_mut(&best)?;
        let Queued(_, name) = queue.pop()?;
        if queue.is_empty() {
            self.by_key.remove(&best);
        }
        Some(name)
    }

    /// Every queue with its length.
    pub(crate) fn depths(&self) -> impl Iterator<Item = (&QueueKey, usize)> {
        self.by_key.iter().map(|(key, queue)| (key, queue.len()))
    }

    /// Whether nothing is queued (no queue is kept empty).
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}
