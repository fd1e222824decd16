//! The worker's git mirrors: one bare repository per remote under
//! `{work_dir}/git/`, reused by every job, fetched with the worker's git
//! credentials; each step gets a fresh working tree that borrows the
//! mirror's objects (`git clone --shared`).
//!
//! A commit the mirror already has is checked out without asking the
//! remote anything: a warm mirror makes a checkout local. Fetches of one
//! mirror are serialized; the mirror is never garbage collected while
//! working trees may borrow from it (`gc.auto=0`).
//!
//! The mirrors are bounded in number and total size ([`MirrorLimits`]):
//! past either bound the least recently used mirrors that no running step
//! uses are removed (a step uses its mirror from [`Mirrors::update`] until
//! its [`MirrorUse`] is dropped, after its working tree is gone). A mirror
//! leaves the table and is renamed away under the table's lock before it
//! is deleted, so a step that asks for the same repository meanwhile gets
//! a fresh one, never a half-deleted one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use sha2::{Digest as _, Sha256};

use super::log::LogSink;
use super::process::{run_logged, ProcessEnd, ProcessSpec};

/// Where the pipeline file is read from, at the job's commit.
pub(crate) const PIPELINE_FILE: &str = ".buildkube/pipeline.yaml";

/// Why a checkout or a pipeline read failed (the message goes to the
/// step's result and log).
#[derive(Debug, thiserror::Error)]
pub(crate) enum MirrorError {
    /// git failed or was stopped.
    #[error("{what} failed: {detail}")]
    Git {
        /// What was being done.
        what: String,
        /// Exit code, or how it was stopped.
        detail: String,
        /// How the process ended (timeout and kill are not git's fault).
        end: ProcessEnd,
    },
    /// The ref or commit does not exist in the repository.
    #[error("{0}")]
    NotFound(String),
    /// The pipeline file is too large.
    #[error("{PIPELINE_FILE} at {commit} is {size} bytes, more than the {limit} bytes a pipeline may have")]
    TooLarge {
        /// The commit.
        commit: String,
        /// Its size.
        size: u64,
        /// The bound.
        limit: u64,
    },
    /// A local file operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Bounds on one worker's mirrors (`--git-mirrors-max-count`,
/// `--git-mirrors-max-size`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct MirrorLimits {
    /// Mirrors kept.
    pub(crate) max_count: usize,
    /// Their total size on disk, in bytes, as measured after each fetch.
    pub(crate) max_bytes: u64,
}

/// Prefix of a mirror renamed away to be deleted (under the mirrors' dir).
const DOOMED_PREFIX: &str = "evicted-";

/// A mirror the table knows.
struct MirrorEntry {
    /// Steps using it now.
    users: usize,
    /// Tick of the table's clock at its last use (higher is more recent).
    last_used: u64,
    /// Bytes on disk, measured after its last fetch (0 before).
    bytes: u64,
    /// Held while fetching, and while a clone reads its refs.
    lock: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Default)]
struct MirrorTable {
    entries: HashMap<PathBuf, MirrorEntry>,
    clock: u64,
}

impl MirrorTable {
    /// Takes out of the table, and renames away, the least recently used
    /// unused mirrors until both bounds hold (or only used ones are left).
    /// Returns the renamed directories, to delete outside the lock.
    fn evict(&mut self, dir: &Path, limits: MirrorLimits) -> Vec<PathBuf> {
        let mut doomed = Vec::new();
        loop {
            let total: u64 = self.entries.values().map(|e| e.bytes).sum();
            if self.entries.len() <= limits.max_count && total <= limits.max_bytes {
                return doomed;
            }
            let Some(victim) = self
                .entries
                .iter()
                .filter(|(_, e)| e.users == 0)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(path, _)| path.clone())
            else {
                tracing::warn!(
                    mirrors = self.entries.len(),
                    bytes = total,
                    max_count = limits.max_count,
                    max_bytes = limits.max_bytes,
                    "git mirrors over their bounds, all in use by running steps"
                );
                return doomed;
            };
            let entry = self.entries.remove(&victim).expect("picked from the table");
            let target = dir.join(format!("{DOOMED_PREFIX}{}", uuid::Uuid::new_v4()));
            match std::fs::rename(&victim, &target) {
                Ok(()) => {
                    tracing::info!(mirror = %victim.display(), bytes = entry.bytes, total, mirrors = self.entries.len() + 1,
                        "evicting the least recently used git mirror");
                    doomed.push(target);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(mirror = %victim.display(), error = %e, "cannot evict a git mirror");
                }
            }
        }
    }
}

