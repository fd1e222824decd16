//! PostgreSQL stores: the CAS as `bytea` chunks and the action cache as
//! encoded `ActionResult`s, in tables the server creates at start (in the
//! first schema of the connection's `search_path`).
//!
//! A blob's bytes are rows of `buildkube_cas_content`, [`PG_CHUNK`] bytes
//! each, under a random content id; its row in `buildkube_cas_blobs` maps
//! the digest to that id and is what makes it visible, so readers on any
//! server see either nothing or the whole blob, and a range read fetches
//! only the chunks it covers. A whole blob is written in one statement. A
//! streaming write registers its content id in `buildkube_cas_uploads`,
//! writes each chunk as soon as it is full (the server holds at most one
//! chunk of an upload) and, once every byte hashes to the digest, publishes
//! with one statement that claims the upload and inserts the blob row: the
//! bytes are written once, never copied. Chunks of abandoned uploads are
//! deleted when the upload is dropped, and those a crashed server left by
//! the maintenance task after [`UPLOAD_LIFETIME`].
//!
//! Eviction: every blob row carries `accessed`, refreshed when the blob is
//! found, read or uploaded again (at most once per [`PostgresCasOptions::touch_after`],
//! so hot blobs do not turn every lookup into a write). A maintenance task
//! measures the table every [`PostgresCasOptions::maintenance_interval`]
//! (the `buildkube_cas_bytes` gauge) and, with `max_size` set and exceeded,
//! deletes the least recently accessed blobs until 90% of `max_size` is
//! left; chunks go with their blob. Servers sharing a database take turns
//! through an advisory lock. Action results whose outputs are deleted
//! become cache misses. Action results carry `accessed` too; with
//! `expire_unused_after_secs` those unused that long are deleted every
//! [`AC_EXPIRY_INTERVAL`].

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use buildkube_proto::reapi::ActionResult;
use buildkube_reapi::Digest;
use bytes::{Bytes, BytesMut};
use prost::Message;
use tokio_postgres::{Client, NoTls};

