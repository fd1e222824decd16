//! The one source of truth for buildkube's names, ports and flags.
//!
//! The server and worker binaries parse their command lines with [`ServerArgs`]
//! and [`WorkerArgs`]; `manifests-gen` builds the same structs and renders them
//! back into container arguments with `to_args`, so a flag used in a manifest
//! always exists in the binary, and a default port is written down once.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, ValueEnum};

pub mod auth;
pub mod jobs;
pub mod storage;

pub use jobs::{ClientArgs, JobArgs, WebhookCloneUrl};

/// Default gRPC port of the server (REAPI and the worker protocol).
pub const DEFAULT_GRPC_PORT: u16 = 8980;
/// Default HTTP port of the server (`/healthz`, `/readyz`, `/metrics`, `/operations`).
pub const DEFAULT_HTTP_PORT: u16 = 8080;
/// HTTP port of a worker in a pod (`/healthz`, `/readyz`, `/metrics`), where
/// probes need a fixed port. The binary's own default is an ephemeral port,
/// so several workers can share a host.
pub const DEFAULT_WORKER_HTTP_PORT: u16 = 8081;
/// Default port of the server's metrics listener (`/metrics`, `/healthz`,
/// `/readyz`; plain HTTP, so Prometheus and the kubelet need no certificate).
pub const DEFAULT_METRICS_PORT: u16 = 9464;
/// Instance name served when none is configured.
pub const DEFAULT_INSTANCE: &str = "main";
/// HTTP path of the liveness probe.
pub const HEALTHZ_PATH: &str = "/healthz";
/// HTTP path of the readiness probe.
pub const READYZ_PATH: &str = "/readyz";
/// HTTP path of the Prometheus metrics.
pub const METRICS_PATH: &str = "/metrics";
/// Prometheus gauge: actions waiting for a worker, labelled `instance` and `platform`.
pub const METRIC_QUEUE_DEPTH: &str = "buildkube_queue_depth";
/// Prometheus gauge: actions leased to workers and running, labelled `instance` and `platform`.
pub const METRIC_ACTIONS_RUNNING: &str = "buildkube_actions_running";
/// Prometheus gauge: worker connections seen within the last lease interval.
pub const METRIC_WORKERS_CONNECTED: &str = "buildkube_workers_connected";
/// Prometheus gauge: workers with at least one running action.
pub const METRIC_WORKERS_BUSY: &str = "buildkube_workers_busy";
/// Environment variable the worker reads its `--worker-id` from; pods set it
/// from their name (`metadata.name`).
pub const WORKER_ID_ENV: &str = "BUILDKUBE_WORKER_ID";
/// In `--git-credentials-dir`: git's credential store (`https://USER:TOKEN@HOST` lines).
pub const GIT_CREDENTIALS_FILE: &str = "git-credentials";
/// In `--git-credentials-dir`: the private SSH key for git over SSH.
pub const SSH_KEY_FILE: &str = "ssh-private-key";
/// In `--git-credentials-dir`: the host keys SSH trusts; others are refused.
pub const KNOWN_HOSTS_FILE: &str = "known_hosts";
/// Default of the worker's `--redacted-vars`: variables whose values are
/// kept out of CI step logs.
pub const DEFAULT_REDACTED_VARS: &str =
    "*_PASSWORD,*_SECRET,*_TOKEN,*_ACCESS_KEY,*_SECRET_KEY,*_PRIVATE_KEY";
/// Prometheus counter: requests refused because they exceeded a limit,
/// labelled `limit` (the flag's name, e.g. `max-queued-actions`).
pub const METRIC_LIMITS_HIT: &str = "buildkube_limits_hit_total";
/// Worker platform property that selects how an action is run.
pub const PLATFORM_RUNNER_KEY: &str = "runner";
/// gRPC metadata key carrying the bearer token when auth is enabled.
pub const AUTHORIZATION_HEADER: &str = "authorization";

/// Output format of the structured logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    fn as_arg(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// The server's TLS files. With a certificate and key, the gRPC and HTTP
/// listeners speak only TLS; with a client CA too, they also require (mutual
/// TLS) a client certificate signed by it. The files are read again when they
/// change (cert-manager renews them in place), so rotation needs no restart.
#[derive(clap::Args, Debug, Clone, Default, PartialEq)]
pub struct ServerTlsArgs {
    /// PEM certificate chain of the server (leaf first); turns TLS on.
    #[arg(long, env = "BUILDKUBE_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of --tls-cert-file (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "BUILDKUBE_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// PEM CA certificates: clients must present a certificate signed by one
    /// of them (mutual TLS). Needs --tls-cert-file.
    #[arg(long, env = "BUILDKUBE_TLS_CLIENT_CA_FILE", requires = "tls_cert_file")]
    pub tls_client_ca_file: Option<PathBuf>,
}

