//! The worker's side of the buildkube worker protocol: Lease, KeepAlive and
//! Complete, with connection-state logging and retries for Complete.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use buildkube_proto::worker::worker_service_client::WorkerServiceClient;
use buildkube_proto::worker::{
    AppendStepLogRequest, CompleteRequest, KeepAliveRequest, Lease, LeaseProgress, LeaseRequest,
    WorkerInfo,
};
use buildkube_reapi::AuthChannel;
use tokio::sync::watch;
use tonic::Status;
use tracing::{debug, error, info, warn};

use crate::action_error::is_transient;
use crate::backoff::Backoff;

/// Longest message accepted from the server (a lease carries the Command).
const MAX_MESSAGE: usize = 64 << 20;
/// Extra time the client allows a long poll beyond the wait it asked for.
const LEASE_GRACE: Duration = Duration::from_secs(10);
/// Deadline of KeepAlive and Complete calls.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// What became of a piece of a step's log sent to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogAppend {
    /// The server has it.
    Appended,
    /// The lease is no longer ours: stop the step.
    Abandon,
    /// The server is unreachable: try again later.
    Retry,
    /// The server refused it for good; the live log stops (the CAS gets it all).
    Refused,
}

/// A client of the server's WorkerService for one worker.
#[derive(Debug)]
pub(crate) struct ServerLink {
    client: WorkerServiceClient<AuthChannel>,
    info: WorkerInfo,
    /// Whether the last call reached the server; warnings are logged only
    /// when this changes, so an outage is one warning, not one per retry.
    reachable: AtomicBool,
}

fn request<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

impl ServerLink {
    pub(crate) fn new(channel: AuthChannel, info: WorkerInfo) -> ServerLink {
        ServerLink {
            client: WorkerServiceClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            info,
            reachable: AtomicBool::new(true),
        }
    }

    pub(crate) fn info(&self) -> &WorkerInfo {
        &self.info
    }

    fn note<T>(&self, call: &str, result: &Result<T, Status>) {
        match result {
            Ok(_) => {
                if !self.reachable.swap(true, Ordering::Relaxed) {
                    info!("server reachable again");
                }
            }
            Err(status) => {
                if self.reachable.swap(false, Ordering::Relaxed) {
                    if is_transient(status.code()) {
                        warn!(call, code = ?status.code(), detail = status.message(), "server unreachable; retrying with backoff");
                    } else {
                        error!(call, code = ?status.code(), detail = status.message(), "server rejected the worker; retrying with backoff");
                    }
                } else {
                    debug!(call, code = ?status.code(), detail = status.message(), "call failed");
                }
            }
        }
    }

    /// Long-polls for one action; `None` when nothing came within `wait`.
    pub(crate) async fn lease(&self, wait: Duration) -> Result<Option<Lease>, Status> {
        let message = LeaseRequest {
            worker: Some(self.info.clone()),
            wait: Some(prost_types::Duration {
                seconds: wait.as_secs() as i64,
                nanos: wait.subsec_nanos() as i32,
            }),
        };
        let result = self
            .client
            .clone()
            .lease(request(message, wait + LEASE_GRACE))
            .await
            .map(|r| r.into_inner().lease);
        self.note("Lease", &result);
        result
    }

    /// Extends the running leases; returns the ids to abandon.
    pub(crate) async fn keep_alive(
        &self,
        leases: Vec<LeaseProgress>,
        draining: bool,
    ) -> Result<Vec<String>, Status> {
        let message = KeepAliveRequest {
            worker: Some(self.info.clone()),
            leases,
            draining,
        };
        let result = self
            .client
            .clone()
            .keep_alive(request(message, CALL_TIMEOUT))
            .await
            .map(|r| r.into_inner().abandon_lease_ids);
        self.note("KeepAlive", &result);
        result
    }

    /// Sends a piece of a step's log (one attempt; the caller retries).
    pub(crate) async fn append_step_log(
        &self,
        lease_id: &str,
        offset: u64,
        data: bytes::Bytes,
    ) -> LogAppend {
        let message = AppendStepLogRequest {
            worker: Some(self.info.clone()),
            lease_id: lease_id.to_string(),
            offset,
            data,
        };
        let result = self
            .client
            .clone()
            .append_step_log(request(message, CALL_TIMEOUT))
            .await
            .map(|r| r.into_inner().abandon);
        self.note("AppendStepLog", &result);
        match result {
            Ok(false) => LogAppend::Appended,
            Ok(true) => LogAppend::Abandon,
            Err(status) if is_transient(status.code()) => LogAppend::Retry,
            Err(status) => {
                warn!(code = ?status.code(), detail = status.message(), "the server refused the step's log; live logging stops");
                LogAppend::Refused
            }
        }
    }

    /// Reports an outcome, retrying while the server is unreachable, until
    /// `give_up` is set. Returns whether the server accepted it, or `None`
    /// when it could not be delivered.
    pub(crate) async fn complete(
        &self,
        mut message: CompleteRequest,
        mut give_up: watch::Receiver<bool>,
    ) -> Option<bool> {
        message.worker = Some(self.info.clone());
        let mut backoff = Backoff::default();
        loop {
            let result = self
                .client
                .clone()
                .complete(request(message.clone(), CALL_TIMEOUT))
                .await
                .map(|r| r.into_inner().accepted);
            self.note("Complete", &result);
            match result {
                Ok(accepted) => return Some(accepted),
                Err(status) if !is_transient(status.code()) => {
                    warn!(code = ?status.code(), detail = status.message(), "the server refused the result; dropping it");
                    return None;
                }
                Err(_) if *give_up.borrow() => {
                    warn!("the server stayed unreachable until shutdown; dropping the result");
                    return None;
                }
                Err(_) => {
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                        _ = give_up.changed() => {}
                    }
                }
            }
        }
    }
}
