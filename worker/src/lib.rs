//! The buildkube worker: leases actions from a buildkube server, runs them
//! and reports their results.
//!
//! Each of `--concurrency` slots long-polls `Lease`; a leased action gets a
//! fresh directory under `{work_dir}/actions/`, its input root is
//! materialized from the CAS through a hardlinking [file cache](file_cache)
//! (`{work_dir}/cache/`), the command runs in its own process group (plain,
//! or in a bubblewrap sandbox when its platform says `runner=sandbox`), its
//! outputs go to the CAS, a successful result to the action cache, and the
//! outcome to the server with `Complete`. One task sends `KeepAlive` for all
//! running leases and kills those the server abandons.
//!
//! The worker survives server restarts: every call is retried with jittered
//! backoff, running actions go on, results wait until the server is back.
//!
//! ## Platform properties offered
//! The `--platform` properties, plus, when no `runner` is configured,
//! `runner=plain` and (if bubblewrap works here, checked at start)
//! `runner=sandbox`; with the sandbox, and no `network` configured, also
//! `network=off` and `network=on`. An action's `runner=sandbox` runs with a
//! read-only root filesystem, only its input root writable, a fresh `/tmp`,
//! `/proc` and `/dev`, the worker's directory hidden, its credential files
//! (`--auth-token-file`) masked by an empty file, and no network unless its
//! platform has `network=on`. A `runner=plain` action runs as the worker's
//! user and can read whatever the worker can, its token file included.
//!
//! ```no_run
//! # async fn example() -> Result<(), buildkube_worker::WorkerError> {
//! use clap::Parser as _;
//! let args = buildkube_config::WorkerArgs::parse_from(["buildkube-worker", "--http-listen=127.0.0.1:0"]);
//! let worker = buildkube_worker::Worker::start(args).await?;
//! println!("metrics on http://{}/metrics", worker.http_addr());
//! worker.run(async { tokio::signal::ctrl_c().await.unwrap() }).await
//! # }
//! ```

mod action;
mod action_error;
mod backoff;
mod file_cache;
mod fs_util;
mod git_credentials;
mod http;
mod inputs;
mod leftovers;
mod metrics;
mod outputs;
mod runner;
mod server_link;
mod step;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use buildkube_config::{WorkerArgs, PLATFORM_RUNNER_KEY};
use buildkube_proto::reapi::platform::Property;
use buildkube_proto::reapi::Platform;
use buildkube_proto::worker::{
    complete_request, CompleteRequest, Lease, LeaseProgress, WorkerInfo,
};
use buildkube_reapi::{CasClient, CasClientError, Digest};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, info, info_span, warn, Instrument as _};

pub use action_error::{ACTION_RESULT_TYPE_URL, PRECONDITION_FAILURE_TYPE_URL};
pub use git_credentials::GitCredentialsError;
pub use http::ACTIONS_PATH;
pub use metrics::{
    METRIC_ACTIONS_COMPLETED, METRIC_ACTIONS_RUNNING, METRIC_BYTES_DOWNLOADED,
    METRIC_BYTES_UPLOADED, METRIC_CACHE_BYTES, METRIC_CACHE_HITS, METRIC_CACHE_MISSES,
    METRIC_DRAINING, METRIC_SLOTS,
};
pub use runner::{BWRAP, NETWORK_ON, PLATFORM_NETWORK_KEY, RUNNER_PLAIN, RUNNER_SANDBOX};

use crate::action::{ActionContext, ActionOutcome, LeaseTracker, Limits, Signals};
use crate::action_error::ActionError;
use crate::file_cache::FileCache;
use crate::metrics::WorkerMetrics;
use crate::runner::KillReason;
use crate::server_link::ServerLink;

/// How long the server may hold a Lease call.
const LEASE_WAIT: Duration = Duration::from_secs(20);
/// Keep-alive interval when a lease does not say.
const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(10);
/// How long results may wait for an unreachable server after the drain deadline.
const COMPLETE_GRACE: Duration = Duration::from_secs(30);

