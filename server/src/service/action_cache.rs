use std::sync::Arc;

use buildkube_proto::reapi::{self, action_cache_server::ActionCache};
use buildkube_reapi::Digest;
use tonic::{Request, Response, Status};

use buildkube_config::auth::Scope;

use crate::auth::Caller;
use crate::error::bad_digest;
use crate::farm::Farm;
use crate::metrics::Metrics;

/// Bytes of blobs inlined into one GetActionResult answer at most: well
/// under gRPC's default 4 MiB message limit, whatever else the result holds.
const INLINE_BUDGET: u64 = 1 << 20;

/// GetActionResult / UpdateActionResult over the persistent action cache.
pub struct ActionCacheService {
    farm: Arc<Farm>,
}

impl ActionCacheService {
    /// The service over `farm`.
    pub fn new(farm: Arc<Farm>) -> Self {
        ActionCacheService { farm }
    }

    /// Fills `stdout_raw`, `stderr_raw` and the `contents` of the output
    /// files the request asks for, in that order, while they fit in
    /// [`INLINE_BUDGET`]. Inlining is a hint: what does not fit, or was
    /// evicted meanwhile, stays a digest for the client to fetch.
    async fn inline_requested(
        &self,
        result: &mut reapi::ActionResult,
        request: &reapi::GetActionResultRequest,
    ) -> Result<(), Status> {
        let mut budget = INLINE_BUDGET;
        let mut wanted: Vec<(Option<Digest>, &mut bytes::Bytes)> = Vec::new();
        if request.inline_stdout && result.stdout_raw.is_empty() {
            let digest = result
                .stdout_digest
                .as_ref()
                .and_then(|d| Digest::try_from(d).ok());
            wanted.push((digest, &mut result.stdout_raw));
        }
        if request.inline_stderr && result.stderr_raw.is_empty() {
            let digest = result
                .stderr_digest
                .as_ref()
                .and_then(|d| Digest::try_from(d).ok());
            wanted.push((digest, &mut result.stderr_raw));
        }
        for file in result.output_files.iter_mut() {
            if request.inline_output_files.contains(&file.path) && file.contents.is_empty() {
                let digest = file.digest.as_ref().and_then(|d| Digest::try_from(d).ok());
                wanted.push((digest, &mut file.contents));
            }
        }
        for (digest, slot) in wanted {
            let Some(digest) = digest.filter(|d| !d.is_empty_blob() && d.size() <= budget) else {
                continue;
            };
            if let Some(data) = self.farm.cas.get(&digest).await? {
                budget -= digest.size();
                *slot = data;
            }
        }
        Ok(())
    }
}

/// Checks that every digest an action result carries is well formed.
pub(crate) fn validate_result(result: &reapi::ActionResult) -> Result<(), Status> {
    for (i, f) in result.output_files.iter().enumerate() {
        Digest::from_field(f.digest.as_ref()).map_err(|e| {
            bad_digest(
                &format!("action_result.output_files[{i}] ({:?})", f.path),
                e,
            )
        })?;
    }
    for (i, d) in result.output_directories.iter().enumerate() {
        Digest::from_field(d.tree_digest.as_ref()).map_err(|e| {
            bad_digest(
                &format!("action_result.output_directories[{i}] ({:?})", d.path),
                e,
            )
        })?;
    }
    for (field, digest) in [
        ("stdout_digest", &result.stdout_digest),
        ("stderr_digest", &result.stderr_digest),
    ] {
        if let Some(d) = digest {
            Digest::try_from(d).map_err(|e| bad_digest(&format!("action_result.{field}"), e))?;
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl ActionCache for ActionCacheService {
    #[tracing::instrument(skip_all, fields(instance = %request.get_ref().instance_name, action))]
    async fn get_action_result(
        &self,
        request: Request<reapi::GetActionResultRequest>,
    ) -> Result<Response<reapi::ActionResult>, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        self.farm.instances.check(&request.instance_name)?;
        caller.require_client(Scope::Read, &request.instance_name)?;
        let digest = Digest::from_field(request.action_digest.as_ref())
            .map_err(|e| bad_digest("action_digest", e))?;
        tracing::Span::current().record("action", tracing::field::display(&digest));
        let result = self
            .farm
            .action_cache
            .get(&request.instance_name, &digest)
            .await?;
        match result {
            Some(mut result) if self.farm.result_is_complete(&result).await? => {
                Metrics::add(&self.farm.metrics.ac_hits, 1);
                self.inline_requested(&mut result, &request).await?;
                Ok(Response::new(result))
            }
            Some(_) => {
                Metrics::add(&self.farm.metrics.ac_misses, 1);
                tracing::debug!(
                    "action result references blobs no longer in the CAS; reporting a miss"
                );
                Err(Status::not_found(format!(
                    "action result for {digest} references evicted outputs"
                )))
            }
            None => {
                Metrics::add(&self.farm.metrics.ac_misses, 1);
                Err(Status::not_found(format!("no action result for {digest}")))
            }
        }
    }

    #[tracing::instrument(skip_all, fields(instance = %request.get_ref().instance_name))]
    async fn update_action_result(
        &self,
        request: Request<reapi::UpdateActionResultRequest>,
    ) -> Result<Response<reapi::ActionResult>, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        self.farm.instances.check(&request.instance_name)?;
        // A worker credential is refused here: results of executed actions
        // reach the cache only through Complete of a lease the worker holds.
        caller.require_client(Scope::WriteAc, &request.instance_name)?;
        let digest = Digest::from_field(request.action_digest.as_ref())
            .map_err(|e| bad_digest("action_digest", e))?;
        let result = request
            .action_result
            .ok_or_else(|| Status::invalid_argument("action_result is missing"))?;
        validate_result(&result)?;
        self.farm
            .action_cache
            .put(&request.instance_name, &digest, &result)
            .await?;
        tracing::debug!(action = %digest, "action result stored");
        Ok(Response::new(result))
    }
}
