//! CAS scenarios: `cas-write`, `cas-read` and `find-missing`.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, ensure, Context};
use buildkube_proto::bytestream::byte_stream_client::ByteStreamClient;
use buildkube_proto::bytestream::{ReadRequest, WriteRequest};
use buildkube_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use buildkube_proto::reapi::{self, batch_update_blobs_request};
use buildkube_reapi::{
    AuthChannel, Compression, Digest, ReadResource, WriteResource, BYTESTREAM_CHUNK,
};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use crate::blobs::BlobMaker;
use crate::load::{drive, timed, LoadPlan};
use crate::{
    note, rpc_error, CasApi, CasArgs, CasReadArgs, FindMissingArgs, Outcome, Target, MAX_MESSAGE,
};

/// Size of each blob `find-missing` uploads as its present half.
const FIND_MISSING_BLOB_SIZE: u64 = 64;
/// Blobs per upload call while preparing data.
const PREPARE_CHUNK: usize = 256;

fn cas_client(channel: AuthChannel) -> ContentAddressableStorageClient<AuthChannel> {
    ContentAddressableStorageClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

fn bytestream_client(channel: AuthChannel) -> ByteStreamClient<AuthChannel> {
    ByteStreamClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

/// Compression level of `bytestream-zstd` writes (what the server uses too).
const ZSTD_LEVEL: i32 = 1;

fn check_batch_size(args: &CasArgs) -> anyhow::Result<u64> {
    ensure!(args.batch_size >= 1, "--batch-size must be at least 1");
    ensure!(
        args.api == CasApi::Batch || args.batch_size == 1,
        "--batch-size applies to --api batch only"
    );
    Ok(u64::from(args.batch_size))
}

fn cas_params(args: &CasArgs) -> BTreeMap<String, serde_json::Value> {
    let mut params = BTreeMap::new();
    params.insert("size".into(), args.size.into());
    params.insert(
        "api".into(),
        match args.api {
            CasApi::Batch => "batch",
            CasApi::Bytestream => "bytestream",
            CasApi::BytestreamZstd => "bytestream-zstd",
        }
        .into(),
    );
    params.insert("batch_size".into(), args.batch_size.into());
    params.insert("compressible".into(), args.compressible.into());
    params
}

/// Checks every per-blob status of a batch response.
fn check_statuses<'a>(
    call: &str,
    statuses: impl Iterator<
        Item = (
            Option<&'a reapi::Digest>,
            Option<&'a buildkube_proto::rpc::Status>,
        ),
    >,
) -> anyhow::Result<()> {
    for (digest, status) in statuses {
        if let Some(status) = status.filter(|s| s.code != 0) {
            let digest = digest
                .map(|d| format!("{}/{}", d.hash, d.size_bytes))
                .unwrap_or_default();
            bail!(
                "{call}: blob {digest}: {:?}: {}",
                tonic::Code::from(status.code),
                status.message
            );
        }
    }
    Ok(())
}

/// `cas-write`: every operation uploads `batch_size` new blobs.
pub(crate) async fn write(
    target: &Target,
    plan: &LoadPlan,
    args: &CasArgs,
) -> anyhow::Result<Outcome> {
    let per_op = check_batch_size(args)?;
    let maker = BlobMaker::new(args.size, args.compressible);
    let size = args.size;
    let api = args.api;
    let compressed_bytes = Arc::new(AtomicU64::new(0));
    let compressed_total = compressed_bytes.clone();
    let target_for_ops = target.clone();
    let measured = drive(
        "cas-write",
        plan,
        move |index| {
            let target = target_for_ops.clone();
            let maker = maker.clone();
            let compressed_bytes = compressed_bytes.clone();
            async move {
                let blobs: Vec<(Digest, Bytes)> = (0..per_op)
                    .map(|j| maker.blob(index * per_op + j, size))
                    .collect();
                match api {
                    CasApi::Batch => {
                        let request = reapi::BatchUpdateBlobsRequest {
                            instance_name: target.instance.clone(),
                            requests: blobs
                                .into_iter()
                                .map(|(digest, data)| batch_update_blobs_request::Request {
                                    digest: Some(digest.to_proto()),
                                    data,
                                    ..Default::default()
                                })
                                .collect(),
                            ..Default::default()
                        };
                        let mut client = cas_client(target.channel(index));
                        timed(async move {
                            let response = client
                                .batch_update_blobs(request)
                                .await
                                .map_err(rpc_error("BatchUpdateBlobs"))?;
                            let responses = &response.get_ref().responses;
                            ensure!(
                                responses.len() as u64 == per_op,
                                "BatchUpdateBlobs answered {} of {per_op} blobs",
                                responses.len()
                            );
                            check_statuses(
                                "BatchUpdateBlobs",
                                responses
                                    .iter()
                                    .map(|r| (r.digest.as_ref(), r.status.as_ref())),
                            )?;
                            Ok(per_op * size)
                        })
                        .await
                    }
                    CasApi::Bytestream => {
                        let (digest, data) =
                            blobs.into_iter().next().expect("one blob per operation");
                        let cas = target.cas(index);
                        timed(async move {
                            let chunks: Vec<Bytes> = (0..data.len())
                                .step_by(BYTESTREAM_CHUNK)
                                .map(|at| data.slice(at..(at + BYTESTREAM_CHUNK).min(data.len())))
                                .collect();
                            cas.write_bytestream(digest, futures::stream::iter(chunks).map(Ok))
                                .await
                                .with_context(|| format!("writing {digest}"))?;
                            Ok(size)
                        })
                        .await
                    }
                    CasApi::BytestreamZstd => {
                        let (digest, data) =
                            blobs.into_iter().next().expect("one blob per operation");
                        let compressed = match zstd::bulk::compress(&data, ZSTD_LEVEL) {
                            Ok(compressed) => Bytes::from(compressed),
                            Err(e) => return Err(anyhow::anyhow!("compressing {digest}: {e}")),
                        };
                        compressed_bytes.fetch_add(compressed.len() as u64, Ordering::Relaxed);
                        let resource = WriteResource::format_with(
                            &target.instance,
                            &uuid::Uuid::new_v4().to_string(),
                            &digest,
                            Compression::Zstd,
                        );
                        let mut client = bytestream_client(target.channel(index));
                        timed(async move {
                            let total = compressed.len();
                            let requests: Vec<WriteRequest> = (0..total.max(1))
                                .step_by(BYTESTREAM_CHUNK)
                                .map(|at| WriteRequest {
                                    resource_name: if at == 0 { resource.clone() } else { String::new() },
                                    write_offset: at as i64,
                                    finish_write: at + BYTESTREAM_CHUNK >= total,
                                    data: compressed.slice(at..(at + BYTESTREAM_CHUNK).min(total)),
                                })
                                .collect();
                            let committed = client
                                .write(futures::stream::iter(requests))
                                .await
                                .map_err(rpc_error(format_args!("ByteStream.Write of {digest}")))?
                                .into_inner()
                                .committed_size;
                            ensure!(
                                committed == total as i64 || committed == -1,
                                "ByteStream.Write of {digest} ({total} compressed bytes) committed {committed}"
                            );
                            Ok(size)
                        })
                        .await
                    }
                }
            }
        },
        String::new,
    )
    .await;
    let mut counters = BTreeMap::new();
    if api == CasApi::BytestreamZstd {
        counters.insert(
            "compressed_bytes_sent".into(),
            compressed_total.load(Ordering::Relaxed),
        );
    }
    Ok(Outcome {
        measured,
        params: cas_params(args),
        counters,
        dispatch_latency: None,
        failures: Vec::new(),
    })
}

/// Uploads blobs `0..count` of `size` bytes (unmeasured), `concurrency` calls at a time.
async fn upload_pool(
    target: &Target,
    maker: &BlobMaker,
    count: u64,
    size: u64,
    concurrency: usize,
) -> anyhow::Result<Vec<Digest>> {
    let indices: Vec<u64> = (0..count).collect();
    futures::stream::iter(indices.chunks(PREPARE_CHUNK).enumerate().map(|(n, chunk)| {
        let blobs: Vec<(Digest, Bytes)> = chunk.iter().map(|&i| maker.blob(i, size)).collect();
        let digests: Vec<Digest> = blobs.iter().map(|(d, _)| *d).collect();
        let cas = target.cas(n as u64);
        async move {
            cas.upload_blobs(blobs)
                .await
                .context("uploading the blobs to read")?;
            anyhow::Ok(digests)
        }
    }))
    .buffered(concurrency.max(1))
    .try_fold(
        Vec::with_capacity(count as usize),
        |mut all, digests| async move {
            all.extend(digests);
            Ok(all)
        },
    )
    .await
}

/// `cas-read`: upload a pool of blobs, then read `batch_size` of them per operation.
pub(crate) async fn read(
    target: &Target,
    plan: &LoadPlan,
    args: &CasReadArgs,
) -> anyhow::Result<Outcome> {
    let cas_args = &args.cas;
    let per_op = check_batch_size(cas_args)?;
    let pool_size = args
        .blobs
        .unwrap_or((plan.total() * per_op).min(1000))
        .max(1);
    let maker = BlobMaker::new(cas_args.size, cas_args.compressible);
    note(
        plan.quiet,
        format_args!(
            "cas-read: uploading {pool_size} blobs of {} bytes",
            cas_args.size
        ),
    );
    let pool =
        Arc::new(upload_pool(target, &maker, pool_size, cas_args.size, plan.concurrency).await?);
    let size = cas_args.size;
    let api = cas_args.api;
    let compressed_bytes = Arc::new(AtomicU64::new(0));
    let compressed_total = compressed_bytes.clone();
    let target_for_ops = target.clone();
    let measured = drive(
        "cas-read",
        plan,
        move |index| {
            let target = target_for_ops.clone();
            let pool = pool.clone();
            let compressed_bytes = compressed_bytes.clone();
            async move {
                let digests: Vec<Digest> = (0..per_op)
                    .map(|j| pool[((index * per_op + j) % pool.len() as u64) as usize])
                    .collect();
                match api {
                    CasApi::Batch => {
                        let mut client = cas_client(target.channel(index));
                        let request = reapi::BatchReadBlobsRequest {
                            instance_name: target.instance.clone(),
                            digests: digests.iter().map(Digest::to_proto).collect(),
                            ..Default::default()
                        };
                        timed(async move {
                            let response = client.batch_read_blobs(request).await.map_err(rpc_error("BatchReadBlobs"))?;
                            let responses = response.into_inner().responses;
                            check_statuses(
                                "BatchReadBlobs",
                                responses.iter().map(|r| (r.digest.as_ref(), r.status.as_ref())),
                            )?;
                            let mut wanted: HashSet<Digest> = digests.into_iter().collect();
                            let mut bytes = 0;
                            for r in &responses {
                                let actual = Digest::of_bytes(&r.data);
                                ensure!(
                                    wanted.remove(&actual),
                                    "BatchReadBlobs returned bytes hashing to {actual}, which were not asked for \
                                     (or twice)"
                                );
                                bytes += actual.size();
                            }
                            ensure!(wanted.is_empty(), "BatchReadBlobs left out {} blobs", wanted.len());
                            Ok(bytes)
                        })
                        .await
                    }
                    CasApi::Bytestream => {
                        let digest = digests[0];
                        let cas = target.cas(index);
                        timed(async move {
                            let stream = cas.read_stream(digest, 0, 0).await.with_context(|| format!("reading {digest}"))?;
                            let mut stream = std::pin::pin!(stream);
                            let mut hasher = buildkube_reapi::Hasher::new();
                            while let Some(chunk) = stream.next().await {
                                hasher.update(&chunk.with_context(|| format!("reading {digest}"))?);
                            }
                            let actual = hasher.finish();
                            ensure!(actual == digest, "ByteStream.Read of {digest} returned {actual}");
                            Ok(size)
                        })
                        .await
                    }
                    CasApi::BytestreamZstd => {
                        let digest = digests[0];
                        let mut client = bytestream_client(target.channel(index));
                        let request = ReadRequest {
                            resource_name: ReadResource::format_with(&target.instance, &digest, Compression::Zstd),
                            read_offset: 0,
                            read_limit: 0,
                        };
                        timed(async move {
                            let mut stream = client
                                .read(request)
                                .await
                                .map_err(rpc_error(format_args!("ByteStream.Read of {digest}")))?
                                .into_inner();
                            let mut compressed = Vec::new();
                            while let Some(message) = stream
                                .message()
                                .await
                                .map_err(rpc_error(format_args!("ByteStream.Read of {digest}")))?
                            {
                                compressed.extend_from_slice(&message.data);
                            }
                            compressed_bytes.fetch_add(compressed.len() as u64, Ordering::Relaxed);
                            let data = zstd::bulk::decompress(&compressed, size as usize)
                                .with_context(|| format!("decompressing {digest}"))?;
                            let actual = Digest::of_bytes(&data);
                            ensure!(actual == digest, "compressed ByteStream.Read of {digest} returned {actual}");
                            Ok(size)
                        })
                        .await
                    }
                }
            }
        },
        String::new,
    )
    .await;
    let mut params = cas_params(cas_args);
    params.insert("blobs".into(), pool_size.into());
    let mut counters = BTreeMap::new();
    if api == CasApi::BytestreamZstd {
        counters.insert(
            "compressed_bytes_received".into(),
            compressed_total.load(Ordering::Relaxed),
        );
    }
    Ok(Outcome {
        measured,
        params,
        counters,
        dispatch_latency: None,
        failures: Vec::new(),
    })
}

/// `find-missing`: each request asks for half present, half absent digests
/// and checks that exactly the absent ones come back.
pub(crate) async fn find_missing(
    target: &Target,
    plan: &LoadPlan,
    args: &FindMissingArgs,
) -> anyhow::Result<Outcome> {
    ensure!(args.digests >= 1, "--digests must be at least 1");
    let maker = BlobMaker::new(FIND_MISSING_BLOB_SIZE, false);
    let pool_size = args.blobs.max(1);
    note(
        plan.quiet,
        format_args!("find-missing: uploading {pool_size} blobs"),
    );
    let pool = Arc::new(
        upload_pool(
            target,
            &maker,
            pool_size,
            FIND_MISSING_BLOB_SIZE,
            plan.concurrency,
        )
        .await?,
    );
    let per_request = u64::from(args.digests);
    let present_per_request = per_request / 2;
    let target_for_ops = target.clone();
    let measured = drive(
        "find-missing",
        plan,
        move |index| {
            let target = target_for_ops.clone();
            let pool = pool.clone();
            async move {
                let present = (0..present_per_request)
                    .map(|j| pool[((index * present_per_request + j) % pool.len() as u64) as usize]);
                let absent: HashSet<Digest> = (present_per_request..per_request)
                    .map(|_| Digest::new(rand::random(), FIND_MISSING_BLOB_SIZE))
                    .collect();
                let request = reapi::FindMissingBlobsRequest {
                    instance_name: target.instance.clone(),
                    blob_digests: present.chain(absent.iter().copied()).map(|d| d.to_proto()).collect(),
                    ..Default::default()
                };
                let mut client = cas_client(target.channel(index));
                timed(async move {
                    let response = client.find_missing_blobs(request).await.map_err(rpc_error("FindMissingBlobs"))?;
                    let missing = response
                        .get_ref()
                        .missing_blob_digests
                        .iter()
                        .map(Digest::try_from)
                        .collect::<Result<HashSet<_>, _>>()
                        .context("FindMissingBlobs returned an invalid digest")?;
                    ensure!(
                        missing == absent,
                        "FindMissingBlobs answered {} missing, expected exactly the {} absent digests \
                         ({} present ones reported missing)",
                        missing.len(),
                        absent.len(),
                        missing.difference(&absent).count()
                    );
                    Ok(0)
                })
                .await
            }
        },
        String::new,
    )
    .await;
    let mut params = BTreeMap::new();
    params.insert("digests".into(), args.digests.into());
    params.insert("blobs".into(), pool_size.into());
    Ok(Outcome {
        measured,
        params,
        counters: BTreeMap::new(),
        dispatch_latency: None,
        failures: Vec::new(),
    })
}