/// Why the worker could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The auth token file could not be read, or is empty.
    #[error("--auth-token-file: {0}")]
    AuthToken(#[from] buildkube_config::auth::TokenFileError),
    /// The work directory could not be prepared.
    #[error("preparing the work directory {}: {source}", path.display())]
    WorkDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The HTTP listener could not be bound.
    #[error("binding the HTTP listener on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The server endpoint is not a usable URL.
    #[error("server endpoint: {0}")]
    Endpoint(#[source] CasClientError),
    /// `--platform runner=sandbox` was configured but bubblewrap does not work here.
    #[error("--platform {PLATFORM_RUNNER_KEY}=sandbox is configured, but the sandbox does not work here: {0}")]
    SandboxUnavailable(String),
    /// `--concurrency 0`.
    #[error("--concurrency must be at least 1")]
    NoSlots,
    /// `--git-credentials-dir` cannot be used.
    #[error(transparent)]
    GitCredentials(#[from] GitCredentialsError),
    /// `--addr-file` could not be written.
    #[error("writing --addr-file {}: {source}", path.display())]
    AddrFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `--redacted-vars` holds a pattern that is not a glob.
    #[error("--redacted-vars: {0}")]
    RedactedVars(String),
    /// The env script does not exist.
    #[error("the env script {} cannot be read: {source}", path.display())]
    EnvScript {
        /// The script.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A lease being worked on.
#[derive(Debug)]
struct RunningLease {
    operation: String,
    action_digest: String,
    tracker: Arc<LeaseTracker>,
    kill: watch::Sender<Option<KillReason>>,
    keep_alive: Duration,
    started: SystemTime,
}

/// State shared by the slots, the keep-alive task and the HTTP handlers.
struct Shared {
    worker_id: String,
    metrics: Arc<WorkerMetrics>,
    leases: Mutex<HashMap<String, RunningLease>>,
    ctx: ActionContext,
    /// What CI steps need besides.
    steps: step::StepContext,
    link: Arc<ServerLink>,
    /// True once draining: no new leases.
    draining: watch::Sender<bool>,
    /// True when results stop waiting for an unreachable server.
    give_up: watch::Sender<bool>,
    /// Wakes the keep-alive task (new lease, drain).
    keep_alive_wake: Notify,
}

/// A started worker: directories prepared, HTTP serving; [`Worker::run`]
/// takes work.
pub struct Worker {
    shared: Arc<Shared>,
    http_addr: SocketAddr,
    http_task: JoinHandle<()>,
    concurrency: usize,
    drain_timeout: Duration,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("worker_id", &self.shared.worker_id)
            .field("http_addr", &self.http_addr)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

/// Writes `http=ADDR` to `path` atomically (a reader never sees half a line).
async fn write_addr_file(path: &std::path::Path, http: SocketAddr) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    tokio::fs::write(&tmp, format!("http={http}\n")).await?;
    tokio::fs::rename(&tmp, path).await
}

fn default_worker_id() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "worker".into());
    format!("{host}-{}", std::process::id())
}

/// The properties offered to the scheduler (see the crate docs).
fn offered_platform(configured: &[(String, String)], sandbox: bool) -> Platform {
    let mut properties: Vec<(String, String)> = configured.to_vec();
    let has = |key: &str| configured.iter().any(|(k, _)| k == key);
    if !has(PLATFORM_RUNNER_KEY) {
        properties.push((PLATFORM_RUNNER_KEY.into(), RUNNER_PLAIN.into()));
        if sandbox {
            properties.push((PLATFORM_RUNNER_KEY.into(), RUNNER_SANDBOX.into()));
        }
    }
    if sandbox && !has(PLATFORM_NETWORK_KEY) {
        properties.push((PLATFORM_NETWORK_KEY.into(), "off".into()));
        properties.push((PLATFORM_NETWORK_KEY.into(), NETWORK_ON.into()));
    }
    properties.sort();
    properties.dedup();
    Platform {
        properties: properties
            .into_iter()
            .map(|(name, value)| Property { name, value })
            .collect(),
    }
}

impl Worker {
    /// Prepares the work directory (emptying stale action directories and
    /// the file cache), probes the sandbox, binds the HTTP listener and
    /// starts serving it. No server connection is made yet.
    pub async fn start(args: WorkerArgs) -> Result<Worker, WorkerError> {
        let token = match &args.auth_token_file {
            Some(path) => {
                let path = path.clone();
                Some(
                    tokio::task::spawn_blocking(move || {
                        buildkube_config::auth::read_token_file(&path)
                    })
                    .await
                    .expect("token file task panicked")?,
                )
            }
            None => None,
        };
        Worker::start_on(args, token, None).await
    }

    /// Like [`Worker::start`], but talks to the server over `channel` (the
    /// server's own in-process channel) instead of dialing `--server`, with
    /// the bearer token given instead of read from `--auth-token-file` (the
    /// server's in-process workers get theirs from memory).
    pub async fn start_in_process(
        args: WorkerArgs,
        token: Option<String>,
        channel: tonic::transport::Channel,
    ) -> Result<Worker, WorkerError> {
        Worker::start_on(args, token, Some(channel)).await
    }

    async fn start_on(
        args: WorkerArgs,
        token: Option<String>,
        channel: Option<tonic::transport::Channel>,
    ) -> Result<Worker, WorkerError> {
        let worker_id = args.worker_id.clone().unwrap_or_else(default_worker_id);
        let concurrency = args
            .concurrency
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if concurrency == 0 {
            return Err(WorkerError::NoSlots);
        }
        if let Some(path) = &args.env_script {
            tokio::fs::metadata(path)
                .await
                .map_err(|source| WorkerError::EnvScript {
                    path: path.clone(),
                    source,
                })?;
        }
        let git = args
            .git_credentials_dir
            .as_deref()
            .map(git_credentials::GitCredentials::from_dir)
            .transpose()?;
        let work_dir =
            std::path::absolute(&args.work_dir).map_err(|source| WorkerError::WorkDir {
                path: args.work_dir.clone(),
                source,
            })?;
        let metrics = Arc::new(WorkerMetrics::default());
        let steps_dir = work_dir.join("steps");
        let (actions_dir, cache) = {
            let steps_dir = steps_dir.clone();
            let (dir, metrics, max) = (work_dir.clone(), metrics.clone(), args.cache_max_size);
            tokio::task::spawn_blocking(move || -> std::io::Result<_> {
                std::fs::create_dir_all(&dir)?;
                let actions_dir = dir.join("actions");
                leftovers::kill_leftover_actions(&actions_dir);
                fs_util::remove_tree(&actions_dir)?;
                std::fs::create_dir_all(&actions_dir)?;
                leftovers::kill_leftover_actions(&steps_dir);
                fs_util::remove_tree(&steps_dir)?;
                std::fs::create_dir_all(&steps_dir)?;
                let cache = FileCache::open(dir.join("cache"), max, metrics)?;
                Ok((actions_dir, cache))
            })
            .await
            .expect("work dir task panicked")
            .map_err(|source| WorkerError::WorkDir {
                path: work_dir.clone(),
                source,
            })?
        };

        let probe_dir = work_dir.join("sandbox-probe");
        let _ = tokio::fs::create_dir_all(&probe_dir).await;
        let probe = runner::probe_sandbox(&probe_dir).await;
        let _ = tokio::fs::remove_dir_all(&probe_dir).await;
        let sandbox_available = match probe {
            Ok(()) => true,
            Err(reason) => {
                if args
                    .platform
                    .iter()
                    .any(|(k, v)| k == PLATFORM_RUNNER_KEY && v == RUNNER_SANDBOX)
                {
                    return Err(WorkerError::SandboxUnavailable(reason));
                }
                warn!(%reason, "bubblewrap does not work here; runner=sandbox is not offered");
                false
            }
        };
        let platform = offered_platform(&args.platform, sandbox_available);

        let channel = match channel {
            Some(channel) => buildkube_reapi::with_bearer_token(channel, token.as_deref()),
            None => buildkube_reapi::connect_channel(&args.server, token.as_deref(), &args.tls),
        }
        .map_err(WorkerError::Endpoint)?;
        let info = WorkerInfo {
            worker_id: worker_id.clone(),
            instance_name: args.instance.clone(),
            platform: Some(platform.clone()),
            concurrency: concurrency as u32,
            runs_steps: args.run_steps,
        };
        let link = Arc::new(ServerLink::new(channel.clone(), info));
        let steps = step::StepContext::new(
            &args,
            &worker_id,
            CasClient::new(channel.clone(), &args.instance),
            link.clone(),
            git.clone(),
            &work_dir,
        )
        .map_err(WorkerError::RedactedVars)?;
        let ctx = ActionContext {
            worker_id: worker_id.clone(),
            cas: CasClient::new(channel.clone(), &args.instance),
            cache: Arc::new(cache),
            actions_dir,
            work_dir: work_dir.clone(),
            credential_files: args.auth_token_file.iter().cloned().collect(),
            env_script: args.env_script.clone(),
            git,
            sandbox_available,
            limits: Limits {
                max_output_bytes: args.max_output_size,
                max_stdio_bytes: args.max_stdio_size,
                max_timeout: Duration::from_secs(args.max_action_timeout_secs.max(1)),
                action: args.action_limits.clone(),
            },
            metrics: metrics.clone(),
        };
        metrics
            .slots
            .store(concurrency as u64, std::sync::atomic::Ordering::Relaxed);
        let shared = Arc::new(Shared {
            worker_id: worker_id.clone(),
            metrics,
            leases: Mutex::new(HashMap::new()),
            ctx,
            steps,
            link,
            draining: watch::channel(false).0,
            give_up: watch::channel(false).0,
            keep_alive_wake: Notify::new(),
        });

        let listener = tokio::net::TcpListener::bind(args.http_listen)
            .await
            .map_err(|source| WorkerError::Bind {
                addr: args.http_listen,
                source,
            })?;
        let http_addr = listener.local_addr().map_err(|source| WorkerError::Bind {
            addr: args.http_listen,
            source,
        })?;
        if let Some(path) = &args.addr_file {
            write_addr_file(path, http_addr)
                .await
                .map_err(|source| WorkerError::AddrFile {
                    path: path.clone(),
                    source,
                })?;
        }
        let router = http::router(shared.clone());
        let http_task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                warn!(error = %e, "the HTTP server stopped");
            }
        });
        let offered: Vec<String> = platform
            .properties
            .iter()
            .map(|p| format!("{}={}", p.name, p.value))
            .collect();
        info!(
            worker_id = %worker_id,
            server = %args.server,
            instance = %args.instance,
            concurrency,
            platform = %offered.join(","),
            run_steps = args.run_steps,
            http = %http_addr,
            work_dir = %work_dir.display(),
            "worker started"
        );
        Ok(Worker {
            shared,
            http_addr,
            http_task,
            concurrency,
            drain_timeout: Duration::from_secs(args.drain_timeout_secs),
        })
    }

    /// The bound HTTP address (useful with `--http-listen 127.0.0.1:0`).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The worker's name, as sent to the server and used in logs.
    pub fn worker_id(&self) -> &str {
        &self.shared.worker_id
    }

    /// The platform properties offered to the server.
    pub fn platform(&self) -> Vec<(String, String)> {
        self.shared
            .link
            .info()
            .platform
            .iter()
            .flat_map(|p| {
                p.properties
                    .iter()
                    .map(|p| (p.name.clone(), p.value.clone()))
            })
            .collect()
    }

    /// Takes and runs actions until `drain` completes; then takes no new
    /// ones, lets running actions finish for up to `--drain-timeout-secs`
    /// (then kills them and reports an error result for them), reports
    /// every result and returns.
    pub async fn run(self, drain: impl Future<Output = ()> + Send) -> Result<(), WorkerError> {
        let shared = self.shared.clone();
        let span = info_span!("worker", worker_id = %shared.worker_id);
        async move {
            let keep_alive = tokio::spawn(keep_alive_loop(shared.clone()).in_current_span());
            let slots: Vec<JoinHandle<()>> = (0..self.concurrency)
                .map(|_| tokio::spawn(slot_loop(shared.clone()).in_current_span()))
                .collect();
            let mut all_slots = Box::pin(futures::future::join_all(slots));
            let slots_ended = tokio::select! {
                _ = drain => false,
                _ = &mut all_slots => true,
            };
            if slots_ended {
                // Only a panic ends a slot before draining.
                keep_alive.abort();
                self.http_task.abort();
                tracing::error!("every slot stopped unexpectedly");
                return Ok(());
            }
            let running = shared.leases.lock().unwrap().len();
            info!(running, timeout = ?self.drain_timeout, "draining: taking no new actions");
            shared
                .metrics
                .draining
                .store(true, std::sync::atomic::Ordering::Relaxed);
            shared.draining.send_replace(true);
            shared.keep_alive_wake.notify_one();
            if tokio::time::timeout(self.drain_timeout, &mut all_slots)
                .await
                .is_err()
            {
                {
                    let leases = shared.leases.lock().unwrap();
                    warn!(
                        running = leases.len(),
                        "drain timeout: killing the running actions"
                    );
                    for lease in leases.values() {
                        lease.kill.send_replace(Some(KillReason::Draining));
                    }
                }
                let give_up = shared.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(COMPLETE_GRACE).await;
                    give_up.give_up.send_replace(true);
                });
                all_slots.await;
            }
            keep_alive.abort();
            self.http_task.abort();
            info!("drained; stopped");
            Ok(())
        }
        .instrument(span)
        .await
    }
}

