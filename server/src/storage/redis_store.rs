//! The action cache in Redis: one key per (instance, action digest) holding
//! the encoded `ActionResult`, written with one `SET` (atomic).
//!
//! Expiry: every entry is written with `EX expire_after_secs` (default 7
//! days; 0 = none), and Redis's own `maxmemory-policy` (e.g. `allkeys-lru`)
//! may drop entries at any time: a lost entry is a cache miss, never an error.

use buildkube_proto::reapi::ActionResult;
use buildkube_reapi::Digest;
use prost::Message;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;

use super::{decode_stored_result, ActionResultStore, StorageError};

const STORE: &str = "redis";

/// Action results in Redis.
#[derive(Clone)]
pub struct RedisActionCache {
    connection: ConnectionManager,
    prefix: String,
    expire_after_secs: u64,
}

impl RedisActionCache {
    /// Connects to `url` (with `password` if given); keys start with `prefix`.
    pub async fn connect(
        url: &str,
        password: Option<&str>,
        prefix: &str,
        expire_after_secs: u64,
    ) -> Result<RedisActionCache, StorageError> {
        let mut info = redis::IntoConnectionInfo::into_connection_info(url)
            .map_err(StorageError::backend(STORE, "parsing the url"))?;
        if let Some(password) = password {
            let settings = info
                .redis_settings()
                .clone()
                .set_password(password.trim_end_matches(['\n', '\r']));
            info = info.set_redis_settings(settings);
        }
        let target = info.addr().to_string();
        let client = redis::Client::open(info)
            .map_err(StorageError::backend(STORE, "configuring the client"))?;
        let connection = ConnectionManager::new(client)
            .await
            .map_err(StorageError::backend(
                STORE,
                format!("connecting to {target}"),
            ))?;
        tracing::info!(server = %target, "Redis action cache ready");
        Ok(RedisActionCache {
            connection,
            prefix: prefix.to_string(),
            expire_after_secs,
        })
    }

    fn key(&self, instance: &str, action: &Digest) -> String {
        // Instance names may hold ':' and '/', so they are hex-encoded.
        format!(
            "{}ac:{}:{}-{}",
            self.prefix,
            hex::encode(instance),
            action.hash_hex(),
            action.size()
        )
    }
}

#[async_trait::async_trait]
impl ActionResultStore for RedisActionCache {
    async fn get(
        &self,
        instance: &str,
        action: &Digest,
    ) -> Result<Option<ActionResult>, StorageError> {
        let key = self.key(instance, action);
        let data: Option<Vec<u8>> = self
            .connection
            .clone()
            .get(&key)
            .await
            .map_err(StorageError::backend(STORE, format!("GET {key}")))?;
        let Some(data) = data else { return Ok(None) };
        Ok(decode_stored_result(
            &data,
            action,
            &format!("Redis key {key}"),
        ))
    }

    async fn put(
        &self,
        instance: &str,
        action: &Digest,
        result: &ActionResult,
    ) -> Result<(), StorageError> {
        let key = self.key(instance, action);
        let data = result.encode_to_vec();
        let mut connection = self.connection.clone();
        let outcome: redis::RedisResult<()> = if self.expire_after_secs > 0 {
            connection.set_ex(&key, data, self.expire_after_secs).await
        } else {
            connection.set(&key, data).await
        };
        outcome.map_err(StorageError::backend(STORE, format!("SET {key}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::conformance::test_redis_url;
    use std::sync::Arc;

    crate::storage::conformance::action_store_conformance!(async {
        let ac = RedisActionCache::connect(&test_redis_url(), None, "buildkube-test:", 600)
            .await
            .expect("connecting to BUILDKUBE_TEST_REDIS_URL");
        (Arc::new(ac) as Arc<dyn ActionResultStore>, ())
    });

    #[tokio::test]
    async fn entries_expire() {
        let ac = RedisActionCache::connect(&test_redis_url(), None, "buildkube-test:", 1)
            .await
            .unwrap();
        let action = Digest::of_bytes(uuid::Uuid::new_v4().as_bytes());
        ac.put("main", &action, &ActionResult::default())
            .await
            .unwrap();
        let ttl: i64 = ac
            .connection
            .clone()
            .ttl(ac.key("main", &action))
            .await
            .unwrap();
        assert!((0..=1).contains(&ttl), "ttl {ttl}");
    }
}
