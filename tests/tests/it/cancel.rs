//! Cancellation and timeouts end to end (issue 4): a plain gRPC client
//! executes `sh -c 'sleep N & sleep N'` on a real server and worker, and
//! when the action times out or is cancelled, no `sleep N` is left: the
//! worker killed the whole process group, the background child included.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use buildkube_proto::longrunning::operations_client::OperationsClient;
use buildkube_proto::longrunning::{self, CancelOperationRequest};
use buildkube_proto::reapi;
use buildkube_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use buildkube_proto::reapi::execution_client::ExecutionClient;
use buildkube_reapi::{connect_channel, Digest};
use buildkube_tests::{poll_until, Server, Worker};
use futures::StreamExt;
use prost::Message;
use tonic::Code;

const INSTANCE: &str = "main";
/// How long the processes may take to show up, and to be gone.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(30);

static NEXT_MARKER: AtomicU64 = AtomicU64::new(0);

/// `sleep N` with an N no other test uses, so /proc shows only ours.
fn unique_sleep() -> String {
    let n = NEXT_MARKER.fetch_add(1, Ordering::Relaxed);
    format!(
        "sleep {}",
        7_000_000 + u64::from(std::process::id()) * 10 + n
    )
}

/// Live (not zombie) processes whose command line is `command`.
fn processes_running(command: &str) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|entry| {
            let pid = entry.file_name();
            let Some(pid) = pid
                .to_str()
                .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
            else {
                return false;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|stat| {
                    stat.rsplit(')')
                        .next()
                        .unwrap_or("")
                        .trim_start()
                        .starts_with('Z')
                })
                .unwrap_or(true);
            !zombie && String::from_utf8_lossy(&cmdline).replace('\0', " ").trim() == command
        })
        .count()
}

fn wait_for_processes(command: &str, count: usize) {
    poll_until(
        &format!("{count} `{command}` process(es)"),
        PROCESS_TIMEOUT,
        || Ok((processes_running(command) == count).then_some(())),
    )
    .unwrap();
}

/// Uploads an action running `sh -c '<sleep> & <sleep>'` with `timeout`;
/// returns its digest.
async fn upload_sleeping_action(server: &Server, sleep: &str, timeout: Option<Duration>) -> Digest {
    let root = reapi::Directory::default().encode_to_vec();
    let command = reapi::Command {
        arguments: vec!["/bin/sh".into(), "-c".into(), format!("{sleep} & {sleep}")],
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
        timeout: timeout.map(|t| prost_types::Duration {
            seconds: t.as_secs() as i64,
            nanos: 0,
        }),
        do_not_cache: true,
        ..Default::default()
    }
    .encode_to_vec();
    let channel = connect_channel(&server.worker_endpoint(), None).unwrap();
    let mut cas = ContentAddressableStorageClient::new(channel);
    let requests = [&root, &command, &action]
        .into_iter()
        .map(|blob| reapi::batch_update_blobs_request::Request {
            digest: Some(Digest::of_bytes(blob).to_proto()),
            data: bytes::Bytes::copy_from_slice(blob),
            ..Default::default()
        })
        .collect();
    let response = cas
        .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
            instance_name: INSTANCE.into(),
            requests,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for answer in response.responses {
        assert_eq!(answer.status.unwrap_or_default().code, 0);
    }
    Digest::of_bytes(&action)
}

/// The `ExecuteResponse` of a finished operation.
fn response_of(op: &longrunning::Operation) -> reapi::ExecuteResponse {
    let Some(longrunning::operation::Result::Response(any)) = &op.result else {
        panic!("no response in {op:?}");
    };
    reapi::ExecuteResponse::decode(any.value.as_slice()).unwrap()
}

/// A server and one worker, connected.
fn farm() -> (Server, Worker) {
    let server = Server::start_with(|args| args.lease_timeout_secs = 3).unwrap();
    let worker = Worker::start(&server).unwrap();
    server.wait_for_workers(1, PROCESS_TIMEOUT).unwrap();
    (server, worker)
}

