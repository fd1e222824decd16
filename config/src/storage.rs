//! The server's storage configuration: which store holds the CAS and which
//! holds the action cache, as a tree of stores (backends and the decorators
//! wrapping them). Read from the YAML file named by `--storage-config`;
//! without it, [`StorageConfig::embedded`] is today's data-dir layout.
//!
//! ```yaml
//! cas:
//!   read_cache:
//!     cache: { filesystem: { path: cas, max_size: 10GiB } }
//!     backing:
//!       postgres:
//!         url: postgres://buildkube@buildkube-postgres:5432/buildkube
//!         password_file: /etc/buildkube/postgres/password
//! action_cache:
//!   redis: { url: redis://buildkube-redis:6379/ }
//! records:     # optional; default: filesystem: {path: records}
//!   postgres: { url: postgres://buildkube@buildkube-postgres:5432/buildkube }
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the CAS, the action cache and the durable records live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// The content-addressable store (blobs), shared by all instances.
    #[serde(with = "serde_yaml::with::singleton_map_recursive")]
    pub cas: StoreConfig,
    /// The action cache (action digest → ActionResult), kept apart per instance.
    #[serde(with = "serde_yaml::with::singleton_map_recursive")]
    pub action_cache: StoreConfig,
    /// The server's durable records: operations queued or running (so they
    /// survive a restart) and CI jobs. `filesystem` (an append log with group
    /// commit; a relative path is under `--data-dir`) or `postgres` (table
    /// `buildkube_records`; the `url`, `password_file` and `pool_size` fields
    /// apply). Default `filesystem: {path: records}`.
    #[serde(
        default = "default_records",
        skip_serializing_if = "is_default_records",
        with = "serde_yaml::with::singleton_map_recursive"
    )]
    pub records: StoreConfig,
}

/// One store: a backend, or a decorator wrapping other stores. Written in
/// YAML as a one-key map naming the kind, e.g. `filesystem: {path: cas}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum StoreConfig {
    /// Files on local disk (the embedded default). CAS or action cache.
    Filesystem(FilesystemStore),
    /// A PostgreSQL database. CAS or action cache.
    Postgres(PostgresStore),
    /// A Redis server. Action cache only.
    Redis(RedisStore),
    /// A fast store in front of a slower shared one: reads fill the cache,
    /// writes go to the backing store. CAS only.
    ReadCache(Box<ReadCacheStore>),
    /// Blobs up to `threshold` bytes in one store, larger ones in another. CAS only.
    SizePartitioned(Box<SizePartitionedStore>),
}

/// Blobs or action results as files, written by temp file + fsync + rename.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesystemStore {
    /// Directory of the store; a relative path is under `--data-dir`.
    pub path: PathBuf,
    /// CAS only: size budget in bytes (or `10GiB`, `512M`); least recently
    /// used blobs are evicted beyond it. Default: `--cas-max-size`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de_opt_size",
        serialize_with = "ser_opt_size"
    )]
    pub max_size: Option<u64>,
}

/// A PostgreSQL database; the server creates its tables (`buildkube_*`) at start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresStore {
    /// Connection URL, e.g. `postgres://buildkube@buildkube-postgres:5432/buildkube`.
    /// Keep the password out of it: use `password_file`.
    pub url: String,
    /// File holding the password (trailing newline ignored), e.g. a mounted Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Connections opened to the database. Default 4.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// CAS only: largest blob accepted, in bytes (or `64MiB`). Uploads
    /// stream into the database in 1 MiB chunks, so this bounds what one
    /// upload can add, not server memory; very large blobs are better kept on
    /// a filesystem with `size_partitioned`. Default 1GiB.
    #[serde(
        default = "default_postgres_max_blob",
        deserialize_with = "de_size",
        serialize_with = "ser_size"
    )]
    pub max_blob_size: u64,
    /// CAS only: bytes of blobs kept (or `500GiB`). Every 30 s the server
    /// measures the store and, beyond this, deletes the least recently used
    /// blobs until 90% of it is left. Unset: nothing is deleted by the server.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de_opt_size",
        serialize_with = "ser_opt_size"
    )]
    pub max_size: Option<u64>,
    /// Action cache only: entries neither read nor written for this many
    /// seconds are deleted (checked every minute). Unset: kept until
    /// deleted by hand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_unused_after_secs: Option<u64>,
}

/// A Redis server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisStore {
    /// Connection URL, e.g. `redis://buildkube-redis:6379/0`.
    pub url: String,
    /// File holding the password (trailing newline ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Prefix of every key the server writes. Default `buildkube:`.
    #[serde(default = "default_redis_prefix")]
    pub key_prefix: String,
    /// Seconds an entry lives after it was written (Redis `EX`); 0 = no expiry
    /// (then rely on Redis `maxmemory-policy`). Default 604800 (7 days).
    #[serde(default = "default_redis_expiry")]
    pub expire_after_secs: u64,
}

/// A read cache in front of a backing store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadCacheStore {
    /// The fast store, usually `filesystem`; it may lose blobs at any time.
    pub cache: StoreConfig,
    /// The authoritative store: every write lands here, presence is asked here.
    pub backing: StoreConfig,
}

/// Routes blobs by size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SizePartitionedStore {
    /// Blobs of at most this many bytes (or `1MiB`) go to `small`, larger ones to `large`.
    #[serde(deserialize_with = "de_size", serialize_with = "ser_size")]
    pub threshold: u64,
    /// Store of the small blobs.
    pub small: StoreConfig,
    /// Store of the large blobs.
    pub large: StoreConfig,
}

