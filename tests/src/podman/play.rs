//! One overlay played as pods: rendered, patched, played, and removed on drop.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::unistd::Pid;
use serde::Deserialize as _;
use serde_yaml::Value;
use tempfile::TempDir;

use super::certificates::{self, IssuedSecret};
use super::{patch, repo_dir, Podman};
use crate::{http_get_with, poll_until};

/// The overlays the tests play.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlay {
    /// `overlays/example`: server and workers.
    Example,
    /// `overlays/production`: also PostgreSQL and Redis.
    Production,
}

impl Overlay {
    fn dir(self) -> &'static str {
        match self {
            Overlay::Example => "overlays/example",
            Overlay::Production => "overlays/production",
        }
    }
}

/// Loopback ports of one played overlay, free when chosen (pods run with
/// hostNetwork, so tests running side by side must not share them).
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    /// The server's gRPC port (`--listen`).
    pub grpc: u16,
    /// The server's HTTP port (`--http-listen`: /readyz, /operations).
    pub http: u16,
    /// The server's metrics port (`--metrics-listen`: /metrics).
    pub metrics: u16,
    /// The worker's HTTP port.
    pub worker_http: u16,
    /// PostgreSQL's port (production).
    pub postgres: u16,
    /// Redis's port (production).
    pub redis: u16,
}

impl Ports {
    fn choose() -> Result<Ports> {
        // Held together so that the kernel hands out six distinct ports.
        let listeners = (0..6)
            .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
            .collect::<std::io::Result<Vec<_>>>()?;
        let port = |i: usize| listeners[i].local_addr().map(|a| a.port());
        Ok(Ports {
            grpc: port(0)?,
            http: port(1)?,
            worker_http: port(2)?,
            postgres: port(3)?,
            redis: port(4)?,
            metrics: port(5)?,
        })
    }
}

/// An overlay running as pods; every pod, container, volume and secret it
/// made is removed on drop, also when the test fails.
#[derive(Debug)]
pub struct PlayedOverlay {
    podman: Podman,
    /// Every name podman gives this overlay's objects ends with it.
    suffix: String,
    dir: TempDir,
    played: PathBuf,
    ports: Ports,
    token: String,
    issued: Vec<IssuedSecret>,
    tls: bool,
}

impl PlayedOverlay {
    /// `kubectl kustomize` of `overlay`, the test patch on top (see
    /// tests/podman/README.md), then `podman kube play`.
    pub fn play(podman: &Podman, overlay: Overlay) -> Result<PlayedOverlay> {
        let name = overlay.dir().trim_start_matches("overlays/");
        Self::play_from(podman, &repo_dir().join("overlays"), name, &BTreeMap::new())
    }

