//! One leased action from start to result: fetch the input root, run the
//! command, upload what it produced (the server writes the action cache).

// The legacy fields (Command.platform, output symlink lists) are still in use.
#![allow(deprecated)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use buildkube_proto::reapi::{ActionResult, Command, ExecutedActionMetadata, Platform};
use buildkube_proto::worker::{Lease, Stage};
use buildkube_reapi::{CasClient, Digest};
use prost::Message as _;
use tokio::sync::watch;
use tonic::Code;
use tracing::{debug, warn};

use crate::action_error::{is_transient, ActionError};
use crate::backoff::Backoff;
use crate::file_cache::FileCache;
use crate::git_credentials::GitCredentials;
use crate::metrics::{Outcome, WorkerMetrics};
use crate::outputs::{self, BlobSource};
use crate::runner::{self, KillReason, RunEnd, RunSpec, Runner};

/// Limits applied to every action.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// Total bytes of output files.
    pub(crate) max_output_bytes: u64,
    /// Bytes of stdout, and of stderr.
    pub(crate) max_stdio_bytes: u64,
    /// Timeout of actions that set none, and the most an action may ask for.
    pub(crate) max_timeout: Duration,
    /// Largest Command and Directory read, and input tree bounds.
    pub(crate) action: buildkube_config::ActionLimits,
}

/// Everything an action needs from its worker.
pub(crate) struct ActionContext {
    pub(crate) worker_id: String,
    pub(crate) cas: CasClient,
    pub(crate) cache: Arc<FileCache>,
    /// Parent of the per-action directories.
    pub(crate) actions_dir: PathBuf,
    /// Hidden from sandboxed actions.
    pub(crate) work_dir: PathBuf,
    /// The worker's credentials (its token file): unreadable in the sandbox.
    pub(crate) credential_files: Vec<PathBuf>,
    pub(crate) env_script: Option<PathBuf>,
    /// Variables giving actions the git credentials, if configured.
    pub(crate) git: Option<GitCredentials>,
    pub(crate) sandbox_available: bool,
    pub(crate) limits: Limits,
    pub(crate) metrics: Arc<WorkerMetrics>,
}

/// The stage of a running lease, reported in keep-alives.
#[derive(Debug)]
pub(crate) struct LeaseTracker {
    state: Mutex<(Stage, SystemTime)>,
}

impl Default for LeaseTracker {
    fn default() -> Self {
        LeaseTracker {
            state: Mutex::new((Stage::FetchingInputs, SystemTime::now())),
        }
    }
}

impl LeaseTracker {
    pub(crate) fn set(&self, stage: Stage) {
        *self.state.lock().unwrap() = (stage, SystemTime::now());
    }

    pub(crate) fn get(&self) -> (Stage, SystemTime) {
        *self.state.lock().unwrap()
    }
}

/// How a lease ended (one per action: its size does not matter).
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub(crate) enum ActionOutcome {
    /// The command ran; its outputs are in the CAS.
    Ran(ActionResult),
    /// It could not be run or completed.
    Failed(ActionError),
    /// The server no longer wants it: report nothing.
    Abandoned,
    /// A CI step ran (whatever its exit code); its log and artifacts are in the CAS.
    StepRan(buildkube_proto::worker::StepResult),
}

impl ActionOutcome {
    pub(crate) fn metric(&self) -> Outcome {
        match self {
            ActionOutcome::Ran(result) if result.exit_code == 0 => Outcome::Success,
            ActionOutcome::StepRan(result) if result.exit_code == 0 => Outcome::Success,
            ActionOutcome::Ran(_) | ActionOutcome::StepRan(_) => Outcome::Failure,
            ActionOutcome::Failed(e) if e.code == Code::DeadlineExceeded => Outcome::Timeout,
            ActionOutcome::Failed(_) => Outcome::Error,
            ActionOutcome::Abandoned => Outcome::Abandoned,
        }
    }
}

enum Stop {
    Failed(ActionError),
    Abandoned,
}

impl From<ActionError> for Stop {
    fn from(error: ActionError) -> Stop {
        Stop::Failed(error)
    }
}

fn timestamp(time: SystemTime) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp::from(time))
}

