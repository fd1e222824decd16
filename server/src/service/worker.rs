use std::sync::Arc;
use std::time::Duration;

use buildkube_proto::worker::{
    self as wire, complete_request, worker_service_server::WorkerService,
};
use tonic::{Request, Response, Status};

use crate::auth::Caller;
use crate::farm::Farm;
use buildkube_jobs::logs::{LogError, StepLogKey, MAX_APPEND_BYTES};
use buildkube_scheduler::{LeaseHolder, LeaseOutcome, LeaseRefused, StepLeaseInfo};

/// Longest a Lease call is held open.
const MAX_LEASE_WAIT: Duration = Duration::from_secs(60);

/// The worker protocol: Lease, KeepAlive, Complete, AppendStepLog. Only
/// worker credentials may call it, and only a lease's holder may report on
/// it.
pub struct WorkerProtocolService {
    farm: Arc<Farm>,
}

impl WorkerProtocolService {
    /// The service over `farm`.
    pub fn new(farm: Arc<Farm>) -> Self {
        WorkerProtocolService { farm }
    }

    fn check_worker(&self, worker: Option<&wire::WorkerInfo>) -> Result<wire::WorkerInfo, Status> {
        let worker = worker.ok_or_else(|| Status::invalid_argument("worker is missing"))?;
        if worker.worker_id.is_empty() {
            return Err(Status::invalid_argument("worker.worker_id is empty"));
        }
        self.farm.instances.check(&worker.instance_name)?;
        Ok(worker.clone())
    }
}

/// The live log a step lease writes.
fn log_key(step: &StepLeaseInfo) -> StepLogKey {
    StepLogKey {
        job_id: step.job_id.clone(),
        step_key: step.step_key.clone(),
        attempt: step.attempt,
    }
}

/// A report on a lease its caller does not hold: PERMISSION_DENIED, logged.
fn refused(holder: &LeaseHolder, call: &str, refusal: LeaseRefused) -> Status {
    tracing::warn!(worker = %holder.worker_id, credential = %holder.identity, lease = %refusal.lease_id,
        operation = %refusal.operation, reason = %refusal.reason, "{call} refused: not the lease holder");
    Status::permission_denied(format!("{call} refused: {refusal}"))
}

