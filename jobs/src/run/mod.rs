//! Jobs on the farm: [`JobRunner`] creates a job from a webhook's
//! [`Trigger`] or a client's request, runs its pipeline step (a worker
//! reads `.buildkube/pipeline.yaml` at the commit), parses the file, then
//! queues the pipeline's steps in the scheduler as their dependencies pass,
//! reruns them as their retry rules allow, and settles the job's outcome.
//! Cancel stops every queued and running step.
//!
//! Each job is driven by one task ([`driver`]), the only writer of its
//! record after creation: every change is published to watchers and written
//! to the durable [`RecordStore`] (kind [`JOB_RECORD_KIND`]) in order, so a
//! restarted server resumes it ([`JobRunner::restore`]). Records are bounded: unfinished jobs per
//! instance, finished jobs retained, steps per pipeline (the pipeline's own
//! limits).

mod driver;
pub mod plan;
pub mod record;
pub mod request;
pub mod server_side;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use buildkube_records::RecordStore;
use buildkube_scheduler::Scheduler;
use tokio::sync::watch;

pub use record::{JobRecord, JobState, StepRecord, StepState, PIPELINE_STEP_KEY};
pub use request::{CloneUrl, JobRequest, RequestError};
pub use server_side::{BlobSource, JobCredentials, MintedToken, NoCredentials};

/// The record kind job records are stored under (key: the job id).
pub const JOB_RECORD_KIND: &str = "job";

use crate::webhook::Trigger;

/// Bounds and tuning of the job runner.
#[derive(Debug, Clone)]
pub struct JobLimits {
    /// Unfinished (queued or running) jobs per instance; more are refused.
    pub max_unfinished_per_instance: usize,
    /// Finished jobs remembered (in memory and in the store); the oldest
    /// finished go first.
    pub retain_finished: usize,
    /// How long the pipeline step may take (resolve the ref, read the file).
    pub pipeline_step_timeout: Duration,
    /// Scheduler priority of job steps (lower runs sooner).
    pub priority: i32,
}

impl Default for JobLimits {
    fn default() -> Self {
        JobLimits {
            max_unfinished_per_instance: 100,
            retain_finished: 1000,
            pipeline_step_timeout: Duration::from_secs(600),
            priority: 0,
        }
    }
}

/// Why a job request was refused.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// A field of the request is not acceptable.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The instance runs as many jobs as it may.
    #[error("instance {instance:?} already has {limit} jobs queued or running (--max-unfinished-jobs); retry later")]
    InstanceFull {
        /// The instance.
        instance: String,
        /// The limit.
        limit: usize,
    },
    /// No such job on that instance.
    #[error("job {id:?} not found on instance {instance:?}")]
    NotFound {
        /// The job id asked for.
        id: String,
        /// The instance asked on.
        instance: String,
    },
}

struct Entry {
    record: watch::Sender<JobRecord>,
    /// Tells the job's driver to cancel it, with the reason.
    cancel: watch::Sender<Option<String>>,
}

#[derive(Default)]
struct Table {
    by_id: HashMap<String, Entry>,
    /// Finished jobs, oldest first, for retention.
    finished: VecDeque<String>,
    /// Instance → unfinished jobs.
    unfinished: HashMap<String, usize>,
}

struct Inner {
    scheduler: Arc<Scheduler>,
    blobs: Arc<dyn BlobSource>,
    credentials: Arc<dyn JobCredentials>,
    store: Option<Arc<dyn RecordStore>>,
    limits: JobLimits,
    table: Mutex<Table>,
    /// True once the server stops: drivers leave their jobs as stored.
    stopping: watch::Sender<bool>,
}

/// Creates, drives and remembers the farm's jobs.
#[derive(Clone)]
pub struct JobRunner {
    inner: Arc<Inner>,
}

impl JobRunner {
    /// A runner with no jobs, queueing steps in `scheduler`, reading
    /// pipeline files through `blobs`, minting step credentials with
    /// `credentials`, keeping records in `store` (memory only if `None`).
    pub fn new(
        scheduler: Arc<Scheduler>,
        blobs: Arc<dyn BlobSource>,
        credentials: Arc<dyn JobCredentials>,
        store: Option<Arc<dyn RecordStore>>,
        limits: JobLimits,
    ) -> JobRunner {
        JobRunner {
            inner: Arc::new(Inner {
                scheduler,
                blobs,
                credentials,
                store,
                limits,
                table: Mutex::new(Table::default()),
                stopping: watch::channel(false).0,
            }),
        }
    }