/// The runner the action's platform asks for (`runner` property; plain when absent).
pub(crate) fn select_runner(
    platform: &Platform,
    sandbox_available: bool,
) -> Result<Runner, ActionError> {
    let property = |name: &str| {
        platform
            .properties
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.value.as_str())
    };
    match property(buildkube_config::PLATFORM_RUNNER_KEY) {
        None | Some("") | Some(runner::RUNNER_PLAIN) => Ok(Runner::Plain),
        Some(runner::RUNNER_SANDBOX) if sandbox_available => Ok(Runner::Sandbox {
            network: property(runner::PLATFORM_NETWORK_KEY) == Some(runner::NETWORK_ON),
        }),
        Some(runner::RUNNER_SANDBOX) => Err(ActionError::new(
            Code::FailedPrecondition,
            "platform asks for runner=sandbox, but bubblewrap does not work on this worker",
        )),
        Some(other) => Err(ActionError::invalid(format!(
            "unknown platform property runner={other} (this worker knows `{}` and `{}`)",
            runner::RUNNER_PLAIN,
            runner::RUNNER_SANDBOX
        ))),
    }
}

/// Watches for the kill signal and the give-up signal while retrying.
pub(crate) struct Signals {
    pub(crate) kill: watch::Receiver<Option<KillReason>>,
    /// Set when the worker stops waiting for the server (end of a drain).
    pub(crate) give_up: watch::Receiver<bool>,
}

impl Signals {
    fn abandoned(&self) -> bool {
        *self.kill.borrow() == Some(KillReason::Abandoned)
    }
}

/// Runs `attempt` until it succeeds, fails for good, or the action is
/// abandoned. Transient failures (the server restarting) are retried with
/// backoff until the worker gives up.
async fn with_retries<T, F, Fut>(
    what: &str,
    signals: &mut Signals,
    mut attempt: F,
) -> Result<T, Stop>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ActionError>>,
{
    let mut backoff = Backoff::default();
    loop {
        if signals.abandoned() {
            return Err(Stop::Abandoned);
        }
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(e) if is_transient(e.code) && !*signals.give_up.borrow() => {
                let delay = backoff.next_delay();
                debug!(error = %e, ?delay, "{what} failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = signals.give_up.changed() => {}
                    _ = signals.kill.changed() => {}
                }
            }
            Err(e) => return Err(Stop::Failed(e)),
        }
    }
}

/// Runs one lease to its outcome. The action directory is removed afterwards.
pub(crate) async fn execute(
    ctx: &ActionContext,
    lease: &Lease,
    tracker: &LeaseTracker,
    mut signals: Signals,
) -> ActionOutcome {
    let worker_start = SystemTime::now();
    let dir = ctx.actions_dir.join(uuid::Uuid::new_v4().to_string());
    let outcome = match execute_in(ctx, lease, tracker, &dir, worker_start, &mut signals).await {
        Ok(result) => ActionOutcome::Ran(result),
        Err(Stop::Failed(e)) => ActionOutcome::Failed(e),
        Err(Stop::Abandoned) => ActionOutcome::Abandoned,
    };
    let cleanup = dir.clone();
    match tokio::task::spawn_blocking(move || crate::fs_util::remove_tree(&cleanup)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            warn!(dir = %dir.display(), error = %e, "could not remove the action directory")
        }
        Err(e) => warn!(dir = %dir.display(), error = %e, "removing the action directory panicked"),
    }
    outcome
}

/// The leased action's Command, read from the CAS by digest (verified by
/// the CAS client) after checking its size against --max-message-blob-size.
async fn command_of(
    ctx: &ActionContext,
    lease: &Lease,
    signals: &mut Signals,
) -> Result<Command, Stop> {
    let action = lease.action.as_ref().expect("checked by the caller");
    let field = lease
        .command_digest
        .as_ref()
        .or(action.command_digest.as_ref());
    let digest = Digest::from_field(field)
        .map_err(|e| ActionError::invalid(format!("the lease's command digest: {e}")))?;
    ctx.limits
        .action
        .check_message_size("command", &digest.to_string(), digest.size())
        .map_err(ActionError::invalid)?;
    let bytes = with_retries("fetching the command", signals, || async {
        ctx.cas
            .read_blob(digest)
            .await
            .map_err(|e| ActionError::cas("fetching the command", &e))
    })
    .await?;
    Ok(Command::decode(bytes).map_err(|e| {
        ActionError::invalid(format!("command {digest} is not a Command message: {e}"))
    })?)
}

