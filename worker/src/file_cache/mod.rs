//! The local, content-addressed cache of input files.
//!
//! Every file an action needs is fetched from the CAS once, into
//! `{work_dir}/cache/{hh}/{hash}-{size}[-x]` (read-only; `-x` for the
//! executable variant, which is a separate inode because the mode belongs to
//! the inode), and hardlinked into each action directory: no copies. Entries
//! in use by an action being set up are pinned; the least recently used
//! unpinned entries are evicted once the cache exceeds its budget. Files
//! left by an earlier run of the worker (a restarted container keeps its
//! volume) are kept if their name, size and mode are right, and each is
//! hashed once before its first use: a file that does not match is fetched
//! again, never linked.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use buildkube_reapi::{CasClient, CasClientError, Digest};
use bytes::Bytes;
use futures::StreamExt as _;

use crate::metrics::WorkerMetrics;

/// Blobs up to this size are fetched in batches.
const SMALL_BLOB: u64 = 256 << 10;
/// Bytes per batch read of small blobs.
const BATCH_BYTES: u64 = 2 << 20;
/// Blobs per batch read.
const BATCH_COUNT: usize = 500;
/// Batches or large downloads in flight per action.
const PARALLEL_FETCHES: usize = 4;

/// One cached file: a blob in its executable or non-executable variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct CacheKey {
    pub(crate) digest: Digest,
    pub(crate) executable: bool,
}

/// A file to put at `dest` (an absolute path whose parent exists).
#[derive(Debug, Clone)]
pub(crate) struct FileRequest {
    pub(crate) key: CacheKey,
    pub(crate) dest: PathBuf,
}

/// Why files could not be provided.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    /// The CAS lacks these blobs.
    #[error("{} blob(s) missing from the CAS", .0.len())]
    Missing(Vec<Digest>),
    /// A CAS call failed.
    #[error("fetching {digest}: {source}")]
    Cas {
        digest: Digest,
        source: Box<CasClientError>,
    },
    /// A local file operation failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> FetchError + 'a {
    move |source| FetchError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug)]
struct Entry {
    size: u64,
    tick: u64,
    pins: u32,
    stamp: FileStamp,
    /// Written by this process, or hashed since it started.
    verified: bool,
}

/// A cached file as last verified. An action running as root (or as the
/// worker's user, after a chmod) can write through a read-only hardlink and
/// then put back the length, modification time and mode (`touch -r`,
/// `chmod 0444`); it cannot put back the change time (ctime), which the
/// kernel sets on every write, chmod, utimes, link and unlink and which an
/// unprivileged process cannot set. An entry whose identity (device,
/// inode), length, mtime or mode changed is dropped; one whose ctime moved
/// is hashed again before it is linked, and dropped if its bytes differ.
/// The hardlinks that hand a file to an action move its ctime too, so in
/// practice every reuse after an action had the file hashes it once more:
/// a read of the file, far cheaper than fetching it, and the only check
/// that no finished action can defeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    modified: std::time::SystemTime,
    mode: u32,
    /// ctime as (seconds, nanoseconds).
    changed: (i64, i64),
}

impl FileStamp {
    fn of(path: &Path) -> std::io::Result<FileStamp> {
        let meta = std::fs::symlink_metadata(path)?;
        Ok(FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            modified: meta.modified()?,
            mode: meta.permissions().mode() & 0o7777,
            changed: (meta.ctime(), meta.ctime_nsec()),
        })
    }

    /// Same file, same length, mtime and mode: at most its ctime differs.
    fn same_but_ctime(&self, other: &FileStamp) -> bool {
        FileStamp {
            changed: other.changed,
            ..*self
        } == *other
    }
}

/// Whether the cached file at `path`, last verified as `recorded` (if
/// `verified`), still holds `digest`: `Some(stamp)` with the stamp to record
/// if so, `None` if it must be fetched again. A file whose ctime moved is
/// hashed, and accepted only if it did not change while being hashed.
fn check_cached(
    path: &Path,
    digest: Digest,
    recorded: FileStamp,
    verified: bool,
) -> Option<FileStamp> {
    let before = FileStamp::of(path).ok()?;
    if !recorded.same_but_ctime(&before) {
        return None;
    }
    if verified && before == recorded {
        return Some(before);
    }
    let hashed = crate::outputs::hash_file(path).ok()?;
    let after = FileStamp::of(path).ok()?;
    (hashed == digest && after == before).then_some(before)
}

