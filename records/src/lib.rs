//! Durable keyed records: small pieces of server state that must survive a
//! restart (unfinished operations, CI jobs), stored as `(kind, key) → bytes`.
//!
//! One narrow trait, [`RecordStore`], with two implementations: [`FsRecords`]
//! (the default, an append log with group commit under `--data-dir`) and
//! PostgreSQL (in the server, beside its other PostgreSQL stores). Both pass
//! the same [`conformance`] suite. Callers encode their own values (protobuf,
//! JSON); the store only keeps bytes.
//!
//! ```no_run
//! # async fn demo(store: &dyn buildkube_records::RecordStore) -> Result<(), buildkube_records::RecordError> {
//! use buildkube_records::RecordChange;
//! store.apply(vec![
//!     RecordChange::put("job", "job-1", b"state".to_vec()),
//!     RecordChange::delete("job", "job-0"),
//! ]).await?;
//! let jobs = store.load_all("job").await?; // [("job-1", b"state")]
//! # Ok(()) }
//! ```

pub mod conformance;
mod fs;
mod log_format;

use bytes::Bytes;

pub use fs::FsRecords;

/// Largest value of one record. Records hold what a request already had to
/// fit in (an Action, bounded by `--max-message-blob-size`; a job), so this
/// only stops a bug from writing without bound.
pub const MAX_RECORD_BYTES: usize = 64 << 20;
/// Largest key, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Largest kind, in bytes.
pub const MAX_KIND_BYTES: usize = 64;
/// Largest total of values in one [`RecordStore::apply`].
pub const MAX_APPLY_BYTES: usize = 256 << 20;

/// One change to the records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordChange {
    /// Stores `value` under (`kind`, `key`), replacing what was there.
    Put {
        /// What sort of record: `[a-z0-9_-]`, at most [`MAX_KIND_BYTES`].
        kind: String,
        /// Its key within the kind: any UTF-8, at most [`MAX_KEY_BYTES`].
        key: String,
        /// Its bytes, at most [`MAX_RECORD_BYTES`].
        value: Bytes,
    },
    /// Removes (`kind`, `key`); removing an absent record is not an error.
    Delete {
        /// What sort of record.
        kind: String,
        /// Its key.
        key: String,
    },
}

impl RecordChange {
    /// A [`RecordChange::Put`].
    pub fn put(kind: &str, key: &str, value: impl Into<Bytes>) -> RecordChange {
        RecordChange::Put {
            kind: kind.to_string(),
            key: key.to_string(),
            value: value.into(),
        }
    }

    /// A [`RecordChange::Delete`].
    pub fn delete(kind: &str, key: &str) -> RecordChange {
        RecordChange::Delete {
            kind: kind.to_string(),
            key: key.to_string(),
        }
    }

    /// The kind it changes.
    pub fn kind(&self) -> &str {
        match self {
            RecordChange::Put { kind, .. } | RecordChange::Delete { kind, .. } => kind,
        }
    }

    /// The key it changes.
    pub fn key(&self) -> &str {
        match self {
            RecordChange::Put { key, .. } | RecordChange::Delete { key, .. } => key,
        }
    }

    fn value_len(&self) -> usize {
        match self {
            RecordChange::Put { value, .. } => value.len(),
            RecordChange::Delete { .. } => 0,
        }
    }
}

/// Checks a kind's spelling, naming it in the error.
pub fn check_kind(kind: &str) -> Result<(), RecordError> {
    let valid = !kind.is_empty()
        && kind.len() <= MAX_KIND_BYTES
        && kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(RecordError::Invalid(format!(
            "record kind {kind:?}: use 1 to {MAX_KIND_BYTES} characters of a-z, 0-9, _ and -"
        )))
    }
}

/// Checks a batch before any of it is written: every kind, key and value
/// within bounds. The error names the record.
pub fn check_changes(changes: &[RecordChange]) -> Result<(), RecordError> {
    let mut total = 0usize;
    for change in changes {
        check_kind(change.kind())?;
        let (kind, key) = (change.kind(), change.key());
        if key.is_empty() || key.len() > MAX_KEY_BYTES {
            return Err(RecordError::Invalid(format!(
                "record {kind}/{key:.64?}: the key must be 1 to {MAX_KEY_BYTES} bytes, not {}",
                key.len()
            )));
        }
        let len = change.value_len();
        if len > MAX_RECORD_BYTES {
            return Err(RecordError::Invalid(format!(
                "record {kind}/{key:.64?}: value of {len} bytes exceeds the {MAX_RECORD_BYTES}-byte limit"
            )));
        }
        total += len;
    }
    if total > MAX_APPLY_BYTES {
        return Err(RecordError::Invalid(format!(
            "{} record changes carry {total} bytes, beyond the {MAX_APPLY_BYTES}-byte limit of one apply",
            changes.len()
        )));
    }
    Ok(())
}

/// Why a record store call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RecordError {
    /// A kind, key or value out of bounds; nothing was written.
    #[error("{0}")]
    Invalid(String),
    /// The backend failed (disk, database); nothing of the call is visible.
    #[error("record store {store}: {action}: {message}")]
    Backend {
        /// Which store (`data-dir /path`, `postgres`).
        store: String,
        /// What it was doing.
        action: String,
        /// The underlying error.
        message: String,
    },
}

/// Durable records, `(kind, key) → bytes`. Every call is durable when it
/// returns `Ok` (it survives a process kill; on the stores here a machine
/// crash too), and each [`apply`](RecordStore::apply) is atomic: after a
/// crash either all of its changes are visible or none.
#[async_trait::async_trait]
pub trait RecordStore: Send + Sync + 'static {
    /// Applies `changes` in order, atomically. Concurrent calls may be
    /// written together (one flush for many), in the order they arrived.
    async fn apply(&self, changes: Vec<RecordChange>) -> Result<(), RecordError>;

    /// The record (`kind`, `key`), if stored.
    async fn get(&self, kind: &str, key: &str) -> Result<Option<Bytes>, RecordError>;

    /// Every record of `kind` as (key, value), ordered by key.
    async fn load_all(&self, kind: &str) -> Result<Vec<(String, Bytes)>, RecordError>;

    /// Where the records live, for logs (never a password).
    fn describe(&self) -> String;

    /// Stores one record (an [`apply`](RecordStore::apply) of one put).
    async fn put(&self, kind: &str, key: &str, value: Bytes) -> Result<(), RecordError> {
        self.apply(vec![RecordChange::put(kind, key, value)]).await
    }

    /// Removes one record (an [`apply`](RecordStore::apply) of one delete).
    async fn delete(&self, kind: &str, key: &str) -> Result<(), RecordError> {
        self.apply(vec![RecordChange::delete(kind, key)]).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_keys_are_checked_and_named() {
        assert!(check_kind("operation").is_ok());
        assert!(check_kind("job-token_2").is_ok());
        for bad in ["", "Op", "a/b", "a b", &"x".repeat(65)] {
            let err = check_kind(bad).unwrap_err().to_string();
            assert!(err.contains("record kind"), "{err}");
        }
        let err = check_changes(&[RecordChange::put("op", "", Bytes::new())])
            .unwrap_err()
            .to_string();
        assert!(err.contains("record op/") && err.contains("key"), "{err}");
        let err = check_changes(&[RecordChange::delete("op", &"k".repeat(1025))])
            .unwrap_err()
            .to_string();
        assert!(err.contains("1025"), "{err}");
    }
}
