//! The REAPI surface driven by a plain gRPC client with every bad input we
//! could think of. The server runs as a real process; no worker is needed.

use buildkube_proto::bytestream::{ReadRequest, WriteRequest};
use buildkube_proto::longrunning::CancelOperationRequest;
use buildkube_proto::reapi::{self, batch_update_blobs_request};
use buildkube_reapi::Digest;
use buildkube_tests::Server;
use bytes::Bytes;
use futures::StreamExt;
use tonic::Code;

use crate::execution::present_action;
use crate::reapi_client::{
    batch_read, blob_resource, capabilities, execute, get_action_result, last_operation, missing,
    query_write_status, read, read_range_rejected, read_rejected, response_of,
    update_action_result, upload, upload_request, upload_resource, write, Clients, INSTANCE,
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
