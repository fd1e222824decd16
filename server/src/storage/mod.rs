//! Where bytes live. Two narrow traits — [`BlobStore`] for the CAS and
//! [`ActionResultStore`] for the action cache — with backends (filesystem,
//! PostgreSQL, Redis), plus the durable records
//! ([`buildkube_records::RecordStore`]: the data dir, or [`PostgresRecords`]) and decorators that wrap other stores (read cache,
//! size partitioning). [`factory::open`] builds the tree from the typed
//! `--storage-config`; every implementation passes the same conformance
//! suite (`conformance.rs`).

mod action_cache;
pub mod factory;
mod fs_cas;
mod postgres;

mod read_cache;
mod redis_store;
mod size_partitioned;

#[cfg(test)]
mod conformance;
#[cfg(test)]
mod durability_tests;

use std::sync::Arc;

pub use action_cache::FsActionCache;
pub use fs_cas::{FsBlobWriter, FsCas};
pub use postgres::{
    MaintenanceReport, PostgresActionCache, PostgresCas, PostgresCasOptions, PostgresPool,
    PostgresRecords,
};

pub use read_cache::ReadCache;
pub use redis_store::RedisActionCache;
pub use size_partitioned::SizePartitioned;

use buildkube_proto::reapi::ActionResult;
use buildkube_reapi::{Digest, Hasher};
use bytes::Bytes;
use futures::stream::BoxStream;

/// Work on at most this many bytes (hashing, decompressing) runs inline;
/// on more, on a blocking thread.
const INLINE_CPU_LIMIT: usize = 64 * 1024;

/// Largest chunk a [`BlobStore::read`] stream yields.
pub const READ_CHUNK: usize = 64 * 1024;

/// Chunks of a blob read through [`BlobStore::read`].
pub type BlobStream = BoxStream<'static, Result<Bytes, StorageError>>;

/// Content-addressable blob storage. The empty blob is always present;
/// a blob is visible only once fully written and verified.
#[async_trait::async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// The whole blob; `None` if absent.
    async fn get(&self, digest: &Digest) -> Result<Option<Bytes>, StorageError>;

    /// Bytes `offset..offset + len` of the blob (clipped to its size) as
    /// chunks of at most [`READ_CHUNK`]; `None` if absent.
    async fn read(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Option<BlobStream>, StorageError>;

    /// Stores a blob after checking that `data` hashes to `digest`.
    async fn put(&self, digest: Digest, data: Bytes) -> Result<(), StorageError>;

    /// The digests among `digests` that are not stored, in their order.
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, StorageError>;

    /// Starts a streaming write of `digest`; nothing is visible until
    /// [`BlobSink::commit`] has verified every byte.
    async fn begin_write(&self, digest: Digest) -> Result<Box<dyn BlobSink>, StorageError>;

    /// Bytes and blobs stored, when the store knows them cheaply.
    fn usage(&self) -> Option<(u64, usize)> {
        None
    }
}

/// An upload in progress. Dropping it without a successful commit discards it.
#[async_trait::async_trait]
pub trait BlobSink: Send + Sync {
    /// The blob being written.
    fn digest(&self) -> Digest;
    /// Bytes received so far.
    fn committed_size(&self) -> u64;
    /// Appends `data`, which must start at `offset` (= [`Self::committed_size`]).
    async fn append(&mut self, offset: i64, data: Bytes) -> Result<(), StorageError>;
    /// Verifies the digest and publishes the blob atomically.
    async fn commit(&mut self) -> Result<(), StorageError>;
}

/// Action results, kept apart per instance name.
#[async_trait::async_trait]
pub trait ActionResultStore: Send + Sync + 'static {
    /// The stored result of `action` in `instance`, if any.
    async fn get(
        &self,
        instance: &str,
        action: &Digest,
    ) -> Result<Option<ActionResult>, StorageError>;
    /// Stores the result of `action` in `instance`, replacing any previous one.
    async fn put(
        &self,
        instance: &str,
        action: &Digest,
        result: &ActionResult,
    ) -> Result<(), StorageError>;
}

/// Decodes a stored action result; a corrupt entry is logged and read as a
/// miss (the action simply runs again), never as an error.
pub(crate) fn decode_stored_result(
    data: &[u8],
    action: &Digest,
    location: &str,
) -> Option<ActionResult> {
    use prost::Message as _;
    match ActionResult::decode(data) {
        Ok(result) => Some(result),
        Err(source) => {
            tracing::error!(%action, location, %source, "corrupt action result; reporting a miss");
            None
        }
    }
}

