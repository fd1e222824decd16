//! Operations survive a server restart (issue 7 item 3, issue 9 item 3):
//! the server process is SIGKILLed with one operation queued, one leased to
//! a worker and one just finished, and started again on the same data dir
//! (and, in the PostgreSQL variant, the same `records` database). The
//! client's WaitExecution finds the unfinished ones, the worker that kept
//! running completes its pre-restart lease, the queued one is leased and
//! runs, and WaitExecution on the finished one says it finished before the
//! restart (NOT_FOUND, so a client Executes again), instead of claiming
//! the name was never known.

use std::time::Duration;

use buildkube_config::storage::{StorageConfig, StoreConfig};
use buildkube_config::ServerArgs;
use buildkube_proto::longrunning::Operation;
use buildkube_proto::reapi::{self, execution_stage, WaitExecutionRequest};
use buildkube_proto::worker::worker_service_client::WorkerServiceClient;
use buildkube_proto::worker::{
    complete_request, CompleteRequest, KeepAliveRequest, Lease, LeaseProgress, LeaseRequest,
    WorkerInfo,
};
use buildkube_reapi::{connect_channel, AuthChannel, Digest};
use buildkube_tests::Server;
use futures::StreamExt;
use prost::Message;
use tonic::Code;

use crate::reapi_client::{last_operation, response_of, upload_shell_action, Clients};