impl ServerTlsArgs {
    /// Renders the flags that are set, e.g. for a container's arguments.
    pub fn to_args(&self) -> Vec<String> {
        let flags = [
            ("--tls-cert-file", &self.tls_cert_file),
            ("--tls-key-file", &self.tls_key_file),
            ("--tls-client-ca-file", &self.tls_client_ca_file),
        ];
        flags
            .into_iter()
            .filter_map(|(flag, path)| path.as_ref().map(|p| format!("{flag}={}", p.display())))
            .collect()
    }
}

/// How a client (worker, `reapi-bench`) checks the server's TLS certificate
/// and which certificate it presents. Used with an `https://` (or `grpcs://`)
/// server URL; the files are read again at every new connection.
#[derive(clap::Args, Debug, Clone, Default, PartialEq)]
pub struct ClientTlsArgs {
    /// PEM CA certificates the server's certificate must chain to
    /// (default: the system's trusted roots).
    #[arg(long, global = true, env = "BUILDKUBE_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
    /// PEM certificate chain presented to a server that requires client
    /// certificates (mutual TLS).
    #[arg(
        long,
        global = true,
        env = "BUILDKUBE_TLS_CLIENT_CERT_FILE",
        requires = "tls_client_key_file"
    )]
    pub tls_client_cert_file: Option<PathBuf>,
    /// PEM private key of --tls-client-cert-file.
    #[arg(
        long,
        global = true,
        env = "BUILDKUBE_TLS_CLIENT_KEY_FILE",
        requires = "tls_client_cert_file"
    )]
    pub tls_client_key_file: Option<PathBuf>,
}

impl ClientTlsArgs {
    /// Whether any TLS file is set.
    pub fn is_set(&self) -> bool {
        self.tls_ca_file.is_some() || self.tls_client_cert_file.is_some()
    }

    /// Renders the flags that are set, e.g. for a container's arguments.
    pub fn to_args(&self) -> Vec<String> {
        let flags = [
            ("--tls-ca-file", &self.tls_ca_file),
            ("--tls-client-cert-file", &self.tls_client_cert_file),
            ("--tls-client-key-file", &self.tls_client_key_file),
        ];
        flags
            .into_iter()
            .filter_map(|(flag, path)| path.as_ref().map(|p| format!("{flag}={}", p.display())))
            .collect()
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

/// Parses sizes such as `10GiB`, `512M`, `4096`.
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size (examples: 4096, 512MiB, 10G)"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("unknown size unit `{other}` in `{text}`")),
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("size `{text}` overflows"))
}

/// Bounds on what one action may make the server and a worker hold. The
/// server checks them at Execute, the worker again before it materializes
/// anything; both take the same flags with the same defaults, which a real
/// Bazel build fits easily.
#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct ActionLimits {
    /// Largest Action, Command or Directory blob that is read and decoded,
    /// checked against the digest's size before any byte is read.
    #[arg(long, env = "BUILDKUBE_MAX_MESSAGE_BLOB_SIZE", default_value = "16MiB", value_parser = parse_byte_size)]
    pub max_message_blob_size: u64,
    /// Most files in an action's input tree (counted as materialized: a
    /// directory referenced twice counts twice).
    #[arg(long, env = "BUILDKUBE_MAX_INPUT_FILES", default_value_t = 1_000_000)]
    pub max_input_files: u64,
    /// Most directories in an action's input tree, the root included.
    #[arg(
        long,
        env = "BUILDKUBE_MAX_INPUT_DIRECTORIES",
        default_value_t = 200_000
    )]
    pub max_input_directories: u64,
    /// Largest total size of an action's input files.
    #[arg(long, env = "BUILDKUBE_MAX_INPUT_SIZE", default_value = "64GiB", value_parser = parse_byte_size)]
    pub max_input_size: u64,
    /// Deepest nesting of directories in an action's input tree (the root is depth 1).
    #[arg(long, env = "BUILDKUBE_MAX_INPUT_DEPTH", default_value_t = 128)]
    pub max_input_depth: u64,
}

impl Default for ActionLimits {
    fn default() -> Self {
        ServerArgs::default().action_limits
    }
}

