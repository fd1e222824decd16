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
            StorageError::TooLarge { .. } | StorageError::UploadsFull { .. } => {
                Code::ResourceExhausted
            }
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

/// Longest status message sent back, in bytes. Messages name what they are
/// about, and what a client sent can be long (a 16 KiB file name, a forged
/// digest): echoed in full it could pass HTTP/2's header size limit and
/// break the stream instead of answering.
pub const MAX_STATUS_MESSAGE: usize = 1024;

/// `message` cut to [`MAX_STATUS_MESSAGE`] bytes (at a character boundary),
/// saying how long it was.
pub fn truncate_message(message: &str) -> std::borrow::Cow<'_, str> {
    if message.len() <= MAX_STATUS_MESSAGE {
        return message.into();
    }
    let mut end = MAX_STATUS_MESSAGE - 40;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}… (message cut, {} bytes in all)",
        &message[..end],
        message.len()
    )
    .into()
}

/// The edge where every gRPC status leaves the server: a tower layer over
/// all services that applies [`truncate_message`] to `grpc-message`, in
/// response headers (errors before any message) and trailers (errors in a
/// stream).
#[derive(Debug, Clone, Copy, Default)]
pub struct TruncateStatusLayer;

impl<S> tower_layer::Layer<S> for TruncateStatusLayer {
    type Service = TruncateStatus<S>;

    fn layer(&self, inner: S) -> TruncateStatus<S> {
        TruncateStatus(inner)
    }
}

/// See [`TruncateStatusLayer`].
#[derive(Debug, Clone)]
pub struct TruncateStatus<S>(S);

type HeaderMap = tonic::codegen::http::HeaderMap;

fn truncate_status_header(headers: &mut HeaderMap) {
    let too_long = headers
        .get("grpc-message")
        .is_some_and(|value| value.len() > MAX_STATUS_MESSAGE);
    if !too_long {
        return;
    }
    let Some(status) = Status::from_header_map(headers) else {
        return;
    };
    let short = Status::new(status.code(), truncate_message(status.message()));
    let mut short_headers = HeaderMap::new();
    match short.add_header(&mut short_headers) {
        Ok(()) => match short_headers.get("grpc-message") {
            Some(message) => {
                headers.insert("grpc-message", message.clone());
            }
            None => {
                headers.remove("grpc-message");
            }
        },
        Err(_) => {
            headers.remove("grpc-message");
        }
    }
}

impl<S, Request, ResponseBody> tonic::codegen::Service<Request> for TruncateStatus<S>
where
    S: tonic::codegen::Service<Request, Response = tonic::codegen::http::Response<ResponseBody>>,
    S::Future: Send + 'static,
{
    type Response = tonic::codegen::http::Response<TruncatedTrailers<ResponseBody>>;
    type Error = S::Error;
    type Future = futures::future::MapOk<
        S::Future,
        fn(tonic::codegen::http::Response<ResponseBody>) -> Self::Response,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        use futures::TryFutureExt as _;
        self.0.call(request).map_ok(|response| {
            let (mut parts, body) = response.into_parts();
            truncate_status_header(&mut parts.headers);
            tonic::codegen::http::Response::from_parts(parts, TruncatedTrailers(body))
        })
    }
}

/// A response body whose trailers pass through [`truncate_status_header`].
#[derive(Debug)]
pub struct TruncatedTrailers<B>(B);

impl<B: http_body::Body + Unpin> http_body::Body for TruncatedTrailers<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.0).poll_frame(cx).map(|frame| {
            frame.map(|frame| {
                frame.map(|mut frame| {
                    if let Some(trailers) = frame.trailers_mut() {
                        truncate_status_header(trailers);
                    }
                    frame
                })
            })
        })
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0.size_hint()
    }
}

/// A job runner's refusal as a gRPC status.
pub(crate) fn job_error(error: buildkube_jobs::run::JobError) -> Status {
    use buildkube_jobs::run::JobError;
    let code = match &error {
        JobError::Request(_) => Code::InvalidArgument,
        JobError::InstanceFull { .. } => Code::ResourceExhausted,
        JobError::NotFound { .. } => Code::NotFound,
    };
    Status::new(code, error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        assert_eq!(truncate_message("short"), "short");
        let long = format!("name {:?} is bad", "é".repeat(8 << 10));
        let cut = truncate_message(&long);
        assert!(cut.len() <= MAX_STATUS_MESSAGE, "{}", cut.len());
        assert!(cut.ends_with(&format!("(message cut, {} bytes in all)", long.len())));
        let mut headers = HeaderMap::new();
        Status::invalid_argument(long)
            .add_header(&mut headers)
            .unwrap();
        truncate_status_header(&mut headers);
        let status = Status::from_header_map(&headers).unwrap();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with("name \"éé"));
        assert!(headers.get("grpc-message").unwrap().len() <= 3 * MAX_STATUS_MESSAGE);
    }
}
