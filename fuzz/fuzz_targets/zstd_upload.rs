//! zstd uploads through a real server (`buildkube_server::run`, filesystem
//! CAS, loopback gRPC): ByteStream writes to `compressed-blobs/zstd/...`
//! and compressed BatchUpdateBlobs items, built from fuzz input as valid,
//! split, skippable-prefixed or damaged zstd, declared under the content's
//! digest or another one, and sent in fuzz-chosen chunks and offsets.
//!
//! Properties checked on every upload:
//! - accepted: the stored blob reads back (plain and compressed) as exactly
//!   the declared digest's bytes, and the sent bytes, where they are a
//!   complete zstd stream, decode to exactly those bytes;
//! - a complete zstd stream of the declared bytes, sent at the right
//!   offsets, is accepted; a wrong offset is refused;
//! - refused: INVALID_ARGUMENT (RESOURCE_EXHAUSTED only for a blob over the
//!   CAS budget), never INTERNAL or UNKNOWN;
//! - afterwards, no temp file is left in the CAS: nothing was kept of a
//!   refused upload, whatever it decompressed to.
#![no_main]

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use buildkube_proto::bytestream::byte_stream_client::ByteStreamClient;
use buildkube_proto::bytestream::{ReadRequest, WriteRequest};
use buildkube_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use buildkube_proto::reapi::{
    batch_update_blobs_request, compressor, BatchUpdateBlobsRequest, FindMissingBlobsRequest,
};
use buildkube_proto::tonic::transport::{Channel, Endpoint};
use buildkube_proto::tonic::{Code, Status};
use buildkube_reapi::{Compression, Digest, ReadResource, WriteResource};
use libfuzzer_sys::fuzz_target;

/// The server's CAS budget: larger declared blobs are RESOURCE_EXHAUSTED.
const CAS_BUDGET: u64 = 256 << 20;
/// At most this many WriteRequests per upload (the rest goes in the last).
const MAX_MESSAGES: usize = 64;

#[derive(Arbitrary, Debug)]
struct Upload {
    /// What the client means to upload, repeated `1 + repeat % 512` times
    /// (so that uploads span several of the decoder's output steps).
    content: Vec<u8>,
    repeat: u16,
    encoding: Encoding,
    /// Bytes of the encoded stream xor-ed with a value: (position, value).
    damage: Vec<(u32, u8)>,
    declared: Declared,
    via: Via,
}

#[derive(Arbitrary, Debug)]
enum Encoding {
    /// One zstd frame.
    Frame { level: i8, checksum: bool },
    /// The content cut into several frames of these lengths (the rest in a last one).
    Frames { level: i8, lengths: Vec<u16> },
    /// A skippable frame, then one frame of the content.
    Skippable {
        magic: u8,
        payload: Vec<u8>,
        level: i8,
    },
    /// These bytes as they are.
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Declared {
    /// The digest of the content.
    Content,
    /// The content's hash with another size.
    ContentHashWithSize(u32),
    /// Any hash and size.
    Other { hash: [u8; 32], size: u32 },
}

#[derive(Arbitrary, Debug)]
enum Via {
    /// ByteStream Write in chunks of these lengths; `slip` adds a number to
    /// the write_offset of one message (by index).
    ByteStream {
        chunk_lengths: Vec<u16>,
        slip: Option<(u8, i32)>,
    },
    /// One compressed BatchUpdateBlobs item.
    Batch,
}

struct Harness {
    runtime: tokio::runtime::Runtime,
    bytestream: ByteStreamClient<Channel>,
    cas: ContentAddressableStorageClient<Channel>,
    instance: String,
    cas_tmp: PathBuf,
    _data: tempfile::TempDir,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(start_server)
}

fn start_server() -> Harness {
    // tmpfs when there is one: the CAS fsyncs every blob it stores.
    let shm = std::path::Path::new("/dev/shm");
    let data = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .expect("creating the server's data dir");
    let addr_file = data.path().join("addr");
    let args = buildkube_config::ServerArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data.path().join("data"),
        cas_max_size: CAS_BUDGET,
        local_workers: 0,
        addr_file: Some(addr_file.clone()),
        ..Default::default()
    };
    let instance = args.instances[0].clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("starting tokio");
    let server = runtime.spawn(buildkube_server::run(args, std::future::pending()));
    // The server writes its addresses to the file once it serves.
    let started = Instant::now();
    let grpc = loop {
        if let Ok(text) = std::fs::read_to_string(&addr_file) {
            let grpc = text
                .lines()
                .find_map(|line| line.strip_prefix("grpc="))
                .expect("addr file names the gRPC address");
            break grpc.to_string();
        }
        assert!(!server.is_finished(), "the server stopped while starting");
        assert!(started.elapsed() < Duration::from_secs(60), "server start");
        std::thread::sleep(Duration::from_millis(5));
    };
    let channel = runtime
        .block_on(
            Endpoint::from_shared(format!("http://{grpc}"))
                .unwrap()
                .connect(),
        )
        .expect("connecting to the server");
    Harness {
        runtime,
        bytestream: ByteStreamClient::new(channel.clone()),
        cas: ContentAddressableStorageClient::new(channel),
        instance,
        cas_tmp: data.path().join("data/cas/tmp"),
        _data: data,
    }
}

