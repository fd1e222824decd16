//! The real Bazel, run on a private copy of a fixture workspace.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::fixtures_dir;
use crate::server::Server;

/// Environment variable naming the Bazel to run instead of `bazel` on `PATH`.
pub const BAZEL_ENV: &str = "BUILDKUBE_BAZEL";
/// Bound on one Bazel command; a remote build that hangs fails the test here.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Bound on `bazel shutdown` at drop.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(60);
/// A Bazel server left behind by a killed test exits after this long idle.
const MAX_IDLE_SECS: u32 = 900;
/// Debian's netty-tcnative JNI library (package `libnetty-tcnative-jni`,
/// 2.0.28: the version of the tcnative classes inside Debian's Bazel 4.2.3).
const DEBIAN_TCNATIVE_JNI: &str = "/usr/lib/x86_64-linux-gnu/jni/libnetty-tcnative.so";
/// The name netty looks the library up by (`System.loadLibrary("netty_tcnative")`).
const TCNATIVE_LIBRARY_FILE: &str = "libnetty_tcnative.so";

/// Flags for building with `server` as remote executor: every spawn remote,
/// no local fallback, 8 jobs.
pub fn remote_execution_flags(server: &Server) -> Vec<String> {
    vec![
        format!("--remote_executor={}", server.grpc_url()),
        format!("--remote_instance_name={}", first_instance(server)),
        "--spawn_strategy=remote".into(),
        "--genrule_strategy=remote".into(),
        "--jobs=8".into(),
    ]
}

/// Flags for running spawns locally with `server` as remote cache only.
pub fn remote_cache_flags(server: &Server) -> Vec<String> {
    vec![
        format!("--remote_cache={}", server.grpc_url()),
        format!("--remote_instance_name={}", first_instance(server)),
    ]
}

fn first_instance(server: &Server) -> &str {
    server
        .args()
        .instances
        .first()
        .map(String::as_str)
        .unwrap_or_default()
}

/// A directory under `scratch` with Debian's netty-tcnative under the name
/// netty loads it by, or `None` when the package is not installed.
///
/// Debian's Bazel 4.2.3 bundles netty 4.1.48 with its JDK ALPN support
/// removed (`JdkSslContext.toNegotiator` accepts only NONE), so gRPC over
/// TLS works only with the OpenSSL provider, which grpc-java picks when
/// `OpenSsl.isAvailable()`: the tcnative classes are in Bazel's jar, the
/// native library is Debian's `libnetty-tcnative-jni`. It is copied, not
/// linked: Java resolves links, and the library's `JNI_OnLoad` refuses a
/// path without `netty_tcnative` in its name ("unexpected library path").
fn tcnative_dir(scratch: &Path) -> Result<Option<PathBuf>> {
    let source = Path::new(DEBIAN_TCNATIVE_JNI);
    if !source.exists() {
        return Ok(None);
    }
    let dir = scratch.join("jni");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let target = dir.join(TCNATIVE_LIBRARY_FILE);
    std::fs::copy(source, &target)
        .with_context(|| format!("copying {} to {}", source.display(), target.display()))?;
    Ok(Some(dir))
}

/// Bazel working on its own copy of a workspace, with its own output user
/// root (so no state is shared with other tests or the user's Bazel) and the
/// offline bazelrc built from `tests/fixtures/bazel-stubs`. Its Bazel server
/// is shut down on drop.
#[derive(Debug)]
pub struct Bazel {
    program: PathBuf,
    workspace: PathBuf,
    output_user_root: PathBuf,
    bazelrc: PathBuf,
    logs_dir: PathBuf,
    /// A directory holding netty-tcnative for Bazel's JVM, if installed.
    jni_dir: Option<PathBuf>,
    runs: AtomicUsize,
    /// Holds all of the above; made writable again before removal, since
    /// Bazel leaves read-only files and directories.
    dir: Option<TempDir>,
}

impl Bazel {
    /// Bazel on a fresh copy of `tests/fixtures/cc-workspace` (see [`crate::fixture`]).
    pub fn new() -> Result<Bazel> {
        Bazel::on_copy_of(&fixtures_dir().join("cc-workspace"))
    }