/// Convenience over [`BlobStore::find_missing`] for one blob.
pub async fn contains(store: &dyn BlobStore, digest: &Digest) -> Result<bool, StorageError> {
    Ok(digest.is_empty_blob() || store.find_missing(&[*digest]).await?.is_empty())
}

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Uploaded bytes do not hash to the digest they were sent under.
    #[error("uploaded data does not match digest {expected}: it hashes to {actual}")]
    DigestMismatch {
        /// Digest the client named.
        expected: Digest,
        /// What the bytes hash to.
        actual: Digest,
    },
    /// A write at an offset other than where the upload stands.
    #[error("write of {digest} at offset {offset}, but {committed} bytes are committed")]
    BadOffset {
        /// Blob being written.
        digest: Digest,
        /// Offset the client sent.
        offset: i64,
        /// Where the upload stands.
        committed: u64,
    },
    /// More bytes than the digest's size.
    #[error("upload of {digest} exceeds its size: {received} bytes received")]
    TooLong {
        /// Blob being written.
        digest: Digest,
        /// Bytes received so far.
        received: u64,
    },
    /// The blob is larger than a store accepts.
    #[error("blob {digest} is larger than {what} of {limit} bytes")]
    TooLarge {
        /// Blob being written.
        digest: Digest,
        /// The limit, e.g. "the CAS size budget" or "the postgres store's max_blob_size".
        what: &'static str,
        /// Configured limit.
        limit: u64,
    },
    /// Unfinished uploads already take the store's whole budget.
    #[error("no room to upload {digest}: unfinished uploads already hold {uploading} of the {limit} bytes the CAS may use")]
    UploadsFull {
        /// Blob being written.
        digest: Digest,
        /// Bytes held by unfinished uploads.
        uploading: u64,
        /// The budget.
        limit: u64,
    },
    /// Disk I/O failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What we were doing.
        action: &'static str,
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A stored action result cannot be decoded.
    #[error("stored action result {path} is corrupt: {source}")]
    CorruptEntry {
        /// The file or key.
        path: String,
        /// Decoder's complaint.
        source: prost::DecodeError,
    },
    /// An external store (database, cache server) failed or is unreachable.
    #[error("{store}: {action}: {message}")]
    Backend {
        /// Which kind of store ("postgres", "redis").
        store: &'static str,
        /// What we were doing, naming the blob or entry.
        action: String,
        /// The client library's error.
        message: String,
    },
}

impl StorageError {
    pub(crate) fn io(
        action: &'static str,
        path: &std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> StorageError {
        let path = path.display().to_string();
        move |source| StorageError::Io {
            action,
            path,
            source,
        }
    }

    pub(crate) fn backend<E: std::fmt::Display>(
        store: &'static str,
        action: impl Into<String>,
    ) -> impl FnOnce(E) -> StorageError {
        let action = action.into();
        move |e| StorageError::Backend {
            store,
            action,
            message: e.to_string(),
        }
    }

    /// True when the disk is full.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, StorageError::Io { source, .. } if source.raw_os_error() == Some(libc_enospc()))
    }
}

const fn libc_enospc() -> i32 {
    28
}

/// Checks that `data` hashes to `digest` (on a blocking thread when large).
pub(crate) async fn verify(digest: Digest, data: &Bytes) -> Result<(), StorageError> {
    let hashed = data.clone();
    let actual = cpu_work(data.len(), move || Digest::of_bytes(&hashed))
        .await
        .expect("hash task panicked");
    if actual != digest {
        return Err(StorageError::DigestMismatch {
            expected: digest,
            actual,
        });
    }
    Ok(())
}

/// Runs CPU work over `len` bytes inline when small, else on a blocking
/// thread so that it does not stall the async workers.
pub(crate) async fn cpu_work<T: Send + 'static>(
    len: usize,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    if len <= INLINE_CPU_LIMIT {
        Ok(work())
    } else {
        tokio::task::spawn_blocking(work).await
    }
}

/// The bookkeeping every streaming write shares: offsets, length, hash.
pub(crate) struct UploadProgress {
    digest: Digest,
    /// `None` once finished.
    hasher: Option<Hasher>,
    /// What the bytes hashed to when they did not match: the upload stays
    /// failed, however often it is finished again.
    mismatch: Option<Digest>,
}

