//! The CAS tables: whole-blob and streaming writes, range reads, touches.

use super::*;

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
        let maintainer = Arc::new(Maintainer::new(pool.inner.config.clone(), options.max_size));
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
