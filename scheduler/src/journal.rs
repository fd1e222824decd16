//! The journal of unfinished operations, so that they survive a server
//! restart: each queued or leased operation is a record (kind
//! [`OPERATION_KIND`], keyed by its name) in the server's
//! [`RecordStore`]; a finished one leaves a small tombstone (kind
//! [`FINISHED_KIND`]) for a while, so that a client asking about it after a
//! restart is told the truth, not "never heard of it".
//!
//! The scheduler records changes under its lock ([`Journal::record`]: no
//! I/O, last change per record wins); one writer task applies everything
//! pending as one [`RecordStore::apply`] at a time, so two changes to one
//! record are written in order, and a caller that must not answer before its
//! change is durable (Execute, Lease, Complete) awaits
//! [`Journal::written`]. Many callers share each write: a slow flush delays
//! each of them by about one flush, not by one flush per caller ahead.
//!
//! What is recorded is bounded: one record per unfinished operation (the
//! scheduler bounds those per instance) holding its Action (bounded by
//! `--max-message-blob-size` at Execute), and at most
//! [`FINISHED_REMEMBERED`] tombstones.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use buildkube_proto::reapi;
use buildkube_proto::rpc;
use buildkube_reapi::Digest;
use buildkube_records::{RecordChange, RecordError, RecordStore, MAX_APPLY_BYTES};
use prost::Message;
use tokio::sync::{watch, Notify};

use crate::operation::{Operation, Stage, Work};

/// Record kind of an unfinished operation.
pub const OPERATION_KIND: &str = "operation";
/// Record kind of a recently finished operation's tombstone.
pub const FINISHED_KIND: &str = "finished-operation";
/// Tombstones kept; the oldest go first.
pub(crate) const FINISHED_REMEMBERED: usize = 1000;
/// Longest wait between retries of a failed write.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// An unfinished operation as stored.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct OperationRecord {
    #[prost(string, tag = "1")]
    pub(crate) instance: String,
    #[prost(message, optional, tag = "2")]
    pub(crate) action_digest: Option<reapi::Digest>,
    #[prost(message, optional, tag = "3")]
    pub(crate) action: Option<reapi::Action>,
    #[prost(int32, tag = "4")]
    pub(crate) priority: i32,
    /// The canonical platform the operation was queued under.
    #[prost(message, repeated, tag = "5")]
    pub(crate) platform: Vec<reapi::platform::Property>,
    /// Order of arrival.
    #[prost(uint64, tag = "6")]
    pub(crate) seq: u64,
    #[prost(uint32, tag = "7")]
    pub(crate) attempts: u32,
    #[prost(string, repeated, tag = "8")]
    pub(crate) workers_tried: Vec<String>,
    #[prost(message, optional, tag = "9")]
    pub(crate) queued_at: Option<prost_types::Timestamp>,
    /// Empty while queued.
    #[prost(string, tag = "10")]
    pub(crate) lease_id: String,
    /// The lease holder's worker credential.
    #[prost(string, tag = "11")]
    pub(crate) lease_identity: String,
    /// The lease holder's worker id.
    #[prost(string, tag = "12")]
    pub(crate) lease_worker: String,
}

/// What is remembered of a finished operation.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct FinishedRecord {
    #[prost(message, optional, tag = "1")]
    pub(crate) action_digest: Option<reapi::Digest>,
    /// The outcome's status (details dropped).
    #[prost(message, optional, tag = "2")]
    pub(crate) status: Option<rpc::Status>,
    /// Exit code, when the action ran.
    #[prost(int32, optional, tag = "3")]
    pub(crate) exit_code: Option<i32>,
    #[prost(message, optional, tag = "4")]
    pub(crate) finished_at: Option<prost_types::Timestamp>,
}

impl FinishedRecord {
    /// How the operation ended, for a message to a client.
    pub(crate) fn outcome(&self) -> String {
        let status = self.status.clone().unwrap_or_default();
        match (status.code, self.exit_code) {
            (0, Some(code)) => format!("it ran and exited with code {code}"),
            (0, None) => "it succeeded".to_string(),
            (code, _) => format!(
                "it failed with {:?}: {}",
                tonic::Code::from_i32(code),
                status.message
            ),
        }
    }
}