impl UploadProgress {
    pub(crate) fn new(digest: Digest) -> UploadProgress {
        UploadProgress {
            digest,
            hasher: Some(Hasher::new()),
            mismatch: None,
        }
    }

    pub(crate) fn digest(&self) -> Digest {
        self.digest
    }

    /// Bytes accepted so far (the full size once committed).
    pub(crate) fn committed_size(&self) -> u64 {
        self.hasher
            .as_ref()
            .map_or(self.digest.size(), Hasher::size)
    }

    /// Finished, and every byte hashed to the digest.
    pub(crate) fn is_committed(&self) -> bool {
        self.hasher.is_none() && self.mismatch.is_none()
    }

    /// Checks that `len` bytes at `offset` continue the upload within its size.
    pub(crate) fn check(&self, offset: i64, len: usize) -> Result<(), StorageError> {
        let committed = self.committed_size();
        if self.hasher.is_none() || offset < 0 || offset as u64 != committed {
            return Err(StorageError::BadOffset {
                digest: self.digest,
                offset,
                committed,
            });
        }
        let received = committed + len as u64;
        if received > self.digest.size() {
            return Err(StorageError::TooLong {
                digest: self.digest,
                received,
            });
        }
        Ok(())
    }

    /// Hashes bytes that [`Self::check`] accepted and were stored.
    pub(crate) fn update(&mut self, data: &[u8]) {
        if let Some(hasher) = self.hasher.as_mut() {
            hasher.update(data);
        }
    }

    /// Ends hashing: Ok if everything received hashes to the digest.
    pub(crate) fn finish(&mut self) -> Result<(), StorageError> {
        if let Some(hasher) = self.hasher.take() {
            let actual = hasher.finish();
            if actual != self.digest {
                self.mismatch = Some(actual);
            }
        }
        match self.mismatch {
            Some(actual) => Err(StorageError::DigestMismatch {
                expected: self.digest,
                actual,
            }),
            None => Ok(()),
        }
    }
}

/// Slices a whole blob into a [`BlobStream`] of `offset..offset + len`.
pub(crate) fn stream_slice(data: Bytes, offset: u64, len: u64) -> BlobStream {
    let start = (offset as usize).min(data.len());
    let end = start.saturating_add(len as usize).min(data.len());
    let data = data.slice(start..end);
    let chunks: Vec<Result<Bytes, StorageError>> = (0..data.len())
        .step_by(READ_CHUNK)
        .map(|at| Ok(data.slice(at..(at + READ_CHUNK).min(data.len()))))
        .collect();
    Box::pin(futures::stream::iter(chunks))
}

/// Writes `data` to `path` crash-safely: temp file in `tmp_dir`, fsync, rename.
pub(crate) fn write_atomically(
    tmp_dir: &std::path::Path,
    path: &std::path::Path,
    data: &[u8],
) -> Result<(), StorageError> {
    use std::io::Write;
    let tmp = tmp_dir.join(uuid::Uuid::new_v4().to_string());
    let result = (|| {
        let mut file = std::fs::File::create(&tmp).map_err(StorageError::io("creating", &tmp))?;
        file.write_all(data)
            .map_err(StorageError::io("writing", &tmp))?;
        file.sync_all().map_err(StorageError::io("syncing", &tmp))?;
        rename_durably(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Renames a fully written, fsynced `tmp` to `path`, then fsyncs `path`'s
/// directory: until then a crash can lose the new name (the rename is
/// only in memory), and a blob or action result that a client was told is
/// stored would be gone after a restart.
pub(crate) fn rename_durably(
    tmp: &std::path::Path,
    path: &std::path::Path,
) -> Result<(), StorageError> {
    std::fs::rename(tmp, path).map_err(StorageError::io("renaming into", path))?;
    let parent = path.parent().expect("a renamed file has a directory");
    sync_directory(parent)
}

/// Creates `dir` (and missing ancestors) if it does not exist, fsyncing
/// the directory that holds it, so its name survives a crash too.
pub(crate) fn create_dir_durably(dir: &std::path::Path) -> Result<(), StorageError> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(StorageError::io("creating", dir))?;
    match dir.parent() {
        Some(parent) => sync_directory(parent),
        None => Ok(()),
    }
}

fn sync_directory(dir: &std::path::Path) -> Result<(), StorageError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StorageError::io("syncing the directory", dir))
}

/// A shared handle is a store too, so decorators can hold `Arc<dyn BlobStore>`.
pub type SharedBlobStore = Arc<dyn BlobStore>;
