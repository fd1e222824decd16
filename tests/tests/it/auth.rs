//! Identities, scopes and lease holders (issue 8, "Why" 1, 2, 3, 10 and 11):
//! a server with `--auth-config` (see `buildkube_tests::auth`) probed with
//! each credential as an attacker would.

use std::time::Duration;

use buildkube_config::auth::{ClientCredential, Scope};
use buildkube_proto::longrunning::{
    CancelOperationRequest, GetOperationRequest, ListOperationsRequest, WaitOperationRequest,
};
use buildkube_proto::reapi;
use buildkube_proto::worker::worker_service_client::WorkerServiceClient;
use buildkube_proto::worker::{
    complete_request, CompleteRequest, KeepAliveRequest, Lease, LeaseProgress, LeaseRequest,
    WorkerInfo,
};
use buildkube_reapi::{connect_channel, AuthChannel};
use buildkube_tests::auth::{CI_TOKEN, DEV_TOKEN, WORKER_TOKEN};
use buildkube_tests::{Server, TestCredentials};
use futures::StreamExt;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::reapi_client::{
    execute, get_action_result, last_operation, response_of, update_action_result,
    upload_shell_action, Clients, INSTANCE,
};

const WAIT: Duration = Duration::from_secs(30);

fn auth_server(credentials: &TestCredentials, instances: &[&str]) -> Server {
    let config = credentials.config_path();
    Server::start_with(|args| {
        args.auth_config = Some(config);
        args.instances = instances.iter().map(|i| i.to_string()).collect();
    })
    .unwrap()
}

fn worker_client(server: &Server, token: Option<&str>) -> WorkerServiceClient<AuthChannel> {
    WorkerServiceClient::new(
        connect_channel(&server.worker_endpoint(), token, &Default::default()).unwrap(),
    )
}

fn worker_info(id: &str) -> Option<WorkerInfo> {
    Some(WorkerInfo {
        worker_id: id.into(),
        instance_name: INSTANCE.into(),
        platform: None,
        concurrency: 1,
        runs_steps: false,
    })
}

async fn take_lease(
    w: &mut WorkerServiceClient<AuthChannel>,
    id: &str,
) -> Result<Lease, tonic::Status> {
    let response = w
        .lease(LeaseRequest {
            worker: worker_info(id),
            wait: Some(prost_types::Duration {
                seconds: 10,
                nanos: 0,
            }),
        })
        .await?;
    Ok(response.into_inner().lease.expect("a lease within 10 s"))
}

fn completion(id: &str, lease_id: &str, operation: &str, stdout: &'static [u8]) -> CompleteRequest {
    CompleteRequest {
        worker: worker_info(id),
        lease_id: lease_id.into(),
        operation_name: operation.into(),
        action_digest: None,
        outcome: Some(complete_request::Outcome::Result(reapi::ActionResult {
            exit_code: 0,
            stdout_raw: bytes::Bytes::from_static(stdout),
            ..Default::default()
        })),
        message: String::new(),
    }
}

fn keep_alive(id: &str, lease_id: &str) -> KeepAliveRequest {
    KeepAliveRequest {
        worker: worker_info(id),
        leases: vec![LeaseProgress {
            lease_id: lease_id.into(),
            stage: 2,
            since: None,
        }],
        draining: false,
    }
}