/// Deletes evicted mirrors, off the async runtime when there is one.
fn delete_doomed(doomed: Vec<PathBuf>) {
    if doomed.is_empty() {
        return;
    }
    let delete = move || {
        for path in doomed {
            if let Err(e) = crate::fs_util::remove_tree(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot delete an evicted git mirror");
            }
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn_blocking(delete)),
        Err(_) => delete(),
    }
}

/// Bytes of the files under `path` (not following symlinks).
fn disk_usage(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(path)
        .map(|entries| entries.flatten().map(|e| disk_usage(&e.path())).sum())
        .unwrap_or(0)
}

/// A step's use of a mirror: the mirror is not evicted while it lives.
pub(crate) struct MirrorUse {
    path: PathBuf,
    lock: Arc<tokio::sync::Mutex<()>>,
    table: Arc<Mutex<MirrorTable>>,
    dir: PathBuf,
    limits: MirrorLimits,
}

impl MirrorUse {
    /// The mirror's directory.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for MirrorUse {
    fn drop(&mut self) {
        let doomed = {
            let mut table = self.table.lock().unwrap();
            if let Some(entry) = table.entries.get_mut(&self.path) {
                entry.users -= 1;
            }
            table.evict(&self.dir, self.limits)
        };
        delete_doomed(doomed);
    }
}

/// The mirrors of one worker.
pub(crate) struct Mirrors {
    dir: PathBuf,
    /// Git's environment: PATH, HOME and the credentials.
    env: Vec<(String, String)>,
    limits: MirrorLimits,
    table: Arc<Mutex<MirrorTable>>,
}

/// How a step runs git: where its output goes and how long it may take.
pub(crate) struct GitRun<'a> {
    pub(crate) log: &'a LogSink,
    pub(crate) deadline: tokio::time::Instant,
    pub(crate) kill: tokio::sync::watch::Receiver<Option<crate::runner::KillReason>>,
}