/// An action past its `Action.timeout` ends DEADLINE_EXCEEDED with its
/// whole process group killed.
#[tokio::test(flavor = "multi_thread")]
async fn action_timeout_kills_the_process_group() {
    let (server, _worker) = farm();
    let sleep = unique_sleep();
    let action = upload_sleeping_action(&server, &sleep, Some(Duration::from_secs(2))).await;
    let channel = connect_channel(&server.worker_endpoint(), None).unwrap();
    let mut stream = ExecutionClient::new(channel)
        .execute(reapi::ExecuteRequest {
            instance_name: INSTANCE.into(),
            action_digest: Some(action.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Both sleeps run before the deadline...
    tokio::task::spawn_blocking({
        let sleep = sleep.clone();
        move || wait_for_processes(&sleep, 2)
    })
    .await
    .unwrap();
    let mut last = None;
    while let Some(op) = stream.next().await {
        last = Some(op.unwrap());
    }
    let last = last.expect("the stream ends with the operation");
    assert!(last.done, "{last:?}");
    let status = response_of(&last).status.unwrap_or_default();
    assert_eq!(status.code, Code::DeadlineExceeded as i32, "{status:?}");
    // ...and neither survives it.
    tokio::task::spawn_blocking(move || wait_for_processes(&sleep, 0))
        .await
        .unwrap();
}

/// CancelOperation on a running action ends it CANCELLED and kills its
/// whole process group on the worker.
#[tokio::test(flavor = "multi_thread")]
async fn cancel_operation_kills_the_process_group() {
    let (server, _worker) = farm();
    let sleep = unique_sleep();
    let action = upload_sleeping_action(&server, &sleep, None).await;
    let channel = connect_channel(&server.worker_endpoint(), None).unwrap();
    let mut stream = ExecutionClient::new(channel.clone())
        .execute(reapi::ExecuteRequest {
            instance_name: INSTANCE.into(),
            action_digest: Some(action.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    tokio::task::spawn_blocking({
        let sleep = sleep.clone();
        move || wait_for_processes(&sleep, 2)
    })
    .await
    .unwrap();

    OperationsClient::new(channel)
        .cancel_operation(CancelOperationRequest {
            name: first.name.clone(),
        })
        .await
        .unwrap();
    let mut last = None;
    while let Some(op) = stream.next().await {
        last = Some(op.unwrap());
    }
    let last = last.expect("the stream ends with the operation");
    let status = response_of(&last).status.unwrap_or_default();
    assert_eq!(status.code, Code::Cancelled as i32, "{status:?}");
    tokio::task::spawn_blocking(move || wait_for_processes(&sleep, 0))
        .await
        .unwrap();
}

/// A client that goes away (its Execute stream dropped, no WaitExecution)
/// gets its action cancelled after --orphan-timeout-secs, and the worker
/// kills the whole process group.
#[tokio::test(flavor = "multi_thread")]
async fn client_going_away_stops_the_action() {
    let server = Server::start_with(|args| {
        args.lease_timeout_secs = 3;
        args.orphan_timeout_secs = 2;
    })
    .unwrap();
    let _worker = Worker::start(&server).unwrap();
    server.wait_for_workers(1, PROCESS_TIMEOUT).unwrap();
    let sleep = unique_sleep();
    let action = upload_sleeping_action(&server, &sleep, None).await;
    let channel = connect_channel(&server.worker_endpoint(), None).unwrap();
    let mut stream = ExecutionClient::new(channel.clone())
        .execute(reapi::ExecuteRequest {
            instance_name: INSTANCE.into(),
            action_digest: Some(action.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    tokio::task::spawn_blocking({
        let sleep = sleep.clone();
        move || wait_for_processes(&sleep, 2)
    })
    .await
    .unwrap();
    drop(stream);
    drop(channel);
    tokio::task::spawn_blocking(move || wait_for_processes(&sleep, 0))
        .await
        .unwrap();
    let channel = connect_channel(&server.worker_endpoint(), None).unwrap();
    let op = OperationsClient::new(channel)
        .get_operation(longrunning::GetOperationRequest {
            name: first.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(op.done, "{op:?}");
    let status = response_of(&op).status.unwrap_or_default();
    assert_eq!(status.code, Code::Cancelled as i32, "{status:?}");
    assert!(status.message.contains("no client"), "{status:?}");
}
