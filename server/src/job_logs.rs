//! A step's log for `StreamLogs` and the HTTP log page: what arrives live
//! from the worker while the attempt runs, then the rest from the whole log
//! stored in the CAS once it ended, so a follower gets every byte once.

use std::sync::Arc;
use std::time::Duration;

use buildkube_jobs::logs::{LiveLogs, StepLogKey};
use buildkube_jobs::run::{JobRecord, JobRunner};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tonic::Status;

use crate::storage::SharedBlobStore;

/// Log streams served at once; more are RESOURCE_EXHAUSTED (HTTP 429).
pub const MAX_LOG_STREAMS: usize = 256;
/// Chunks buffered per stream (each at most 64 KiB).
const STREAM_BUFFER: usize = 16;
/// How long a follower waits for the job's record to name the stored log
/// after the live log ended.
const STORED_LOG_WAIT: Duration = Duration::from_secs(30);

/// Bytes of a step's log at `offset`.
#[derive(Debug, Clone)]
pub struct LogPiece {
    /// The attempt the bytes belong to.
    pub attempt: u32,
    /// Where they start in the attempt's log (0 again when a lost worker's
    /// run was restarted elsewhere).
    pub offset: u64,
    /// The bytes.
    pub data: Bytes,
}

/// What a log request asks for.
#[derive(Debug, Clone)]
pub struct LogRequest {
    /// The job's instance (checked by the caller).
    pub instance: String,
    /// The job.
    pub job_id: String,
    /// The step's key.
    pub step_key: String,
    /// 1-based; 0 for the latest.
    pub attempt: u32,
    /// Where to start.
    pub offset: u64,
    /// Keep streaming until the attempt ends.
    pub follow: bool,
}

/// Streams step logs, within [`MAX_LOG_STREAMS`] at once.
#[derive(Clone)]
pub struct StepLogs {
    runner: JobRunner,
    live: Arc<LiveLogs>,
    cas: SharedBlobStore,
    streams: Arc<Semaphore>,
}

impl StepLogs {
    /// Logs of `runner`'s jobs, live from `live`, stored in `cas`.
    pub fn new(runner: JobRunner, live: Arc<LiveLogs>, cas: SharedBlobStore) -> StepLogs {
        StepLogs {
            runner,
            live,
            cas,
            streams: Arc::new(Semaphore::new(MAX_LOG_STREAMS)),
        }
    }

    /// The log `request` asks for, as a stream of pieces; NOT_FOUND for
    /// an unknown job or step, RESOURCE_EXHAUSTED beyond the stream limit.
    pub fn stream(
        &self,
        request: LogRequest,
    ) -> Result<mpsc::Receiver<Result<LogPiece, Status>>, Status> {
        let job = self
            .runner
            .get(&request.instance, &request.job_id)
            .map_err(crate::error::job_error)?;
        if job.step(&request.step_key).is_none() {
            let keys: Vec<&str> = job.steps.iter().map(|s| s.key.as_str()).collect();
            return Err(Status::not_found(format!(
                "job {} has no step {:?}; its steps are {}",
                job.id,
                request.step_key,
                keys.join(", ")
            )));
        }
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "{MAX_LOG_STREAMS} log streams are open; retry later"
            ))
        })?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let logs = self.clone();
        tokio::spawn(async move {
            if let Err(status) = logs.send_log(&request, &tx, permit).await {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(rx)
    }

    async fn send_log(
        &self,
        request: &LogRequest,
        tx: &mpsc::Sender<Result<LogPiece, Status>>,
        _permit: OwnedSemaphorePermit,
    ) -> Result<(), Status> {
        let mut updates = self
            .runner
            .watch(&request.instance, &request.job_id)
            .map_err(crate::error::job_error)?;
        // The attempt: the one asked for, or the latest (waiting for the
        // first when following a step that has not started).
        let attempt = loop {
            let job = updates.borrow_and_update().clone();
            let step = job.step(&request.step_key).expect("checked");
            let latest = step.attempts.len() as u32;
            match request.attempt {
                0 if latest > 0 => break latest,
                n if n > 0 && n <= latest => break n,
                n if n > latest && !request.follow => {
                    return Err(Status::not_found(format!(
                        "step {:?} of job {} has {latest} attempts, not {n}",
                        request.step_key, job.id
                    )))
                }
                _ if step.state.is_finished() || !request.follow => return Ok(()),
                _ => {}
            }
            if updates.changed().await.is_err() {
                return Ok(());
            }
        };
        let key = StepLogKey {
            job_id: request.job_id.clone(),
            step_key: request.step_key.clone(),
            attempt,
        };
        let mut offset = request.offset;
        let ended =
            |job: &JobRecord| attempt_of(job, &request.step_key, attempt).is_none_or(|a| a.ended);
        if !ended(&updates.borrow()) {
            // Live while it runs.
            let mut follower = self.live.follow(&key, offset);
            loop {
                let next = if request.follow {
                    follower.next().await
                } else {
                    follower.next().now_or_never().flatten()
                };
                let Some(chunk) = next else { break };
                offset = chunk.offset + chunk.data.len() as u64;
                let piece = LogPiece {
                    attempt,
                    offset: chunk.offset,
                    data: chunk.data,
                };
                if tx.send(Ok(piece)).await.is_err() {
                    return Ok(());
                }
            }
            if !request.follow {
                return Ok(());
            }
            // The live log ended; the record names the stored one shortly.
            let _ = tokio::time::timeout(STORED_LOG_WAIT, updates.wait_for(|job| ended(job))).await;
        }
        let stored = attempt_of(&updates.borrow(), &request.step_key, attempt).and_then(|a| a.log);
        let Some(digest) = stored else {
            return Ok(()); // the attempt never ran on a worker, or its log is not known
        };
        if offset >= digest.size() {
            return Ok(());
        }
        let Some(mut blob) = self
            .cas
            .read(&digest, offset, digest.size() - offset)
            .await?
        else {
            return Err(Status::not_found(format!(
                "the log of step {:?} attempt {attempt} ({digest}) is no longer in the CAS",
                request.step_key
            )));
        };
        while let Some(data) = blob.next().await {
            let data = data?;
            let len = data.len() as u64;
            let piece = LogPiece {
                attempt,
                offset,
                data,
            };
            if tx.send(Ok(piece)).await.is_err() {
                return Ok(());
            }
            offset += len;
        }
        Ok(())
    }
}

fn attempt_of<'a>(
    job: &'a JobRecord,
    step_key: &str,
    attempt: u32,
) -> Option<&'a buildkube_jobs::run::record::AttemptRecord> {
    job.step(step_key)?
        .attempts
        .iter()
        .find(|a| a.attempt == attempt)
}