use super::{
    decode_stored_result, stream_slice, verify, ActionResultStore, BlobSink, BlobStore, BlobStream,
    StorageError, UploadProgress, READ_CHUNK,
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
    content bigint NOT NULL,
    created timestamptz NOT NULL DEFAULT now(),
    accessed timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (hash, size)
);
CREATE INDEX IF NOT EXISTS buildkube_cas_blobs_by_access ON buildkube_cas_blobs (accessed);
CREATE TABLE IF NOT EXISTS buildkube_cas_content (
    content bigint NOT NULL,
    idx integer NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (content, idx)
);
CREATE TABLE IF NOT EXISTS buildkube_cas_uploads (
    content bigint PRIMARY KEY,
    started timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS buildkube_action_results (
    instance text NOT NULL,
    hash bytea NOT NULL,
    size bigint NOT NULL,
    result bytea NOT NULL,
    updated timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instance, hash, size)
);
ALTER TABLE buildkube_action_results ADD COLUMN IF NOT EXISTS accessed timestamptz NOT NULL DEFAULT now();
CREATE INDEX IF NOT EXISTS buildkube_action_results_by_access ON buildkube_action_results (accessed);
CREATE TABLE IF NOT EXISTS buildkube_records (
    kind text NOT NULL,
    key text NOT NULL,
    value bytea NOT NULL,
    updated timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, key)
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
            // Only reaching the database is retried; SQL errors are final.
            let attempt = async { pool.client().await.map(drop) };
            match attempt.await {
                Ok(()) => break,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e, "PostgreSQL not ready; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e),
            }
        }
        pool.check_layout().await?;
        pool.client()
            .await?
            .batch_execute(SCHEMA)
            .await
            .map_err(StorageError::backend(STORE, "creating the tables"))?;
        tracing::info!(database = %pool.inner.target, "PostgreSQL store ready");
        Ok(pool)
    }

    /// Refuses tables of an earlier layout (which `CREATE TABLE IF NOT
    /// EXISTS` would keep), naming what to do, instead of failing every query.
    async fn check_layout(&self) -> Result<(), StorageError> {
        let row = self
            .client()
            .await?
            .query_one(
                "SELECT
                   EXISTS (SELECT FROM information_schema.tables
                           WHERE table_schema = current_schema() AND table_name = 'buildkube_cas_blobs'),
                   EXISTS (SELECT FROM information_schema.columns
                           WHERE table_schema = current_schema() AND table_name = 'buildkube_cas_blobs'
                             AND column_name = 'content')",
                &[],
            )
            .await
            .map_err(StorageError::backend(STORE, "checking the table layout"))?;
        let (table, content) = (row.get::<_, bool>(0), row.get::<_, bool>(1));
        if table && !content {
            return Err(StorageError::Backend {
                store: STORE,
                action: "checking the table layout".into(),
                message: "buildkube_cas_blobs has the layout of an earlier buildkube version \
                    (no `content` column); drop buildkube_cas_blobs and buildkube_cas_chunks \
                    (CASCADE) and restart: the CAS is a cache, clients upload again"
                    .into(),
            });
        }
        Ok(())
    }

    /// Where the database is (hosts and database name, never the password).
    pub fn target(&self) -> &str {
        &self.inner.target
    }

    pub(super) async fn client(&self) -> Result<Arc<Client>, StorageError> {
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

/// A fresh key for the chunks of one write.
fn new_content_id() -> i64 {
    uuid::Uuid::new_v4().as_u64_pair().0 as i64
}

/// How often unused action results are looked for.
const AC_EXPIRY_INTERVAL: Duration = Duration::from_secs(60);

/// Uploads started longer ago than this will not be finished by any server.
const UPLOAD_LIFETIME: &str = "6 hours";

/// Advisory lock key held by the server that is evicting from a database.
const EVICTION_LOCK: i64 = 7461627;
/// Oldest blobs considered per eviction statement.
const EVICTION_BATCH: i64 = 1000;
/// Deleting blobs accessed more recently than this means the budget is too
/// small for the working set: said in a warning.
const YOUNG_EVICTION: f64 = 300.0;

/// Limits and timing of a [`PostgresCas`].
#[derive(Debug, Clone)]
pub struct PostgresCasOptions {
    /// Largest blob accepted, in bytes.
    pub max_blob_size: u64,
    /// Bytes of blobs kept; `None`: the server deletes nothing.
    pub max_size: Option<u64>,
    /// How often the table is measured (and pruned, with `max_size`).
    pub maintenance_interval: Duration,
    /// A blob's access time is refreshed when it is older than this.
    pub touch_after: Duration,
}

impl PostgresCasOptions {
    /// Blobs up to `max_blob_size`, at most `max_size` bytes in all, with
    /// the default timing (measured every 30 s, access times kept to a minute).
    pub fn new(max_blob_size: u64, max_size: Option<u64>) -> PostgresCasOptions {
        PostgresCasOptions {
            max_blob_size,
            max_size,
            maintenance_interval: Duration::from_secs(30),
            touch_after: Duration::from_secs(60),
        }
    }
}

/// What one maintenance pass found and did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MaintenanceReport {
    /// Bytes stored after the pass: blobs, and the staged chunks of
    /// unfinished uploads (which count in `max_size` too).
    pub stored_bytes: u64,
    /// Of `stored_bytes`, the staged chunks of unfinished uploads.
    pub staged_bytes: u64,
    /// Blobs stored after the pass.
    pub stored_blobs: usize,
    /// Blobs deleted by the pass.
    pub evicted_blobs: usize,
    /// Bytes of blobs deleted by the pass.
    pub evicted_bytes: u64,
}

/// The CAS in PostgreSQL.
#[derive(Clone)]
pub struct PostgresCas {
    pool: PostgresPool,
    max_blob_size: u64,
    touch_after_secs: f64,
    maintainer: Arc<Maintainer>,
    /// Stops the maintenance task when the last clone is dropped.
    _maintenance: Arc<AbortOnDrop>,
}

