//! buildkube.jobs.v1.Jobs: run, follow and cancel CI jobs. Every call names
//! an instance; running and cancelling need scope `execute` there, the
//! rest `read`; a job of another instance is NOT_FOUND.

use std::pin::Pin;

use buildkube_config::auth::Scope;
use buildkube_jobs::run::{JobRequest, JobRunner};
use buildkube_proto::jobs::{self as api, jobs_server::Jobs};
use futures::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use crate::auth::Caller;
use crate::error::job_error;
use crate::instances::Instances;
use crate::job_logs::{LogRequest, StepLogs};

/// The Jobs service over the server's job runner.
pub struct JobsService {
    runner: JobRunner,
    logs: StepLogs,
    instances: Instances,
}

impl JobsService {
    /// The service over `runner`, serving `instances`.
    pub fn new(runner: JobRunner, logs: StepLogs, instances: Instances) -> JobsService {
        JobsService {
            runner,
            logs,
            instances,
        }
    }

    /// Checks the instance is served and the caller has `scope` there.
    fn admit<T>(&self, request: &Request<T>, instance: &str, scope: Scope) -> Result<(), Status> {
        self.instances.check(instance)?;
        Caller::of(request).require_client(scope, instance)
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Jobs for JobsService {
    #[tracing::instrument(skip_all, fields(instance = %request.get_ref().instance_name))]
    async fn run(&self, request: Request<api::RunRequest>) -> Result<Response<api::Job>, Status> {
        let r = request.get_ref();
        self.admit(&request, &r.instance_name, Scope::Execute)?;
        let job = self
            .runner
            .start(JobRequest::run(
                &r.instance_name,
                &r.repository,
                &r.git_ref,
                &r.commit,
            ))
            .await
            .map_err(job_error)?;
        Ok(Response::new(job.to_proto()))
    }

    async fn get_job(
        &self,
        request: Request<api::GetJobRequest>,
    ) -> Result<Response<api::Job>, Status> {
        let r = request.get_ref();
        self.admit(&request, &r.instance_name, Scope::Read)?;
        let job = self
            .runner
            .get(&r.instance_name, &r.job_id)
            .map_err(job_error)?;
        Ok(Response::new(job.to_proto()))
    }

    async fn list_jobs(
        &self,
        request: Request<api::ListJobsRequest>,
    ) -> Result<Response<api::ListJobsResponse>, Status> {
        let r = request.get_ref();
        self.admit(&request, &r.instance_name, Scope::Read)?;
        let (jobs, next_page_token) =
            self.runner
                .list(&r.instance_name, r.page_size as usize, &r.page_token);
        Ok(Response::new(api::ListJobsResponse {
            jobs: jobs.iter().map(|j| j.to_proto()).collect(),
            next_page_token,
        }))
    }

    type WatchJobStream = BoxStream<api::Job>;

    async fn watch_job(
        &self,
        request: Request<api::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let r = request.get_ref();
        self.admit(&request, &r.instance_name, Scope::Read)?;
        let mut updates = self
            .runner
            .watch(&r.instance_name, &r.job_id)
            .map_err(job_error)?;
        let stream = async_stream(move |tx| async move {
            loop {
                let job = updates.borrow_and_update().clone();
                let finished = job.state.is_finished();
                if tx.send(Ok(job.to_proto())).await.is_err() || finished {
                    return;
                }
                if updates.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type StreamLogsStream = BoxStream<api::LogChunk>;

    async fn stream_logs(
        &self,
        request: Request<api::StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        let r = request.get_ref();
        self.admit(&request, &r.instance_name, Scope::Read)?;
        let step_key = r.step_key.clone();
        let pieces = self.logs.stream(LogRequest {
            instance: r.instance_name.clone(),
            job_id: r.job_id.clone(),
            step_key: r.step_key.clone(),
            attempt: r.attempt,
            offset: r.offset,
            follow: r.follow,
        })?;
        let stream = ReceiverStream::new(pieces).map(move |piece| {
            piece.map(|piece| api::LogChunk {
                step_key: step_key.clone(),
                attempt: piece.attempt,
                offset: piece.offset,
                data: piece.data,
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cancel_job(
        &self,
        request: Request<api::CancelJobRequest>,
    ) -> Result<Response<api::Job>, Status> {
        let caller = Caller::of(&request);
        let r = request.get_ref();
        self.admit(&request, &r.instance_name, Scope::Execute)?;
        let who = match &caller {
            Caller::Known(crate::auth::Identity::Client(grant)) => grant.name.clone(),
            _ => "a client".to_string(),
        };
        let job = self
            .runner
            .cancel(&r.instance_name, &r.job_id, &format!("by {who}"))
            .await
            .map_err(job_error)?;
        Ok(Response::new(job.to_proto()))
    }
}

/// A stream fed by a task through a small bounded channel.
fn async_stream<T, F, Fut>(produce: F) -> ReceiverStream<Result<T, Status>>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(produce(tx));
    ReceiverStream::new(rx)
}
