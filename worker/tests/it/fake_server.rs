//! An in-process stand-in for the buildkube server: the worker protocol, a
//! CAS (batch calls and GetTree) and an action cache, all in memory. It can
//! be stopped and restarted on the same port with its state kept.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use buildkube_proto::reapi::action_cache_server::{ActionCache, ActionCacheServer};
use buildkube_proto::reapi::content_addressable_storage_server::{
    ContentAddressableStorage, ContentAddressableStorageServer,
};
use buildkube_proto::reapi::{self, batch_read_blobs_response, batch_update_blobs_response};
use buildkube_proto::rpc;
use buildkube_proto::worker::worker_service_server::{WorkerService, WorkerServiceServer};
use buildkube_proto::worker::{
    AppendStepLogRequest, AppendStepLogResponse, CompleteRequest, CompleteResponse,
    KeepAliveRequest, KeepAliveResponse, Lease, LeaseRequest, LeaseResponse, WorkerInfo,
};
use buildkube_reapi::Digest;
use bytes::Bytes;
use prost::Message as _;
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

/// What the fake server holds and saw.
#[derive(Default)]
pub(crate) struct State {
    pub(crate) blobs: Mutex<HashMap<Digest, Bytes>>,
    pub(crate) action_cache: Mutex<HashMap<Digest, reapi::ActionResult>>,
    pub(crate) queue: Mutex<VecDeque<Lease>>,
    /// Leases the server tells the worker to abandon at the next keep-alive.
    pub(crate) abandon: Mutex<HashSet<String>>,
    /// Completions, each with whether the AC held the action at that moment.
    pub(crate) completed: Mutex<Vec<(CompleteRequest, bool)>>,
    pub(crate) keep_alives: Mutex<Vec<KeepAliveRequest>>,
    /// AppendStepLog calls, in order.
    pub(crate) step_logs: Mutex<Vec<AppendStepLogRequest>>,
    pub(crate) workers: Mutex<Vec<WorkerInfo>>,
    pub(crate) changed: Notify,
    /// Blobs whose BatchReadBlobs never answers (a CAS too slow to finish).
    pub(crate) stalled: Mutex<HashSet<Digest>>,
    /// BatchReadBlobs calls being answered now (a cancelled call ends).
    pub(crate) reads_in_flight: std::sync::atomic::AtomicUsize,
}

/// Counts a BatchReadBlobs call while its handler lives.
struct ReadInFlight<'a>(&'a State);

impl Drop for ReadInFlight<'_> {
    fn drop(&mut self) {
        self.0
            .reads_in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}

impl State {
    pub(crate) fn put(&self, data: impl Into<Bytes>) -> Digest {
        let data = data.into();
        let digest = Digest::of_bytes(&data);
        self.blobs.lock().unwrap().insert(digest, data);
        digest
    }

    pub(crate) fn put_message(&self, message: &impl prost::Message) -> Digest {
        self.put(message.encode_to_vec())
    }

    pub(crate) fn blob(&self, digest: &reapi::Digest) -> Option<Bytes> {
        let digest = Digest::try_from(digest).ok()?;
        if digest.is_empty_blob() {
            return Some(Bytes::new());
        }
        self.blobs.lock().unwrap().get(&digest).cloned()
    }

    pub(crate) fn enqueue(&self, lease: Lease) {
        self.queue.lock().unwrap().push_back(lease);
        self.changed.notify_waiters();
    }

    /// Waits until `n` completions arrived.
    pub(crate) async fn wait_completed(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Vec<(CompleteRequest, bool)> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            {
                let completed = self.completed.lock().unwrap();
                if completed.len() >= n {
                    return completed.clone();
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!(
                    "only {} of {n} completions within {timeout:?}",
                    self.completed.lock().unwrap().len()
                );
            }
        }
    }
}

#[derive(Clone)]
struct Services(Arc<State>);

