//! [`PostgresRecords`]: the durable records (`buildkube_records`, created
//! with the other tables at start) in PostgreSQL, for servers whose
//! `--storage-config` says `records: {postgres: …}`.
//!
//! Each [`RecordStore::apply`] is one statement (a delete and an upsert of
//! unnested arrays), so it is atomic without holding a pool connection in a
//! transaction that other calls share. Changes to the same record within one
//! apply are collapsed to the last one first, which leaves the same records
//! as applying them in order. Concurrent applies run on the pool's
//! connections side by side; callers that need two changes to the same
//! record ordered wait for the first (the scheduler's journal does).

use std::collections::BTreeMap;

use buildkube_records::{check_changes, check_kind, RecordChange, RecordError, RecordStore};
use bytes::Bytes;

use super::PostgresPool;

/// Records in the `buildkube_records` table.
pub struct PostgresRecords {
    pool: PostgresPool,
}

impl PostgresRecords {
    /// The records of the database behind `pool` (its tables exist once connected).
    pub fn new(pool: PostgresPool) -> PostgresRecords {
        PostgresRecords { pool }
    }

    fn err(&self, action: &str, error: impl std::fmt::Display) -> RecordError {
        RecordError::Backend {
            store: format!("postgres {}", self.pool.target()),
            action: action.to_string(),
            message: error.to_string(),
        }
    }
}

#[async_trait::async_trait]
impl RecordStore for PostgresRecords {
    async fn apply(&self, changes: Vec<RecordChange>) -> Result<(), RecordError> {
        check_changes(&changes)?;
        if changes.is_empty() {
            return Ok(());
        }
        let count = changes.len();
        // The last change of each record decides it.
        let mut last: BTreeMap<(String, String), Option<Bytes>> = BTreeMap::new();
        for change in changes {
            match change {
                RecordChange::Put { kind, key, value } => last.insert((kind, key), Some(value)),
                RecordChange::Delete { kind, key } => last.insert((kind, key), None),
            };
        }
        let (mut del_kinds, mut del_keys) = (Vec::new(), Vec::new());
        let (mut put_kinds, mut put_keys, mut put_values) = (Vec::new(), Vec::new(), Vec::new());
        for ((kind, key), value) in &last {
            match value {
                Some(value) => {
                    put_kinds.push(kind.as_str());
                    put_keys.push(key.as_str());
                    put_values.push(value.as_ref());
                }
                None => {
                    del_kinds.push(kind.as_str());
                    del_keys.push(key.as_str());
                }
            }
        }
        let client = self
            .pool
            .client()
            .await
            .map_err(|e| self.err("connecting", e))?;
        client
            .execute(
                "WITH deleted AS (
                     DELETE FROM buildkube_records r
                     USING unnest($1::text[], $2::text[]) AS d(kind, key)
                     WHERE r.kind = d.kind AND r.key = d.key)
                 INSERT INTO buildkube_records (kind, key, value)
                 SELECT * FROM unnest($3::text[], $4::text[], $5::bytea[])
                 ON CONFLICT (kind, key) DO UPDATE SET value = EXCLUDED.value, updated = now()",
                &[&del_kinds, &del_keys, &put_kinds, &put_keys, &put_values],
            )
            .await
            .map_err(|e| self.err(&format!("applying {count} record changes"), e))?;
        Ok(())
    }

    async fn get(&self, kind: &str, key: &str) -> Result<Option<Bytes>, RecordError> {
        check_kind(kind)?;
        let client = self
            .pool
            .client()
            .await
            .map_err(|e| self.err("connecting", e))?;
        let row = client
            .query_opt(
                "SELECT value FROM buildkube_records WHERE kind = $1 AND key = $2",
                &[&kind, &key],
            )
            .await
            .map_err(|e| self.err(&format!("reading record {kind}/{key}"), e))?;
        Ok(row.map(|row| Bytes::from(row.get::<_, Vec<u8>>(0))))
    }

    async fn load_all(&self, kind: &str) -> Result<Vec<(String, Bytes)>, RecordError> {
        check_kind(kind)?;
        let client = self
            .pool
            .client()
            .await
            .map_err(|e| self.err("connecting", e))?;
        // COLLATE "C": byte order, as the data-dir store and Rust order keys.
        let rows = client
            .query(
                "SELECT key, value FROM buildkube_records WHERE kind = $1 ORDER BY key COLLATE \"C\"",
                &[&kind],
            )
            .await
            .map_err(|e| self.err(&format!("loading the {kind} records"), e))?;
        Ok(rows
            .into_iter()
            .map(|row| {
                (
                    row.get::<_, String>(0),
                    Bytes::from(row.get::<_, Vec<u8>>(1)),
                )
            })
            .collect())
    }

    fn describe(&self) -> String {
        format!("postgres {}", self.pool.target())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::storage::conformance::test_postgres_url;

    async fn records() -> PostgresRecords {
        let pool = PostgresPool::connect(&test_postgres_url(), None, 2)
            .await
            .expect("connecting to BUILDKUBE_TEST_POSTGRES_URL");
        PostgresRecords::new(pool)
    }

    buildkube_records::record_store_conformance!(async {
        (Arc::new(records().await) as Arc<dyn RecordStore>, ())
    });

    #[tokio::test]
    async fn records_survive_a_new_connection() {
        let kind = buildkube_records::conformance::unique_kind("reconnect");
        records()
            .await
            .put(&kind, "main/operations/x", Bytes::from_static(b"queued"))
            .await
            .unwrap();
        let again = records().await;
        assert_eq!(
            again.load_all(&kind).await.unwrap(),
            vec![(
                "main/operations/x".to_string(),
                Bytes::from_static(b"queued")
            )]
        );
        again.delete(&kind, "main/operations/x").await.unwrap();
    }
}