#[derive(Debug, Default)]
struct CacheState {
    entries: HashMap<CacheKey, Entry>,
    /// Last use tick → key; the first entry is the least recently used.
    lru: BTreeMap<u64, CacheKey>,
    tick: u64,
    total: u64,
}

impl CacheState {
    /// Records a file not yet in the cache as the most recently used.
    fn insert(&mut self, key: CacheKey, pins: u32, stamp: FileStamp, verified: bool) {
        self.tick += 1;
        let size = key.digest.size();
        self.entries.insert(
            key,
            Entry {
                size,
                tick: self.tick,
                pins,
                stamp,
                verified,
            },
        );
        self.lru.insert(self.tick, key);
        self.total += size;
    }

    fn touch(&mut self, key: CacheKey) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(entry) = self.entries.get_mut(&key) {
            self.lru.remove(&entry.tick);
            entry.tick = tick;
            self.lru.insert(tick, key);
        }
    }
}

/// The cached files of one shard directory that an earlier run left in a
/// usable state (name `{hash}-{size}[-x]` in the hash's shard, that size,
/// read-only with the right executable bits); the rest is deleted.
fn restore_shard(dir: &Path, shard: &str) -> std::io::Result<Vec<(CacheKey, FileStamp)>> {
    let mut kept = Vec::new();
    for item in std::fs::read_dir(dir)? {
        let item = item?;
        let path = item.path();
        let usable = item
            .file_name()
            .to_str()
            .and_then(|name| parse_cache_name(name, shard))
            .and_then(|key| {
                let stamp = FileStamp::of(&path).ok()?;
                let mode = if key.executable { 0o555 } else { 0o444 };
                (item.file_type().ok()?.is_file()
                    && stamp.len == key.digest.size()
                    && stamp.mode == mode)
                    .then_some((key, stamp))
            });
        match usable {
            Some(entry) => kept.push(entry),
            None => crate::fs_util::remove_any(&path)?,
        }
    }
    Ok(kept)
}

/// The key a cache file name stands for, if it is one of `shard`'s.
fn parse_cache_name(name: &str, shard: &str) -> Option<CacheKey> {
    let (rest, executable) = match name.strip_suffix("-x") {
        Some(rest) => (rest, true),
        None => (name, false),
    };
    let (hash, size) = rest.split_once('-')?;
    if !hash.starts_with(shard) || hash.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let digest = Digest::from_hex(hash, size.parse().ok()?).ok()?;
    Some(CacheKey { digest, executable })
}

/// The cache; shared by all slots of a worker.
#[derive(Debug)]
pub(crate) struct FileCache {
    dir: PathBuf,
    tmp: PathBuf,
    max_size: u64,
    state: Mutex<CacheState>,
    metrics: Arc<WorkerMetrics>,
}

impl FileCache {
    /// Opens the cache in `dir`, keeping the well-formed files of an
    /// earlier run as unverified entries (oldest first in line for
    /// eviction) and deleting everything else there.
    pub(crate) fn open(
        dir: PathBuf,
        max_size: u64,
        metrics: Arc<WorkerMetrics>,
    ) -> std::io::Result<FileCache> {
        let tmp = dir.join("tmp");
        crate::fs_util::remove_any(&tmp)?;
        std::fs::create_dir_all(&tmp)?;
        let mut found = Vec::new();
        if let Ok(listing) = std::fs::read_dir(&dir) {
            for item in listing {
                let item = item?;
                let path = item.path();
                let name = item.file_name();
                let shard = name.to_str().filter(|n| {
                    n.len() == 2
                        && n.bytes()
                            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
                });
                match shard {
                    Some(shard) if item.file_type()?.is_dir() => {
                        found.extend(restore_shard(&path, shard)?)
                    }
                    _ if path == tmp => {}
                    _ => crate::fs_util::remove_any(&path)?,
                }
            }
        }
        for shard in 0..=255u8 {
            std::fs::create_dir_all(dir.join(format!("{shard:02x}")))?;
        }
        // Least recently modified first: the first to go if over budget.
        found.sort_by_key(|(_, stamp)| stamp.modified);
        let mut state = CacheState::default();
        for (key, stamp) in found {
            state.insert(key, 0, stamp, false);
        }
        if !state.entries.is_empty() {
            tracing::info!(
                files = state.entries.len(),
                bytes = state.total,
                "reusing the input file cache of an earlier run; each file is hashed before its first use"
            );
        }
        metrics
            .cache_bytes
            .store(state.total, std::sync::atomic::Ordering::Relaxed);
        let cache = FileCache {
            dir,
            tmp,
            max_size,
            state: Mutex::new(state),
            metrics,
        };
        // The budget may have shrunk since.
        cache.unpin_and_evict(&[]);
        Ok(cache)
    }

