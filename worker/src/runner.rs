//! Runs an action's command: directly (`runner=plain`) or in a bubblewrap
//! sandbox (`runner=sandbox`), always in a new process group, with a
//! timeout, stdout/stderr captured to files under a size cap, and the whole
//! group killed when the command ends, times out or is cancelled.

use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::watch;

use crate::action_error::{is_disk_full, ActionError};

/// The bubblewrap binary (Debian package `bubblewrap`).
pub const BWRAP: &str = "/usr/bin/bwrap";
/// Value of the `runner` platform property for running commands directly.
pub const RUNNER_PLAIN: &str = "plain";
/// Value of the `runner` platform property for the bubblewrap sandbox.
pub const RUNNER_SANDBOX: &str = "sandbox";
/// Platform property that lets a sandboxed action use the network (`on`);
/// any other value, or its absence, means no network. Plain actions always
/// have the worker's network.
pub const PLATFORM_NETWORK_KEY: &str = "network";
/// The value of [`PLATFORM_NETWORK_KEY`] that enables the network.
pub const NETWORK_ON: &str = "on";

/// How long captured output may keep arriving after the process group was
/// killed (only processes that escaped the group can hold the pipes open).
const STDIO_DRAIN: Duration = Duration::from_secs(5);

/// How a command is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Runner {
    /// Directly, as the worker's user.
    Plain,
    /// Under bubblewrap: read-only root filesystem, only the input root
    /// writable, fresh /tmp, /proc and /dev, no network unless `network`.
    Sandbox { network: bool },
}

/// Why a running command is to be stopped from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KillReason {
    /// The server no longer wants the result (cancelled, requeued, unknown).
    Abandoned,
    /// The worker is shutting down and the drain deadline passed.
    Draining,
}

/// What to run.
#[derive(Debug, Clone)]
pub(crate) struct RunSpec {
    pub(crate) arguments: Vec<String>,
    /// The complete environment (nothing is inherited from the worker).
    pub(crate) env: Vec<(String, String)>,
    /// The action's input root: the only writable place in the sandbox.
    pub(crate) input_root: PathBuf,
    /// Absolute working directory (inside `input_root`).
    pub(crate) working_dir: PathBuf,
    pub(crate) timeout: Duration,
    /// Sourced by bash before the command.
    pub(crate) env_script: Option<PathBuf>,
    /// Cap on each of stdout and stderr.
    pub(crate) stdio_limit: u64,
    pub(crate) stdout: PathBuf,
    pub(crate) stderr: PathBuf,
    pub(crate) runner: Runner,
    /// Directories hidden from sandboxed commands (the worker's work dir).
    pub(crate) hidden: Vec<PathBuf>,
    /// Files a sandboxed command sees as empty (the worker's credentials).
    /// A symlinked path (a Kubernetes Secret volume) masks the file it
    /// points to when the sandbox starts.
    pub(crate) masked: Vec<PathBuf>,
}

/// How the command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RunEnd {
    /// Exit code (128 + signal number for a signal).
    Exited(i32),
    TimedOut,
    Killed(KillReason),
    /// stdout or stderr exceeded the cap.
    StdioLimit(&'static str),
    /// Writing stdout or stderr failed (disk full, ...).
    StdioError(String, bool),
}

/// The command's end and when it ran.
#[derive(Debug, Clone)]
pub(crate) struct RunOutcome {
    pub(crate) end: RunEnd,
    pub(crate) started: SystemTime,
    pub(crate) finished: SystemTime,
}

/// The full command line: env-script wrapper and sandbox around `arguments`.
pub(crate) fn command_line(spec: &RunSpec) -> Vec<String> {
    let mut line = Vec::new();
    if let Runner::Sandbox { network } = spec.runner {
        line.push(BWRAP.to_string());
        line.extend(sandbox_options(
            &spec.input_root,
            &spec.hidden,
            &spec.masked,
            spec.env_script.as_deref(),
            network,
        ));
        line.extend([
            "--chdir".into(),
            spec.working_dir.display().to_string(),
            "--".into(),
        ]);
    }
    if let Some(script) = &spec.env_script {
        line.extend([
            "bash".into(),
            "-c".into(),
            r#"source "$0" && exec "$@""#.into(),
            script.display().to_string(),
        ]);
    }
    line.extend(spec.arguments.iter().cloned());
    line
}

