use std::sync::Arc;

use buildkube_proto::reapi::{
    self, capabilities_server::Capabilities, compressor, digest_function,
    symlink_absolute_path_strategy,
};
use buildkube_proto::semver::SemVer;
use tonic::{Request, Response, Status};

use super::MAX_BATCH_TOTAL_BYTES;
use buildkube_config::auth::Scope;

use crate::auth::Caller;
use crate::farm::Farm;

/// GetCapabilities: what this server really supports.
pub struct CapabilitiesService {
    farm: Arc<Farm>,
}

impl CapabilitiesService {
    /// The service over `farm`.
    pub fn new(farm: Arc<Farm>) -> Self {
        CapabilitiesService { farm }
    }
}

fn version(major: i32, minor: i32) -> SemVer {
    SemVer {
        major,
        minor,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl Capabilities for CapabilitiesService {
    #[tracing::instrument(skip_all, fields(instance = %request.get_ref().instance_name))]
    async fn get_capabilities(
        &self,
        request: Request<reapi::GetCapabilitiesRequest>,
    ) -> Result<Response<reapi::ServerCapabilities>, Status> {
        let caller = Caller::of(&request);
        let instance = &request.get_ref().instance_name;
        self.farm.instances.check(instance)?;
        caller.require_client(Scope::Read, instance)?;
        // Tell clients without write-ac not to try (Bazel then keeps local
        // results to itself instead of failing to upload them).
        let update_enabled = caller.require_client(Scope::WriteAc, instance).is_ok();
        Ok(Response::new(reapi::ServerCapabilities {
            cache_capabilities: Some(reapi::CacheCapabilities {
                digest_functions: vec![digest_function::Value::Sha256 as i32],
                action_cache_update_capabilities: Some(reapi::ActionCacheUpdateCapabilities {
                    update_enabled,
                }),
                cache_priority_capabilities: None,
                max_batch_total_size_bytes: MAX_BATCH_TOTAL_BYTES,
                symlink_absolute_path_strategy: symlink_absolute_path_strategy::Value::Allowed
                    as i32,
                supported_compressors: vec![compressor::Value::Zstd as i32],
                supported_batch_update_compressors: vec![compressor::Value::Zstd as i32],
            }),
            execution_capabilities: Some(reapi::ExecutionCapabilities {
                digest_function: digest_function::Value::Sha256 as i32,
                exec_enabled: true,
                execution_priority_capabilities: Some(reapi::PriorityCapabilities {
                    priorities: vec![reapi::priority_capabilities::PriorityRange {
                        min_priority: i32::MIN,
                        max_priority: i32::MAX,
                    }],
                }),
                supported_node_properties: vec![],
                digest_functions: vec![digest_function::Value::Sha256 as i32],
            }),
            deprecated_api_version: None,
            low_api_version: Some(version(2, 0)),
            high_api_version: Some(version(2, 2)),
        }))
    }
}