    fn path_of(&self, key: &CacheKey) -> PathBuf {
        let hash = key.digest.hash_hex();
        let suffix = if key.executable { "-x" } else { "" };
        self.dir
            .join(&hash[..2])
            .join(format!("{hash}-{}{suffix}", key.digest.size()))
    }

    fn temp_path(&self) -> PathBuf {
        self.tmp.join(uuid::Uuid::new_v4().to_string())
    }

    /// Bytes currently held.
    #[cfg(test)]
    pub(crate) fn total_bytes(&self) -> u64 {
        self.state.lock().unwrap().total
    }

    /// Whether `key` is cached.
    #[cfg(test)]
    pub(crate) fn contains(&self, key: &CacheKey) -> bool {
        self.state.lock().unwrap().entries.contains_key(key)
    }

    /// Puts every requested file in place, fetching what the cache lacks.
    /// Missing blobs are all listed (one FindMissingBlobs call) so that the
    /// client can upload them in one go.
    pub(crate) async fn link_into(
        &self,
        cas: &CasClient,
        files: &[FileRequest],
    ) -> Result<(), FetchError> {
        let keys: HashSet<CacheKey> = files.iter().map(|f| f.key).collect();
        let mut pins = Pins {
            cache: self,
            keys: Vec::new(),
            private: Vec::new(),
        };
        let mut misses = Vec::new();
        let mut hits = Vec::new();
        {
            let mut state = self.state.lock().unwrap();
            for key in keys {
                if key.digest.size() == 0 {
                    continue; // empty files are created, not cached
                }
                if let Some(entry) = state.entries.get_mut(&key) {
                    entry.pins += 1;
                    hits.push((key, entry.stamp, entry.verified));
                    pins.keys.push(key);
                    state.touch(key);
                } else {
                    misses.push(key);
                }
            }
        }
        // Drop entries an earlier action changed instead of spreading them
        // (see FileStamp); hash those an earlier run left, or whose ctime moved.
        let hits: Vec<(CacheKey, PathBuf, FileStamp, bool)> = hits
            .into_iter()
            .map(|(key, stamp, verified)| (key, self.path_of(&key), stamp, verified))
            .collect();
        let (damaged, restamped) = tokio::task::spawn_blocking(move || {
            let mut damaged = Vec::new();
            let mut restamped = Vec::new();
            for (key, path, recorded, verified) in hits {
                match check_cached(&path, key.digest, recorded, verified) {
                    None => damaged.push(key),
                    Some(stamp) if stamp != recorded || !verified => {
                        restamped.push((key, recorded, stamp))
                    }
                    Some(_) => {}
                }
            }
            (damaged, restamped)
        })
        .await
        .expect("stat task panicked");
        {
            let mut state = self.state.lock().unwrap();
            for (key, recorded, stamp) in &restamped {
                if let Some(entry) = state.entries.get_mut(key) {
                    // Unless another slot re-installed it meanwhile.
                    if entry.stamp == *recorded {
                        entry.stamp = *stamp;
                        entry.verified = true;
                    }
                }
            }
        }
        for key in damaged {
            tracing::warn!(digest = %key.digest, "cached input file was modified, chmod-ed or removed (by an action writing to its inputs?); fetching it again");
            pins.keys.retain(|k| *k != key);
            self.forget(key);
            misses.push(key);
        }
        let hits = pins.keys.len() as u64;
        WorkerMetrics::add(&self.metrics.cache_hits, hits);
        WorkerMetrics::add(&self.metrics.cache_misses, misses.len() as u64);

        self.fetch(cas, &misses, &mut pins).await?;

        let private: HashMap<CacheKey, &PathBuf> = pins
            .private
            .iter()
            .map(|(key, path)| (*key, path))
            .collect();
        let links: Vec<(CacheKey, PathBuf, PathBuf)> = files
            .iter()
            .map(|f| {
                let src = match private.get(&f.key) {
                    Some(path) => PathBuf::clone(path),
                    None => self.path_of(&f.key),
                };
                (f.key, src, f.dest.clone())
            })
            .collect();
        tokio::task::spawn_blocking(move || -> Result<(), FetchError> {
            for (key, src, dest) in links {
                if key.digest.size() == 0 {
                    let mode = if key.executable { 0o555 } else { 0o444 };
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(mode)
                        .open(&dest)
                        .map_err(io_error("creating", &dest))?;
                } else {
                    std::fs::hard_link(&src, &dest).map_err(io_error("hardlinking", &dest))?;
                }
            }
            Ok(())
        })
        .await
        .expect("link task panicked")?;
        drop(pins);
        Ok(())
    }