fn sandbox_options(
    writable: &Path,
    hidden: &[PathBuf],
    masked: &[PathBuf],
    env_script: Option<&Path>,
    network: bool,
) -> Vec<String> {
    let mut options: Vec<String> = [
        "--ro-bind",
        "/",
        "/",
        "--tmpfs",
        "/tmp",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
    ]
    .map(String::from)
    .to_vec();
    for path in hidden {
        options.extend(["--tmpfs".into(), path.display().to_string()]);
    }
    let writable = writable.display().to_string();
    options.extend(["--bind".into(), writable.clone(), writable]);
    // After the binds above, so that nothing mounted later uncovers them. A
    // file that is gone needs no mask (and bubblewrap could not create its
    // mount point on the read-only root).
    for path in masked.iter().filter(|p| p.exists()) {
        let path = path.display().to_string();
        options.extend(["--ro-bind".into(), "/dev/null".into(), path]);
    }
    if let Some(script) = env_script {
        let script = script.display().to_string();
        options.extend(["--ro-bind".into(), script.clone(), script]);
    }
    options.extend(["--unshare-pid", "--unshare-ipc", "--unshare-uts"].map(String::from));
    if !network {
        options.push("--unshare-net".into());
    }
    options.extend(["--die-with-parent", "--new-session"].map(String::from));
    options
}

