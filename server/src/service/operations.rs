use std::sync::Arc;

use buildkube_proto::longrunning::{self, operations_server::Operations};
use tonic::{Request, Response, Status};

use buildkube_config::auth::Scope;

use crate::auth::Caller;
use crate::farm::Farm;
use buildkube_scheduler::instance_of_operation;

/// google.longrunning.Operations over the scheduler's operations.
pub struct OperationsService {
    farm: Arc<Farm>,
}

impl OperationsService {
    /// The service over `farm`.
    pub fn new(farm: Arc<Farm>) -> Self {
        OperationsService { farm }
    }
}

fn not_found(name: &str) -> Status {
    Status::not_found(format!("operation {name:?} not found"))
}

/// NOT_FOUND for an operation the scheduler does not hold: saying so if it
/// finished before the server restarted (clients such as Bazel then Execute
/// again and get the result from the action cache), else that it is unknown.
pub(crate) fn unknown_operation(farm: &Farm, name: &str) -> Status {
    match farm.scheduler.finished_before_restart(name) {
        Some(message) => Status::not_found(message),
        None => Status::not_found(format!(
            "operation {name:?} not found; it is not one of this server's unfinished or recent operations, retry with Execute"
        )),
    }
}

/// Checks that the caller has `scope` on the instance `name` carries
/// (`INSTANCE/operations/ID`); a name of no instance is simply not found.
pub(crate) fn check_operation_scope(
    caller: &Caller,
    name: &str,
    scope: Scope,
) -> Result<(), Status> {
    let instance = instance_of_operation(name).ok_or_else(|| not_found(name))?;
    caller.require_client(scope, instance)
}

#[tonic::async_trait]
impl Operations for OperationsService {
    #[tracing::instrument(skip_all, fields(instance = %request.get_ref().name))]
    async fn list_operations(
        &self,
        request: Request<longrunning::ListOperationsRequest>,
    ) -> Result<Response<longrunning::ListOperationsResponse>, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        // `name` is the parent collection: an instance name, optionally with "/operations".
        let instance = request
            .name
            .strip_suffix("/operations")
            .unwrap_or(&request.name);
        let instance = if instance.is_empty() || instance == "operations" {
            None
        } else {
            self.farm.instances.check(instance)?;
            caller.require_client(Scope::Read, instance)?;
            Some(instance)
        };
        if request.page_size < 0 {
            return Err(Status::invalid_argument(format!(
                "page_size {} is negative",
                request.page_size
            )));
        }
        if !request.filter.is_empty() {
            return Err(Status::invalid_argument(
                "filter is not supported; list without one",
            ));
        }
        let (operations, next_page_token) = self.farm.scheduler.list(
            |i| instance.is_none_or(|wanted| wanted == i) && caller.may_read(i),
            request.page_size as usize,
            &request.page_token,
        );
        Ok(Response::new(longrunning::ListOperationsResponse {
            operations,
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all, fields(operation = %request.get_ref().name))]
    async fn get_operation(
        &self,
        request: Request<longrunning::GetOperationRequest>,
    ) -> Result<Response<longrunning::Operation>, Status> {
        let caller = Caller::of(&request);
        let name = request.into_inner().name;
        check_operation_scope(&caller, &name, Scope::Read)?;
        self.farm
            .scheduler
            .get(&name)
            .map(Response::new)
            .ok_or_else(|| unknown_operation(&self.farm, &name))
    }

    #[tracing::instrument(skip_all, fields(operation = %request.get_ref().name))]
    async fn delete_operation(
        &self,
        request: Request<longrunning::DeleteOperationRequest>,
    ) -> Result<Response<()>, Status> {
        let caller = Caller::of(&request);
        let name = request.into_inner().name;
        check_operation_scope(&caller, &name, Scope::Execute)?;
        Err(Status::unimplemented(format!(
            "DeleteOperation is not supported; finished operations ({name:?}) are forgotten automatically"
        )))
    }

    #[tracing::instrument(skip_all, fields(operation = %request.get_ref().name))]
    async fn cancel_operation(
        &self,
        request: Request<longrunning::CancelOperationRequest>,
    ) -> Result<Response<()>, Status> {
        let caller = Caller::of(&request);
        let name = request.into_inner().name;
        check_operation_scope(&caller, &name, Scope::Execute)?;
        if self.farm.scheduler.cancel(&name, "CancelOperation") {
            Ok(Response::new(()))
        } else {
            Err(not_found(&name))
        }
    }

    #[tracing::instrument(skip_all, fields(operation = %request.get_ref().name))]
    async fn wait_operation(
        &self,
        request: Request<longrunning::WaitOperationRequest>,
    ) -> Result<Response<longrunning::Operation>, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        check_operation_scope(&caller, &request.name, Scope::Read)?;
        let mut receiver = self
            .farm
            .scheduler
            .watch(&request.name)
            .ok_or_else(|| unknown_operation(&self.farm, &request.name))?;
        let timeout = request
            .timeout
            .map(|d| std::time::Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32))
            .unwrap_or(std::time::Duration::from_secs(60));
        let _ = tokio::time::timeout(timeout, receiver.wait_for(|op| op.done)).await;
        let operation = receiver.borrow().clone();
        Ok(Response::new(operation))
    }
}
