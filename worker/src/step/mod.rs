//! Running a CI job step (a lease whose `step` is set).
//!
//! A PIPELINE step resolves the job's ref to a commit through the worker's
//! [git mirror](mirror), reads `.buildkube/pipeline.yaml` there and puts it
//! in the CAS. A COMMAND step checks the exact commit out into a fresh tree
//! and runs, each in its own process group and with the step's log as
//! output: the `pre-checkout` hook, the checkout, `post-checkout`,
//! `pre-command`, the commands (`bash -eo pipefail -c`, after the worker's
//! env script), `post-command`; then its artifacts and its log go to the
//! CAS. The log streams live to the server as it is written, secrets
//! redacted. The step's timeout covers all of it; cancel (the server
//! abandons the lease) and the drain deadline kill the running group.

mod artifacts;
mod bazelrc;
mod log;
mod mirror;
mod process;
mod redact;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use buildkube_proto::worker::{StepArtifact, StepKind, StepPhase, StepResult, StepSpec};
use buildkube_reapi::{CasClient, Digest};
use tokio::sync::{watch, Notify};
use tonic::Code;
use tracing::debug;

pub(crate) use bazelrc::FarmEndpoint;
pub(crate) use mirror::Mirrors;

use self::log::{LogSink, StepLog};
use self::mirror::{GitRun, MirrorError, MirrorLimits, MirrorUse};
use self::process::{run_logged, stopped, ProcessEnd, ProcessSpec};
use self::redact::Redactor;
use crate::action::ActionOutcome;
use crate::action_error::ActionError;
use crate::git_credentials::GitCredentials;
use crate::runner::KillReason;
use crate::server_link::ServerLink;

/// How long the end of a step's live log may take to reach the server.
const LOG_STREAM_GRACE: Duration = Duration::from_secs(10);

/// What every step of this worker shares.
pub(crate) struct StepContext {
    pub(crate) worker_id: String,
    pub(crate) cas: CasClient,
    pub(crate) link: Arc<ServerLink>,
    /// Per-step directories (`{work_dir}/steps`), emptied at start.
    pub(crate) steps_dir: PathBuf,
    pub(crate) mirrors: Mirrors,
    pub(crate) hooks_dir: Option<PathBuf>,
    pub(crate) env_script: Option<PathBuf>,
    pub(crate) git: Option<GitCredentials>,
    /// Names of environment variables whose values are redacted.
    pub(crate) redacted_vars: globset::GlobSet,
    pub(crate) farm: FarmEndpoint,
    pub(crate) max_log_bytes: u64,
    /// Timeout of steps that set none, and the longest one may ask for.
    pub(crate) max_timeout: Duration,
}

impl StepContext {
    /// The step side of a worker started with `args`; an error names a bad
    /// `--redacted-vars` pattern.
    pub(crate) fn new(
        args: &buildkube_config::WorkerArgs,
        worker_id: &str,
        cas: CasClient,
        link: Arc<ServerLink>,
        git: Option<GitCredentials>,
        work_dir: &Path,
    ) -> Result<StepContext, String> {
        let mut redacted = globset::GlobSetBuilder::new();
        for pattern in &args.redacted_vars {
            redacted.add(globset::Glob::new(pattern).map_err(|e| format!("{pattern:?}: {e}"))?);
        }
        // git runs with the worker's PATH, a home of its own (not the
        // worker user's git configuration) and the credentials.
        let mut git_env = vec![
            (
                "PATH".to_string(),
                std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
            ),
            (
                "HOME".to_string(),
                work_dir.join("git").display().to_string(),
            ),
            ("LANG".to_string(), "C.UTF-8".to_string()),
            ("GIT_TERMINAL_PROMPT".to_string(), "0".to_string()),
        ];
        if let Some(git) = &git {
            git.apply(&mut git_env);
        }
        Ok(StepContext {
            worker_id: worker_id.to_string(),
            cas,
            link,
            steps_dir: work_dir.join("steps"),
            mirrors: Mirrors::new(
                work_dir.join("git").join("mirrors"),
                git_env,
                MirrorLimits {
                    max_count: args.git_mirrors_max_count.max(1),
                    max_bytes: args.git_mirrors_max_size,
                },
            ),
            hooks_dir: args.hooks_dir.clone(),
            env_script: args.env_script.clone(),
            git,
            redacted_vars: redacted.build().map_err(|e| e.to_string())?,
            farm: FarmEndpoint::from_server(&args.server, &args.tls),
            max_log_bytes: args.max_stdio_size,
            max_timeout: Duration::from_secs(args.max_action_timeout_secs.max(1)),
        })
    }
}