    /// Bazel on a fresh copy of the workspace at `source`.
    pub fn on_copy_of(source: &Path) -> Result<Bazel> {
        let program = match std::env::var_os(BAZEL_ENV) {
            Some(program) => PathBuf::from(program),
            None => find_on_path("bazel").context(
                "`bazel` is not on PATH: install Bazel 4.2.3 with `apt-get install -y bazel-bootstrap` \
                 (as .ci/run does), or set BUILDKUBE_BAZEL",
            )?,
        };
        let dir = tempfile::Builder::new()
            .prefix("buildkube-bazel-")
            .tempdir()
            .context("creating Bazel's temp dir")?;
        let workspace = dir.path().join("workspace");
        copy_tree(source, &workspace)?;
        let output_user_root = dir.path().join("output_user_root");
        let logs_dir = dir.path().join("logs");
        std::fs::create_dir_all(&logs_dir)?;
        let bazelrc = dir.path().join("offline.bazelrc");
        std::fs::write(&bazelrc, offline_bazelrc()?)
            .with_context(|| format!("writing {}", bazelrc.display()))?;
        let jni_dir = tcnative_dir(dir.path())?;
        Ok(Bazel {
            program,
            workspace,
            output_user_root,
            bazelrc,
            logs_dir,
            jni_dir,
            runs: AtomicUsize::new(0),
            dir: Some(dir),
        })
    }

    /// The workspace copy Bazel works on; tests may edit it.
    pub fn workspace(&self) -> &Path {
        &self.workspace
    }