/// The record of `op`; `None` for work that is not journaled.
pub(crate) fn operation_record(
    op: &Operation,
    holder: Option<(&str, &str)>,
) -> Option<OperationRecord> {
    // A CI job's steps are restored by the job manager, not from here.
    let Work::Action(action) = &op.work else {
        return None;
    };
    if op.stage == Stage::Completed {
        return None;
    }
    let (identity, worker) = holder.unwrap_or_default();
    Some(OperationRecord {
        instance: op.instance.clone(),
        action_digest: Some(action.digest.to_proto()),
        action: Some(action.action.clone()),
        priority: op.priority,
        platform: op
            .platform
            .properties()
            .iter()
            .map(|(name, value)| reapi::platform::Property {
                name: name.clone(),
                value: value.clone(),
            })
            .collect(),
        seq: op.seq,
        attempts: op.attempts,
        workers_tried: op.workers_tried.clone(),
        queued_at: Some(op.queued_at.into()),
        lease_id: op.lease.clone().unwrap_or_default(),
        lease_identity: identity.to_string(),
        lease_worker: worker.to_string(),
    })
}

/// A finished operation's tombstone.
pub(crate) fn finished_record(
    digest: &Digest,
    response: &reapi::ExecuteResponse,
) -> FinishedRecord {
    let status = response.status.clone().map(|mut s| {
        s.details.clear();
        s
    });
    FinishedRecord {
        action_digest: Some(digest.to_proto()),
        status,
        exit_code: response.result.as_ref().map(|r| r.exit_code),
        finished_at: Some(SystemTime::now().into()),
    }
}

/// Why a journal write did not happen.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the operation journal could not be written ({store}): {message}")]
pub struct JournalError {
    /// Where the journal lives.
    pub store: String,
    /// The store's error.
    pub message: String,
}

#[derive(Clone, Default)]
struct Progress {
    /// Every change recorded up to this number is written.
    written: u64,
    /// The last failed write: changes up to this number, and why.
    failed: Option<(u64, String)>,
}

#[derive(Default)]
struct Pending {
    /// Last change per (kind, key), waiting to be written.
    changes: HashMap<(String, String), RecordChange>,
    /// Number of the last change recorded.
    recorded: u64,
    /// Tombstones written or pending, oldest first.
    finished: VecDeque<String>,
}

/// The journal: pending changes and the task that writes them.
pub(crate) struct Journal {
    store: Arc<dyn RecordStore>,
    pending: Mutex<Pending>,
    wake: Notify,
    progress: watch::Sender<Progress>,
    /// Set when its scheduler is dropped: the writer writes what is
    /// pending, then stops and lets go of the store.
    closed: AtomicBool,
}

impl Journal {
    /// A journal over `store` whose tombstones are `finished` (oldest first);
    /// its writer is a task on the current tokio runtime, for as long as it runs.
    pub(crate) fn start(store: Arc<dyn RecordStore>, finished: VecDeque<String>) -> Arc<Journal> {
        let journal = Arc::new(Journal {
            store,
            pending: Mutex::new(Pending {
                finished,
                ..Default::default()
            }),
            wake: Notify::new(),
            progress: watch::channel(Progress::default()).0,
            closed: AtomicBool::new(false),
        });
        tokio::spawn(write_loop(journal.clone()));
        journal
    }

    /// Stops the writer once what is pending is written.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Where the journal lives, for logs.
    pub(crate) fn describe(&self) -> String {
        self.store.describe()
    }

    /// Records that operation `name` is now `record` (`None`: gone). No I/O.
    pub(crate) fn record_operation(&self, name: &str, record: Option<&OperationRecord>) {
        let change = match record {
            Some(record) => RecordChange::put(OPERATION_KIND, name, record.encode_to_vec()),
            None => RecordChange::delete(OPERATION_KIND, name),
        };
        self.record(vec![change]);
    }

    /// Records that operation `name` finished: its record goes, a tombstone
    /// comes (and the oldest tombstone beyond the bound goes).
    pub(crate) fn record_finished(&self, name: &str, tombstone: &FinishedRecord) {
        let mut changes = vec![
            RecordChange::delete(OPERATION_KIND, name),
            RecordChange::put(FINISHED_KIND, name, tombstone.encode_to_vec()),
        ];
        let mut pending = self.pending.lock().unwrap();
        pending.finished.push_back(name.to_string());
        while pending.finished.len() > FINISHED_REMEMBERED {
            if let Some(old) = pending.finished.pop_front() {
                changes.push(RecordChange::delete(FINISHED_KIND, &old));
            }
        }
        drop(pending);
        self.record(changes);
    }