    /// [`PlayedOverlay::play`] of overlay `name` of the `overlays/` tree at
    /// `overlays` (e.g. what `manifests-gen --config … --out` wrote), with
    /// `secrets` (file name under its `secrets/` → contents) filled in
    /// before the tokens and passwords.
    pub fn play_from(
        podman: &Podman,
        overlays: &Path,
        name: &str,
        secrets: &BTreeMap<String, String>,
    ) -> Result<PlayedOverlay> {
        static PLAYED: AtomicUsize = AtomicUsize::new(0);
        let suffix = format!(
            "t{}x{}",
            std::process::id(),
            PLAYED.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::Builder::new()
            .prefix("buildkube-podman-")
            .tempdir()?;
        let overlay_dir = stage_overlays(dir.path(), overlays, name, secrets)?;
        let rendered = kustomize(&overlay_dir)?;
        std::fs::write(dir.path().join("rendered.yaml"), &rendered)?;
        let token = auth_token(&rendered)?;
        let ports = Ports::choose()?;
        let issued = certificates::issue(&patch::parse(&rendered)?)?;
        for (file, contents) in patch::kustomization(&rendered, &ports, &suffix, &issued)? {
            std::fs::write(dir.path().join(&file), contents)
                .with_context(|| format!("writing {file}"))?;
        }
        let played_yaml = kustomize(dir.path())?;
        let played = dir.path().join("played.yaml");
        std::fs::write(&played, played_yaml)?;
        let this = PlayedOverlay {
            podman: podman.clone(),
            suffix,
            dir,
            played,
            ports,
            token,
            issued,
            tls: rendered.contains("--tls-cert-file="),
        };
        eprintln!(
            "playing {} as pods (suffix {}, ports {:?}; files in {})",
            overlay_dir.display(),
            this.suffix,
            this.ports,
            this.dir.path().display()
        );
        this.podman.run([
            "kube".as_ref(),
            "play".as_ref(),
            "--quiet".as_ref(),
            this.played.as_os_str(),
        ])?;
        Ok(this)
    }

    /// What podman's names of this overlay's objects end with.
    pub fn suffix(&self) -> &str {
        &self.suffix
    }

    /// `terminationGracePeriodSeconds` of `workload` as played.
    pub fn termination_grace_secs(&self, workload: &str) -> Result<u64> {
        let played = std::fs::read_to_string(&self.played)?;
        for document in serde_yaml::Deserializer::from_str(&played) {
            let object = Value::deserialize(document)?;
            let name = object["metadata"]["name"].as_str().unwrap_or_default();
            if object["kind"] == "Deployment" && name == format!("{workload}-{}", self.suffix) {
                return object["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
                    .as_u64()
                    .with_context(|| format!("{workload} has no terminationGracePeriodSeconds"));
            }
        }
        bail!("no Deployment {workload} in {}", self.played.display())
    }

    /// The loopback ports of the pods.
    pub fn ports(&self) -> Ports {
        self.ports
    }

    /// CI's bearer token from the generated Secret `buildkube-client-tokens`.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Key `key` of the Secret `secret` that the test issued in cert-manager's
    /// place (e.g. `buildkube-client-tls`, `tls.crt`), written to a file.
    pub fn issued_file(&self, secret: &str, key: &str) -> Result<PathBuf> {
        let issued = self
            .issued
            .iter()
            .find(|s| s.name == secret)
            .with_context(|| format!("no Certificate of the overlay makes Secret {secret}"))?;
        let pem = issued
            .data
            .get(key)
            .with_context(|| format!("Secret {secret} has no {key}"))?;
        let dir = self.dir.path().join("issued").join(secret);
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(key);
        std::fs::write(&path, pem).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Whether the server pod's listeners speak TLS (`--tls-cert-file`).
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// The gRPC URL of the server pod, for Bazel (`grpcs://` with TLS).
    pub fn grpc_url(&self) -> String {
        let scheme = if self.tls { "grpcs" } else { "grpc" };
        format!("{scheme}://127.0.0.1:{}", self.ports.grpc)
    }

    /// The name podman gave the pod of `workload` (e.g. `buildkube-server`).
    pub fn pod(&self, workload: &str) -> String {
        format!("{workload}-{}-pod-0", self.suffix)
    }

    /// The container `container` of `workload`'s pod.
    pub fn container(&self, workload: &str, container: &str) -> String {
        format!("{}-{container}", self.pod(workload))
    }

    /// GET `path` on the server pod's HTTP port, with CI's token.
    pub fn server_http(&self, path: &str) -> Result<crate::HttpResponse> {
        http_get_with(
            SocketAddr::from((Ipv4Addr::LOCALHOST, self.ports.http)),
            path,
            Some(&self.token),
            Duration::from_secs(5),
        )
    }

    /// Waits until the server pod answers /readyz with 200 (on its metrics
    /// port: plain HTTP also where the HTTP port speaks TLS, as probes do).
    pub fn wait_until_server_ready(&self, timeout: Duration) -> Result<()> {
        poll_until("the server pod's /readyz", timeout, || {
            Ok(http_get_with(
                SocketAddr::from((Ipv4Addr::LOCALHOST, self.ports.metrics)),
                buildkube_config::READYZ_PATH,
                None,
                Duration::from_secs(5),
            )
            .ok()
            .filter(|r| r.status == 200))
        })
        .with_context(|| self.logs())?;
        Ok(())
    }

    /// The server pod's recent operations (up to 10,000), newest first.
    pub fn operations(&self) -> Result<Vec<crate::operations::Operation>> {
        let path = format!("{}?limit=10000", crate::operations::OPERATIONS_PATH);
        let response = self.server_http(&path)?;
        if response.status != 200 {
            bail!("{path} answered {}: {}", response.status, response.body);
        }
        serde_json::from_str(&response.body).with_context(|| format!("parsing {path}"))
    }

    /// GET /metrics on the server pod's metrics port.
    fn server_metrics(&self) -> Result<crate::HttpResponse> {
        http_get_with(
            SocketAddr::from((Ipv4Addr::LOCALHOST, self.ports.metrics)),
            buildkube_config::METRICS_PATH,
            None,
            Duration::from_secs(5),
        )
    }

    /// The sum of the server's Prometheus metric `name` (0 if absent).
    pub fn metric(&self, name: &str) -> Result<f64> {
        let response = self.server_metrics()?;
        Ok(crate::server::sum_metric(&response.body, name).unwrap_or(0.0))
    }

    /// Waits until the server's metrics count `count` connected workers.
    pub fn wait_for_workers(&self, count: usize, timeout: Duration) -> Result<()> {
        let metric = buildkube_config::METRIC_WORKERS_CONNECTED;
        poll_until(&format!("{count} worker(s) in {metric}"), timeout, || {
            let Ok(response) = self.server_metrics() else {
                return Ok(None);
            };
            Ok(crate::server::sum_metric(&response.body, metric).filter(|n| *n >= count as f64))
        })
        .with_context(|| self.logs())?;
        Ok(())
    }

    /// `podman <args>` with this overlay's configuration.
    pub fn podman(&self) -> &Podman {
        &self.podman
    }

    /// The host pid of `program` (e.g. `buildkube-server`), which
    /// `workload`'s container `container` runs under tini, for signals
    /// from the host as a crash or the kernel's OOM killer would send.
    pub fn main_pid(&self, workload: &str, container: &str, program: &str) -> Result<Pid> {
        let name = self.container(workload, container);
        let init: u32 = self
            .inspect(&name, "{{.State.Pid}}")?
            .parse()
            .with_context(|| format!("{name} is not running"))?;
        let children = std::fs::read_to_string(format!("/proc/{init}/task/{init}/children"))
            .with_context(|| format!("reading the children of {name}'s init (pid {init})"))?;
        let pid = children
            .split_whitespace()
            .filter_map(|pid| pid.parse::<i32>().ok())
            .find(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                    cmdline
                        .split(|b| *b == 0)
                        .next()
                        .is_some_and(|arg0| arg0.ends_with(program.as_bytes()))
                })
            })
            .with_context(|| {
                format!(
                    "no {program} among the children ({children:?}) of {name}'s init (pid {init})"
                )
            })?;
        Ok(Pid::from_raw(pid))
    }

