//! The one conformance suite every [`BlobStore`] and [`ActionResultStore`]
//! passes, backends and decorators alike. A store's test module invokes
//! `blob_store_conformance!(async { (store, guard) })` (or the action-store
//! twin); the macro expands to one `#[tokio::test]` per property below.

use buildkube_proto::reapi::ActionResult;
use buildkube_reapi::Digest;
use bytes::Bytes;
use futures::TryStreamExt;

use super::{contains, ActionResultStore, BlobStore, StorageError, READ_CHUNK};

/// A blob no other test (or earlier run against the same database) has used.
pub(crate) fn unique_blob(len: usize) -> (Digest, Bytes) {
    let seed = uuid::Uuid::new_v4();
    let mut data = Vec::with_capacity(len);
    let mut i: u32 = 0;
    while data.len() < len {
        data.extend_from_slice(seed.as_bytes());
        data.extend_from_slice(&i.to_le_bytes());
        i += 1;
    }
    data.truncate(len);
    (Digest::of_bytes(&data), Bytes::from(data))
}

async fn read_all(store: &dyn BlobStore, d: &Digest, offset: u64, len: u64) -> Option<Bytes> {
    let stream = store.read(d, offset, len).await.unwrap()?;
    let chunks: Vec<Bytes> = stream.try_collect().await.unwrap();
    assert!(
        chunks.iter().all(|c| c.len() <= READ_CHUNK),
        "read chunks must be at most READ_CHUNK"
    );
    Some(chunks.concat().into())
}

pub(crate) async fn put_get_and_find_missing(store: &dyn BlobStore) {
    let (a, da) = unique_blob(100);
    let (b, _) = unique_blob(200);
    assert_eq!(store.find_missing(&[a, b]).await.unwrap(), vec![a, b]);
    assert_eq!(store.get(&a).await.unwrap(), None);
    store.put(a, da.clone()).await.unwrap();
    store.put(a, da.clone()).await.unwrap(); // idempotent
    assert_eq!(store.get(&a).await.unwrap(), Some(da.clone()));
    assert_eq!(store.find_missing(&[b, a]).await.unwrap(), vec![b]);
    assert!(contains(store, &a).await.unwrap());
    assert_eq!(read_all(store, &a, 0, a.size()).await, Some(da));
    assert!(store.read(&b, 0, 1).await.unwrap().is_none());
}

pub(crate) async fn empty_blob_is_always_present(store: &dyn BlobStore) {
    let empty = Digest::EMPTY;
    assert!(store.find_missing(&[empty]).await.unwrap().is_empty());
    assert_eq!(store.get(&empty).await.unwrap(), Some(Bytes::new()));
    assert_eq!(read_all(store, &empty, 0, 0).await, Some(Bytes::new()));
    store.put(empty, Bytes::new()).await.unwrap();
    let mut sink = store.begin_write(empty).await.unwrap();
    sink.commit().await.unwrap();
}

pub(crate) async fn digest_mismatch_is_rejected_and_not_stored(store: &dyn BlobStore) {
    let (d, data) = unique_blob(64);
    let mut wrong = data.to_vec();
    wrong[10] ^= 1;
    let err = store.put(d, wrong.into()).await.unwrap_err();
    assert!(matches!(err, StorageError::DigestMismatch { .. }), "{err}");
    assert_eq!(store.get(&d).await.unwrap(), None);
    assert_eq!(store.find_missing(&[d]).await.unwrap(), vec![d]);
}

pub(crate) async fn streaming_write_round_trips(store: &dyn BlobStore) {
    let (d, data) = unique_blob(3 * READ_CHUNK + 17);
    let mut sink = store.begin_write(d).await.unwrap();
    assert_eq!(sink.digest(), d);
    let mut offset = 0;
    for chunk in data.chunks(40_000) {
        sink.append(offset as i64, Bytes::copy_from_slice(chunk))
            .await
            .unwrap();
        offset += chunk.len();
        assert_eq!(sink.committed_size(), offset as u64);
        if offset < data.len() {
            assert_eq!(store.find_missing(&[d]).await.unwrap(), vec![d]);
        }
    }
    assert_eq!(
        store.get(&d).await.unwrap(),
        None,
        "not visible before commit"
    );
    sink.commit().await.unwrap();
    assert_eq!(store.get(&d).await.unwrap(), Some(data));
    assert!(store.find_missing(&[d]).await.unwrap().is_empty());
}

pub(crate) async fn streaming_write_rejects_wrong_offset(store: &dyn BlobStore) {
    let (d, data) = unique_blob(100);
    let mut sink = store.begin_write(d).await.unwrap();
    sink.append(0, data.slice(..50)).await.unwrap();
    for bad in [0, 49, 51, -1] {
        let err = sink.append(bad, data.slice(50..)).await.unwrap_err();
        assert!(
            matches!(err, StorageError::BadOffset { committed: 50, .. }),
            "{err}"
        );
    }
    assert_eq!(store.get(&d).await.unwrap(), None);
    // The upload is still good from where it stands.
    sink.append(50, data.slice(50..)).await.unwrap();
    sink.commit().await.unwrap();
    assert_eq!(store.get(&d).await.unwrap(), Some(data));
}

