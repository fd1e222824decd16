//! The worker library against an in-process fake server: whole leases from
//! fetch to Complete, failures, cancellation, drain and a server restart.

// Bazel 4 sends the legacy output fields.
#![allow(deprecated)]

mod fake_server;
mod git_clone;
mod input_bounds;
mod job_steps;

use std::time::Duration;

use buildkube_config::WorkerArgs;
use buildkube_proto::reapi::{self, command::EnvironmentVariable};
use buildkube_proto::worker::{complete_request::Outcome, CompleteRequest, Lease};
use buildkube_proto::{prost::Message as _, rpc};
use buildkube_reapi::Digest;
use buildkube_worker::Worker;
use clap::Parser as _;
use fake_server::{FakeServer, State};
use tokio::sync::oneshot;

const WAIT: Duration = Duration::from_secs(30);

struct Running {
    http: std::net::SocketAddr,
    drain: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), buildkube_worker::WorkerError>>,
    _dir: tempfile::TempDir,
}

impl Running {
    async fn drain(&mut self) -> Result<(), buildkube_worker::WorkerError> {
        let _ = self.drain.take().unwrap().send(());
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("drained in time")
            .unwrap()
    }
}

async fn start_worker(server: &FakeServer, extra: &[&str]) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let mut argv = vec![
        "buildkube-worker".to_string(),
        format!("--server={}", server.endpoint()),
        format!("--work-dir={}", dir.path().join("work").display()),
        "--concurrency=2".into(),
        "--http-listen=127.0.0.1:0".into(),
        "--worker-id=test-worker".into(),
    ];
    argv.extend(extra.iter().map(|s| s.to_string()));
    let worker = Worker::start(WorkerArgs::parse_from(argv)).await.unwrap();
    let http = worker.http_addr();
    let (drain, drained) = oneshot::channel::<()>();
    let task = tokio::spawn(worker.run(async {
        let _ = drained.await;
    }));
    Running {
        http,
        drain: Some(drain),
        task,
        _dir: dir,
    }
}

fn file(name: &str, digest: Digest, executable: bool) -> reapi::FileNode {
    reapi::FileNode {
        name: name.into(),
        digest: Some(digest.to_proto()),
        is_executable: executable,
        ..Default::default()
    }
}

/// Input root: `in.txt`, executable `tool.sh`, `lib/data.txt`, symlink `link -> in.txt`.
fn input_root(state: &State) -> Digest {
    let lib = reapi::Directory {
        files: vec![file("data.txt", state.put("data\n"), false)],
        ..Default::default()
    };
    let lib_digest = state.put_message(&lib);
    state.put_message(&reapi::Directory {
        files: vec![
            file("in.txt", state.put("input\n"), false),
            file("tool.sh", state.put("#!/bin/sh\necho tool ran\n"), true),
        ],
        directories: vec![reapi::DirectoryNode {
            name: "lib".into(),
            digest: Some(lib_digest.to_proto()),
        }],
        symlinks: vec![reapi::SymlinkNode {
            name: "link".into(),
            target: "in.txt".into(),
            ..Default::default()
        }],
        ..Default::default()
    })
}

struct Spec<'a> {
    script: &'a str,
    output_files: &'a [&'a str],
    output_directories: &'a [&'a str],
    timeout_secs: i64,
    do_not_cache: bool,
    input_root: Option<Digest>,
}

impl Default for Spec<'_> {
    fn default() -> Self {
        Spec {
            script: "true",
            output_files: &[],
            output_directories: &[],
            timeout_secs: 0,
            do_not_cache: false,
            input_root: None,
        }
    }
}

