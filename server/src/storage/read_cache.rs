//! A fast store (usually a local [`super::FsCas`]) in front of a shared
//! backing store. The backing store is the authority: writes and presence
//! checks go there. Reads are answered from the cache when it has the blob;
//! otherwise the blob is copied from the backing store into the cache as it
//! is read (when the cache accepts it) so the next read is local.
//!
//! Eviction: the cache evicts on its own (FsCas: LRU within its budget);
//! losing a cached blob costs one backing read. Blobs the backing store
//! drops may still be served from the cache until the cache drops them.

use buildkube_reapi::Digest;
use bytes::Bytes;
use futures::TryStreamExt;

use super::{BlobSink, BlobStore, BlobStream, SharedBlobStore, StorageError};

/// Read-through cache decorator.
pub struct ReadCache {
    cache: SharedBlobStore,
    backing: SharedBlobStore,
}

impl ReadCache {
    /// `cache` in front of `backing`.
    pub fn new(cache: SharedBlobStore, backing: SharedBlobStore) -> ReadCache {
        ReadCache { cache, backing }
    }

    /// Copies `digest` from the backing store into the cache; false if the
    /// backing store lacks it or the cache refuses it.
    async fn fill(&self, digest: &Digest) -> Result<bool, StorageError> {
        let mut sink = match self.cache.begin_write(*digest).await {
            Ok(sink) => sink,
            Err(e) => {
                tracing::debug!(%digest, error = %e, "read cache declines blob");
                return Ok(false);
            }
        };
        let Some(mut stream) = self.backing.read(digest, 0, digest.size()).await? else {
            return Ok(false);
        };
        let mut offset = 0u64;
        while let Some(chunk) = stream.try_next().await? {
            let len = chunk.len() as u64;
            if let Err(e) = sink.append(offset as i64, chunk).await {
                tracing::warn!(%digest, error = %e, "filling the read cache failed");
                return Ok(false);
            }
            offset += len;
        }
        if let Err(e) = sink.commit().await {
            tracing::warn!(%digest, error = %e, "filling the read cache failed");
            return Ok(false);
        }
        Ok(true)
    }
}

#[async_trait::async_trait]
impl BlobStore for ReadCache {
    async fn get(&self, digest: &Digest) -> Result<Option<Bytes>, StorageError> {
        if let Some(data) = self.cache.get(digest).await? {
            return Ok(Some(data));
        }
        let Some(data) = self.backing.get(digest).await? else {
            return Ok(None);
        };
        if let Err(e) = self.cache.put(*digest, data.clone()).await {
            tracing::debug!(%digest, error = %e, "read cache declines blob");
        }
        Ok(Some(data))
    }

    async fn read(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Option<BlobStream>, StorageError> {
        if let Some(stream) = self.cache.read(digest, offset, len).await? {
            return Ok(Some(stream));
        }
        if self.fill(digest).await? {
            if let Some(stream) = self.cache.read(digest, offset, len).await? {
                return Ok(Some(stream));
            }
        }
        self.backing.read(digest, offset, len).await
    }

    async fn put(&self, digest: Digest, data: Bytes) -> Result<(), StorageError> {
        self.backing.put(digest, data.clone()).await?;
        if let Err(e) = self.cache.put(digest, data).await {
            tracing::debug!(%digest, error = %e, "read cache declines blob");
        }
        Ok(())
    }

    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, StorageError> {
        self.backing.find_missing(digests).await
    }

    async fn begin_write(&self, digest: Digest) -> Result<Box<dyn BlobSink>, StorageError> {
        self.backing.begin_write(digest).await
    }

    /// What the authoritative store holds (the cache holds a subset).
    fn usage(&self) -> Option<(u64, usize)> {
        self.backing.usage()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::FsCas;
    use std::sync::Arc;

    async fn fs(dir: &std::path::Path, budget: u64) -> SharedBlobStore {
        Arc::new(FsCas::open(dir, budget).await.unwrap())
    }

    // Two filesystem stores: the decorator's behaviour, without a network.
    crate::storage::conformance::blob_store_conformance!(async {
        let dir = tempfile::tempdir().unwrap();
        let cache = fs(&dir.path().join("cache"), 1 << 30).await;
        let backing = fs(&dir.path().join("backing"), 1 << 30).await;
        (
            Arc::new(ReadCache::new(cache, backing)) as SharedBlobStore,
            dir,
        )
    });

    mod over_postgres {
        use super::*;
        use crate::storage::{PostgresCas, PostgresPool};

        crate::storage::conformance::blob_store_conformance!(async {
            let dir = tempfile::tempdir().unwrap();
            let cache = fs(dir.path(), 1 << 30).await;
            let pool =
                PostgresPool::connect(&crate::storage::conformance::test_postgres_url(), None, 2)
                    .await
                    .unwrap();
            let backing = Arc::new(PostgresCas::new(
                pool,
                crate::storage::PostgresCasOptions::new(64 << 20, None),
            ));
            (
                Arc::new(ReadCache::new(cache, backing)) as SharedBlobStore,
                dir,
            )
        });
    }

    #[tokio::test]
    async fn reads_fill_the_cache_and_survive_its_loss() {
        let dir = tempfile::tempdir().unwrap();
        let cache = fs(&dir.path().join("cache"), 1 << 20).await;
        let backing = fs(&dir.path().join("backing"), 1 << 20).await;
        let (d, data) = crate::storage::conformance::unique_blob(1000);
        backing.put(d, data.clone()).await.unwrap();
        let store = ReadCache::new(cache.clone(), backing);
        assert_eq!(cache.find_missing(&[d]).await.unwrap(), vec![d]);
        let chunks: Vec<Bytes> = store
            .read(&d, 10, 20)
            .await
            .unwrap()
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(Bytes::from(chunks.concat()), data.slice(10..30));
        assert!(
            cache.find_missing(&[d]).await.unwrap().is_empty(),
            "read filled the cache"
        );

        // A fresh, empty cache (a new pod's data dir) still reads through.
        let store = ReadCache::new(
            fs(&dir.path().join("cache2"), 1 << 20).await,
            store.backing.clone(),
        );
        assert_eq!(store.get(&d).await.unwrap(), Some(data));
    }
}