impl PostgresCas {
    /// The CAS over `pool`; starts its maintenance task (needs a Tokio runtime).
    pub fn new(pool: PostgresPool, options: PostgresCasOptions) -> PostgresCas {
        let maintainer = Arc::new(Maintainer {
            config: pool.inner.config.clone(),
            max_size: options.max_size,
            connection: tokio::sync::Mutex::new(None),
            stored_bytes: AtomicU64::new(0),
            stored_blobs: AtomicUsize::new(0),
            measured: AtomicBool::new(false),
        });
        let task = every(
            options.maintenance_interval,
            "PostgreSQL CAS maintenance",
            {
                let maintainer = maintainer.clone();
                move || {
                    let maintainer = maintainer.clone();
                    async move { maintainer.pass().await.map(drop) }
                }
            },
        );
        PostgresCas {
            pool,
            max_blob_size: options.max_blob_size,
            touch_after_secs: options.touch_after.as_secs_f64(),
            maintainer,
            _maintenance: Arc::new(task),
        }
    }

    /// Measures the store now and prunes it to its budget, as the
    /// maintenance task does every interval.
    pub async fn maintain(&self) -> Result<MaintenanceReport, StorageError> {
        self.maintainer.pass().await
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

    /// Refreshes the access time of those of `digests` last touched more
    /// than `touch_after` ago.
    async fn touch(&self, digests: &[Digest]) -> Result<(), StorageError> {
        if digests.is_empty() {
            return Ok(());
        }
        let hashes: Vec<&[u8]> = digests.iter().map(|d| d.hash_bytes().as_slice()).collect();
        let sizes: Vec<i64> = digests.iter().map(size_param).collect();
        self.pool
            .client()
            .await?
            .execute(
                "UPDATE buildkube_cas_blobs b SET accessed = now()
                 FROM unnest($1::bytea[], $2::bigint[]) AS w(hash, size)
                 WHERE b.hash = w.hash AND b.size = w.size
                   AND b.accessed < now() - make_interval(secs => $3)",
                &[&hashes, &sizes, &self.touch_after_secs],
            )
            .await
            .map_err(StorageError::backend(
                STORE,
                format!("refreshing the access time of {} blobs", digests.len()),
            ))?;
        Ok(())
    }

    async fn chunk(&self, digest: &Digest, idx: i32) -> Result<Option<Bytes>, StorageError> {
        let row = self
            .pool
            .client()
            .await?
            .query_opt(
                "SELECT c.data FROM buildkube_cas_blobs b
                 JOIN buildkube_cas_content c ON c.content = b.content
                 WHERE b.hash = $1 AND b.size = $2 AND c.idx = $3",
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

impl PostgresCas {
    /// Publishes a blob already verified against its digest in one statement.
    async fn put_verified(&self, digest: Digest, data: Bytes) -> Result<(), StorageError> {
        if digest.is_empty_blob() {
            return Ok(());
        }
        let chunks: Vec<&[u8]> = data.chunks(PG_CHUNK as usize).collect();
        // The content goes in only with the blob row, in the same statement.
        let inserted = self
            .pool
            .client()
            .await?
            .execute(
                "WITH blob AS (
                    INSERT INTO buildkube_cas_blobs (hash, size, content) VALUES ($1, $2, $3)
                    ON CONFLICT DO NOTHING RETURNING 1
                 )
                 INSERT INTO buildkube_cas_content (content, idx, data)
                 SELECT $3, (t.ord - 1)::integer, t.data
                 FROM unnest($4::bytea[]) WITH ORDINALITY AS t(data, ord), blob",
                &[
                    &digest.hash_bytes().as_slice(),
                    &size_param(&digest),
                    &new_content_id(),
                    &chunks,
                ],
            )
            .await
            .map_err(StorageError::backend(STORE, format!("storing {digest}")))?;
        if inserted == 0 {
            // Stored already: uploaded again because a client needs it.
            self.touch(&[digest]).await?;
        }
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
                // Read and keep (refresh the access time) in one round trip.
                "WITH touched AS (
                     UPDATE buildkube_cas_blobs SET accessed = now()
                     WHERE hash = $1 AND size = $2
                       AND accessed < now() - make_interval(secs => $3)
                 )
                 SELECT c.data FROM buildkube_cas_blobs b
                 JOIN buildkube_cas_content c ON c.content = b.content
                 WHERE b.hash = $1 AND b.size = $2 ORDER BY c.idx",
                &[
                    &digest.hash_bytes().as_slice(),
                    &size_param(digest),
                    &self.touch_after_secs,
                ],
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
                // Which of the wanted are stored (by their position in the
                // request), and whether their access time needs refreshing.
                "SELECT w.i, b.accessed < now() - make_interval(secs => $3)
                 FROM buildkube_cas_blobs b
                 JOIN unnest($1::bytea[], $2::bigint[]) WITH ORDINALITY AS w(hash, size, i)
                   ON b.hash = w.hash AND b.size = w.size",
                &[&hashes, &sizes, &self.touch_after_secs],
            )
            .await
            .map_err(StorageError::backend(
                STORE,
                format!("looking up {} blobs", wanted.len()),
            ))?;
        let mut present = vec![false; wanted.len()];
        let mut stale = Vec::new();
        for row in &rows {
            let i = row.get::<_, i64>(0) as usize - 1;
            present[i] = true;
            if row.get::<_, bool>(1) {
                stale.push(*wanted[i]);
            }
        }
        // The client is about to use what it was told exists: keep it.
        self.touch(&stale).await?;
        Ok(wanted
            .into_iter()
            .zip(present)
            .filter(|(_, present)| !present)
            .map(|(d, _)| *d)
            .collect())
    }

    async fn begin_write(&self, digest: Digest) -> Result<Box<dyn BlobSink>, StorageError> {
        self.check_size(&digest)?;
        Ok(Box::new(PostgresSink {
            cas: self.clone(),
            progress: UploadProgress::new(digest),
            content: new_content_id(),
            pending: BytesMut::new(),
            staged_chunks: 0,
            failed: false,
        }))
    }

    fn usage(&self) -> Option<(u64, usize)> {
        self.maintainer.usage()
    }
}

/// A streaming write: each full chunk is written under the upload's
/// content id as it arrives; commit verifies the digest and publishes the
/// blob row (see the module docs).
struct PostgresSink {
    cas: PostgresCas,
    progress: UploadProgress,
    /// Key of this upload's chunks and of its `buildkube_cas_uploads` row.
    content: i64,
    /// Bytes received but not written: less than one chunk.
    pending: BytesMut,
    /// Chunks written and not yet published or discarded.
    staged_chunks: i32,
    /// A write failed: the upload cannot be completed.
    failed: bool,
}

impl PostgresSink {
    /// Writes the next chunk; a failure makes the upload unusable.
    async fn stage(&mut self, data: &[u8]) -> Result<(), StorageError> {
        let staged = self.write_chunk(data).await;
        self.failed |= staged.is_err();
        staged
    }