/// Queues a lease for `sh -c script`; returns the lease id and action digest.
fn enqueue(state: &State, spec: Spec<'_>) -> (String, Digest) {
    let command = reapi::Command {
        arguments: vec!["sh".into(), "-c".into(), spec.script.into()],
        environment_variables: vec![EnvironmentVariable {
            name: "PATH".into(),
            value: "/usr/bin:/bin".into(),
        }],
        output_files: spec.output_files.iter().map(|s| s.to_string()).collect(),
        output_directories: spec
            .output_directories
            .iter()
            .map(|s| s.to_string())
            .collect(),
        ..Default::default()
    };
    let action = reapi::Action {
        command_digest: Some(state.put_message(&command).to_proto()),
        input_root_digest: Some(
            spec.input_root
                .unwrap_or_else(|| input_root(state))
                .to_proto(),
        ),
        timeout: (spec.timeout_secs > 0).then_some(buildkube_proto::prost_types::Duration {
            seconds: spec.timeout_secs,
            nanos: 0,
        }),
        do_not_cache: spec.do_not_cache,
        ..Default::default()
    };
    let action_digest = state.put_message(&action);
    let lease_id = uuid_like(&action_digest);
    state.enqueue(Lease {
        lease_id: lease_id.clone(),
        operation_name: format!("operations/{lease_id}"),
        action_digest: Some(action_digest.to_proto()),
        command_digest: action.command_digest.clone(),
        action: Some(action),
        keep_alive_interval: Some(buildkube_proto::prost_types::Duration {
            seconds: 0,
            nanos: 200_000_000,
        }),
        attempt: 1,
        step: None,
    });
    (lease_id, action_digest)
}

fn uuid_like(digest: &Digest) -> String {
    format!("lease-{}", &digest.hash_hex()[..12])
}

fn result_of(complete: &CompleteRequest) -> &reapi::ActionResult {
    match &complete.outcome {
        Some(Outcome::Result(result)) => result,
        other => panic!("expected a result, got {other:?}"),
    }
}

