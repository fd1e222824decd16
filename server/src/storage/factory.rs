//! The one factory: builds the store tree that a [`StorageConfig`] describes.
//! The CAS and the action cache come from the same config type; which kinds
//! may serve which is checked here, and every error names the config field.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use buildkube_config::storage::{StorageConfig, StoreConfig};
use buildkube_records::{FsRecords, RecordStore};
use futures::future::BoxFuture;

use super::{
    ActionResultStore, FsActionCache, FsCas, PostgresActionCache, PostgresCas, PostgresCasOptions,
    PostgresPool, PostgresRecords, ReadCache, RedisActionCache, SharedBlobStore, SizePartitioned,
};

/// The server's two stores.
pub struct Stores {
    /// Blobs.
    pub cas: SharedBlobStore,
    /// Action results.
    pub action_cache: Arc<dyn ActionResultStore>,
    /// Durable records: unfinished operations, CI jobs.
    pub records: Arc<dyn RecordStore>,
}

/// What relative paths and unset sizes default to.
struct Defaults<'a> {
    data_dir: &'a Path,
    cas_max_size: u64,
}

/// Opens the stores of `config`; relative filesystem paths are under
/// `data_dir`, and `cas_max_size` is the default filesystem CAS budget.
pub async fn open(
    config: &StorageConfig,
    data_dir: &Path,
    cas_max_size: u64,
) -> anyhow::Result<Stores> {
    let defaults = Defaults {
        data_dir,
        cas_max_size,
    };
    let cas = blob_store(&config.cas, "cas".into(), &defaults).await?;
    let action_cache = action_store(&config.action_cache, "action_cache".into(), &defaults).await?;
    let records = record_store(&config.records, "records", &defaults).await?;
    Ok(Stores {
        cas,
        action_cache,
        records,
    })
}

async fn record_store(
    config: &StoreConfig,
    field: &str,
    defaults: &Defaults<'_>,
) -> anyhow::Result<Arc<dyn RecordStore>> {
    Ok(match config {
        StoreConfig::Filesystem(fs) => {
            let field = format!("{field}.filesystem");
            if fs.max_size.is_some() {
                bail!("{field}.max_size: only a CAS has a size budget");
            }
            let dir = resolve(defaults, &fs.path);
            Arc::new(
                FsRecords::open(&dir)
                    .await
                    .with_context(|| format!("{field}: opening {}", dir.display()))?,
            )
        }
        StoreConfig::Postgres(pg) => {
            let field = format!("{field}.postgres");
            if pg.max_size.is_some() || pg.expire_unused_after_secs.is_some() {
                bail!("{field}: max_size and expire_unused_after_secs do not apply to records (they are deleted when done)");
            }
            let password = read_password(&field, pg.password_file.as_ref())?;
            let pool = PostgresPool::connect(&pg.url, password.as_deref(), pg.pool_size)
                .await
                .with_context(|| format!("{field}: opening the database"))?;
            Arc::new(PostgresRecords::new(pool))
        }
        StoreConfig::Redis(_) => bail!("{field}.redis: records live in filesystem or postgres"),
        StoreConfig::ReadCache(_) => {
            bail!("{field}.read_cache: records live in filesystem or postgres")
        }
        StoreConfig::SizePartitioned(_) => {
            bail!("{field}.size_partitioned: records live in filesystem or postgres")
        }
    })
}

fn resolve(defaults: &Defaults<'_>, path: &Path) -> PathBuf {
    defaults.data_dir.join(path)
}

fn read_password(field: &str, file: Option<&PathBuf>) -> anyhow::Result<Option<String>> {
    file.map(|path| {
        std::fs::read_to_string(path)
            .with_context(|| format!("{field}.password_file {}", path.display()))
    })
    .transpose()
}

fn blob_store<'a>(
    config: &'a StoreConfig,
    field: String,
    defaults: &'a Defaults<'a>,
) -> BoxFuture<'a, anyhow::Result<SharedBlobStore>> {
    Box::pin(async move {
        Ok(match config {
            StoreConfig::Filesystem(fs) => {
                let field = format!("{field}.filesystem");
                let dir = resolve(defaults, &fs.path);
                let budget = fs.max_size.unwrap_or(defaults.cas_max_size);
                Arc::new(
                    FsCas::open(&dir, budget)
                        .await
                        .with_context(|| format!("{field}: opening {}", dir.display()))?,
                ) as SharedBlobStore
            }
            StoreConfig::Postgres(pg) => {
                let field = format!("{field}.postgres");
                if pg.expire_unused_after_secs.is_some() {
                    bail!(
                        "{field}.expire_unused_after_secs: only an action cache expires entries; \
                         a CAS has max_size"
                    );
                }
                let password = read_password(&field, pg.password_file.as_ref())?;
                let pool = PostgresPool::connect(&pg.url, password.as_deref(), pg.pool_size)
                    .await
                    .with_context(|| format!("{field}: opening the database"))?;
                Arc::new(PostgresCas::new(
                    pool,
                    PostgresCasOptions::new(pg.max_blob_size, pg.max_size),
                ))
            }
            StoreConfig::Redis(_) => bail!(
                "{field}.redis: Redis serves only the action cache; put the CAS in postgres or filesystem"
            ),
            StoreConfig::ReadCache(rc) => {
                let cache = blob_store(&rc.cache, format!("{field}.read_cache.cache"), defaults).await?;
                let backing =
                    blob_store(&rc.backing, format!("{field}.read_cache.backing"), defaults).await?;
                Arc::new(ReadCache::new(cache, backing))
            }
            StoreConfig::SizePartitioned(sp) => {
                let small =
                    blob_store(&sp.small, format!("{field}.size_partitioned.small"), defaults).await?;
                let large =
                    blob_store(&sp.large, format!("{field}.size_partitioned.large"), defaults).await?;
                Arc::new(SizePartitioned::new(sp.threshold, small, large))
            }
        })
    })
}