    async fn write_chunk(&mut self, data: &[u8]) -> Result<(), StorageError> {
        let digest = self.progress.digest();
        let idx = self.staged_chunks;
        // The first chunk registers the upload, so that the chunks of one
        // that is never finished can be found and deleted.
        let statement = if idx == 0 {
            "WITH upload AS (INSERT INTO buildkube_cas_uploads (content) VALUES ($1))
             INSERT INTO buildkube_cas_content (content, idx, data) VALUES ($1, $2, $3)"
        } else {
            "INSERT INTO buildkube_cas_content (content, idx, data) VALUES ($1, $2, $3)"
        };
        self.cas
            .pool
            .client()
            .await?
            .execute(statement, &[&self.content, &idx, &data])
            .await
            .map_err(StorageError::backend(
                STORE,
                format!("writing chunk {idx} of {digest}"),
            ))?;
        self.staged_chunks += 1;
        Ok(())
    }

    fn check_usable(&self) -> Result<(), StorageError> {
        if self.failed {
            return Err(StorageError::Backend {
                store: STORE,
                action: format!("writing {}", self.progress.digest()),
                message: "an earlier write of this upload failed; start it again".into(),
            });
        }
        Ok(())
    }

    /// Claims the upload and inserts the blob row over its chunks; false if
    /// the blob was stored already (then the chunks are deleted, in the same
    /// statement).
    async fn publish_staged(&self) -> Result<bool, StorageError> {
        let digest = self.progress.digest();
        let row = self
            .cas
            .pool
            .client()
            .await?
            .query_one(
                "WITH claimed AS (
                     DELETE FROM buildkube_cas_uploads WHERE content = $3 RETURNING 1
                 ), ready AS (
                     SELECT (SELECT count(*) FROM claimed) = 1
                        AND (SELECT count(*) FROM buildkube_cas_content WHERE content = $3) = $4
                        AS complete
                 ), blob AS (
                     INSERT INTO buildkube_cas_blobs (hash, size, content)
                     SELECT $1, $2, $3 FROM ready WHERE ready.complete
                     ON CONFLICT DO NOTHING RETURNING 1
                 ), discarded AS (
                     DELETE FROM buildkube_cas_content
                     WHERE content = $3 AND NOT EXISTS (SELECT 1 FROM blob)
                 )
                 SELECT (SELECT complete FROM ready), (SELECT count(*) FROM blob)",
                &[
                    &digest.hash_bytes().as_slice(),
                    &size_param(&digest),
                    &self.content,
                    &(self.staged_chunks as i64),
                ],
            )
            .await
            .map_err(StorageError::backend(STORE, format!("publishing {digest}")))?;
        if !row.get::<_, bool>(0) {
            return Err(StorageError::Backend {
                store: STORE,
                action: format!("publishing {digest}"),
                message: format!(
                    "chunks of the upload are gone (an upload is abandoned after {UPLOAD_LIFETIME}); upload it again"
                ),
            });
        }
        Ok(row.get::<_, i64>(1) == 1)
    }
}