fuzz_target!(|upload: Upload| {
    let harness = harness();
    let content = upload.content.repeat(1 + upload.repeat as usize % 512);
    let mut sent = encode(&content, &upload.encoding);
    if !sent.is_empty() {
        for (at, value) in &upload.damage {
            let len = sent.len();
            sent[*at as usize % len] ^= value;
        }
    }
    let declared = match upload.declared {
        Declared::Content => Digest::of_bytes(&content),
        Declared::ContentHashWithSize(size) => {
            Digest::new(*Digest::of_bytes(&content).hash_bytes(), size.into())
        }
        Declared::Other { hash, size } => Digest::new(hash, size.into()),
    };
    // What the bytes sent are, by the reference decoder: `None` unless a
    // complete zstd stream.
    let reference = zstd::stream::decode_all(&sent[..]).ok();
    harness.runtime.block_on(check_upload(
        harness,
        &sent,
        declared,
        reference,
        &upload.via,
    ));
});

fn level(level: i8) -> i32 {
    i32::from(level) % 10
}

fn encode(content: &[u8], encoding: &Encoding) -> Vec<u8> {
    match encoding {
        Encoding::Frame { level: l, checksum } => {
            let mut encoder = zstd::stream::Encoder::new(Vec::new(), level(*l)).unwrap();
            encoder.include_checksum(*checksum).unwrap();
            encoder.write_all(content).unwrap();
            encoder.finish().unwrap()
        }
        Encoding::Frames { level: l, lengths } => {
            let mut out = Vec::new();
            let mut rest = content;
            for length in lengths {
                let (frame, after) = rest.split_at((*length as usize).min(rest.len()));
                out.extend(zstd::stream::encode_all(frame, level(*l)).unwrap());
                rest = after;
            }
            out.extend(zstd::stream::encode_all(rest, level(*l)).unwrap());
            out
        }
        Encoding::Skippable {
            magic,
            payload,
            level: l,
        } => {
            let mut out = (0x184D_2A50u32 + u32::from(magic % 16))
                .to_le_bytes()
                .to_vec();
            out.extend((payload.len() as u32).to_le_bytes());
            out.extend(payload);
            out.extend(zstd::stream::encode_all(content, level(*l)).unwrap());
            out
        }
        Encoding::Raw(bytes) => bytes.clone(),
    }
}

async fn blob_is_stored(harness: &Harness, digest: Digest) -> bool {
    let missing = harness
        .cas
        .clone()
        .find_missing_blobs(FindMissingBlobsRequest {
            instance_name: harness.instance.clone(),
            blob_digests: vec![digest.to_proto()],
            ..Default::default()
        })
        .await
        .expect("FindMissingBlobs")
        .into_inner();
    missing.missing_blob_digests.is_empty()
}

async fn check_upload(
    harness: &Harness,
    sent: &[u8],
    declared: Digest,
    reference: Option<Vec<u8>>,
    via: &Via,
) {
    let existed = blob_is_stored(harness, declared).await;
    let decodes_to_declared = reference
        .as_deref()
        .is_some_and(|bytes| Digest::of_bytes(bytes) == declared);
    let (outcome, offsets_wrong) = match via {
        Via::ByteStream {
            chunk_lengths,
            slip,
        } => {
            let slip = slip.filter(|(_, by)| *by != 0);
            let outcome = write(harness, sent, declared, chunk_lengths, slip).await;
            (outcome, slip.is_some())
        }
        Via::Batch => (batch_update(harness, sent, declared).await, false),
    };
    let what = format!(
        "{} bytes sent as {declared} (existed: {existed}, reference decodes to {:?}) via {via:?}",
        sent.len(),
        reference.as_ref().map(|r| Digest::of_bytes(r)),
    );
    match outcome {
        Ok(()) => {
            let stored = read(harness, declared, Compression::Identity).await;
            assert_eq!(Digest::of_bytes(&stored), declared, "{what}: stored blob");
            let compressed = read(harness, declared, Compression::Zstd).await;
            assert_eq!(
                zstd::stream::decode_all(&compressed[..]).expect("compressed read decodes"),
                stored,
                "{what}: compressed read"
            );
            if !existed {
                assert!(!offsets_wrong, "{what}: accepted at a wrong offset");
                if let Some(reference) = &reference {
                    assert_eq!(reference, &stored, "{what}: accepted bytes");
                }
            }
        }
        Err(status) => {
            assert!(
                !(decodes_to_declared && !offsets_wrong && declared.size() <= CAS_BUDGET),
                "{what}: a valid upload was refused: {status:?}"
            );
            let expected_code = status.code() == Code::InvalidArgument
                || (status.code() == Code::ResourceExhausted && declared.size() > CAS_BUDGET);
            assert!(expected_code, "{what}: refused with {status:?}");
        }
    }
    let left: Vec<_> = std::fs::read_dir(&harness.cas_tmp)
        .expect("reading the CAS temp dir")
        .map(|entry| entry.unwrap().path())
        .collect();
    assert!(left.is_empty(), "{what}: temp files left: {left:?}");
}

