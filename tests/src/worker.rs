//! `buildkube-worker` as a child process.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use buildkube_config::WorkerArgs;
use tempfile::TempDir;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::daemon::{Daemon, LogFiles};
use crate::server::Server;
use crate::{bin_path, processes_under};

/// Actions a test worker runs at once unless a test says otherwise.
pub const DEFAULT_TEST_CONCURRENCY: usize = 4;

static NEXT_WORKER: AtomicUsize = AtomicUsize::new(1);

/// A running `buildkube-worker` with its own temp work dir, killed on drop.
///
/// The constructor returns once the process is spawned; to know it has
/// connected, use [`Server::wait_for_workers`].
#[derive(Debug)]
pub struct Worker {
    args: WorkerArgs,
    daemon: Daemon,
    logs: LogFiles,
    /// Holds the logs and (by default) the work dir.
    scratch: TempDir,
}

impl Worker {
    /// Starts a worker for `server`'s first instance.
    pub fn start(server: &Server) -> Result<Worker> {
        Worker::start_with(server, |_| {})
    }

    /// Starts a worker after `configure` adjusted its arguments. The harness
    /// has already set the server endpoint, the server's first instance, a temp
    /// work dir, a concurrency of 4, a unique worker id, an HTTP listener on
    /// a kernel-chosen loopback port, and `--run-steps` (it runs CI steps
    /// as well as actions, like the server's in-process workers).
    pub fn start_with(server: &Server, configure: impl FnOnce(&mut WorkerArgs)) -> Result<Worker> {
        let scratch = tempfile::Builder::new()
            .prefix("buildkube-worker-")
            .tempdir()
            .context("creating the worker's temp dir")?;
        let number = NEXT_WORKER.fetch_add(1, Ordering::Relaxed);
        let mut args = WorkerArgs {
            server: server.worker_endpoint(),
            instance: server.args().instances.first().cloned().unwrap_or_default(),
            work_dir: scratch.path().join("work"),
            concurrency: Some(DEFAULT_TEST_CONCURRENCY),
            worker_id: Some(format!("e2e-worker-{}-{number}", std::process::id())),
            // Several workers share this machine: no fixed port.
            http_listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            run_steps: true,
            ..WorkerArgs::default()
        };
        configure(&mut args);
        let name = args
            .worker_id
            .clone()
            .unwrap_or_else(|| "buildkube-worker".into());
        let logs = LogFiles::in_dir(scratch.path(), "worker");
        let mut command = Command::new(bin_path("buildkube-worker"));
        command.args(args.to_args()).env("RUST_BACKTRACE", "1");
        let daemon = Daemon::spawn(&name, command, &logs)?;
        Ok(Worker {
            args,
            daemon,
            logs,
            scratch,
        })
    }

    /// The worker id it reports to the server.
    pub fn id(&self) -> &str {
        self.args.worker_id.as_deref().unwrap_or_default()
    }

    /// The arguments the worker runs with.
    pub fn args(&self) -> &WorkerArgs {
        &self.args
    }

    /// The worker's work dir.
    pub fn work_dir(&self) -> &Path {
        &self.args.work_dir
    }

    /// A scratch dir that lives as long as the worker.
    pub fn scratch_dir(&self) -> &Path {
        self.scratch.path()
    }

    /// The worker's stdout and stderr files.
    pub fn logs(&self) -> &LogFiles {
        &self.logs
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> Result<bool> {
        Ok(self.daemon.exit_status()?.is_none())
    }

    /// Sends SIGTERM (the worker drains) and waits up to `timeout` for it to
    /// exit; past that it is SIGKILLed and the result is an error.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.daemon.terminate(timeout)
    }

    /// Sends SIGTERM (the worker starts draining) and returns at once; wait
    /// for the exit with [`Worker::terminate`].
    pub fn send_sigterm(&self) -> Result<()> {
        self.daemon.signal(Signal::SIGTERM)
    }

    /// SIGKILLs the worker and waits, then SIGKILLs the commands it left
    /// running, as a container runtime does when a worker's container dies.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        let status = self.daemon.kill();
        self.kill_commands_left();
        status
    }

    /// SIGKILLs the worker and waits, and nothing else: the commands it ran
    /// in process groups of their own are left to fend for themselves, as
    /// on a host without a container runtime to kill them.
    pub fn kill_process_only(&mut self) -> Result<ExitStatus> {
        self.daemon.kill()
    }

    /// Actions run in process groups of their own, which killing the
    /// worker's group misses: they are found by their working directory.
    fn kill_commands_left(&self) {
        for pid in processes_under(&self.args.work_dir) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Not reaped here: the daemon's own drop does, and shows the logs.
        let _ = self.daemon.signal(Signal::SIGKILL);
        self.kill_commands_left();
    }
}