/// Why a step stopped before its end (its result carries `exit_code`/`message`).
struct Stop {
    exit_code: i32,
    message: String,
    /// Set when the step was stopped from outside.
    killed: Option<KillReason>,
}

impl Stop {
    fn failed(message: impl Into<String>) -> Stop {
        Stop {
            exit_code: -1,
            message: message.into(),
            killed: None,
        }
    }

    /// A process's non-zero end, `what` naming it.
    fn from_end(end: &ProcessEnd, what: &str, timeout: Duration) -> Stop {
        match end {
            ProcessEnd::Exited(code) => Stop {
                exit_code: *code,
                message: format!("{what} failed with exit code {code}"),
                killed: None,
            },
            ProcessEnd::TimedOut => Stop::failed(format!(
                "the step timed out after {}s ({what} was running)",
                timeout.as_secs()
            )),
            ProcessEnd::Killed(reason) => Stop {
                exit_code: -1,
                message: end.describe(),
                killed: Some(*reason),
            },
            ProcessEnd::NotStarted(why) => Stop::failed(format!("{what}: {why}")),
        }
    }

    fn from_mirror(error: MirrorError, timeout: Duration) -> Stop {
        match error {
            MirrorError::Git { what, end, .. } if !matches!(end, ProcessEnd::Exited(_)) => {
                Stop::from_end(&end, &what, timeout)
            }
            other => Stop::failed(other.to_string()),
        }
    }
}

fn phase(name: &str, start: SystemTime) -> StepPhase {
    StepPhase {
        name: name.to_string(),
        start: Some(start.into()),
        end: Some(SystemTime::now().into()),
    }
}

/// One step being run.
struct Run<'a> {
    ctx: &'a StepContext,
    spec: &'a StepSpec,
    dir: PathBuf,
    env: Vec<(String, String)>,
    log: LogSink,
    deadline: tokio::time::Instant,
    timeout: Duration,
    kill: watch::Receiver<Option<KillReason>>,
    phases: Vec<StepPhase>,
    commit: String,
    pipeline_file: Option<Digest>,
    /// The mirror the checkout borrows from, in use until the step ends.
    mirror: Option<MirrorUse>,
}

