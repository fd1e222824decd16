//! `buildkube-server` as a child process on kernel-chosen loopback ports.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, ExitStatus};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use buildkube_config::{ServerArgs, METRICS_PATH, METRIC_WORKERS_CONNECTED, READYZ_PATH};
use tempfile::TempDir;

use crate::daemon::{Daemon, LogFiles};
use crate::http::{http_get, http_get_with, HttpResponse};
use crate::operations::{Operation, OPERATIONS_PATH};
use crate::{bin_path, poll_until};

/// How long a server may take from spawn to answering /readyz with 200.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a graceful stop may take before the server is SIGKILLed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one HTTP request to the server.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// A running `buildkube-server`, killed on drop.
///
/// It listens on `127.0.0.1` ports chosen by the kernel, reported through
/// `--addr-file`, and is ready (its /readyz answered 200) once a constructor
/// returns. Its data dir is a temp dir unless one is given; restarts keep it.
#[derive(Debug)]
pub struct Server {
    args: ServerArgs,
    daemon: Option<Daemon>,
    addrs: ServerAddrs,
    logs: LogFiles,
    /// Holds the addr file, the logs and (by default) the data dir.
    scratch: TempDir,
}

/// The addresses a running server listens on, from its addr file.
#[derive(Debug, Clone, Copy)]
struct ServerAddrs {
    grpc: SocketAddr,
    http: SocketAddr,
    metrics: SocketAddr,
}

fn loopback_any_port() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)
}

impl Server {
    /// Starts a server serving the default instance with a fresh data dir.
    pub fn start() -> Result<Server> {
        Server::start_with(|_| {})
    }

    /// Starts a server whose data lives in `data_dir` (kept after drop), e.g.
    /// to start a second server on the data of a first one.
    pub fn start_in(data_dir: &Path) -> Result<Server> {
        let data_dir = data_dir.to_path_buf();
        Server::start_with(move |args| args.data_dir = data_dir)
    }

    /// Starts a server after `configure` adjusted its arguments. The harness
    /// has already set loopback port-0 listeners, a temp data dir and the addr
    /// file; `configure` may change any of them.
    pub fn start_with(configure: impl FnOnce(&mut ServerArgs)) -> Result<Server> {
        Server::spawn(configure, Readiness::Ready)
    }

    /// Like [`Server::start_with`], but returns once the server listens
    /// (its addr file is written), before it is ready: storage may still be
    /// opening. [`Server::wait_ready`] waits for the rest.
    pub fn start_listening_with(configure: impl FnOnce(&mut ServerArgs)) -> Result<Server> {
        Server::spawn(configure, Readiness::Listening)
    }

    /// Waits until /readyz answers 200.
    pub fn wait_ready(&mut self) -> Result<()> {
        let daemon = self.daemon.as_mut().context("the server is not running")?;
        wait_until_ready(daemon, self.addrs.metrics)
            .with_context(|| format!("server logs:\n{}", self.logs.tail(40)))
    }

    fn spawn(configure: impl FnOnce(&mut ServerArgs), readiness: Readiness) -> Result<Server> {
        let scratch = tempfile::Builder::new()
            .prefix("buildkube-server-")
            .tempdir()
            .context("creating the server's temp dir")?;
        let mut args = ServerArgs {
            listen: loopback_any_port(),
            http_listen: loopback_any_port(),
            metrics_listen: loopback_any_port(),
            data_dir: scratch.path().join("data"),
            addr_file: Some(scratch.path().join("addr")),
            ..ServerArgs::default()
        };
        configure(&mut args);
        let logs = LogFiles::in_dir(scratch.path(), "server");
        let (daemon, addrs) = launch(&args, &logs, readiness)?;
        Ok(Server {
            args,
            daemon: Some(daemon),
            addrs,
            logs,
            scratch,
        })
    }