    /// Loads the stored records and resumes every unfinished job: its
    /// queued and running steps are watched again through the scheduler
    /// (whose operations survive the restart), and steps whose operation
    /// is gone run again as a new attempt. Returns how many jobs were
    /// loaded and how many resumed.
    pub async fn restore(&self) -> Result<(usize, usize), String> {
        let Some(store) = &self.inner.store else {
            return Ok((0, 0));
        };
        let mut records: Vec<JobRecord> = Vec::new();
        let stored = store
            .load_all(JOB_RECORD_KIND)
            .await
            .map_err(|e| e.to_string())?;
        for (key, bytes) in stored {
            match serde_json::from_slice::<JobRecord>(&bytes) {
                Ok(record) => records.push(record),
                Err(e) => {
                    tracing::warn!(job = %key, error = %e, "skipping an unreadable stored job record")
                }
            }
        }
        records.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        let loaded = records.len();
        let mut resumed = 0;
        for record in records {
            let finished = record.state.is_finished();
            let id = record.id.clone();
            let instance = record.instance.clone();
            if !finished {
                // Steps still running hold these tokens: they stay valid
                // until the job ends, from before any step reports.
                for hash in &record.token_hashes {
                    self.inner.credentials.honour(&id, &instance, hash);
                }
            }
            let cancel = self.insert(record, !finished);
            if finished {
                self.inner.retire(&id, &instance, false).await;
            } else {
                resumed += 1;
                tokio::spawn(driver::drive(self.inner.clone(), id, cancel, true));
            }
        }
        if loaded > 0 {
            tracing::info!(loaded, resumed, "job records restored");
        }
        Ok((loaded, resumed))
    }

    /// Starts a job for a webhook delivery on `instance`, cloning through
    /// the forge's `clone_url` of the repository.
    pub async fn start_for_trigger(
        &self,
        trigger: &Trigger,
        instance: &str,
        clone_url: CloneUrl,
    ) -> Result<JobRecord, JobError> {
        self.start(JobRequest::from_trigger(trigger, instance, clone_url))
            .await
    }

    /// Starts a job: checks the request, records the job, queues its
    /// pipeline step. Returns the job as created.
    pub async fn start(&self, request: JobRequest) -> Result<JobRecord, JobError> {
        let record = request.into_record()?;
        {
            let mut table = self.inner.table.lock().unwrap();
            let limit = self.inner.limits.max_unfinished_per_instance;
            let count = table.unfinished.get(&record.instance).copied().unwrap_or(0);
            if count >= limit {
                tracing::warn!(instance = %record.instance, limit, "refusing a job: instance runs its limit of jobs");
                return Err(JobError::InstanceFull {
                    instance: record.instance,
                    limit,
                });
            }
            // Counted now, under the lock, so concurrent starts cannot exceed it.
            *table.unfinished.entry(record.instance.clone()).or_default() += 1;
        }
        self.inner.persist(&record).await;
        let id = record.id.clone();
        tracing::info!(job = %id, instance = %record.instance, repository = %record.repository, git_ref = %record.git_ref, source = %record.trigger.source, "job created");
        let cancel = self.insert(record.clone(), false);
        tokio::spawn(driver::drive(self.inner.clone(), id, cancel, false));
        Ok(record)
    }

    /// Adds a record to the table; returns the receiver its driver watches
    /// for a cancel. `count_unfinished`: add it to its instance's count
    /// (restored jobs; new ones were counted when admitted).
    fn insert(&self, record: JobRecord, count_unfinished: bool) -> watch::Receiver<Option<String>> {
        let (cancel, cancel_rx) = watch::channel(None);
        let mut table = self.inner.table.lock().unwrap();
        if count_unfinished {
            *table.unfinished.entry(record.instance.clone()).or_default() += 1;
        }
        let id = record.id.clone();
        table.by_id.insert(
            id,
            Entry {
                record: watch::channel(record).0,
                cancel,
            },
        );
        cancel_rx
    }

    /// The job `id` if it runs on `instance`.
    pub fn get(&self, instance: &str, id: &str) -> Result<JobRecord, JobError> {
        let table = self.inner.table.lock().unwrap();
        table
            .by_id
            .get(id)
            .map(|e| e.record.borrow().clone())
            .filter(|r| r.instance == instance)
            .ok_or_else(|| JobError::NotFound {
                id: id.to_string(),
                instance: instance.to_string(),
            })
    }

    /// The job `id` whatever its instance (the caller checks the caller's
    /// rights on the record's instance).
    pub fn find(&self, id: &str) -> Option<JobRecord> {
        let table = self.inner.table.lock().unwrap();
        table.by_id.get(id).map(|e| e.record.borrow().clone())
    }

