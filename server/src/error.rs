//! The one place where domain errors become gRPC statuses.

use buildkube_proto::rpc;
use buildkube_reapi::{Digest, DigestError, ResourceError};
use prost::Message;
use tonic::{Code, Status};

use crate::storage::StorageError;

impl From<StorageError> for Status {
    fn from(error: StorageError) -> Status {
        let code = match &error {
            StorageError::DigestMismatch { .. }
            | StorageError::BadOffset { .. }
            | StorageError::TooLong { .. } => Code::InvalidArgument,
            StorageError::TooLarge { .. } => Code::ResourceExhausted,
            e if e.is_disk_full() => Code::ResourceExhausted,
            StorageError::Io { .. } | StorageError::CorruptEntry { .. } => Code::Internal,
            // The database or cache server is down or failing: clients retry.
            StorageError::Backend { .. } => Code::Unavailable,
        };
        if matches!(code, Code::Internal | Code::Unavailable) {
            tracing::error!(%error, "storage failure");
        }
        Status::new(code, error.to_string())
    }
}

/// A digest field that failed to parse: INVALID_ARGUMENT naming the field.
pub(crate) fn bad_digest(field: &str, error: DigestError) -> Status {
    Status::invalid_argument(format!("{field}: {error}"))
}

/// A malformed ByteStream resource name.
pub(crate) fn bad_resource(error: ResourceError) -> Status {
    match error {
        ResourceError::UnsupportedCompressor { .. } => Status::unimplemented(error.to_string()),
        _ => Status::invalid_argument(error.to_string()),
    }
}

/// The subject of a MISSING violation, as the REAPI specifies it.
pub(crate) fn missing_subject(digest: &Digest) -> String {
    format!("blobs/{}/{}", digest.hash_hex(), digest.size())
}

/// A google.rpc.PreconditionFailure listing missing blobs, packed into a
/// google.rpc.Status (for ExecuteResponse.status or a gRPC error's details).
pub(crate) fn missing_blobs_status(what: &str, missing: &[Digest]) -> rpc::Status {
    let failure = rpc::PreconditionFailure {
        violations: missing
            .iter()
            .map(|d| rpc::precondition_failure::Violation {
                r#type: "MISSING".into(),
                subject: missing_subject(d),
                description: format!("{what} blob {d} is not in the CAS"),
            })
            .collect(),
    };
    rpc::Status {
        code: Code::FailedPrecondition as i32,
        message: format!(
            "{} {what} blob(s) missing from the CAS, first {}; upload them and retry",
            missing.len(),
            missing[0]
        ),
        details: vec![prost_types::Any {
            type_url: "type.googleapis.com/google.rpc.PreconditionFailure".into(),
            value: failure.encode_to_vec(),
        }],
    }
}

/// A google.rpc.Status as a tonic Status, keeping its details on the wire.
pub(crate) fn to_tonic(status: rpc::Status) -> Status {
    let details = status.encode_to_vec();
    Status::with_details(Code::from(status.code), status.message, details.into())
}