async fn action_store(
    config: &StoreConfig,
    field: String,
    defaults: &Defaults<'_>,
) -> anyhow::Result<Arc<dyn ActionResultStore>> {
    Ok(match config {
        StoreConfig::Filesystem(fs) => {
            let field = format!("{field}.filesystem");
            if fs.max_size.is_some() {
                bail!("{field}.max_size: only a CAS has a size budget");
            }
            let dir = resolve(defaults, &fs.path);
            Arc::new(
                FsActionCache::open(&dir)
                    .with_context(|| format!("{field}: opening {}", dir.display()))?,
            )
        }
        StoreConfig::Postgres(pg) => {
            let field = format!("{field}.postgres");
            if pg.max_size.is_some() {
                bail!("{field}.max_size: only a CAS has a size budget");
            }
            let expire_unused_after = pg.expire_unused_after_secs.map(Duration::from_secs);
            let password = read_password(&field, pg.password_file.as_ref())?;
            let pool = PostgresPool::connect(&pg.url, password.as_deref(), pg.pool_size)
                .await
                .with_context(|| format!("{field}: opening the database"))?;
            Arc::new(PostgresActionCache::new(pool, expire_unused_after))
        }
        StoreConfig::Redis(redis) => {
            let field = format!("{field}.redis");
            let password = read_password(&field, redis.password_file.as_ref())?;
            Arc::new(
                RedisActionCache::connect(
                    &redis.url,
                    password.as_deref(),
                    &redis.key_prefix,
                    redis.expire_after_secs,
                )
                .await
                .with_context(|| format!("{field}: connecting"))?,
            )
        }
        StoreConfig::ReadCache(_) => {
            bail!("{field}.read_cache: decorates a CAS only; name one action cache store")
        }
        StoreConfig::SizePartitioned(_) => {
            bail!("{field}.size_partitioned: decorates a CAS only; name one action cache store")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn embedded_default_is_the_data_dir_layout() {
        let dir = tempfile::tempdir().unwrap();
        let stores = open(&StorageConfig::embedded(), dir.path(), 1 << 20)
            .await
            .unwrap();
        let (d, data) = crate::storage::conformance::unique_blob(10);
        stores.cas.put(d, data).await.unwrap();
        let hash = d.hash_hex();
        assert!(dir
            .path()
            .join("cas/blobs")
            .join(&hash[..2])
            .join(format!("{hash}-10"))
            .exists());
        assert!(dir.path().join("action-cache/entries").exists());
        stores
            .records
            .put("test", "k", bytes::Bytes::from_static(b"v"))
            .await
            .unwrap();
        assert!(dir.path().join("records/records.log").exists());
    }

    #[tokio::test]
    async fn misplaced_kinds_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let config = StorageConfig::from_yaml(
            "cas: {redis: {url: 'redis://127.0.0.1:1/'}}\naction_cache: {filesystem: {path: ac}}\n",
        )
        .unwrap();
        let err = open(&config, dir.path(), 1).await.err().unwrap();
        assert!(err.to_string().starts_with("cas.redis:"), "{err:#}");
        let config = StorageConfig::from_yaml(
            "cas: {filesystem: {path: c}}\naction_cache: {read_cache: {cache: {filesystem: {path: a}}, backing: {filesystem: {path: b}}}}\n",
        )
        .unwrap();
        let err = open(&config, dir.path(), 1).await.err().unwrap();
        assert!(
            err.to_string().starts_with("action_cache.read_cache:"),
            "{err:#}"
        );
        let config = StorageConfig::from_yaml(
            "cas: {read_cache: {cache: {filesystem: {path: c}}, backing: {postgres: {url: 'postgres://u@h/d', password_file: /nonexistent/pw}}}}\naction_cache: {filesystem: {path: a}}\n",
        )
        .unwrap();
        let err = open(&config, dir.path(), 1).await.err().unwrap();
        assert!(
            format!("{err:#}")
                .starts_with("cas.read_cache.backing.postgres.password_file /nonexistent/pw"),
            "{err:#}"
        );
        let config = StorageConfig::from_yaml(
            "cas: {filesystem: {path: c}}\naction_cache: {postgres: {url: 'postgres://u@h/d', max_size: 1GiB}}\n",
        )
        .unwrap();
        let err = open(&config, dir.path(), 1).await.err().unwrap();
        assert_eq!(
            err.to_string(),
            "action_cache.postgres.max_size: only a CAS has a size budget"
        );
        let config = StorageConfig::from_yaml(
            "cas: {postgres: {url: 'postgres://u@h/d', expire_unused_after_secs: 60}}\naction_cache: {filesystem: {path: a}}\n",
        )
        .unwrap();
        let err = open(&config, dir.path(), 1).await.err().unwrap();
        assert!(
            err.to_string()
                .starts_with("cas.postgres.expire_unused_after_secs: only an action cache"),
            "{err:#}"
        );
        let config = StorageConfig::from_yaml(
            "cas: {filesystem: {path: c}}\naction_cache: {filesystem: {path: a}}\nrecords: {redis: {url: 'redis://127.0.0.1:1/'}}\n",
        )
        .unwrap();
        let err = open(&config, dir.path(), 1).await.err().unwrap();
        assert_eq!(
            err.to_string(),
            "records.redis: records live in filesystem or postgres"
        );
    }
}
