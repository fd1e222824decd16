//! Why an action produced no normal result, and how that becomes the
//! `google.rpc.Status` reported to the server (and from there to the client).

use buildkube_proto::reapi::ActionResult;
use buildkube_proto::rpc;
use buildkube_reapi::{CasClientError, Digest};
use prost::Message;
use tonic::Code;

/// Type URL of a `google.rpc.PreconditionFailure` packed into `Status.details`.
pub const PRECONDITION_FAILURE_TYPE_URL: &str =
    "type.googleapis.com/google.rpc.PreconditionFailure";
/// Type URL of the partial `ActionResult` (stdout/stderr so far, metadata)
/// that an error status carries when the command did run: timeouts, output
/// limits, a kill at the end of a drain. The server unpacks it into
/// `ExecuteResponse.result`.
pub const ACTION_RESULT_TYPE_URL: &str =
    "type.googleapis.com/build.bazel.remote.execution.v2.ActionResult";

/// An action that ended in an error status.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code:?}: {message}")]
pub(crate) struct ActionError {
    pub(crate) code: Code,
    pub(crate) message: String,
    /// Input blobs the CAS lacks (FAILED_PRECONDITION with MISSING violations).
    pub(crate) missing: Vec<Digest>,
    /// What the command produced before it was stopped.
    pub(crate) partial: Option<Box<ActionResult>>,
}

impl ActionError {
    pub(crate) fn new(code: Code, message: impl Into<String>) -> ActionError {
        ActionError {
            code,
            message: message.into(),
            missing: Vec::new(),
            partial: None,
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> ActionError {
        ActionError::new(Code::InvalidArgument, message)
    }

    pub(crate) fn internal(message: impl Into<String>) -> ActionError {
        ActionError::new(Code::Internal, message)
    }

    pub(crate) fn missing_inputs(mut missing: Vec<Digest>) -> ActionError {
        missing.sort();
        missing.dedup();
        let list: Vec<String> = missing.iter().take(5).map(Digest::to_string).collect();
        let more = missing.len().saturating_sub(5);
        let mut message = format!(
            "{} input blob(s) missing from the CAS: {}",
            missing.len(),
            list.join(", ")
        );
        if more > 0 {
            message.push_str(&format!(" and {more} more"));
        }
        ActionError {
            code: Code::FailedPrecondition,
            message,
            missing,
            partial: None,
        }
    }

    /// An I/O failure: a full disk (or quota) is RESOURCE_EXHAUSTED, anything
    /// else INTERNAL; the message names what we were doing and the path.
    pub(crate) fn io(what: &str, path: &std::path::Path, error: &std::io::Error) -> ActionError {
        let code = if is_disk_full(error) {
            Code::ResourceExhausted
        } else {
            Code::Internal
        };
        ActionError::new(code, format!("{what} {}: {error}", path.display()))
    }

    /// A CAS transfer failure.
    pub(crate) fn cas(what: &str, error: &CasClientError) -> ActionError {
        match error {
            CasClientError::Missing(digest) => ActionError::missing_inputs(vec![*digest]),
            CasClientError::Io { source, .. } if is_disk_full(source) => {
                ActionError::new(Code::ResourceExhausted, format!("{what}: {error}"))
            }
            CasClientError::Rpc { status, .. } => {
                ActionError::new(status.code(), format!("{what}: {error}"))
            }
            _ => ActionError::internal(format!("{what}: {error}")),
        }
    }

    pub(crate) fn with_partial(mut self, partial: ActionResult) -> ActionError {
        self.partial = Some(Box::new(partial));
        self
    }

    /// The wire status, with the details the REAPI asks for.
    pub(crate) fn to_status(&self) -> rpc::Status {
        let mut details = Vec::new();
        if !self.missing.is_empty() {
            let failure = rpc::PreconditionFailure {
                violations: self
                    .missing
                    .iter()
                    .map(|d| rpc::precondition_failure::Violation {
                        r#type: "MISSING".to_string(),
                        subject: format!("blobs/{}/{}", d.hash_hex(), d.size()),
                        description: String::new(),
                    })
                    .collect(),
            };
            details.push(prost_types::Any {
                type_url: PRECONDITION_FAILURE_TYPE_URL.to_string(),
                value: failure.encode_to_vec(),
            });
        }
        if let Some(partial) = &self.partial {
            details.push(prost_types::Any {
                type_url: ACTION_RESULT_TYPE_URL.to_string(),
                value: partial.encode_to_vec(),
            });
        }
        rpc::Status {
            code: self.code as i32,
            message: self.message.clone(),
            details,
        }
    }
}

/// ENOSPC or EDQUOT.
pub(crate) fn is_disk_full(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::ENOSPC) | Some(libc::EDQUOT)
    )
}

/// Whether a failed call is worth retrying: the server is restarting or the
/// connection dropped, as opposed to a request it rejected.
pub(crate) fn is_transient(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_inputs_become_precondition_failure_details() {
        let a = Digest::of_bytes(b"a");
        let b = Digest::of_bytes(b"bb");
        let status = ActionError::missing_inputs(vec![b, a, b]).to_status();
        assert_eq!(status.code, Code::FailedPrecondition as i32);
        assert_eq!(status.details.len(), 1);
        assert_eq!(status.details[0].type_url, PRECONDITION_FAILURE_TYPE_URL);
        let failure = rpc::PreconditionFailure::decode(status.details[0].value.as_slice()).unwrap();
        let subjects: Vec<_> = failure
            .violations
            .iter()
            .map(|v| v.subject.as_str())
            .collect();
        assert_eq!(failure.violations.len(), 2);
        assert!(failure.violations.iter().all(|v| v.r#type == "MISSING"));
        assert!(
            subjects.contains(&format!("blobs/{}/1", a.hash_hex()).as_str()),
            "{subjects:?}"
        );
        assert!(
            subjects.contains(&format!("blobs/{}/2", b.hash_hex()).as_str()),
            "{subjects:?}"
        );
        assert!(status.message.contains(&a.hash_hex()), "{}", status.message);
    }

    #[test]
    fn disk_full_is_resource_exhausted() {
        let error = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let e = ActionError::io("writing", std::path::Path::new("/w/out"), &error);
        assert_eq!(e.code, Code::ResourceExhausted);
        assert!(e.message.contains("/w/out"));
    }
}