#[async_trait::async_trait]
impl BlobSink for PostgresSink {
    fn digest(&self) -> Digest {
        self.progress.digest()
    }

    fn committed_size(&self) -> u64 {
        self.progress.committed_size()
    }

    async fn append(&mut self, offset: i64, data: Bytes) -> Result<(), StorageError> {
        self.check_usable()?;
        self.progress.check(offset, data.len())?;
        self.progress.update(&data);
        self.pending.extend_from_slice(&data);
        while self.pending.len() as u64 >= PG_CHUNK {
            let chunk = self.pending.split_to(PG_CHUNK as usize);
            self.stage(&chunk).await?;
        }
        Ok(())
    }

    async fn commit(&mut self) -> Result<(), StorageError> {
        if self.progress.is_committed() {
            return Ok(());
        }
        self.check_usable()?;
        self.progress.finish().inspect_err(|_| self.failed = true)?;
        let digest = self.progress.digest();
        if self.staged_chunks == 0 {
            // At most one chunk: published straight from memory.
            let data = std::mem::take(&mut self.pending).freeze();
            return self.cas.put_verified(digest, data).await;
        }
        if !self.pending.is_empty() {
            let last = std::mem::take(&mut self.pending);
            self.stage(&last).await?;
        }
        let published = self.publish_staged().await;
        // Claimed either way: the chunks are the blob's now, or deleted.
        self.staged_chunks = 0;
        let inserted = published.inspect_err(|_| self.failed = true)?;
        if !inserted {
            self.cas.touch(&[digest]).await?;
        }
        Ok(())
    }
}

