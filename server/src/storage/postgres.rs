//! PostgreSQL stores: the CAS as `bytea` chunks and the action cache as
//! encoded `ActionResult`s, in tables the server creates at start.
//!
//! A blob is published by one `INSERT` statement that writes its row in
//! `buildkube_cas_blobs` and all its chunks together, so readers on any
//! server see either nothing or the whole blob. Chunks are [`PG_CHUNK`]
//! bytes, so a range read fetches only the chunks it covers. Writes are
//! held in memory until verified, so blobs are capped by `max_blob_size`.
//!
//! Eviction: none by the server. Rows stay until deleted; an operator
//! prunes with e.g. `DELETE FROM buildkube_cas_blobs WHERE created < now() -
//! interval '30 days'` (chunks go with their blob; action results whose
//! outputs are gone are then cache misses).

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use buildkube_proto::reapi::ActionResult;
use buildkube_reapi::Digest;
use bytes::Bytes;
use prost::Message;
use tokio_postgres::{Client, NoTls};

use super::{
    decode_stored_result, stream_slice, verify, ActionResultStore, BlobSink, BlobStore, BlobStream,
    BufferedSink, PutVerified, StorageError, READ_CHUNK,
};

/// Bytes per stored chunk. Part of the table layout: changing it makes
/// stored blobs unreadable by range.
const PG_CHUNK: u64 = 1 << 20;

const STORE: &str = "postgres";

/// How long start-up waits for the database to accept connections.
const CONNECT_PATIENCE: Duration = Duration::from_secs(30);

const SCHEMA: &str = "
BEGIN;
SELECT pg_advisory_xact_lock(7461626);
CREATE TABLE IF NOT EXISTS buildkube_cas_blobs (
    hash bytea NOT NULL,
    size bigint NOT NULL,
    created timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (hash, size)
);
CREATE TABLE IF NOT EXISTS buildkube_cas_chunks (
    hash bytea NOT NULL,
    size bigint NOT NULL,
    idx integer NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (hash, size, idx),
    FOREIGN KEY (hash, size) REFERENCES buildkube_cas_blobs ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS buildkube_action_results (
    instance text NOT NULL,
    hash bytea NOT NULL,
    size bigint NOT NULL,
    result bytea NOT NULL,
    updated timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instance, hash, size)
);
COMMIT;
";

/// A few connections to one database, handed out round-robin and reopened
/// when they break.
#[derive(Clone)]
pub struct PostgresPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    config: tokio_postgres::Config,
    /// Where the database is, for messages (never the password).
    target: String,
    slots: Vec<tokio::sync::Mutex<Option<Arc<Client>>>>,
    next: AtomicUsize,
}

impl PostgresPool {
    /// Parses `url`, applies `password` and creates the tables, retrying
    /// for a while if the database is not up yet.
    pub async fn connect(
        url: &str,
        password: Option<&str>,
        pool_size: usize,
    ) -> Result<PostgresPool, StorageError> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(StorageError::backend(STORE, "parsing the url"))?;
        if let Some(password) = password {
            config.password(password.trim_end_matches(['\n', '\r']));
        }
        config.connect_timeout(Duration::from_secs(10));
        let target = format!(
            "{:?}/{}",
            config.get_hosts(),
            config.get_dbname().unwrap_or("")
        );
        let pool = PostgresPool {
            inner: Arc::new(PoolInner {
                config,
                target,
                slots: (0..pool_size.max(1))
                    .map(|_| tokio::sync::Mutex::new(None))
                    .collect(),
                next: AtomicUsize::new(0),
            }),
        };
        let deadline = tokio::time::Instant::now() + CONNECT_PATIENCE;
        loop {
            let attempt = async {
                pool.client()
                    .await?
                    .batch_execute(SCHEMA)
                    .await
                    .map_err(StorageError::backend(STORE, "creating the tables"))
            };
            match attempt.await {
                Ok(()) => break,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e, "PostgreSQL not ready; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e),
            }
        }
        tracing::info!(database = %pool.inner.target, "PostgreSQL store ready");
        Ok(pool)
    }

    async fn client(&self) -> Result<Arc<Client>, StorageError> {
        let inner = &self.inner;
        let i = inner.next.fetch_add(1, Ordering::Relaxed) % inner.slots.len();
        let mut slot = inner.slots[i].lock().await;
        if let Some(client) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(client.clone());
        }
        let (client, connection) =
            inner
                .config
                .connect(NoTls)
                .await
                .map_err(StorageError::backend(
                    STORE,
                    format!("connecting to {}", inner.target),
                ))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "PostgreSQL connection lost");
            }
        });
        let client = Arc::new(client);
        *slot = Some(client.clone());
        Ok(client)
    }
}

fn size_param(digest: &Digest) -> i64 {
    digest.size() as i64
}

/// The CAS in PostgreSQL.
#[derive(Clone)]
pub struct PostgresCas {
    pool: PostgresPool,
    max_blob_size: u64,
}