fn default_records() -> StoreConfig {
    StoreConfig::Filesystem(FilesystemStore {
        path: "records".into(),
        max_size: None,
    })
}
fn is_default_records(records: &StoreConfig) -> bool {
    *records == default_records()
}
fn default_pool_size() -> usize {
    4
}
fn default_postgres_max_blob() -> u64 {
    1 << 30
}
fn default_redis_prefix() -> String {
    "buildkube:".into()
}
fn default_redis_expiry() -> u64 {
    7 * 24 * 3600
}

/// A size written as a number of bytes or a string such as `10GiB`.
#[derive(Deserialize)]
#[serde(untagged)]
enum SizeText {
    Number(u64),
    Text(String),
}

fn de_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match SizeText::deserialize(d)? {
        SizeText::Number(n) => Ok(n),
        SizeText::Text(t) => crate::parse_byte_size(&t).map_err(serde::de::Error::custom),
    }
}

fn de_opt_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    de_size(d).map(Some)
}

fn ser_size<S: serde::Serializer>(n: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(*n)
}

fn ser_opt_size<S: serde::Serializer>(n: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match n {
        Some(n) => s.serialize_u64(*n),
        None => s.serialize_none(),
    }
}

impl StorageConfig {
    /// The embedded layout: `DATA/cas` (size budget `--cas-max-size`) and
    /// `DATA/action-cache`, both on the filesystem.
    pub fn embedded() -> StorageConfig {
        StorageConfig {
            cas: StoreConfig::Filesystem(FilesystemStore {
                path: "cas".into(),
                max_size: None,
            }),
            action_cache: StoreConfig::Filesystem(FilesystemStore {
                path: "action-cache".into(),
                max_size: None,
            }),
            records: default_records(),
        }
    }

    /// The default record store: `filesystem: {path: records}` under `--data-dir`.
    pub fn default_records() -> StoreConfig {
        default_records()
    }

    /// Parses YAML; the error names the offending field and its position.
    pub fn from_yaml(text: &str) -> Result<StorageConfig, String> {
        serde_yaml::from_str(text).map_err(|e| e.to_string())
    }

    /// Reads and parses the file named by `--storage-config`.
    pub fn load(path: &Path) -> Result<StorageConfig, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--storage-config {}: {e}", path.display()))?;
        StorageConfig::from_yaml(&text)
            .map_err(|e| format!("--storage-config {}: {e}", path.display()))
    }

    /// Renders YAML that [`StorageConfig::from_yaml`] reads back.
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("storage config serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_tree_with_defaults_and_sizes() {
        let config = StorageConfig::from_yaml(
            "cas:\n  read_cache:\n    cache: {filesystem: {path: cas, max_size: 1GiB}}\n    backing: {postgres: {url: 'postgres://u@h/db', password_file: /p}}\naction_cache:\n  redis: {url: 'redis://h/'}\n",
        )
        .unwrap();
        let StoreConfig::ReadCache(rc) = &config.cas else {
            panic!("{config:?}")
        };
        assert_eq!(
            rc.cache,
            StoreConfig::Filesystem(FilesystemStore {
                path: "cas".into(),
                max_size: Some(1 << 30)
            })
        );
        let StoreConfig::Postgres(pg) = &rc.backing else {
            panic!()
        };
        assert_eq!((pg.pool_size, pg.max_blob_size), (4, 1 << 30));
        let StoreConfig::Redis(redis) = &config.action_cache else {
            panic!()
        };
        assert_eq!(redis.expire_after_secs, 604800);
        assert_eq!(StorageConfig::from_yaml(&config.to_yaml()).unwrap(), config);
        assert_eq!(config.records, StorageConfig::embedded().records);
        let embedded = StorageConfig::embedded();
        assert_eq!(
            StorageConfig::from_yaml(&embedded.to_yaml()).unwrap(),
            embedded
        );
    }

    #[test]
    fn records_default_to_the_data_dir_and_may_be_postgres() {
        let config = StorageConfig::from_yaml(
            "cas: {filesystem: {path: cas}}\naction_cache: {filesystem: {path: ac}}\nrecords: {postgres: {url: 'postgres://u@h/db', password_file: /p}}\n",
        )
        .unwrap();
        let StoreConfig::Postgres(pg) = &config.records else {
            panic!("{config:?}")
        };
        assert_eq!(pg.url, "postgres://u@h/db");
        assert_eq!(StorageConfig::from_yaml(&config.to_yaml()).unwrap(), config);
        // The default is not written out, so existing configs render unchanged.
        assert!(!StorageConfig::embedded().to_yaml().contains("records"));
    }

    #[test]
    fn errors_name_the_field() {
        let err = StorageConfig::from_yaml(
            "cas: {postgres: {url: x, pool_sise: 3}}\naction_cache: {filesystem: {path: ac}}\n",
        )
        .unwrap_err();
        assert!(
            err.contains("pool_sise") && err.contains("pool_size"),
            "{err}"
        );
        let err =
            StorageConfig::from_yaml("cas: {s3: {}}\naction_cache: {filesystem: {path: ac}}\n")
                .unwrap_err();
        assert!(err.contains("s3") && err.contains("postgres"), "{err}");
        let err = StorageConfig::from_yaml(
            "cas: {filesystem: {path: c, max_size: 10 parsecs}}\naction_cache: {filesystem: {path: ac}}\n",
        )
        .unwrap_err();
        assert!(
            err.contains("parsecs") && err.contains("cas.filesystem"),
            "{err}"
        );
    }
}