impl Run<'_> {
    fn checkout_dir(&self) -> PathBuf {
        self.dir.join("checkout")
    }

    fn git_run(&self) -> GitRun<'_> {
        GitRun {
            log: &self.log,
            deadline: self.deadline,
            kill: self.kill.clone(),
        }
    }

    /// Runs hook `name` if the hooks directory has it.
    async fn hook(&mut self, name: &str, cwd: &Path) -> Result<(), Stop> {
        let Some(path) = self.ctx.hooks_dir.as_ref().map(|d| d.join(name)) else {
            return Ok(());
        };
        let Ok(metadata) = tokio::fs::metadata(&path).await else {
            return Ok(());
        };
        use std::os::unix::fs::PermissionsExt as _;
        if !metadata.is_file() || metadata.permissions().mode() & 0o111 == 0 {
            self.log
                .note(format!("hook {name} is not an executable file; skipped"))
                .await;
            return Ok(());
        }
        let start = SystemTime::now();
        self.log.note(format!("running hook {name}")).await;
        let spec = ProcessSpec {
            argv: vec![path.display().to_string()],
            env: self.env.clone(),
            cwd: cwd.to_path_buf(),
            deadline: self.deadline,
        };
        let (end, _) = run_logged(&spec, &self.log, &mut self.kill, false).await;
        self.phases.push(phase(&format!("hooks:{name}"), start));
        match end {
            ProcessEnd::Exited(0) => Ok(()),
            end => Err(Stop::from_end(&end, &format!("hook {name}"), self.timeout)),
        }
    }

    /// Resolves the commit (PIPELINE) or makes sure the mirror has it,
    /// and (COMMAND) checks it out.
    async fn checkout(&mut self, tree: bool) -> Result<(), Stop> {
        let start = SystemTime::now();
        let spec = self.spec;
        let mut run = self.git_run();
        let result = async {
            let (mirror, commit, fetched) = self
                .ctx
                .mirrors
                .update(&spec.repository, &spec.git_ref, &spec.commit, &mut run)
                .await?;
            debug!(%commit, fetched, "mirror ready");
            if tree {
                self.ctx
                    .mirrors
                    .checkout(
                        &mirror,
                        &spec.repository,
                        &commit,
                        &self.checkout_dir(),
                        &mut run,
                    )
                    .await?;
            }
            Ok::<_, MirrorError>((mirror, commit))
        }
        .await;
        let timeout = self.timeout;
        let (mirror, commit) = result.map_err(|e| Stop::from_mirror(e, timeout))?;
        // The working tree borrows the mirror's objects: it stays until the step ends.
        let mirror_path = mirror.path().to_path_buf();
        self.mirror = Some(mirror);
        self.commit = commit.clone();
        if spec.kind == StepKind::Pipeline as i32 {
            let mut run = self.git_run();
            let limit = buildkube_jobs::pipeline::limits::MAX_PIPELINE_FILE_BYTES as u64;
            let bytes = self
                .ctx
                .mirrors
                .read_pipeline(&mirror_path, &commit, limit, &mut run)
                .await
                .map_err(|e| Stop::from_mirror(e, timeout))?;
            let digest = Digest::of_bytes(&bytes);
            self.ctx
                .cas
                .upload_blob(digest, bytes.into())
                .await
                .map_err(|e| {
                    Stop::failed(format!(
                        "uploading {} to the CAS: {e}",
                        mirror::PIPELINE_FILE
                    ))
                })?;
            self.log
                .note(format!(
                    "read {} at {commit} ({digest})",
                    mirror::PIPELINE_FILE
                ))
                .await;
            self.pipeline_file = Some(digest);
        } else {
            self.log.note(format!("checked out {commit}")).await;
        }
        self.phases.push(phase("checkout", start));
        Ok(())
    }

    /// The commands, in order, until one fails.
    async fn commands(&mut self) -> Result<(), Stop> {
        let start = SystemTime::now();
        let total = self.spec.commands.len();
        let mut result = Ok(());
        for (i, command) in self.spec.commands.iter().enumerate() {
            self.log
                .note(format!("running command {} of {total}: {command}", i + 1))
                .await;
            let mut script = String::new();
            if let Some(env_script) = &self.ctx.env_script {
                script.push_str(&format!(
                    "source {}\n",
                    shell_quote(&env_script.display().to_string())
                ));
            }
            script.push_str(command);
            let spec = ProcessSpec {
                argv: vec![
                    "bash".into(),
                    "-eo".into(),
                    "pipefail".into(),
                    "-c".into(),
                    script,
                ],
                env: self.env.clone(),
                cwd: self.checkout_dir(),
                deadline: self.deadline,
            };
            let (end, _) = run_logged(&spec, &self.log, &mut self.kill, false).await;
            if end != ProcessEnd::Exited(0) {
                let what = format!("command {} of {total} (`{command}`)", i + 1);
                result = Err(Stop::from_end(&end, &what, self.timeout));
                break;
            }
        }
        self.phases.push(phase("command", start));
        result
    }

    /// Uploads the artifacts; returns them.
    async fn artifacts(&mut self) -> Result<Vec<StepArtifact>, ActionError> {
        let (checkout, globs) = (self.checkout_dir(), self.spec.artifact_globs.clone());
        if globs.is_empty() || !checkout.is_dir() {
            return Ok(vec![]);
        }
        let matched = tokio::task::spawn_blocking(move || artifacts::find(&checkout, &globs))
            .await
            .map_err(|e| ActionError::internal(format!("artifact search: {e}")))?;
        let matched = match matched {
            Ok(matched) => matched,
            Err(message) => {
                self.log.note(message).await;
                return Ok(vec![]);
            }
        };
        for note in matched.notes {
            self.log.note(note).await;
        }
        let mut uploaded = Vec::new();
        for artifact in matched.files {
            let file = artifact.file.clone();
            let digest = tokio::task::spawn_blocking(move || crate::outputs::hash_file(&file))
                .await
                .map_err(|e| ActionError::internal(format!("hashing an artifact: {e}")))?
                .map_err(|e| ActionError::io("reading artifact", &artifact.file, &e))?;
            self.ctx
                .cas
                .upload_file(digest, &artifact.file)
                .await
                .map_err(|e| {
                    ActionError::cas(&format!("uploading artifact {}", artifact.relative), &e)
                })?;
            self.log
                .note(format!(
                    "artifact {} uploaded ({digest})",
                    artifact.relative
                ))
                .await;
            uploaded.push(StepArtifact {
                path: artifact.relative,
                digest: Some(digest.to_proto()),
            });
        }
        Ok(uploaded)
    }
}

