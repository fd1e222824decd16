//! Execution, the action cache and operations driven by a plain gRPC
//! client with bad inputs. The server runs as a real process; no worker
//! unless a test starts one.

use buildkube_proto::longrunning::{CancelOperationRequest, GetOperationRequest};
use buildkube_proto::reapi;
use buildkube_proto::rpc;
use buildkube_reapi::Digest;
use buildkube_tests::Server;
use bytes::Bytes;
use futures::StreamExt;
use prost::Message;
use tonic::Code;

use crate::reapi_client::{
    batch_read, execute, execute_rejected, get_action_result, last_operation, response_of,
    update_action_result, upload, upload_shell_action, Clients, INSTANCE,
};

fn directory(files: &[(&str, Digest)], dirs: &[(&str, Digest)]) -> reapi::Directory {
    reapi::Directory {
        files: files
            .iter()
            .map(|(n, d)| reapi::FileNode {
                name: n.to_string(),
                digest: Some(d.to_proto()),
                ..Default::default()
            })
            .collect(),
        directories: dirs
            .iter()
            .map(|(n, d)| reapi::DirectoryNode {
                name: n.to_string(),
                digest: Some(d.to_proto()),
            })
            .collect(),
        ..Default::default()
    }
}

/// Uploads an action whose input root references `input` (uploaded or not)
/// and whose command declares `outputs`; returns the action digest.
async fn action_with(
    c: &mut Clients,
    input: Option<&[u8]>,
    absent_input: Digest,
    outputs: &[&str],
) -> Digest {
    let leaf = directory(&[("absent.txt", absent_input)], &[]);
    let leaf_bytes = leaf.encode_to_vec();
    let root = directory(&[], &[("sub", Digest::of_bytes(&leaf_bytes))]);
    let root_bytes = root.encode_to_vec();
    let command = reapi::Command {
        arguments: vec!["true".into()],
        output_paths: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let command_bytes = command.encode_to_vec();
    let action = reapi::Action {
        command_digest: Some(Digest::of_bytes(&command_bytes).to_proto()),
        input_root_digest: Some(Digest::of_bytes(&root_bytes).to_proto()),
        ..Default::default()
    };
    let action_bytes = action.encode_to_vec();
    let mut blobs: Vec<&[u8]> = vec![&leaf_bytes, &root_bytes, &command_bytes, &action_bytes];
    if let Some(input) = input {
        blobs.push(input);
    }
    upload(c, &blobs).await;
    Digest::of_bytes(&action_bytes)
}

/// [`action_with`] its one input, `present`, uploaded.
pub(crate) async fn present_action(c: &mut Clients, outputs: &[&str]) -> Digest {
    let input = b"present";
    action_with(c, Some(input), Digest::of_bytes(input), outputs).await
}

fn precondition_failure(status: &tonic::Status) -> rpc::PreconditionFailure {
    let details =
        rpc::Status::decode(status.details()).expect("status details carry a google.rpc.Status");
    let any = details
        .details
        .iter()
        .find(|a| a.type_url.ends_with("google.rpc.PreconditionFailure"))
        .expect("a PreconditionFailure detail");
    rpc::PreconditionFailure::decode(any.value.as_slice()).unwrap()
}

#[tokio::test]
async fn execute_with_missing_inputs_lists_them_as_precondition_failures() {
    let server = Server::start().unwrap();
    let mut c = Clients::connect(&server, None);
    let absent = Digest::of_bytes(b"never uploaded");
    let action = action_with(&mut c, None, absent, &["out"]).await;
    let status = execute_rejected(&mut c, action).await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let failure = precondition_failure(&status);
    assert_eq!(failure.violations.len(), 1);
    assert_eq!(failure.violations[0].r#type, "MISSING");
    assert_eq!(
        failure.violations[0].subject,
        format!("blobs/{}/{}", absent.hash_hex(), absent.size())
    );

    // The action itself missing is reported the same way.
    let ghost = Digest::of_bytes(b"no such action");
    let status = execute_rejected(&mut c, ghost).await;
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(
        precondition_failure(&status).violations[0].subject,
        format!("blobs/{}/{}", ghost.hash_hex(), ghost.size())
    );
}

#[tokio::test]
async fn execute_rejects_output_paths_that_escape() {
    let server = Server::start().unwrap();
    let mut c = Clients::connect(&server, None);
    for bad in ["../escape", "/abs/path", "a/../../b"] {
        let action = present_action(&mut c, &[bad]).await;
        let status = execute_rejected(&mut c, action).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{bad}: {status:?}");
        assert!(status.message().contains(bad), "{}", status.message());
    }
}

#[tokio::test]
async fn action_cache_round_trip_and_missing_outputs_are_a_miss() {
    let server = Server::start().unwrap();
    let mut c = Clients::connect(&server, None);
    let action = Digest::of_bytes(b"some action");
    let stdout = b"hello stdout";
    upload(&mut c, &[stdout]).await;
    let gone = Digest::of_bytes(b"an output nobody uploaded");
    let result = |files: Vec<reapi::OutputFile>| reapi::ActionResult {
        stdout_digest: Some(Digest::of_bytes(stdout).to_proto()),
        output_files: files,
        ..Default::default()
    };

    assert_eq!(
        get_action_result(&mut c, action).await.unwrap_err().code(),
        Code::NotFound
    );
    update_action_result(&mut c, action, result(vec![]))
        .await
        .unwrap();
    assert_eq!(
        get_action_result(&mut c, action)
            .await
            .unwrap()
            .stdout_digest
            .unwrap()
            .size_bytes,
        stdout.len() as i64
    );

    let dangling = reapi::OutputFile {
        path: "out".into(),
        digest: Some(gone.to_proto()),
        ..Default::default()
    };
    update_action_result(&mut c, action, result(vec![dangling]))
        .await
        .unwrap();
    assert_eq!(
        get_action_result(&mut c, action).await.unwrap_err().code(),
        Code::NotFound
    );

    let bad = reapi::OutputFile {
        path: "out".into(),
        digest: Some(reapi::Digest {
            hash: "nope".into(),
            size_bytes: 1,
        }),
        ..Default::default()
    };
    let status = update_action_result(&mut c, action, result(vec![bad]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("output_files[0]"));
}

#[tokio::test]
async fn get_action_result_inlines_what_is_asked_within_its_budget() {
    let server = Server::start().unwrap();
    let mut c = Clients::connect(&server, None);
    let action = Digest::of_bytes(b"an action with outputs to inline");
    let (stdout, stderr, small) = (b"out".to_vec(), b"err".to_vec(), b"a small output".to_vec());
    // Larger than the whole inlining budget (1 MiB): always a digest.
    let large: Vec<u8> = (0..(1u32 << 20) + 1).map(|i| i as u8).collect();
    upload(&mut c, &[&stdout, &stderr, &small]).await;
    c.cas_client()
        .upload_blobs(vec![(Digest::of_bytes(&large), Bytes::from(large.clone()))])
        .await
        .unwrap();
    let file = |path: &str, data: &[u8]| reapi::OutputFile {
        path: path.into(),
        digest: Some(Digest::of_bytes(data).to_proto()),
        ..Default::default()
    };
    let stored = reapi::ActionResult {
        stdout_digest: Some(Digest::of_bytes(&stdout).to_proto()),
        stderr_digest: Some(Digest::of_bytes(&stderr).to_proto()),
        output_files: vec![
            file("small", &small),
            file("large", &large),
            file("unasked", &small),
        ],
        ..Default::default()
    };
    update_action_result(&mut c, action, stored.clone())
        .await
        .unwrap();

    // Not asked: nothing inlined.
    assert_eq!(get_action_result(&mut c, action).await.unwrap(), stored);

    let got =
        c.ac.get_action_result(reapi::GetActionResultRequest {
            instance_name: INSTANCE.into(),
            action_digest: Some(action.to_proto()),
            inline_stdout: true,
            inline_stderr: true,
            inline_output_files: vec!["small".into(), "large".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.stdout_raw, stdout);
    assert_eq!(got.stderr_raw, stderr);
    let contents: Vec<(&str, usize)> = got
        .output_files
        .iter()
        .map(|f| (f.path.as_str(), f.contents.len()))
        .collect();
    assert_eq!(
        contents,
        vec![("small", small.len()), ("large", 0), ("unasked", 0)]
    );
    assert_eq!(got.output_files[0].contents, small);
    // Digests stay, so a client can always fetch.
    assert_eq!(got.output_files[1].digest, stored.output_files[1].digest);
}

#[tokio::test]
async fn get_tree_pages_through_every_directory() {
    let server = Server::start().unwrap();
    let mut c = Clients::connect(&server, None);
    let file = Digest::of_bytes(b"f");
    let leaf1 = directory(&[("a", file)], &[]).encode_to_vec();
    let leaf2 = directory(&[("b", file)], &[]).encode_to_vec();
    let root = directory(
        &[],
        &[
            ("x", Digest::of_bytes(&leaf1)),
            ("y", Digest::of_bytes(&leaf2)),
        ],
    )
    .encode_to_vec();
    upload(&mut c, &[&leaf1, &leaf2, &root, b"f"]).await;
    let get_tree = |c: &mut Clients, token: &str| {
        let request = reapi::GetTreeRequest {
            instance_name: INSTANCE.into(),
            root_digest: Some(Digest::of_bytes(&root).to_proto()),
            page_size: 1,
            page_token: token.into(),
            ..Default::default()
        };
        let mut cas = c.cas.clone();
        async move {
            let mut stream = cas.get_tree(request).await?.into_inner();
            let mut pages = Vec::new();
            while let Some(page) = stream.next().await {
                pages.push(page?);
            }
            Ok::<_, tonic::Status>(pages)
        }
    };
    // One call streams every page, each naming where the next starts.
    let pages = get_tree(&mut c, "").await.unwrap();
    assert_eq!(pages.len(), 3);
    assert!(pages.iter().all(|p| p.directories.len() == 1));
    assert_eq!(pages[2].next_page_token, "");
    // A call resumed from a token streams the pages after it.
    let resumed = get_tree(&mut c, &pages[0].next_page_token).await.unwrap();
    assert_eq!(resumed, pages[1..].to_vec());
    // A token this server did not issue for this root is refused.
    for forged in [
        "1",
        "not a token",
        &pages[0].next_page_token.replace('-', "+"),
    ] {
        let status = get_tree(&mut c, forged).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{forged}: {status:?}");
    }
    let absent = Digest::of_bytes(b"no tree");
    let status = c
        .cas
        .get_tree(reapi::GetTreeRequest {
            instance_name: INSTANCE.into(),
            root_digest: Some(absent.to_proto()),
            ..Default::default()
        })
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test]
async fn operations_get_cancel_and_unknown_names() {
    let server = Server::start().unwrap();
    let mut c = Clients::connect(&server, None);
    let action = present_action(&mut c, &["out"]).await;
    // No worker runs here: the operation stays queued until cancelled.
    let mut stream = execute(&mut c, action).await;
    let first = stream.next().await.unwrap().unwrap();
    assert!(!first.done);
    let meta =
        reapi::ExecuteOperationMetadata::decode(first.metadata.unwrap().value.as_slice()).unwrap();
    assert_eq!(meta.stage, reapi::execution_stage::Value::Queued as i32);
    assert_eq!(meta.action_digest.unwrap(), action.to_proto());

    let got = c
        .ops
        .get_operation(GetOperationRequest {
            name: first.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.name, first.name);
    c.ops
        .cancel_operation(CancelOperationRequest {
            name: first.name.clone(),
        })
        .await
        .unwrap();
    let last = stream.next().await.unwrap().unwrap();
    assert!(last.done);
    let response = response_of(&last);
    assert_eq!(response.status.unwrap().code, Code::Cancelled as i32);
    assert!(
        stream.next().await.is_none(),
        "stream ends after the final operation"
    );

    for status in [
        c.ops
            .get_operation(GetOperationRequest {
                name: "operations/nope".into(),
            })
            .await
            .unwrap_err(),
        c.ops
            .cancel_operation(CancelOperationRequest {
                name: "operations/nope".into(),
            })
            .await
            .unwrap_err(),
        c.exec
            .wait_execution(reapi::WaitExecutionRequest {
                name: "operations/nope".into(),
            })
            .await
            .map(|_| ())
            .unwrap_err(),
    ] {
        assert_eq!(status.code(), Code::NotFound);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn executed_action_returns_output_and_leaves_a_timeline() {
    let server = Server::start().unwrap();
    let _worker = buildkube_tests::Worker::start(&server).unwrap();
    let mut c = Clients::connect(&server, None);
    let action = upload_shell_action(
        &mut c,
        "echo hello from the farm; mkdir -p out; printf x > out/file",
        &["out/file"],
        reapi::Action::default(),
    )
    .await;
    let last = last_operation(execute(&mut c, action).await).await;
    let response = response_of(&last);
    let result = response.result.unwrap();
    assert_eq!(result.exit_code, 0);
    assert!(!response.cached_result);
    assert_eq!(result.output_files.len(), 1);
    assert_eq!(
        result.output_files[0].digest.as_ref().unwrap(),
        &Digest::of_bytes(b"x").to_proto()
    );
    let stdout = Digest::from_field(result.stdout_digest.as_ref()).unwrap();
    let blob = batch_read(&mut c, &[stdout]).await.unwrap();
    assert_eq!(blob.responses[0].data.as_ref(), b"hello from the farm\n");
    let metadata = result.execution_metadata.unwrap();
    assert!(
        metadata.queued_timestamp.is_some() && metadata.execution_completed_timestamp.is_some()
    );

    let id = last.name.strip_prefix("main/operations/").unwrap();
    let timeline = server.http_get(&format!("/operations/{id}")).unwrap();
    assert_eq!(timeline.status, 200, "{}", timeline.body);
    let mut at = 0;
    for event in [
        "queued",
        "assigned",
        "inputs_fetched",
        "executed",
        "outputs_uploaded",
        "completed",
    ] {
        let found = timeline.body[at..]
            .find(&format!("\"{event}\""))
            .unwrap_or_else(|| panic!("no {event} after offset {at} in {}", timeline.body));
        at += found;
    }

    // The same action again is answered from the action cache.
    let op = execute(&mut c, action).await.next().await.unwrap().unwrap();
    assert!(response_of(&op).cached_result);
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_ends_open_streams_with_unavailable() {
    let mut server = Server::start().unwrap();
    let mut c = Clients::connect(&server, None);
    let action = present_action(&mut c, &["out"]).await;
    // No worker: the operation stays queued and the stream stays open.
    let mut stream = execute(&mut c, action).await;
    assert!(!stream.next().await.unwrap().unwrap().done);
    let status = tokio::task::spawn_blocking(move || server.terminate())
        .await
        .unwrap()
        .unwrap();
    assert!(
        status.success(),
        "the server exits cleanly on SIGTERM with a stream open: {status:?}"
    );
    let end = stream.next().await.unwrap().unwrap_err();
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
}
