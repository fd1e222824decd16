use std::os::unix::fs::MetadataExt as _;

use super::*;

fn cache(dir: &Path, max: u64) -> FileCache {
    FileCache::open(dir.join("cache"), max, Arc::new(WorkerMetrics::default())).unwrap()
}

/// Puts a blob in the cache as if it had been fetched.
fn put(cache: &FileCache, data: &[u8], executable: bool) -> CacheKey {
    let key = CacheKey {
        digest: Digest::of_bytes(data),
        executable,
    };
    let tmp = cache.temp_path();
    std::fs::write(&tmp, data).unwrap();
    assert!(matches!(
        cache.install(tmp, key).unwrap(),
        Fetched::Cached(_)
    ));
    cache.unpin_and_evict(&[key]);
    key
}

/// A CAS client whose server does not exist: any fetch fails.
fn unreachable_cas() -> CasClient {
    CasClient::new(
        buildkube_reapi::connect_channel("http://127.0.0.1:1", None, &Default::default()).unwrap(),
        "main",
    )
}

/// Links `key` to `dest` with no CAS to fetch from: only a usable
/// cached entry succeeds.
async fn link_cached_only(
    cache: &FileCache,
    key: CacheKey,
    dest: PathBuf,
) -> Result<(), FetchError> {
    cache
        .link_into(&unreachable_cas(), &[FileRequest { key, dest }])
        .await
}

#[tokio::test]
async fn hits_are_hardlinked_not_copied() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path(), 1 << 20);
    let key = put(&cache, b"hello", false);
    let exec = put(&cache, b"hello", true);
    let out = dir.path().join("action");
    std::fs::create_dir(&out).unwrap();
    let files = vec![
        FileRequest {
            key,
            dest: out.join("a"),
        },
        FileRequest {
            key,
            dest: out.join("b"),
        },
        FileRequest {
            key: exec,
            dest: out.join("x"),
        },
        FileRequest {
            key: CacheKey {
                digest: Digest::EMPTY,
                executable: false,
            },
            dest: out.join("empty"),
        },
    ];
    cache.link_into(&unreachable_cas(), &files).await.unwrap();
    let a = std::fs::metadata(out.join("a")).unwrap();
    let b = std::fs::metadata(out.join("b")).unwrap();
    let x = std::fs::metadata(out.join("x")).unwrap();
    let cached = std::fs::metadata(cache.path_of(&key)).unwrap();
    assert_eq!(a.ino(), cached.ino());
    assert_eq!(b.ino(), cached.ino());
    assert_eq!(a.nlink(), 3);
    assert_ne!(x.ino(), a.ino(), "executable variant is its own inode");
    assert_eq!(a.mode() & 0o777, 0o444);
    assert_eq!(x.mode() & 0o777, 0o555);
    assert_eq!(std::fs::read(out.join("x")).unwrap(), b"hello");
    assert_eq!(std::fs::metadata(out.join("empty")).unwrap().len(), 0);
    assert_eq!(
        cache
            .metrics
            .cache_hits
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

#[tokio::test]
async fn evicts_least_recently_used_beyond_budget() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path(), 10);
    let a = put(&cache, b"aaaa", false);
    let b = put(&cache, b"bbbb", false);
    // Use `a`, so that `b` is now the least recently used.
    let out = dir.path().join("action");
    std::fs::create_dir(&out).unwrap();
    cache
        .link_into(
            &unreachable_cas(),
            &[FileRequest {
                key: a,
                dest: out.join("a"),
            }],
        )
        .await
        .unwrap();
    let c = put(&cache, b"cccc", false);
    assert!(cache.contains(&a));
    assert!(!cache.contains(&b));
    assert!(cache.contains(&c));
    assert!(!cache.path_of(&b).exists());
    assert_eq!(cache.total_bytes(), 8);
    // The action's link outlives the eviction of its cache entry.
    let d = put(&cache, b"dddddddd", false);
    assert!(!cache.contains(&a) && cache.contains(&d));
    assert_eq!(std::fs::read(out.join("a")).unwrap(), b"aaaa");
}

#[tokio::test]
async fn pinned_entries_survive_eviction() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path(), 4);
    let key = CacheKey {
        digest: Digest::of_bytes(b"aaaa"),
        executable: false,
    };
    let tmp = cache.temp_path();
    std::fs::write(&tmp, b"aaaa").unwrap();
    cache.install(tmp, key).unwrap(); // pinned
    put(&cache, b"bbbb", false);
    assert!(cache.contains(&key), "pinned entry evicted");
    cache.unpin_and_evict(&[key]);
    assert!(cache.total_bytes() <= 4);
}

