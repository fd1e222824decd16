//! The worker's git mirrors: one bare repository per remote under
//! `{work_dir}/git/`, reused by every job, fetched with the worker's git
//! credentials; each step gets a fresh working tree that borrows the
//! mirror's objects (`git clone --shared`).
//!
//! A commit the mirror already has is checked out without asking the
//! remote anything: a warm mirror makes a checkout local. Fetches of one
//! mirror are serialized; the mirror is never garbage collected while
//! working trees may borrow from it (`gc.auto=0`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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

/// The mirrors of one worker.
pub(crate) struct Mirrors {
    dir: PathBuf,
    /// Git's environment: PATH, HOME and the credentials.
    env: Vec<(String, String)>,
    locks: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
}

/// How a step runs git: where its output goes and how long it may take.
pub(crate) struct GitRun<'a> {
    pub(crate) log: &'a LogSink,
    pub(crate) deadline: tokio::time::Instant,
    pub(crate) kill: tokio::sync::watch::Receiver<Option<crate::runner::KillReason>>,
}

impl Mirrors {
    /// Mirrors under `dir`; git runs with `env`.
    pub(crate) fn new(dir: PathBuf, env: Vec<(String, String)>) -> Mirrors {
        Mirrors {
            dir,
            env,
            locks: Mutex::new(HashMap::new()),
        }
    }

    /// The mirror of `repository`: a name that says nothing of the URL
    /// (which may hold a user name).
    fn path_of(&self, repository: &str) -> PathBuf {
        let hash = hex::encode(Sha256::digest(repository.as_bytes()));
        self.dir.join(format!("{}.git", &hash[..24]))
    }

    fn lock_of(&self, mirror: &Path) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap()
            .entry(mirror.to_path_buf())
            .or_default()
            .clone()
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
    /// `git_ref`. Returns the commit and whether anything was fetched.
    pub(crate) async fn update(
        &self,
        repository: &str,
        git_ref: &str,
        commit: &str,
        run: &mut GitRun<'_>,
    ) -> Result<(PathBuf, String, bool), MirrorError> {
        let mirror = self.path_of(repository);
        let lock = self.lock_of(&mirror);
        let _guard = lock.lock().await;
        self.ensure(&mirror, run).await?;
        if !commit.is_empty() {
            if self.has_commit(&mirror, commit, run).await {
                run.log
                    .note(format!(
                        "commit {commit} is in the worker's mirror; nothing to fetch"
                    ))
                    .await;
                return Ok((mirror, commit.to_string(), false));
            }
            self.fetch(&mirror, repository, git_ref, run).await?;
            if !self.has_commit(&mirror, commit, run).await {
                // Not on any branch or tag: ask for it by id.
                self.git(
                    run,
                    &format!("fetching commit {commit}"),
                    &mirror,
                    &["fetch", "--no-tags", "--", repository, commit],
                    false,
                )
                .await
                .map_err(|_| {
                    MirrorError::NotFound(format!("commit {commit} is not in {repository}"))
                })?;
            }
            return Ok((mirror, commit.to_string(), true));
        }
        if git_ref.is_empty() {
            return Err(MirrorError::NotFound(
                "the step names neither a commit nor a ref".into(),
            ));
        }
        self.fetch(&mirror, repository, git_ref, run).await?;
        let spec = format!("{git_ref}^{{commit}}");
        let resolved = self
            .git(
                run,
                &format!("resolving {git_ref}"),
                &mirror,
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
        Ok((mirror, resolved, true))
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
        mirror: &Path,
        repository: &str,
        commit: &str,
        dest: &Path,
        run: &mut GitRun<'_>,
    ) -> Result<(), MirrorError> {
        let (mirror_str, dest_str) = (mirror.display().to_string(), dest.display().to_string());
        let parent = dest.parent().unwrap_or(dest).to_path_buf();
        {
            // While a fetch cannot change the mirror's refs under the clone.
            let lock = self.lock_of(mirror);
            let _guard = lock.lock().await;
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