pub(crate) async fn streaming_write_rejects_too_long(store: &dyn BlobStore) {
    let (d, data) = unique_blob(100);
    let mut sink = store.begin_write(d).await.unwrap();
    sink.append(0, data.slice(..90)).await.unwrap();
    let mut longer = data.slice(90..).to_vec();
    longer.push(0);
    let err = sink.append(90, longer.into()).await.unwrap_err();
    assert!(matches!(err, StorageError::TooLong { .. }), "{err}");
    drop(sink);
    assert_eq!(store.get(&d).await.unwrap(), None);
    assert_eq!(store.find_missing(&[d]).await.unwrap(), vec![d]);
}

pub(crate) async fn streaming_write_with_wrong_digest_leaves_nothing(store: &dyn BlobStore) {
    let (d, data) = unique_blob(2 * READ_CHUNK);
    let mut wrong = data.to_vec();
    wrong[READ_CHUNK] ^= 0xff;
    let mut sink = store.begin_write(d).await.unwrap();
    sink.append(0, wrong.into()).await.unwrap();
    let err = sink.commit().await.unwrap_err();
    assert!(matches!(err, StorageError::DigestMismatch { .. }), "{err}");
    // Committing again does not turn the failed upload into a success.
    assert!(sink.commit().await.is_err());
    drop(sink);
    assert_eq!(store.get(&d).await.unwrap(), None);
    assert!(store.read(&d, 0, 1).await.unwrap().is_none());
    assert_eq!(store.find_missing(&[d]).await.unwrap(), vec![d]);
    // A short upload cannot commit either.
    let mut short = store.begin_write(d).await.unwrap();
    short.append(0, data.slice(..10)).await.unwrap();
    assert!(short.commit().await.is_err());
    assert_eq!(store.get(&d).await.unwrap(), None);
    // An abandoned one leaves nothing.
    let mut abandoned = store.begin_write(d).await.unwrap();
    abandoned.append(0, data.slice(..10)).await.unwrap();
    drop(abandoned);
    assert_eq!(store.find_missing(&[d]).await.unwrap(), vec![d]);
}

pub(crate) async fn reads_ranges(store: &dyn BlobStore) {
    let len = 2 * READ_CHUNK + 1000;
    let (d, data) = unique_blob(len);
    store.put(d, data.clone()).await.unwrap();
    let n = len as u64;
    for (offset, want) in [
        (0, 10),
        (5, 0),
        (READ_CHUNK as u64 - 3, 10),
        (READ_CHUNK as u64, READ_CHUNK as u64 + 1000),
        (1, n - 1),
        (n - 1, 1),
        (n, 0),
        (10, n),       // clipped to the end
        (0, u64::MAX), // the whole blob
    ] {
        let got = read_all(store, &d, offset, want).await.unwrap();
        let start = offset as usize;
        let end = start.saturating_add(want as usize).min(len);
        assert_eq!(got, data.slice(start..end), "offset {offset} len {want}");
    }
}

pub(crate) async fn concurrent_writes_of_one_blob_agree(store: &dyn BlobStore) {
    let (d, data) = unique_blob(READ_CHUNK + 5);
    let write = || async {
        let mut sink = store.begin_write(d).await.unwrap();
        sink.append(0, data.clone()).await.unwrap();
        sink.commit().await
    };
    let (a, b, c) = tokio::join!(write(), write(), store.put(d, data.clone()));
    a.unwrap();
    b.unwrap();
    c.unwrap();
    assert_eq!(store.get(&d).await.unwrap(), Some(data));
}

fn result(exit_code: i32) -> ActionResult {
    ActionResult {
        exit_code,
        stdout_raw: Bytes::from(uuid::Uuid::new_v4().to_string()),
        ..Default::default()
    }
}

fn unique_instance(name: &str) -> String {
    format!("{name}/{}", uuid::Uuid::new_v4())
}

pub(crate) async fn action_results_round_trip_and_overwrite(store: &dyn ActionResultStore) {
    let instance = unique_instance("main");
    let (action, _) = unique_blob(50);
    assert_eq!(store.get(&instance, &action).await.unwrap(), None);
    let first = result(1);
    store.put(&instance, &action, &first).await.unwrap();
    assert_eq!(store.get(&instance, &action).await.unwrap(), Some(first));
    let second = result(2);
    store.put(&instance, &action, &second).await.unwrap();
    assert_eq!(store.get(&instance, &action).await.unwrap(), Some(second));
    let (other, _) = unique_blob(50);
    assert_eq!(store.get(&instance, &other).await.unwrap(), None);
}