    fn record(&self, changes: Vec<RecordChange>) {
        let mut pending = self.pending.lock().unwrap();
        for change in changes {
            let key = (change.kind().to_string(), change.key().to_string());
            pending.changes.insert(key, change);
        }
        pending.recorded += 1;
        drop(pending);
        self.wake.notify_one();
    }

    /// The number of the last change recorded, for [`Journal::written`].
    pub(crate) fn recorded(&self) -> u64 {
        self.pending.lock().unwrap().recorded
    }

    /// Waits until every change up to `mark` is written.
    pub(crate) async fn written(&self, mark: u64) -> Result<(), JournalError> {
        let mut progress = self.progress.subscribe();
        loop {
            {
                let now = progress.borrow_and_update();
                if now.written >= mark {
                    return Ok(());
                }
                if let Some((failed, message)) = &now.failed {
                    if *failed >= mark {
                        return Err(JournalError {
                            store: self.store.describe(),
                            message: message.clone(),
                        });
                    }
                }
            }
            if progress.changed().await.is_err() {
                return Err(JournalError {
                    store: self.store.describe(),
                    message: "the journal stopped".into(),
                });
            }
        }
    }

    /// Takes what is pending: the changes, and the mark they reach.
    fn take(&self) -> (Vec<RecordChange>, u64) {
        let mut pending = self.pending.lock().unwrap();
        let changes = pending.changes.drain().map(|(_, change)| change).collect();
        (changes, pending.recorded)
    }

    /// Puts back changes whose write failed, unless newer ones replaced them.
    fn put_back(&self, changes: Vec<RecordChange>) {
        let mut pending = self.pending.lock().unwrap();
        for change in changes {
            let key = (change.kind().to_string(), change.key().to_string());
            pending.changes.entry(key).or_insert(change);
        }
    }
}

/// Splits changes into applies of at most [`MAX_APPLY_BYTES`] of values.
fn batches(changes: Vec<RecordChange>) -> Vec<Vec<RecordChange>> {
    let mut batches = vec![Vec::new()];
    let mut bytes = 0usize;
    for change in changes {
        let len = match &change {
            RecordChange::Put { value, .. } => value.len(),
            RecordChange::Delete { .. } => 0,
        };
        if bytes + len > MAX_APPLY_BYTES / 2 && !batches.last().unwrap().is_empty() {
            batches.push(Vec::new());
            bytes = 0;
        }
        bytes += len;
        batches.last_mut().unwrap().push(change);
    }
    batches
}

/// Writes what is pending, one apply at a time, until the runtime stops.
async fn write_loop(journal: Arc<Journal>) {
    let mut retry_delay = Duration::from_millis(100);
    loop {
        let notified = journal.wake.notified();
        let (changes, mark) = journal.take();
        if changes.is_empty() {
            if journal.progress.borrow().written < mark {
                journal.progress.send_modify(|p| p.written = mark);
            }
            if journal.closed.load(Ordering::Acquire) {
                return;
            }
            notified.await;
            continue;
        }
        let mut failed: Option<(RecordError, Vec<RecordChange>)> = None;
        let mut rest = batches(changes).into_iter();
        for batch in rest.by_ref() {
            if let Err(e) = journal.store.apply(batch.clone()).await {
                failed = Some((e, batch));
                break;
            }
        }
        match failed {
            None => {
                retry_delay = Duration::from_millis(100);
                journal.progress.send_modify(|p| {
                    p.written = p.written.max(mark);
                    p.failed = None;
                });
            }
            Some((error, batch)) => {
                tracing::error!(store = %journal.store.describe(), %error, retry_in_ms = retry_delay.as_millis() as u64,
                    "could not write the operation journal; operations changed since are not durable until it is written");
                journal.put_back(batch.into_iter().chain(rest.flatten()).collect());
                journal
                    .progress
                    .send_modify(|p| p.failed = Some((mark, error.to_string())));
                tokio::time::sleep(retry_delay).await;
                retry_delay = (retry_delay * 2).min(MAX_RETRY_DELAY);
            }
        }
    }
}