    /// Address of the gRPC listener (REAPI and the worker protocol).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.addrs.grpc
    }

    /// Address of the HTTP listener (/healthz, /readyz, /operations).
    pub fn http_addr(&self) -> SocketAddr {
        self.addrs.http
    }

    /// Address of the metrics listener (/metrics, /healthz, /readyz; plain HTTP).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.addrs.metrics
    }

    /// Whether the server's listeners speak TLS (`--tls-cert-file` is set).
    pub fn tls(&self) -> bool {
        self.args.tls.tls_cert_file.is_some()
    }

    /// `grpc://127.0.0.1:PORT` (`grpcs://` with TLS), as Bazel's
    /// `--remote_executor` wants it.
    pub fn grpc_url(&self) -> String {
        let scheme = if self.tls() { "grpcs" } else { "grpc" };
        format!("{scheme}://{}", self.addrs.grpc)
    }

    /// `http://127.0.0.1:PORT` (`https://` with TLS) of the gRPC listener, as
    /// the worker's `--server` wants it.
    pub fn worker_endpoint(&self) -> String {
        let scheme = if self.tls() { "https" } else { "http" };
        format!("{scheme}://{}", self.addrs.grpc)
    }

    /// `http://127.0.0.1:PORT` of the HTTP listener.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addrs.http)
    }

    /// The arguments the server runs with (ports as first requested).
    pub fn args(&self) -> &ServerArgs {
        &self.args
    }

    /// The server's data dir.
    pub fn data_dir(&self) -> &Path {
        &self.args.data_dir
    }

    /// A scratch dir that lives as long as the server, e.g. for a token file.
    pub fn scratch_dir(&self) -> &Path {
        self.scratch.path()
    }

    /// The server's stdout and stderr files (all generations, on restart).
    pub fn logs(&self) -> &LogFiles {
        &self.logs
    }

    /// The server process's resident memory (VmRSS), in bytes.
    pub fn rss_bytes(&self) -> Result<u64> {
        let daemon = self.daemon.as_ref().context("the server is not running")?;
        let path = format!("/proc/{}/status", daemon.pid());
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no VmRSS in {path}"))?;
        Ok(kib * 1024)
    }

    /// `GET path` on the HTTP listener.
    pub fn http_get(&self, path: &str) -> Result<HttpResponse> {
        http_get(self.addrs.http, path, HTTP_TIMEOUT)
    }

    /// `GET path` on the metrics listener.
    pub fn metrics_get(&self, path: &str) -> Result<HttpResponse> {
        http_get(self.addrs.metrics, path, HTTP_TIMEOUT)
    }

    /// `GET path` on the HTTP listener with `authorization: Bearer TOKEN`.
    pub fn http_get_as(&self, path: &str, token: &str) -> Result<HttpResponse> {
        http_get_with(self.addrs.http, path, Some(token), HTTP_TIMEOUT)
    }

    /// The server's recent operations (up to 10,000), newest first.
    pub fn operations(&self) -> Result<Vec<Operation>> {
        let path = format!("{OPERATIONS_PATH}?limit=10000");
        let response = self.http_get(&path)?;
        if response.status != 200 {
            bail!("{path} answered {}: {}", response.status, response.body);
        }
        serde_json::from_str(&response.body).with_context(|| format!("parsing {path}"))
    }

    /// Sum of all samples of the Prometheus metric `name` in /metrics, or
    /// `None` if the metric is absent.
    pub fn metric(&self, name: &str) -> Result<Option<f64>> {
        let response = self.metrics_get(METRICS_PATH)?;
        if response.status != 200 {
            bail!(
                "{METRICS_PATH} answered {}: {}",
                response.status,
                response.body
            );
        }
        Ok(sum_metric(&response.body, name))
    }

    /// Waits until /metrics reports at least `count` connected workers.
    pub fn wait_for_workers(&self, count: usize, timeout: Duration) -> Result<()> {
        poll_until(
            &format!("{count} worker(s) in {METRIC_WORKERS_CONNECTED}"),
            timeout,
            || {
                Ok(self
                    .metric(METRIC_WORKERS_CONNECTED)?
                    .filter(|n| *n >= count as f64))
            },
        )
        .with_context(|| format!("server logs:\n{}", self.logs.tail(40)))?;
        Ok(())
    }

    /// Stops the server with SIGTERM and starts it again on the same data dir
    /// and, if they are still free, the same ports.
    pub fn restart(&mut self) -> Result<()> {
        self.terminate()?;
        self.start_again()
    }

    /// SIGKILLs the server (a crash) and starts it again like [`Server::restart`].
    pub fn kill_and_restart(&mut self) -> Result<()> {
        self.kill()?;
        self.start_again()
    }

    /// SIGTERM and wait (SIGKILL after 30 s, which is an error).
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        let daemon = self.daemon.as_mut().context("the server is not running")?;
        let status = daemon.terminate(STOP_TIMEOUT);
        self.daemon = None;
        status
    }

    /// SIGKILL and wait.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        let mut daemon = self.daemon.take().context("the server is not running")?;
        daemon.kill()
    }

    /// Whether the server process is still running.
    pub fn is_running(&mut self) -> Result<bool> {
        match &mut self.daemon {
            Some(daemon) => Ok(daemon.exit_status()?.is_none()),
            None => Ok(false),
        }
    }

    /// Starts a server stopped by [`Server::terminate`] or [`Server::kill`]
    /// again, on its data dir and, if they are still free, its ports.
    pub fn start_again(&mut self) -> Result<()> {
        let mut args = self.args.clone();
        args.listen = self.addrs.grpc;
        args.http_listen = self.addrs.http;
        args.metrics_listen = self.addrs.metrics;
        let (daemon, addrs) = match launch(&args, &self.logs, Readiness::Ready) {
            Ok(started) => started,
            Err(same_ports) => {
                // Most likely a port was taken meanwhile: any port will do.
                eprintln!(
                    "restart on the previous ports failed ({same_ports:#}); retrying on new ports"
                );
                args.listen = loopback_any_port();
                args.http_listen = loopback_any_port();
                args.metrics_listen = loopback_any_port();
                launch(&args, &self.logs, Readiness::Ready)?
            }
        };
        self.daemon = Some(daemon);
        self.addrs = addrs;
        Ok(())
    }
}