/// The flaky `queue_and_worker_metrics_are_exact`: two slots fetched
/// the same missing input at once; the second install renamed over the
/// file the first slot was hardlinking, and link(2) of an inode whose
/// last name is gone fails with ENOENT ("hardlinking ...: No such file
/// or directory"). The first file stays; the second copy is private.
#[tokio::test]
async fn a_key_fetched_by_two_slots_keeps_the_first_file() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path(), 1 << 20);
    let key = CacheKey {
        digest: Digest::of_bytes(b"shared"),
        executable: false,
    };
    let first = cache.temp_path();
    std::fs::write(&first, b"shared").unwrap();
    assert!(matches!(
        cache.install(first, key).unwrap(),
        Fetched::Cached(_)
    ));
    let path = cache.path_of(&key);
    let inode = std::fs::metadata(&path).unwrap().ino();

    let second = cache.temp_path();
    std::fs::write(&second, b"shared").unwrap();
    let Fetched::Private(_, private) = cache.install(second, key).unwrap() else {
        panic!("the second install replaced the file the first slot links");
    };
    assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode);
    assert_eq!(std::fs::read(&private).unwrap(), b"shared");
    // The private copy goes when the action's inputs are in place.
    drop(Pins {
        cache: &cache,
        keys: vec![key],
        private: vec![(key, private.clone())],
    });
    assert!(!private.exists());
    assert!(cache.contains(&key) && path.exists());
}

#[tokio::test]
async fn damaged_entries_are_refetched() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path(), 1 << 20);
    let key = put(&cache, b"hello", false);
    let path = cache.path_of(&key);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&path, b"hi").unwrap();
    let out = dir.path().join("action");
    std::fs::create_dir(&out).unwrap();
    // The refetch fails (no server): the damaged file must not be linked.
    let err = link_cached_only(&cache, key, out.join("a"))
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::Cas { .. }), "{err:?}");
    assert!(!out.join("a").exists());
    assert!(!cache.contains(&key));
}

/// A restarted worker keeps the files an earlier run cached, hashes each
/// before its first use, and deletes whatever is not a cache file.
#[tokio::test]
async fn files_of_an_earlier_run_are_kept_and_verified_before_use() {
    let dir = tempfile::tempdir().unwrap();
    let (intact, exec, corrupted) = {
        let earlier = cache(dir.path(), 1 << 20);
        let keys = (
            put(&earlier, b"intact", false),
            put(&earlier, b"tool", true),
            put(&earlier, b"ruined", false),
        );
        std::fs::write(earlier.temp_path(), b"half a download").unwrap();
        keys
    };
    let root = dir.path().join("cache");
    // Same length, other bytes, mode restored: only a hash can tell.
    let ruined = root
        .join(&corrupted.digest.hash_hex()[..2])
        .join(format!("{}-6", corrupted.digest.hash_hex()));
    std::fs::set_permissions(&ruined, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&ruined, b"RUINED").unwrap();
    std::fs::set_permissions(&ruined, std::fs::Permissions::from_mode(0o444)).unwrap();
    // Junk: a wrong size, a file in the wrong shard, a stray file.
    let hash = Digest::of_bytes(b"junk").hash_hex();
    std::fs::write(root.join(&hash[..2]).join(format!("{hash}-99")), b"junk").unwrap();
    let wrong_shard = if &hash[..2] == "00" { "01" } else { "00" };
    std::fs::write(root.join(wrong_shard).join(format!("{hash}-4")), b"junk").unwrap();
    std::fs::write(root.join("stray"), b"?").unwrap();

    let cache = cache(dir.path(), 1 << 20);
    assert_eq!(cache.total_bytes(), 6 + 4 + 6);
    assert!(!root.join("stray").exists());
    assert!(!root.join(wrong_shard).join(format!("{hash}-4")).exists());
    assert!(!root.join(&hash[..2]).join(format!("{hash}-99")).exists());
    assert_eq!(std::fs::read_dir(root.join("tmp")).unwrap().count(), 0);

    let out = dir.path().join("action");
    std::fs::create_dir(&out).unwrap();
    // No CAS: what links came from the cache, after hashing.
    link_cached_only(&cache, intact, out.join("a"))
        .await
        .unwrap();
    link_cached_only(&cache, exec, out.join("t")).await.unwrap();
    assert_eq!(std::fs::read(out.join("a")).unwrap(), b"intact");
    assert_eq!(
        std::fs::metadata(out.join("t"))
            .unwrap()
            .permissions()
            .mode()
            & 0o111,
        0o111
    );
    let err = link_cached_only(&cache, corrupted, out.join("r"))
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::Cas { .. }), "{err:?}");
    assert!(!out.join("r").exists());
    assert!(!cache.contains(&corrupted));
    assert_eq!(cache.total_bytes(), 10);
}