    async fn fetch(
        &self,
        cas: &CasClient,
        misses: &[CacheKey],
        pins: &mut Pins<'_>,
    ) -> Result<(), FetchError> {
        if misses.is_empty() {
            return Ok(());
        }
        let (small, large): (Vec<CacheKey>, Vec<CacheKey>) =
            misses.iter().partition(|k| k.digest.size() <= SMALL_BLOB);
        let mut jobs: Vec<Vec<CacheKey>> = Vec::new();
        let mut batch: Vec<CacheKey> = Vec::new();
        let mut batch_bytes = 0;
        for key in small {
            if !batch.is_empty()
                && (batch_bytes + key.digest.size() > BATCH_BYTES || batch.len() >= BATCH_COUNT)
            {
                jobs.push(std::mem::take(&mut batch));
                batch_bytes = 0;
            }
            batch_bytes += key.digest.size();
            batch.push(key);
        }
        if !batch.is_empty() {
            jobs.push(batch);
        }
        jobs.extend(large.into_iter().map(|k| vec![k]));

        let results: Vec<Result<Vec<Fetched>, FetchError>> = futures::stream::iter(jobs)
            .map(|job| self.fetch_job(cas, job))
            .buffer_unordered(PARALLEL_FETCHES)
            .collect()
            .await;
        let mut first_error = None;
        let mut missing = Vec::new();
        for result in results {
            match result {
                Ok(fetched) => {
                    for fetched in fetched {
                        match fetched {
                            Fetched::Cached(key) => pins.keys.push(key),
                            Fetched::Private(key, path) => pins.private.push((key, path)),
                        }
                    }
                }
                Err(FetchError::Missing(digests)) => missing.extend(digests),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if !missing.is_empty() {
            // Name every missing blob, not only the first one a batch hit.
            let wanted: Vec<Digest> = misses.iter().map(|k| k.digest).collect();
            if let Ok(more) = cas.find_missing(&wanted).await {
                missing.extend(more);
            }
            missing.sort();
            missing.dedup();
            return Err(FetchError::Missing(missing));
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Fetches one batch of small blobs or one large blob; returns where
    /// each landed (cached entries are pinned).
    async fn fetch_job(
        &self,
        cas: &CasClient,
        keys: Vec<CacheKey>,
    ) -> Result<Vec<Fetched>, FetchError> {
        let cas_error = |digest: Digest| {
            move |source: CasClientError| match source {
                CasClientError::Missing(d) => FetchError::Missing(vec![d]),
                source => FetchError::Cas {
                    digest,
                    source: Box::new(source),
                },
            }
        };
        if keys.len() == 1 && keys[0].digest.size() > SMALL_BLOB {
            let key = keys[0];
            let tmp = self.temp_path();
            let result = cas
                .download_to_file(key.digest, &tmp)
                .await
                .map_err(cas_error(key.digest));
            if let Err(e) = result {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
            WorkerMetrics::add(&self.metrics.bytes_downloaded, key.digest.size());
            return Ok(vec![self.install(tmp, key)?]);
        }
        // Fetch each distinct digest once, then write one file per variant.
        let mut digests: Vec<Digest> = keys.iter().map(|k| k.digest).collect();
        digests.sort();
        digests.dedup();
        let blobs: HashMap<Digest, Bytes> = cas
            .read_blobs(&digests)
            .await
            .map_err(cas_error(digests[0]))?
            .into_iter()
            .collect();
        let mut installed = Vec::new();
        for key in keys {
            let data = blobs
                .get(&key.digest)
                .ok_or(FetchError::Missing(vec![key.digest]))?
                .clone();
            WorkerMetrics::add(&self.metrics.bytes_downloaded, data.len() as u64);
            let tmp = self.temp_path();
            let write_tmp = tmp.clone();
            tokio::task::spawn_blocking(move || -> Result<(), FetchError> {
                let mode = if key.executable { 0o555 } else { 0o444 };
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .open(&write_tmp)
                    .map_err(io_error("creating", &write_tmp))?;
                let written = file
                    .write_all(&data)
                    .map_err(io_error("writing", &write_tmp));
                if written.is_err() {
                    let _ = std::fs::remove_file(&write_tmp);
                }
                written
            })
            .await
            .expect("write task panicked")?;
            installed.push(self.install(tmp, key)?);
        }
        Ok(installed)
    }

    /// Makes a verified temp file read-only, moves it into place and
    /// records it, pinned. If another slot fetched and installed the same
    /// key meanwhile, its file stays and ours is kept private to this
    /// action: renaming over it would take the last name of an inode that
    /// slot may be hardlinking at this moment, and link(2) of an inode
    /// with no name left fails with ENOENT.
    fn install(&self, tmp: PathBuf, key: CacheKey) -> Result<Fetched, FetchError> {
        let path = self.path_of(&key);
        let mode = if key.executable { 0o555 } else { 0o444 };
        if let Err(e) = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(FetchError::Io {
                action: "setting permissions of",
                path: tmp,
                source: e,
            });
        }
        let mut state = self.state.lock().unwrap();
        if state.entries.contains_key(&key) {
            return Ok(Fetched::Private(key, tmp));
        }
        if let Err(e) = std::fs::rename(&tmp, &path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(FetchError::Io {
                action: "installing",
                path,
                source: e,
            });
        }
        // After the rename, which sets the ctime.
        let stamp = match FileStamp::of(&path) {
            Ok(stamp) => stamp,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(FetchError::Io {
                    action: "reading the metadata of",
                    path,
                    source: e,
                });
            }
        };
        state.insert(key, 1, stamp, true);
        self.metrics
            .cache_bytes
            .store(state.total, std::sync::atomic::Ordering::Relaxed);
        Ok(Fetched::Cached(key))
    }

    fn forget(&self, key: CacheKey) {
        let mut state = self.state.lock().unwrap();
        if let Some(entry) = state.entries.remove(&key) {
            state.lru.remove(&entry.tick);
            state.total -= entry.size;
            let _ = std::fs::remove_file(self.path_of(&key));
        }
        self.metrics
            .cache_bytes
            .store(state.total, std::sync::atomic::Ordering::Relaxed);
    }

    fn unpin_and_evict(&self, keys: &[CacheKey]) {
        let mut state = self.state.lock().unwrap();
        for key in keys {
            if let Some(entry) = state.entries.get_mut(key) {
                entry.pins = entry.pins.saturating_sub(1);
            }
        }
        if state.total <= self.max_size {
            return;
        }
        let victims: Vec<(u64, CacheKey)> = state
            .lru
            .iter()
            .filter(|(_, key)| state.entries.get(key).is_some_and(|e| e.pins == 0))
            .map(|(tick, key)| (*tick, *key))
            .collect();
        for (tick, key) in victims {
            if state.total <= self.max_size {
                break;
            }
            state.lru.remove(&tick);
            if let Some(entry) = state.entries.remove(&key) {
                state.total -= entry.size;
            }
            // Under the lock, so that a concurrent install of the same key
            // cannot be unlinked after it was recorded.
            let path = self.path_of(&key);
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "could not evict cached file");
            }
        }
        self.metrics
            .cache_bytes
            .store(state.total, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Where a fetched file went.
enum Fetched {
    /// Into the cache, pinned.
    Cached(CacheKey),
    /// Another slot installed the key first: a verified copy at this temp
    /// path, linked by this action only, then deleted.
    Private(CacheKey, PathBuf),
}

/// What an action's inputs are linked from while it is set up: cache
/// entries (pinned) and private copies; unpinned and deleted on drop.
struct Pins<'a> {
    cache: &'a FileCache,
    keys: Vec<CacheKey>,
    private: Vec<(CacheKey, PathBuf)>,
}

impl Drop for Pins<'_> {
    fn drop(&mut self) {
        self.cache.unpin_and_evict(&self.keys);
        for (_, path) in &self.private {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(path = %path.display(), error = %e, "could not remove a private input copy");
            }
        }
    }
}

#[cfg(test)]
mod tests;
