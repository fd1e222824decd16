//! Issue 8, finding 11: client mistakes are INVALID_ARGUMENT, named and
//! short. The server runs as a real process; no worker is needed (the
//! worker applies the same rules: `buildkube_reapi::validate_tree` and
//! `command_outputs`).

use buildkube_proto::reapi;
use buildkube_reapi::{connect_channel, Digest, TreeLimits};
use buildkube_tests::Server;
use prost::Message;
use tonic::Code;

use crate::reapi_client::{execute_rejected, upload, Clients, INSTANCE};

fn file(name: &str, digest: Digest) -> reapi::FileNode {
    reapi::FileNode {
        name: name.into(),
        digest: Some(digest.to_proto()),
        ..Default::default()
    }
}

fn subdirectory(name: &str, digest: Digest) -> reapi::DirectoryNode {
    reapi::DirectoryNode {
        name: name.into(),
        digest: Some(digest.to_proto()),
    }
}

/// Uploads `directories` (the input root last), a command with
/// `output_paths` in `working_directory`, and the action; returns it.
async fn action_over(
    c: &mut Clients,
    directories: &[reapi::Directory],
    working_directory: &str,
    output_paths: &[&str],
) -> Digest {
    let encoded: Vec<Vec<u8>> = directories.iter().map(|d| d.encode_to_vec()).collect();
    let root = Digest::of_bytes(encoded.last().expect("a root"));
    let command = reapi::Command {
        arguments: vec!["true".into()],
        working_directory: working_directory.into(),
        output_paths: output_paths.iter().map(|p| p.to_string()).collect(),
        ..Default::default()
    }
    .encode_to_vec();
    let action = reapi::Action {
        command_digest: Some(Digest::of_bytes(&command).to_proto()),
        input_root_digest: Some(root.to_proto()),
        ..Default::default()
    }
    .encode_to_vec();
    let mut blobs: Vec<&[u8]> = encoded.iter().map(Vec::as_slice).collect();
    blobs.extend([b"input".as_slice(), &command, &action]);
    for chunk in blobs.chunks(100) {
        upload(c, chunk).await;
    }
    Digest::of_bytes(&action)
}

#[tokio::test]
async fn input_tree_mistakes_are_invalid_argument() {
    let server = Server::start().unwrap();
    let mut c = Clients::connect(&server, None);
    let input = Digest::of_bytes(b"input");
    let empty = reapi::Directory::default();
    let empty_digest = Digest::of_bytes(&empty.encode_to_vec());
    let cases: Vec<(&str, Vec<reapi::Directory>, &str)> = vec![
        (
            "a name twice",
            vec![reapi::Directory {
                files: vec![file("a", input), file("a", input)],
                ..Default::default()
            }],
            "\"a\" comes after \"a\"",
        ),
        (
            "a file and a directory of the same name",
            vec![
                empty.clone(),
                reapi::Directory {
                    files: vec![file("out", input)],
                    directories: vec![subdirectory("out", empty_digest)],
                    ..Default::default()
                },
            ],
            "\"out\" is both a file and a directory",
        ),
        (
            "unsorted entries",
            vec![reapi::Directory {
                files: vec![file("b", input), file("a", input)],
                ..Default::default()
            }],
            "must be sorted by name",
        ),
        (
            "a name with a slash",
            vec![reapi::Directory {
                files: vec![file("a/b", input)],
                ..Default::default()
            }],
            "contains `/`",
        ),
    ];
    for (what, directories, says) in cases {
        let action = action_over(&mut c, &directories, "", &[]).await;
        let status = execute_rejected(&mut c, action).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(
            status.message().contains(says),
            "{what}: {}",
            status.message()
        );
    }

    // A very deep tree: one level more than the limit.
    let mut chain = vec![reapi::Directory {
        files: vec![file("f", input)],
        ..Default::default()
    }];
    for _ in 0..=TreeLimits::DEFAULT_MAX_DEPTH {
        let below = Digest::of_bytes(&chain.last().unwrap().encode_to_vec());
        chain.push(reapi::Directory {
            directories: vec![subdirectory("d", below)],
            ..Default::default()
        });
    }
    let action = action_over(&mut c, &chain, "", &[]).await;
    let status = execute_rejected(&mut c, action).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("directories deep"),
        "{}",
        status.message()
    );

    // A 16 KiB name: refused, and not echoed back in full.
    let long = "n".repeat(16 << 10);
    let action = action_over(
        &mut c,
        &[reapi::Directory {
            files: vec![file(&long, input)],
            ..Default::default()
        }],
        "",
        &[],
    )
    .await;
    let status = execute_rejected(&mut c, action).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().len() < 1024, "{}", status.message().len());
}

#[tokio::test]
async fn output_paths_the_worker_refuses_are_refused_at_execute() {
    let server = Server::start().unwrap();
    let mut c = Clients::connect(&server, None);
    let root = [reapi::Directory {
        files: vec![file("in", Digest::of_bytes(b"input"))],
        ..Default::default()
    }];
    for (working_directory, path) in [("pkg", "../other/a.o"), ("", "sub/../x")] {
        let action = action_over(&mut c, &root, working_directory, &[path]).await;
        let status = execute_rejected(&mut c, action).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{path}: {status:?}");
        assert!(
            status.message().contains("command.output_paths") && status.message().contains(path),
            "{}",
            status.message()
        );
    }
}

/// A request whose string field is not UTF-8, sent as the bytes it is.
#[derive(Clone, PartialEq, Message)]
struct RawFindMissingBlobs {
    #[prost(bytes = "vec", tag = "1")]
    instance_name: Vec<u8>,
}

#[tokio::test]
async fn undecodable_requests_are_invalid_argument() {
    let server = Server::start().unwrap();
    let channel = connect_channel(&server.worker_endpoint(), None, &Default::default()).unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let status = grpc
        .unary(
            tonic::Request::new(RawFindMissingBlobs {
                instance_name: vec![b'm', 0xff, 0xfe],
            }),
            tonic::codegen::http::uri::PathAndQuery::from_static(
                "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs",
            ),
            buildkube_proto::tonic_prost::ProstCodec::<
                RawFindMissingBlobs,
                reapi::FindMissingBlobsResponse,
            >::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("UTF-8"), "{}", status.message());
}

/// Whatever a message echoes is cut at the edge: a 16 KiB instance name
/// used to come back whole, past HTTP/2's header limit, and the client saw
/// a broken stream instead of an answer.
#[tokio::test]
async fn long_messages_are_truncated() {
    let server = Server::start().unwrap();
    let mut c = Clients::connect(&server, None);
    let name = "i".repeat(16 << 10);
    let status = c
        .cas
        .find_missing_blobs(reapi::FindMissingBlobsRequest {
            instance_name: name,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().len() <= 1024, "{}", status.message().len());
    assert!(
        status.message().contains("bytes in all"),
        "{}",
        status.message()
    );
    // The connection still works.
    let found = c
        .cas
        .find_missing_blobs(reapi::FindMissingBlobsRequest {
            instance_name: INSTANCE.into(),
            ..Default::default()
        })
        .await;
    assert!(found.is_ok(), "{found:?}");
}