/// The size of an action's input tree, as the worker would create it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InputTreeSize {
    /// Files (every occurrence).
    pub files: u64,
    /// Directories, the root included.
    pub directories: u64,
    /// Total bytes of the files.
    pub bytes: u64,
    /// Deepest nesting (the root alone is 1).
    pub depth: u64,
}

impl ActionLimits {
    /// The first input tree limit `size` exceeds, as a message naming the
    /// flag and both numbers.
    pub fn check_input_tree(&self, size: &InputTreeSize) -> Result<(), String> {
        for (what, flag, value, limit) in [
            (
                "files",
                "--max-input-files",
                size.files,
                self.max_input_files,
            ),
            (
                "directories",
                "--max-input-directories",
                size.directories,
                self.max_input_directories,
            ),
            ("bytes", "--max-input-size", size.bytes, self.max_input_size),
            (
                "levels deep",
                "--max-input-depth",
                size.depth,
                self.max_input_depth,
            ),
        ] {
            if value > limit {
                return Err(format!(
                    "the input tree has more than {limit} {what} (at least {value}; limit {flag}={limit})"
                ));
            }
        }
        Ok(())
    }

    /// Refuses a message blob larger than `--max-message-blob-size`, before it is read.
    pub fn check_message_size(
        &self,
        what: &str,
        digest_text: &str,
        size: u64,
    ) -> Result<(), String> {
        if size > self.max_message_blob_size {
            return Err(format!(
                "{what} {digest_text} is {size} bytes, more than the {} bytes this farm decodes (--max-message-blob-size)",
                self.max_message_blob_size
            ));
        }
        Ok(())
    }

    /// The flags that differ from the defaults (manifests stay short and the
    /// defaults live only here).
    fn push_args(&self, args: &mut Vec<String>) {
        let default = ActionLimits::default();
        for (flag, value, default) in [
            (
                "max-message-blob-size",
                self.max_message_blob_size,
                default.max_message_blob_size,
            ),
            (
                "max-input-files",
                self.max_input_files,
                default.max_input_files,
            ),
            (
                "max-input-directories",
                self.max_input_directories,
                default.max_input_directories,
            ),
            (
                "max-input-size",
                self.max_input_size,
                default.max_input_size,
            ),
            (
                "max-input-depth",
                self.max_input_depth,
                default.max_input_depth,
            ),
        ] {
            if value != default {
                args.push(format!("--{flag}={value}"));
            }
        }
    }
}

