//! The server's operation timelines (`GET /operations`), as tests read them.

use serde::Deserialize;

/// Path of the server's recent-operations listing.
pub const OPERATIONS_PATH: &str = "/operations";

/// Timeline event: the server leased the action to a worker.
pub const EVENT_ASSIGNED: &str = "assigned";
/// Timeline event: a lease expired and the action went back to its queue.
pub const EVENT_REQUEUED: &str = "requeued";
/// Timeline event: the operation was brought back from the journal at a
/// server start (with the worker still holding its lease, if leased).
pub const EVENT_RESTORED: &str = "restored";
/// Timeline event: a worker's result was accepted.
pub const EVENT_COMPLETED: &str = "completed";

/// One operation as `/operations` shows it.
#[derive(Debug, Clone, Deserialize)]
pub struct Operation {
    /// `operations/...`.
    pub name: String,
    /// `QUEUED`, `EXECUTING` or `COMPLETED`.
    pub stage: String,
    /// Hand-outs to workers so far.
    pub attempts: u32,
    /// Events, oldest first.
    pub timeline: Vec<TimelineEvent>,
}

/// One event of an operation's timeline.
#[derive(Debug, Clone, Deserialize)]
pub struct TimelineEvent {
    /// What happened, e.g. [`EVENT_ASSIGNED`].
    pub event: String,
    /// Worker involved, if any.
    #[serde(default)]
    pub worker: Option<String>,
    /// Free-form detail.
    #[serde(default)]
    pub detail: Option<String>,
}

impl Operation {
    /// Whether a worker runs it now.
    pub fn is_executing(&self) -> bool {
        self.stage == "EXECUTING"
    }

    /// Whether it has finished.
    pub fn is_completed(&self) -> bool {
        self.stage == "COMPLETED"
    }

    /// The worker of the latest hand-out, if any.
    pub fn last_assigned_worker(&self) -> Option<&str> {
        self.timeline
            .iter()
            .rev()
            .find(|e| e.event == EVENT_ASSIGNED)
            .and_then(|e| e.worker.as_deref())
    }

    /// Whether it is executing on `worker` now.
    pub fn is_running_on(&self, worker: &str) -> bool {
        self.is_executing() && self.last_assigned_worker() == Some(worker)
    }

    /// Whether the timeline has `event` involving `worker`.
    pub fn has_event(&self, event: &str, worker: &str) -> bool {
        self.timeline
            .iter()
            .any(|e| e.event == event && e.worker.as_deref() == Some(worker))
    }

    /// The worker whose result completed it, if it completed with one.
    pub fn completed_by(&self) -> Option<&str> {
        self.timeline
            .iter()
            .rev()
            .find(|e| e.event == EVENT_COMPLETED)
            .and_then(|e| e.worker.as_deref())
    }

    /// The timeline on one line, for messages.
    pub fn describe(&self) -> String {
        let events: Vec<String> = self
            .timeline
            .iter()
            .map(|e| match &e.worker {
                Some(worker) => format!("{}@{worker}", e.event),
                None => e.event.clone(),
            })
            .collect();
        format!(
            "{} [{}, {} attempt(s)]: {}",
            self.name,
            self.stage,
            self.attempts,
            events.join(" -> ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_server_writes() {
        let json = r#"[{"name":"operations/1","instance":"main","action_digest":"ab/1","platform":"",
            "stage":"COMPLETED","attempts":2,"timeline":[
            {"event":"queued","at_ms":1},
            {"event":"assigned","at_ms":2,"worker":"w1"},
            {"event":"requeued","at_ms":3,"worker":"w1","detail":"lease expired"},
            {"event":"assigned","at_ms":4,"worker":"w2"},
            {"event":"completed","at_ms":5,"worker":"w2"}]}]"#;
        let ops: Vec<Operation> = serde_json::from_str(json).unwrap();
        let op = &ops[0];
        assert!(op.is_completed() && !op.is_executing());
        assert_eq!(op.last_assigned_worker(), Some("w2"));
        assert!(op.has_event(EVENT_REQUEUED, "w1"));
        assert_eq!(op.completed_by(), Some("w2"));
        assert_eq!(
            op.describe(),
            "operations/1 [COMPLETED, 2 attempt(s)]: queued -> assigned@w1 -> requeued@w1 -> \
             assigned@w2 -> completed@w2"
        );
    }
}
