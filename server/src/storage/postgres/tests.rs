use super::*;
use crate::storage::conformance::test_postgres_url;

async fn pool() -> PostgresPool {
    PostgresPool::connect(&test_postgres_url(), None, 2)
        .await
        .expect("connecting to BUILDKUBE_TEST_POSTGRES_URL")
}

crate::storage::conformance::blob_store_conformance!(async {
    // A small chunk cap would not exercise multi-chunk blobs; the suite's
    // blobs stay under PG_CHUNK except where it crosses READ_CHUNK.
    let cas = PostgresCas::new(pool().await, PostgresCasOptions::new(64 << 20, None));
    (Arc::new(cas) as crate::storage::SharedBlobStore, ())
});

crate::storage::conformance::action_store_conformance!(async {
    let ac = PostgresActionCache::new(pool().await, None);
    (Arc::new(ac) as Arc<dyn ActionResultStore>, ())
});

/// A pool whose tables live in a schema of their own, so that eviction
/// cannot touch the blobs of tests running beside it. Dropped at the end.
struct IsolatedSchema {
    admin: PostgresPool,
    name: String,
    pool: PostgresPool,
    /// Connection URL whose search_path is the schema.
    url: String,
}

impl IsolatedSchema {
    async fn new(tag: &str) -> IsolatedSchema {
        let admin = pool().await;
        let name = format!("buildkube_test_{tag}_{}", std::process::id());
        admin
            .client()
            .await
            .unwrap()
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name};"
            ))
            .await
            .unwrap();
        let url = test_postgres_url();
        let separator = if url.contains('?') { '&' } else { '?' };
        let url = format!("{url}{separator}options=-csearch_path%3D{name}");
        let pool = PostgresPool::connect(&url, None, 2).await.unwrap();
        IsolatedSchema {
            admin,
            name,
            pool,
            url,
        }
    }

    /// Rows in `table` of this schema.
    async fn count(&self, table: &str) -> i64 {
        self.pool
            .client()
            .await
            .unwrap()
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0)
    }

    async fn drop_schema(self) {
        self.admin
            .client()
            .await
            .unwrap()
            .batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name))
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicts_least_recently_used_blobs_beyond_max_size() {
    let schema = IsolatedSchema::new("evict").await;
    let options = PostgresCasOptions {
        max_size: Some(10_000),
        // Passes run when the test says; every access counts.
        maintenance_interval: Duration::from_secs(3600),
        touch_after: Duration::ZERO,
        ..PostgresCasOptions::new(64 << 20, None)
    };
    let cas = PostgresCas::new(schema.pool.clone(), options);
    // The task's first pass runs at once; let it finish on the empty
    // table, or it could measure halfway through the puts below and evict.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while cas.usage().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no first maintenance pass"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let blobs: Vec<(Digest, Bytes)> = (0..20)
        .map(|_| crate::storage::conformance::unique_blob(1000))
        .collect();
    for (d, data) in &blobs {
        cas.put(*d, data.clone()).await.unwrap();
    }
    let digests: Vec<Digest> = blobs.iter().map(|(d, _)| *d).collect();
    // Used again, in three ways: found, read, uploaded again.
    assert!(cas.find_missing(&digests[0..1]).await.unwrap().is_empty());
    assert!(cas.get(&digests[1]).await.unwrap().is_some());
    cas.put(digests[2], blobs[2].1.clone()).await.unwrap();

    // 20,000 bytes against a budget of 10,000: down to 9,000, oldest
    // first, which are blobs 3..=13 now.
    let report = cas.maintain().await.unwrap();
    assert_eq!(
        report,
        MaintenanceReport {
            stored_bytes: 9_000,
            staged_bytes: 0,
            stored_blobs: 9,
            evicted_blobs: 11,
            evicted_bytes: 11_000,
        }
    );
    assert_eq!(
        cas.find_missing(&digests).await.unwrap(),
        digests[3..14].to_vec()
    );
    assert_eq!(cas.get(&digests[3]).await.unwrap(), None);
    assert_eq!(
        cas.get(&digests[19]).await.unwrap(),
        Some(blobs[19].1.clone())
    );
    assert_eq!(cas.usage(), Some((9_000, 9)));
    let content_rows = schema.count("buildkube_cas_content").await;
    assert_eq!(
        content_rows, 9,
        "evicted blobs' chunks are deleted with them"
    );

    // Within budget: a pass measures and deletes nothing.
    let report = cas.maintain().await.unwrap();
    assert_eq!((report.stored_bytes, report.evicted_blobs), (9_000, 0));
    drop(cas);
    schema.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_of_an_earlier_layout_are_refused_by_name() {
    let schema = IsolatedSchema::new("layout").await;
    schema
        .pool
        .client()
        .await
        .unwrap()
        .batch_execute(
            "DROP TABLE buildkube_cas_blobs;
             CREATE TABLE buildkube_cas_blobs (hash bytea, size bigint, PRIMARY KEY (hash, size));",
        )
        .await
        .unwrap();
    let url = schema.url.clone();
    let err = PostgresPool::connect(&url, None, 1).await.err().unwrap();
    assert!(
        err.to_string().contains("earlier buildkube version"),
        "{err}"
    );
    schema.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn action_results_unused_too_long_expire() {
    let schema = IsolatedSchema::new("ac_expiry").await;
    let ac = PostgresActionCache::new(schema.pool.clone(), Some(Duration::from_secs(86400)));
    let result = |code| ActionResult {
        exit_code: code,
        ..Default::default()
    };
    let (old, read, fresh) = (
        Digest::of_bytes(b"unused for two days"),
        Digest::of_bytes(b"old but read today"),
        Digest::of_bytes(b"written today"),
    );
    for (i, d) in [old, read, fresh].iter().enumerate() {
        ac.put("main", d, &result(i as i32)).await.unwrap();
    }
    schema
        .pool
        .client()
        .await
        .unwrap()
        .execute(
            "UPDATE buildkube_action_results SET accessed = now() - interval '2 days'
             WHERE hash = ANY($1)",
            &[&vec![
                old.hash_bytes().as_slice(),
                read.hash_bytes().as_slice(),
            ]],
        )
        .await
        .unwrap();
    assert_eq!(ac.get("main", &read).await.unwrap(), Some(result(1)));
    assert_eq!(ac.expire_unused().await.unwrap(), 1);
    assert_eq!(ac.get("main", &old).await.unwrap(), None);
    assert_eq!(ac.get("main", &read).await.unwrap(), Some(result(1)));
    assert_eq!(ac.get("main", &fresh).await.unwrap(), Some(result(2)));
    // Without an expiry nothing is deleted.
    let keep_all = PostgresActionCache::new(schema.pool.clone(), None);
    assert_eq!(keep_all.expire_unused().await.unwrap(), 0);
    drop((ac, keep_all));
    schema.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_measured_by_the_maintenance_task() {
    let schema = IsolatedSchema::new("usage").await;
    let options = PostgresCasOptions {
        maintenance_interval: Duration::from_millis(50),
        ..PostgresCasOptions::new(64 << 20, None)
    };
    let cas = PostgresCas::new(schema.pool.clone(), options);
    let (d, data) = crate::storage::conformance::unique_blob(4321);
    cas.put(d, data).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while cas.usage() != Some((4321, 1)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "usage still {:?}",
            cas.usage()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Without max_size nothing is deleted, however much is stored.
    assert_eq!(cas.maintain().await.unwrap().evicted_blobs, 0);
    drop(cas);
    schema.drop_schema().await;
}

/// Chunks that no blob row points to, and open uploads.
async fn staged_chunks_and_uploads(pool: &PostgresPool) -> (i64, i64) {
    let row = pool
        .client()
        .await
        .unwrap()
        .query_one(
            "SELECT
               (SELECT count(*) FROM buildkube_cas_content c WHERE NOT EXISTS
                  (SELECT 1 FROM buildkube_cas_blobs b WHERE b.content = c.content)),
               (SELECT count(*) FROM buildkube_cas_uploads)",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

async fn staged_chunks(pool: &PostgresPool) -> i64 {
    staged_chunks_and_uploads(pool).await.0
}

async fn wait_for_no_staged_chunks(pool: &PostgresPool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while staged_chunks_and_uploads(pool).await != (0, 0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "staged chunks were not deleted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn cas_in(schema: &IsolatedSchema) -> PostgresCas {
    PostgresCas::new(schema.pool.clone(), PostgresCasOptions::new(64 << 20, None))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_writes_store_chunks_as_they_fill_and_publish_at_once() {
    let schema = IsolatedSchema::new("stream").await;
    let cas = cas_in(&schema);
    let (d, data) = crate::storage::conformance::unique_blob(2 * PG_CHUNK as usize + 4321);
    let mut sink = cas.begin_write(d).await.unwrap();
    let mut offset = 0;
    for piece in data.chunks(100_000) {
        sink.append(offset as i64, Bytes::copy_from_slice(piece))
            .await
            .unwrap();
        offset += piece.len();
    }
    // Two full chunks are written, not yet a blob's; the rest in memory.
    assert_eq!(staged_chunks_and_uploads(&schema.pool).await, (2, 1));
    // Issue 8, finding 5: staged chunks count in the CAS's size.
    let report = cas.maintain().await.unwrap();
    assert_eq!(
        (report.stored_bytes, report.staged_bytes),
        (2 * PG_CHUNK, 2 * PG_CHUNK)
    );
    assert_eq!(cas.find_missing(&[d]).await.unwrap(), vec![d]);
    assert_eq!(cas.get(&d).await.unwrap(), None);
    sink.commit().await.unwrap();
    assert_eq!(staged_chunks_and_uploads(&schema.pool).await, (0, 0));
    assert_eq!(cas.get(&d).await.unwrap(), Some(data.clone()));

    // The same blob again: the second copy's chunks are deleted.
    let mut again = cas.begin_write(d).await.unwrap();
    again.append(0, data.clone()).await.unwrap();
    again.commit().await.unwrap();
    assert_eq!(staged_chunks_and_uploads(&schema.pool).await, (0, 0));
    let content_rows = schema.count("buildkube_cas_content").await;
    assert_eq!(content_rows, 3);
    assert_eq!(cas.maintain().await.unwrap().stored_blobs, 1);
    assert_eq!(cas.get(&d).await.unwrap(), Some(data));
    drop(cas);
    schema.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streaming_writes_of_one_blob_keep_one_copy() {
    let schema = IsolatedSchema::new("race").await;
    let cas = cas_in(&schema);
    let (d, data) = crate::storage::conformance::unique_blob(2 * PG_CHUNK as usize + 99);
    let uploads = (0..4).map(|_| {
        let cas = cas.clone();
        let data = data.clone();
        tokio::spawn(async move {
            let mut sink = cas.begin_write(d).await.unwrap();
            for (i, piece) in data.chunks(300_000).enumerate() {
                sink.append((i * 300_000) as i64, Bytes::copy_from_slice(piece))
                    .await
                    .unwrap();
            }
            sink.commit().await.unwrap();
        })
    });
    for upload in futures::future::join_all(uploads).await {
        upload.unwrap();
    }
    assert_eq!(cas.get(&d).await.unwrap(), Some(data));
    wait_for_no_staged_chunks(&schema.pool).await;
    let content_rows = schema.count("buildkube_cas_content").await;
    assert_eq!(content_rows, 3);
    drop(cas);
    schema.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_and_abandoned_streaming_writes_leave_nothing() {
    let schema = IsolatedSchema::new("abandon").await;
    let cas = cas_in(&schema);
    let (d, data) = crate::storage::conformance::unique_blob(3 * PG_CHUNK as usize);

    // Wrong bytes in the last chunk: refused at commit, staging deleted.
    let mut wrong = data.to_vec();
    *wrong.last_mut().unwrap() ^= 0xff;
    let mut sink = cas.begin_write(d).await.unwrap();
    sink.append(0, wrong.into()).await.unwrap();
    let err = sink.commit().await.unwrap_err();
    assert!(matches!(err, StorageError::DigestMismatch { .. }), "{err}");
    drop(sink);
    wait_for_no_staged_chunks(&schema.pool).await;
    assert_eq!(cas.find_missing(&[d]).await.unwrap(), vec![d]);

    // Dropped half way.
    let mut sink = cas.begin_write(d).await.unwrap();
    sink.append(0, data.slice(..2 * PG_CHUNK as usize))
        .await
        .unwrap();
    assert_eq!(staged_chunks(&schema.pool).await, 2);
    drop(sink);
    wait_for_no_staged_chunks(&schema.pool).await;

    // A chunk gone before commit (as if maintenance had taken the upload
    // for a dead server's): commit fails, nothing is published.
    let mut sink = cas.begin_write(d).await.unwrap();
    sink.append(0, data.clone()).await.unwrap();
    schema
        .pool
        .client()
        .await
        .unwrap()
        .execute("DELETE FROM buildkube_cas_content WHERE idx = 1", &[])
        .await
        .unwrap();
    let err = sink.commit().await.unwrap_err();
    assert!(
        err.to_string().contains("chunks of the upload are gone"),
        "{err}"
    );
    assert!(sink.append(0, data.slice(..1)).await.is_err());
    drop(sink);
    wait_for_no_staged_chunks(&schema.pool).await;
    assert_eq!(cas.find_missing(&[d]).await.unwrap(), vec![d]);
    assert_eq!(cas.get(&d).await.unwrap(), None);
    drop(cas);
    schema.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_deletes_uploads_abandoned_long_ago() {
    let schema = IsolatedSchema::new("stale").await;
    let cas = cas_in(&schema);
    let client = schema.pool.client().await.unwrap();
    client
        .batch_execute(
            "INSERT INTO buildkube_cas_uploads (content, started) VALUES
               (1, now() - interval '7 hours'), (2, now() - interval '1 hour');
             INSERT INTO buildkube_cas_content (content, idx, data) VALUES
               (1, 0, 'old'), (1, 1, 'old'), (2, 0, 'recent')",
        )
        .await
        .unwrap();
    cas.maintain().await.unwrap();
    let left: Vec<(i64, i64)> = client
        .query(
            "SELECT u.content, (SELECT count(*) FROM buildkube_cas_content c WHERE c.content = u.content)
             FROM buildkube_cas_uploads u",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(left, vec![(2, 1)]);
    assert_eq!(staged_chunks(&schema.pool).await, 1);
    drop(cas);
    schema.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_chunk_blobs_read_by_range_and_cap_is_enforced() {
    let cas = PostgresCas::new(pool().await, PostgresCasOptions::new(3 * PG_CHUNK, None));
    let (d, data) = crate::storage::conformance::unique_blob(2 * PG_CHUNK as usize + 123);
    cas.put(d, data.clone()).await.unwrap();
    assert_eq!(cas.get(&d).await.unwrap(), Some(data.clone()));
    use futures::TryStreamExt;
    let offset = PG_CHUNK - 10;
    let got: Vec<Bytes> = cas
        .read(&d, offset, PG_CHUNK + 20)
        .await
        .unwrap()
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(
        Bytes::from(got.concat()),
        data.slice(offset as usize..(offset + PG_CHUNK + 20) as usize)
    );
    let (big, _) = crate::storage::conformance::unique_blob(3 * PG_CHUNK as usize + 1);
    let err = cas.begin_write(big).await.err().unwrap();
    assert!(err.to_string().contains("max_blob_size"), "{err}");
}
