use std::sync::Arc;
use std::time::Duration;

use buildkube_proto::longrunning;
use buildkube_proto::reapi::{self, execution_server::Execution};
use buildkube_reapi::Digest;
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use buildkube_config::auth::Scope;

use super::operations::{check_operation_scope, unknown_operation};
use crate::auth::Caller;
use crate::error::{bad_digest, missing_blobs_status, to_tonic};
use crate::farm::Farm;
use crate::metrics::Metrics;
use buildkube_scheduler::NewAction;

/// How often an unchanged operation is re-sent on an Execute stream, so
/// proxies and clients see the stream is alive during long actions.
const STREAM_HEARTBEAT: Duration = Duration::from_secs(30);

/// Execute and WaitExecution.
pub struct ExecutionService {
    farm: Arc<Farm>,
}

impl ExecutionService {
    /// The service over `farm`.
    pub fn new(farm: Arc<Farm>) -> Self {
        ExecutionService { farm }
    }
}

type OperationStream = BoxStream<'static, Result<longrunning::Operation, Status>>;

/// Streams an operation's updates until (and including) the one that is done,
/// or until the server stops (then UNAVAILABLE, so the client retries).
fn follow(
    receiver: watch::Receiver<longrunning::Operation>,
    stopping: watch::Receiver<bool>,
) -> OperationStream {
    enum Wake {
        Changed,
        Dropped,
        Heartbeat,
        Stopping,
    }
    futures::stream::unfold((receiver, stopping, false, true), |(mut receiver, mut stopping, finished, first)| async move {
        if finished {
            return None;
        }
        if !first {
            let wake = tokio::select! {
                _ = stopping.wait_for(|stop| *stop) => Wake::Stopping,
                changed = receiver.changed() => if changed.is_ok() { Wake::Changed } else { Wake::Dropped },
                _ = tokio::time::sleep(STREAM_HEARTBEAT) => Wake::Heartbeat,
            };
            match wake {
                Wake::Stopping => {
                    let status = Status::unavailable("server is shutting down; retry");
                    return Some((Err(status), (receiver, stopping, true, false)));
                }
                Wake::Dropped if !receiver.borrow().done => {
                    let status = Status::unavailable("operation was dropped by the server; retry with Execute");
                    return Some((Err(status), (receiver, stopping, true, false)));
                }
                Wake::Changed | Wake::Dropped | Wake::Heartbeat => {}
            }
        }
        let operation = receiver.borrow_and_update().clone();
        let done = operation.done;
        Some((Ok(operation), (receiver, stopping, done, false)))
    })
    .boxed()
}

fn validate_command(command: &reapi::Command) -> Result<(), Status> {
    if command.arguments.is_empty() {
        return Err(Status::invalid_argument("command.arguments is empty"));
    }
    // The worker applies the same rules (buildkube_reapi::command_outputs).
    buildkube_reapi::command_outputs(command)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok(())
}

impl ExecutionService {
    async fn load_action(
        &self,
        digest: &Digest,
    ) -> Result<(reapi::Action, Arc<reapi::Command>), Status> {
        let missing = |d: Digest, what: &str| to_tonic(missing_blobs_status(what, &[d]));
        let action: reapi::Action = self
            .farm
            .read_bounded_message(digest, "action")
            .await?
            .ok_or_else(|| missing(*digest, "action"))?;
        let command_digest = Digest::from_field(action.command_digest.as_ref())
            .map_err(|e| bad_digest("action.command_digest", e))?;
        let input_root = Digest::from_field(action.input_root_digest.as_ref())
            .map_err(|e| bad_digest("action.input_root_digest", e))?;
        if let Some(timeout) = &action.timeout {
            if timeout.seconds < 0 || timeout.nanos < 0 {
                return Err(Status::invalid_argument("action.timeout is negative"));
            }
        }
        let command = self
            .farm
            .command(&command_digest)
            .await?
            .ok_or_else(|| missing(command_digest, "command"))?;
        validate_command(&command)?;
        self.farm.check_inputs(input_root).await?;
        Ok((action, command))
    }
}

#[tonic::async_trait]
impl Execution for ExecutionService {
    type ExecuteStream = OperationStream;