    /// Runs `bazel <command> <args>` in the workspace and waits for it.
    /// A failing Bazel is not an error here: check [`BazelRun`].
    pub fn run<I, S>(&self, command: &str, args: I) -> Result<BazelRun>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<String> = args
            .into_iter()
            .map(|arg| arg.as_ref().to_string_lossy().into_owned())
            .collect();
        self.run_with_timeout(command, &args, COMMAND_TIMEOUT)
    }

    /// `bazel build <args>`.
    pub fn build<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(&self, args: I) -> Result<BazelRun> {
        self.run("build", args)
    }

    /// `bazel test <args>`.
    pub fn test<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(&self, args: I) -> Result<BazelRun> {
        self.run("test", args)
    }

    /// `bazel clean`: drops the outputs and Bazel's local action cache, so the
    /// next build must execute or fetch every action again. Fails if Bazel does.
    pub fn clean(&self) -> Result<BazelRun> {
        let run = self.run("clean", std::iter::empty::<&str>())?;
        run.ensure_success()?;
        Ok(run)
    }

    /// `bazel shutdown` (also done on drop).
    pub fn shutdown(&self) -> Result<BazelRun> {
        self.run_with_timeout("shutdown", &[], SHUTDOWN_TIMEOUT)
    }

    /// Path of `relative` under `bazel-bin/`, e.g. `gen/big.bin`.
    pub fn bin_file(&self, relative: &str) -> PathBuf {
        self.workspace.join("bazel-bin").join(relative)
    }

    /// The bytes of `bazel-bin/<relative>`.
    pub fn read_bin(&self, relative: &str) -> Result<Vec<u8>> {
        let path = self.bin_file(relative);
        std::fs::read(&path).with_context(|| format!("reading output {}", path.display()))
    }

    /// The `test.log` of a test target, e.g. `app/greet_test` for `//app:greet_test`.
    pub fn test_log(&self, package_and_name: &str) -> Result<String> {
        let path = self
            .workspace
            .join("bazel-testlogs")
            .join(package_and_name)
            .join("test.log");
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    }

    fn startup_options(&self) -> Vec<String> {
        let mut options = vec![
            format!("--output_user_root={}", self.output_user_root.display()),
            // The user's ~/.bazelrc must not change what the tests measure.
            "--nohome_rc".into(),
            format!("--bazelrc={}", self.bazelrc.display()),
            format!("--max_idle_secs={MAX_IDLE_SECS}"),
        ];
        if let Some(dir) = &self.jni_dir {
            // Bazel loads its own JNI library by absolute path, so this path
            // serves netty alone (see `tcnative_dir`).
            options.push(format!(
                "--host_jvm_args=-Djava.library.path={}",
                dir.display()
            ));
        }
        options
    }

    /// Whether Bazel can speak TLS here: with Debian's Bazel, only when
    /// netty-tcnative is installed (see `tcnative_dir`).
    pub fn ensure_tls_capable(&self) -> Result<()> {
        if self.jni_dir.is_none() && std::env::var_os(BAZEL_ENV).is_none() {
            bail!(
                "{DEBIAN_TCNATIVE_JNI} is missing: Debian's Bazel 4.2.3 speaks TLS only through \
                 netty-tcnative (`apt-get install -y libnetty-tcnative-jni`, as .ci/run does); \
                 without it every TLS build crashes with \"JDK provider does not support ALPN protocol\""
            );
        }
        Ok(())
    }

    fn run_with_timeout(
        &self,
        command: &str,
        args: &[String],
        timeout: Duration,
    ) -> Result<BazelRun> {
        let number = self.runs.fetch_add(1, Ordering::Relaxed);
        let stdout_path = self.logs_dir.join(format!("{number:02}-{command}.stdout"));
        let stderr_path = self.logs_dir.join(format!("{number:02}-{command}.stderr"));
        let startup = self.startup_options();
        let command_line = format!("bazel {} {command} {}", startup.join(" "), args.join(" "));
        eprintln!("$ {command_line}");
        let mut child = Command::new(&self.program)
            .current_dir(&self.workspace)
            .args(&startup)
            .arg(command)
            .args(args)
            // Debian's wrapper would otherwise look for another Bazel version.
            .env_remove("USE_BAZEL_VERSION")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout_path)?)
            .stderr(std::fs::File::create(&stderr_path)?)
            .spawn()
            .with_context(|| format!("running {}", self.program.display()))?;
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break Some(status);
            }
            if started.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let stdout = String::from_utf8_lossy(&std::fs::read(&stdout_path)?).into_owned();
        let stderr = String::from_utf8_lossy(&std::fs::read(&stderr_path)?).into_owned();
        let summary = ProcessSummary::parse(&stderr).or_else(|| ProcessSummary::parse(&stdout));
        let run = BazelRun {
            command_line,
            exit_code: status.and_then(|s| s.code()),
            stdout,
            stderr,
            summary,
            elapsed: started.elapsed(),
        };
        eprintln!("{}", run.stderr);
        if !run.stdout.is_empty() {
            eprintln!("{}", run.stdout);
        }
        if status.is_none() {
            bail!("Bazel did not finish within {timeout:?}\n{run}");
        }
        Ok(run)
    }

    /// Kills Bazel servers the shutdown missed, found by their pid files.
    fn kill_leftover_servers(&self) {
        let Ok(bases) = std::fs::read_dir(&self.output_user_root) else {
            return;
        };
        let root = self.output_user_root.to_string_lossy().into_owned();
        for base in bases.flatten() {
            let pid_file = base.path().join("server").join("server.pid.txt");
            let Ok(pid) = std::fs::read_to_string(&pid_file) else {
                continue;
            };
            let Ok(pid) = pid.trim().parse::<i32>() else {
                continue;
            };
            // Only if that pid is still a Bazel server of ours (pids get reused).
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&root) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

impl Drop for Bazel {
    fn drop(&mut self) {
        if self.output_user_root.exists() {
            if let Err(e) = self.shutdown() {
                eprintln!("bazel shutdown failed: {e:#}");
            }
            self.kill_leftover_servers();
        }
        if let Some(dir) = self.dir.take() {
            make_writable(dir.path());
            if let Err(e) = dir.close() {
                eprintln!("removing Bazel's temp dir: {e}");
            }
        }
    }
}

/// The offline bazelrc: our stubs' template with `@STUBS@` filled in, plus the
/// harness's own settings for output that tests can read. A test repository
/// may commit it as its workspace `.bazelrc`, for a Bazel that the test does
/// not start itself (a CI step's).
pub fn offline_bazelrc() -> Result<String> {
    let stubs = fixtures_dir().join("bazel-stubs");
    let template_path = stubs.join("offline.bazelrc.in");
    let template = std::fs::read_to_string(&template_path)
        .with_context(|| format!("reading {}", template_path.display()))?;
    let stubs = stubs.to_str().context("the stubs path is not UTF-8")?;
    Ok(format!(
        "{}\n# Added by the buildkube test harness: plain output to parse.\n\
         common --color=no\n\
         common --curses=no\n\
         build --verbose_failures\n\
         test --test_output=errors\n",
        template.replace("@STUBS@", stubs)
    ))
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Copies a tree of regular files and directories (a fixture has nothing
/// else), leaving out Bazel's output symlinks of a by-hand run.
pub fn copy_tree(source: &Path, target: &Path) -> Result<()> {
    let walk = walkdir::WalkDir::new(source)
        .into_iter()
        .filter_entry(|entry| {
            !(entry.depth() == 1 && entry.file_name().to_string_lossy().starts_with("bazel-"))
        });
    for entry in walk {
        let entry = entry.with_context(|| format!("walking {}", source.display()))?;
        let relative = entry.path().strip_prefix(source)?;
        let destination = target.join(relative);
        if entry.file_type().is_dir() {
            std::fs::create_dir_all(&destination)
                .with_context(|| format!("creating {}", destination.display()))?;
        } else {
            std::fs::copy(entry.path(), &destination).with_context(|| {
                format!(
                    "copying {} to {}",
                    entry.path().display(),
                    destination.display()
                )
            })?;
        }
    }
    Ok(())
}

/// Adds owner write permission to every directory under `root` (not
/// following symlinks), so that the tree can be removed.
fn make_writable(root: &Path) {
    for entry in walkdir::WalkDir::new(root).into_iter().flatten() {
        if entry.file_type().is_dir() {
            if let Ok(metadata) = entry.metadata() {
                let mut permissions = metadata.permissions();
                permissions.set_mode(permissions.mode() | 0o700);
                let _ = std::fs::set_permissions(entry.path(), permissions);
            }
        }
    }
}

/// The outcome of one Bazel command.
#[derive(Debug, Clone)]
pub struct BazelRun {
    /// The command as run (for messages).
    pub command_line: String,
    /// Bazel's exit code (`None` if killed by a signal): 0 success, 1 build
    /// failed, 3 tests failed, 2 bad command line.
    pub exit_code: Option<i32>,
    /// Bazel's stdout (e.g. the test summary).
    pub stdout: String,
    /// Bazel's stderr (progress, INFO lines, action output and errors).
    pub stderr: String,
    /// The `INFO: N processes: ...` line, if Bazel printed one.
    pub summary: Option<ProcessSummary>,
    /// Wall time of the command.
    pub elapsed: Duration,
}

impl BazelRun {
    /// Whether Bazel exited with 0.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }

    /// Ok if Bazel exited with 0, else an error carrying its output.
    pub fn ensure_success(&self) -> Result<&BazelRun> {
        if !self.success() {
            bail!("Bazel failed\n{self}");
        }
        Ok(self)
    }

    /// The process summary, or an error carrying the output if there is none.
    pub fn summary(&self) -> Result<&ProcessSummary> {
        self.summary
            .as_ref()
            .with_context(|| format!("no `INFO: N processes` line in Bazel's output\n{self}"))
    }

    /// stdout and stderr together, for searching.
    pub fn output(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    /// Whether some line of the output, trimmed, equals `line`.
    pub fn has_line(&self, line: &str) -> bool {
        self.stdout
            .lines()
            .chain(self.stderr.lines())
            .any(|l| l.trim() == line)
    }
}

impl fmt::Display for BazelRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tail = |text: &str| {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(60)..].join("\n")
        };
        writeln!(f, "$ {}", self.command_line)?;
        writeln!(
            f,
            "exit code: {:?} after {:.1?}",
            self.exit_code, self.elapsed
        )?;
        writeln!(f, "---- stdout (tail) ----\n{}", tail(&self.stdout))?;
        write!(f, "---- stderr (tail) ----\n{}", tail(&self.stderr))
    }
}

/// Bazel's count of spawns by runner, from its line
/// `INFO: 30 processes: 14 remote cache hit, 16 internal.`
///
/// Runner names seen with Bazel 4.2.3: `internal` (Bazel's own actions:
/// symlinks, manifests, stamping), `remote` (executed remotely),
/// `remote cache hit` (also disk cache hits), `linux-sandbox`,
/// `processwrapper-sandbox`, `local`, `worker`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProcessSummary {
    /// N in `N processes`.
    pub total: u64,
    /// Count per runner name.
    pub runners: BTreeMap<String, u64>,
}