    /// Updates of job `id` on `instance`: the receiver holds the current
    /// record and changes each time the job does.
    pub fn watch(&self, instance: &str, id: &str) -> Result<watch::Receiver<JobRecord>, JobError> {
        let table = self.inner.table.lock().unwrap();
        table
            .by_id
            .get(id)
            .filter(|e| e.record.borrow().instance == instance)
            .map(|e| e.record.subscribe())
            .ok_or_else(|| JobError::NotFound {
                id: id.to_string(),
                instance: instance.to_string(),
            })
    }

    /// Jobs of `instance`, newest first: at most `page_size` (0: 100, at
    /// most 1000) after the one `page_token` names; and the next token
    /// (empty on the last page).
    pub fn list(
        &self,
        instance: &str,
        page_size: usize,
        page_token: &str,
    ) -> (Vec<JobRecord>, String) {
        let page_size = match page_size {
            0 => 100,
            n => n.min(1000),
        };
        let table = self.inner.table.lock().unwrap();
        let mut jobs: Vec<JobRecord> = table
            .by_id
            .values()
            .map(|e| e.record.borrow())
            .filter(|r| r.instance == instance)
            .map(|r| r.clone())
            .collect();
        drop(table);
        jobs.sort_by(|a, b| list_key(b).cmp(&list_key(a)));
        if !page_token.is_empty() {
            jobs.retain(|j| list_token(j).as_str() < page_token);
        }
        let next = if jobs.len() > page_size {
            list_token(&jobs[page_size - 1])
        } else {
            String::new()
        };
        jobs.truncate(page_size);
        (jobs, next)
    }

    /// Cancels job `id` on `instance`: its queued steps are dropped and its
    /// running ones killed. Returns the job once cancelled (or as it is, if
    /// it had already finished).
    pub async fn cancel(&self, instance: &str, id: &str, why: &str) -> Result<JobRecord, JobError> {
        let mut updates = self.watch(instance, id)?;
        {
            let table = self.inner.table.lock().unwrap();
            if let Some(entry) = table.by_id.get(id) {
                entry.cancel.send_if_modified(|reason| {
                    if reason.is_some() {
                        return false;
                    }
                    *reason = Some(why.to_string());
                    true
                });
            }
        }
        // The driver applies it at once; wait for that, briefly.
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            updates.wait_for(|r| r.state.is_finished()),
        )
        .await;
        let record = updates.borrow().clone();
        Ok(record)
    }

    /// Stops driving jobs (the server is stopping): each stays as last
    /// stored, its steps' operations untouched, for [`JobRunner::restore`]
    /// to resume at the next start.
    pub fn stop(&self) {
        self.inner.stopping.send_replace(true);
    }

    /// Jobs held, and unfinished jobs per instance (for bounds and tests).
    pub fn counts(&self) -> (usize, HashMap<String, usize>) {
        let table = self.inner.table.lock().unwrap();
        (table.by_id.len(), table.unfinished.clone())
    }
}

fn list_key(job: &JobRecord) -> (u64, &str) {
    (job.created_ms, job.id.as_str())
}

fn list_token(job: &JobRecord) -> String {
    format!("{:020}-{}", job.created_ms, job.id)
}

impl Inner {
    /// Stores a driver's new version of a job's record, then publishes it:
    /// whoever sees a state sees one a restart would resume from.
    async fn publish(&self, record: &JobRecord) {
        self.persist(record).await;
        let table = self.table.lock().unwrap();
        if let Some(entry) = table.by_id.get(&record.id) {
            entry.record.send_replace(record.clone());
        }
    }

    async fn persist(&self, record: &JobRecord) {
        let Some(store) = &self.store else {
            return;
        };
        let bytes = serde_json::to_vec(record).expect("a job record serializes");
        if let Err(error) = store.put(JOB_RECORD_KIND, &record.id, bytes.into()).await {
            tracing::warn!(job = %record.id, %error, "could not store the job record; it will not survive a restart");
        }
    }

    /// Books a finished job: no longer counted as unfinished (if it was),
    /// and kept until `retain_finished` newer finished jobs push it out.
    async fn retire(&self, id: &str, instance: &str, was_unfinished: bool) {
        let mut dropped = Vec::new();
        {
            let mut table = self.table.lock().unwrap();
            if was_unfinished {
                if let Some(count) = table.unfinished.get_mut(instance) {
                    *count = count.saturating_sub(1);
                    if *count == 0 {
                        table.unfinished.remove(instance);
                    }
                }
            }
            table.finished.push_back(id.to_string());
            while table.finished.len() > self.limits.retain_finished {
                if let Some(old) = table.finished.pop_front() {
                    table.by_id.remove(&old);
                    dropped.push(old);
                }
            }
        }
        if let Some(store) = &self.store {
            for old in dropped {
                if let Err(error) = store.delete(JOB_RECORD_KIND, &old).await {
                    tracing::warn!(job = %old, %error, "could not delete a retired job record");
                }
            }
        }
    }
}