    /// How many times podman restarted `workload`'s container `container`.
    pub fn restart_count(&self, workload: &str, container: &str) -> Result<u64> {
        let name = self.container(workload, container);
        let count = self.inspect(&name, "{{.RestartCount}}")?;
        count
            .parse()
            .with_context(|| format!("{name}'s restart count {count:?}"))
    }

    /// Waits until podman has restarted `workload`'s container `container`
    /// more than `before` times and it runs. The played pods' containers
    /// have restart policy `always` (kube play's reading of the pod
    /// template's `restartPolicy: Always`): when their program dies, podman
    /// starts the container again in its pod, on the same volumes, as the
    /// kubelet would.
    ///
    /// (Not `podman pod kill` and `podman pod start`: podman 4.3 cleans up a
    /// killed container asynchronously, in conmon's exit command, and that
    /// cleanup applies the pod's exit policy, `stop` for kube play's pods,
    /// without looking at the container's new state: run after the `pod
    /// start`, it stops the pod just started (`pod stop` in the events log
    /// right after `pod start`, the server logging SIGTERM), and nothing
    /// starts it again.)
    pub fn await_restart(
        &self,
        workload: &str,
        container: &str,
        before: u64,
        timeout: Duration,
    ) -> Result<()> {
        let name = self.container(workload, container);
        poll_until(&format!("podman restarting {name}"), timeout, || {
            let restarted = self.restart_count(workload, container)? > before
                && self.inspect(&name, "{{.State.Status}}")? == "running";
            Ok(restarted.then_some(()))
        })
        .with_context(|| self.logs())?;
        Ok(())
    }

    /// `podman inspect --format FORMAT NAME`, trimmed.
    fn inspect(&self, name: &str, format: &str) -> Result<String> {
        Ok(self
            .podman
            .run(["inspect", "--format", format, name])?
            .trim()
            .to_string())
    }

    /// The exit code of a container that has stopped.
    pub fn exit_code(&self, container: &str) -> Result<i64> {
        let out = self.podman.run([
            "inspect",
            "--format",
            "{{.State.Status}} {{.State.ExitCode}}",
            container,
        ])?;
        let (status, code) = out
            .trim()
            .split_once(' ')
            .with_context(|| format!("podman inspect said {out:?}"))?;
        if status != "exited" && status != "stopped" {
            bail!("{container} has not stopped: {status}");
        }
        code.parse().with_context(|| format!("exit code {code:?}"))
    }