#[tokio::test]
async fn a_smaller_budget_at_restart_evicts_the_oldest_files() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = {
        let earlier = cache(dir.path(), 1 << 20);
        let old = put(&earlier, b"older", false);
        let path = earlier.path_of(&old);
        let past = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        std::fs::File::open(&path)
            .unwrap()
            .set_modified(past)
            .unwrap();
        (old, put(&earlier, b"newer", false))
    };
    let cache = cache(dir.path(), 5);
    assert!(!cache.contains(&old));
    assert!(cache.contains(&new));
    assert_eq!(cache.total_bytes(), 5);
}

/// Issue 8, finding 4: an action rewrites a hardlinked input in place at
/// the same length, then restores its mtime (`touch -r`) and mode 0444.
/// Length, mtime and mode are as recorded; only the ctime tells, and the
/// next action must not get the poisoned file. An input the action left
/// alone is still reused (hashed again: its ctime moved with the links).
#[tokio::test]
async fn an_input_rewritten_with_its_mtime_and_mode_restored_is_not_reused() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path(), 1 << 20);
    let poisoned = put(&cache, b"int main() { return 0; }", false);
    let untouched = put(&cache, b"fine", false);
    let first = dir.path().join("first");
    std::fs::create_dir(&first).unwrap();
    let requests = [
        FileRequest {
            key: poisoned,
            dest: first.join("main.c"),
        },
        FileRequest {
            key: untouched,
            dest: first.join("other"),
        },
    ];
    cache
        .link_into(&unreachable_cas(), &requests)
        .await
        .unwrap();

    // The first action, through its own hardlink.
    let input = first.join("main.c");
    let original = std::fs::metadata(&input).unwrap();
    let saved = dir.path().join("saved-mtime");
    std::fs::write(&saved, b"").unwrap();
    let touch = |from: &Path, to: &Path| {
        let status = std::process::Command::new("touch")
            .arg("-r")
            .arg(from)
            .arg(to)
            .status()
            .unwrap();
        assert!(status.success());
    };
    touch(&input, &saved);
    std::fs::set_permissions(&input, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&input)
        .unwrap()
        .write_all(b"int main() { return 1; }")
        .unwrap();
    touch(&saved, &input);
    std::fs::set_permissions(&input, std::fs::Permissions::from_mode(0o444)).unwrap();
    let after = std::fs::metadata(&input).unwrap();
    assert_eq!(
        (after.len(), after.modified().unwrap(), after.mode()),
        (
            original.len(),
            original.modified().unwrap(),
            original.mode()
        ),
        "the attack restores everything but the ctime"
    );
    std::fs::remove_dir_all(&first).unwrap();

    // The next action: the poisoned entry is fetched again (and the
    // fetch fails here: no CAS), never linked.
    let next = dir.path().join("next");
    std::fs::create_dir(&next).unwrap();
    let err = link_cached_only(&cache, poisoned, next.join("main.c"))
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::Cas { .. }), "{err:?}");
    assert!(!next.join("main.c").exists());
    assert!(!cache.contains(&poisoned));
    link_cached_only(&cache, untouched, next.join("other"))
        .await
        .unwrap();
    assert_eq!(std::fs::read(next.join("other")).unwrap(), b"fine");
    // Verified again, it is reused without another hash until it changes.
    let third = dir.path().join("third");
    std::fs::create_dir(&third).unwrap();
    link_cached_only(&cache, untouched, third.join("other"))
        .await
        .unwrap();
}

/// Rewritten in place with the same length, or only made writable:
/// neither may be linked into another action.
#[tokio::test]
async fn same_length_rewrites_and_chmods_are_caught() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path(), 1 << 20);
    let rewritten = put(&cache, b"hello", false);
    let chmodded = put(&cache, b"world", true);
    let untouched = put(&cache, b"fine!", false);
    let path = cache.path_of(&rewritten);
    let before = std::fs::metadata(&path).unwrap().modified().unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    // Same bytes count, other bytes, through the existing inode; make
    // sure the clock moved so the mtime differs even on coarse clocks.
    while std::time::SystemTime::now() <= before {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all(b"HELLO")
        .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
    std::fs::set_permissions(
        cache.path_of(&chmodded),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();

    let out = dir.path().join("action");
    std::fs::create_dir(&out).unwrap();
    for key in [rewritten, chmodded] {
        let err = link_cached_only(&cache, key, out.join("a"))
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::Cas { .. }), "{err:?}");
        assert!(!cache.contains(&key));
    }
    assert!(!out.join("a").exists());
    link_cached_only(&cache, untouched, out.join("b"))
        .await
        .unwrap();
    assert_eq!(std::fs::read(out.join("b")).unwrap(), b"fine!");
}
