//! The rendered overlays played as pods with podman, on images built from
//! this checkout (`tests/podman/`, whose README says what differs from a
//! cluster).
//!
//! [`Podman::with_images`] runs `tests/podman/build-images.sh` (under its
//! lock; it rebuilds only when the binaries or the image files changed) and gives `podman` commands that use
//! the project's own containers.conf and storage under `target/podman`.
//! [`PlayedOverlay`] renders an overlay with `kubectl kustomize`, adds the
//! test patch, plays it, and removes every pod, container, volume and secret
//! it made when dropped.

mod certificates;
mod patch;
mod play;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context, Result};

pub use certificates::{CA_KEY, CERT_KEY, KEY_KEY};
pub use play::{Overlay, PlayedOverlay, Ports};

/// Tag of the images `tests/podman/build-images.sh` builds.
pub const IMAGE_TAG: &str = "local";
/// The server image: images/Dockerfile's `server-prebuilt`.
pub const SERVER_IMAGE: &str = "localhost/buildkube-server:local";
/// The worker image on Debian: images/Dockerfile's `worker-prebuilt`.
pub const WORKER_IMAGE: &str = "localhost/buildkube-worker:local";
/// The worker image the pods run: `worker-prebuilt` on the test toolchain.
pub const WORKER_TOOLCHAIN_IMAGE: &str = "localhost/buildkube-worker-toolchain:local";
/// Stands in for the production overlay's PostgreSQL image.
pub const POSTGRES_IMAGE: &str = "localhost/buildkube-test-postgres:local";
/// Stands in for the production overlay's Redis image.
pub const REDIS_IMAGE: &str = "localhost/buildkube-test-redis:local";

/// podman with the project-local configuration, the images built.
#[derive(Debug, Clone)]
pub struct Podman {
    dir: PathBuf,
}

impl Podman {
    /// Builds the images from this checkout (release binaries, debootstrap
    /// base cached in `target/podman`) unless they are up to date.
    /// Fails, saying what to install, where buildah, podman, runc or
    /// debootstrap are missing: these tests never pass without running.
    pub fn with_images() -> Result<Podman> {
        let target = target_dir();
        let script = repo_dir().join("tests/podman/build-images.sh");
        let mut command = Command::new("bash");
        command
            .arg(&script)
            .env("CARGO_TARGET_DIR", &target)
            .stdin(Stdio::null());
        eprintln!("$ bash {}", script.display());
        let status = command
            .status()
            .with_context(|| format!("running {}", script.display()))?;
        if !status.success() {
            bail!(
                "building the images failed ({status}): the podman tests need buildah, podman, runc and \
                 debootstrap as root (apt-get install -y buildah podman runc debootstrap), see tests/podman/README.md"
            );
        }
        let podman = Podman {
            dir: target.join("podman"),
        };
        podman.remove_leftovers();
        Ok(podman)
    }

    /// Removes the pods and volumes of test processes that are gone (a test
    /// killed by a timeout runs no Drop): their names end with
    /// `-t<pid>x<n>` (see [`PlayedOverlay`]), and nothing else makes any in
    /// this project-local store.
    fn remove_leftovers(&self) {
        for kind in ["pod", "volume"] {
            let names = self
                .run([kind, "ls", "--format", "{{.Name}}"])
                .unwrap_or_default();
            let stale: Vec<&str> = names
                .lines()
                .filter(|name| {
                    owner_pid(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
                })
                .collect();
            if stale.is_empty() {
                continue;
            }
            eprintln!("removing the {kind}s of finished test processes: {stale:?}");
            let mut args = vec![kind, "rm", "--force"];
            if kind == "pod" {
                args.extend(["--time", "0"]);
            }
            args.extend(stale);
            if let Err(e) = self.run(&args) {
                eprintln!("removing leftover {kind}s: {e:#}");
            }
        }
    }

    /// `podman` with CONTAINERS_CONF and CONTAINERS_STORAGE_CONF set.
    pub fn command(&self) -> Command {
        let mut command = Command::new("podman");
        command
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"))
            .stdin(Stdio::null());
        command
    }

    /// Runs `podman <args>`; its stdout, or an error with its stderr.
    pub fn run<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let line = format!("podman {}", display_args(&args));
        let output = self
            .command()
            .args(&args)
            .output()
            .with_context(|| format!("running {line}"))?;
        ensure_success(&line, &output)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `podman run --rm` of `image` with `entrypoint` and `args`: its stdout.
    pub fn run_image(&self, image: &str, entrypoint: &str, args: &[&str]) -> Result<String> {
        let mut all = vec![
            "run",
            "--rm",
            "--network=host",
            "--entrypoint",
            entrypoint,
            image,
        ];
        all.extend_from_slice(args);
        self.run(all)
    }
}

/// The test process that made a pod or volume named `…-t<pid>x<n>[-…]`.
fn owner_pid(name: &str) -> Option<u32> {
    name.split('-').find_map(|part| {
        let (pid, n) = part.strip_prefix('t')?.split_once('x')?;
        n.parse::<u32>().ok()?;
        pid.parse().ok()
    })
}

fn display_args(args: &[std::ffi::OsString]) -> String {
    args.iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn ensure_success(line: &str, output: &Output) -> Result<()> {
    if !output.status.success() {
        bail!(
            "`{line}` failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// The workspace root.
pub fn repo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

/// `$CARGO_TARGET_DIR`, else the `target/` holding the test executable.
fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    // target/<profile>/deps/<test-exe> -> target
    exe.ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| repo_dir().join("target"))
}