impl ProcessSummary {
    /// Runner of spawns executed remotely.
    pub const REMOTE: &'static str = "remote";
    /// Runner of spawns answered by the (remote or disk) cache.
    pub const REMOTE_CACHE_HIT: &'static str = "remote cache hit";
    /// Runner of Bazel's in-process actions.
    pub const INTERNAL: &'static str = "internal";

    /// The last summary line in `output`.
    pub fn parse(output: &str) -> Option<ProcessSummary> {
        output.lines().rev().find_map(ProcessSummary::parse_line)
    }

    /// Parses `INFO: N process(es)[: C runner, C runner...].`.
    pub fn parse_line(line: &str) -> Option<ProcessSummary> {
        let rest = line.trim().strip_prefix("INFO: ")?.strip_suffix('.')?;
        let (head, list) = match rest.split_once(": ") {
            Some((head, list)) => (head, Some(list)),
            None => (rest, None),
        };
        let (total, word) = head.split_once(' ')?;
        if word != "process" && word != "processes" {
            return None;
        }
        let mut summary = ProcessSummary {
            total: total.parse().ok()?,
            runners: BTreeMap::new(),
        };
        for part in list.into_iter().flat_map(|list| list.split(", ")) {
            let (count, runner) = part.split_once(' ')?;
            *summary.runners.entry(runner.to_string()).or_default() += count.parse::<u64>().ok()?;
        }
        Some(summary)
    }