pub(crate) async fn action_results_are_per_instance(store: &dyn ActionResultStore) {
    let a = unique_instance("a");
    let b = unique_instance("a/b");
    let (action, _) = unique_blob(50);
    let in_a = result(3);
    store.put(&a, &action, &in_a).await.unwrap();
    assert_eq!(store.get(&b, &action).await.unwrap(), None);
    assert_eq!(store.get("", &action).await.unwrap(), None);
    let in_b = result(4);
    store.put(&b, &action, &in_b).await.unwrap();
    assert_eq!(store.get(&a, &action).await.unwrap(), Some(in_a));
    assert_eq!(store.get(&b, &action).await.unwrap(), Some(in_b));
    let empty_instance = result(5);
    store.put("", &action, &empty_instance).await.unwrap();
    assert_eq!(store.get("", &action).await.unwrap(), Some(empty_instance));
}

/// Expands to the blob store conformance tests for the store that `$make`
/// (an async block returning `(SharedBlobStore, guard)`) builds.
macro_rules! blob_store_conformance {
    ($make:expr) => {
        mod blob_store_conformance {
            #[allow(unused_imports)]
            use super::*;
            use crate::storage::conformance as suite;

            async fn make() -> (
                crate::storage::SharedBlobStore,
                Box<dyn std::any::Any + Send>,
            ) {
                let (store, guard) = $make.await;
                (store, Box::new(guard))
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn put_get_and_find_missing() {
                let (store, _guard) = make().await;
                suite::put_get_and_find_missing(&*store).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn empty_blob_is_always_present() {
                let (store, _guard) = make().await;
                suite::empty_blob_is_always_present(&*store).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn digest_mismatch_is_rejected_and_not_stored() {
                let (store, _guard) = make().await;
                suite::digest_mismatch_is_rejected_and_not_stored(&*store).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn streaming_write_round_trips() {
                let (store, _guard) = make().await;
                suite::streaming_write_round_trips(&*store).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn streaming_write_rejects_wrong_offset() {
                let (store, _guard) = make().await;
                suite::streaming_write_rejects_wrong_offset(&*store).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn streaming_write_rejects_too_long() {
                let (store, _guard) = make().await;
                suite::streaming_write_rejects_too_long(&*store).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn streaming_write_with_wrong_digest_leaves_nothing() {
                let (store, _guard) = make().await;
                suite::streaming_write_with_wrong_digest_leaves_nothing(&*store).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn reads_ranges() {
                let (store, _guard) = make().await;
                suite::reads_ranges(&*store).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_writes_of_one_blob_agree() {
                let (store, _guard) = make().await;
                suite::concurrent_writes_of_one_blob_agree(&*store).await;
            }
        }
    };
}
pub(crate) use blob_store_conformance;

/// Expands to the action store conformance tests for the store that `$make`
/// (an async block returning `(Arc<dyn ActionResultStore>, guard)`) builds.
macro_rules! action_store_conformance {
    ($make:expr) => {
        mod action_store_conformance {
            #[allow(unused_imports)]
            use super::*;
            use crate::storage::conformance as suite;

            async fn make() -> (
                std::sync::Arc<dyn crate::storage::ActionResultStore>,
                Box<dyn std::any::Any + Send>,
            ) {
                let (store, guard) = $make.await;
                (store, Box::new(guard))
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn action_results_round_trip_and_overwrite() {
                let (store, _guard) = make().await;
                suite::action_results_round_trip_and_overwrite(&*store).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn action_results_are_per_instance() {
                let (store, _guard) = make().await;
                suite::action_results_are_per_instance(&*store).await;
            }
        }
    };
}
pub(crate) use action_store_conformance;

/// The URL of the PostgreSQL server the tests use; panics, saying how to
/// start one, when it is not configured (no silent skip).
pub(crate) fn test_postgres_url() -> String {
    std::env::var("BUILDKUBE_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!(
            "BUILDKUBE_TEST_POSTGRES_URL is not set: the PostgreSQL store tests need a server. \
             As root on Debian: `apt-get install -y postgresql redis-server && eval \"$(bash .ci/test-stores.sh)\"`, \
             or point it at your own: BUILDKUBE_TEST_POSTGRES_URL=postgres://USER:PASSWORD@127.0.0.1:5432/DB"
        )
    })
}

/// The URL of the Redis server the tests use; panics like [`test_postgres_url`].
pub(crate) fn test_redis_url() -> String {
    std::env::var("BUILDKUBE_TEST_REDIS_URL").unwrap_or_else(|_| {
        panic!(
            "BUILDKUBE_TEST_REDIS_URL is not set: the Redis store tests need a server. \
             As root on Debian: `apt-get install -y postgresql redis-server && eval \"$(bash .ci/test-stores.sh)\"`, \
             or point it at your own: BUILDKUBE_TEST_REDIS_URL=redis://127.0.0.1:6379/"
        )
    })
}