/// Checks that bubblewrap can create a sandbox here (it needs user or mount
/// namespaces, which some container runtimes deny).
pub(crate) async fn probe_sandbox(scratch: &Path) -> Result<(), String> {
    let mut command = tokio::process::Command::new(BWRAP);
    command
        .args(sandbox_options(scratch, &[], &[], None, false))
        .args([
            "--chdir",
            &scratch.display().to_string(),
            "--",
            "/bin/sh",
            "-c",
            "echo ok > probe && cat probe",
        ])
        .env_clear()
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(10), command.output())
        .await
        .map_err(|_| format!("{BWRAP} did not finish within 10 s"))?
        .map_err(|e| format!("cannot run {BWRAP}: {e}"))?;
    if output.status.success() && output.stdout == b"ok\n" {
        Ok(())
    } else {
        Err(format!(
            "{BWRAP} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Sends SIGKILL to every process of the group.
pub(crate) fn kill_group(pgid: i32) {
    if pgid > 0 {
        // ESRCH: the group is already gone.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pgid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

#[derive(Debug, Default)]
struct Captured {
    over_limit: bool,
    error: Option<std::io::Error>,
}

/// Copies a pipe into a file, stopping (and telling) once over `limit`.
async fn capture(
    mut pipe: impl AsyncRead + Unpin,
    path: PathBuf,
    limit: u64,
    stop: tokio::sync::mpsc::Sender<()>,
) -> Captured {
    let mut captured = Captured::default();
    let mut file = match tokio::fs::File::create(&path).await {
        Ok(file) => file,
        Err(e) => {
            captured.error = Some(e);
            let _ = stop.try_send(());
            return captured;
        }
    };
    let mut buffer = vec![0u8; 64 << 10];
    let mut total = 0u64;
    loop {
        let n = match pipe.read(&mut buffer).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                captured.error = Some(e);
                break;
            }
        };
        let keep = (limit.saturating_sub(total)).min(n as u64) as usize;
        total += n as u64;
        if let Err(e) = file.write_all(&buffer[..keep]).await {
            captured.error = Some(e);
            let _ = stop.try_send(());
            return captured;
        }
        if total > limit {
            captured.over_limit = true;
            let _ = stop.try_send(());
            break;
        }
    }
    if let Err(e) = file.flush().await {
        captured.error = Some(e);
    }
    captured
}

async fn killed(kill: &mut watch::Receiver<Option<KillReason>>) -> KillReason {
    loop {
        if let Some(reason) = *kill.borrow_and_update() {
            return reason;
        }
        if kill.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Runs the command to its end. Errors are for commands that could not be
/// started; everything that happens once it runs is in [`RunEnd`].
pub(crate) async fn run(
    spec: &RunSpec,
    kill: &mut watch::Receiver<Option<KillReason>>,
) -> Result<RunOutcome, ActionError> {
    let line = command_line(spec);
    if spec.arguments.is_empty() {
        return Err(ActionError::invalid("the command has no arguments"));
    }
    let mut command = tokio::process::Command::new(&line[0]);
    command
        .args(&line[1..])
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.working_dir)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let started = SystemTime::now();
    let mut child = command.spawn().map_err(|e| {
        ActionError::invalid(format!(
            "cannot start `{}` in `{}`: {e}",
            line[0],
            spec.working_dir
                .strip_prefix(&spec.input_root)
                .unwrap_or(&spec.working_dir)
                .display()
        ))
    })?;
    let pgid = child.id().map_or(0, |id| id as i32);
    let (stop_tx, mut stop_rx) = tokio::sync::mpsc::channel(2);
    let stdout = tokio::spawn(capture(
        child.stdout.take().expect("stdout is piped"),
        spec.stdout.clone(),
        spec.stdio_limit,
        stop_tx.clone(),
    ));
    let stderr = tokio::spawn(capture(
        child.stderr.take().expect("stderr is piped"),
        spec.stderr.clone(),
        spec.stdio_limit,
        stop_tx,
    ));

    let mut end = tokio::select! {
        status = child.wait() => match status {
            Ok(status) => RunEnd::Exited(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))),
            Err(e) => RunEnd::StdioError(format!("waiting for the command: {e}"), false),
        },
        _ = tokio::time::sleep(spec.timeout) => RunEnd::TimedOut,
        reason = killed(kill) => RunEnd::Killed(reason),
        Some(()) = stop_rx.recv() => RunEnd::StdioError(String::new(), false),
    };
    // The command is done (or must stop): nothing it started may outlive it.
    kill_group(pgid);
    let _ = child.wait().await;
    let finished = SystemTime::now();
    let streams = tokio::time::timeout(STDIO_DRAIN, async { (stdout.await, stderr.await) }).await;
    if let Ok((Ok(out), Ok(err))) = streams {
        for (name, captured) in [("stdout", out), ("stderr", err)] {
            if let Some(e) = captured.error {
                end = RunEnd::StdioError(format!("capturing {name}: {e}"), is_disk_full(&e));
            } else if captured.over_limit && !matches!(end, RunEnd::TimedOut | RunEnd::Killed(_)) {
                end = RunEnd::StdioLimit(name);
            }
        }
    }
    if let RunEnd::StdioError(message, _) = &end {
        if message.is_empty() {
            // The stop signal came from a stream that then reported nothing
            // above (it was dropped by the drain timeout): say so.
            end = RunEnd::StdioError("capturing stdout/stderr failed".into(), false);
        }
    }
    Ok(RunOutcome {
        end,
        started,
        finished,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path, arguments: &[&str]) -> RunSpec {
        let root = dir.join("root");
        std::fs::create_dir_all(&root).unwrap();
        RunSpec {
            arguments: arguments.iter().map(|s| s.to_string()).collect(),
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            input_root: root.clone(),
            working_dir: root,
            timeout: Duration::from_secs(30),
            env_script: None,
            stdio_limit: 1 << 20,
            stdout: dir.join("stdout"),
            stderr: dir.join("stderr"),
            runner: Runner::Plain,
            hidden: vec![],
            masked: vec![],
        }
    }

    fn no_kill() -> (
        watch::Sender<Option<KillReason>>,
        watch::Receiver<Option<KillReason>>,
    ) {
        watch::channel(None)
    }

    /// Gone, or a zombie waiting for init to reap it.
    fn is_gone(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z'),
        }
    }

    /// Processes whose command line contains `marker`.
    fn processes_with(marker: &str) -> Vec<i32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| {
                        String::from_utf8_lossy(&c)
                            .replace('\0', " ")
                            .contains(marker)
                    })
                    .unwrap_or(false)
                    && !is_gone(*pid)
            })
            .collect()
    }

    async fn wait_until(mut check: impl FnMut() -> bool) -> bool {
        for _ in 0..100 {
            if check() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    #[tokio::test]
    async fn exit_code_stdout_stderr_and_exact_env() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec(
            dir.path(),
            &[
                "sh",
                "-c",
                "echo out $FOO ${HOME:-nohome}; echo err >&2; pwd; exit 3",
            ],
        );
        spec.env.push(("FOO".into(), "bar".into()));
        std::fs::create_dir(spec.input_root.join("sub")).unwrap();
        spec.working_dir = spec.input_root.join("sub");
        let outcome = run(&spec, &mut no_kill().1).await.unwrap();
        assert_eq!(outcome.end, RunEnd::Exited(3));
        let stdout = std::fs::read_to_string(&spec.stdout).unwrap();
        assert!(stdout.starts_with("out bar nohome\n"), "{stdout}");
        assert!(stdout.trim_end().ends_with("/root/sub"), "{stdout}");
        assert_eq!(std::fs::read_to_string(&spec.stderr).unwrap(), "err\n");
    }

    #[tokio::test]
    async fn a_command_that_does_not_exist_is_invalid_argument() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(dir.path(), &["./no-such-tool"]);
        let e = run(&spec, &mut no_kill().1).await.unwrap_err();
        assert_eq!(e.code, tonic::Code::InvalidArgument);
        assert!(e.message.contains("no-such-tool"), "{}", e.message);
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec(
            dir.path(),
            &[
                "sh",
                "-c",
                "sleep 100 & echo $! > ../pids; sleep 100 & echo $! >> ../pids; echo started; wait",
            ],
        );
        spec.timeout = Duration::from_millis(500);
        let begin = std::time::Instant::now();
        let outcome = run(&spec, &mut no_kill().1).await.unwrap();
        assert_eq!(outcome.end, RunEnd::TimedOut);
        assert!(begin.elapsed() < Duration::from_secs(10));
        assert_eq!(std::fs::read_to_string(&spec.stdout).unwrap(), "started\n");
        let pids: Vec<i32> = std::fs::read_to_string(dir.path().join("pids"))
            .unwrap()
            .lines()
            .map(|l| l.parse().unwrap())
            .collect();
        assert_eq!(pids.len(), 2);
        assert!(
            wait_until(|| pids.iter().all(|p| is_gone(*p))).await,
            "survivors: {pids:?}"
        );
    }

    #[tokio::test]
    async fn leftover_background_processes_are_killed_after_a_normal_exit() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(
            dir.path(),
            &["sh", "-c", "sleep 100 >/dev/null 2>&1 & echo $! > ../pid"],
        );
        let outcome = run(&spec, &mut no_kill().1).await.unwrap();
        assert_eq!(outcome.end, RunEnd::Exited(0));
        let pid: i32 = std::fs::read_to_string(dir.path().join("pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(wait_until(|| is_gone(pid)).await);
    }

    #[tokio::test]
    async fn abandon_kills_promptly() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(dir.path(), &["sleep", "100"]);
        let (tx, mut rx) = no_kill();
        let killer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            tx.send(Some(KillReason::Abandoned)).unwrap();
            tx
        });
        let outcome = run(&spec, &mut rx).await.unwrap();
        assert_eq!(outcome.end, RunEnd::Killed(KillReason::Abandoned));
        drop(killer.await);
    }

    #[tokio::test]
    async fn stdout_over_the_cap_stops_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec(dir.path(), &["yes"]);
        spec.stdio_limit = 10_000;
        let outcome = run(&spec, &mut no_kill().1).await.unwrap();
        assert_eq!(outcome.end, RunEnd::StdioLimit("stdout"));
        assert_eq!(std::fs::metadata(&spec.stdout).unwrap().len(), 10_000);
    }

    #[tokio::test]
    async fn env_script_is_sourced_before_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("env.sh");
        std::fs::write(&script, "export SECRET=from-script\n").unwrap();
        let mut spec = spec(
            dir.path(),
            &["sh", "-c", "echo \"$SECRET $FOO $0 $1\"", "zero", "one two"],
        );
        spec.env.push(("FOO".into(), "foo".into()));
        spec.env_script = Some(script.clone());
        let outcome = run(&spec, &mut no_kill().1).await.unwrap();
        assert_eq!(outcome.end, RunEnd::Exited(0));
        assert_eq!(
            std::fs::read_to_string(&spec.stdout).unwrap(),
            "from-script foo zero one two\n"
        );

        std::fs::write(&script, "exit 7\n").unwrap();
        let outcome = run(&spec, &mut no_kill().1).await.unwrap();
        assert_eq!(
            outcome.end,
            RunEnd::Exited(7),
            "a failing env script fails the action"
        );
    }

    async fn sandbox_available() -> bool {
        let scratch = tempfile::tempdir().unwrap();
        match probe_sandbox(scratch.path()).await {
            Ok(()) => true,
            Err(e) => {
                eprintln!("skipping sandbox test: {e}");
                false
            }
        }
    }

    #[tokio::test]
    async fn sandbox_confines_writes_and_network() {
        if !sandbox_available().await {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let hidden = dir.path().join("hidden");
        std::fs::create_dir(&hidden).unwrap();
        std::fs::write(hidden.join("cache-file"), b"x").unwrap();
        // `..` of the input root is the sandbox's own tmpfs: writable, but
        // nothing lands on the host.
        let script = "echo in > inside; echo out > ../outside; \
             (echo x > /etc/buildkube-sandbox-test) 2>/dev/null && echo wrote-etc; \
             (echo t > /tmp/t) && echo tmp-ok; \
             ls ../hidden 2>/dev/null | wc -l; \
             grep -c : /proc/net/dev";
        let mut spec = spec(dir.path(), &["sh", "-c", script]);
        spec.runner = Runner::Sandbox { network: false };
        spec.hidden = vec![hidden];
        let outcome = run(&spec, &mut no_kill().1).await.unwrap();
        let stdout = std::fs::read_to_string(&spec.stdout).unwrap();
        assert_eq!(outcome.end, RunEnd::Exited(0), "{stdout}");
        assert_eq!(
            stdout, "tmp-ok\n0\n1\n",
            "only lo, no hidden files, no writes outside"
        );
        assert!(spec.input_root.join("inside").exists());
        assert!(!dir.path().join("outside").exists());

        spec.runner = Runner::Sandbox { network: true };
        run(&spec, &mut no_kill().1).await.unwrap();
        let interfaces: u32 = std::fs::read_to_string(&spec.stdout)
            .unwrap()
            .lines()
            .last()
            .unwrap()
            .parse()
            .unwrap();
        assert!(interfaces >= 1);
    }

    /// Issue 8, finding 10: any action could read the worker's token file.
    /// Laid out as a Kubernetes Secret volume (`token -> ..data/token`,
    /// `..data -> ..2026_12_01`), outside /tmp (the sandbox's /tmp is its
    /// own): masked, it reads as empty by every path.
    #[tokio::test]
    async fn sandbox_masks_the_worker_credentials() {
        if !sandbox_available().await {
            return;
        }
        // /var/tmp, not the checkout's target/: a checkout may itself live
        // under /tmp (CI clones anywhere), which the sandbox hides.
        let outside_tmp = tempfile::tempdir_in("/var/tmp").unwrap();
        let secrets = outside_tmp.path().join("secrets");
        std::fs::create_dir_all(secrets.join("..2026_12_01")).unwrap();
        std::fs::write(secrets.join("..2026_12_01/token"), "s3cret").unwrap();
        std::os::unix::fs::symlink("..2026_12_01", secrets.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/token", secrets.join("token")).unwrap();
        let token = secrets.join("token");
        let script = format!(
            "cat {0}/token; echo; cat {0}/..2026_12_01/token; echo",
            secrets.display()
        );
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec(dir.path(), &["sh", "-c", &script]);
        spec.runner = Runner::Sandbox { network: false };

        run(&spec, &mut no_kill().1).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&spec.stdout).unwrap(),
            "s3cret\ns3cret\n",
            "unmasked, the sandbox reads it (so the check below can fail)"
        );
        spec.masked = vec![token.clone(), secrets.join("gone")];
        let outcome = run(&spec, &mut no_kill().1).await.unwrap();
        assert_eq!(outcome.end, RunEnd::Exited(0));
        assert_eq!(std::fs::read_to_string(&spec.stdout).unwrap(), "\n\n");
        assert_eq!(std::fs::read_to_string(&token).unwrap(), "s3cret");
    }

    #[tokio::test]
    async fn sandbox_timeout_kills_everything_inside() {
        if !sandbox_available().await {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let marker = format!("{}", 100_000 + std::process::id());
        let script = format!("sleep {marker} & sleep {marker} & echo started; wait");
        let mut spec = spec(dir.path(), &["sh", "-c", &script]);
        spec.runner = Runner::Sandbox { network: false };
        spec.timeout = Duration::from_millis(700);
        let outcome = run(&spec, &mut no_kill().1).await.unwrap();
        assert_eq!(outcome.end, RunEnd::TimedOut);
        assert_eq!(std::fs::read_to_string(&spec.stdout).unwrap(), "started\n");
        assert!(
            wait_until(|| processes_with(&format!("sleep {marker}")).is_empty()).await,
            "sandboxed processes survived: {:?}",
            processes_with(&format!("sleep {marker}"))
        );
    }
}