impl Drop for PostgresSink {
    fn drop(&mut self) {
        if self.staged_chunks == 0 {
            return;
        }
        // Abandoned with chunks written: delete them, but only while the
        // upload is still unclaimed (a publish whose answer was lost may have
        // made them a blob's). A crash leaves them to the maintenance task.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let pool = self.cas.pool.clone();
        let content = self.content;
        let digest = self.progress.digest();
        runtime.spawn(async move {
            let deleted = async {
                pool.client()
                    .await?
                    .execute(
                        "WITH upload AS (
                             DELETE FROM buildkube_cas_uploads WHERE content = $1 RETURNING 1
                         )
                         DELETE FROM buildkube_cas_content
                         WHERE content = $1 AND EXISTS (SELECT 1 FROM upload)",
                        &[&content],
                    )
                    .await
                    .map_err(StorageError::backend(STORE, "deleting the chunks of an abandoned upload"))
            };
            if let Err(e) = deleted.await {
                tracing::warn!(%digest, error = %e, "could not delete the chunks of an abandoned upload; maintenance will");
            }
        });
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

/// Runs `pass` now and then every `interval` (a late pass delays the next
/// rather than bunching up), logging failures as `what`; until dropped.
fn every<F, Fut>(interval: Duration, what: &'static str, pass: F) -> AbortOnDrop
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), StorageError>> + Send,
{
    AbortOnDrop(tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if let Err(e) = pass().await {
                tracing::warn!(error = %e, "{what} failed; retrying at the next interval");
            }
        }
    }))
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Measures and prunes the CAS tables over a connection of its own (it
/// holds a session lock and must not share a connection with other work).
struct Maintainer {
    config: tokio_postgres::Config,
    max_size: Option<u64>,
    connection: tokio::sync::Mutex<Option<Client>>,
    stored_bytes: AtomicU64,
    stored_blobs: AtomicUsize,
    measured: AtomicBool,
}

impl Maintainer {
    fn usage(&self) -> Option<(u64, usize)> {
        self.measured.load(Ordering::Relaxed).then(|| {
            (
                self.stored_bytes.load(Ordering::Relaxed),
                self.stored_blobs.load(Ordering::Relaxed),
            )
        })
    }

    async fn pass(&self) -> Result<MaintenanceReport, StorageError> {
        let mut slot = self.connection.lock().await;
        if slot.as_ref().is_none_or(|c| c.is_closed()) {
            let (client, connection) = self
                .config
                .connect(NoTls)
                .await
                .map_err(StorageError::backend(STORE, "connecting for maintenance"))?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!(error = %e, "PostgreSQL maintenance connection lost");
                }
            });
            *slot = Some(client);
        }
        let client = slot.as_ref().expect("connected above");
        let result = self.measure_and_prune(client).await;
        if result.is_err() {
            // Whatever state the session is in (a held lock), start afresh.
            *slot = None;
        }
        let report = result?;
        self.stored_bytes
            .store(report.stored_bytes, Ordering::Relaxed);
        self.stored_blobs
            .store(report.stored_blobs, Ordering::Relaxed);
        self.measured.store(true, Ordering::Relaxed);
        Ok(report)
    }

    async fn measure_and_prune(&self, client: &Client) -> Result<MaintenanceReport, StorageError> {
        let row = client
            .query_one(
                "SELECT (SELECT coalesce(sum(size), 0) FROM buildkube_cas_blobs)::bigint,
                        (SELECT count(*) FROM buildkube_cas_blobs),
                        (SELECT coalesce(sum(length(c.data)), 0) FROM buildkube_cas_content c
                         JOIN buildkube_cas_uploads u ON u.content = c.content)::bigint",
                &[],
            )
            .await
            .map_err(StorageError::backend(STORE, "measuring the CAS"))?;
        client
            .execute(
                &format!(
                    "WITH dead AS (
                         DELETE FROM buildkube_cas_uploads
                         WHERE started < now() - interval '{UPLOAD_LIFETIME}' RETURNING content
                     )
                     DELETE FROM buildkube_cas_content c USING dead WHERE c.content = dead.content"
                ),
                &[],
            )
            .await
            .map_err(StorageError::backend(STORE, "deleting abandoned uploads"))?;
        let staged_bytes = row.get::<_, i64>(2) as u64;
        let mut report = MaintenanceReport {
            stored_bytes: row.get::<_, i64>(0) as u64 + staged_bytes,
            staged_bytes,
            stored_blobs: row.get::<_, i64>(1) as usize,
            evicted_blobs: 0,
            evicted_bytes: 0,
        };
        let Some(max_size) = self.max_size else {
            return Ok(report);
        };
        if report.stored_bytes <= max_size {
            return Ok(report);
        }
        let locked: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&EVICTION_LOCK])
            .await
            .map_err(StorageError::backend(STORE, "taking the eviction lock"))?
            .get(0);
        if !locked {
            tracing::debug!("another server is evicting from the PostgreSQL CAS");
            return Ok(report);
        }
        let target = max_size - max_size / 10;
        let mut youngest_age = f64::INFINITY;
        let pruned = async {
            while report.stored_bytes > target {
                let need = (report.stored_bytes - target) as i64;
                // The oldest blobs whose running total first reaches `need`;
                // one touched since it was picked is spared.
                let rows = client
                    .query(
                        "WITH gone AS (
                         DELETE FROM buildkube_cas_blobs b
                         USING (
                             SELECT hash, size, accessed FROM (
                                 SELECT hash, size, accessed,
                                        sum(size) OVER (ORDER BY accessed, hash ROWS UNBOUNDED PRECEDING) AS running
                                 FROM (SELECT hash, size, accessed FROM buildkube_cas_blobs
                                       ORDER BY accessed LIMIT $2::bigint) oldest
                             ) o WHERE running - size < $1::bigint
                         ) v
                         WHERE b.hash = v.hash AND b.size = v.size AND b.accessed = v.accessed
                         RETURNING b.size, b.content, extract(epoch FROM now() - b.accessed)::float8 AS age
                         ), content AS (
                             DELETE FROM buildkube_cas_content c USING gone WHERE c.content = gone.content
                         )
                         SELECT size, age FROM gone",
                        &[&need, &EVICTION_BATCH],
                    )
                    .await
                    .map_err(StorageError::backend(STORE, "deleting least recently used blobs"))?;
                if rows.is_empty() {
                    break;
                }
                for row in &rows {
                    let size = row.get::<_, i64>(0) as u64;
                    youngest_age = youngest_age.min(row.get::<_, f64>(1));
                    report.evicted_blobs += 1;
                    report.evicted_bytes += size;
                    report.stored_bytes = report.stored_bytes.saturating_sub(size);
                    report.stored_blobs = report.stored_blobs.saturating_sub(1);
                }
            }
            Ok::<(), StorageError>(())
        }
        .await;
        let unlocked = client
            .query_one("SELECT pg_advisory_unlock($1)", &[&EVICTION_LOCK])
            .await
            .map_err(StorageError::backend(STORE, "releasing the eviction lock"));
        pruned?;
        unlocked?;
        tracing::info!(
            evicted_blobs = report.evicted_blobs,
            evicted_bytes = report.evicted_bytes,
            stored_bytes = report.stored_bytes,
            max_size,
            "PostgreSQL CAS was over its max_size: deleted the least recently used blobs"
        );
        if youngest_age < YOUNG_EVICTION {
            tracing::warn!(
                youngest_evicted_age_secs = youngest_age as u64,
                max_size,
                "PostgreSQL CAS deleted blobs used in the last minutes: max_size is too small for the working set"
            );
        }
        Ok(report)
    }
}