#[tonic::async_trait]
impl WorkerService for Services {
    async fn lease(
        &self,
        request: Request<LeaseRequest>,
    ) -> Result<Response<LeaseResponse>, Status> {
        if let Some(worker) = request.into_inner().worker {
            let mut workers = self.0.workers.lock().unwrap();
            if workers.is_empty() {
                workers.push(worker);
            }
        }
        // Short polls, so that a stopping server is not held up.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
        loop {
            let notified = self.0.changed.notified();
            if let Some(lease) = self.0.queue.lock().unwrap().pop_front() {
                return Ok(Response::new(LeaseResponse { lease: Some(lease) }));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Response::new(LeaseResponse { lease: None }));
            }
        }
    }

    async fn keep_alive(
        &self,
        request: Request<KeepAliveRequest>,
    ) -> Result<Response<KeepAliveResponse>, Status> {
        let request = request.into_inner();
        let abandon = self.0.abandon.lock().unwrap();
        let abandon_lease_ids = request
            .leases
            .iter()
            .filter(|l| abandon.contains(&l.lease_id))
            .map(|l| l.lease_id.clone())
            .collect();
        self.0.keep_alives.lock().unwrap().push(request);
        self.0.changed.notify_waiters();
        Ok(Response::new(KeepAliveResponse { abandon_lease_ids }))
    }

    async fn complete(
        &self,
        request: Request<CompleteRequest>,
    ) -> Result<Response<CompleteResponse>, Status> {
        let request = request.into_inner();
        let cached = request
            .action_digest
            .as_ref()
            .and_then(|d| Digest::try_from(d).ok())
            .is_some_and(|d| self.0.action_cache.lock().unwrap().contains_key(&d));
        self.0.completed.lock().unwrap().push((request, cached));
        self.0.changed.notify_waiters();
        Ok(Response::new(CompleteResponse { accepted: true }))
    }

    async fn append_step_log(
        &self,
        request: Request<AppendStepLogRequest>,
    ) -> Result<Response<AppendStepLogResponse>, Status> {
        let request = request.into_inner();
        let abandon = self.0.abandon.lock().unwrap().contains(&request.lease_id);
        self.0.step_logs.lock().unwrap().push(request);
        self.0.changed.notify_waiters();
        Ok(Response::new(AppendStepLogResponse { abandon }))
    }
}

#[tonic::async_trait]
impl ContentAddressableStorage for Services {
    async fn find_missing_blobs(
        &self,
        request: Request<reapi::FindMissingBlobsRequest>,
    ) -> Result<Response<reapi::FindMissingBlobsResponse>, Status> {
        let missing_blob_digests = request
            .into_inner()
            .blob_digests
            .into_iter()
            .filter(|d| self.0.blob(d).is_none())
            .collect();
        Ok(Response::new(reapi::FindMissingBlobsResponse {
            missing_blob_digests,
        }))
    }

    async fn batch_update_blobs(
        &self,
        request: Request<reapi::BatchUpdateBlobsRequest>,
    ) -> Result<Response<reapi::BatchUpdateBlobsResponse>, Status> {
        let mut responses = Vec::new();
        for r in request.into_inner().requests {
            let actual = self.0.put(r.data.clone());
            let ok = r.digest.as_ref() == Some(&actual.to_proto());
            responses.push(batch_update_blobs_response::Response {
                digest: r.digest,
                status: Some(rpc::Status {
                    code: if ok {
                        0
                    } else {
                        tonic::Code::InvalidArgument as i32
                    },
                    ..Default::default()
                }),
            });
        }
        Ok(Response::new(reapi::BatchUpdateBlobsResponse { responses }))
    }