/// One ByteStream Write of `sent` to `compressed-blobs/zstd/...`.
async fn write(
    harness: &Harness,
    sent: &[u8],
    declared: Digest,
    chunk_lengths: &[u16],
    slip: Option<(u8, i32)>,
) -> Result<(), Status> {
    static UPLOADS: AtomicU64 = AtomicU64::new(0);
    let upload_id = format!("fuzz-{}", UPLOADS.fetch_add(1, Ordering::Relaxed));
    let name =
        WriteResource::format_with(&harness.instance, &upload_id, &declared, Compression::Zstd);
    let mut chunks = Vec::new();
    let mut rest = sent;
    for length in chunk_lengths.iter().take(MAX_MESSAGES - 1) {
        let (chunk, after) = rest.split_at((*length as usize).min(rest.len()));
        chunks.push(chunk);
        rest = after;
    }
    chunks.push(rest);
    let last = chunks.len() - 1;
    let mut offset = 0i64;
    let requests: Vec<WriteRequest> = chunks
        .iter()
        .enumerate()
        .map(|(index, chunk)| {
            let mut write_offset = offset;
            if let Some((at, by)) = slip {
                if at as usize % chunks.len() == index {
                    write_offset = write_offset.wrapping_add(by.into());
                }
            }
            offset += chunk.len() as i64;
            WriteRequest {
                resource_name: if index == 0 {
                    name.clone()
                } else {
                    String::new()
                },
                write_offset,
                finish_write: index == last,
                data: chunk.to_vec().into(),
            }
        })
        .collect();
    let response = harness
        .bytestream
        .clone()
        .write(futures_iter(requests))
        .await?
        .into_inner();
    // Compressed: -1 when the blob was already there, else the compressed bytes taken.
    assert!(
        response.committed_size == -1 || response.committed_size == sent.len() as i64,
        "Write answered committed_size {} for {} bytes sent",
        response.committed_size,
        sent.len()
    );
    Ok(())
}

fn futures_iter(requests: Vec<WriteRequest>) -> impl tokio_stream::Stream<Item = WriteRequest> {
    tokio_stream::iter(requests)
}

/// One compressed BatchUpdateBlobs item; its status is the outcome.
async fn batch_update(harness: &Harness, sent: &[u8], declared: Digest) -> Result<(), Status> {
    let response = harness
        .cas
        .clone()
        .batch_update_blobs(BatchUpdateBlobsRequest {
            instance_name: harness.instance.clone(),
            requests: vec![batch_update_blobs_request::Request {
                digest: Some(declared.to_proto()),
                data: sent.to_vec().into(),
                compressor: compressor::Value::Zstd as i32,
            }],
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(response.responses.len(), 1);
    let status = response.responses[0].status.clone().unwrap_or_default();
    match Code::from(status.code) {
        Code::Ok => Ok(()),
        code => Err(Status::new(code, status.message)),
    }
}

/// The whole blob, read through ByteStream plain or compressed.
async fn read(harness: &Harness, digest: Digest, compression: Compression) -> Vec<u8> {
    let mut stream = harness
        .bytestream
        .clone()
        .read(ReadRequest {
            resource_name: ReadResource::format_with(&harness.instance, &digest, compression),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .unwrap_or_else(|status| panic!("reading {digest}: {status:?}"))
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(response) = stream
        .message()
        .await
        .unwrap_or_else(|status| panic!("reading {digest}: {status:?}"))
    {
        bytes.extend_from_slice(&response.data);
    }
    bytes
}
