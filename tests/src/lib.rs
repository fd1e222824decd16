//! Test support for buildkube's end-to-end tests.
//!
//! The tests drive real processes: [`Server`] runs `buildkube-server`,
//! [`Worker`] runs `buildkube-worker`, and [`Bazel`] runs the real Bazel
//! (4.2.3 from Debian's `bazel-bootstrap`) on a copy of the fixture
//! workspace `tests/fixtures/cc-workspace`, whose outputs [`fixture`]
//! recomputes independently. Everything binds `127.0.0.1` only, every port
//! is chosen by the kernel, and every process started here is killed when
//! its handle is dropped, also when a test panics.
//!
//! The binaries are found with [`bin_path`]; build them first with
//! `cargo build --workspace --bins` (the test command in the README does).

pub mod auth;
mod daemon;
pub mod fixture;
pub mod git_servers;
mod http;
pub mod jobs;
pub mod operations;
mod pki;
pub mod podman;
mod proxy;

mod bazel;
mod server;
mod worker;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use auth::TestCredentials;
pub use bazel::{
    copy_tree, offline_bazelrc, remote_cache_flags, remote_execution_flags, Bazel, BazelRun,
    ProcessSummary, BAZEL_ENV,
};
pub use daemon::LogFiles;
pub use http::{http_get, http_get_with, http_post, HttpResponse};
pub use jobs::{job_finished, watch_job_until};
pub use pki::TestPki;
pub use proxy::TcpProxy;
pub use server::Server;
pub use worker::{Worker, DEFAULT_TEST_CONCURRENCY};

/// Environment variable naming the folder that holds the buildkube binaries,
/// instead of the `target/<profile>/` beside the test executable.
pub const BIN_DIR_ENV: &str = "BUILDKUBE_BIN_DIR";

/// Path of the buildkube binary `name` (e.g. `buildkube-server`).
///
/// Looks in `$BUILDKUBE_BIN_DIR` if set, else in `target/<profile>/`, the
/// parent of the `deps/` folder the test executable runs from.
///
/// # Panics
/// If the binary is missing, with the command that builds it.
pub fn bin_path(name: &str) -> PathBuf {
    let dir = match std::env::var_os(BIN_DIR_ENV) {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().expect("the test executable's path");
            // target/<profile>/deps/<test-exe> -> target/<profile>
            exe.parent()
                .and_then(Path::parent)
                .expect("the test executable lives in target/<profile>/deps")
                .to_path_buf()
        }
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "binary `{name}` not found at {}: run `cargo build --workspace --bins` first \
         (or set {BIN_DIR_ENV} to the folder holding it)",
        path.display()
    );
    path
}

/// Folder of this crate's fixtures (`tests/fixtures`).
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Calls `probe` (every 10 ms, backing off to every 200 ms) until it returns `Some` or `timeout`
/// passes; the error names `what` was awaited.
pub fn poll_until<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(10);
    loop {
        if let Some(value) = probe()? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Pids of live processes whose working directory is under `dir`, e.g. the
/// commands a worker runs in its work dir, their children included.
pub fn processes_under(dir: &Path) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let cwd = std::fs::read_link(entry.path().join("cwd")).ok()?;
            cwd.starts_with(dir).then_some(pid)
        })
        .collect()
}