/// Why 1: a client token worked as a worker token. Now the worker protocol
/// takes only worker credentials, and a worker credential reaches nothing
/// but the worker protocol and the CAS.
#[tokio::test]
async fn issue_8_client_and_worker_credentials_are_kept_apart() {
    let credentials = TestCredentials::new().unwrap();
    let server = auth_server(&credentials, &[INSTANCE]);

    for token in [CI_TOKEN, DEV_TOKEN] {
        let mut as_worker = worker_client(&server, Some(token));
        let status = take_lease(&mut as_worker, "thief").await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains("worker protocol"), "{status:?}");
        let status = as_worker
            .complete(completion("thief", "any", "main/operations/x", b"fake"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    }
    let status = take_lease(&mut worker_client(&server, None), "anon")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    let mut ci = Clients::connect(&server, Some(CI_TOKEN));
    let action = upload_shell_action(&mut ci, "echo hi", &[], reapi::Action::default()).await;
    let mut worker = Clients::connect(&server, Some(WORKER_TOKEN));
    // The CAS is open to workers (they fetch inputs and upload outputs)...
    assert!(crate::reapi_client::missing(&mut worker, &[action])
        .await
        .is_empty());
    // ...nothing else is.
    let denied = [
        worker
            .exec
            .execute(reapi::ExecuteRequest {
                instance_name: INSTANCE.into(),
                action_digest: Some(action.to_proto()),
                ..Default::default()
            })
            .await
            .map(|_| ())
            .unwrap_err(),
        update_action_result(&mut worker, action, reapi::ActionResult::default())
            .await
            .unwrap_err(),
        get_action_result(&mut worker, action).await.unwrap_err(),
        worker
            .ops
            .get_operation(GetOperationRequest {
                name: "main/operations/x".into(),
            })
            .await
            .unwrap_err(),
    ];
    for status in denied {
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    }
    let status =
        crate::reapi_client::capabilities_result(&mut Clients::connect(&server, Some("guess")))
            .await
            .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

/// Why 2: `Complete` with a made-up lease id was accepted and the real
/// result dropped; a known lease was never checked against its holder.
/// Without auth too, only the holder may keep a lease alive or complete it.
#[tokio::test]
async fn issue_8_only_the_lease_holder_completes_it() {
    let server = Server::start().unwrap();
    let mut c = Clients::connect(&server, None);
    let action = upload_shell_action(&mut c, "echo real", &[], reapi::Action::default()).await;
    let stream = execute(&mut c, action).await;
    let mut real = worker_client(&server, None);
    let lease = take_lease(&mut real, "real-worker").await.unwrap();
    let operation = lease.operation_name.clone();
    assert!(operation.starts_with("main/operations/"), "{operation}");

    let mut attacker = worker_client(&server, None);
    for request in [
        completion(
            "attacker",
            "00000000-0000-4000-8000-000000000000",
            &operation,
            b"fake",
        ),
        completion("real-worker", "made-up", &operation, b"fake"),
        completion("attacker", &lease.lease_id, &operation, b"fake"),
    ] {
        let status = attacker.complete(request).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    }
    let status = attacker
        .keep_alive(keep_alive("attacker", &lease.lease_id))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(server
        .logs()
        .tail(50)
        .contains("refused: not the lease holder"));

    // The holder is unaffected: its keep-alive and its result go through.
    let abandon = real
        .keep_alive(keep_alive("real-worker", &lease.lease_id))
        .await
        .unwrap()
        .into_inner()
        .abandon_lease_ids;
    assert!(abandon.is_empty(), "{abandon:?}");
    let accepted = real
        .complete(completion(
            "real-worker",
            &lease.lease_id,
            &operation,
            b"real\n",
        ))
        .await
        .unwrap()
        .into_inner()
        .accepted;
    assert!(accepted);
    let response = response_of(&last_operation(stream).await);
    assert_eq!(response.result.unwrap().stdout_raw.as_ref(), b"real\n");
    // The server wrote the action cache from the holder's result.
    let cached = get_action_result(&mut c, action).await.unwrap();
    assert_eq!(cached.stdout_raw.as_ref(), b"real\n");
}

/// Why 3: any client wrote the action cache. Writing it is now the scope
/// `write-ac`; scopes hold per instance.
#[tokio::test]
async fn issue_8_writing_the_action_cache_needs_write_ac() {
    let credentials = TestCredentials::new().unwrap();
    let server = auth_server(&credentials, &[INSTANCE, "other"]);
    let mut dev = Clients::connect(&server, Some(DEV_TOKEN));
    let action = upload_shell_action(&mut dev, "echo victim", &[], reapi::Action::default()).await;
    let forged = reapi::ActionResult {
        stdout_raw: bytes::Bytes::from_static(b"forged"),
        ..Default::default()
    };
    let status = update_action_result(&mut dev, action, forged.clone())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("write-ac"), "{status:?}");
    let caps = crate::reapi_client::capabilities(&mut dev).await;
    assert!(
        !caps
            .cache_capabilities
            .unwrap()
            .action_cache_update_capabilities
            .unwrap()
            .update_enabled,
        "Capabilities tell a client without write-ac not to update"
    );

    let mut ci = Clients::connect(&server, Some(CI_TOKEN));
    update_action_result(&mut ci, action, forged).await.unwrap();
    // The CI client is scoped to `main`: on `other` it may do nothing.
    let status = ci
        .cas
        .find_missing_blobs(reapi::FindMissingBlobsRequest {
            instance_name: "other".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("\"other\""), "{status:?}");
    let status = ci
        .ac
        .get_action_result(reapi::GetActionResultRequest {
            instance_name: "other".into(),
            action_digest: Some(action.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
}

/// Why 11: Get/Wait/CancelOperation ignored instances. Operation names now
/// carry theirs, and the caller's scope on it is checked.
#[tokio::test]
async fn issue_8_operations_of_another_instance_are_out_of_reach() {
    let credentials = TestCredentials::new().unwrap();
    let server = auth_server(&credentials, &[INSTANCE, "other"]);
    let mut dev = Clients::connect(&server, Some(DEV_TOKEN));
    let action = upload_shell_action(&mut dev, "echo other", &[], reapi::Action::default()).await;
    // No worker serves `other`: the operation stays queued.
    let mut stream = dev
        .exec
        .execute(reapi::ExecuteRequest {
            instance_name: "other".into(),
            action_digest: Some(action.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let name = stream.next().await.unwrap().unwrap().name;
    assert!(name.starts_with("other/operations/"), "{name}");

    let mut ci = Clients::connect(&server, Some(CI_TOKEN));
    let denied = [
        ci.ops
            .get_operation(GetOperationRequest { name: name.clone() })
            .await
            .unwrap_err(),
        ci.ops
            .wait_operation(WaitOperationRequest {
                name: name.clone(),
                timeout: None,
            })
            .await
            .unwrap_err(),
        ci.ops
            .cancel_operation(CancelOperationRequest { name: name.clone() })
            .await
            .unwrap_err(),
        ci.exec
            .wait_execution(reapi::WaitExecutionRequest { name: name.clone() })
            .await
            .map(|_| ())
            .unwrap_err(),
    ];
    for status in denied {
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    }
    let listed = ci
        .ops
        .list_operations(ListOperationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.operations.iter().all(|op| op.name != name));
    let status = ci
        .ops
        .list_operations(ListOperationsRequest {
            name: "other/operations".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // Its own client still sees it, and it was not cancelled.
    let op = dev
        .ops
        .get_operation(GetOperationRequest { name: name.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(!op.done);
}

/// Why 10: an empty token file was accepted (an empty bearer then worked).
#[test]
fn issue_8_empty_token_file_is_refused_at_start() {
    let credentials = TestCredentials::new().unwrap();
    let empty = credentials.dir().join("empty-token");
    std::fs::write(&empty, " \n").unwrap();
    let mut config = credentials.config.clone();
    config.clients.push(ClientCredential {
        name: None,
        token_file: empty.clone(),
        instances: None,
        scopes: [Scope::Read].into(),
    });
    credentials.write_config(&config).unwrap();
    let err =
        Server::start_with(|args| args.auth_config = Some(credentials.config_path())).unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains(&empty.display().to_string()) && text.contains("empty"),
        "{text}"
    );
}

/// Why 10: `/operations` needed no token (and listed the names `Complete`
/// wanted). Now it needs a client credential with `read`; probes stay open.
#[test]
fn issue_8_operation_pages_need_a_read_token() {
    let credentials = TestCredentials::new().unwrap();
    let server = auth_server(&credentials, &[INSTANCE]);
    for path in [
        "/operations",
        "/operations/00000000-0000-4000-8000-000000000000",
    ] {
        assert_eq!(server.http_get(path).unwrap().status, 401, "{path}");
        assert_eq!(
            server.http_get_as(path, "guess").unwrap().status,
            401,
            "{path}"
        );
        assert_eq!(
            server.http_get_as(path, WORKER_TOKEN).unwrap().status,
            403,
            "{path}"
        );
    }
    let listed = server.http_get_as("/operations", DEV_TOKEN).unwrap();
    assert_eq!(listed.status, 200, "{}", listed.body);
    assert_eq!(server.http_get("/healthz").unwrap().status, 200);
    assert_eq!(server.http_get("/readyz").unwrap().status, 200);
}

/// gRPC health answers without a token (probes and load balancers carry
/// none), while the REAPI services beside it on the same listener refuse.
#[tokio::test]
async fn issue_8_grpc_health_answers_without_a_token() {
    let credentials = TestCredentials::new().unwrap();
    let server = auth_server(&credentials, &[INSTANCE]);
    let channel = connect_channel(&server.worker_endpoint(), None, &Default::default()).unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "build.bazel.remote.execution.v2.Execution"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("health of {service:?} without a token: {e:?}"))
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let refused = reapi::capabilities_client::CapabilitiesClient::new(channel)
        .get_capabilities(reapi::GetCapabilitiesRequest {
            instance_name: INSTANCE.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
}

/// Keys rotate without a restart: several tokens of one role are valid at
/// once, and a rewritten token file takes effect while the server runs.
#[tokio::test]
async fn issue_8_tokens_rotate_without_restart() {
    let credentials = TestCredentials::new().unwrap();
    let next = credentials.dir().join("dev-next");
    std::fs::write(&next, "dev-token-2\n").unwrap();
    let mut config = credentials.config.clone();
    let mut second = config.clients[1].clone();
    second.name = Some("dev-next".into());
    second.token_file = next.clone();
    config.clients.push(second);
    credentials.write_config(&config).unwrap();
    let server = auth_server(&credentials, &[INSTANCE]);
    for token in [DEV_TOKEN, "dev-token-2"] {
        let mut c = Clients::connect(&server, Some(token));
        crate::reapi_client::capabilities(&mut c).await;
    }

    std::fs::write(&next, "dev-token-3\n").unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let mut new = Clients::connect(&server, Some("dev-token-3"));
        if crate::reapi_client::capabilities_result(&mut new)
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "dev-token-3 never became valid"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut old = Clients::connect(&server, Some("dev-token-2"));
    let status = crate::reapi_client::capabilities_result(&mut old)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let mut still = Clients::connect(&server, Some(DEV_TOKEN));
    crate::reapi_client::capabilities(&mut still).await;
}

/// The one-command farm with auth: in-process workers authenticate with a
/// credential the server makes for them, and the server writes the action
/// cache from their results.
#[tokio::test]
async fn issue_8_local_workers_run_with_auth_on() {
    let credentials = TestCredentials::new().unwrap();
    let config = credentials.config_path();
    let server = Server::start_with(|args| {
        args.auth_config = Some(config);
        args.local_workers = 1;
    })
    .unwrap();
    let mut ci = Clients::connect(&server, Some(CI_TOKEN));
    let action = upload_shell_action(&mut ci, "echo local", &[], reapi::Action::default()).await;
    let response = response_of(&last_operation(execute(&mut ci, action).await).await);
    assert_eq!(response.status.unwrap_or_default().code, 0);
    let result = response.result.unwrap();
    assert_eq!(result.exit_code, 0);
    let cached = get_action_result(&mut ci, action).await.unwrap();
    assert_eq!(cached.stdout_digest, result.stdout_digest);
}
