//! The embedded CAS: one file per blob under `DATA/cas/HH/HASH-SIZE`.
//!
//! A blob becomes visible only by `rename` of a fully written, fsynced and
//! verified temp file, so no reader ever sees a partial blob, even across a
//! crash. An in-memory LRU index (rebuilt from the directory at start-up,
//! ordered by mtime) enforces the size budget.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use buildkube_reapi::{Digest, Hasher};
use bytes::Bytes;

use super::{write_atomically, StorageError};

/// Blobs at most this large are verified inline; larger ones on a blocking thread.
const INLINE_HASH_LIMIT: usize = 64 * 1024;

/// Content-addressable storage on the local file system.
#[derive(Clone)]
pub struct FsCas {
    inner: Arc<Inner>,
}

struct Inner {
    blobs_dir: PathBuf,
    tmp_dir: PathBuf,
    budget: u64,
    index: Mutex<LruIndex>,
}

#[derive(Default)]
struct LruIndex {
    entries: HashMap<Digest, u64>,
    by_age: BTreeMap<u64, Digest>,
    total_bytes: u64,
    next_tick: u64,
}

impl LruIndex {
    fn touch(&mut self, digest: &Digest) -> bool {
        let Some(tick) = self.entries.get_mut(digest) else {
            return false;
        };
        self.by_age.remove(tick);
        *tick = self.next_tick;
        self.by_age.insert(self.next_tick, *digest);
        self.next_tick += 1;
        true
    }

    fn insert(&mut self, digest: Digest) {
        if self.touch(&digest) {
            return;
        }
        self.entries.insert(digest, self.next_tick);
        self.by_age.insert(self.next_tick, digest);
        self.next_tick += 1;
        self.total_bytes += digest.size();
    }

    fn remove(&mut self, digest: &Digest) {
        if let Some(tick) = self.entries.remove(digest) {
            self.by_age.remove(&tick);
            self.total_bytes -= digest.size();
        }
    }

    /// Oldest blobs to drop so that `total_bytes <= budget`, never `keep`.
    fn evict(&mut self, budget: u64, keep: &Digest) -> Vec<Digest> {
        let mut evicted = Vec::new();
        while self.total_bytes > budget {
            let Some((_, oldest)) = self
                .by_age
                .iter()
                .find(|(_, d)| *d != keep)
                .map(|(t, d)| (*t, *d))
            else {
                break;
            };
            self.remove(&oldest);
            evicted.push(oldest);
        }
        evicted
    }
}