    #[tracing::instrument(skip_all, fields(instance = %request.get_ref().instance_name, action))]
    async fn execute(
        &self,
        request: Request<reapi::ExecuteRequest>,
    ) -> Result<Response<OperationStream>, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        self.farm.instances.check(&request.instance_name)?;
        caller.require_client(Scope::Execute, &request.instance_name)?;
        let digest = Digest::from_field(request.action_digest.as_ref())
            .map_err(|e| bad_digest("action_digest", e))?;
        tracing::Span::current().record("action", tracing::field::display(&digest));
        let (action, command) = self.load_action(&digest).await?;
        if !request.skip_cache_lookup && !action.do_not_cache {
            if let Some(result) = self
                .farm
                .action_cache
                .get(&request.instance_name, &digest)
                .await?
            {
                if self.farm.result_is_complete(&result).await? {
                    Metrics::add(&self.farm.metrics.ac_hits, 1);
                    tracing::debug!("answered from the action cache");
                    let op =
                        self.farm
                            .scheduler
                            .record_cached(&request.instance_name, digest, result);
                    return Ok(Response::new(futures::stream::iter([Ok(op)]).boxed()));
                }
            }
            Metrics::add(&self.farm.metrics.ac_misses, 1);
        }
        let priority = request.execution_policy.as_ref().map_or(0, |p| p.priority);
        let (_, receiver) = self
            .farm
            .scheduler
            .enqueue(NewAction {
                instance: request.instance_name,
                action_digest: digest,
                action,
                command,
                priority,
            })
            .map_err(|e| {
                self.farm.metrics.limit_hit("max-queued-actions");
                Status::resource_exhausted(e.to_string())
            })?;
        // The operation name goes out only once the operation is in the
        // journal: a client that gets it can find it after a restart.
        self.farm
            .scheduler
            .journal_written()
            .await
            .map_err(|e| Status::unavailable(format!("{e}; retry")))?;
        Ok(Response::new(follow(receiver, self.farm.stopping.clone())))
    }

    type WaitExecutionStream = OperationStream;

    #[tracing::instrument(skip_all, fields(operation = %request.get_ref().name))]
    async fn wait_execution(
        &self,
        request: Request<reapi::WaitExecutionRequest>,
    ) -> Result<Response<OperationStream>, Status> {
        let caller = Caller::of(&request);
        let name = request.into_inner().name;
        check_operation_scope(&caller, &name, Scope::Read).map_err(|status| {
            if status.code() == tonic::Code::NotFound {
                unknown_operation(&self.farm, &name)
            } else {
                status
            }
        })?;
        let receiver = self
            .farm
            .scheduler
            .watch(&name)
            .ok_or_else(|| unknown_operation(&self.farm, &name))?;
        Ok(Response::new(follow(receiver, self.farm.stopping.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 8, finding 11: `pkg` + `../other/a.o` and `sub/../x` passed
    /// Execute and failed later on the worker.
    #[test]
    fn output_paths_the_worker_rejects_are_rejected_here() {
        let command = |working_directory: &str, path: &str| reapi::Command {
            arguments: vec!["true".into()],
            working_directory: working_directory.into(),
            output_paths: vec![path.into()],
            ..Default::default()
        };
        assert!(validate_command(&command("", "out/a.o")).is_ok());
        assert!(validate_command(&command("pkg", "./a.o")).is_ok());
        for (dir, bad) in [
            ("pkg", "../other/a.o"),
            ("", "sub/../x"),
            ("", "/etc/passwd"),
            ("", "a//b"),
        ] {
            let err = validate_command(&command(dir, bad)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad}");
            assert!(
                err.message().contains("command.output_paths"),
                "{}",
                err.message()
            );
        }
    }

    #[test]
    fn command_checks_name_the_field() {
        let mut command = reapi::Command::default();
        assert!(validate_command(&command)
            .unwrap_err()
            .message()
            .contains("arguments"));
        command.arguments = vec!["true".into()];
        command.working_directory = "../up".into();
        assert!(validate_command(&command)
            .unwrap_err()
            .message()
            .contains("working_directory"));
        command.working_directory = String::new();
        command.output_paths = vec!["../x".into()];
        assert!(validate_command(&command)
            .unwrap_err()
            .message()
            .contains("output_paths"));
    }
}