async fn until_draining(draining: &mut watch::Receiver<bool>) {
    loop {
        if *draining.borrow_and_update() {
            return;
        }
        if draining.changed().await.is_err() {
            return;
        }
    }
}

/// One slot: lease, run, report, repeat, until draining.
async fn slot_loop(shared: Arc<Shared>) {
    let mut draining = shared.draining.subscribe();
    let mut backoff = backoff::Backoff::default();
    loop {
        if *draining.borrow() {
            return;
        }
        let lease = tokio::select! {
            lease = shared.link.lease(LEASE_WAIT) => lease,
            _ = until_draining(&mut draining) => return,
        };
        match lease {
            Ok(None) => backoff.reset(),
            Ok(Some(lease)) => {
                backoff.reset();
                run_lease(&shared, lease).await;
            }
            Err(_) => {
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                    _ = until_draining(&mut draining) => return,
                }
            }
        }
    }
}

async fn run_lease(shared: &Arc<Shared>, lease: Lease) {
    let digest = lease
        .action_digest
        .as_ref()
        .and_then(|d| Digest::try_from(d).ok())
        .map_or_else(|| "?".to_string(), |d| d.to_string());
    let span = info_span!(
        "action",
        worker_id = %shared.worker_id,
        operation = %lease.operation_name,
        action_digest = %digest,
    );
    async move {
        let tracker = Arc::new(LeaseTracker::default());
        let (kill_tx, kill_rx) = watch::channel(None);
        let keep_alive = lease
            .keep_alive_interval
            .as_ref()
            .map(|d| Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32))
            .filter(|d| !d.is_zero())
            .unwrap_or(DEFAULT_KEEP_ALIVE);
        shared.leases.lock().unwrap().insert(
            lease.lease_id.clone(),
            RunningLease {
                operation: lease.operation_name.clone(),
                action_digest: digest.clone(),
                tracker: tracker.clone(),
                kill: kill_tx,
                keep_alive,
                started: SystemTime::now(),
            },
        );
        shared.keep_alive_wake.notify_one();
        shared
            .metrics
            .actions_running
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        debug!(lease_id = %lease.lease_id, attempt = lease.attempt, "leased");
        let signals = Signals {
            kill: kill_rx,
            give_up: shared.give_up.subscribe(),
        };
        let outcome = match &lease.step {
            // The server leases steps only to workers that run them; an
            // older or confused one is refused here rather than obeyed.
            Some(spec) if !shared.link.info().runs_steps => {
                ActionOutcome::Failed(ActionError::new(
                    tonic::Code::FailedPrecondition,
                    format!(
                        "worker {} does not run CI steps (no --run-steps) but was leased step {}/{}",
                        shared.worker_id, spec.job_id, spec.step_key
                    ),
                ))
            }
            Some(spec) => {
                tracker.set(buildkube_proto::worker::Stage::Executing);
                step::execute(&shared.steps, &lease.lease_id, spec, signals.kill).await
            }
            None => action::execute(&shared.ctx, &lease, &tracker, signals).await,
        };
        shared
            .metrics
            .actions_running
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        shared.metrics.completed(outcome.metric());
        let (result, message) = match outcome {
            ActionOutcome::StepRan(result) => {
                debug!(exit_code = result.exit_code, "step ran");
                (complete_request::Outcome::StepResult(result), String::new())
            }
            ActionOutcome::Abandoned => {
                debug!("abandoned; nothing reported");
                shared.leases.lock().unwrap().remove(&lease.lease_id);
                return;
            }
            ActionOutcome::Ran(result) => {
                debug!(exit_code = result.exit_code, "action ran");
                (complete_request::Outcome::Result(result), String::new())
            }
            ActionOutcome::Failed(error) => {
                match error.code {
                    tonic::Code::Internal
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::Unavailable => {
                        warn!(code = ?error.code, detail = %error.message, "action failed")
                    }
                    _ => debug!(code = ?error.code, detail = %error.message, "action failed"),
                }
                let message = error.message.clone();
                (complete_request::Outcome::Error(error.to_status()), message)
            }
        };
        let request = CompleteRequest {
            worker: None,
            lease_id: lease.lease_id.clone(),
            operation_name: lease.operation_name.clone(),
            action_digest: lease.action_digest.clone(),
            outcome: Some(result),
            message,
        };
        // The lease stays registered (kept alive) until the server has the result.
        match shared
            .link
            .complete(request, shared.give_up.subscribe())
            .await
        {
            Some(true) => debug!("result accepted"),
            Some(false) => debug!("the server no longer knew the lease; result dropped"),
            None => {}
        }
        shared.leases.lock().unwrap().remove(&lease.lease_id);
    }
    .instrument(span)
    .await
}