impl FsCas {
    /// Opens (creating if needed) the CAS under `dir` with a size budget in bytes.
    /// Leftover temp files from a crash are removed; blobs whose file size does
    /// not match their name are dropped.
    pub async fn open(dir: &Path, budget: u64) -> Result<FsCas, StorageError> {
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || FsCas::open_blocking(&dir, budget))
            .await
            .expect("CAS open task panicked")
    }

    fn open_blocking(dir: &Path, budget: u64) -> Result<FsCas, StorageError> {
        let blobs_dir = dir.join("blobs");
        let tmp_dir = dir.join("tmp");
        std::fs::create_dir_all(&blobs_dir).map_err(StorageError::io("creating", &blobs_dir))?;
        if tmp_dir.exists() {
            std::fs::remove_dir_all(&tmp_dir).map_err(StorageError::io("cleaning", &tmp_dir))?;
        }
        std::fs::create_dir_all(&tmp_dir).map_err(StorageError::io("creating", &tmp_dir))?;

        let mut found: Vec<(std::time::SystemTime, Digest)> = Vec::new();
        for shard in
            std::fs::read_dir(&blobs_dir).map_err(StorageError::io("listing", &blobs_dir))?
        {
            let shard = shard
                .map_err(StorageError::io("listing", &blobs_dir))?
                .path();
            let Ok(files) = std::fs::read_dir(&shard) else {
                continue;
            };
            for file in files.flatten() {
                let path = file.path();
                let name = file.file_name();
                let parsed = name
                    .to_str()
                    .and_then(|n| n.split_once('-'))
                    .and_then(|(hash, size)| Digest::from_hex(hash, size.parse().ok()?).ok());
                let Ok(meta) = file.metadata() else { continue };
                match parsed {
                    Some(digest) if meta.len() == digest.size() => {
                        found.push((meta.modified().unwrap_or(std::time::UNIX_EPOCH), digest));
                    }
                    _ => {
                        tracing::warn!(path = %path.display(), "removing CAS file whose name or size is not a valid blob");
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
        }
        found.sort();
        let mut index = LruIndex::default();
        for (_, digest) in found {
            index.insert(digest);
        }
        tracing::info!(blobs = index.entries.len(), bytes = index.total_bytes, dir = %dir.display(), "CAS opened");
        Ok(FsCas {
            inner: Arc::new(Inner {
                blobs_dir,
                tmp_dir,
                budget,
                index: Mutex::new(index),
            }),
        })
    }

    fn path_of(&self, digest: &Digest) -> PathBuf {
        let hash = digest.hash_hex();
        self.inner
            .blobs_dir
            .join(&hash[..2])
            .join(format!("{hash}-{}", digest.size()))
    }

    /// Bytes stored and blob count.
    pub fn usage(&self) -> (u64, usize) {
        let index = self.inner.index.lock().unwrap();
        (index.total_bytes, index.entries.len())
    }

    /// Whether the blob is present (the empty blob always is); marks it used.
    pub fn contains(&self, digest: &Digest) -> bool {
        digest.is_empty_blob() || self.inner.index.lock().unwrap().touch(digest)
    }

    /// The digests among `digests` that are not stored; marks the others used.
    pub fn find_missing(&self, digests: &[Digest]) -> Vec<Digest> {
        let mut index = self.inner.index.lock().unwrap();
        digests
            .iter()
            .filter(|d| !d.is_empty_blob() && !index.touch(d))
            .copied()
            .collect()
    }

    /// Reads a whole blob into memory; `None` if absent.
    pub async fn read(&self, digest: &Digest) -> Result<Option<Bytes>, StorageError> {
        if digest.is_empty_blob() {
            return Ok(Some(Bytes::new()));
        }
        if !self.contains(digest) {
            return Ok(None);
        }
        let path = self.path_of(digest);
        match tokio::fs::read(&path).await {
            Ok(data) if data.len() as u64 == digest.size() => Ok(Some(data.into())),
            Ok(_) | Err(_) if !path.exists() => {
                self.forget(digest);
                Ok(None)
            }
            Ok(data) => {
                tracing::error!(%digest, len = data.len(), "CAS file has the wrong size; dropping it");
                self.forget(digest);
                let _ = tokio::fs::remove_file(&path).await;
                Ok(None)
            }
            Err(e) => Err(StorageError::io("reading", &path)(e)),
        }
    }

    /// Opens a blob for streaming reads; `None` if absent.
    pub async fn open_read(
        &self,
        digest: &Digest,
    ) -> Result<Option<tokio::fs::File>, StorageError> {
        if !self.contains(digest) {
            return Ok(None);
        }
        let path = self.path_of(digest);
        match tokio::fs::File::open(&path).await {
            Ok(file) => Ok(Some(file)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.forget(digest);
                Ok(None)
            }
            Err(e) => Err(StorageError::io("opening", &path)(e)),
        }
    }

    fn forget(&self, digest: &Digest) {
        self.inner.index.lock().unwrap().remove(digest);
    }

    /// Stores a blob after checking that `data` hashes to `digest`.
    pub async fn put(&self, digest: Digest, data: Bytes) -> Result<(), StorageError> {
        let actual = if data.len() <= INLINE_HASH_LIMIT {
            Digest::of_bytes(&data)
        } else {
            let data = data.clone();
            tokio::task::spawn_blocking(move || Digest::of_bytes(&data))
                .await
                .expect("hash task panicked")
        };
        if actual != digest {
            return Err(StorageError::DigestMismatch {
                expected: digest,
                actual,
            });
        }
        if digest.is_empty_blob() || self.contains(&digest) {
            return Ok(());
        }
        self.check_budget(&digest)?;
        let cas = self.clone();
        tokio::task::spawn_blocking(move || {
            let path = cas.path_of(&digest);
            let shard = path.parent().expect("blob path has a shard directory");
            std::fs::create_dir_all(shard).map_err(StorageError::io("creating", shard))?;
            write_atomically(&cas.inner.tmp_dir, &path, &data)?;
            cas.admit(digest);
            Ok(())
        })
        .await
        .expect("CAS write task panicked")
    }

    fn check_budget(&self, digest: &Digest) -> Result<(), StorageError> {
        if digest.size() > self.inner.budget {
            return Err(StorageError::TooLarge {
                digest: *digest,
                budget: self.inner.budget,
            });
        }
        Ok(())
    }

    /// Records a blob that is now on disk and evicts to stay within budget.
    fn admit(&self, digest: Digest) {
        let evicted = {
            let mut index = self.inner.index.lock().unwrap();
            index.insert(digest);
            index.evict(self.inner.budget, &digest)
        };
        for old in evicted {
            tracing::debug!(digest = %old, "evicting blob from CAS");
            let _ = std::fs::remove_file(self.path_of(&old));
        }
    }

    /// Starts a streaming write of `digest`.
    pub fn begin_write(&self, digest: Digest) -> Result<BlobWriter, StorageError> {
        self.check_budget(&digest)?;
        let tmp = self.inner.tmp_dir.join(uuid::Uuid::new_v4().to_string());
        let file = std::fs::File::create(&tmp).map_err(StorageError::io("creating", &tmp))?;
        Ok(BlobWriter {
            cas: self.clone(),
            digest,
            tmp,
            file: Some(file),
            hasher: Some(Hasher::new()),
        })
    }
}

/// An upload in progress: bytes go to a temp file and become a blob only
/// when [`BlobWriter::commit`] verifies them. Dropping it discards the upload.
pub struct BlobWriter {
    cas: FsCas,
    digest: Digest,
    tmp: PathBuf,
    file: Option<std::fs::File>,
    hasher: Option<Hasher>,
}

impl BlobWriter {
    /// Bytes received so far.
    pub fn committed_size(&self) -> u64 {
        self.hasher
            .as_ref()
            .map_or(self.digest.size(), Hasher::size)
    }

    /// The blob being written.
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// Appends `data`, which must start at `offset`. Blocking I/O: call from a blocking context
    /// or with small chunks.
    pub fn append(&mut self, offset: i64, data: &[u8]) -> Result<(), StorageError> {
        let committed = self.committed_size();
        if offset < 0 || offset as u64 != committed {
            return Err(StorageError::BadOffset {
                digest: self.digest,
                offset,
                committed,
            });
        }
        let received = committed + data.len() as u64;
        if received > self.digest.size() {
            return Err(StorageError::TooLong {
                digest: self.digest,
                received,
            });
        }
        let (Some(file), Some(hasher)) = (self.file.as_mut(), self.hasher.as_mut()) else {
            return Ok(());
        };
        file.write_all(data)
            .map_err(StorageError::io("writing", &self.tmp))?;
        hasher.update(data);
        Ok(())
    }

    /// Verifies the digest, fsyncs and publishes the blob.
    pub fn commit(&mut self) -> Result<(), StorageError> {
        let (Some(file), Some(hasher)) = (self.file.take(), self.hasher.take()) else {
            return Ok(());
        };
        let actual = hasher.finish();
        if actual != self.digest {
            let _ = std::fs::remove_file(&self.tmp);
            return Err(StorageError::DigestMismatch {
                expected: self.digest,
                actual,
            });
        }
        file.sync_all()
            .map_err(StorageError::io("syncing", &self.tmp))?;
        drop(file);
        let path = self.cas.path_of(&self.digest);
        let shard = path.parent().expect("blob path has a shard directory");
        std::fs::create_dir_all(shard).map_err(StorageError::io("creating", shard))?;
        std::fs::rename(&self.tmp, &path).map_err(StorageError::io("renaming into", &path))?;
        self.cas.admit(self.digest);
        Ok(())
    }

    /// Whether the blob has been committed.
    pub fn is_committed(&self) -> bool {
        self.hasher.is_none()
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(text: &str) -> (Digest, Bytes) {
        (
            Digest::of_bytes(text.as_bytes()),
            Bytes::copy_from_slice(text.as_bytes()),
        )
    }

    #[tokio::test]
    async fn put_read_and_find_missing() {
        let dir = tempfile::tempdir().unwrap();
        let cas = FsCas::open(dir.path(), 1 << 20).await.unwrap();
        let (d, data) = blob("hello");
        assert_eq!(cas.find_missing(&[d, Digest::EMPTY]), vec![d]);
        cas.put(d, data.clone()).await.unwrap();
        assert_eq!(cas.read(&d).await.unwrap(), Some(data));
        assert!(cas.find_missing(&[d]).is_empty());
        assert_eq!(cas.read(&Digest::EMPTY).await.unwrap(), Some(Bytes::new()));
    }

    #[tokio::test]
    async fn mismatched_upload_is_rejected_and_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let cas = FsCas::open(dir.path(), 1 << 20).await.unwrap();
        let (d, _) = blob("hello");
        let err = cas.put(d, Bytes::from_static(b"hellp")).await.unwrap_err();
        assert!(matches!(err, StorageError::DigestMismatch { .. }));
        assert_eq!(cas.read(&d).await.unwrap(), None);
        assert_eq!(cas.usage(), (0, 0));
    }

    #[tokio::test]
    async fn streaming_write_checks_offsets_length_and_digest() {
        let dir = tempfile::tempdir().unwrap();
        let cas = FsCas::open(dir.path(), 1 << 20).await.unwrap();
        let (d, data) = blob("hello world");
        let mut w = cas.begin_write(d).unwrap();
        w.append(0, &data[..5]).unwrap();
        assert!(matches!(
            w.append(3, b"x"),
            Err(StorageError::BadOffset { committed: 5, .. })
        ));
        assert!(matches!(
            w.append(5, b" world and more"),
            Err(StorageError::TooLong { .. })
        ));
        assert_eq!(
            cas.read(&d).await.unwrap(),
            None,
            "partial blob must not be visible"
        );
        w.append(5, &data[5..]).unwrap();
        w.commit().unwrap();
        assert_eq!(cas.read(&d).await.unwrap(), Some(data));

        let (d2, _) = blob("expected");
        let mut bad = cas.begin_write(d2).unwrap();
        bad.append(0, b"unexpect").unwrap();
        assert!(matches!(
            bad.commit(),
            Err(StorageError::DigestMismatch { .. })
        ));
        assert_eq!(cas.read(&d2).await.unwrap(), None);
        drop(bad);
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }

    #[tokio::test]
    async fn evicts_least_recently_used_beyond_budget() {
        let dir = tempfile::tempdir().unwrap();
        let cas = FsCas::open(dir.path(), 10).await.unwrap();
        let (a, da) = blob("aaaa");
        let (b, db) = blob("bbbb");
        let (c, dc) = blob("cccc");
        cas.put(a, da).await.unwrap();
        cas.put(b, db).await.unwrap();
        assert!(cas.contains(&a)); // a is now more recent than b
        cas.put(c, dc).await.unwrap();
        assert_eq!(cas.find_missing(&[a, b, c]), vec![b]);
        assert_eq!(cas.usage(), (8, 2));
        let (big, dbig) = blob("this is more than ten bytes");
        assert!(matches!(
            cas.put(big, dbig).await,
            Err(StorageError::TooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn survives_reopen_and_drops_damaged_files() {
        let dir = tempfile::tempdir().unwrap();
        let (a, da) = blob("persist me");
        let (b, db) = blob("damage me");
        {
            let cas = FsCas::open(dir.path(), 1 << 20).await.unwrap();
            cas.put(a, da.clone()).await.unwrap();
            cas.put(b, db).await.unwrap();
            // A crash mid-upload leaves a temp file behind.
            std::fs::write(dir.path().join("tmp").join("leftover"), b"partial").unwrap();
            let path = cas.path_of(&b);
            std::fs::write(path, b"dam").unwrap();
        }
        let cas = FsCas::open(dir.path(), 1 << 20).await.unwrap();
        assert_eq!(cas.read(&a).await.unwrap(), Some(da));
        assert_eq!(cas.read(&b).await.unwrap(), None);
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }
}