/// `text` as one shell word.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// The values a step's log must not show.
fn secrets_of(ctx: &StepContext, spec: &StepSpec, env: &[(String, String)]) -> Vec<String> {
    let mut secrets = vec![spec.farm_token.clone()];
    if let Some(git) = &ctx.git {
        secrets.extend(git.secret_values());
    }
    secrets.extend(
        env.iter()
            .filter(|(name, _)| ctx.redacted_vars.is_match(name))
            .map(|(_, value)| value.clone()),
    );
    secrets.retain(|s| !s.is_empty());
    secrets
}

/// The step's environment: the basics, BUILDKUBE_* about the step, the
/// git credentials, then the step's own variables (which win).
fn environment(
    ctx: &StepContext,
    spec: &StepSpec,
    dir: &Path,
    bazelrc: &Path,
) -> Vec<(String, String)> {
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into());
    let dir_var = |sub: &str| dir.join(sub).display().to_string();
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), path),
        ("HOME".into(), dir_var("home")),
        ("TMPDIR".into(), dir_var("tmp")),
        ("LANG".into(), "C.UTF-8".into()),
        ("CI".into(), "true".into()),
        ("BUILDKUBE".into(), "true".into()),
        ("BUILDKUBE_JOB_ID".into(), spec.job_id.clone()),
        ("BUILDKUBE_STEP_KEY".into(), spec.step_key.clone()),
        ("BUILDKUBE_STEP_ATTEMPT".into(), spec.attempt.to_string()),
        ("BUILDKUBE_REPOSITORY".into(), spec.repository.clone()),
        ("BUILDKUBE_REF".into(), spec.git_ref.clone()),
        ("BUILDKUBE_COMMIT".into(), spec.commit.clone()),
        ("BUILDKUBE_INSTANCE".into(), spec.instance_name.clone()),
        ("BUILDKUBE_CHECKOUT".into(), dir_var("checkout")),
        ("BUILDKUBE_BAZELRC".into(), bazelrc.display().to_string()),
        ("BUILDKUBE_WORKER_ID".into(), ctx.worker_id.clone()),
    ];
    if let Some(git) = &ctx.git {
        git.apply(&mut env);
    }
    let mut own: Vec<(&String, &String)> = spec.env.iter().collect();
    own.sort();
    for (name, value) in own {
        env.retain(|(n, _)| n != name);
        env.push((name.clone(), value.clone()));
    }
    env
}