/// Command line of `buildkube-server`. Every flag has a `BUILDKUBE_*` env fallback.
#[derive(Parser, Debug, Clone, PartialEq)]
#[command(
    name = "buildkube-server",
    version,
    about = "Remote Execution API v2 server and scheduler"
)]
pub struct ServerArgs {
    /// gRPC listen address (REAPI services, worker protocol, health).
    #[arg(long, env = "BUILDKUBE_LISTEN", default_value_t = loopback(DEFAULT_GRPC_PORT))]
    pub listen: SocketAddr,
    /// HTTP listen address (/healthz, /readyz, /operations, /jobs, /webhooks/github and /webhooks/gitlab); TLS like the
    /// gRPC listener when --tls-cert-file is set.
    #[arg(long, env = "BUILDKUBE_HTTP_LISTEN", default_value_t = loopback(DEFAULT_HTTP_PORT))]
    pub http_listen: SocketAddr,
    /// Metrics listen address (/metrics, /healthz, /readyz): always plain
    /// HTTP, so Prometheus and the kubelet's probes need no certificate;
    /// a separate port lets a NetworkPolicy admit only the monitoring namespace.
    #[arg(long, env = "BUILDKUBE_METRICS_LISTEN", default_value_t = loopback(DEFAULT_METRICS_PORT))]
    pub metrics_listen: SocketAddr,
    /// TLS (and mutual TLS) on the gRPC and HTTP listeners.
    #[command(flatten)]
    pub tls: ServerTlsArgs,
    /// Directory holding the CAS and the action cache; created if missing.
    #[arg(long, env = "BUILDKUBE_DATA_DIR", default_value = "buildkube-data")]
    pub data_dir: PathBuf,
    /// Instance names served (repeat the flag or separate with commas).
    /// An empty instance name ("") is served only if listed.
    #[arg(long = "instance", env = "BUILDKUBE_INSTANCE", value_delimiter = ',', default_value = DEFAULT_INSTANCE)]
    pub instances: Vec<String>,
    /// Run this many workers inside the server process (the one-command farm).
    #[arg(long, env = "BUILDKUBE_LOCAL_WORKERS", default_value_t = 0)]
    pub local_workers: usize,
    /// CAS size budget; least recently used blobs are evicted beyond it.
    /// (The default of a `filesystem` store's `max_size` in `--storage-config`.)
    #[arg(long, env = "BUILDKUBE_CAS_MAX_SIZE", default_value = "10GiB", value_parser = parse_byte_size)]
    pub cas_max_size: u64,
    /// YAML file choosing the CAS and action cache stores (filesystem,
    /// postgres, redis, read_cache, size_partitioned); see `storage::StorageConfig`.
    /// Unset: both on the filesystem under --data-dir.
    #[arg(long, env = "BUILDKUBE_STORAGE_CONFIG")]
    pub storage_config: Option<PathBuf>,
    /// Seconds a worker may go without a keep-alive before its leases are requeued.
    #[arg(long, env = "BUILDKUBE_LEASE_TIMEOUT_SECS", default_value_t = 30)]
    pub lease_timeout_secs: u64,
    /// How many times an action is handed to a worker before it fails with an error.
    #[arg(long, env = "BUILDKUBE_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,
    /// Seconds an unfinished operation may go without any client watching it
    /// (Execute or WaitExecution stream) before it is cancelled and its action
    /// killed; clients that reconnect within it keep their action.
    #[arg(long, env = "BUILDKUBE_ORPHAN_TIMEOUT_SECS", default_value_t = 60)]
    pub orphan_timeout_secs: u64,
    /// YAML file of the worker and client credentials (token files, and per
    /// client its instances and scopes); see `auth::AuthConfig`. Unset: no
    /// auth at all, every caller may do everything (logged at start).
    #[arg(long, env = "BUILDKUBE_AUTH_CONFIG")]
    pub auth_config: Option<PathBuf>,
    /// Unfinished (queued or running) actions per instance; beyond it
    /// Execute answers RESOURCE_EXHAUSTED.
    #[arg(long, env = "BUILDKUBE_MAX_QUEUED_ACTIONS", default_value_t = 50_000)]
    pub max_queued_actions: usize,
    /// Unfinished ByteStream uploads held at once (their temp files count in
    /// the CAS budget); beyond it, abandoned ones are dropped oldest first, and
    /// a new upload is answered RESOURCE_EXHAUSTED while all are active.
    #[arg(long, env = "BUILDKUBE_MAX_OPEN_UPLOADS", default_value_t = 1024)]
    pub max_open_uploads: usize,
    /// Bounds on the Action, Command and input tree of an action.
    #[command(flatten)]
    pub action_limits: ActionLimits,
    /// CI jobs: webhook secrets and job bounds.
    #[command(flatten)]
    pub jobs: JobArgs,
    /// Log format.
    #[arg(long, env = "BUILDKUBE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Write the bound addresses to this file once listening (lines
    /// `grpc=ADDR`, `http=ADDR` and `metrics=ADDR`); for tests and scripts
    /// that bind port 0. It is written before storage opens: /readyz answers
    /// 200 once the server serves.
    #[arg(long, env = "BUILDKUBE_ADDR_FILE")]
    pub addr_file: Option<PathBuf>,
}

impl Default for ServerArgs {
    fn default() -> Self {
        ServerArgs::parse_from(["buildkube-server"])
    }
}

impl ServerArgs {
    /// Renders the arguments as a command line (without the program name)
    /// that parses back into `self`.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            format!("--listen={}", self.listen),
            format!("--http-listen={}", self.http_listen),
            format!("--metrics-listen={}", self.metrics_listen),
            format!("--data-dir={}", self.data_dir.display()),
            format!("--instance={}", self.instances.join(",")),
            format!("--local-workers={}", self.local_workers),
            format!("--cas-max-size={}", self.cas_max_size),
            format!("--lease-timeout-secs={}", self.lease_timeout_secs),
            format!("--max-attempts={}", self.max_attempts),
            format!("--orphan-timeout-secs={}", self.orphan_timeout_secs),
            format!("--log-format={}", self.log_format.as_arg()),
        ];
        let default = ServerArgs::default();
        if self.max_queued_actions != default.max_queued_actions {
            args.push(format!("--max-queued-actions={}", self.max_queued_actions));
        }
        if self.max_open_uploads != default.max_open_uploads {
            args.push(format!("--max-open-uploads={}", self.max_open_uploads));
        }
        self.action_limits.push_args(&mut args);
        self.jobs.push_args(&mut args);
        if let Some(path) = &self.auth_config {
            args.push(format!("--auth-config={}", path.display()));
        }
        args.extend(self.tls.to_args());
        if let Some(path) = &self.addr_file {
            args.push(format!("--addr-file={}", path.display()));
        }
        if let Some(path) = &self.storage_config {
            args.push(format!("--storage-config={}", path.display()));
        }
        args
    }
}

