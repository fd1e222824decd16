//! The server on external stores: state written through the REAPI survives a
//! restart on a fresh, empty data dir, because it lives in PostgreSQL and
//! Redis. Needs both on loopback (`eval "$(bash .ci/test-stores.sh)"`, see
//! the README); fails, saying so, when they are not configured.

use std::path::Path;

use buildkube_config::storage::{
    FilesystemStore, PostgresStore, ReadCacheStore, RedisStore, StorageConfig, StoreConfig,
};
use buildkube_proto::reapi;
use buildkube_reapi::Digest;
use buildkube_tests::Server;
use bytes::Bytes;
use futures::StreamExt;

use crate::reapi_client::{get_action_result, update_action_result, Clients};

pub(crate) fn env_url(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set: this test needs PostgreSQL and Redis on 127.0.0.1. \
             As root on Debian: `apt-get install -y postgresql redis-server && eval \"$(bash .ci/test-stores.sh)\"` \
             (see README, \"Tests with external stores\")"
        )
    })
}

pub(crate) fn postgres() -> StoreConfig {
    StoreConfig::Postgres(PostgresStore {
        url: env_url("BUILDKUBE_TEST_POSTGRES_URL"),
        password_file: None,
        pool_size: 2,
        max_blob_size: 64 << 20,
        max_size: None,
        expire_unused_after_secs: None,
    })
}

/// CAS: a local read cache in front of PostgreSQL; the action cache in `action_cache`.
fn write_config(dir: &Path, action_cache: StoreConfig) -> std::path::PathBuf {
    let config = StorageConfig {
        cas: StoreConfig::ReadCache(Box::new(ReadCacheStore {
            cache: StoreConfig::Filesystem(FilesystemStore {
                path: "cas".into(),
                max_size: None,
            }),
            backing: postgres(),
        })),
        action_cache,
        records: StorageConfig::default_records(),
    };
    let path = dir.join("storage.yaml");
    std::fs::write(&path, config.to_yaml()).unwrap();
    path
}

fn unique(len: usize) -> (Digest, Bytes) {
    let seed = uuid::Uuid::new_v4().to_string();
    let data: Vec<u8> = seed.bytes().cycle().take(len).collect();
    (Digest::of_bytes(&data), data.into())
}

fn start(config: &Path) -> Server {
    let config = config.to_path_buf();
    Server::start_with(move |args| args.storage_config = Some(config)).unwrap()
}

async fn state_survives_a_fresh_data_dir(action_cache: StoreConfig) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), action_cache);
    let small = unique(1000);
    let large = unique(3 << 20); // several PostgreSQL chunks, through ByteStream
    let action = unique(100).0;
    let result = reapi::ActionResult {
        exit_code: 0,
        output_files: vec![reapi::OutputFile {
            path: "out/large".into(),
            digest: Some(large.0.to_proto()),
            ..Default::default()
        }],
        stdout_digest: Some(small.0.to_proto()),
        ..Default::default()
    };

    let first = start(&config);
    {
        let mut c = Clients::connect(&first, None);
        let cas = c.cas_client();
        cas.upload_blobs(vec![small.clone()]).await.unwrap();
        let chunks: Vec<Result<Bytes, _>> = large
            .1
            .chunks(64 << 10)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        cas.write_bytestream(large.0, futures::stream::iter(chunks))
            .await
            .unwrap();
        update_action_result(&mut c, action, result.clone())
            .await
            .unwrap();
    }
    let first_data_dir = first.data_dir().to_path_buf();
    drop(first);

    let second = start(&config);
    assert_ne!(second.data_dir(), first_data_dir);
    let mut c = Clients::connect(&second, None);
    let cas = c.cas_client();
    assert_eq!(
        cas.find_missing(&[small.0, large.0]).await.unwrap(),
        vec![],
        "blobs live in PostgreSQL, not the data dir"
    );
    assert_eq!(cas.read_blob(small.0).await.unwrap(), small.1);
    assert_eq!(cas.read_blob(large.0).await.unwrap(), large.1);
    let offset = (1 << 20) + 5;
    let mut tail = Vec::new();
    let mut stream = Box::pin(cas.read_stream(large.0, offset, 100).await.unwrap());
    while let Some(chunk) = stream.next().await {
        tail.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(tail, large.1[offset as usize..offset as usize + 100]);
    let got = get_action_result(&mut c, action).await.unwrap();
    assert_eq!(got, result);

    // The CAS gauge reports PostgreSQL (shared with other tests: at least ours).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let bytes = second.metric("buildkube_cas_bytes").unwrap().unwrap_or(0.0);
        if bytes >= (large.0.size() + small.0.size()) as f64 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "buildkube_cas_bytes is {bytes}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn postgres_cas_and_redis_action_cache_survive_a_fresh_data_dir() {
    state_survives_a_fresh_data_dir(StoreConfig::Redis(RedisStore {
        url: env_url("BUILDKUBE_TEST_REDIS_URL"),
        password_file: None,
        key_prefix: format!("buildkube-e2e-{}:", uuid::Uuid::new_v4()),
        expire_after_secs: 600,
    }))
    .await;
}

#[tokio::test]
async fn postgres_cas_and_action_cache_survive_a_fresh_data_dir() {
    state_survives_a_fresh_data_dir(postgres()).await;
}

#[tokio::test]
async fn a_bad_storage_config_stops_the_server_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("storage.yaml");
    std::fs::write(
        &path,
        "cas: {filesystem: {path: cas, max_sise: 1GiB}}\naction_cache: {filesystem: {path: ac}}\n",
    )
    .unwrap();
    let err = Server::start_with(|args| args.storage_config = Some(path.clone())).unwrap_err();
    let message = format!("{err:#}");
    assert!(message.contains("max_sise"), "{message}");
}
