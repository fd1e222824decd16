//! Wire checks against hand-encoded bytes. Field numbers come from the
//! published definitions; a mismatch here breaks Bazel/BuildStream/recc.

#![allow(deprecated)] // Command.output_files etc. are deprecated upstream.

use crate::{bytestream, longrunning, reapi, rpc, worker};
use prost::Message;

fn digest() -> reapi::Digest {
    reapi::Digest {
        hash: "ab".into(),
        size_bytes: 3,
    }
}

// hash = 1 (LEN), size_bytes = 2 (VARINT)
const DIGEST: &[u8] = &[0x0a, 0x02, b'a', b'b', 0x10, 0x03];

fn with_prefix(prefix: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut v = prefix.to_vec();
    v.extend_from_slice(rest);
    v
}

#[test]
fn digest_wire() {
    assert_eq!(digest().encode_to_vec(), DIGEST);
    assert_eq!(reapi::Digest::decode(DIGEST).unwrap(), digest());
}

#[test]
fn execute_request_wire() {
    let req = reapi::ExecuteRequest {
        instance_name: "x".into(),
        skip_cache_lookup: true,
        action_digest: Some(digest()),
        ..Default::default()
    };
    let mut want = vec![0x0a, 0x01, b'x', 0x18, 0x01, 0x32, 0x06];
    want.extend_from_slice(DIGEST);
    assert_eq!(req.encode_to_vec(), want);

    let req = reapi::ExecuteRequest {
        digest_function: reapi::digest_function::Value::Sha256 as i32,
        inline_stdout: true,
        inline_stderr: true,
        inline_output_files: vec!["f".into()],
        execution_policy: Some(reapi::ExecutionPolicy { priority: 1 }),
        results_cache_policy: Some(reapi::ResultsCachePolicy { priority: 2 }),
        ..Default::default()
    };
    assert_eq!(
        req.encode_to_vec(),
        [
            0x3a, 0x02, 0x08, 0x01, // execution_policy = 7
            0x42, 0x02, 0x08, 0x02, // results_cache_policy = 8
            0x48, 0x01, // digest_function = 9
            0x50, 0x01, // inline_stdout = 10
            0x58, 0x01, // inline_stderr = 11
            0x62, 0x01, b'f', // inline_output_files = 12
        ]
    );
}

#[test]
fn action_wire() {
    let action = reapi::Action {
        command_digest: Some(digest()),
        input_root_digest: Some(digest()),
        timeout: Some(prost_types::Duration {
            seconds: 5,
            nanos: 0,
        }),
        do_not_cache: true,
        salt: vec![0xff].into(),
        platform: Some(reapi::Platform::default()),
    };
    let mut want = with_prefix(&[0x0a, 0x06], DIGEST);
    want.extend(with_prefix(&[0x12, 0x06], DIGEST));
    want.extend([0x32, 0x02, 0x08, 0x05]); // timeout = 6
    want.extend([0x38, 0x01]); // do_not_cache = 7
    want.extend([0x4a, 0x01, 0xff]); // salt = 9
    want.extend([0x52, 0x00]); // platform = 10
    assert_eq!(action.encode_to_vec(), want);
}

#[test]
fn command_wire() {
    let cmd = reapi::Command {
        arguments: vec!["a".into()],
        environment_variables: vec![reapi::command::EnvironmentVariable {
            name: "N".into(),
            value: "V".into(),
        }],
        output_files: vec!["f".into()],
        output_directories: vec!["d".into()],
        platform: Some(reapi::Platform {
            properties: vec![reapi::platform::Property {
                name: "p".into(),
                value: "q".into(),
            }],
        }),
        working_directory: "w".into(),
        output_paths: vec!["o".into()],
        output_node_properties: vec!["n".into()],
        output_directory_format: reapi::command::OutputDirectoryFormat::TreeAndDirectory as i32,
    };
    assert_eq!(
        cmd.encode_to_vec(),
        [
            0x0a, 0x01, b'a', // arguments = 1
            0x12, 0x06, 0x0a, 0x01, b'N', 0x12, 0x01, b'V', // environment_variables = 2
            0x1a, 0x01, b'f', // output_files = 3
            0x22, 0x01, b'd', // output_directories = 4
            0x2a, 0x08, 0x0a, 0x06, 0x0a, 0x01, b'p', 0x12, 0x01, b'q', // platform = 5
            0x32, 0x01, b'w', // working_directory = 6
            0x3a, 0x01, b'o', // output_paths = 7
            0x42, 0x01, b'n', // output_node_properties = 8
            0x48, 0x02, // output_directory_format = 9
        ]
    );
}

