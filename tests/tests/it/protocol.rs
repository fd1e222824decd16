//! The REAPI surface driven by a plain gRPC client with every bad input we
//! could think of. The server runs as a real process; no worker is needed.

use buildkube_proto::bytestream::{ReadRequest, WriteRequest};
use buildkube_proto::longrunning::{CancelOperationRequest, GetOperationRequest};
use buildkube_proto::reapi::{self, batch_update_blobs_request};
use buildkube_proto::rpc;
use buildkube_reapi::Digest;
use buildkube_tests::Server;
use bytes::Bytes;
use futures::StreamExt;
use prost::Message;
use tonic::Code;

use crate::reapi_client::{
    batch_read, blob_resource, capabilities, execute, execute_rejected, get_action_result,
    last_operation, missing, query_write_status, read, read_range_rejected, read_rejected,
    response_of, update_action_result, upload, upload_request, upload_resource,
    upload_shell_action, write, Clients, INSTANCE,
};

#[tokio::test]
async fn capabilities_describe_what_is_supported() {
    let server = Server::start().unwrap();
    let mut c = Clients::connect(&server, None);
    let caps = capabilities(&mut c).await;
    let cache = caps.cache_capabilities.unwrap();
    assert_eq!(
        cache.digest_functions,
        vec![reapi::digest_function::Value::Sha256 as i32]
    );
    assert!(
        cache
            .action_cache_update_capabilities
            .unwrap()
            .update_enabled
    );
    assert!(cache.max_batch_total_size_bytes > 0);
    let exec = caps.execution_capabilities.unwrap();
    assert!(exec.exec_enabled);
    assert_eq!(
        exec.digest_function,
        reapi::digest_function::Value::Sha256 as i32
    );
    assert_eq!(caps.high_api_version.unwrap().major, 2);
}

