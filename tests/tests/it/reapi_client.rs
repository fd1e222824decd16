//! The REAPI as a plain gRPC client sees it: the clients of one server and
//! the calls more than one test makes, all on instance [`INSTANCE`]. A call
//! that returns a `Result` leaves its outcome to the test; one that returns
//! a plain value panics unless the server accepts it, one named `*_rejected`
//! unless the server refuses it. Tests that probe a call with bad input
//! build their requests themselves.

use buildkube_proto::bytestream::byte_stream_client::ByteStreamClient;
use buildkube_proto::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, WriteRequest, WriteResponse,
};
use buildkube_proto::longrunning::operations_client::OperationsClient;
use buildkube_proto::longrunning::{self, Operation};
use buildkube_proto::reapi::action_cache_client::ActionCacheClient;
use buildkube_proto::reapi::capabilities_client::CapabilitiesClient;
use buildkube_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use buildkube_proto::reapi::execution_client::ExecutionClient;
use buildkube_proto::reapi::{self, batch_update_blobs_request};
use buildkube_reapi::{connect_channel, AuthChannel, CasClient, Digest};
use buildkube_tests::Server;
use bytes::Bytes;
use futures::StreamExt;
use prost::Message;
use tonic::Streaming;

/// The instance every test server serves.
pub(crate) const INSTANCE: &str = "main";

/// Every REAPI client of one server, over one connection.
pub(crate) struct Clients {
    channel: AuthChannel,
    pub(crate) cas: ContentAddressableStorageClient<AuthChannel>,
    pub(crate) bytestream: ByteStreamClient<AuthChannel>,
    pub(crate) ac: ActionCacheClient<AuthChannel>,
    pub(crate) exec: ExecutionClient<AuthChannel>,
    pub(crate) ops: OperationsClient<AuthChannel>,
    pub(crate) caps: CapabilitiesClient<AuthChannel>,
}

impl Clients {
    /// Connects to `server`'s gRPC port, with `token` as the bearer token.
    pub(crate) fn connect(server: &Server, token: Option<&str>) -> Clients {
        Clients::connect_to(&server.worker_endpoint(), token)
    }

    /// Connects to the plaintext gRPC `endpoint` (`http://host:port`).
    pub(crate) fn connect_to(endpoint: &str, token: Option<&str>) -> Clients {
        let channel = connect_channel(endpoint, token, &Default::default()).unwrap();
        Clients {
            cas: ContentAddressableStorageClient::new(channel.clone())
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
            bytestream: ByteStreamClient::new(channel.clone()),
            ac: ActionCacheClient::new(channel.clone()),
            exec: ExecutionClient::new(channel.clone()),
            ops: OperationsClient::new(channel.clone()),
            caps: CapabilitiesClient::new(channel.clone()),
            channel,
        }
    }

    /// buildkube-reapi's own CAS client of [`INSTANCE`], on this connection.
    pub(crate) fn cas_client(&self) -> CasClient {
        CasClient::new(self.channel.clone(), INSTANCE)
    }
}

/// One blob of a BatchUpdateBlobs request: `data`, claimed to be `digest`.
pub(crate) fn upload_request(digest: Digest, data: &[u8]) -> batch_update_blobs_request::Request {
    batch_update_blobs_request::Request {
        digest: Some(digest.to_proto()),
        data: Bytes::copy_from_slice(data),
        ..Default::default()
    }
}

/// Uploads `blobs` in one BatchUpdateBlobs call; each must be stored.
pub(crate) async fn upload(c: &mut Clients, blobs: &[&[u8]]) {
    let requests = blobs
        .iter()
        .map(|b| upload_request(Digest::of_bytes(b), b))
        .collect();
    let response = c
        .cas
        .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
            instance_name: INSTANCE.into(),
            requests,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for r in response.responses {
        assert_eq!(r.status.unwrap().code, 0);
    }
}