#[cfg(test)]
mod disk_full_tests {
    use super::*;

    /// A 64 KiB tmpfs (needs root and mount rights; skipped otherwise).
    struct TinyFs(PathBuf);

    impl TinyFs {
        fn mount(path: &Path) -> Option<TinyFs> {
            std::fs::create_dir_all(path).ok()?;
            let status = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
                .arg(path)
                .stderr(Stdio::null())
                .status()
                .ok()?;
            status.success().then(|| TinyFs(path.to_path_buf()))
        }
    }

    impl Drop for TinyFs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }

    #[tokio::test]
    async fn full_disk_while_capturing_is_reported_not_hung() {
        let dir = tempfile::tempdir().unwrap();
        let Some(fs) = TinyFs::mount(&dir.path().join("tiny")) else {
            eprintln!("skipping: cannot mount a tmpfs here");
            return;
        };
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let spec = RunSpec {
            arguments: vec![
                "sh".into(),
                "-c".into(),
                "head -c 1000000 /dev/zero; sleep 100".into(),
            ],
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            input_root: root.clone(),
            working_dir: root,
            timeout: Duration::from_secs(60),
            env_script: None,
            stdio_limit: u64::MAX,
            stdout: fs.0.join("stdout"),
            stderr: fs.0.join("stderr"),
            runner: Runner::Plain,
            hidden: vec![],
            masked: vec![],
        };
        let begin = std::time::Instant::now();
        let outcome = run(&spec, &mut watch::channel(None).1).await.unwrap();
        assert!(begin.elapsed() < Duration::from_secs(20));
        match outcome.end {
            RunEnd::StdioError(message, disk_full) => {
                assert!(disk_full, "{message}");
                assert!(message.contains("stdout"), "{message}");
            }
            other => panic!("expected a disk-full error, got {other:?}"),
        }
    }
}