/// An instance of this test run only: records of other runs sharing the
/// PostgreSQL database belong to other instances and are not restored.
fn run_instance() -> String {
    format!(
        "restart-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

struct FakeWorker {
    client: WorkerServiceClient<AuthChannel>,
    info: WorkerInfo,
}

impl FakeWorker {
    fn connect(server: &Server, id: &str, instance: &str) -> FakeWorker {
        FakeWorker {
            client: WorkerServiceClient::new(
                connect_channel(&server.worker_endpoint(), None, &Default::default()).unwrap(),
            ),
            info: WorkerInfo {
                worker_id: id.into(),
                instance_name: instance.into(),
                platform: None,
                concurrency: 1,
                runs_steps: false,
            },
        }
    }

    async fn lease(&mut self) -> Lease {
        let request = LeaseRequest {
            worker: Some(self.info.clone()),
            wait: Some(prost_types::Duration {
                seconds: 10,
                nanos: 0,
            }),
        };
        let response = self.client.lease(request).await.unwrap().into_inner();
        response.lease.expect("a lease within 10 s")
    }

    async fn keep_alive(&mut self, lease: &Lease) -> Vec<String> {
        let request = KeepAliveRequest {
            worker: Some(self.info.clone()),
            leases: vec![LeaseProgress {
                lease_id: lease.lease_id.clone(),
                stage: 2,
                since: None,
            }],
            draining: false,
        };
        let response = self.client.keep_alive(request).await.unwrap().into_inner();
        response.abandon_lease_ids
    }

    async fn complete(&mut self, lease: &Lease, stdout: &str) -> bool {
        let request = CompleteRequest {
            worker: Some(self.info.clone()),
            lease_id: lease.lease_id.clone(),
            operation_name: lease.operation_name.clone(),
            action_digest: lease.action_digest.clone(),
            outcome: Some(complete_request::Outcome::Result(reapi::ActionResult {
                exit_code: 0,
                stdout_raw: stdout.as_bytes().to_vec().into(),
                ..Default::default()
            })),
            message: String::new(),
        };
        self.client
            .complete(request)
            .await
            .unwrap()
            .into_inner()
            .accepted
    }
}

/// Executes `action` on `instance`; returns the operation's name once the
/// server has answered with it.
async fn execute_on(c: &mut Clients, instance: &str, action: Digest) -> String {
    let mut stream = c
        .exec
        .execute(reapi::ExecuteRequest {
            instance_name: instance.into(),
            action_digest: Some(action.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    // The stream is dropped here: the client is cut off, as Bazel is by a crash.
    first.name
}

async fn wait_execution(
    c: &mut Clients,
    name: &str,
) -> Result<tonic::Streaming<Operation>, tonic::Status> {
    c.exec
        .wait_execution(WaitExecutionRequest { name: name.into() })
        .await
        .map(|r| r.into_inner())
}

/// `text` without ANSI colour sequences (the server's log may be coloured).
fn without_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn stage_of(op: &Operation) -> execution_stage::Value {
    let metadata =
        reapi::ExecuteOperationMetadata::decode(op.metadata.as_ref().unwrap().value.as_slice())
            .unwrap();
    execution_stage::Value::try_from(metadata.stage).unwrap()
}

async fn operations_survive_a_server_kill(configure: impl FnOnce(&mut ServerArgs)) {
    let instance = run_instance();
    let served = instance.clone();
    let mut server = Server::start_with(|args| {
        args.instances = vec!["main".into(), served];
        configure(args);
    })
    .unwrap();
    let mut c = Clients::connect(&server, None);
    let action = |tag: &str| reapi::Action {
        salt: format!("{instance}-{tag}").into_bytes().into(),
        ..Default::default()
    };
    let finished_action =
        upload_shell_action(&mut c, "echo finished", &[], action("finished")).await;
    let running_action = upload_shell_action(&mut c, "echo running", &[], action("running")).await;
    let queued_action = upload_shell_action(&mut c, "echo queued", &[], action("queued")).await;

    let mut w1 = FakeWorker::connect(&server, "w1", &instance);
    let finished = execute_on(&mut c, &instance, finished_action).await;
    let lease = w1.lease().await;
    assert_eq!(lease.operation_name, finished);
    assert!(w1.complete(&lease, "finished").await);
    let running = execute_on(&mut c, &instance, running_action).await;
    let running_lease = w1.lease().await;
    assert_eq!(running_lease.operation_name, running);
    let queued = execute_on(&mut c, &instance, queued_action).await;

    server.kill_and_restart().unwrap();
    let logs = without_ansi(&server.logs().tail(200));
    assert!(
        logs.contains(
            "restored unfinished operations restored=2 queued=1 leased=1 finished_before_restart=1"
        ) || logs.contains("restored=2 queued=1 leased=1 finished_before_restart=1"),
        "the restarted server logs what it restored:\n{logs}"
    );

    let mut c = Clients::connect(&server, None);
    let mut running_stream = wait_execution(&mut c, &running).await.unwrap();
    let first = running_stream.next().await.unwrap().unwrap();
    assert_eq!(
        (first.done, stage_of(&first)),
        (false, execution_stage::Value::Executing)
    );
    let mut queued_stream = wait_execution(&mut c, &queued).await.unwrap();
    let first = queued_stream.next().await.unwrap().unwrap();
    assert_eq!(
        (first.done, stage_of(&first)),
        (false, execution_stage::Value::Queued)
    );
    let status = wait_execution(&mut c, &finished).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(
        status
            .message()
            .contains("finished before the server restarted"),
        "{}",
        status.message()
    );

    // The worker ran through the restart: its lease still holds.
    let mut w1 = FakeWorker::connect(&server, "w1", &instance);
    assert!(
        w1.keep_alive(&running_lease).await.is_empty(),
        "the restored lease was abandoned"
    );
    assert!(w1.complete(&running_lease, "ran through the restart").await);
    let done = last_operation(running_stream).await;
    let response = response_of(&done);
    assert_eq!(
        response.result.unwrap().stdout_raw,
        &b"ran through the restart"[..]
    );

    // The queued one runs now.
    let mut w2 = FakeWorker::connect(&server, "w2", &instance);
    let lease = tokio::time::timeout(Duration::from_secs(20), w2.lease())
        .await
        .expect("the queued operation is leased after the restart");
    assert_eq!(lease.operation_name, queued);
    assert!(w2.complete(&lease, "queued ran").await);
    let done = last_operation(queued_stream).await;
    assert_eq!(
        response_of(&done).result.unwrap().stdout_raw,
        &b"queued ran"[..]
    );
}

#[tokio::test]
async fn restart_on_the_same_data_dir_keeps_queued_and_running_operations() {
    operations_survive_a_server_kill(|_| {}).await;
}

/// Needs PostgreSQL (`eval "$(bash .ci/test-stores.sh)"`).
#[tokio::test]
async fn restart_with_postgres_records_keeps_queued_and_running_operations() {
    let dir = tempfile::tempdir().unwrap();
    let config = StorageConfig {
        records: crate::external_stores::postgres(),
        ..StorageConfig::embedded()
    };
    assert!(matches!(config.records, StoreConfig::Postgres(_)));
    let path = dir.path().join("storage.yaml");
    std::fs::write(&path, config.to_yaml()).unwrap();
    operations_survive_a_server_kill(move |args| args.storage_config = Some(path)).await;
}
