//! zstd-compressed blobs (`compressed-blobs/zstd` ByteStream resources and
//! compressed BatchUpdateBlobs items) against the real server, decoded with
//! the reference zstd library. Bazel 4.2.3 (Debian's) predates compression,
//! so a plain gRPC client stands in for Bazel 5+ `--remote_cache_compression`.

use buildkube_proto::bytestream::ReadRequest;
use buildkube_proto::reapi::{self, compressor};
use buildkube_reapi::{Compression, Digest, ReadResource, WriteResource};
use buildkube_tests::Server;
use bytes::Bytes;
use tonic::Code;

use crate::reapi_client::{
    capabilities, missing, query_write_status, read, read_range_rejected, read_rejected, upload,
    upload_request, write, Clients, INSTANCE,
};

/// 1 MiB that compresses well, different per `seed`.
fn compressible(seed: u8) -> Vec<u8> {
    (0..1u32 << 20)
        .map(|i| (i / 64) as u8 ^ seed)
        .collect::<Vec<u8>>()
}

fn zstd_of(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).unwrap()
}

fn compressed_read(d: Digest, offset: i64) -> ReadRequest {
    ReadRequest {
        resource_name: ReadResource::format_with(INSTANCE, &d, Compression::Zstd),
        read_offset: offset,
        read_limit: 0,
    }
}

fn compressed_upload(upload: &str, d: Digest) -> String {
    WriteResource::format_with(INSTANCE, upload, &d, Compression::Zstd)
}

#[tokio::test]
async fn capabilities_offer_zstd() {
    let server = Server::start().unwrap();
    let mut c = Clients::connect(&server, None);
    let cache = capabilities(&mut c).await.cache_capabilities.unwrap();
    let zstd = vec![compressor::Value::Zstd as i32];
    assert_eq!(cache.supported_compressors, zstd);
    assert_eq!(cache.supported_batch_update_compressors, zstd);
}