/// How far [`launch`] waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Readiness {
    /// Until the addr file names the bound ports.
    Listening,
    /// Until /readyz answers 200.
    Ready,
}

/// Spawns the server and waits for its addr file and, for
/// [`Readiness::Ready`], a 200 from /readyz.
fn launch(
    args: &ServerArgs,
    logs: &LogFiles,
    readiness: Readiness,
) -> Result<(Daemon, ServerAddrs)> {
    let addr_file = args
        .addr_file
        .clone()
        .context("the harness needs --addr-file to learn the ports")?;
    match std::fs::remove_file(&addr_file) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", addr_file.display())),
    }
    let mut command = Command::new(bin_path("buildkube-server"));
    command.args(args.to_args()).env("RUST_BACKTRACE", "1");
    let mut daemon = Daemon::spawn("buildkube-server", command, logs)?;

    let started = wait_for_addr_file(&mut daemon, &addr_file).and_then(|addrs| {
        if readiness == Readiness::Ready {
            wait_until_ready(&mut daemon, addrs.metrics)?;
        }
        Ok(addrs)
    });
    match started {
        Ok(addrs) => Ok((daemon, addrs)),
        Err(e) => {
            drop(daemon);
            Err(e).with_context(|| {
                format!(
                    "starting buildkube-server {:?}; its logs:\n{}",
                    args.to_args(),
                    logs.tail(40)
                )
            })
        }
    }
}

/// Waits for the addr file (written once all ports are bound); fails early
/// if the server exits.
fn wait_for_addr_file(daemon: &mut Daemon, addr_file: &Path) -> Result<ServerAddrs> {
    poll_until("the server's addr file", START_TIMEOUT, || {
        if let Some(status) = daemon.exit_status()? {
            bail!("buildkube-server exited with {status} before writing its addr file");
        }
        read_addr_file(addr_file)
    })
}