/// Command line of `buildkube-worker`. Every flag has a `BUILDKUBE_*` env fallback.
#[derive(Parser, Debug, Clone, PartialEq)]
#[command(
    name = "buildkube-worker",
    version,
    about = "Runs actions leased from a buildkube server"
)]
pub struct WorkerArgs {
    /// Server gRPC endpoint, e.g. http://buildkube-server:8980, or
    /// https://buildkube-server:8980 for TLS (see --tls-ca-file).
    #[arg(long, env = "BUILDKUBE_SERVER", default_value_t = format!("http://127.0.0.1:{DEFAULT_GRPC_PORT}"))]
    pub server: String,
    /// TLS towards an https:// server.
    #[command(flatten)]
    pub tls: ClientTlsArgs,
    /// Instance name to take work from.
    #[arg(long, env = "BUILDKUBE_INSTANCE", default_value = DEFAULT_INSTANCE)]
    pub instance: String,
    /// Directory for the file cache and the per-action directories; created if missing.
    #[arg(long, env = "BUILDKUBE_WORK_DIR", default_value = "buildkube-worker")]
    pub work_dir: PathBuf,
    /// Actions run at once (default: the number of CPUs).
    #[arg(long, env = "BUILDKUBE_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Platform property `key=value` this worker offers (repeatable, or comma separated in the env).
    #[arg(long = "platform", env = "BUILDKUBE_PLATFORM", value_delimiter = ',', value_parser = parse_platform_property)]
    pub platform: Vec<(String, String)>,
    /// Worker name in logs and metrics (default: hostname-pid). In a pod,
    /// set `BUILDKUBE_WORKER_ID` from the pod name (the generated manifests
    /// do), rather than substituting it into the arguments.
    #[arg(long, env = WORKER_ID_ENV)]
    pub worker_id: Option<String>,
    /// File holding the bearer token sent to the server: a worker
    /// credential (listed under `workers` in the server's --auth-config);
    /// a client's token is refused on the worker protocol.
    #[arg(long, env = "BUILDKUBE_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// Run CI job steps as well as actions (a slot runs one or the other).
    /// Without it the server never leases this worker a step: steps clone
    /// repositories, keep git mirrors under --work-dir and run a
    /// pipeline's commands, so only workers meant for that should. Env:
    /// `true`/`false`.
    #[arg(long, env = "BUILDKUBE_RUN_STEPS")]
    pub run_steps: bool,
    /// Shell script sourced (by bash) before every command, e.g. to export credentials.
    #[arg(long, env = "BUILDKUBE_ENV_SCRIPT")]
    pub env_script: Option<PathBuf>,
    /// Directory with git credentials for actions: `git-credentials` (git's
    /// credential store, for HTTP(S)), `ssh-private-key` and `known_hosts`
    /// (SSH; unknown hosts are refused). Actions get them through
    /// GIT_CONFIG_* and GIT_SSH_COMMAND unless they set those themselves.
    /// Every action on this worker can read them.
    #[arg(long, env = "BUILDKUBE_GIT_CREDENTIALS_DIR")]
    pub git_credentials_dir: Option<PathBuf>,
    /// Directory of CI step hooks (in a cluster, a ConfigMap): executable
    /// files named `pre-checkout`, `post-checkout`, `pre-command` and
    /// `post-command` run around a step's checkout and commands, with the
    /// step's environment; absent ones are skipped (docs/pipelines.md).
    #[arg(long, env = "BUILDKUBE_HOOKS_DIR")]
    pub hooks_dir: Option<PathBuf>,
    /// Names of environment variables (globs, comma separated) whose
    /// values are redacted from CI step logs, besides the job's farm token
    /// and the git credentials, which always are.
    #[arg(
        long,
        env = "BUILDKUBE_REDACTED_VARS",
        value_delimiter = ',',
        default_value = DEFAULT_REDACTED_VARS
    )]
    pub redacted_vars: Vec<String>,
    /// Local input file cache budget.
    #[arg(long, env = "BUILDKUBE_CACHE_MAX_SIZE", default_value = "5GiB", value_parser = parse_byte_size)]
    pub cache_max_size: u64,
    /// Most git mirrors (one per repository) CI steps keep under
    /// `{--work-dir}/git/mirrors`; beyond it, or beyond
    /// --git-mirrors-max-size, the least recently used mirrors no running
    /// step uses are deleted.
    #[arg(long, env = "BUILDKUBE_GIT_MIRRORS_MAX_COUNT", default_value_t = 64)]
    pub git_mirrors_max_count: usize,
    /// Largest total size of the git mirrors, measured after each fetch
    /// (mirrors in use by running steps are kept even beyond it).
    #[arg(long, env = "BUILDKUBE_GIT_MIRRORS_MAX_SIZE", default_value = "20GiB", value_parser = parse_byte_size)]
    pub git_mirrors_max_size: u64,
    /// On SIGTERM, seconds to let running actions finish before they are killed.
    #[arg(long, env = "BUILDKUBE_DRAIN_TIMEOUT_SECS", default_value_t = 600)]
    pub drain_timeout_secs: u64,
    /// Largest total size of an action's output files; beyond it the action
    /// fails with RESOURCE_EXHAUSTED.
    #[arg(long, env = "BUILDKUBE_MAX_OUTPUT_SIZE", default_value = "16GiB", value_parser = parse_byte_size)]
    pub max_output_size: u64,
    /// Largest stdout, and largest stderr, of an action; beyond it the action
    /// is killed and fails with RESOURCE_EXHAUSTED.
    #[arg(long, env = "BUILDKUBE_MAX_STDIO_SIZE", default_value = "256MiB", value_parser = parse_byte_size)]
    pub max_stdio_size: u64,
    /// Timeout of actions that set none, and the longest timeout an action may ask for.
    #[arg(
        long,
        env = "BUILDKUBE_MAX_ACTION_TIMEOUT_SECS",
        default_value_t = 3600
    )]
    pub max_action_timeout_secs: u64,
    /// Bounds on the Command and input tree of a leased action (the server
    /// checks the same at Execute; a worker may be stricter).
    #[command(flatten)]
    pub action_limits: ActionLimits,
    /// HTTP listen address of the worker (/healthz, /readyz, /metrics); readiness
    /// turns false while draining. The default is an ephemeral loopback port,
    /// so several workers share a host; the bound address is logged and
    /// written to --addr-file.
    #[arg(long, env = "BUILDKUBE_HTTP_LISTEN", default_value_t = loopback(0))]
    pub http_listen: SocketAddr,
    /// Write the bound HTTP address to this file once listening (a line
    /// `http=ADDR`); for scripts and tests that bind port 0.
    #[arg(long, env = "BUILDKUBE_ADDR_FILE")]
    pub addr_file: Option<PathBuf>,
    /// Log format.
    #[arg(long, env = "BUILDKUBE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl Default for WorkerArgs {
    fn default() -> Self {
        WorkerArgs::parse_from(["buildkube-worker"])
    }
}

