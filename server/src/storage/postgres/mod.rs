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

mod action_cache;
mod cas;
mod maintenance;
mod records;
#[cfg(test)]
mod tests;

pub use action_cache::PostgresActionCache;
pub use cas::{PostgresCas, PostgresCasOptions};
pub use maintenance::MaintenanceReport;
use maintenance::{every, AbortOnDrop, Maintainer};
pub use records::PostgresRecords;

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
