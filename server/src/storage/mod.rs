//! Where bytes live: the content-addressable store and the action cache,
//! both on local disk under the server's data directory.

mod action_cache;
mod fs_cas;

pub use action_cache::FsActionCache;
pub use fs_cas::{BlobWriter, FsCas};

use buildkube_reapi::Digest;

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
    /// The blob is larger than the whole CAS budget.
    #[error("blob {digest} is larger than the CAS size budget of {budget} bytes")]
    TooLarge {
        /// Blob being written.
        digest: Digest,
        /// Configured budget.
        budget: u64,
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
        /// The file.
        path: String,
        /// Decoder's complaint.
        source: prost::DecodeError,
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

    /// True when the disk is full.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, StorageError::Io { source, .. } if source.raw_os_error() == Some(libc_enospc()))
    }
}

const fn libc_enospc() -> i32 {
    28
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
        std::fs::rename(&tmp, path).map_err(StorageError::io("renaming into", path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
