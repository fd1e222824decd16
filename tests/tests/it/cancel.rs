//! Cancellation and timeouts end to end (issue 4): a plain gRPC client
//! executes `sh -c 'sleep N & sleep N'` on a real server and worker, and
//! when the action times out or is cancelled, no `sleep N` is left: the
//! worker killed the whole process group, the background child included.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use buildkube_config::ServerArgs;
use buildkube_proto::longrunning::{self, CancelOperationRequest, Operation};
use buildkube_proto::reapi;
use buildkube_tests::{poll_until, Server, Worker};
use futures::StreamExt;
use tonic::{Code, Streaming};

use crate::reapi_client::{execute, last_operation, response_of, upload_shell_action, Clients};

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

/// Waits (on a blocking thread) until `count` `command` processes run.
async fn wait_for_processes(command: &str, count: usize) {
    let command = command.to_string();
    tokio::task::spawn_blocking(move || {
        poll_until(
            &format!("{count} `{command}` process(es)"),
            PROCESS_TIMEOUT,
            || Ok((processes_running(&command) == count).then_some(())),
        )
        .unwrap()
    })
    .await
    .unwrap();
}

/// Uploads and executes an action running `sh -c '<sleep> & <sleep>'` with
/// `timeout`; returns its Execute stream.
async fn execute_sleeping_action(
    c: &mut Clients,
    sleep: &str,
    timeout: Option<Duration>,
) -> Streaming<Operation> {
    let action = upload_shell_action(
        c,
        &format!("{sleep} & {sleep}"),
        &[],
        reapi::Action {
            timeout: timeout.map(|t| prost_types::Duration {
                seconds: t.as_secs() as i64,
                nanos: 0,
            }),
            do_not_cache: true,
            ..Default::default()
        },
    )
    .await;
    execute(c, action).await
}

/// A server (lease timeout 3 s, then `configure`) and one worker, connected.
fn farm_with(configure: impl FnOnce(&mut ServerArgs)) -> (Server, Worker) {
    let server = Server::start_with(|args| {
        args.lease_timeout_secs = 3;
        configure(args);
    })
    .unwrap();
    let worker = Worker::start(&server).unwrap();
    server.wait_for_workers(1, PROCESS_TIMEOUT).unwrap();
    (server, worker)
}

/// A server and one worker, connected.
fn farm() -> (Server, Worker) {
    farm_with(|_| ())
}

/// An action past its `Action.timeout` ends DEADLINE_EXCEEDED with its
/// whole process group killed.
#[tokio::test(flavor = "multi_thread")]
async fn action_timeout_kills_the_process_group() {
    let (server, _worker) = farm();
    let mut c = Clients::connect(&server, None);
    let sleep = unique_sleep();
    let stream = execute_sleeping_action(&mut c, &sleep, Some(Duration::from_secs(2))).await;
    // Both sleeps run before the deadline...
    wait_for_processes(&sleep, 2).await;
    let last = last_operation(stream).await;
    assert!(last.done, "{last:?}");
    let status = response_of(&last).status.unwrap_or_default();
    assert_eq!(status.code, Code::DeadlineExceeded as i32, "{status:?}");
    // ...and neither survives it.
    wait_for_processes(&sleep, 0).await;
}

/// CancelOperation on a running action ends it CANCELLED and kills its
/// whole process group on the worker.
#[tokio::test(flavor = "multi_thread")]
async fn cancel_operation_kills_the_process_group() {
    let (server, _worker) = farm();
    let mut c = Clients::connect(&server, None);
    let sleep = unique_sleep();
    let mut stream = execute_sleeping_action(&mut c, &sleep, None).await;
    let first = stream.next().await.unwrap().unwrap();
    wait_for_processes(&sleep, 2).await;

    c.ops
        .cancel_operation(CancelOperationRequest {
            name: first.name.clone(),
        })
        .await
        .unwrap();
    let last = last_operation(stream).await;
    let status = response_of(&last).status.unwrap_or_default();
    assert_eq!(status.code, Code::Cancelled as i32, "{status:?}");
    wait_for_processes(&sleep, 0).await;
}

/// A client that goes away (its Execute stream dropped, no WaitExecution)
/// gets its action cancelled after --orphan-timeout-secs, and the worker
/// kills the whole process group.
#[tokio::test(flavor = "multi_thread")]
async fn client_going_away_stops_the_action() {
    let (server, _worker) = farm_with(|args| args.orphan_timeout_secs = 2);
    let mut c = Clients::connect(&server, None);
    let sleep = unique_sleep();
    let mut stream = execute_sleeping_action(&mut c, &sleep, None).await;
    let first = stream.next().await.unwrap().unwrap();
    wait_for_processes(&sleep, 2).await;
    drop(stream);
    drop(c);
    wait_for_processes(&sleep, 0).await;
    let mut c = Clients::connect(&server, None);
    let op = c
        .ops
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
