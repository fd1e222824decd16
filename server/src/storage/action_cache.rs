//! The embedded action cache: one file per (instance, action digest) holding
//! the encoded `ActionResult`, written with temp file + fsync + rename.

use std::path::{Path, PathBuf};

use buildkube_proto::reapi::ActionResult;
use buildkube_reapi::Digest;
use prost::Message;

use super::{
    create_dir_durably, decode_stored_result, write_atomically, ActionResultStore, StorageError,
};

/// Action results on the local file system, kept apart per instance name.
#[derive(Clone)]
pub struct FsActionCache {
    entries_dir: PathBuf,
    tmp_dir: PathBuf,
}

impl FsActionCache {
    /// Opens (creating if needed) the action cache under `dir`.
    pub fn open(dir: &Path) -> Result<FsActionCache, StorageError> {
        let entries_dir = dir.join("entries");
        let tmp_dir = dir.join("tmp");
        std::fs::create_dir_all(&entries_dir)
            .map_err(StorageError::io("creating", &entries_dir))?;
        let _ = std::fs::remove_dir_all(&tmp_dir);
        std::fs::create_dir_all(&tmp_dir).map_err(StorageError::io("creating", &tmp_dir))?;
        Ok(FsActionCache {
            entries_dir,
            tmp_dir,
        })
    }

    fn path_of(&self, instance: &str, action: &Digest) -> PathBuf {
        // Instance names may hold '/', so the directory is named by their hex.
        self.entries_dir
            .join(format!("i{}", hex::encode(instance)))
            .join(format!("{}-{}", action.hash_hex(), action.size()))
    }
}

/// A damaged entry is removed and reported as absent.
#[async_trait::async_trait]
impl ActionResultStore for FsActionCache {
    async fn get(
        &self,
        instance: &str,
        action: &Digest,
    ) -> Result<Option<ActionResult>, StorageError> {
        let path = self.path_of(instance, action);
        let data = match tokio::fs::read(&path).await {
            Ok(data) => data,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StorageError::io("reading", &path)(e)),
        };
        let result = decode_stored_result(&data, action, &path.display().to_string());
        if result.is_none() {
            let _ = tokio::fs::remove_file(&path).await;
        }
        Ok(result)
    }

    async fn put(
        &self,
        instance: &str,
        action: &Digest,
        result: &ActionResult,
    ) -> Result<(), StorageError> {
        let path = self.path_of(instance, action);
        let tmp_dir = self.tmp_dir.clone();
        let data = result.encode_to_vec();
        tokio::task::spawn_blocking(move || {
            let parent = path.parent().expect("entry path has a parent");
            create_dir_durably(parent)?;
            write_atomically(&tmp_dir, &path, &data)
        })
        .await
        .expect("action cache write task panicked")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::storage::conformance::action_store_conformance!(async {
        let dir = tempfile::tempdir().unwrap();
        let ac = FsActionCache::open(dir.path()).unwrap();
        (
            std::sync::Arc::new(ac) as std::sync::Arc<dyn ActionResultStore>,
            dir,
        )
    });

    #[tokio::test]
    async fn round_trip_per_instance_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let action = Digest::of_bytes(b"action");
        let result = ActionResult {
            exit_code: 3,
            ..Default::default()
        };
        {
            let ac = FsActionCache::open(dir.path()).unwrap();
            assert_eq!(ac.get("main", &action).await.unwrap(), None);
            ac.put("main", &action, &result).await.unwrap();
            assert_eq!(ac.get("other/inst", &action).await.unwrap(), None);
        }
        let ac = FsActionCache::open(dir.path()).unwrap();
        assert_eq!(ac.get("main", &action).await.unwrap(), Some(result));
    }

    #[tokio::test]
    async fn corrupt_entry_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let ac = FsActionCache::open(dir.path()).unwrap();
        let action = Digest::of_bytes(b"action");
        let path = ac.path_of("main", &action);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"\xff\xff\xff").unwrap();
        assert_eq!(ac.get("main", &action).await.unwrap(), None);
        assert!(!path.exists());
    }
}