    /// The last lines of every container's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let names = self
            .podman
            .run(["ps", "-a", "--format", "{{.Names}}"])
            .unwrap_or_default();
        for name in names.lines().filter(|n| n.contains(&self.suffix)) {
            let mut command = self.podman.command();
            command.args(["logs", "--tail", "40", name]);
            let logs = command.output().map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            });
            out.push_str(&format!(
                "---- podman logs {name} (tail) ----\n{}\n",
                logs.unwrap_or_default()
            ));
        }
        out
    }

    /// Names of podman objects of `kind` (pod, volume, secret) of this overlay.
    fn owned(&self, kind: &str) -> Vec<String> {
        self.podman
            .run([kind, "ls", "--format", "{{.Name}}"])
            .unwrap_or_default()
            .lines()
            .filter(|n| n.contains(&self.suffix))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for PlayedOverlay {
    fn drop(&mut self) {
        eprintln!("{}", self.logs());
        let pods = self.owned("pod");
        if !pods.is_empty() {
            let mut args = vec!["pod", "rm", "--force", "--time", "0"];
            args.extend(pods.iter().map(String::as_str));
            if let Err(e) = self.podman.run(&args) {
                eprintln!("removing pods: {e:#}");
            }
        }
        for kind in ["volume", "secret"] {
            let names = self.owned(kind);
            if names.is_empty() {
                continue;
            }
            let mut args = vec![kind, "rm"];
            if kind == "volume" {
                args.push("--force");
            }
            args.extend(names.iter().map(String::as_str));
            if let Err(e) = self.podman.run(&args) {
                eprintln!("removing {kind}s: {e:#}");
            }
        }
    }
}

/// The `overlays/` tree at `overlays` copied into `dir`, the secrets of
/// overlay `name` filled in as a user does (overlays/*/README.md): the
/// files of `secrets` as given, random tokens, passwords and webhook
/// secrets instead of the placeholders, which the server refuses (every
/// token is the same; a webhook secret's placeholder is empty).
/// Returns the copy of the overlay's directory.
fn stage_overlays(
    dir: &Path,
    overlays: &Path,
    name: &str,
    secrets: &BTreeMap<String, String>,
) -> Result<PathBuf> {
    let copy = dir.join("overlays");
    copy_dir(overlays, &copy)?;
    let overlay_dir = copy.join(name);
    let secrets_dir = overlay_dir.join("secrets");
    for entry in std::fs::read_dir(&secrets_dir)
        .with_context(|| format!("reading {}", secrets_dir.display()))?
    {
        let entry = entry?;
        let file = entry.file_name().to_string_lossy().into_owned();
        let value = if let Some(value) = secrets.get(&file) {
            value.clone()
        } else if file.ends_with("-token")
            || file.ends_with("-password")
            || file.ends_with("-secret")
        {
            format!("{}\n", random_hex(32)?)
        } else {
            bail!("overlay {name}: the podman test gave no value for secrets/{file}");
        };
        std::fs::write(entry.path(), value)?;
    }
    Ok(overlay_dir)
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// `bytes` random bytes from the OS, as hex (`openssl rand -hex`).
fn random_hex(bytes: usize) -> Result<String> {
    let mut buffer = vec![0u8; bytes];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut buffer)?;
    Ok(buffer.iter().map(|b| format!("{b:02x}")).collect())
}

/// `kubectl kustomize DIR`.
fn kustomize(dir: &Path) -> Result<String> {
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .context("running `kubectl kustomize` (kubectl is required)")?;
    if !output.status.success() {
        bail!(
            "kubectl kustomize {} failed:\n{}",
            dir.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8(output.stdout)?)
}

/// The Secret of the clients' tokens (kustomize adds a content hash to its name).
const CLIENT_TOKENS_SECRET: &str = "buildkube-client-tokens";
/// The client whose token Bazel sends: CI's (read, write-cas, write-ac, execute).
const CLIENT: &str = "ci";

/// The token of client [`CLIENT`] in the generated client tokens Secret.
fn auth_token(rendered: &str) -> Result<String> {
    for document in serde_yaml::Deserializer::from_str(rendered) {
        let object = Value::deserialize(document)?;
        let is_tokens = object["kind"] == "Secret"
            && object["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with(CLIENT_TOKENS_SECRET));
        if !is_tokens {
            continue;
        }
        let encoded = object["data"][CLIENT]
            .as_str()
            .with_context(|| format!("the Secret {CLIENT_TOKENS_SECRET} has no data.{CLIENT}"))?;
        let decoded = base64_decode(encoded)?;
        return Ok(String::from_utf8(decoded)?.trim().to_string());
    }
    bail!("the rendered overlay has no Secret {CLIENT_TOKENS_SECRET}")
}

pub(super) fn base64_decode(text: &str) -> Result<Vec<u8>> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut buffer, mut bits) = (0u32, 0);
    for byte in text
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b'=')
    {
        let value = ALPHABET
            .iter()
            .position(|&c| c == byte)
            .with_context(|| format!("not base64: {:?}", byte as char))? as u32;
        buffer = (buffer << 6) | value;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
        }
    }
    Ok(out)
}