/// Runs the step of `lease_id` to its end (see the module docs): it ran
/// (`StepRan`), the server no longer wants it (`Abandoned`: nothing is
/// reported), or it could not run or the worker stopped it (`Failed`;
/// UNAVAILABLE is requeued).
pub(crate) async fn execute(
    ctx: &StepContext,
    lease_id: &str,
    spec: &StepSpec,
    mut lease_kill: watch::Receiver<Option<KillReason>>,
) -> ActionOutcome {
    let dir = ctx.steps_dir.join(uuid::Uuid::new_v4().to_string());
    let result = execute_in(ctx, lease_id, spec, &dir, &mut lease_kill).await;
    let cleanup = dir.clone();
    // What the step started outside its commands' process groups (Bazel's
    // server daemonizes into a session of its own) dies with the step.
    let left = tokio::task::spawn_blocking(move || {
        let left = crate::leftovers::kill_groups_working_under(&cleanup);
        let _ = crate::fs_util::remove_tree(&cleanup);
        left
    })
    .await
    .unwrap_or_default();
    for (pgid, cwd) in left {
        debug!(job = %spec.job_id, step = %spec.step_key, pgid, cwd = %cwd.display(),
            "killed a process group the step left running");
    }
    result
}

async fn execute_in(
    ctx: &StepContext,
    lease_id: &str,
    spec: &StepSpec,
    dir: &Path,
    lease_kill: &mut watch::Receiver<Option<KillReason>>,
) -> ActionOutcome {
    let kind = StepKind::try_from(spec.kind).unwrap_or(StepKind::Unspecified);
    if kind == StepKind::Unspecified {
        return ActionOutcome::Failed(ActionError::invalid(
            "step.kind is neither PIPELINE nor COMMAND",
        ));
    }
    if spec.repository.is_empty() {
        return ActionOutcome::Failed(ActionError::invalid("step.repository is empty"));
    }
    for sub in ["home", "tmp"] {
        if let Err(e) = tokio::fs::create_dir_all(dir.join(sub)).await {
            return ActionOutcome::Failed(ActionError::io("creating the step directory", dir, &e));
        }
    }
    let bazelrc = dir.join("home").join(".bazelrc");
    let env = environment(ctx, spec, dir, &bazelrc);
    let timeout = spec
        .timeout
        .as_ref()
        .map(|d| Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32))
        .filter(|d| !d.is_zero())
        .unwrap_or(ctx.max_timeout)
        .min(ctx.max_timeout);

    // Stopped by the server (keep-alive or log), or by the drain deadline.
    let abandon = Arc::new(Notify::new());
    let (kill_tx, kill) = watch::channel(None);
    let forward = {
        let (abandon, mut lease_kill) = (abandon.clone(), lease_kill.clone());
        tokio::spawn(async move {
            let reason = tokio::select! {
                reason = stopped(&mut lease_kill) => reason,
                _ = abandon.notified() => KillReason::Abandoned,
            };
            kill_tx.send_replace(Some(reason));
        })
    };
    let redactor = Redactor::new(secrets_of(ctx, spec, &env).iter().map(String::as_str));
    let log = match StepLog::start(
        &dir.join("log"),
        redactor,
        ctx.max_log_bytes,
        ctx.link.clone(),
        lease_id.to_string(),
        abandon,
    )
    .await
    {
        Ok(log) => log,
        Err(e) => {
            forward.abort();
            return ActionOutcome::Failed(ActionError::io(
                "creating the step log",
                &dir.join("log"),
                &e,
            ));
        }
    };
    let mut run = Run {
        ctx,
        spec,
        dir: dir.to_path_buf(),
        env,
        log: log.sink(),
        deadline: tokio::time::Instant::now() + timeout,
        timeout,
        kill,
        phases: vec![],
        commit: spec.commit.clone(),
        pipeline_file: None,
        mirror: None,
    };
    run.log
        .note(format!(
            "step {} of job {} (attempt {}) on worker {}: {kind:?} of {} at {}",
            spec.step_key,
            spec.job_id,
            spec.attempt,
            ctx.worker_id,
            spec.repository,
            if spec.commit.is_empty() {
                &spec.git_ref
            } else {
                &spec.commit
            },
        ))
        .await;

    let outcome = match kind {
        StepKind::Pipeline => run.checkout(false).await,
        _ => command_step(&mut run, &bazelrc).await,
    };
    forward.abort();
    let _ = lease_kill;
    if let Err(Stop {
        killed: Some(reason),
        message,
        ..
    }) = &outcome
    {
        run.log.note(message.clone()).await;
        drop(log.finish(Duration::ZERO).await);
        return match reason {
            KillReason::Abandoned => ActionOutcome::Abandoned,
            KillReason::Draining => ActionOutcome::Failed(ActionError::new(
                Code::Unavailable,
                "the worker was stopped before the step finished",
            )),
        };
    }
    let upload_start = SystemTime::now();
    let artifacts = match run.artifacts().await {
        Ok(artifacts) => artifacts,
        Err(error) => {
            drop(log.finish(Duration::ZERO).await);
            return ActionOutcome::Failed(error);
        }
    };
    let (exit_code, message) = match &outcome {
        Ok(()) => (0, String::new()),
        Err(stop) => (stop.exit_code, stop.message.clone()),
    };
    if !message.is_empty() {
        run.log.note(message.clone()).await;
    }
    run.log
        .note(format!("step finished: exit code {exit_code}"))
        .await;
    let (log_path, _) = log.finish(LOG_STREAM_GRACE).await;
    let log_digest = {
        let path = log_path.clone();
        match tokio::task::spawn_blocking(move || crate::outputs::hash_file(&path)).await {
            Ok(Ok(digest)) => digest,
            Ok(Err(e)) => {
                return ActionOutcome::Failed(ActionError::io(
                    "reading the step log",
                    &log_path,
                    &e,
                ))
            }
            Err(e) => {
                return ActionOutcome::Failed(ActionError::internal(format!(
                    "hashing the step log: {e}"
                )))
            }
        }
    };
    if let Err(e) = ctx.cas.upload_file(log_digest, &log_path).await {
        return ActionOutcome::Failed(ActionError::cas("uploading the step log", &e));
    }
    run.phases.push(phase("upload", upload_start));
    ActionOutcome::StepRan(StepResult {
        exit_code,
        message,
        log: Some(log_digest.to_proto()),
        artifacts,
        commit: run.commit,
        pipeline_file: run.pipeline_file.map(|d| d.to_proto()),
        phases: run.phases,
    })
}

/// Hooks, checkout, bazelrc and commands of a COMMAND step.
async fn command_step(run: &mut Run<'_>, bazelrc: &Path) -> Result<(), Stop> {
    let dir = run.dir.clone();
    run.hook("pre-checkout", &dir).await?;
    run.checkout(true).await?;
    let checkout = run.checkout_dir();
    run.hook("post-checkout", &checkout).await?;
    let rc = bazelrc::render(&run.ctx.farm, &run.spec.instance_name, &run.spec.farm_token);
    if let Err(e) = bazelrc::write(bazelrc, &rc).await {
        return Err(Stop::failed(format!("writing {}: {e}", bazelrc.display())));
    }
    run.hook("pre-command", &checkout).await?;
    let commands = run.commands().await;
    if matches!(
        &commands,
        Err(Stop {
            killed: Some(_),
            ..
        })
    ) {
        return commands;
    }
    let post = run.hook("post-command", &checkout).await;
    commands.and(post)
}
