//! Running a step's processes (git, hooks, commands): each in its own
//! process group, its stdout and stderr merged into the step's log, killed
//! with its whole group at the step's deadline or when the step is
//! stopped, or when the worker dies (SIGKILL included): a step whose
//! worker is lost reruns elsewhere, so its first run must not go on.

use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use super::log::{LogSink, MAX_CHUNK};
use crate::runner::{kill_group, KillReason};

/// How long output is still read once the group was killed (only a
/// process that left the group can hold the pipe open).
const OUTPUT_DRAIN: Duration = Duration::from_secs(5);
/// The most of a process's stdout kept when it is captured (git plumbing).
const MAX_CAPTURED: usize = 1 << 20;

/// What to run.
#[derive(Debug, Clone)]
pub(crate) struct ProcessSpec {
    pub(crate) argv: Vec<String>,
    /// The complete environment.
    pub(crate) env: Vec<(String, String)>,
    pub(crate) cwd: PathBuf,
    /// The step's deadline.
    pub(crate) deadline: tokio::time::Instant,
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ProcessEnd {
    /// Its exit code (128 + signal number if a signal ended it).
    Exited(i32),
    /// The step's deadline passed; its group was killed.
    TimedOut,
    /// The step was stopped; its group was killed.
    Killed(KillReason),
    /// It could not be started.
    NotStarted(String),
}

impl ProcessEnd {
    /// For messages: "exit code 2", "timed out", ...
    pub(crate) fn describe(&self) -> String {
        match self {
            ProcessEnd::Exited(code) => format!("exit code {code}"),
            ProcessEnd::TimedOut => "the step timed out".into(),
            ProcessEnd::Killed(KillReason::Abandoned) => "the step was cancelled".into(),
            ProcessEnd::Killed(KillReason::Draining) => "the worker was stopped".into(),
            ProcessEnd::NotStarted(why) => why.clone(),
        }
    }
}

/// Waits until the step is told to stop.
pub(crate) async fn stopped(kill: &mut watch::Receiver<Option<KillReason>>) -> KillReason {
    loop {
        if let Some(reason) = *kill.borrow_and_update() {
            return reason;
        }
        if kill.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

fn command(spec: &ProcessSpec) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(&spec.argv[0]);
    command
        .args(&spec.argv[1..])
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.cwd)
        .process_group(0)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// A process in a step's process group that kills the group when the
/// worker dies: it waits for the end of a pipe only the worker holds,
/// which the kernel closes when the worker exits however it exits. It
/// dies with the group when the worker kills the group itself.
struct GroupWatchdog {
    _worker_alive: std::io::PipeWriter,
    process: tokio::process::Child,
}

impl GroupWatchdog {
    /// Joins group `pgid`; `None` if it cannot (the group is already gone).
    fn join(pgid: i32) -> Option<GroupWatchdog> {
        let (reader, writer) = std::io::pipe().ok()?;
        let process = tokio::process::Command::new("/bin/sh")
            .args(["-c", "read _ignored; kill -9 0"])
            .env_clear()
            .current_dir("/")
            .process_group(pgid)
            .stdin(Stdio::from(reader))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .inspect_err(|e| tracing::debug!(pgid, error = %e, "no watchdog for the process group"))
            .ok()?;
        Some(GroupWatchdog {
            _worker_alive: writer,
            process,
        })
    }
}

/// Waits for `child` until it exits, the deadline passes or the step is
/// stopped; then kills its group, so nothing it started outlives it.
async fn wait(
    mut child: tokio::process::Child,
    deadline: tokio::time::Instant,
    kill: &mut watch::Receiver<Option<KillReason>>,
) -> ProcessEnd {
    let pgid = child.id().map_or(0, |id| id as i32);
    let watchdog = GroupWatchdog::join(pgid);
    let end = tokio::select! {
        status = child.wait() => match status {
            Ok(status) => ProcessEnd::Exited(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))),
            Err(e) => ProcessEnd::NotStarted(format!("waiting for the process: {e}")),
        },
        _ = tokio::time::sleep_until(deadline) => ProcessEnd::TimedOut,
        reason = stopped(kill) => ProcessEnd::Killed(reason),
    };
    kill_group(pgid);
    let _ = child.wait().await;
    if let Some(mut watchdog) = watchdog {
        let _ = watchdog.process.wait().await;
    }
    end
}

/// Runs `spec` with its stdout and stderr in the log (with `capture`,
/// only stderr; stdout is returned, up to 1 MiB).
pub(crate) async fn run_logged(
    spec: &ProcessSpec,
    log: &LogSink,
    kill: &mut watch::Receiver<Option<KillReason>>,
    capture: bool,
) -> (ProcessEnd, Vec<u8>) {
    let program = spec.argv.first().cloned().unwrap_or_default();
    let started = (|| -> std::io::Result<_> {
        let (reader, writer) = std::io::pipe()?;
        let mut command = command(spec);
        if capture {
            command.stdout(Stdio::piped());
        } else {
            command.stdout(Stdio::from(writer.try_clone()?));
        }
        command.stderr(Stdio::from(writer));
        let child = command.spawn();
        // The parent's copies of the write end go with `command`, so the
        // reader sees the end of output when the processes are done.
        drop(command);
        let reader = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(reader))?;
        Ok((child?, reader))
    })();
    let (mut child, mut reader) = match started {
        Ok(started) => started,
        Err(e) => {
            let end = ProcessEnd::NotStarted(format!("cannot start {program}: {e}"));
            log.note(end.describe()).await;
            return (end, Vec::new());
        }
    };
    let stdout = child.stdout.take();
    let pump = {
        let log = log.clone();
        tokio::spawn(async move {
            let mut buffer = vec![0u8; MAX_CHUNK];
            while let Ok(n) = reader.read(&mut buffer).await {
                if n == 0 {
                    break;
                }
                log.output(&buffer[..n]).await;
            }
            log.end_of_output().await;
        })
    };
    let captured = tokio::spawn(async move {
        let mut out = Vec::new();
        if let Some(stdout) = stdout {
            let _ = stdout.take(MAX_CAPTURED as u64).read_to_end(&mut out).await;
        }
        out
    });
    let end = wait(child, spec.deadline, kill).await;
    let (mut pump, mut captured) = (pump, captured);
    let drained = tokio::time::timeout(OUTPUT_DRAIN, async {
        let out = (&mut captured).await.unwrap_or_default();
        let _ = (&mut pump).await;
        out
    })
    .await;
    match drained {
        Ok(out) => (end, out),
        Err(_) => {
            pump.abort();
            captured.abort();
            log.end_of_output().await;
            (end, Vec::new())
        }
    }
}

/// Runs `spec` with its output discarded.
pub(crate) async fn run_quiet(
    spec: &ProcessSpec,
    kill: &mut watch::Receiver<Option<KillReason>>,
) -> ProcessEnd {
    let mut command = command(spec);
    command.stdout(Stdio::null()).stderr(Stdio::null());
    match command.spawn() {
        Ok(child) => wait(child, spec.deadline, kill).await,
        Err(e) => ProcessEnd::NotStarted(format!("cannot start {}: {e}", spec.argv[0])),
    }
}
