//! The embedded CAS: one file per blob under `DATA/cas/HH/HASH-SIZE`.
//!
//! A blob becomes visible only by `rename` of a fully written, fsynced and
//! verified temp file, so no reader ever sees a partial blob, even across a
//! crash. An in-memory LRU index (rebuilt from the directory at start-up,
//! ordered by mtime) enforces the size budget, which the temp files of
//! unfinished uploads count in: each byte is reserved as it is written (never
//! ahead, by the size the upload declares), evicting old blobs to make room,
//! and released when the upload is published or dropped.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use buildkube_reapi::Digest;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::{
    create_dir_durably, rename_durably, stream_slice, verify, write_atomically, BlobSink,
    BlobStore, BlobStream, StorageError, UploadProgress, READ_CHUNK,
};

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
    /// Bytes in the temp files of unfinished uploads.
    uploading_bytes: u64,
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

    /// Oldest blobs to drop so that blobs and unfinished uploads together
    /// fit `budget`, never `keep`.
    fn evict(&mut self, budget: u64, keep: Option<&Digest>) -> Vec<Digest> {
        let mut evicted = Vec::new();
        while self.total_bytes + self.uploading_bytes > budget {
            let Some((_, oldest)) = self
                .by_age
                .iter()
                .find(|(_, d)| Some(*d) != keep)
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

    /// Whether the blob is present (the empty blob always is); marks it used.
    fn contains(&self, digest: &Digest) -> bool {
        digest.is_empty_blob() || self.inner.index.lock().unwrap().touch(digest)
    }

    fn forget(&self, digest: &Digest) {
        self.inner.index.lock().unwrap().remove(digest);
    }

    fn check_budget(&self, digest: &Digest) -> Result<(), StorageError> {
        if digest.size() > self.inner.budget {
            return Err(StorageError::TooLarge {
                digest: *digest,
                what: "the filesystem CAS size budget",
                limit: self.inner.budget,
            });
        }
        Ok(())
    }

    /// Records a blob that is now on disk (its upload had reserved
    /// `reserved` bytes, now counted as the blob) and evicts to stay within budget.
    fn admit(&self, digest: Digest, reserved: u64) {
        let evicted = {
            let mut index = self.inner.index.lock().unwrap();
            index.uploading_bytes -= reserved;
            index.insert(digest);
            index.evict(self.inner.budget, Some(&digest))
        };
        self.remove_evicted(evicted);
    }

    fn remove_evicted(&self, evicted: Vec<Digest>) {
        for old in evicted {
            tracing::debug!(digest = %old, "evicting blob from CAS");
            let _ = std::fs::remove_file(self.path_of(&old));
        }
    }

    /// Counts `len` more bytes of an unfinished upload of `digest` in the
    /// budget, evicting old blobs to make room; refused when unfinished
    /// uploads alone would exceed the budget.
    fn reserve_upload(&self, digest: &Digest, len: u64) -> Result<(), StorageError> {
        let evicted = {
            let mut index = self.inner.index.lock().unwrap();
            if index.uploading_bytes + len > self.inner.budget {
                return Err(StorageError::UploadsFull {
                    digest: *digest,
                    uploading: index.uploading_bytes,
                    limit: self.inner.budget,
                });
            }
            index.uploading_bytes += len;
            index.evict(self.inner.budget, None)
        };
        self.remove_evicted(evicted);
        Ok(())
    }

    fn release_upload(&self, len: u64) {
        self.inner.index.lock().unwrap().uploading_bytes -= len;
    }

    /// Bytes in the temp files of unfinished uploads.
    pub fn uploading_bytes(&self) -> u64 {
        self.inner.index.lock().unwrap().uploading_bytes
    }
}

#[async_trait::async_trait]
impl BlobStore for FsCas {
    async fn get(&self, digest: &Digest) -> Result<Option<Bytes>, StorageError> {
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

    async fn read(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Option<BlobStream>, StorageError> {
        if digest.is_empty_blob() {
            return Ok(Some(stream_slice(Bytes::new(), 0, 0)));
        }
        if !self.contains(digest) {
            return Ok(None);
        }
        let path = self.path_of(digest);
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.forget(digest);
                return Ok(None);
            }
            Err(e) => return Err(StorageError::io("opening", &path)(e)),
        };
        let offset = offset.min(digest.size());
        let remaining = len.min(digest.size() - offset);
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(StorageError::io("seeking in", &path))?;
        let stream = futures::stream::unfold(
            (Some(file), remaining, path),
            |(file, remaining, path)| async move {
                let mut file = file?;
                if remaining == 0 {
                    return None;
                }
                let len = remaining.min(READ_CHUNK as u64) as usize;
                let mut buffer = vec![0u8; len];
                match file.read_exact(&mut buffer).await {
                    Ok(_) => Some((
                        Ok(Bytes::from(buffer)),
                        (Some(file), remaining - len as u64, path),
                    )),
                    Err(e) => Some((Err(StorageError::io("reading", &path)(e)), (None, 0, path))),
                }
            },
        );
        Ok(Some(Box::pin(stream)))
    }

    async fn put(&self, digest: Digest, data: Bytes) -> Result<(), StorageError> {
        verify(digest, &data).await?;
        if self.contains(&digest) {
            return Ok(());
        }
        self.check_budget(&digest)?;
        let cas = self.clone();
        tokio::task::spawn_blocking(move || {
            let path = cas.path_of(&digest);
            let shard = path.parent().expect("blob path has a shard directory");
            create_dir_durably(shard)?;
            cas.reserve_upload(&digest, digest.size())?;
            if let Err(e) = write_atomically(&cas.inner.tmp_dir, &path, &data) {
                cas.release_upload(digest.size());
                return Err(e);
            }
            cas.admit(digest, digest.size());
            Ok(())
        })
        .await
        .expect("CAS write task panicked")
    }

    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, StorageError> {
        let mut index = self.inner.index.lock().unwrap();
        Ok(digests
            .iter()
            .filter(|d| !d.is_empty_blob() && !index.touch(d))
            .copied()
            .collect())
    }

    async fn begin_write(&self, digest: Digest) -> Result<Box<dyn BlobSink>, StorageError> {
        self.check_budget(&digest)?;
        let tmp = self.inner.tmp_dir.join(uuid::Uuid::new_v4().to_string());
        let file = std::fs::File::create(&tmp).map_err(StorageError::io("creating", &tmp))?;
        Ok(Box::new(FsBlobWriter {
            cas: self.clone(),
            progress: UploadProgress::new(digest),
            tmp,
            file: Some(file),
            published: false,
            reserved: 0,
        }))
    }

    /// Bytes are those of the blobs and of unfinished uploads' temp files.
    fn usage(&self) -> Option<(u64, usize)> {
        let index = self.inner.index.lock().unwrap();
        Some((
            index.total_bytes + index.uploading_bytes,
            index.entries.len(),
        ))
    }
}

/// An upload in progress: bytes go to a temp file and become a blob only
/// when [`BlobSink::commit`] verifies them. Dropping it discards the upload.
pub struct FsBlobWriter {
    cas: FsCas,
    progress: UploadProgress,
    tmp: PathBuf,
    /// `None` while a blocking write holds it, or after commit.
    file: Option<std::fs::File>,
    published: bool,
    /// Bytes of the temp file counted in the CAS budget.
    reserved: u64,
}

impl FsBlobWriter {
    fn take_file(&mut self) -> Result<std::fs::File, StorageError> {
        self.file.take().ok_or_else(|| StorageError::Io {
            action: "writing (an earlier write was interrupted)",
            path: self.tmp.display().to_string(),
            source: std::io::Error::other("upload abandoned"),
        })
    }
}

#[async_trait::async_trait]
impl BlobSink for FsBlobWriter {
    fn digest(&self) -> Digest {
        self.progress.digest()
    }

    fn committed_size(&self) -> u64 {
        self.progress.committed_size()
    }

    async fn append(&mut self, offset: i64, data: Bytes) -> Result<(), StorageError> {
        self.progress.check(offset, data.len())?;
        let mut file = self.take_file()?;
        if let Err(e) = self
            .cas
            .reserve_upload(&self.progress.digest(), data.len() as u64)
        {
            self.file = Some(file);
            return Err(e);
        }
        self.reserved += data.len() as u64;
        let tmp = self.tmp.clone();
        let (file, result) = tokio::task::spawn_blocking(move || {
            let result = file.write_all(&data).map(|()| data);
            (file, result)
        })
        .await
        .expect("CAS write task panicked");
        let data = result.map_err(StorageError::io("writing", &tmp))?;
        self.file = Some(file);
        self.progress.update(&data);
        Ok(())
    }

    async fn commit(&mut self) -> Result<(), StorageError> {
        if self.published {
            return Ok(());
        }
        if let Err(e) = self.progress.finish() {
            self.file = None;
            let _ = std::fs::remove_file(&self.tmp);
            self.cas.release_upload(std::mem::take(&mut self.reserved));
            return Err(e);
        }
        let file = self.take_file()?;
        let tmp = self.tmp.clone();
        let cas = self.cas.clone();
        let digest = self.progress.digest();
        let reserved = self.reserved;
        tokio::task::spawn_blocking(move || {
            file.sync_all().map_err(StorageError::io("syncing", &tmp))?;
            drop(file);
            let path = cas.path_of(&digest);
            let shard = path.parent().expect("blob path has a shard directory");
            create_dir_durably(shard)?;
            rename_durably(&tmp, &path)?;
            cas.admit(digest, reserved);
            Ok::<_, StorageError>(())
        })
        .await
        .expect("CAS commit task panicked")?;
        self.reserved = 0;
        self.published = true;
        Ok(())
    }
}

impl Drop for FsBlobWriter {
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_file(&self.tmp);
            self.cas.release_upload(self.reserved);
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

    crate::storage::conformance::blob_store_conformance!(async {
        let dir = tempfile::tempdir().unwrap();
        let cas = FsCas::open(dir.path(), 1 << 30).await.unwrap();
        (
            std::sync::Arc::new(cas) as crate::storage::SharedBlobStore,
            dir,
        )
    });

    #[tokio::test]
    async fn failed_streaming_writes_leave_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let cas = FsCas::open(dir.path(), 1 << 20).await.unwrap();
        let (d, _) = blob("expected");
        let mut bad = cas.begin_write(d).await.unwrap();
        bad.append(0, Bytes::from_static(b"unexpect"))
            .await
            .unwrap();
        assert!(matches!(
            bad.commit().await,
            Err(StorageError::DigestMismatch { .. })
        ));
        let abandoned = cas.begin_write(blob("abandoned").0).await.unwrap();
        drop((bad, abandoned));
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
        assert_eq!(cas.find_missing(&[a, b, c]).await.unwrap(), vec![b]);
        assert_eq!(cas.usage(), Some((8, 2)));
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
        assert_eq!(cas.get(&a).await.unwrap(), Some(da));
        assert_eq!(cas.get(&b).await.unwrap(), None);
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }
}
