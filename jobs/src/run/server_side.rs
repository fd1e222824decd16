//! What the job runner needs from the server it runs in, which this crate
//! cannot depend on: reading a blob from the CAS, and minting and revoking
//! the per-job farm credential.

use async_trait::async_trait;
use buildkube_reapi::Digest;
use bytes::Bytes;

/// Reads blobs from the farm's CAS.
#[async_trait]
pub trait BlobSource: Send + Sync {
    /// The blob's bytes, `Ok(None)` when the CAS does not hold it. Only
    /// called for digests whose size the caller has already bounded.
    async fn read_blob(&self, digest: Digest) -> Result<Option<Bytes>, String>;
}

/// A farm credential minted for one job's steps.
#[derive(Clone, PartialEq, Eq)]
pub struct MintedToken {
    /// The bearer token, given to the job's steps and to nobody else.
    pub token: String,
    /// Hex SHA-256 of the token: what is stored.
    pub hash: String,
}

impl std::fmt::Debug for MintedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MintedToken(redacted, hash {})", self.hash)
    }
}

/// The per-job farm credentials: a job's steps point their Bazel at the
/// farm with a token valid only on the job's instance, only while the job
/// runs.
pub trait JobCredentials: Send + Sync {
    /// A new token for `job_id`'s steps on `instance`, or `None` when the
    /// server has no authentication (every caller may do everything).
    fn mint(&self, job_id: &str, instance: &str) -> Option<MintedToken>;
    /// Accepts again a token minted before a restart, known by its hash.
    fn honour(&self, job_id: &str, instance: &str, hash: &str);
    /// Revokes every token of `job_id` (the job ended).
    fn revoke(&self, job_id: &str);
}

/// Credentials for a server without authentication: none are minted.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoCredentials;

impl JobCredentials for NoCredentials {
    fn mint(&self, _job_id: &str, _instance: &str) -> Option<MintedToken> {
        None
    }
    fn honour(&self, _job_id: &str, _instance: &str, _hash: &str) {}
    fn revoke(&self, _job_id: &str) {}
}
