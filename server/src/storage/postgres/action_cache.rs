//! The action cache table.

use super::*;

/// The action cache in PostgreSQL; entries unused for `expire_unused_after`
/// are deleted (see the module docs).
#[derive(Clone)]
pub struct PostgresActionCache {
    pool: PostgresPool,
    expire_unused_after: Option<Duration>,
    /// Stops the expiry task when the last clone is dropped.
    _expiry: Option<Arc<AbortOnDrop>>,
}

impl PostgresActionCache {
    /// The action cache over `pool`; with `expire_unused_after`, starts the
    /// task that deletes entries unused that long (needs a Tokio runtime).
    pub fn new(pool: PostgresPool, expire_unused_after: Option<Duration>) -> PostgresActionCache {
        let expiry = expire_unused_after.map(|_| {
            let cache = PostgresActionCache {
                pool: pool.clone(),
                expire_unused_after,
                _expiry: None,
            };
            Arc::new(every(
                AC_EXPIRY_INTERVAL,
                "expiring unused action results",
                move || {
                    let cache = cache.clone();
                    async move { cache.expire_unused().await.map(drop) }
                },
            ))
        });
        PostgresActionCache {
            pool,
            expire_unused_after,
            _expiry: expiry,
        }
    }

    /// Deletes the entries unused for `expire_unused_after` now, as the
    /// expiry task does every minute; returns how many went.
    pub async fn expire_unused(&self) -> Result<u64, StorageError> {
        let Some(after) = self.expire_unused_after else {
            return Ok(0);
        };
        let deleted = self
            .pool
            .client()
            .await?
            .execute(
                "DELETE FROM buildkube_action_results
                 WHERE accessed < now() - make_interval(secs => $1)",
                &[&after.as_secs_f64()],
            )
            .await
            .map_err(StorageError::backend(
                STORE,
                "expiring unused action results",
            ))?;
        if deleted > 0 {
            tracing::info!(
                deleted,
                unused_for_secs = after.as_secs(),
                "deleted unused action results"
            );
        }
        Ok(deleted)
    }
}

#[async_trait::async_trait]
impl ActionResultStore for PostgresActionCache {
    async fn get(
        &self,
        instance: &str,
        action: &Digest,
    ) -> Result<Option<ActionResult>, StorageError> {
        let row = self
            .pool
            .client()
            .await?
            .query_opt(
                // Read and keep (refresh the access time, at most once a minute).
                "WITH touched AS (
                     UPDATE buildkube_action_results SET accessed = now()
                     WHERE instance = $1 AND hash = $2 AND size = $3
                       AND accessed < now() - interval '1 minute'
                 )
                 SELECT result FROM buildkube_action_results
                 WHERE instance = $1 AND hash = $2 AND size = $3",
                &[
                    &instance,
                    &action.hash_bytes().as_slice(),
                    &size_param(action),
                ],
            )
            .await
            .map_err(StorageError::backend(
                STORE,
                format!("reading the action result of {action} in {instance:?}"),
            ))?;
        let Some(row) = row else { return Ok(None) };
        Ok(decode_stored_result(
            row.get::<_, &[u8]>(0),
            action,
            &format!("PostgreSQL action cache, instance {instance:?}"),
        ))
    }

    async fn put(
        &self,
        instance: &str,
        action: &Digest,
        result: &ActionResult,
    ) -> Result<(), StorageError> {
        self.pool
            .client()
            .await?
            .execute(
                "INSERT INTO buildkube_action_results (instance, hash, size, result)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (instance, hash, size)
                 DO UPDATE SET result = EXCLUDED.result, updated = now(), accessed = now()",
                &[
                    &instance,
                    &action.hash_bytes().as_slice(),
                    &size_param(action),
                    &result.encode_to_vec(),
                ],
            )
            .await
            .map_err(StorageError::backend(
                STORE,
                format!("storing the action result of {action} in {instance:?}"),
            ))?;
        Ok(())
    }
}