impl WorkerArgs {
    /// Renders the arguments as a command line (without the program name)
    /// that parses back into `self`.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            format!("--server={}", self.server),
            format!("--instance={}", self.instance),
            format!("--work-dir={}", self.work_dir.display()),
        ];
        args.extend(self.tls.to_args());
        if let Some(n) = self.concurrency {
            args.push(format!("--concurrency={n}"));
        }
        for (key, value) in &self.platform {
            args.push(format!("--platform={key}={value}"));
        }
        if let Some(id) = &self.worker_id {
            args.push(format!("--worker-id={id}"));
        }
        if let Some(path) = &self.auth_token_file {
            args.push(format!("--auth-token-file={}", path.display()));
        }
        if self.run_steps {
            args.push("--run-steps".to_string());
        }
        if let Some(path) = &self.env_script {
            args.push(format!("--env-script={}", path.display()));
        }
        if let Some(path) = &self.git_credentials_dir {
            args.push(format!("--git-credentials-dir={}", path.display()));
        }
        if let Some(path) = &self.hooks_dir {
            args.push(format!("--hooks-dir={}", path.display()));
        }
        // Only when changed: generated manifests stay as they were.
        if self.redacted_vars.join(",") != DEFAULT_REDACTED_VARS {
            args.push(format!("--redacted-vars={}", self.redacted_vars.join(",")));
        }
        args.push(format!("--cache-max-size={}", self.cache_max_size));
        // Only when changed: generated manifests stay as they were.
        if self.git_mirrors_max_count != Self::default().git_mirrors_max_count {
            args.push(format!(
                "--git-mirrors-max-count={}",
                self.git_mirrors_max_count
            ));
        }
        if self.git_mirrors_max_size != Self::default().git_mirrors_max_size {
            args.push(format!(
                "--git-mirrors-max-size={}",
                self.git_mirrors_max_size
            ));
        }
        args.push(format!("--drain-timeout-secs={}", self.drain_timeout_secs));
        args.push(format!("--max-output-size={}", self.max_output_size));
        args.push(format!("--max-stdio-size={}", self.max_stdio_size));
        args.push(format!(
            "--max-action-timeout-secs={}",
            self.max_action_timeout_secs
        ));
        args.push(format!("--http-listen={}", self.http_listen));
        if let Some(path) = &self.addr_file {
            args.push(format!("--addr-file={}", path.display()));
        }
        args.push(format!("--log-format={}", self.log_format.as_arg()));
        self.action_limits.push_args(&mut args);
        args
    }
}