async fn execute_in(
    ctx: &ActionContext,
    lease: &Lease,
    tracker: &LeaseTracker,
    dir: &Path,
    worker_start: SystemTime,
    signals: &mut Signals,
) -> Result<ActionResult, Stop> {
    let action = lease
        .action
        .as_ref()
        .ok_or_else(|| ActionError::invalid("the lease carries no Action"))?;
    let command = command_of(ctx, lease, signals).await?;
    let platform = action
        .platform
        .clone()
        .or_else(|| command.platform.clone())
        .unwrap_or_default();
    let runner = select_runner(&platform, ctx.sandbox_available)?;
    let (working_dir, outputs) = outputs::command_paths(&command)?;
    let input_root_digest = Digest::from_field(action.input_root_digest.as_ref())
        .map_err(|e| ActionError::invalid(format!("action's input root digest: {e}")))?;
    let timeout = match action.timeout.as_ref() {
        Some(t) if t.seconds > 0 || t.nanos > 0 => {
            Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32)
                .min(ctx.limits.max_timeout)
        }
        _ => ctx.limits.max_timeout,
    };
    let mut metadata = ExecutedActionMetadata {
        worker: ctx.worker_id.clone(),
        worker_start_timestamp: timestamp(worker_start),
        ..Default::default()
    };

    // Inputs. Fetching them counts inside the action's timeout: when it
    // runs out, the fetch is dropped (nothing keeps downloading).
    tracker.set(Stage::FetchingInputs);
    let deadline = tokio::time::Instant::now() + timeout;
    let root = dir.join("root");
    metadata.input_fetch_start_timestamp = timestamp(SystemTime::now());
    let fetch = with_retries("fetching inputs", signals, || async {
        let fresh = root.clone();
        tokio::task::spawn_blocking(move || {
            crate::fs_util::remove_tree(&fresh)?;
            std::fs::create_dir_all(&fresh)
        })
        .await
        .expect("mkdir task panicked")
        .map_err(|e| ActionError::io("creating", &root, &e))?;
        crate::inputs::materialize(
            &ctx.cas,
            &ctx.cache,
            input_root_digest,
            &root,
            &ctx.limits.action,
        )
        .await
    });
    let stats = tokio::time::timeout_at(deadline, fetch)
        .await
        .map_err(|_| {
            ActionError::new(
                Code::DeadlineExceeded,
                format!(
                    "fetching the inputs took longer than the action's timeout of {timeout:?}; the command was not run"
                ),
            )
        })??;
    metadata.input_fetch_completed_timestamp = timestamp(SystemTime::now());
    debug!(
        files = stats.files,
        directories = stats.directories,
        "inputs fetched"
    );
    let exec_root = root.join(&working_dir);
    {
        let (exec_root, root, outputs) = (exec_root.clone(), root.clone(), outputs.clone());
        let shown = command.working_directory.clone();
        tokio::task::spawn_blocking(move || {
            if !working_dir.as_os_str().is_empty() {
                // Every component of the working directory is an ancestor of `x`.
                outputs::check_ancestors(&root, &working_dir.join("x"), &shown, true)?;
                std::fs::create_dir_all(&exec_root)
                    .map_err(|e| ActionError::io("creating", &exec_root, &e))?;
            }
            outputs::create_output_parents(&exec_root, &outputs)
        })
        .await
        .expect("mkdir task panicked")?;
    }
    if signals.abandoned() {
        return Err(Stop::Abandoned);
    }
    if *signals.kill.borrow() == Some(KillReason::Draining) {
        return Err(Stop::Failed(ActionError::new(
            Code::Unavailable,
            "the worker shut down before the action could run",
        )));
    }

    // Run.
    tracker.set(Stage::Executing);
    let mut env: Vec<(String, String)> = command
        .environment_variables
        .iter()
        .map(|v| (v.name.clone(), v.value.clone()))
        .collect();
    if let Some(git) = &ctx.git {
        git.apply(&mut env);
    }
    let spec = RunSpec {
        arguments: command.arguments.clone(),
        env,
        input_root: root.clone(),
        working_dir: exec_root.clone(),
        // What is left of the timeout after fetching the inputs.
        timeout: deadline.saturating_duration_since(tokio::time::Instant::now()),
        env_script: ctx.env_script.clone(),
        stdio_limit: ctx.limits.max_stdio_bytes,
        stdout: dir.join("stdout"),
        stderr: dir.join("stderr"),
        runner,
        hidden: vec![ctx.work_dir.clone()],
        masked: ctx.credential_files.clone(),
    };
    debug!(?runner, ?timeout, "running");
    let run = runner::run(&spec, &mut signals.kill).await?;
    metadata.execution_start_timestamp = timestamp(run.started);
    metadata.execution_completed_timestamp = timestamp(run.finished);

    // Outputs.
    tracker.set(Stage::UploadingOutputs);
    metadata.output_upload_start_timestamp = timestamp(SystemTime::now());
    let mut result = ActionResult::default();
    let error = match &run.end {
        RunEnd::Exited(code) => {
            result.exit_code = *code;
            None
        }
        RunEnd::Killed(KillReason::Abandoned) => return Err(Stop::Abandoned),
        RunEnd::Killed(KillReason::Draining) => Some(ActionError::new(
            Code::Unavailable,
            "the worker shut down: the action was killed at the end of the drain timeout",
        )),
        RunEnd::TimedOut => Some(ActionError::new(
            Code::DeadlineExceeded,
            format!("the action timed out after {timeout:?}; its process group was killed"),
        )),
        RunEnd::StdioLimit(stream) => Some(ActionError::new(
            Code::ResourceExhausted,
            format!(
                "{stream} exceeded the worker's limit of {} bytes (--max-stdio-size); the action was killed",
                ctx.limits.max_stdio_bytes
            ),
        )),
        RunEnd::StdioError(message, disk_full) => Some(ActionError::new(
            if *disk_full { Code::ResourceExhausted } else { Code::Internal },
            message.clone(),
        )),
    };
    let collected = {
        let (stdout, stderr) = (spec.stdout.clone(), spec.stderr.clone());
        let collect = error.is_none();
        let (exec_root, outputs, limit) = (
            exec_root.clone(),
            outputs.clone(),
            ctx.limits.max_output_bytes,
        );
        tokio::task::spawn_blocking(move || -> Result<_, ActionError> {
            let hash = |path: &Path| -> Result<Digest, ActionError> {
                match outputs::hash_file(path) {
                    Ok(digest) => Ok(digest),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Digest::EMPTY),
                    Err(e) => Err(ActionError::io("reading", path, &e)),
                }
            };
            let stdio = [(hash(&stdout)?, stdout), (hash(&stderr)?, stderr)];
            let collected = if collect {
                Some(outputs::collect_outputs(&exec_root, &outputs, limit))
            } else {
                None
            };
            Ok((stdio, collected))
        })
        .await
        .expect("collect task panicked")?
    };
    let ([(stdout_digest, stdout_path), (stderr_digest, stderr_path)], collected) = collected;
    result.stdout_digest = Some(stdout_digest.to_proto());
    result.stderr_digest = Some(stderr_digest.to_proto());
    let mut blobs = vec![
        (stdout_digest, BlobSource::File(stdout_path)),
        (stderr_digest, BlobSource::File(stderr_path)),
    ];
    // An output error still reports stdout/stderr, like a timeout.
    let error = match collected {
        Some(Ok(collected)) => {
            let outputs_result = collected.result;
            result.output_files = outputs_result.output_files;
            result.output_directories = outputs_result.output_directories;
            result.output_symlinks = outputs_result.output_symlinks;
            result.output_file_symlinks = outputs_result.output_file_symlinks;
            result.output_directory_symlinks = outputs_result.output_directory_symlinks;
            blobs.extend(collected.blobs);
            error
        }
        Some(Err(e)) => Some(e),
        None => error,
    };
    let sent = with_retries("uploading outputs", signals, || async {
        outputs::upload_blobs(&ctx.cas, &blobs, &ctx.metrics)
            .await
            .map_err(|e| ActionError::cas("uploading outputs", &e))
    })
    .await?;
    metadata.output_upload_completed_timestamp = timestamp(SystemTime::now());
    metadata.worker_completed_timestamp = timestamp(SystemTime::now());
    result.execution_metadata = Some(metadata);
    debug!(
        exit_code = result.exit_code,
        uploaded_bytes = sent,
        "outputs uploaded"
    );
    if let Some(error) = error {
        return Err(Stop::Failed(error.with_partial(result)));
    }

    // The server writes the action cache when it accepts the result: a
    // worker credential cannot write it (see the server's auth module).
    Ok(result)
}

#[cfg(test)]
mod tests {
    use buildkube_proto::reapi::platform::Property;

    use super::*;

    fn platform(props: &[(&str, &str)]) -> Platform {
        Platform {
            properties: props
                .iter()
                .map(|(n, v)| Property {
                    name: n.to_string(),
                    value: v.to_string(),
                })
                .collect(),
        }
    }

    #[test]
    fn runner_comes_from_the_platform() {
        assert_eq!(select_runner(&platform(&[]), false).unwrap(), Runner::Plain);
        assert_eq!(
            select_runner(&platform(&[("runner", "plain")]), true).unwrap(),
            Runner::Plain
        );
        assert_eq!(
            select_runner(&platform(&[("runner", "sandbox")]), true).unwrap(),
            Runner::Sandbox { network: false }
        );
        assert_eq!(
            select_runner(&platform(&[("runner", "sandbox"), ("network", "on")]), true).unwrap(),
            Runner::Sandbox { network: true }
        );
        let e = select_runner(&platform(&[("runner", "sandbox")]), false).unwrap_err();
        assert_eq!(e.code, Code::FailedPrecondition);
        let e = select_runner(&platform(&[("runner", "docker")]), true).unwrap_err();
        assert!(e.message.contains("docker"));
    }
}