impl Mirrors {
    /// Mirrors under `dir`, within `limits`; git runs with `env`. The
    /// mirrors a previous run left are kept (least recently used first by
    /// their modification time) and evicted at once if over the limits.
    pub(crate) fn new(dir: PathBuf, env: Vec<(String, String)>, limits: MirrorLimits) -> Mirrors {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(DOOMED_PREFIX) {
                // An eviction the previous run did not finish.
                delete_doomed(vec![path]);
            } else if name.ends_with(".git") && path.join("HEAD").is_file() {
                let modified = entry.metadata().and_then(|m| m.modified());
                found.push((modified.unwrap_or(SystemTime::UNIX_EPOCH), path));
            }
        }
        found.sort();
        let mut table = MirrorTable::default();
        for (_, path) in found {
            table.clock += 1;
            let entry = MirrorEntry {
                users: 0,
                last_used: table.clock,
                bytes: disk_usage(&path),
                lock: Arc::default(),
            };
            table.entries.insert(path, entry);
        }
        let doomed = table.evict(&dir, limits);
        delete_doomed(doomed);
        Mirrors {
            dir,
            env,
            limits,
            table: Arc::new(Mutex::new(table)),
        }
    }

    /// Marks the mirror of `repository` used by a step until the returned
    /// use is dropped (it is not evicted meanwhile), and most recently used.
    fn acquire(&self, repository: &str) -> MirrorUse {
        let path = self.path_of(repository);
        let mut table = self.table.lock().unwrap();
        table.clock += 1;
        let clock = table.clock;
        let entry = table
            .entries
            .entry(path.clone())
            .or_insert_with(|| MirrorEntry {
                users: 0,
                last_used: 0,
                bytes: 0,
                lock: Arc::default(),
            });
        entry.users += 1;
        entry.last_used = clock;
        // Across restarts the order comes from the modification time.
        if let Ok(dir) = std::fs::File::open(&path) {
            let _ = dir.set_modified(SystemTime::now());
        }
        MirrorUse {
            path,
            lock: entry.lock.clone(),
            table: self.table.clone(),
            dir: self.dir.clone(),
            limits: self.limits,
        }
    }

    /// Records the size of `mirror` after a fetch, and evicts others if the
    /// mirrors are now over their bounds.
    async fn measure(&self, mirror: &MirrorUse) {
        let path = mirror.path.clone();
        let bytes = tokio::task::spawn_blocking(move || disk_usage(&path))
            .await
            .unwrap_or(0);
        let doomed = {
            let mut table = self.table.lock().unwrap();
            if let Some(entry) = table.entries.get_mut(&mirror.path) {
                entry.bytes = bytes;
            }
            if bytes > self.limits.max_bytes {
                tracing::warn!(mirror = %mirror.path.display(), bytes, max_bytes = self.limits.max_bytes,
                    "a git mirror alone is larger than --git-mirrors-max-size; it is evicted once no step uses it");
            }
            table.evict(&self.dir, self.limits)
        };
        delete_doomed(doomed);
    }

    /// The mirror of `repository`: a name that says nothing of the URL
    /// (which may hold a user name).
    fn path_of(&self, repository: &str) -> PathBuf {
        let hash = hex::encode(Sha256::digest(repository.as_bytes()));
        self.dir.join(format!("{}.git", &hash[..24]))
    }

    async fn git(
        &self,
        run: &mut GitRun<'_>,
        what: &str,
        cwd: &Path,
        args: &[&str],
        capture: bool,
    ) -> Result<Vec<u8>, MirrorError> {
        let mut argv = vec!["git".to_string(), "-c".into(), "gc.auto=0".into()];
        argv.extend(args.iter().map(|a| a.to_string()));
        let spec = ProcessSpec {
            argv,
            env: self.env.clone(),
            cwd: cwd.to_path_buf(),
            deadline: run.deadline,
        };
        let (end, stdout) = run_logged(&spec, run.log, &mut run.kill, capture).await;
        match end {
            ProcessEnd::Exited(0) => Ok(stdout),
            end => Err(MirrorError::Git {
                what: what.to_string(),
                detail: end.describe(),
                end,
            }),
        }
    }

    /// Creates the mirror if it does not exist yet.
    async fn ensure(&self, mirror: &Path, run: &mut GitRun<'_>) -> Result<(), MirrorError> {
        if mirror.join("HEAD").is_file() {
            return Ok(());
        }
        let io = |what, source| MirrorError::Io {
            what,
            path: mirror.to_path_buf(),
            source,
        };
        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(|e| io("creating the mirror directory", e))?;
        let mirror_str = mirror.display().to_string();
        self.git(
            run,
            "creating the mirror",
            &self.dir,
            &["init", "--bare", "--quiet", &mirror_str],
            false,
        )
        .await?;
        Ok(())
    }

    /// Fetches branches, tags and `git_ref` (and `commit`, if named and
    /// still missing) from `repository` into its mirror.
    async fn fetch(
        &self,
        mirror: &Path,
        repository: &str,
        git_ref: &str,
        run: &mut GitRun<'_>,
    ) -> Result<(), MirrorError> {
        run.log
            .note(format!("fetching {repository} into the worker's mirror"))
            .await;
        let mut args = vec![
            "fetch",
            "--prune",
            "--no-tags",
            "--",
            repository,
            "+refs/heads/*:refs/heads/*",
            "+refs/tags/*:refs/tags/*",
        ];
        // A ref outside branches and tags (a pull request's head) by name.
        let extra;
        if git_ref.starts_with("refs/")
            && !git_ref.starts_with("refs/heads/")
            && !git_ref.starts_with("refs/tags/")
        {
            extra = format!("+{git_ref}:{git_ref}");
            args.push(&extra);
        }
        self.git(run, &format!("fetching {repository}"), mirror, &args, false)
            .await?;
        Ok(())
    }

    async fn has_commit(&self, mirror: &Path, commit: &str, run: &mut GitRun<'_>) -> bool {
        let object = format!("{commit}^{{commit}}");
        // Quietly: a missing commit is expected here.
        let spec = ProcessSpec {
            argv: vec!["git".into(), "cat-file".into(), "-e".into(), object],
            env: self.env.clone(),
            cwd: mirror.to_path_buf(),
            deadline: run.deadline,
        };
        matches!(
            super::process::run_quiet(&spec, &mut run.kill).await,
            ProcessEnd::Exited(0)
        )
    }

    /// Makes sure the mirror of `repository` has `commit` (fetching only
    /// if it does not), or, with no commit, fetches and resolves
    /// `git_ref`. Returns the mirror (in use by the caller until dropped),
    /// the commit and whether anything was fetched.
    pub(crate) async fn update(
        &self,
        repository: &str,
        git_ref: &str,
        commit: &str,
        run: &mut GitRun<'_>,
    ) -> Result<(MirrorUse, String, bool), MirrorError> {
        let mirror = self.acquire(repository);
        let lock = mirror.lock.clone();
        let _guard = lock.lock().await;
        let result = self
            .update_locked(&mirror.path, repository, git_ref, commit, run)
            .await;
        if !matches!(result, Ok((_, false))) {
            // Fetched, or maybe partly: its size changed.
            self.measure(&mirror).await;
        }
        let (commit, fetched) = result?;
        Ok((mirror, commit, fetched))
    }

    async fn update_locked(
        &self,
        mirror: &Path,
        repository: &str,
        git_ref: &str,
        commit: &str,
        run: &mut GitRun<'_>,
    ) -> Result<(String, bool), MirrorError> {
        self.ensure(mirror, run).await?;
        if !commit.is_empty() {
            if self.has_commit(mirror, commit, run).await {
                run.log
                    .note(format!(
                        "commit {commit} is in the worker's mirror; nothing to fetch"
                    ))
                    .await;
                return Ok((commit.to_string(), false));
            }
            self.fetch(mirror, repository, git_ref, run).await?;
            if !self.has_commit(mirror, commit, run).await {
                // Not on any branch or tag: ask for it by id.
                self.git(
                    run,
                    &format!("fetching commit {commit}"),
                    mirror,
                    &["fetch", "--no-tags", "--", repository, commit],
                    false,
                )
                .await
                .map_err(|_| {
                    MirrorError::NotFound(format!("commit {commit} is not in {repository}"))
                })?;
            }
            return Ok((commit.to_string(), true));
        }
        if git_ref.is_empty() {
            return Err(MirrorError::NotFound(
                "the step names neither a commit nor a ref".into(),
            ));
        }
        self.fetch(mirror, repository, git_ref, run).await?;
        let spec = format!("{git_ref}^{{commit}}");
        let resolved = self
            .git(
                run,
                &format!("resolving {git_ref}"),
                mirror,
                &[
                    "rev-parse",
                    "--verify",
                    "--quiet",
                    "--end-of-options",
                    &spec,
                ],
                true,
            )
            .await
            .map_err(|_| MirrorError::NotFound(format!("ref {git_ref} is not in {repository}")))?;
        let resolved = String::from_utf8_lossy(&resolved).trim().to_string();
        run.log
            .note(format!("{git_ref} is commit {resolved}"))
            .await;
        Ok((resolved, true))
    }

    /// Reads the pipeline file at `commit` from the mirror, refusing one
    /// larger than `limit` bytes before reading it.
    pub(crate) async fn read_pipeline(
        &self,
        mirror: &Path,
        commit: &str,
        limit: u64,
        run: &mut GitRun<'_>,
    ) -> Result<Vec<u8>, MirrorError> {
        let object = format!("{commit}:{PIPELINE_FILE}");
        let size = self
            .git(
                run,
                "sizing the pipeline file",
                mirror,
                &["cat-file", "-s", &object],
                true,
            )
            .await
            .map_err(|_| {
                MirrorError::NotFound(format!("{PIPELINE_FILE} does not exist at commit {commit}"))
            })?;
        let size: u64 = String::from_utf8_lossy(&size)
            .trim()
            .parse()
            .unwrap_or(u64::MAX);
        if size > limit {
            return Err(MirrorError::TooLarge {
                commit: commit.to_string(),
                size,
                limit,
            });
        }
        self.git(
            run,
            "reading the pipeline file",
            mirror,
            &["cat-file", "blob", &object],
            true,
        )
        .await
    }

    /// A fresh working tree of `commit` at `dest`, borrowing the mirror's
    /// objects, with `origin` pointing at `repository`.
    pub(crate) async fn checkout(
        &self,
        mirror: &MirrorUse,
        repository: &str,
        commit: &str,
        dest: &Path,
        run: &mut GitRun<'_>,
    ) -> Result<(), MirrorError> {
        let (mirror_str, dest_str) = (
            mirror.path.display().to_string(),
            dest.display().to_string(),
        );
        let parent = dest.parent().unwrap_or(dest).to_path_buf();
        {
            // While a fetch cannot change the mirror's refs under the clone.
            let _guard = mirror.lock.lock().await;
            self.git(
                run,
                "cloning from the mirror",
                &parent,
                &[
                    "clone",
                    "--quiet",
                    "--shared",
                    "--no-checkout",
                    "--",
                    &mirror_str,
                    &dest_str,
                ],
                false,
            )
            .await?;
        }
        self.git(
            run,
            "setting origin",
            dest,
            &["remote", "set-url", "origin", repository],
            false,
        )
        .await?;
        self.git(
            run,
            &format!("checking out {commit}"),
            dest,
            &["checkout", "--quiet", "--detach", commit],
            false,
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_count: usize, max_bytes: u64) -> MirrorLimits {
        MirrorLimits {
            max_count,
            max_bytes,
        }
    }

    /// A step's use of the mirror of `repository`, the mirror holding `bytes`.
    fn used(mirrors: &Mirrors, repository: &str, bytes: usize) -> MirrorUse {
        let mirror = mirrors.acquire(repository);
        std::fs::create_dir_all(mirror.path()).unwrap();
        std::fs::write(mirror.path().join("HEAD"), b"ref: refs/heads/main\n").unwrap();
        std::fs::write(mirror.path().join("pack"), vec![0u8; bytes]).unwrap();
        mirror
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn job_mirrors_beyond_their_count_lose_the_least_recently_used_one_no_step_uses() {
        let dir = tempfile::tempdir().unwrap();
        let mirrors = Mirrors::new(dir.path().to_path_buf(), vec![], limits(2, u64::MAX));
        let a = used(&mirrors, "https://a", 10);
        let b = used(&mirrors, "https://b", 10);
        let (path_a, path_b) = (a.path().to_path_buf(), b.path().to_path_buf());
        drop(b);
        let c = used(&mirrors, "https://c", 10);
        let path_c = c.path().to_path_buf();
        // Three now: when c's step ends, b goes (a is older but in use).
        drop(c);
        assert!(path_a.is_dir() && path_c.is_dir());
        assert!(!path_b.exists(), "{:?}", names(dir.path()));
        drop(a);
        assert_eq!(mirrors.table.lock().unwrap().entries.len(), 2);
        // Reused, a is the most recent: the next one to go is c.
        let a = mirrors.acquire("https://a");
        drop(a);
        drop(used(&mirrors, "https://d", 10));
        assert!(
            path_a.is_dir() && !path_c.exists(),
            "{:?}",
            names(dir.path())
        );
        // A step asking for an evicted repository gets a fresh mirror.
        let b = mirrors.acquire("https://b");
        assert_eq!(b.path(), path_b);
        assert!(!path_b.exists());
    }

    #[tokio::test]
    async fn job_mirrors_beyond_their_size_are_evicted_after_a_fetch_but_never_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let mirrors = Mirrors::new(dir.path().to_path_buf(), vec![], limits(10, 1000));
        let a = used(&mirrors, "https://a", 600);
        mirrors.measure(&a).await;
        let path_a = a.path().to_path_buf();
        let b = used(&mirrors, "https://b", 600);
        mirrors.measure(&b).await;
        assert!(path_a.is_dir(), "a is in use: kept over the size");
        drop(a);
        assert!(!path_a.exists(), "a goes once its step ends");
        assert!(b.path().is_dir());
        // One mirror alone over the size goes once no step uses it.
        let big = used(&mirrors, "https://big", 2000);
        mirrors.measure(&big).await;
        let path_big = big.path().to_path_buf();
        let path_b = b.path().to_path_buf();
        assert!(path_big.is_dir() && path_b.is_dir(), "both in use");
        drop(b);
        assert!(path_big.is_dir() && !path_b.exists());
        drop(big);
        assert!(!path_big.exists());
        // The renamed directories are deleted off the runtime.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !names(dir.path()).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                names(dir.path())
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    #[test]
    fn job_mirrors_left_by_a_previous_run_are_bounded_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<PathBuf> = {
            let mirrors = Mirrors::new(dir.path().to_path_buf(), vec![], limits(10, u64::MAX));
            ["https://old", "https://mid", "https://new"]
                .iter()
                .map(|r| used(&mirrors, r, 10).path().to_path_buf())
                .collect()
        };
        let epoch = SystemTime::UNIX_EPOCH;
        for (i, path) in paths.iter().enumerate() {
            let at = epoch + std::time::Duration::from_secs(1_000_000 * (i as u64 + 1));
            std::fs::File::open(path).unwrap().set_modified(at).unwrap();
        }
        let half_deleted = dir.path().join(format!("{DOOMED_PREFIX}x"));
        std::fs::create_dir_all(half_deleted.join("objects")).unwrap();
        let mirrors = Mirrors::new(dir.path().to_path_buf(), vec![], limits(2, u64::MAX));
        assert!(!paths[0].exists() && paths[1].is_dir() && paths[2].is_dir());
        assert!(!half_deleted.exists());
        let table = mirrors.table.lock().unwrap();
        assert_eq!(table.entries[&paths[1]].bytes, 10 + 21);
    }
}
