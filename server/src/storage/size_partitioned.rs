//! Routes each blob by its size: up to `threshold` bytes to one store,
//! larger ones to another (e.g. small blobs in PostgreSQL, large ones on a
//! volume). Eviction is each child's own.

use buildkube_reapi::Digest;
use bytes::Bytes;

use super::{BlobSink, BlobStore, BlobStream, SharedBlobStore, StorageError};

/// Size-routing decorator.
pub struct SizePartitioned {
    threshold: u64,
    small: SharedBlobStore,
    large: SharedBlobStore,
}

impl SizePartitioned {
    /// Blobs of at most `threshold` bytes in `small`, the rest in `large`.
    pub fn new(threshold: u64, small: SharedBlobStore, large: SharedBlobStore) -> SizePartitioned {
        SizePartitioned {
            threshold,
            small,
            large,
        }
    }

    fn store_for(&self, digest: &Digest) -> &dyn BlobStore {
        if digest.size() <= self.threshold {
            &*self.small
        } else {
            &*self.large
        }
    }
}

#[async_trait::async_trait]
impl BlobStore for SizePartitioned {
    async fn get(&self, digest: &Digest) -> Result<Option<Bytes>, StorageError> {
        self.store_for(digest).get(digest).await
    }

    async fn read(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Option<BlobStream>, StorageError> {
        self.store_for(digest).read(digest, offset, len).await
    }

    async fn put(&self, digest: Digest, data: Bytes) -> Result<(), StorageError> {
        self.store_for(&digest).put(digest, data).await
    }

    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, StorageError> {
        let (small, large): (Vec<Digest>, Vec<Digest>) =
            digests.iter().partition(|d| d.size() <= self.threshold);
        let (small, large) = futures::try_join!(
            self.small.find_missing(&small),
            self.large.find_missing(&large)
        )?;
        let missing: std::collections::HashSet<Digest> = small.into_iter().chain(large).collect();
        Ok(digests
            .iter()
            .filter(|d| missing.contains(d))
            .copied()
            .collect())
    }

    async fn begin_write(&self, digest: Digest) -> Result<Box<dyn BlobSink>, StorageError> {
        self.store_for(&digest).begin_write(digest).await
    }

    fn usage(&self) -> Option<(u64, usize)> {
        let (a, b) = (self.small.usage()?, self.large.usage()?);
        Some((a.0 + b.0, a.1 + b.1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::FsCas;
    use std::sync::Arc;

    // The threshold falls inside the suite's blob sizes, so both sides are exercised.
    crate::storage::conformance::blob_store_conformance!(async {
        let dir = tempfile::tempdir().unwrap();
        let small: SharedBlobStore = Arc::new(
            FsCas::open(&dir.path().join("small"), 1 << 30)
                .await
                .unwrap(),
        );
        let large: SharedBlobStore = Arc::new(
            FsCas::open(&dir.path().join("large"), 1 << 30)
                .await
                .unwrap(),
        );
        (
            Arc::new(SizePartitioned::new(150, small, large)) as SharedBlobStore,
            dir,
        )
    });

    #[tokio::test]
    async fn routes_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let small: SharedBlobStore = Arc::new(
            FsCas::open(&dir.path().join("small"), 1 << 30)
                .await
                .unwrap(),
        );
        let large: SharedBlobStore = Arc::new(
            FsCas::open(&dir.path().join("large"), 1 << 30)
                .await
                .unwrap(),
        );
        let store = SizePartitioned::new(100, small.clone(), large.clone());
        let (s, sd) = crate::storage::conformance::unique_blob(100);
        let (l, ld) = crate::storage::conformance::unique_blob(101);
        store.put(s, sd).await.unwrap();
        store.put(l, ld).await.unwrap();
        assert_eq!(small.find_missing(&[s, l]).await.unwrap(), vec![l]);
        assert_eq!(large.find_missing(&[s, l]).await.unwrap(), vec![s]);
        assert!(store.find_missing(&[l, s]).await.unwrap().is_empty());
    }
}