impl PostgresCas {
    /// The CAS over `pool`, accepting blobs up to `max_blob_size` bytes.
    pub fn new(pool: PostgresPool, max_blob_size: u64) -> PostgresCas {
        PostgresCas {
            pool,
            max_blob_size,
        }
    }

    fn check_size(&self, digest: &Digest) -> Result<(), StorageError> {
        if digest.size() > self.max_blob_size {
            return Err(StorageError::TooLarge {
                digest: *digest,
                what: "the postgres store's max_blob_size",
                limit: self.max_blob_size,
            });
        }
        Ok(())
    }

    async fn chunk(&self, digest: &Digest, idx: i32) -> Result<Option<Bytes>, StorageError> {
        let row = self
            .pool
            .client()
            .await?
            .query_opt(
                "SELECT data FROM buildkube_cas_chunks WHERE hash = $1 AND size = $2 AND idx = $3",
                &[&digest.hash_bytes().as_slice(), &size_param(digest), &idx],
            )
            .await
            .map_err(StorageError::backend(
                STORE,
                format!("reading chunk {idx} of {digest}"),
            ))?;
        Ok(row.map(|row| Bytes::from(row.get::<_, Vec<u8>>(0))))
    }
}

#[async_trait::async_trait]
impl PutVerified for PostgresCas {
    async fn put_verified(&self, digest: Digest, data: Bytes) -> Result<(), StorageError> {
        if digest.is_empty_blob() {
            return Ok(());
        }
        let chunks: Vec<&[u8]> = data.chunks(PG_CHUNK as usize).collect();
        self.pool
            .client()
            .await?
            .execute(
                "WITH blob AS (
                    INSERT INTO buildkube_cas_blobs (hash, size) VALUES ($1, $2)
                    ON CONFLICT DO NOTHING RETURNING 1
                 )
                 INSERT INTO buildkube_cas_chunks (hash, size, idx, data)
                 SELECT $1, $2, (t.ord - 1)::integer, t.data
                 FROM unnest($3::bytea[]) WITH ORDINALITY AS t(data, ord), blob
                 ON CONFLICT DO NOTHING",
                &[
                    &digest.hash_bytes().as_slice(),
                    &size_param(&digest),
                    &chunks,
                ],
            )
            .await
            .map_err(StorageError::backend(STORE, format!("storing {digest}")))?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl BlobStore for PostgresCas {
    async fn get(&self, digest: &Digest) -> Result<Option<Bytes>, StorageError> {
        if digest.is_empty_blob() {
            return Ok(Some(Bytes::new()));
        }
        let rows = self
            .pool
            .client()
            .await?
            .query(
                "SELECT data FROM buildkube_cas_chunks WHERE hash = $1 AND size = $2 ORDER BY idx",
                &[&digest.hash_bytes().as_slice(), &size_param(digest)],
            )
            .await
            .map_err(StorageError::backend(STORE, format!("reading {digest}")))?;
        if rows.is_empty() {
            return Ok(None);
        }
        let mut data = Vec::with_capacity(digest.size() as usize);
        for row in rows {
            data.extend_from_slice(row.get::<_, &[u8]>(0));
        }
        if data.len() as u64 != digest.size() {
            // Deleted while we read it: as good as absent.
            tracing::warn!(%digest, len = data.len(), "blob changed while read; reporting it missing");
            return Ok(None);
        }
        Ok(Some(data.into()))
    }

    async fn read(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Option<BlobStream>, StorageError> {
        if digest.is_empty_blob() {
            return Ok(Some(stream_slice(Bytes::new(), 0, 0)));
        }
        if !self.find_missing(&[*digest]).await?.is_empty() {
            return Ok(None);
        }
        let size = digest.size();
        let offset = offset.min(size);
        let end = offset.saturating_add(len).min(size);
        let store = self.clone();
        let digest = *digest;
        // One chunk at a time: memory stays at one PG_CHUNK per reader.
        let chunks = futures::stream::unfold(offset, move |at| {
            let store = store.clone();
            async move {
                if at >= end {
                    return None;
                }
                let idx = at / PG_CHUNK;
                let chunk_start = idx * PG_CHUNK;
                let result = match store.chunk(&digest, idx as i32).await {
                    Ok(Some(chunk)) => {
                        let from = (at - chunk_start) as usize;
                        let to = ((end - chunk_start) as usize).min(chunk.len());
                        if from >= to {
                            Err(StorageError::Backend {
                                store: STORE,
                                action: format!("reading chunk {idx} of {digest}"),
                                message: "chunk is shorter than the blob's size".into(),
                            })
                        } else {
                            Ok(chunk.slice(from..to))
                        }
                    }
                    Ok(None) => Err(StorageError::Backend {
                        store: STORE,
                        action: format!("reading chunk {idx} of {digest}"),
                        message: "the blob was deleted while being read".into(),
                    }),
                    Err(e) => Err(e),
                };
                let next = match &result {
                    Ok(piece) => at + piece.len() as u64,
                    Err(_) => end,
                };
                Some((result, next))
            }
        });
        // Split database chunks into READ_CHUNK pieces.
        use futures::StreamExt;
        let pieces = chunks.flat_map(|result| {
            let items: Vec<Result<Bytes, StorageError>> = match result {
                Ok(chunk) => (0..chunk.len())
                    .step_by(READ_CHUNK)
                    .map(|at| Ok(chunk.slice(at..(at + READ_CHUNK).min(chunk.len()))))
                    .collect(),
                Err(e) => vec![Err(e)],
            };
            futures::stream::iter(items)
        });
        Ok(Some(Box::pin(pieces)))
    }

    async fn put(&self, digest: Digest, data: Bytes) -> Result<(), StorageError> {
        verify(digest, &data).await?;
        self.check_size(&digest)?;
        self.put_verified(digest, data).await
    }

    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, StorageError> {
        let wanted: Vec<&Digest> = digests.iter().filter(|d| !d.is_empty_blob()).collect();
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let hashes: Vec<&[u8]> = wanted.iter().map(|d| d.hash_bytes().as_slice()).collect();
        let sizes: Vec<i64> = wanted.iter().map(|d| size_param(d)).collect();
        let rows = self
            .pool
            .client()
            .await?
            .query(
                "SELECT b.hash, b.size FROM buildkube_cas_blobs b
                 JOIN unnest($1::bytea[], $2::bigint[]) AS w(hash, size)
                   ON b.hash = w.hash AND b.size = w.size",
                &[&hashes, &sizes],
            )
            .await
            .map_err(StorageError::backend(
                STORE,
                format!("looking up {} blobs", wanted.len()),
            ))?;
        let present: HashSet<(Vec<u8>, i64)> = rows
            .iter()
            .map(|row| (row.get::<_, Vec<u8>>(0), row.get::<_, i64>(1)))
            .collect();
        Ok(wanted
            .into_iter()
            .filter(|d| !present.contains(&(d.hash_bytes().to_vec(), size_param(d))))
            .copied()
            .collect())
    }

    async fn begin_write(&self, digest: Digest) -> Result<Box<dyn BlobSink>, StorageError> {
        self.check_size(&digest)?;
        Ok(Box::new(BufferedSink::new(self.clone(), digest)))
    }
}

/// The action cache in PostgreSQL. Eviction: none by the server (see the module docs).
#[derive(Clone)]
pub struct PostgresActionCache {
    pool: PostgresPool,
}

impl PostgresActionCache {
    /// The action cache over `pool`.
    pub fn new(pool: PostgresPool) -> PostgresActionCache {
        PostgresActionCache { pool }
    }
}

#[async_trait::async_trait]
impl ActionResultStore for PostgresActionCache {
    async fn get(
        &self,
        instance: &str,
        action: &Digest,
    ) -> Result<Option<ActionResult>, StorageError> {
        let row = self
            .pool
            .client()
            .await?
            .query_opt(
                "SELECT result FROM buildkube_action_results
                 WHERE instance = $1 AND hash = $2 AND size = $3",
                &[
                    &instance,
                    &action.hash_bytes().as_slice(),
                    &size_param(action),
                ],
            )
            .await
            .map_err(StorageError::backend(
                STORE,
                format!("reading the action result of {action} in {instance:?}"),
            ))?;
        let Some(row) = row else { return Ok(None) };
        Ok(decode_stored_result(
            row.get::<_, &[u8]>(0),
            action,
            &format!("PostgreSQL action cache, instance {instance:?}"),
        ))
    }

    async fn put(
        &self,
        instance: &str,
        action: &Digest,
        result: &ActionResult,
    ) -> Result<(), StorageError> {
        self.pool
            .client()
            .await?
            .execute(
                "INSERT INTO buildkube_action_results (instance, hash, size, result)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (instance, hash, size)
                 DO UPDATE SET result = EXCLUDED.result, updated = now()",
                &[
                    &instance,
                    &action.hash_bytes().as_slice(),
                    &size_param(action),
                    &result.encode_to_vec(),
                ],
            )
            .await
            .map_err(StorageError::backend(
                STORE,
                format!("storing the action result of {action} in {instance:?}"),
            ))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
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
        let cas = PostgresCas::new(pool().await, 64 << 20);
        (Arc::new(cas) as crate::storage::SharedBlobStore, ())
    });

    crate::storage::conformance::action_store_conformance!(async {
        let ac = PostgresActionCache::new(pool().await);
        (Arc::new(ac) as Arc<dyn ActionResultStore>, ())
    });

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn multi_chunk_blobs_read_by_range_and_cap_is_enforced() {
        let cas = PostgresCas::new(pool().await, 3 * PG_CHUNK);
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
}
