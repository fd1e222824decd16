use std::sync::Arc;
use std::time::Duration;

use buildkube_proto::worker::{
    self as wire, complete_request, worker_service_server::WorkerService,
};
use tonic::{Request, Response, Status};

use crate::auth::Caller;
use crate::farm::Farm;
use buildkube_scheduler::{LeaseHolder, LeaseOutcome, LeaseRefused};

/// Longest a Lease call is held open.
const MAX_LEASE_WAIT: Duration = Duration::from_secs(60);

/// The worker protocol: Lease, KeepAlive, Complete. Only worker
/// credentials may call it, and only a lease's holder may report on it.
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
            None => {
                return Err(Status::invalid_argument(
                    "outcome is missing: set result or error",
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
        let accepted = scheduler
            .complete(
                &holder,
                &request.lease_id,
                &request.operation_name,
                outcome,
                request.message,
            )
            .map_err(|refusal| refused(&holder, "Complete", refusal))?;
        Ok(Response::new(wire::CompleteResponse { accepted }))
    }
}