#[tokio::test]
async fn compressed_writes_and_reads_round_trip() {
    let server = Server::start().unwrap();
    let mut c = Clients::connect(&server, None);
    let data = compressible(1);
    let d = Digest::of_bytes(&data);
    let frame = zstd_of(&data);
    assert!(frame.len() < data.len() / 10);

    // Sent in three messages: offsets count compressed bytes after the first.
    let (a, rest) = frame.split_at(frame.len() / 3);
    let (b, last) = rest.split_at(rest.len() / 2);
    let name = compressed_upload("c1", d);
    let response = write(
        &mut c,
        &name,
        &[
            (0, a, false),
            (a.len() as i64, b, false),
            ((a.len() + b.len()) as i64, last, true),
        ],
    )
    .await
    .unwrap();
    assert_eq!(response.committed_size, frame.len() as i64);
    assert!(missing(&mut c, &[d]).await.is_empty());

    // Read back plain and compressed (from an uncompressed offset).
    let plain = read(
        &mut c,
        ReadRequest {
            resource_name: ReadResource::format(INSTANCE, &d),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(plain, data);
    let got = read(&mut c, compressed_read(d, 0)).await;
    assert!(got.len() < data.len() / 10, "sent compressed");
    assert_eq!(zstd::decode_all(&got[..]).unwrap(), data);
    let got = read(&mut c, compressed_read(d, 1000)).await;
    assert_eq!(zstd::decode_all(&got[..]).unwrap(), &data[1000..]);
    let err = read_range_rejected(
        &mut c,
        ReadRequest {
            read_limit: 10,
            ..compressed_read(d, 0)
        },
    )
    .await;
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("read_limit"), "{}", err.message());

    // The empty blob, compressed, is an empty frame.
    let empty = Digest::of_bytes(b"");
    let got = read(&mut c, compressed_read(empty, 0)).await;
    assert!(zstd::decode_all(&got[..]).unwrap().is_empty());

    // Uploading what is stored answers at once with -1.
    let response = write(&mut c, &compressed_upload("c2", d), &[(0, a, false)])
        .await
        .unwrap();
    assert_eq!(response.committed_size, -1);

    // A compressor we do not offer.
    let status = read_rejected(
        &mut c,
        &format!(
            "{INSTANCE}/compressed-blobs/deflate/{}/{}",
            d.hash_hex(),
            d.size()
        ),
    )
    .await;
    assert_eq!(status.code(), Code::Unimplemented);
}

#[tokio::test]
async fn interrupted_compressed_upload_resumes_where_query_write_status_says() {
    let server = Server::start().unwrap();
    let mut c = Clients::connect(&server, None);
    let data = compressible(2);
    let d = Digest::of_bytes(&data);
    let half = data.len() / 2;
    let name = compressed_upload("resume", d);

    // The first stream carries a frame of the first half, then breaks off.
    let first = zstd_of(&data[..half]);
    let _ = write(&mut c, &name, &[(0, &first, false)]).await;
    let status = query_write_status(&mut c, &name).await.unwrap();
    assert_eq!(
        (status.committed_size, status.complete),
        (half as i64, false)
    );
    assert_eq!(missing(&mut c, &[d]).await.len(), 1, "nothing visible yet");

    // A new stream starts at that uncompressed offset with a new frame.
    let second = zstd_of(&data[half..]);
    let response = write(&mut c, &name, &[(half as i64, &second, true)])
        .await
        .unwrap();
    assert_eq!(response.committed_size, (half + second.len()) as i64);
    let got = read(&mut c, compressed_read(d, 0)).await;
    assert_eq!(zstd::decode_all(&got[..]).unwrap(), data);
}

#[tokio::test]
async fn bad_compressed_uploads_store_nothing() {
    let server = Server::start().unwrap();
    let mut c = Clients::connect(&server, None);
    let data = compressible(3);
    let d = Digest::of_bytes(&data);

    // Not zstd at all.
    let err = write(
        &mut c,
        &compressed_upload("bad1", d),
        &[(0, b"definitely not zstd", true)],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("zstd"), "{}", err.message());

    // Valid zstd of other bytes of the same length.
    let other = compressible(4);
    let err = write(
        &mut c,
        &compressed_upload("bad2", d),
        &[(0, &zstd_of(&other), true)],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("does not match"),
        "{}",
        err.message()
    );

    // A few KiB that expand to 64 MiB, under a digest of 1000 bytes: refused
    // as soon as the output passes 1000 bytes.
    let small = Digest::of_bytes(&[0u8; 1000]);
    let bomb = zstd_of(&vec![0u8; 64 << 20]);
    let err = write(
        &mut c,
        &compressed_upload("bomb", small),
        &[(0, &bomb, true)],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // Offsets after the first count compressed bytes.
    let frame = zstd_of(&data);
    let err = write(
        &mut c,
        &compressed_upload("bad3", d),
        &[(0, &frame[..10], false), (5, &frame[10..], true)],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("write_offset"), "{}", err.message());

    assert_eq!(missing(&mut c, &[d, small]).await.len(), 2);
}

#[tokio::test]
async fn compressed_batch_uploads_are_decompressed_and_checked() {
    let server = Server::start().unwrap();
    let mut c = Clients::connect(&server, None);
    let good = compressible(5);
    let good_d = Digest::of_bytes(&good);
    let bomb_d = Digest::of_bytes(&[0u8; 100]);
    let plain = b"plain item".to_vec();
    let deflate_d = Digest::of_bytes(b"deflated?");
    let item = |digest: Digest, data: Vec<u8>, compressor: compressor::Value| {
        reapi::batch_update_blobs_request::Request {
            digest: Some(digest.to_proto()),
            data: Bytes::from(data),
            compressor: compressor as i32,
        }
    };
    let response = c
        .cas
        .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
            instance_name: INSTANCE.into(),
            requests: vec![
                item(good_d, zstd_of(&good), compressor::Value::Zstd),
                item(
                    bomb_d,
                    zstd_of(&vec![0u8; 8 << 20]),
                    compressor::Value::Zstd,
                ),
                upload_request(Digest::of_bytes(&plain), &plain),
                item(deflate_d, b"deflated?".to_vec(), compressor::Value::Deflate),
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<i32> = response
        .responses
        .iter()
        .map(|r| r.status.as_ref().map_or(0, |s| s.code))
        .collect();
    assert_eq!(
        codes,
        vec![
            Code::Ok as i32,
            Code::InvalidArgument as i32,
            Code::Ok as i32,
            Code::InvalidArgument as i32,
        ],
        "{response:?}"
    );
    assert!(response.responses[3]
        .status
        .as_ref()
        .unwrap()
        .message
        .contains("DEFLATE"));
    assert_eq!(missing(&mut c, &[good_d, bomb_d, deflate_d]).await.len(), 2);
    let got = read(
        &mut c,
        ReadRequest {
            resource_name: ReadResource::format(INSTANCE, &good_d),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(got, good);
    // And the uncompressed path still works beside it.
    upload(&mut c, &[b"after"]).await;
}