    async fn batch_read_blobs(
        &self,
        request: Request<reapi::BatchReadBlobsRequest>,
    ) -> Result<Response<reapi::BatchReadBlobsResponse>, Status> {
        self.0
            .reads_in_flight
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let _in_flight = ReadInFlight(&self.0);
        let request = request.into_inner();
        let stalled = {
            let stalled = self.0.stalled.lock().unwrap();
            request
                .digests
                .iter()
                .any(|d| Digest::try_from(d).is_ok_and(|d| stalled.contains(&d)))
        };
        if stalled {
            std::future::pending::<()>().await;
        }
        let responses = request
            .digests
            .into_iter()
            .map(|d| {
                let data = self.0.blob(&d);
                batch_read_blobs_response::Response {
                    status: Some(rpc::Status {
                        code: if data.is_some() {
                            0
                        } else {
                            tonic::Code::NotFound as i32
                        },
                        ..Default::default()
                    }),
                    digest: Some(d),
                    data: data.unwrap_or_default(),
                    ..Default::default()
                }
            })
            .collect();
        Ok(Response::new(reapi::BatchReadBlobsResponse { responses }))
    }

    type GetTreeStream =
        futures::stream::Iter<std::vec::IntoIter<Result<reapi::GetTreeResponse, Status>>>;

    async fn get_tree(
        &self,
        request: Request<reapi::GetTreeRequest>,
    ) -> Result<Response<Self::GetTreeStream>, Status> {
        let root = request.into_inner().root_digest.unwrap_or_default();
        let mut directories = Vec::new();
        let mut queue = VecDeque::from([root]);
        while let Some(digest) = queue.pop_front() {
            let data = self
                .0
                .blob(&digest)
                .ok_or_else(|| Status::not_found(format!("{digest:?}")))?;
            let directory =
                reapi::Directory::decode(data).map_err(|e| Status::internal(e.to_string()))?;
            queue.extend(
                directory
                    .directories
                    .iter()
                    .filter_map(|d| d.digest.clone()),
            );
            directories.push(directory);
        }
        let page = reapi::GetTreeResponse {
            directories,
            next_page_token: String::new(),
        };
        Ok(Response::new(futures::stream::iter(vec![Ok(page)])))
    }
}

#[tonic::async_trait]
impl ActionCache for Services {
    async fn get_action_result(
        &self,
        request: Request<reapi::GetActionResultRequest>,
    ) -> Result<Response<reapi::ActionResult>, Status> {
        let digest = Digest::from_field(request.get_ref().action_digest.as_ref())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.0
            .action_cache
            .lock()
            .unwrap()
            .get(&digest)
            .cloned()
            .map(Response::new)
            .ok_or_else(|| Status::not_found("not cached"))
    }

    async fn update_action_result(
        &self,
        request: Request<reapi::UpdateActionResultRequest>,
    ) -> Result<Response<reapi::ActionResult>, Status> {
        let request = request.into_inner();
        let digest = Digest::from_field(request.action_digest.as_ref())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let result = request.action_result.unwrap_or_default();
        self.0
            .action_cache
            .lock()
            .unwrap()
            .insert(digest, result.clone());
        Ok(Response::new(result))
    }
}

/// A running fake server.
pub(crate) struct FakeServer {
    pub(crate) addr: SocketAddr,
    pub(crate) state: Arc<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl FakeServer {
    pub(crate) async fn start() -> FakeServer {
        Self::start_on("127.0.0.1:0".parse().unwrap(), Arc::new(State::default())).await
    }

    pub(crate) async fn start_on(addr: SocketAddr, state: Arc<State>) -> FakeServer {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let services = Services(state.clone());
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(WorkerServiceServer::new(services.clone()))
                .add_service(ContentAddressableStorageServer::new(services.clone()))
                .add_service(ActionCacheServer::new(services))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await
                .unwrap();
        });
        FakeServer {
            addr,
            state,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub(crate) fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving; the state stays for a restart.
    pub(crate) async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(Duration::from_secs(2), &mut task)
                .await
                .is_err()
            {
                task.abort();
                let _ = task.await;
            }
        }
    }
}