/// The value of the `platform` label on the queue metrics for a set of
/// platform properties: `key=value` pairs sorted by key then value, joined by
/// commas (`OSFamily=Linux,runner=sandbox`); empty for no properties. The
/// server labels its gauges with it and the autoscalers' queries match it.
pub fn platform_label<'a>(properties: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut pairs: Vec<(&str, &str)> = properties.into_iter().collect();
    pairs.sort_unstable();
    pairs
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Path segments the REAPI reserves inside resource names, so an instance
/// name must not contain them.
pub const RESERVED_INSTANCE_SEGMENTS: &[&str] = &[
    "blobs",
    "uploads",
    "actions",
    "actionResults",
    "operations",
    "capabilities",
    "compressed-blobs",
];

/// Checks a non-empty instance name: `/`-separated segments of ASCII letters,
/// digits and `_.-`, none of them reserved by the REAPI. The server and
/// manifests-gen both apply it, so a name the manifests accept is one the
/// server serves.
pub fn check_instance_name(name: &str) -> Result<(), String> {
    let segment_ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    };
    if !name.split('/').all(segment_ok) {
        return Err(format!(
            "`{name}` is not an instance name (segments of letters, digits, `_.-` separated by `/`)"
        ));
    }
    if let Some(segment) = name
        .split('/')
        .find(|s| RESERVED_INSTANCE_SEGMENTS.contains(s))
    {
        return Err(format!(
            "`{name}` contains `{segment}`, which REAPI reserves in resource names"
        ));
    }
    Ok(())
}

/// Parses one `key=value` platform property.
pub fn parse_platform_property(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!(
            "platform property `{text}` must be key=value with a non-empty key"
        )),
    }
}

#[cfg(test)]
#[allow(clippy::field_reassign_with_default)] // each test states what differs from the defaults
mod tests {
    use super::*;

    #[test]
    fn server_args_round_trip() {
        let mut args = ServerArgs::default();
        args.instances = vec!["main".into(), "ci".into()];
        args.auth_config = Some("/etc/buildkube/auth.yaml".into());
        args.local_workers = 2;
        args.storage_config = Some("/etc/buildkube/storage.yaml".into());
        args.max_queued_actions = 7;
        args.max_open_uploads = 9;
        args.action_limits.max_input_depth = 12;
        args.action_limits.max_message_blob_size = 1 << 20;
        args.jobs = JobArgs {
            github_webhook_secret_file: Some("/etc/buildkube/webhooks/github".into()),
            gitlab_webhook_token_file: Some("/etc/buildkube/webhooks/gitlab".into()),
            webhook_instance: Some("ci".into()),
            webhook_clone_url: WebhookCloneUrl::Https,
            max_unfinished_jobs: 3,
            retain_finished_jobs: 4,
        };
        args.tls = ServerTlsArgs {
            tls_cert_file: Some("/etc/buildkube/tls/tls.crt".into()),
            tls_key_file: Some("/etc/buildkube/tls/tls.key".into()),
            tls_client_ca_file: Some("/etc/buildkube/tls/ca.crt".into()),
        };
        let mut cmd = vec!["buildkube-server".to_string()];
        cmd.extend(args.to_args());
        assert_eq!(ServerArgs::try_parse_from(cmd).unwrap(), args);
    }