    /// Spawns counted for `runner`.
    pub fn count(&self, runner: &str) -> u64 {
        self.runners.get(runner).copied().unwrap_or(0)
    }

    /// Spawns executed remotely.
    pub fn remote(&self) -> u64 {
        self.count(Self::REMOTE)
    }

    /// Spawns answered by the cache.
    pub fn remote_cache_hits(&self) -> u64 {
        self.count(Self::REMOTE_CACHE_HIT)
    }

    /// Bazel's in-process actions.
    pub fn internal(&self) -> u64 {
        self.count(Self::INTERNAL)
    }

    /// Spawns that were real processes, wherever they ran: everything but `internal`.
    pub fn spawns(&self) -> u64 {
        self.runners
            .iter()
            .filter(|(runner, _)| *runner != Self::INTERNAL)
            .map(|(_, count)| count)
            .sum()
    }

    /// Spawns that ran on this machine (sandboxed or not), by runner.
    pub fn local(&self) -> BTreeMap<&str, u64> {
        self.runners
            .iter()
            .filter(|(runner, _)| {
                ![Self::INTERNAL, Self::REMOTE, Self::REMOTE_CACHE_HIT].contains(&runner.as_str())
            })
            .map(|(runner, count)| (runner.as_str(), *count))
            .collect()
    }
}

impl fmt::Display for ProcessSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} processes", self.total)?;
        let mut separator = ": ";
        for (runner, count) in &self.runners {
            write!(f, "{separator}{count} {runner}")?;
            separator = ", ";
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Lines as Bazel 4.2.3 printed them.
    #[test]
    fn local_build() {
        let summary =
            ProcessSummary::parse_line("INFO: 30 processes: 16 internal, 14 linux-sandbox.")
                .unwrap();
        assert_eq!(summary.total, 30);
        assert_eq!(summary.internal(), 16);
        assert_eq!(summary.spawns(), 14);
        assert_eq!(summary.local(), BTreeMap::from([("linux-sandbox", 14)]));
        assert_eq!(summary.remote(), 0);
    }

    #[test]
    fn cache_hits() {
        let summary =
            ProcessSummary::parse_line("INFO: 30 processes: 14 remote cache hit, 16 internal.")
                .unwrap();
        assert_eq!(summary.remote_cache_hits(), 14);
        assert_eq!(summary.spawns(), 14);
        assert!(summary.local().is_empty());
    }

    #[test]
    fn remote_and_singular_and_empty() {
        let summary =
            ProcessSummary::parse_line("INFO: 764 processes: 361 internal, 403 remote.").unwrap();
        assert_eq!((summary.remote(), summary.internal()), (403, 361));
        let one = ProcessSummary::parse_line("INFO: 1 process: 1 internal.").unwrap();
        assert_eq!((one.total, one.internal(), one.spawns()), (1, 1, 0));
        let none = ProcessSummary::parse_line("INFO: 0 processes.").unwrap();
        assert_eq!((none.total, none.runners.len()), (0, 0));
    }

    #[test]
    fn last_summary_of_an_output_wins_and_other_lines_are_ignored() {
        let output = "INFO: Elapsed time: 6.269s, Critical Path: 0.55s\n\
                      INFO: 3 processes: 3 internal.\n\
                      INFO: 2 processes: 2 linux-sandbox.\n\
                      INFO: Build completed successfully, 2 total actions\n";
        assert_eq!(
            ProcessSummary::parse(output)
                .unwrap()
                .count("linux-sandbox"),
            2
        );
        assert_eq!(ProcessSummary::parse("INFO: Found 6 targets...\n"), None);
    }

    #[test]
    fn display_round_trips() {
        let line = "INFO: 30 processes: 16 internal, 14 linux-sandbox.";
        let summary = ProcessSummary::parse_line(line).unwrap();
        assert_eq!(format!("INFO: {summary}."), line);
    }
}