/// Sends KeepAlive for all running leases (at half the shortest interval)
/// and kills the leases the server abandons.
async fn keep_alive_loop(shared: Arc<Shared>) {
    let mut last_sent = tokio::time::Instant::now();
    let mut announced_drain = false;
    loop {
        let interval = shared
            .leases
            .lock()
            .unwrap()
            .values()
            .map(|l| l.keep_alive)
            .min()
            .unwrap_or(DEFAULT_KEEP_ALIVE)
            / 2;
        let interval = interval.max(Duration::from_millis(50));
        let woken = tokio::select! {
            _ = tokio::time::sleep_until(last_sent + interval) => false,
            _ = shared.keep_alive_wake.notified() => true,
        };
        let draining = *shared.draining.borrow();
        let announce = draining && !announced_drain;
        if woken && !announce {
            continue; // only the interval changed
        }
        last_sent = tokio::time::Instant::now();
        let progress: Vec<LeaseProgress> = shared
            .leases
            .lock()
            .unwrap()
            .iter()
            .map(|(id, lease)| {
                let (stage, since) = lease.tracker.get();
                LeaseProgress {
                    lease_id: id.clone(),
                    stage: stage as i32,
                    since: Some(since.into()),
                }
            })
            .collect();
        if progress.is_empty() && !announce {
            continue;
        }
        if let Ok(abandon) = shared.link.keep_alive(progress, draining).await {
            announced_drain |= announce;
            let leases = shared.leases.lock().unwrap();
            for id in abandon {
                if let Some(lease) = leases.get(&id) {
                    info!(lease_id = %id, operation = %lease.operation, action_digest = %lease.action_digest,
                        "the server abandoned the lease; stopping the action");
                    lease.kill.send_replace(Some(KillReason::Abandoned));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The server spawns `run` on its runtime (`--local-workers`).
    #[allow(dead_code)]
    fn run_is_send(worker: Worker) -> impl Send {
        worker.run(std::future::pending())
    }

    #[test]
    fn offers_runners_and_network_unless_configured() {
        let names = |p: Platform| {
            p.properties
                .into_iter()
                .map(|p| format!("{}={}", p.name, p.value))
                .collect::<Vec<_>>()
        };
        assert_eq!(names(offered_platform(&[], false)), ["runner=plain"]);
        assert_eq!(
            names(offered_platform(
                &[("OSFamily".into(), "Linux".into())],
                true
            )),
            [
                "OSFamily=Linux",
                "network=off",
                "network=on",
                "runner=plain",
                "runner=sandbox"
            ]
        );
        assert_eq!(
            names(offered_platform(
                &[("runner".into(), "sandbox".into())],
                true
            )),
            ["network=off", "network=on", "runner=sandbox"]
        );
    }
}
