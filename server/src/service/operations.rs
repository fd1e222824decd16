use std::sync::Arc;

use buildkube_proto::longrunning::{self, operations_server::Operations};
use tonic::{Request, Response, Status};

use crate::farm::Farm;

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

#[tonic::async_trait]
impl Operations for OperationsService {
    #[tracing::instrument(skip_all, fields(instance = %request.get_ref().name))]
    async fn list_operations(
        &self,
        request: Request<longrunning::ListOperationsRequest>,
    ) -> Result<Response<longrunning::ListOperationsResponse>, Status> {
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
        let (operations, next_page_token) =
            self.farm
                .scheduler
                .list(instance, request.page_size as usize, &request.page_token);
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
        let name = request.into_inner().name;
        self.farm
            .scheduler
            .get(&name)
            .map(Response::new)
            .ok_or_else(|| not_found(&name))
    }

    #[tracing::instrument(skip_all, fields(operation = %request.get_ref().name))]
    async fn delete_operation(
        &self,
        request: Request<longrunning::DeleteOperationRequest>,
    ) -> Result<Response<()>, Status> {
        let name = request.into_inner().name;
        Err(Status::unimplemented(format!(
            "DeleteOperation is not supported; finished operations ({name:?}) are forgotten automatically"
        )))
    }

    #[tracing::instrument(skip_all, fields(operation = %request.get_ref().name))]
    async fn cancel_operation(
        &self,
        request: Request<longrunning::CancelOperationRequest>,
    ) -> Result<Response<()>, Status> {
        let name = request.into_inner().name;
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
        let request = request.into_inner();
        let mut receiver = self
            .farm
            .scheduler
            .watch(&request.name)
            .ok_or_else(|| not_found(&request.name))?;
        let timeout = request
            .timeout
            .map(|d| std::time::Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32))
            .unwrap_or(std::time::Duration::from_secs(60));
        let _ = tokio::time::timeout(timeout, receiver.wait_for(|op| op.done)).await;
        let operation = receiver.borrow().clone();
        Ok(Response::new(operation))
    }
}