#[tokio::test]
async fn unknown_instance_is_a_clear_error_everywhere() {
    let server = Server::start().unwrap();
    let mut c = Clients::connect(&server, None);
    let d = Digest::of_bytes(b"x");
    let checks: Vec<tonic::Status> = vec![
        c.caps
            .get_capabilities(reapi::GetCapabilitiesRequest {
                instance_name: "nope".into(),
            })
            .await
            .unwrap_err(),
        c.cas
            .find_missing_blobs(reapi::FindMissingBlobsRequest {
                instance_name: "nope".into(),
                blob_digests: vec![d.to_proto()],
                ..Default::default()
            })
            .await
            .unwrap_err(),
        c.ac.get_action_result(reapi::GetActionResultRequest {
            instance_name: "nope".into(),
            action_digest: Some(d.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap_err(),
        c.exec
            .execute(reapi::ExecuteRequest {
                instance_name: "nope".into(),
                action_digest: Some(d.to_proto()),
                ..Default::default()
            })
            .await
            .map(|_| ())
            .unwrap_err(),
        read_rejected(&mut c, &format!("nope/blobs/{}/1", d.hash_hex())).await,
    ];
    for status in checks {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("\"nope\"") && status.message().contains("\"main\""),
            "{}",
            status.message()
        );
    }
}

#[tokio::test]
async fn empty_blob_always_exists() {
    let server = Server::start().unwrap();
    let mut c = Clients::connect(&server, None);
    assert!(missing(&mut c, &[Digest::EMPTY]).await.is_empty());
    let read_back = batch_read(&mut c, &[Digest::EMPTY]).await.unwrap();
    assert_eq!(read_back.responses[0].status.as_ref().unwrap().code, 0);
    let data = read(
        &mut c,
        ReadRequest {
            resource_name: blob_resource(Digest::EMPTY),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(data.len(), 0);
}

#[tokio::test]
async fn batch_upload_with_wrong_hash_or_size_stores_nothing() {
    let server = Server::start().unwrap();
    let mut c = Clients::connect(&server, None);
    let claimed = Digest::of_bytes(b"the real content");
    let wrong_size = Digest::of_bytes(b"sized");
    let good = Digest::of_bytes(b"good");
    let response = c
        .cas
        .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
            instance_name: INSTANCE.into(),
            requests: vec![
                upload_request(claimed, b"not the real content"),
                upload_request(wrong_size, b"size"),
                upload_request(good, b"good"),
                batch_update_blobs_request::Request {
                    digest: Some(reapi::Digest {
                        hash: "XYZ".into(),
                        size_bytes: 1,
                    }),
                    data: Bytes::from_static(b"x"),
                    ..Default::default()
                },
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<i32> = response
        .responses
        .iter()
        .map(|r| r.status.as_ref().unwrap().code)
        .collect();
    assert_eq!(
        codes,
        vec![
            Code::InvalidArgument as i32,
            Code::InvalidArgument as i32,
            0,
            Code::InvalidArgument as i32
        ]
    );
    assert!(response.responses[0]
        .status
        .as_ref()
        .unwrap()
        .message
        .contains(&claimed.hash_hex()));
    let still_missing = missing(&mut c, &[claimed, wrong_size, good]).await;
    assert_eq!(
        still_missing,
        vec![claimed.to_proto(), wrong_size.to_proto()]
    );
}

#[tokio::test]
async fn oversized_batches_are_rejected_whole() {
    let server = Server::start().unwrap();
    let mut c = Clients::connect(&server, None);
    let big = vec![7u8; 3 << 20];
    let big2 = vec![8u8; 3 << 20];
    let (d1, d2) = (Digest::of_bytes(&big), Digest::of_bytes(&big2));
    let status = c
        .cas
        .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
            instance_name: INSTANCE.into(),
            requests: vec![upload_request(d1, &big), upload_request(d2, &big2)],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("max_batch_total_size_bytes"));
    assert_eq!(missing(&mut c, &[d1, d2]).await.len(), 2);
    let status = batch_read(&mut c, &[d1, d2]).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn bad_digests_are_invalid_arguments() {
    let server = Server::start().unwrap();
    let mut c = Clients::connect(&server, None);
    let good = Digest::of_bytes(b"x");
    for bad in [
        reapi::Digest {
            hash: good.hash_hex(),
            size_bytes: -1,
        },
        reapi::Digest {
            hash: good.hash_hex().to_uppercase(),
            size_bytes: 1,
        },
        reapi::Digest {
            hash: "abc".into(),
            size_bytes: 1,
        },
    ] {
        let status = c
            .cas
            .find_missing_blobs(reapi::FindMissingBlobsRequest {
                instance_name: INSTANCE.into(),
                blob_digests: vec![bad.clone()],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}");
        assert!(
            status.message().contains("blob_digests[0]"),
            "{}",
            status.message()
        );
    }
    let status =
        c.ac.get_action_result(reapi::GetActionResultRequest {
            instance_name: INSTANCE.into(),
            action_digest: None,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("action_digest"));
}

#[tokio::test]
async fn malformed_resource_names_are_rejected() {
    let server = Server::start().unwrap();
    let mut c = Clients::connect(&server, None);
    let d = Digest::of_bytes(b"hello");
    let hash = d.hash_hex();
    for name in [
        String::new(),
        "main".into(),
        format!("main/blobs/{hash}"),
        format!("main/blobs/{hash}/five"),
        format!("main/blobs/{hash}/-5"),
        "main/blobs/NOTAHASH/5".to_string(),
        format!("main//blobs/{hash}/5"),
    ] {
        let status = read_rejected(&mut c, &name).await;
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "read {name:?}: {status:?}"
        );
    }
    let status = read_rejected(&mut c, &format!("main/compressed-blobs/brotli/{hash}/5")).await;
    assert_eq!(status.code(), Code::Unimplemented);
    for name in [
        format!("main/blobs/{hash}/5"),
        format!("main/uploads/blobs/{hash}/5"),
        format!("main/uploads/u1/blobs/{hash}"),
    ] {
        let status = write(&mut c, &name, &[(0, b"hello", true)])
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "write {name:?}: {status:?}"
        );
    }
    assert!(missing(&mut c, &[d]).await.len() == 1);
}

#[tokio::test]
async fn bytestream_write_read_offsets_and_resume() {
    let server = Server::start().unwrap();
    let mut c = Clients::connect(&server, None);
    let data: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let d = Digest::of_bytes(&data);
    let name = upload_resource("0b5e1a1e-0000-4000-8000-000000000001", d);

    // First half, then the client goes away.
    let half = data.len() / 2;
    let _ = write(&mut c, &name, &[(0, &data[..half], false)]).await;
    let status = query_write_status(&mut c, &name).await.unwrap();
    assert_eq!(
        (status.committed_size, status.complete),
        (half as i64, false)
    );
    assert_eq!(
        missing(&mut c, &[d]).await.len(),
        1,
        "a partial blob must not be visible"
    );

    // A write at the wrong offset fails.
    let err = write(&mut c, &name, &[(half as i64 + 1, &data[half + 1..], true)])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Start over from the beginning and finish.
    let response = write(
        &mut c,
        &name,
        &[
            (0, &data[..half], false),
            (half as i64, &data[half..], true),
        ],
    )
    .await
    .unwrap();
    assert_eq!(response.committed_size, d.size() as i64);
    let status = query_write_status(&mut c, &name).await.unwrap();
    assert!(status.complete);

    let range = |offset: i64, limit: i64| ReadRequest {
        resource_name: blob_resource(d),
        read_offset: offset,
        read_limit: limit,
    };
    let got = read(&mut c, range(100, 1000)).await;
    assert_eq!(got, &data[100..1100]);
    let err = read_range_rejected(&mut c, range(d.size() as i64 + 1, 0)).await;
    assert_eq!(err.code(), Code::OutOfRange);
    let err = read_range_rejected(&mut c, range(0, -1)).await;
    assert_eq!(err.code(), Code::InvalidArgument);
    let absent = Digest::of_bytes(b"absent");
    let err = read_rejected(&mut c, &blob_resource(absent)).await;
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn bytestream_write_with_wrong_content_stores_nothing() {
    let server = Server::start().unwrap();
    let mut c = Clients::connect(&server, None);
    let d = Digest::of_bytes(b"expected content");
    let name = format!("uploads/u2/blobs/{}/{}", d.hash_hex(), d.size());
    let err = write(&mut c, &name, &[(0, b"unexpected conte", true)])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // The empty instance name is not served by this server (only "main").
    assert!(err.message().contains("instance"), "{}", err.message());
    let name = upload_resource("u2", d);
    let err = write(&mut c, &name, &[(0, b"unexpected conte", true)])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("does not match"),
        "{}",
        err.message()
    );
    let err = write(&mut c, &name, &[(0, b"expected content and more", true)])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(missing(&mut c, &[d]).await.len(), 1);
}

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
async fn present_action(c: &mut Clients, outputs: &[&str]) -> Digest {
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

#[tokio::test(flavor = "multi_thread")]
async fn server_killed_mid_upload_keeps_stored_data_and_shows_no_partial_blob() {
    let mut server = Server::start().unwrap();
    let mut c = Clients::connect(&server, None);
    let stored = b"stored before the crash";
    upload(&mut c, &[stored]).await;
    let action = Digest::of_bytes(b"action before the crash");
    let result = reapi::ActionResult {
        stdout_digest: Some(Digest::of_bytes(stored).to_proto()),
        exit_code: 0,
        ..Default::default()
    };
    update_action_result(&mut c, action, result.clone())
        .await
        .unwrap();

    // Half of a 2 MiB upload is on the server when it is SIGKILLed.
    let big: Vec<u8> = (0..(2u32 << 20)).map(|i| (i % 251) as u8).collect();
    let big_digest = Digest::of_bytes(&big);
    let name = upload_resource("crash", big_digest);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut writer = c.bytestream.clone();
    let upload_call = tokio::spawn(async move {
        writer
            .write(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    tx.send(WriteRequest {
        resource_name: name.clone(),
        write_offset: 0,
        finish_write: false,
        data: Bytes::copy_from_slice(&big[..1 << 20]),
    })
    .await
    .unwrap();
    loop {
        match query_write_status(&mut c, &name).await {
            Ok(status) if status.committed_size == 1 << 20 => break,
            _ => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
    let data_dir = server.data_dir().to_path_buf();
    let restarted = tokio::task::spawn_blocking(move || {
        server.kill_and_restart().unwrap();
        server
    })
    .await
    .unwrap();
    upload_call.abort();
    drop(tx);
    let tmp = data_dir.join("cas").join("tmp");
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "no temp file survives a restart"
    );
    let mut c = Clients::connect(&restarted, None);
    assert_eq!(
        missing(&mut c, &[Digest::of_bytes(stored), big_digest]).await,
        vec![big_digest.to_proto()]
    );
    let got = get_action_result(&mut c, action).await.unwrap();
    assert_eq!(got, result);
    // The interrupted upload is gone; it starts over and completes.
    let status = query_write_status(&mut c, &name).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    write(
        &mut c,
        &name,
        &[
            (0, &big[..1 << 20], false),
            (1 << 20, &big[1 << 20..], true),
        ],
    )
    .await
    .unwrap();
    assert!(missing(&mut c, &[big_digest]).await.is_empty());
}

/// A 1 MiB tmpfs for a server's data dir: a disk that fills up. Needs mount
/// rights (root with CAP_SYS_ADMIN, as on CI); skipped loudly otherwise.
struct TinyDisk(std::path::PathBuf);

impl TinyDisk {
    fn mount(path: &std::path::Path) -> Option<TinyDisk> {
        std::fs::create_dir_all(path).ok()?;
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(path)
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        status.success().then(|| TinyDisk(path.to_path_buf()))
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn full_disk_is_resource_exhausted_and_stores_nothing_partial() {
    let scratch = tempfile::tempdir().unwrap();
    let Some(disk) = TinyDisk::mount(&scratch.path().join("disk")) else {
        eprintln!(
            "SKIPPED full_disk test: cannot mount a tmpfs here (needs root with mount rights)"
        );
        return;
    };
    let data_dir = disk.0.join("data");
    let server = Server::start_with(|args| args.data_dir = data_dir.clone()).unwrap();
    let mut c = Clients::connect(&server, None);
    let big: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 253) as u8).collect();
    let d = Digest::of_bytes(&big);
    let name = upload_resource("full", d);
    let chunks: Vec<(i64, &[u8], bool)> = big
        .chunks(64 * 1024)
        .enumerate()
        .map(|(i, chunk)| {
            (
                (i * 64 * 1024) as i64,
                chunk,
                (i + 1) * 64 * 1024 >= big.len(),
            )
        })
        .collect();
    let status = write(&mut c, &name, &chunks).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("No space left"),
        "{}",
        status.message()
    );
    assert_eq!(missing(&mut c, &[d]).await, vec![d.to_proto()]);
    // The failed upload's temp file is gone, so small blobs still fit.
    upload(&mut c, &[b"still room for this"]).await;
    drop(server);
}

/// The gauges the autoscalers read are exact: queued actions counted once,
/// cancelled ones gone, finished ones neither queued nor running.
#[tokio::test(flavor = "multi_thread")]
async fn queue_and_worker_metrics_are_exact() {
    let server = Server::start().unwrap();
    let mut c = Clients::connect(&server, None);
    let metric = |name: &str| server.metric(name).unwrap().unwrap_or(-1.0);
    let mut streams = Vec::new();
    for output in ["out1", "out2", "out3"] {
        let action = present_action(&mut c, &[output]).await;
        let mut stream = execute(&mut c, action).await;
        let first = stream.next().await.unwrap().unwrap();
        streams.push((first.name, stream));
    }
    // The same action again merges: still three.
    let again = present_action(&mut c, &["out1"]).await;
    let mut merged = execute(&mut c, again).await;
    assert_eq!(merged.next().await.unwrap().unwrap().name, streams[0].0);
    assert_eq!(metric(buildkube_config::METRIC_QUEUE_DEPTH), 3.0);
    assert_eq!(metric(buildkube_config::METRIC_ACTIONS_RUNNING), 0.0);
    assert_eq!(metric(buildkube_config::METRIC_WORKERS_CONNECTED), 0.0);

    c.ops
        .cancel_operation(CancelOperationRequest {
            name: streams[2].0.clone(),
        })
        .await
        .unwrap();
    assert_eq!(metric(buildkube_config::METRIC_QUEUE_DEPTH), 2.0);

    let _worker = buildkube_tests::Worker::start(&server).unwrap();
    for (_, stream) in streams.drain(..2) {
        let response = response_of(&last_operation(stream).await);
        let result = response.result.as_ref();
        assert_eq!(result.map(|r| r.exit_code), Some(0), "{response:?}");
    }
    assert_eq!(metric(buildkube_config::METRIC_QUEUE_DEPTH), 0.0);
    assert_eq!(metric(buildkube_config::METRIC_ACTIONS_RUNNING), 0.0);
    assert_eq!(metric(buildkube_config::METRIC_WORKERS_CONNECTED), 1.0);
    assert_eq!(metric(buildkube_config::METRIC_WORKERS_BUSY), 0.0);
    let body = server
        .metrics_get(buildkube_config::METRICS_PATH)
        .unwrap()
        .body;
    assert!(
        body.contains("buildkube_actions_total{outcome=\"success\"} 2"),
        "{body}"
    );
    assert!(
        body.contains("buildkube_actions_total{outcome=\"cancelled\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("buildkube_workers_connected{instance=\"main\",platform=\""),
        "{body}"
    );
}