/// Waits for /readyz on the metrics listener (plain HTTP whatever the TLS
/// settings) to answer 200; fails early if the server exits.
fn wait_until_ready(daemon: &mut Daemon, metrics_addr: SocketAddr) -> Result<()> {
    poll_until("the server's /readyz to answer 200", START_TIMEOUT, || {
        if let Some(status) = daemon.exit_status()? {
            bail!("buildkube-server exited with {status} before it was ready");
        }
        Ok(http_get(metrics_addr, READYZ_PATH, HTTP_TIMEOUT)
            .ok()
            .filter(|response| response.status == 200))
    })?;
    Ok(())
}

/// Parses the addr file (`grpc=`, `http=` and `metrics=` lines); `None` until it exists.
fn read_addr_file(path: &Path) -> Result<Option<ServerAddrs>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    parse_addr_file(&text)
        .with_context(|| format!("parsing {}: {text:?}", path.display()))
        .map(Some)
}

fn parse_addr_file(text: &str) -> Result<ServerAddrs> {
    let mut grpc = None;
    let mut http = None;
    let mut metrics = None;
    for line in text.lines().map(str::trim).filter(|line| !line.is_empty()) {
        let (key, value) = line
            .split_once('=')
            .with_context(|| format!("line `{line}` is not key=addr"))?;
        let addr: SocketAddr = value
            .parse()
            .with_context(|| format!("`{value}` is not an address"))?;
        match key {
            "grpc" => grpc = Some(addr),
            "http" => http = Some(addr),
            "metrics" => metrics = Some(addr),
            _ => {} // later additions are fine
        }
    }
    Ok(ServerAddrs {
        grpc: grpc.context("no grpc= line")?,
        http: http.context("no http= line")?,
        metrics: metrics.context("no metrics= line")?,
    })
}

/// Sum of the samples of metric `name` in Prometheus text format.
pub(crate) fn sum_metric(text: &str, name: &str) -> Option<f64> {
    let mut total = None;
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // The name must end here: `{labels} value` or ` value`.
        let value_part = if rest.starts_with('{') {
            match rest.rfind('}') {
                Some(end) => &rest[end + 1..],
                None => continue,
            }
        } else if rest.starts_with(' ') {
            rest
        } else {
            continue;
        };
        if let Some(value) = value_part
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *total.get_or_insert(0.0) += value;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addr_file() {
        let addrs =
            parse_addr_file("grpc=127.0.0.1:4001\nhttp=127.0.0.1:4002\nmetrics=127.0.0.1:4003\n")
                .unwrap();
        assert_eq!(addrs.grpc.port(), 4001);
        assert_eq!(addrs.http.port(), 4002);
        assert_eq!(addrs.metrics.port(), 4003);
        assert!(parse_addr_file("grpc=127.0.0.1:4001\nhttp=127.0.0.1:4002\n").is_err());
        assert!(parse_addr_file("grpc=nowhere\nhttp=127.0.0.1:1\nmetrics=127.0.0.1:2\n").is_err());
    }

    #[test]
    fn metrics_sum_over_labels_and_skip_prefixes() {
        let text = "# HELP buildkube_workers_connected x\n\
                    # TYPE buildkube_workers_connected gauge\n\
                    buildkube_workers_connected 2\n\
                    buildkube_workers_connected_total 40\n\
                    buildkube_queue_depth{instance=\"main\",platform=\"\"} 3\n\
                    buildkube_queue_depth{instance=\"ci\",platform=\"a}b\"} 4\n";
        assert_eq!(sum_metric(text, "buildkube_workers_connected"), Some(2.0));
        assert_eq!(sum_metric(text, "buildkube_queue_depth"), Some(7.0));
        assert_eq!(sum_metric(text, "buildkube_workers_busy"), None);
    }
}