#[test]
fn action_result_wire() {
    let result = reapi::ActionResult {
        output_files: vec![reapi::OutputFile {
            path: "o".into(),
            ..Default::default()
        }],
        exit_code: 1,
        stdout_digest: Some(digest()),
        execution_metadata: Some(reapi::ExecutedActionMetadata {
            worker: "w".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut want = vec![0x12, 0x03, 0x0a, 0x01, b'o', 0x20, 0x01, 0x32, 0x06];
    want.extend_from_slice(DIGEST);
    want.extend([0x4a, 0x03, 0x0a, 0x01, b'w']);
    assert_eq!(result.encode_to_vec(), want);

    // The remaining fields, and serialization in tag order (output_symlinks = 12
    // is declared before output_directories = 3 upstream).
    let result = reapi::ActionResult {
        output_symlinks: vec![reapi::OutputSymlink {
            path: "s".into(),
            ..Default::default()
        }],
        output_directories: vec![reapi::OutputDirectory {
            path: "d".into(),
            is_topologically_sorted: true,
            ..Default::default()
        }],
        output_file_symlinks: vec![reapi::OutputSymlink {
            path: "t".into(),
            ..Default::default()
        }],
        output_directory_symlinks: vec![reapi::OutputSymlink {
            path: "u".into(),
            ..Default::default()
        }],
        stdout_raw: b"O".to_vec().into(),
        stderr_raw: b"E".to_vec().into(),
        stderr_digest: Some(reapi::Digest::default()),
        ..Default::default()
    };
    assert_eq!(
        result.encode_to_vec(),
        [
            0x1a, 0x05, 0x0a, 0x01, b'd', 0x20, 0x01, // output_directories = 3
            0x2a, 0x01, b'O', // stdout_raw = 5
            0x3a, 0x01, b'E', // stderr_raw = 7
            0x42, 0x00, // stderr_digest = 8
            0x52, 0x03, 0x0a, 0x01, b't', // output_file_symlinks = 10
            0x5a, 0x03, 0x0a, 0x01, b'u', // output_directory_symlinks = 11
            0x62, 0x03, 0x0a, 0x01, b's', // output_symlinks = 12
        ]
    );
}

#[test]
fn executed_action_metadata_wire() {
    let ts = || {
        Some(prost_types::Timestamp {
            seconds: 1,
            nanos: 0,
        })
    };
    let md = reapi::ExecutedActionMetadata {
        worker: String::new(),
        queued_timestamp: ts(),
        worker_start_timestamp: ts(),
        worker_completed_timestamp: ts(),
        input_fetch_start_timestamp: ts(),
        input_fetch_completed_timestamp: ts(),
        execution_start_timestamp: ts(),
        execution_completed_timestamp: ts(),
        virtual_execution_duration: Some(prost_types::Duration {
            seconds: 2,
            nanos: 0,
        }),
        output_upload_start_timestamp: ts(),
        output_upload_completed_timestamp: ts(),
        auxiliary_metadata: vec![prost_types::Any {
            type_url: "t".into(),
            value: vec![],
        }],
    };
    let mut want = Vec::new();
    for tag in 2u8..=10 {
        want.extend([tag << 3 | 2, 0x02, 0x08, 0x01]);
    }
    want.extend([0x5a, 0x03, 0x0a, 0x01, b't']); // auxiliary_metadata = 11
    want.extend([0x62, 0x02, 0x08, 0x02]); // virtual_execution_duration = 12
    assert_eq!(md.encode_to_vec(), want);
}

#[test]
fn tree_nodes_wire() {
    let props = reapi::NodeProperties {
        properties: vec![],
        mtime: Some(prost_types::Timestamp {
            seconds: 1,
            nanos: 0,
        }),
        unix_mode: Some(0o755),
    };
    // mtime = 2, unix_mode = 3 (UInt32Value wrapper, value = 1)
    let props_bytes = [0x12, 0x02, 0x08, 0x01, 0x1a, 0x03, 0x08, 0xed, 0x03];
    assert_eq!(props.encode_to_vec(), props_bytes);

    let file = reapi::FileNode {
        name: "f".into(),
        digest: Some(digest()),
        is_executable: true,
        node_properties: Some(props),
    };
    let mut want = vec![0x0a, 0x01, b'f', 0x12, 0x06];
    want.extend_from_slice(DIGEST);
    want.extend([0x20, 0x01, 0x32, props_bytes.len() as u8]);
    want.extend(props_bytes);
    assert_eq!(file.encode_to_vec(), want);

    let dir = reapi::Directory {
        files: vec![],
        directories: vec![reapi::DirectoryNode {
            name: "d".into(),
            digest: None,
        }],
        symlinks: vec![reapi::SymlinkNode {
            name: "s".into(),
            target: "t".into(),
            node_properties: Some(reapi::NodeProperties::default()),
        }],
        node_properties: Some(reapi::NodeProperties::default()),
    };
    assert_eq!(
        dir.encode_to_vec(),
        [
            0x12, 0x03, 0x0a, 0x01, b'd', // directories = 2
            0x1a, 0x08, 0x0a, 0x01, b's', 0x12, 0x01, b't', 0x22, 0x00, // symlinks = 3
            0x2a, 0x00, // node_properties = 5
        ]
    );
}

#[test]
fn enum_values() {
    use reapi::digest_function::Value as D;
    let digests = [
        (D::Unknown, 0),
        (D::Sha256, 1),
        (D::Sha1, 2),
        (D::Md5, 3),
        (D::Vso, 4),
        (D::Sha384, 5),
        (D::Sha512, 6),
        (D::Murmur3, 7),
        (D::Sha256tree, 8),
        (D::Blake3, 9),
    ];
    for (v, n) in digests {
        assert_eq!(v as i32, n, "{v:?}");
    }
    use reapi::compressor::Value as C;
    assert_eq!(
        [C::Identity, C::Zstd, C::Deflate, C::Brotli].map(|c| c as i32),
        [0, 1, 2, 3]
    );
    use reapi::execution_stage::Value as S;
    assert_eq!(
        [
            S::Unknown,
            S::CacheCheck,
            S::Queued,
            S::Executing,
            S::Completed
        ]
        .map(|s| s as i32),
        [0, 1, 2, 3, 4]
    );
    use reapi::symlink_absolute_path_strategy::Value as L;
    assert_eq!(
        [L::Unknown, L::Disallowed, L::Allowed].map(|s| s as i32),
        [0, 1, 2]
    );
    assert_eq!(rpc::Code::Unauthenticated as i32, 16);
    assert_eq!(rpc::Code::DataLoss as i32, 15);
    assert_eq!(rpc::Code::FailedPrecondition as i32, 9);
}

#[test]
fn capabilities_wire() {
    let caps = reapi::ServerCapabilities {
        cache_capabilities: Some(reapi::CacheCapabilities {
            digest_functions: vec![1],
            action_cache_update_capabilities: Some(reapi::ActionCacheUpdateCapabilities {
                update_enabled: true,
            }),
            cache_priority_capabilities: None,
            max_batch_total_size_bytes: 4,
            symlink_absolute_path_strategy: 1,
            supported_compressors: vec![1],
            supported_batch_update_compressors: vec![1],
        }),
        execution_capabilities: Some(reapi::ExecutionCapabilities {
            digest_function: 1,
            exec_enabled: true,
            execution_priority_capabilities: None,
            supported_node_properties: vec!["n".into()],
            digest_functions: vec![1],
        }),
        deprecated_api_version: None,
        low_api_version: Some(crate::semver::SemVer {
            major: 2,
            ..Default::default()
        }),
        high_api_version: Some(crate::semver::SemVer {
            major: 2,
            minor: 3,
            patch: 0,
            prerelease: "p".into(),
        }),
    };
    assert_eq!(
        caps.encode_to_vec(),
        [
            0x0a, 0x11, // cache_capabilities = 1
            0x0a, 0x01, 0x01, // digest_functions = 1 (packed)
            0x12, 0x02, 0x08, 0x01, // action_cache_update_capabilities = 2
            0x20, 0x04, // max_batch_total_size_bytes = 4
            0x28, 0x01, // symlink_absolute_path_strategy = 5
            0x32, 0x01, 0x01, // supported_compressors = 6
            0x3a, 0x01, 0x01, // supported_batch_update_compressors = 7
            0x12, 0x0a, // execution_capabilities = 2
            0x08, 0x01, // digest_function = 1
            0x10, 0x01, // exec_enabled = 2
            0x22, 0x01, b'n', // supported_node_properties = 4
            0x2a, 0x01, 0x01, // digest_functions = 5
            0x22, 0x02, 0x08, 0x02, // low_api_version = 4
            0x2a, 0x07, 0x08, 0x02, 0x10, 0x03, 0x22, 0x01, b'p', // high_api_version = 5
        ]
    );
}

#[test]
fn cas_batch_wire() {
    let req = reapi::BatchUpdateBlobsRequest {
        instance_name: String::new(),
        requests: vec![reapi::batch_update_blobs_request::Request {
            digest: None,
            data: b"z".to_vec().into(),
            compressor: reapi::compressor::Value::Zstd as i32,
        }],
        digest_function: 1,
    };
    assert_eq!(
        req.encode_to_vec(),
        [0x12, 0x05, 0x12, 0x01, b'z', 0x18, 0x01, 0x28, 0x01]
    );
    let resp = reapi::BatchReadBlobsResponse {
        responses: vec![reapi::batch_read_blobs_response::Response {
            digest: None,
            data: Default::default(),
            compressor: 1,
            status: Some(rpc::Status {
                code: 5,
                message: String::new(),
                details: vec![],
            }),
        }],
    };
    // status = 3 before compressor = 4
    assert_eq!(
        resp.encode_to_vec(),
        [0x0a, 0x06, 0x1a, 0x02, 0x08, 0x05, 0x20, 0x01]
    );
    let req = reapi::BatchReadBlobsRequest {
        instance_name: String::new(),
        digests: vec![],
        acceptable_compressors: vec![1],
        digest_function: 1,
    };
    assert_eq!(req.encode_to_vec(), [0x1a, 0x01, 0x01, 0x20, 0x01]);
    let req = reapi::FindMissingBlobsRequest {
        instance_name: String::new(),
        blob_digests: vec![digest()],
        digest_function: 1,
    };
    assert_eq!(
        req.encode_to_vec(),
        with_prefix(&[0x12, 0x06], &[DIGEST, &[0x18, 0x01]].concat())
    );
    let resp = reapi::FindMissingBlobsResponse {
        missing_blob_digests: vec![digest()],
    };
    assert_eq!(resp.encode_to_vec(), with_prefix(&[0x12, 0x06], DIGEST));
}

#[test]
fn execute_response_and_operation_wire() {
    let resp = reapi::ExecuteResponse {
        result: None,
        cached_result: true,
        status: None,
        server_logs: [(
            "k".to_string(),
            reapi::LogFile {
                digest: None,
                human_readable: true,
            },
        )]
        .into(),
        message: "m".into(),
    };
    assert_eq!(
        resp.encode_to_vec(),
        [
            0x10, 0x01, // cached_result = 2
            0x22, 0x07, 0x0a, 0x01, b'k', 0x12, 0x02, 0x10, 0x01, // server_logs = 4
            0x2a, 0x01, b'm', // message = 5
        ]
    );
    let md = reapi::ExecuteOperationMetadata {
        stage: reapi::execution_stage::Value::Executing as i32,
        action_digest: None,
        stdout_stream_name: "o".into(),
        stderr_stream_name: "e".into(),
        partial_execution_metadata: Some(Default::default()),
        digest_function: 1,
    };
    assert_eq!(
        md.encode_to_vec(),
        [0x08, 0x03, 0x1a, 0x01, b'o', 0x22, 0x01, b'e', 0x2a, 0x00, 0x30, 0x01]
    );
    let op = longrunning::Operation {
        name: "n".into(),
        metadata: None,
        done: true,
        result: Some(longrunning::operation::Result::Response(prost_types::Any {
            type_url: "t".into(),
            value: vec![],
        })),
    };
    assert_eq!(
        op.encode_to_vec(),
        [0x0a, 0x01, b'n', 0x18, 0x01, 0x2a, 0x03, 0x0a, 0x01, b't']
    );
    let op = longrunning::Operation {
        result: Some(longrunning::operation::Result::Error(rpc::Status::default())),
        ..Default::default()
    };
    assert_eq!(op.encode_to_vec(), [0x22, 0x00]);
}

#[test]
fn bytestream_wire() {
    let w = bytestream::WriteRequest {
        resource_name: "r".into(),
        write_offset: 1,
        finish_write: true,
        data: b"d".to_vec().into(),
    };
    assert_eq!(
        w.encode_to_vec(),
        [0x0a, 0x01, b'r', 0x10, 0x01, 0x18, 0x01, 0x52, 0x01, b'd']
    );
    let r = bytestream::ReadResponse {
        data: b"d".to_vec().into(),
    };
    assert_eq!(r.encode_to_vec(), [0x52, 0x01, b'd']);
    let r = bytestream::ReadRequest {
        resource_name: String::new(),
        read_offset: 1,
        read_limit: 2,
    };
    assert_eq!(r.encode_to_vec(), [0x10, 0x01, 0x18, 0x02]);
    let q = bytestream::QueryWriteStatusResponse {
        committed_size: 1,
        complete: true,
    };
    assert_eq!(q.encode_to_vec(), [0x08, 0x01, 0x10, 0x01]);
}

#[test]
fn request_metadata_wire() {
    let md = reapi::RequestMetadata {
        tool_details: Some(reapi::ToolDetails {
            tool_name: "b".into(),
            tool_version: "4".into(),
        }),
        action_id: "a".into(),
        tool_invocation_id: "i".into(),
        correlated_invocations_id: "c".into(),
        action_mnemonic: "m".into(),
        target_id: "t".into(),
        configuration_id: "g".into(),
    };
    assert_eq!(
        md.encode_to_vec(),
        [
            0x0a, 0x06, 0x0a, 0x01, b'b', 0x12, 0x01, b'4', //
            0x12, 0x01, b'a', 0x1a, 0x01, b'i', 0x22, 0x01, b'c', //
            0x2a, 0x01, b'm', 0x32, 0x01, b't', 0x3a, 0x01, b'g',
        ]
    );
}

#[test]
fn error_details_wire() {
    let pf = rpc::PreconditionFailure {
        violations: vec![rpc::precondition_failure::Violation {
            r#type: "MISSING".into(),
            subject: "s".into(),
            description: "d".into(),
        }],
    };
    let mut want = vec![0x0a, 0x0f, 0x0a, 0x07];
    want.extend(b"MISSING");
    want.extend([0x12, 0x01, b's', 0x1a, 0x01, b'd']);
    assert_eq!(pf.encode_to_vec(), want);
    let ri = rpc::RetryInfo {
        retry_delay: Some(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        }),
    };
    assert_eq!(ri.encode_to_vec(), [0x0a, 0x02, 0x08, 0x01]);
}

#[test]
fn worker_protocol_roundtrip() {
    let req = worker::CompleteRequest {
        lease_id: "l".into(),
        outcome: Some(worker::complete_request::Outcome::Result(
            reapi::ActionResult {
                exit_code: 2,
                ..Default::default()
            },
        )),
        ..Default::default()
    };
    let bytes = req.encode_to_vec();
    assert_eq!(bytes, [0x12, 0x01, b'l', 0x2a, 0x02, 0x20, 0x02]);
    assert_eq!(
        worker::CompleteRequest::decode(bytes.as_slice()).unwrap(),
        req
    );
}

#[test]
fn file_descriptor_set_lists_every_file() {
    let set = prost_types::FileDescriptorSet::decode(crate::FILE_DESCRIPTOR_SET).unwrap();
    let names: Vec<_> = set.file.iter().map(|f| f.name()).collect();
    for want in [
        "build/bazel/remote/execution/v2/remote_execution.proto",
        "build/bazel/semver/semver.proto",
        "google/bytestream/bytestream.proto",
        "google/longrunning/operations.proto",
        "google/rpc/status.proto",
        "google/rpc/code.proto",
        "google/rpc/error_details.proto",
        "buildkube/worker/v1/worker.proto",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let services: Vec<String> = set
        .file
        .iter()
        .flat_map(|f| {
            f.service
                .iter()
                .map(move |s| format!("{}.{}", f.package(), s.name()))
        })
        .collect();
    for want in [
        "build.bazel.remote.execution.v2.Execution",
        "build.bazel.remote.execution.v2.ActionCache",
        "build.bazel.remote.execution.v2.ContentAddressableStorage",
        "build.bazel.remote.execution.v2.Capabilities",
        "google.bytestream.ByteStream",
        "google.longrunning.Operations",
        "buildkube.worker.v1.WorkerService",
    ] {
        assert!(
            services.iter().any(|s| s == want),
            "{want} missing from {services:?}"
        );
    }
}