#[tonic::async_trait]
impl WorkerService for WorkerProtocolService {
    #[tracing::instrument(skip_all, fields(worker = request.get_ref().worker.as_ref().map(|w| w.worker_id.as_str()).unwrap_or("")))]
    async fn lease(
        &self,
        request: Request<wire::LeaseRequest>,
    ) -> Result<Response<wire::LeaseResponse>, Status> {
        let identity = Caller::of(&request).require_worker()?;
        let request = request.into_inner();
        let worker = self.check_worker(request.worker.as_ref())?;
        let wait = request
            .wait
            .map(|d| Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32))
            .unwrap_or_default()
            .min(MAX_LEASE_WAIT);
        let mut stopping = self.farm.stopping.clone();
        let lease = tokio::select! {
            lease = self.farm.scheduler.lease(&worker, &identity, wait) => lease,
            _ = stopping.wait_for(|stop| *stop) => None,
        };
        if lease.is_some() {
            // Recorded first, so that after a restart this worker's
            // keep-alives and result are still accepted.
            if let Err(error) = self.farm.scheduler.journal_written().await {
                tracing::warn!(%error, "lease handed out before it was journaled");
            }
        }
        Ok(Response::new(wire::LeaseResponse { lease }))
    }

    #[tracing::instrument(skip_all, fields(worker = request.get_ref().worker.as_ref().map(|w| w.worker_id.as_str()).unwrap_or("")))]
    async fn keep_alive(
        &self,
        request: Request<wire::KeepAliveRequest>,
    ) -> Result<Response<wire::KeepAliveResponse>, Status> {
        let identity = Caller::of(&request).require_worker()?;
        let request = request.into_inner();
        let worker = self.check_worker(request.worker.as_ref())?;
        let abandon_lease_ids = self
            .farm
            .scheduler
            .keep_alive(&worker, &identity, &request.leases)
            .map_err(|refusal| {
                let holder = LeaseHolder {
                    identity: identity.to_string(),
                    worker_id: worker.worker_id.clone(),
                };
                refused(&holder, "KeepAlive", refusal)
            })?;
        Ok(Response::new(wire::KeepAliveResponse { abandon_lease_ids }))
    }

    #[tracing::instrument(skip_all, fields(worker = request.get_ref().worker.as_ref().map(|w| w.worker_id.as_str()).unwrap_or(""), operation = %request.get_ref().operation_name))]
    async fn complete(
        &self,
        request: Request<wire::CompleteRequest>,
    ) -> Result<Response<wire::CompleteResponse>, Status> {
        let identity = Caller::of(&request).require_worker()?;
        let request = request.into_inner();
        let worker = self.check_worker(request.worker.as_ref())?;
        let holder = LeaseHolder {
            identity: identity.to_string(),
            worker_id: worker.worker_id,
        };
        let outcome = match request.outcome {
            Some(complete_request::Outcome::Result(result)) => LeaseOutcome::Ran(result),
            Some(complete_request::Outcome::Error(status)) => LeaseOutcome::Failed(status),
            Some(complete_request::Outcome::StepResult(result)) => LeaseOutcome::StepRan(result),
            None => {
                return Err(Status::invalid_argument(
                    "outcome is missing: set result, error or step_result",
                ))
            }
        };
        let scheduler = &self.farm.scheduler;
        let target = scheduler
            .completion_target(&holder, &request.lease_id, &request.operation_name)
            .map_err(|refusal| refused(&holder, "Complete", refusal))?;
        // The server, not the worker, writes the action cache, and only for
        // the lease holder's successful, cacheable result; before the
        // operation finishes, so a client that saw it done finds it cached.
        if let (Some((instance, digest)), LeaseOutcome::Ran(result)) = (&target, &outcome) {
            if result.exit_code == 0 {
                match self.farm.action_cache.put(instance, digest, result).await {
                    Ok(()) => tracing::debug!(action = %digest, "action cache written"),
                    // The result is still good; only its caching failed.
                    Err(error) => {
                        tracing::warn!(action = %digest, %error, "could not write the action cache")
                    }
                }
            }
        }
        // A step's live log closes when its holder reports.
        let step = scheduler
            .step_lease(&holder.worker_id, &request.lease_id)
            .filter(|step| step.holder == holder);
        let accepted = scheduler
            .complete(
                &holder,
                &request.lease_id,
                &request.operation_name,
                outcome,
                request.message,
            )
            .map_err(|refusal| refused(&holder, "Complete", refusal))?;
        if let Some(step) = step {
            self.farm.live_logs.finish(&log_key(&step));
        }
        // Confirmed once the operation's end is journaled: a worker whose
        // Complete was cut off by a restart retries it, and the restored
        // lease accepts it.
        if accepted {
            if let Err(error) = scheduler.journal_written().await {
                tracing::warn!(%error, "result accepted before the operation's end was journaled");
            }
        }
        Ok(Response::new(wire::CompleteResponse { accepted }))
    }

    #[tracing::instrument(skip_all, fields(worker = request.get_ref().worker.as_ref().map(|w| w.worker_id.as_str()).unwrap_or(""), lease = %request.get_ref().lease_id))]
    async fn append_step_log(
        &self,
        request: Request<wire::AppendStepLogRequest>,
    ) -> Result<Response<wire::AppendStepLogResponse>, Status> {
        let identity = Caller::of(&request).require_worker()?;
        let request = request.into_inner();
        let worker = self.check_worker(request.worker.as_ref())?;
        if request.data.len() > MAX_APPEND_BYTES {
            return Err(Status::invalid_argument(format!(
                "data: {} bytes, more than the {MAX_APPEND_BYTES} a log chunk may hold",
                request.data.len()
            )));
        }
        let holder = LeaseHolder {
            identity: identity.to_string(),
            worker_id: worker.worker_id,
        };
        // Not a live step lease of this worker (cancelled, requeued, ended):
        // the worker must stop the step.
        let Some(step) = self
            .farm
            .scheduler
            .step_lease(&holder.worker_id, &request.lease_id)
        else {
            tracing::debug!("log for a step lease the worker no longer holds; abandon");
            return Ok(Response::new(wire::AppendStepLogResponse { abandon: true }));
        };
        if step.holder != holder {
            let refusal = LeaseRefused {
                lease_id: request.lease_id,
                operation: step.operation,
                reason: format!("held by {}, not {holder}", step.holder),
            };
            return Err(refused(&holder, "AppendStepLog", refusal));
        }
        match self.farm.live_logs.append(
            &log_key(&step),
            &request.lease_id,
            request.offset,
            &request.data,
        ) {
            Ok(_) => Ok(Response::new(wire::AppendStepLogResponse {
                abandon: false,
            })),
            // Only a report closes the log, and the lease ends with it.
            Err(LogError::Finished { .. }) => {
                Ok(Response::new(wire::AppendStepLogResponse { abandon: true }))
            }
            Err(error @ LogError::ChunkTooLarge { .. }) => {
                Err(Status::invalid_argument(error.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use buildkube_proto::worker as wire;
    use buildkube_scheduler::{NewStep, StepOutcome, StepProgress};

    use super::*;
    use crate::auth::Identity;
    use crate::storage::{FsActionCache, FsCas};

    /// A farm, and the sender that keeps it from stopping (a dropped
    /// sender reads as stopping: Lease calls would answer empty).
    async fn farm(dir: &std::path::Path) -> (Arc<Farm>, tokio::sync::watch::Sender<bool>) {
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let farm = Arc::new(Farm {
            cas: Arc::new(FsCas::open(&dir.join("cas"), u64::MAX).await.unwrap()),
            action_cache: Arc::new(FsActionCache::open(&dir.join("ac")).unwrap()),
            records: Arc::new(
                buildkube_records::FsRecords::open(&dir.join("records"))
                    .await
                    .unwrap(),
            ),
            scheduler: Arc::new(buildkube_scheduler::Scheduler::new(Default::default())),
            instances: crate::instances::Instances::new(&["main".into()]).unwrap(),
            metrics: Default::default(),
            stopping,
            limits: Default::default(),
            commands: Default::default(),
            live_logs: Default::default(),
        });
        (farm, stop)
    }

    /// A worker that runs steps (`--run-steps`): the only kind leased one.
    fn worker(id: &str) -> wire::WorkerInfo {
        wire::WorkerInfo {
            worker_id: id.into(),
            instance_name: "main".into(),
            runs_steps: true,
            ..Default::default()
        }
    }

    fn as_caller<T>(caller: Caller, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.extensions_mut().insert(caller);
        request
    }

    fn append(
        worker_id: &str,
        lease_id: &str,
        offset: u64,
        data: &[u8],
    ) -> wire::AppendStepLogRequest {
        wire::AppendStepLogRequest {
            worker: Some(worker(worker_id)),
            lease_id: lease_id.into(),
            offset,
            data: bytes::Bytes::copy_from_slice(data),
        }
    }

    #[tokio::test]
    async fn job_step_log_and_result_reach_the_job_side_only_from_the_lease_holder() {
        let dir = tempfile::tempdir().unwrap();
        let (farm, _stop) = farm(dir.path()).await;
        let service = WorkerProtocolService::new(farm.clone());
        let (name, progress) = farm
            .scheduler
            .enqueue_step(NewStep {
                instance: "main".into(),
                platform: vec![],
                priority: 0,
                spec: wire::StepSpec {
                    job_id: "job-7".into(),
                    step_key: "build".into(),
                    attempt: 1,
                    ..Default::default()
                },
                max_attempts: 1,
            })
            .unwrap();
        let lease = service
            .lease(as_caller(
                Caller::Open,
                wire::LeaseRequest {
                    worker: Some(worker("w1")),
                    wait: None,
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .lease
            .unwrap();
        let key = StepLogKey {
            job_id: "job-7".into(),
            step_key: "build".into(),
            attempt: 1,
        };
        let mut follower = farm.live_logs.follow(&key, 0);
        let line = b"2026-12-02T06:01:02.345Z | hello\n";
        for _ in 0..2 {
            // The second call is a retry of the first: appended once.
            let response = service
                .append_step_log(as_caller(
                    Caller::Open,
                    append("w1", &lease.lease_id, 0, line),
                ))
                .await
                .unwrap()
                .into_inner();
            assert!(!response.abandon);
        }
        let chunk = follower.next().await.unwrap();
        assert_eq!((chunk.offset, &chunk.data[..]), (0, &line[..]));

        // Another worker naming the lease is told to stop, and appends nothing.
        let other = service
            .append_step_log(as_caller(
                Caller::Open,
                append("w2", &lease.lease_id, 33, b"x"),
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(other.abandon);
        // The holder's worker id with another credential is refused.
        let forged = Caller::Known(Identity::Worker {
            name: Arc::from("someone-else"),
        });
        let status = service
            .append_step_log(as_caller(forged, append("w1", &lease.lease_id, 33, b"x")))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        let too_big = vec![b'x'; MAX_APPEND_BYTES + 1];
        let status = service
            .append_step_log(as_caller(
                Caller::Open,
                append("w1", &lease.lease_id, 33, &too_big),
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("data"), "{status:?}");

        let result = wire::StepResult {
            exit_code: 0,
            commit: "c".repeat(40),
            ..Default::default()
        };
        let accepted = service
            .complete(as_caller(
                Caller::Open,
                wire::CompleteRequest {
                    worker: Some(worker("w1")),
                    lease_id: lease.lease_id.clone(),
                    operation_name: name.clone(),
                    outcome: Some(complete_request::Outcome::StepResult(result.clone())),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .accepted;
        assert!(accepted);
        assert_eq!(
            *progress.borrow(),
            StepProgress::Finished(StepOutcome::Ran(result))
        );
        // The live log closed: its followers end; later appends are told to stop.
        let end = tokio::time::timeout(Duration::from_secs(5), follower.next()).await;
        assert_eq!(end.unwrap(), None);
        let late = service
            .append_step_log(as_caller(
                Caller::Open,
                append("w1", &lease.lease_id, 33, b"x"),
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(late.abandon);
    }
}