    #[test]
    fn worker_args_round_trip() {
        let mut args = WorkerArgs::default();
        args.platform = vec![
            ("OSFamily".into(), "Linux".into()),
            ("runner".into(), "sandbox".into()),
        ];
        args.concurrency = Some(4);
        args.env_script = Some("/etc/buildkube/env.sh".into());
        args.max_output_size = 1 << 30;
        args.max_stdio_size = 1 << 20;
        args.max_action_timeout_secs = 900;
        args.addr_file = Some("/run/buildkube-worker.addr".into());
        args.git_credentials_dir = Some("/etc/buildkube/credentials".into());
        args.hooks_dir = Some("/etc/buildkube/hooks".into());
        args.run_steps = true;
        args.git_mirrors_max_count = 3;
        args.git_mirrors_max_size = 1 << 30;
        args.redacted_vars = vec!["DEPLOY_*".into(), "*_TOKEN".into()];
        args.action_limits.max_input_files = 10;
        args.tls = ClientTlsArgs {
            tls_ca_file: Some("/etc/buildkube/tls/ca.crt".into()),
            tls_client_cert_file: Some("/etc/buildkube/tls/tls.crt".into()),
            tls_client_key_file: Some("/etc/buildkube/tls/tls.key".into()),
        };
        let mut cmd = vec!["buildkube-worker".to_string()];
        cmd.extend(args.to_args());
        assert_eq!(WorkerArgs::try_parse_from(cmd).unwrap(), args);
    }

    #[test]
    fn workers_run_no_ci_steps_unless_told() {
        let args = WorkerArgs::default();
        assert!(!args.run_steps);
        assert!(!args.to_args().iter().any(|a| a.starts_with("--run-steps")));
    }

    #[test]
    fn workers_bind_an_ephemeral_http_port_by_default() {
        // Several workers on one host must not fight over one port.
        let args = WorkerArgs::default();
        assert_eq!(args.http_listen, loopback(0));
    }

    #[test]
    fn default_limits_are_not_rendered() {
        let args = ServerArgs::default().to_args();
        for flag in [
            "--max-queued-actions",
            "--max-open-uploads",
            "--max-message-blob-size",
            "--max-input-",
        ] {
            assert!(!args.iter().any(|a| a.starts_with(flag)), "{args:?}");
        }
    }

    #[test]
    fn input_tree_limits_name_the_flag() {
        let limits = ActionLimits::default();
        let mut size = InputTreeSize {
            files: 1,
            directories: 1,
            bytes: 1,
            depth: 1,
        };
        assert!(limits.check_input_tree(&size).is_ok());
        size.depth = 129;
        let err = limits.check_input_tree(&size).unwrap_err();
        assert!(err.contains("--max-input-depth=128"), "{err}");
        let err = limits
            .check_message_size("command", "abc/99999999", 99_999_999)
            .unwrap_err();
        assert!(
            err.contains("abc/99999999") && err.contains("--max-message-blob-size"),
            "{err}"
        );
    }

    #[test]
    fn tls_key_without_certificate_is_refused() {
        let err = ServerArgs::try_parse_from(["buildkube-server", "--tls-key-file=/k"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--tls-cert-file"), "{err}");
        let err = WorkerArgs::try_parse_from(["buildkube-worker", "--tls-client-cert-file=/c"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--tls-client-key-file"), "{err}");
    }

    #[test]
    fn platform_label_is_sorted() {
        assert_eq!(
            platform_label([("runner", "sandbox"), ("OSFamily", "Linux")]),
            "OSFamily=Linux,runner=sandbox"
        );
        assert_eq!(platform_label([]), "");
    }

    #[test]
    fn instance_names() {
        for good in ["main", "team/ci", "a.b-c_d"] {
            assert!(check_instance_name(good).is_ok(), "{good}");
        }
        for bad in ["", "/main", "main/", "a//b", "x/blobs", "sp ace", "uploads"] {
            assert!(check_instance_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_byte_size("4096").unwrap(), 4096);
        assert_eq!(parse_byte_size("10GiB").unwrap(), 10 << 30);
        assert_eq!(parse_byte_size("512M").unwrap(), 512 << 20);
        assert!(parse_byte_size("12 parsecs").is_err());
        assert!(parse_byte_size("-1").is_err());
    }

    #[test]
    fn bad_platform_property_names_the_text() {
        let err = parse_platform_property("novalue").unwrap_err();
        assert!(err.contains("novalue"));
    }
}
