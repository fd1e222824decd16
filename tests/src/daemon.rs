//! A child process that the harness owns: its output goes to log files, it
//! runs in its own process group, and it dies with its handle.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use crate::poll_until;

/// Where a process's stdout and stderr go. Restarts append to the same files.
#[derive(Debug, Clone)]
pub struct LogFiles {
    /// The process's standard output.
    pub stdout: PathBuf,
    /// The process's standard error.
    pub stderr: PathBuf,
}

impl LogFiles {
    pub(crate) fn in_dir(dir: &Path, name: &str) -> LogFiles {
        LogFiles {
            stdout: dir.join(format!("{name}.stdout.log")),
            stderr: dir.join(format!("{name}.stderr.log")),
        }
    }

    /// The last `lines` lines of both files, under headers naming them.
    pub fn tail(&self, lines: usize) -> String {
        let mut text = String::new();
        for path in [&self.stdout, &self.stderr] {
            text.push_str(&format!("==== {} ====\n", path.display()));
            text.push_str(&tail_of_file(path, lines));
            if !text.ends_with('\n') {
                text.push('\n');
            }
        }
        text
    }
}

/// The last `lines` lines of a file, reading at most its last 256 KiB.
fn tail_of_file(path: &Path, lines: usize) -> String {
    const MAX_BYTES: u64 = 256 * 1024;
    let Ok(mut file) = std::fs::File::open(path) else {
        return "(missing)\n".to_string();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(MAX_BYTES)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A spawned process, SIGKILLed with its whole process group on drop, when
/// the tail of its logs is printed to stderr (unless it was stopped before).
#[derive(Debug)]
pub(crate) struct Daemon {
    name: String,
    child: Child,
    logs: LogFiles,
    reaped: Option<ExitStatus>,
}

impl Daemon {
    /// Spawns `command` with stdin closed and stdout/stderr appended to `logs`.
    pub(crate) fn spawn(name: &str, mut command: Command, logs: &LogFiles) -> Result<Daemon> {
        let open = |path: &Path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening log file {}", path.display()))
        };
        command
            .stdin(Stdio::null())
            .stdout(open(&logs.stdout)?)
            .stderr(open(&logs.stderr)?)
            // Its own group, so that drop also reaches the actions it runs.
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            command.pre_exec(|| {
                // Dies with the test thread that started it, even if that thread
                // is killed and never runs drop.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("spawning {name}: {command:?}"))?;
        Ok(Daemon {
            name: name.to_string(),
            child,
            logs: logs.clone(),
            reaped: None,
        })
    }

    pub(crate) fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Whether the process has exited, without reaping it (a zombie keeps its
    /// process group id reserved until we signal the group).
    pub(crate) fn has_exited(&self) -> bool {
        if self.reaped.is_some() {
            return true;
        }
        // SAFETY: plain syscall on our own child; `info` is a valid out-pointer.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let rc = libc::waitid(
                libc::P_PID,
                self.child.id(),
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            );
            rc == 0 && info.si_pid() != 0
        }
    }

    /// Sends `signal` to the process only (not its group).
    pub(crate) fn signal(&self, signal: Signal) -> Result<()> {
        if self.reaped.is_some() {
            anyhow::bail!("{} already exited", self.name);
        }
        kill(self.pid(), signal).with_context(|| format!("sending {signal} to {}", self.name))
    }

    /// SIGKILLs what is left of the process group, then reaps the process.
    fn reap(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.reaped {
            return Ok(status);
        }
        let _ = killpg(self.pid(), Signal::SIGKILL);
        let status = self
            .child
            .wait()
            .with_context(|| format!("waiting for {}", self.name))?;
        self.reaped = Some(status);
        Ok(status)
    }

    /// SIGTERM, then waits up to `timeout` for the process to exit. Past the
    /// timeout the group is SIGKILLed and the result is an error.
    pub(crate) fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if self.reaped.is_none() && !self.has_exited() {
            self.signal(Signal::SIGTERM)?;
        }
        let exited = poll_until(
            &format!("{} to exit after SIGTERM", self.name),
            timeout,
            || Ok(self.has_exited().then_some(())),
        );
        let status = self.reap()?;
        exited.with_context(|| format!("{} was SIGKILLed instead", self.name))?;
        Ok(status)
    }

    /// SIGKILLs the process group and reaps the process.
    pub(crate) fn kill(&mut self) -> Result<ExitStatus> {
        self.reap()
    }

    /// The exit status if the process exited (reaping it), `None` while it runs.
    pub(crate) fn exit_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.has_exited() {
            return self.reap().map(Some);
        }
        Ok(None)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.reaped.is_some() {
            return; // stopped on purpose earlier
        }
        let _ = self.reap();
        // Test runners show a test's output only when it fails (by panic or
        // by returning an error), which is when these lines are wanted.
        eprintln!(
            "---- last lines of {}'s logs ----\n{}",
            self.name,
            self.logs.tail(60)
        );
    }
}