fn error_of(complete: &CompleteRequest) -> &rpc::Status {
    match &complete.outcome {
        Some(Outcome::Error(status)) => status,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn text(state: &State, digest: &Option<reapi::Digest>) -> String {
    String::from_utf8(
        state
            .blob(digest.as_ref().expect("digest set"))
            .expect("blob uploaded")
            .to_vec(),
    )
    .unwrap()
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn runs_an_action_from_lease_to_complete() {
    let server = FakeServer::start().await;
    let state = server.state.clone();
    let mut worker = start_worker(&server, &[]).await;
    let (lease_id, _) = enqueue(
        &state,
        Spec {
            script: "cat in.txt link lib/data.txt > out/copy.txt && ./tool.sh && mkdir -p dir/sub && \
                     echo nested > dir/sub/f && cp tool.sh dir/tool && ln -s f dir/sub/l && echo err >&2",
            output_files: &["out/copy.txt", "never-made.txt"],
            output_directories: &["dir"],
            ..Default::default()
        },
    );
    let completed = state.wait_completed(1, WAIT).await;
    let (complete, cached_before_complete) = &completed[0];
    assert_eq!(complete.lease_id, lease_id);
    assert_eq!(complete.worker.as_ref().unwrap().worker_id, "test-worker");
    let result = result_of(complete);
    assert_eq!(
        result.exit_code,
        0,
        "stderr: {}",
        text(&state, &result.stderr_digest)
    );
    assert_eq!(text(&state, &result.stdout_digest), "tool ran\n");
    assert_eq!(text(&state, &result.stderr_digest), "err\n");
    assert_eq!(result.output_files.len(), 1);
    assert_eq!(result.output_files[0].path, "out/copy.txt");
    assert_eq!(
        text(&state, &result.output_files[0].digest),
        "input\ninput\ndata\n"
    );

    let dir = &result.output_directories[0];
    assert_eq!(dir.path, "dir");
    let tree = reapi::Tree::decode(state.blob(dir.tree_digest.as_ref().unwrap()).unwrap()).unwrap();
    let root = tree.root.unwrap();
    assert_eq!(root.files[0].name, "tool");
    assert!(root.files[0].is_executable, "the executable bit survives");
    assert_eq!(root.directories[0].name, "sub");
    assert_eq!(tree.children.len(), 1);
    assert_eq!(tree.children[0].symlinks[0].target, "f");
    assert_eq!(text(&state, &tree.children[0].files[0].digest), "nested\n");

    let metadata = result.execution_metadata.as_ref().unwrap();
    assert_eq!(metadata.worker, "test-worker");
    for (name, ts) in [
        ("worker_start", &metadata.worker_start_timestamp),
        ("input_fetch_start", &metadata.input_fetch_start_timestamp),
        (
            "input_fetch_completed",
            &metadata.input_fetch_completed_timestamp,
        ),
        ("execution_start", &metadata.execution_start_timestamp),
        (
            "execution_completed",
            &metadata.execution_completed_timestamp,
        ),
        (
            "output_upload_start",
            &metadata.output_upload_start_timestamp,
        ),
        (
            "output_upload_completed",
            &metadata.output_upload_completed_timestamp,
        ),
        ("worker_completed", &metadata.worker_completed_timestamp),
    ] {
        assert!(ts.is_some(), "{name} timestamp missing");
    }
    // The server writes the action cache when it accepts the result; a
    // worker credential may not write it.
    assert!(
        !cached_before_complete,
        "the worker wrote the action cache itself"
    );
    assert!(state.action_cache.lock().unwrap().is_empty());

    // Same inputs again: every file comes from the local cache.
    enqueue(
        &state,
        Spec {
            script: "cat in.txt lib/data.txt",
            ..Default::default()
        },
    );
    let completed = state.wait_completed(2, WAIT).await;
    assert_eq!(
        text(&state, &result_of(&completed[1].0).stdout_digest),
        "input\ndata\n"
    );
    let (_, metrics) = http_get(worker.http, "/metrics").await;
    assert!(
        metrics.contains(r#"buildkube_worker_file_cache_hits_total{worker="test-worker"} 3"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"outcome="success"} 2"#), "{metrics}");
    worker.drain().await.unwrap();
}

#[tokio::test]
async fn failures_and_bad_requests_become_clear_results() {
    let server = FakeServer::start().await;
    let state = server.state.clone();
    let mut worker = start_worker(&server, &["--max-output-size=1000"]).await;

    // 1. Non-zero exit: a result, not cached.
    let (failing, failing_digest) = enqueue(
        &state,
        Spec {
            script: "echo oops >&2; exit 3",
            ..Default::default()
        },
    );
    // 2. An input blob the CAS lacks.
    let absent = Digest::of_bytes(b"never uploaded");
    let root = state.put_message(&reapi::Directory {
        files: vec![file("gone.txt", absent, false)],
        ..Default::default()
    });
    let (missing, _) = enqueue(
        &state,
        Spec {
            script: "cat gone.txt",
            input_root: Some(root),
            ..Default::default()
        },
    );
    // 3. An output path escaping the working directory.
    let (escaping, _) = enqueue(
        &state,
        Spec {
            output_files: &["../escape.txt"],
            ..Default::default()
        },
    );
    // 4. Outputs over the limit.
    let (big, _) = enqueue(
        &state,
        Spec {
            script: "head -c 2000 /dev/zero > big",
            output_files: &["big"],
            ..Default::default()
        },
    );
    // 5. do_not_cache.
    let (uncached, uncached_digest) = enqueue(
        &state,
        Spec {
            script: "echo fine; :",
            do_not_cache: true,
            ..Default::default()
        },
    );

    let completed = state.wait_completed(5, WAIT).await;
    let by_id = |id: &str| {
        completed
            .iter()
            .find(|(c, _)| c.lease_id == id)
            .map(|(c, _)| c.clone())
            .unwrap()
    };

    let failed = by_id(&failing);
    assert_eq!(result_of(&failed).exit_code, 3);
    assert_eq!(text(&state, &result_of(&failed).stderr_digest), "oops\n");
    assert!(!state
        .action_cache
        .lock()
        .unwrap()
        .contains_key(&failing_digest));

    let status = error_of(&by_id(&missing)).clone();
    assert_eq!(status.code, tonic::Code::FailedPrecondition as i32);
    assert_eq!(
        status.details[0].type_url,
        "type.googleapis.com/google.rpc.PreconditionFailure"
    );
    let failure = rpc::PreconditionFailure::decode(status.details[0].value.as_slice()).unwrap();
    assert_eq!(failure.violations.len(), 1);
    assert_eq!(failure.violations[0].r#type, "MISSING");
    assert_eq!(
        failure.violations[0].subject,
        format!("blobs/{}/{}", absent.hash_hex(), absent.size())
    );

    let status = error_of(&by_id(&escaping)).clone();
    assert_eq!(status.code, tonic::Code::InvalidArgument as i32);
    assert!(
        status.message.contains("../escape.txt"),
        "{}",
        status.message
    );

    let status = error_of(&by_id(&big)).clone();
    assert_eq!(status.code, tonic::Code::ResourceExhausted as i32);
    assert!(status.message.contains("big"), "{}", status.message);

    assert_eq!(result_of(&by_id(&uncached)).exit_code, 0);
    assert!(!state
        .action_cache
        .lock()
        .unwrap()
        .contains_key(&uncached_digest));
    worker.drain().await.unwrap();
}

#[tokio::test]
async fn timeout_reports_deadline_exceeded_with_partial_output() {
    let server = FakeServer::start().await;
    let state = server.state.clone();
    let mut worker = start_worker(&server, &[]).await;
    enqueue(
        &state,
        Spec {
            script: "echo partial; sleep 100 & sleep 100",
            timeout_secs: 1,
            ..Default::default()
        },
    );
    let completed = state.wait_completed(1, WAIT).await;
    let status = error_of(&completed[0].0);
    assert_eq!(status.code, tonic::Code::DeadlineExceeded as i32);
    let partial = status
        .details
        .iter()
        .find(|d| d.type_url == buildkube_worker::ACTION_RESULT_TYPE_URL)
        .expect("the partial result is attached");
    let partial = reapi::ActionResult::decode(partial.value.as_slice()).unwrap();
    assert_eq!(text(&state, &partial.stdout_digest), "partial\n");
    worker.drain().await.unwrap();
}

#[tokio::test]
async fn abandoned_leases_are_killed_and_not_reported() {
    let server = FakeServer::start().await;
    let state = server.state.clone();
    let mut worker = start_worker(&server, &[]).await;
    let marker = format!("{}", 200_000 + std::process::id());
    let script = format!("sleep {marker}");
    let (lease_id, _) = enqueue(
        &state,
        Spec {
            script: &script,
            ..Default::default()
        },
    );
    wait_for(|| running_with(&format!("sleep {marker}"))).await;
    state.abandon.lock().unwrap().insert(lease_id);
    wait_for(|| !running_with(&format!("sleep {marker}"))).await;
    wait_for_async(|| async {
        http_get(worker.http, "/metrics")
            .await
            .1
            .contains(r#"outcome="abandoned"} 1"#)
    })
    .await;
    assert!(state.completed.lock().unwrap().is_empty());
    worker.drain().await.unwrap();
}

#[tokio::test]
async fn drain_finishes_running_actions_and_reports_them() {
    let server = FakeServer::start().await;
    let state = server.state.clone();
    let mut worker = start_worker(&server, &[]).await;
    assert_eq!(http_get(worker.http, "/readyz").await.0, 200);
    let (lease_id, _) = enqueue(
        &state,
        Spec {
            script: "sleep 1; echo finished",
            ..Default::default()
        },
    );
    wait_for(|| !state.keep_alives.lock().unwrap().is_empty()).await;
    let _ = worker.drain.take().unwrap().send(());
    wait_for_async(|| async { http_get(worker.http, "/readyz").await.0 == 503 }).await;
    // Queued work is not taken while draining.
    enqueue(
        &state,
        Spec {
            script: "echo late",
            ..Default::default()
        },
    );
    tokio::time::timeout(WAIT, &mut worker.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let completed = state.completed.lock().unwrap().clone();
    assert_eq!(completed.len(), 1);
    assert_eq!(completed[0].0.lease_id, lease_id);
    assert_eq!(
        text(&state, &result_of(&completed[0].0).stdout_digest),
        "finished\n"
    );
    assert_eq!(state.queue.lock().unwrap().len(), 1);
    assert!(state.keep_alives.lock().unwrap().iter().any(|k| k.draining));
}

#[tokio::test]
async fn drain_timeout_kills_and_reports_an_error() {
    let server = FakeServer::start().await;
    let state = server.state.clone();
    let mut worker = start_worker(&server, &["--drain-timeout-secs=1"]).await;
    enqueue(
        &state,
        Spec {
            script: "echo started; sleep 100",
            ..Default::default()
        },
    );
    wait_for(|| !state.keep_alives.lock().unwrap().is_empty()).await;
    let begin = std::time::Instant::now();
    worker.drain().await.unwrap();
    assert!(begin.elapsed() < Duration::from_secs(10));
    let completed = state.completed.lock().unwrap().clone();
    let status = error_of(&completed[0].0);
    assert_eq!(status.code, tonic::Code::Unavailable as i32);
    assert!(status.message.contains("drain"), "{}", status.message);
}

#[tokio::test]
async fn results_survive_a_server_restart() {
    let mut server = FakeServer::start().await;
    let state = server.state.clone();
    let mut worker = start_worker(&server, &[]).await;
    let (lease_id, _) = enqueue(
        &state,
        Spec {
            script: "sleep 2; echo survived",
            ..Default::default()
        },
    );
    wait_for(|| !state.keep_alives.lock().unwrap().is_empty()).await;
    let addr = server.addr;
    server.stop().await;
    tokio::time::sleep(Duration::from_secs(3)).await; // the action ends while the server is down
    assert!(state.completed.lock().unwrap().is_empty());
    let _server = FakeServer::start_on(addr, state.clone()).await;
    let completed = state.wait_completed(1, WAIT).await;
    assert_eq!(completed[0].0.lease_id, lease_id);
    assert_eq!(
        text(&state, &result_of(&completed[0].0).stdout_digest),
        "survived\n"
    );
    // And new work is taken again.
    enqueue(
        &state,
        Spec {
            script: "echo again",
            ..Default::default()
        },
    );
    state.wait_completed(2, WAIT).await;
    worker.drain().await.unwrap();
}

async fn wait_for(mut check: impl FnMut() -> bool) {
    for _ in 0..300 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("condition not reached in 15 s");
}

async fn wait_for_async<F: std::future::Future<Output = bool>>(mut check: impl FnMut() -> F) {
    for _ in 0..300 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("condition not reached in 15 s");
}

/// Whether a live process has `marker` in its command line.
fn running_with(marker: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|entry| {
        let pid = entry.file_name();
        let Some(pid) = pid
            .to_str()
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        else {
            return false;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true);
        !zombie
            && String::from_utf8_lossy(&cmdline)
                .replace('\0', " ")
                .contains(marker)
    })
}

/// Issue 7: two workers with the default `--http-listen` on one host both
/// start (each on its own ephemeral port), and `--addr-file` names the port
/// each one serves.
#[tokio::test]
async fn two_workers_with_default_http_listen_share_a_host() {
    let server = FakeServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut workers = Vec::new();
    for i in 0..2 {
        let addr_file = dir.path().join(format!("worker-{i}.addr"));
        let argv = [
            "buildkube-worker".to_string(),
            format!("--server={}", server.endpoint()),
            format!(
                "--work-dir={}",
                dir.path().join(format!("work-{i}")).display()
            ),
            format!("--addr-file={}", addr_file.display()),
        ];
        let worker = Worker::start(WorkerArgs::parse_from(argv))
            .await
            .unwrap_or_else(|e| panic!("worker {i} with the default --http-listen: {e}"));
        let written = std::fs::read_to_string(&addr_file).unwrap();
        assert_eq!(written, format!("http={}\n", worker.http_addr()));
        assert!(worker.http_addr().ip().is_loopback());
        let (status, body) = http_get(worker.http_addr(), "/healthz").await;
        assert_eq!((status, body.as_str()), (200, "ok\n"));
        workers.push(worker);
    }
    assert_ne!(workers[0].http_addr(), workers[1].http_addr());
}

#[tokio::test]
async fn job_step_lease_without_a_kind_is_refused_naming_the_field() {
    let server = FakeServer::start().await;
    let mut worker = start_worker(&server, &["--run-steps"]).await;
    server.state.enqueue(Lease {
        lease_id: "step-lease".into(),
        operation_name: "operations/step".into(),
        attempt: 1,
        step: Some(buildkube_proto::worker::StepSpec {
            job_id: "job".into(),
            step_key: "build".into(),
            repository: "file:///nowhere".into(),
            commands: vec!["true".into()],
            ..Default::default()
        }),
        ..Default::default()
    });
    let completed = server
        .state
        .wait_completed(1, Duration::from_secs(20))
        .await;
    let error = error_of(&completed[0].0);
    assert_eq!(error.code, tonic::Code::InvalidArgument as i32);
    assert_eq!(error.message, "step.kind is neither PIPELINE nor COMMAND");
    worker.drain().await.unwrap();
}
