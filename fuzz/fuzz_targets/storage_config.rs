//! The storage configuration (`config/src/storage.rs`, `--storage-config`):
//! any YAML the loader accepts renders back (`to_yaml`) to YAML that loads
//! as the same configuration, and any configuration value renders to YAML
//! that loads back unchanged. Loading never panics, whatever the text.
#![no_main]

use arbitrary::{Arbitrary, Result, Unstructured};
use buildkube_config::storage::{
    FilesystemStore, PostgresStore, ReadCacheStore, RedisStore, SizePartitionedStore,
    StorageConfig, StoreConfig,
};
use libfuzzer_sys::fuzz_target;

/// Nesting of decorators in generated configurations (real ones have 2 or 3).
const MAX_DEPTH: u32 = 6;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        loaded_text_round_trips(text);
    }
    if let Ok(config) = any_config(&mut Unstructured::new(data)) {
        rendered_config_loads_back(&config);
    }
});

fn loaded_text_round_trips(text: &str) {
    let Ok(config) = StorageConfig::from_yaml(text) else {
        return;
    };
    let rendered = config.to_yaml();
    assert_eq!(
        StorageConfig::from_yaml(&rendered).as_ref(),
        Ok(&config),
        "{text:?} loaded, rendered as {rendered:?}"
    );
}

fn rendered_config_loads_back(config: &StorageConfig) {
    let rendered = config.to_yaml();
    assert_eq!(
        StorageConfig::from_yaml(&rendered).as_ref(),
        Ok(config),
        "rendered as {rendered:?}"
    );
}

fn any_config(u: &mut Unstructured<'_>) -> Result<StorageConfig> {
    Ok(StorageConfig {
        cas: any_store(u, 0)?,
        action_cache: any_store(u, 0)?,
        records: any_store(u, 0)?,
    })
}

fn any_store(u: &mut Unstructured<'_>, depth: u32) -> Result<StoreConfig> {
    let kinds = if depth < MAX_DEPTH { 5 } else { 3 };
    Ok(match u.choose_index(kinds)? {
        0 => StoreConfig::Filesystem(FilesystemStore {
            path: String::arbitrary(u)?.into(),
            max_size: Option::arbitrary(u)?,
        }),
        1 => StoreConfig::Postgres(PostgresStore {
            url: String::arbitrary(u)?,
            password_file: Option::<String>::arbitrary(u)?.map(Into::into),
            pool_size: usize::arbitrary(u)?,
            max_blob_size: u64::arbitrary(u)?,
            max_size: Option::arbitrary(u)?,
            expire_unused_after_secs: Option::arbitrary(u)?,
        }),
        2 => StoreConfig::Redis(RedisStore {
            url: String::arbitrary(u)?,
            password_file: Option::<String>::arbitrary(u)?.map(Into::into),
            key_prefix: String::arbitrary(u)?,
            expire_after_secs: u64::arbitrary(u)?,
        }),
        3 => StoreConfig::ReadCache(Box::new(ReadCacheStore {
            cache: any_store(u, depth + 1)?,
            backing: any_store(u, depth + 1)?,
        })),
        _ => StoreConfig::SizePartitioned(Box::new(SizePartitionedStore {
            threshold: u64::arbitrary(u)?,
            small: any_store(u, depth + 1)?,
            large: any_store(u, depth + 1)?,
        })),
    })
}