/// Which of `digests` the server lacks (FindMissingBlobs).
pub(crate) async fn missing(c: &mut Clients, digests: &[Digest]) -> Vec<reapi::Digest> {
    c.cas
        .find_missing_blobs(reapi::FindMissingBlobsRequest {
            instance_name: INSTANCE.into(),
            blob_digests: digests.iter().map(Digest::to_proto).collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests
}

/// Uploads an action running `/bin/sh -c script` (with PATH=/usr/bin:/bin)
/// in an empty input root, declaring `output_paths`; `action` gives the
/// rest of the Action (timeout, do_not_cache). Returns the action digest.
pub(crate) async fn upload_shell_action(
    c: &mut Clients,
    script: &str,
    output_paths: &[&str],
    action: reapi::Action,
) -> Digest {
    let root = reapi::Directory::default().encode_to_vec();
    let command = reapi::Command {
        arguments: vec!["/bin/sh".into(), "-c".into(), script.into()],
        output_paths: output_paths.iter().map(|p| p.to_string()).collect(),
        environment_variables: vec![reapi::command::EnvironmentVariable {
            name: "PATH".into(),
            value: "/usr/bin:/bin".into(),
        }],
        ..Default::default()
    }
    .encode_to_vec();
    let action = reapi::Action {
        command_digest: Some(Digest::of_bytes(&command).to_proto()),
        input_root_digest: Some(Digest::of_bytes(&root).to_proto()),
        ..action
    }
    .encode_to_vec();
    upload(c, &[&root, &command, &action]).await;
    Digest::of_bytes(&action)
}

fn execute_request(action: Digest) -> reapi::ExecuteRequest {
    reapi::ExecuteRequest {
        instance_name: INSTANCE.into(),
        action_digest: Some(action.to_proto()),
        ..Default::default()
    }
}

/// Executes `action`; the server accepts it and streams its operation.
pub(crate) async fn execute(c: &mut Clients, action: Digest) -> Streaming<Operation> {
    c.exec
        .execute(execute_request(action))
        .await
        .unwrap()
        .into_inner()
}

/// Executes `action`; the server refuses it with the returned status.
pub(crate) async fn execute_rejected(c: &mut Clients, action: Digest) -> tonic::Status {
    c.exec
        .execute(execute_request(action))
        .await
        .map(|_| ())
        .unwrap_err()
}

/// Reads an Execute (or WaitExecution) stream to its end; returns the last
/// operation.
pub(crate) async fn last_operation(mut stream: Streaming<Operation>) -> Operation {
    let mut last = None;
    while let Some(op) = stream.next().await {
        last = Some(op.unwrap());
    }
    last.expect("the stream ends with the operation")
}

/// The `ExecuteResponse` of a finished operation.
pub(crate) fn response_of(op: &Operation) -> reapi::ExecuteResponse {
    let Some(longrunning::operation::Result::Response(any)) = &op.result else {
        panic!("no response in {op:?}");
    };
    reapi::ExecuteResponse::decode(any.value.as_slice()).unwrap()
}

/// Stores `result` as the action cache entry of `action` (UpdateActionResult).
pub(crate) async fn update_action_result(
    c: &mut Clients,
    action: Digest,
    result: reapi::ActionResult,
) -> Result<(), tonic::Status> {
    c.ac.update_action_result(reapi::UpdateActionResultRequest {
        instance_name: INSTANCE.into(),
        action_digest: Some(action.to_proto()),
        action_result: Some(result),
        ..Default::default()
    })
    .await
    .map(|_| ())
}

/// The action cache entry of `action` (GetActionResult).
pub(crate) async fn get_action_result(
    c: &mut Clients,
    action: Digest,
) -> Result<reapi::ActionResult, tonic::Status> {
    c.ac.get_action_result(reapi::GetActionResultRequest {
        instance_name: INSTANCE.into(),
        action_digest: Some(action.to_proto()),
        ..Default::default()
    })
    .await
    .map(tonic::Response::into_inner)
}

/// ByteStream Write requests for `resource`: one per `(offset, data,
/// finish_write)`, the resource name on the first only.
fn write_requests(resource: &str, chunks: &[(i64, &[u8], bool)]) -> Vec<WriteRequest> {
    chunks
        .iter()
        .enumerate()
        .map(|(i, (offset, data, finish))| WriteRequest {
            resource_name: if i == 0 {
                resource.to_string()
            } else {
                String::new()
            },
            write_offset: *offset,
            finish_write: *finish,
            data: Bytes::copy_from_slice(data),
        })
        .collect()
}

/// One ByteStream Write call to `resource` of `chunks`, each `(offset, data,
/// finish_write)`.
pub(crate) async fn write(
    c: &mut Clients,
    resource: &str,
    chunks: &[(i64, &[u8], bool)],
) -> Result<WriteResponse, tonic::Status> {
    c.bytestream
        .write(futures::stream::iter(write_requests(resource, chunks)))
        .await
        .map(tonic::Response::into_inner)
}

/// ByteStream QueryWriteStatus of `resource`.
pub(crate) async fn query_write_status(
    c: &mut Clients,
    resource: &str,
) -> Result<QueryWriteStatusResponse, tonic::Status> {
    c.bytestream
        .query_write_status(QueryWriteStatusRequest {
            resource_name: resource.to_string(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// All the data of a ByteStream Read the server accepts.
pub(crate) async fn read(c: &mut Clients, request: ReadRequest) -> Vec<u8> {
    let mut stream = c.bytestream.read(request).await.unwrap().into_inner();
    let mut data = Vec::new();
    while let Some(chunk) = stream.next().await {
        data.extend_from_slice(&chunk.unwrap().data);
    }
    data
}

/// A ByteStream Read the server refuses, and its status.
pub(crate) async fn read_rejected(c: &mut Clients, resource: &str) -> tonic::Status {
    read_range_rejected(
        c,
        ReadRequest {
            resource_name: resource.to_string(),
            ..Default::default()
        },
    )
    .await
}

/// [`read_rejected`] of a whole request, offset and limit included.
pub(crate) async fn read_range_rejected(c: &mut Clients, request: ReadRequest) -> tonic::Status {
    c.bytestream.read(request).await.map(|_| ()).unwrap_err()
}

/// GetCapabilities of [`INSTANCE`].
pub(crate) async fn capabilities(c: &mut Clients) -> reapi::ServerCapabilities {
    capabilities_result(c).await.unwrap()
}

/// GetCapabilities of [`INSTANCE`], accepted or not.
pub(crate) async fn capabilities_result(
    c: &mut Clients,
) -> Result<reapi::ServerCapabilities, tonic::Status> {
    c.caps
        .get_capabilities(reapi::GetCapabilitiesRequest {
            instance_name: INSTANCE.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The resource name of blob `d` of [`INSTANCE`] for ByteStream Read.
pub(crate) fn blob_resource(d: Digest) -> String {
    format!("{INSTANCE}/blobs/{}/{}", d.hash_hex(), d.size())
}

/// A ByteStream Write resource name of [`INSTANCE`] for blob `d`, upload `upload`.
pub(crate) fn upload_resource(upload: &str, d: Digest) -> String {
    format!(
        "{INSTANCE}/uploads/{upload}/blobs/{}/{}",
        d.hash_hex(),
        d.size()
    )
}

/// BatchReadBlobs of `digests`.
pub(crate) async fn batch_read(
    c: &mut Clients,
    digests: &[Digest],
) -> Result<reapi::BatchReadBlobsResponse, tonic::Status> {
    c.cas
        .batch_read_blobs(reapi::BatchReadBlobsRequest {
            instance_name: INSTANCE.into(),
            digests: digests.iter().map(Digest::to_proto).collect(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}