/// The action cache in PostgreSQL; entries unused for `expire_unused_after`
/// are deleted (see the module docs).
#[derive(Clone)]
pub struct PostgresActionCache {
    pool: PostgresPool,
    expire_unused_after: Option<Duration>,
    /// Stops the expiry task when the last clone is dropped.
    _expiry: Option<Arc<AbortOnDrop>>,
}

impl PostgresActionCache {
    /// The action cache over `pool`; with `expire_unused_after`, starts the
    /// task that deletes entries unused that long (needs a Tokio runtime).
    pub fn new(pool: PostgresPool, expire_unused_after: Option<Duration>) -> PostgresActionCache {
        let expiry = expire_unused_after.map(|_| {
            let cache = PostgresActionCache {
                pool: pool.clone(),
                expire_unused_after,
                _expiry: None,
            };
            Arc::new(every(
                AC_EXPIRY_INTERVAL,
                "expiring unused action results",
                move || {
                    let cache = cache.clone();
                    async move { cache.expire_unused().await.map(drop) }
                },
            ))
        });
        PostgresActionCache {
            pool,
            expire_unused_after,
            _expiry: expiry,
        }
    }

    /// Deletes the entries unused for `expire_unused_after` now, as the
    /// expiry task does every minute; returns how many went.
    pub async fn expire_unused(&self) -> Result<u64, StorageError> {
        let Some(after) = self.expire_unused_after else {
            return Ok(0);
        };
        let deleted = self
            .pool
            .client()
            .await?
            .execute(
                "DELETE FROM buildkube_action_results
                 WHERE accessed < now() - make_interval(secs => $1)",
                &[&after.as_secs_f64()],
            )
            .await
            .map_err(StorageError::backend(
                STORE,
                "expiring unused action results",
            ))?;
        if deleted > 0 {
            tracing::info!(
                deleted,
                unused_for_secs = after.as_secs(),
                "deleted unused action results"
            );
        }
        Ok(deleted)
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
                // Read and keep (refresh the access time, at most once a minute).
                "WITH touched AS (
                     UPDATE buildkube_action_results SET accessed = now()
                     WHERE instance = $1 AND hash = $2 AND size = $3
                       AND accessed < now() - interval '1 minute'
                 )
                 SELECT result FROM buildkube_action_results
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
                 DO UPDATE SET result = EXCLUDED.result, updated = now(), accessed = now()",
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
}
