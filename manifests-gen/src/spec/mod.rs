//! The stack spec: the one typed description from which every generated file
//! is derived. `manifests-gen schema` prints its JSON Schema; `--config FILE`
//! reads a YAML document of this shape (unknown fields are errors).

use std::collections::BTreeMap;
use std::fmt;

use regex::Regex;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Names of the files and directories under `overlays/` that are not overlays.
const RESERVED_OVERLAY_NAMES: &[&str] = &["base", "components"];

/// Most platform properties of one pool: the autoscaler queries list every
/// subset of them (2^n platform labels).
pub const MAX_POOL_PROPERTIES: usize = 8;

/// A whole buildkube deployment: server, worker pools, add-ons, and the
/// overlays generated from them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StackSpec {
    /// REAPI instance names the server serves (`--instance`). Clients and
    /// worker pools must use one of them. Default: `[main]`.
    pub instances: Vec<String>,
    /// Runners the worker image provides: the values a worker pool may give
    /// its `runner` platform property: the worker's `plain` (run directly) and
    /// `sandbox` (bubblewrap). Default: `[plain, sandbox]`.
    pub runners: Vec<String>,
    /// The scheduler and CAS.
    pub server: ServerSpec,
    /// One Deployment per pool; each pool offers one set of platform properties.
    pub worker_pools: Vec<WorkerPoolSpec>,
    /// Prometheus, used by the KEDA and HPA autoscaling components and the
    /// scrape component.
    pub monitoring: MonitoringSpec,
    /// The Ingress of the `ingress-tls` component.
    pub ingress: IngressSpec,
    /// PostgreSQL and Redis of the `external-stores` component.
    pub external_stores: ExternalStoresSpec,
    /// Where workers (and so the actions they run) may connect besides the
    /// server and DNS; everything else, the cloud metadata endpoint
    /// included, is denied by their NetworkPolicy. Default: nothing.
    #[serde(default)]
    pub worker_egress: Vec<EgressAllowSpec>,
    /// Generated overlays, by directory name under `overlays/`.
    pub overlays: BTreeMap<String, OverlaySpec>,
}

/// The server Deployment and its CAS volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerSpec {
    /// Size of the PersistentVolumeClaim holding the CAS and action cache
    /// (Kubernetes quantity, e.g. `50Gi`).
    pub storage_size: String,
    /// StorageClass of that claim; the cluster default when unset.
    #[serde(default)]
    pub storage_class: Option<String>,
    /// CAS eviction budget (`--cas-max-size`, e.g. `40GiB`); must fit in `storage_size`.
    pub cas_max_size: String,
    /// Seconds without keep-alive before a worker's leases are requeued (`--lease-timeout-secs`).
    pub lease_timeout_secs: u64,
    /// Attempts before an action fails (`--max-attempts`).
    pub max_attempts: u32,
    /// Size limit of the server's `/tmp` emptyDir (Kubernetes quantity).
    #[serde(default = "default_server_tmp_size")]
    pub tmp_size: String,
    /// CPU and memory of the server container.
    pub resources: ResourcesSpec,
    /// Log format of the server and workers.
    pub log_format: LogFormatSpec,
}

/// Log format (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogFormatSpec {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Requests and limits of one container (Kubernetes quantities).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResourcesSpec {
    /// CPU request, e.g. `500m`.
    pub cpu_request: String,
    /// Memory request, e.g. `1Gi`.
    pub memory_request: String,
    /// CPU limit; unset means none (builds are bursty, throttling hurts).
    #[serde(default)]
    pub cpu_limit: Option<String>,
    /// Memory limit, e.g. `4Gi`.
    pub memory_limit: String,
}

/// One pool of identical workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkerPoolSpec {
    /// Pool name (DNS label); the Deployment is `buildkube-worker-NAME`.
    pub name: String,
    /// Instance the pool takes work from; one of `instances`.
    pub instance: String,
    /// Platform properties offered (`--platform key=value`); must include
    /// `runner` with a value from `runners`.
    pub platform: BTreeMap<String, String>,
    /// Replicas when not autoscaled.
    pub replicas: i32,
    /// Actions run at once per worker (`--concurrency`).
    pub concurrency: usize,
    /// Input file cache budget (`--cache-max-size`, e.g. `5GiB`).
    pub cache_max_size: String,
    /// Size limit of the emptyDir work directory (Kubernetes quantity). It
    /// holds the input cache and every running action's outputs, stdout and
    /// stderr, so it must be at least `cache_max_size` + `concurrency` ×
    /// (`max_output_size` + 2 × `max_stdio_size`): then an action over its
    /// limits fails alone, instead of the kubelet evicting the pod and
    /// every action on it.
    pub work_dir_size: String,
    /// Size limit of the `/tmp` emptyDir, which actions of the `plain`
    /// runner share (Kubernetes quantity).
    #[serde(default = "default_worker_tmp_size")]
    pub tmp_size: String,
    /// Size limit of the HOME emptyDir (Kubernetes quantity).
    #[serde(default = "default_worker_home_size")]
    pub home_size: String,
    /// Longest an action may run, and the timeout of actions that set none,
    /// in seconds (`--max-action-timeout-secs`).
    pub max_action_timeout_secs: u64,
    /// Largest total size of one action's output files (`--max-output-size`,
    /// e.g. `6GiB`); `concurrency` of them must fit in `work_dir_size`.
    pub max_output_size: String,
    /// Largest stdout, and largest stderr, of one action (`--max-stdio-size`, e.g. `256MiB`).
    pub max_stdio_size: String,
    /// Seconds a SIGTERMed worker lets running actions finish
    /// (`--drain-timeout-secs`): fetching inputs, running, uploading outputs.
    /// Must be at least `max_action_timeout_secs`, so that a scale-down or a
    /// node drain never kills an action that is within its timeout.
    pub drain_timeout_secs: u64,
    /// Seconds added to `drain_timeout_secs` for the pod's
    /// terminationGracePeriodSeconds: reporting the last results (the worker
    /// waits up to 30 s for an unreachable server after the drain), exit.
    pub termination_grace_margin_secs: u64,
    /// Worker pods the PodDisruptionBudget lets a voluntary disruption
    /// (node drain, cluster autoscaler) take at once; each one drains.
    pub max_unavailable: i32,
    /// Give this pool's actions the overlay's worker credentials (git's
    /// credential store, an SSH key with pinned host keys, the env script)
    /// in overlays with `worker_credentials`. Every action on the pool can
    /// read them, and any client that can run an action on the pool can
    /// run one that prints them: opt in only for a pool whose clients may
    /// all use the credentials. Default: off.
    #[serde(default)]
    pub git_credentials: bool,
    /// Run CI job steps as well as actions: the pool's workers get
    /// `--run-steps` (the server leases steps only to such workers) and the
    /// hooks ConfigMap (`buildkube-hooks`, in the base; overlays patch it)
    /// read-only at `--hooks-dir`. Steps clone with
    /// the worker's git credentials: a pool running steps of private
    /// repositories (or of webhook jobs cloning over SSH) also sets
    /// `git_credentials`, in overlays with `worker_credentials`. The
    /// autoscaler cannot tell a step from an action (the server's queue
    /// gauges count both, by instance and platform), so a jobs pool comes
    /// before every other pool of its instance. Default: off.
    #[serde(default)]
    pub jobs: bool,
    /// Whether the container's root filesystem is read-only (the work
    /// directory, HOME and /tmp stay writable).
    pub read_only_root_filesystem: bool,
    /// CPU and memory of one worker container.
    pub resources: ResourcesSpec,
    /// Bounds and scale-down pace used by the autoscaling components.
    pub autoscaling: PoolAutoscalingSpec,
}

/// How the autoscaling components (KEDA or HPA) scale one pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolAutoscalingSpec {
    /// Fewest replicas (KEDA may scale to zero when this is 0; the HPA keeps at least 1).
    pub min_replicas: i32,
    /// Most replicas.
    pub max_replicas: i32,
    /// Seconds the autoscaler looks back before scaling down: it uses the
    /// highest replica count recommended in that window, so the dips between
    /// a build's bursts of actions do not remove workers.
    pub scale_down_stabilization_secs: i32,
    /// Most workers removed per `scale_down_period_secs` (each one drains).
    pub scale_down_max_pods: i32,
    /// Period of `scale_down_max_pods`, in seconds (1-1800).
    pub scale_down_period_secs: i32,
}

/// Where Prometheus is and how often it scrapes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MonitoringSpec {
    /// URL of the Prometheus that scrapes the server (read by KEDA).
    pub prometheus_url: String,
    /// Scrape interval of the ServiceMonitor, e.g. `15s`.
    pub scrape_interval: String,
    /// Labels of the namespaces allowed to reach the server's metrics port
    /// (the NetworkPolicy's namespaceSelector). Default:
    /// `kubernetes.io/metadata.name: monitoring`.
    pub namespace_labels: BTreeMap<String, String>,
}

/// One destination outside the cluster that workers may connect to, e.g.
/// an artifact mirror.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EgressAllowSpec {
    /// IPv4 or IPv6 CIDR, e.g. `10.20.0.0/16`. The cloud metadata address
    /// (169.254.169.254) is excluded from it even if it falls inside.
    pub cidr: String,
    /// TCP ports allowed; empty: every port.
    #[serde(default)]
    pub ports: Vec<u16>,
}

/// The gRPC Ingress with TLS from cert-manager.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IngressSpec {
    /// Public host name of the gRPC endpoint.
    pub host: String,
    /// IngressClass (the annotations written are ingress-nginx's).
    pub class_name: String,
    /// cert-manager ClusterIssuer that issues the certificate.
    pub cluster_issuer: String,
}

/// PostgreSQL and Redis for the backends that will use them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExternalStoresSpec {
    /// PostgreSQL image reference.
    pub postgres_image: String,
    /// Size of PostgreSQL's volume.
    pub postgres_storage_size: String,
    /// Redis image reference.
    pub redis_image: String,
    /// Memory of the Redis container (request and limit, a Kubernetes
    /// quantity such as `1Gi`); Redis's `maxmemory` is
    /// `REDIS_MAXMEMORY_PERCENT` of it, the rest is its own overhead.
    pub redis_memory: String,
}

/// One generated overlay: a directory under `overlays/` that `kubectl
/// kustomize` builds into a deployable stack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OverlaySpec {
    /// One line saying what the overlay is for (shown in its README).
    pub description: String,
    /// Namespace every object goes to.
    pub namespace: String,
    /// Where the server and worker images come from.
    pub images: ImagesSpec,
    /// Require bearer tokens: a worker token (secret `buildkube-worker-token`)
    /// and client tokens for CI and developers (secret
    /// `buildkube-client-tokens`), checked by the server's `--auth-config`
    /// (ConfigMap `buildkube-auth`).
    pub auth: bool,
    /// Generate the secret `buildkube-worker-credentials` (git credentials,
    /// an SSH key, known_hosts and an env script) and mount it into the
    /// pools that set `git_credentials`; at least one must.
    pub worker_credentials: bool,
    /// How clients outside the namespace reach the gRPC port.
    pub expose: ExposeSpec,
    /// Autoscaling of the worker pools.
    pub autoscaling: AutoscalingKind,
    /// Add a Prometheus Operator ServiceMonitor for the server.
    pub prometheus: bool,
    /// Add PostgreSQL and Redis (secret `buildkube-postgres`).
    pub external_stores: bool,
    /// TLS between clients, workers and the server (the `tls` component).
    #[serde(default)]
    pub tls: TlsKind,
    /// Spread each pool's workers across nodes.
    pub worker_anti_affinity: bool,
    /// Replicas per pool name, overriding the pool's `replicas`.
    #[serde(default)]
    pub worker_replicas: BTreeMap<String, i32>,
    /// CPU and memory of the server in this overlay, replacing `server.resources`.
    #[serde(default)]
    pub server_resources: Option<ResourcesSpec>,
    /// Sizes per pool name in this overlay, replacing the pool's (e.g. to fit
    /// a laptop-sized node); validated like the pool's own.
    #[serde(default)]
    pub pool_sizes: BTreeMap<String, PoolSizesSpec>,
    /// Generate `bin/up` and `bin/down` that run this overlay in a local kind cluster.
    #[serde(default)]
    pub kind_cluster: Option<KindClusterSpec>,
    /// Forge webhooks that start CI jobs (on the first instance, in a pool
    /// with `jobs`). Default: none.
    #[serde(default)]
    pub webhooks: WebhooksSpec,
}

/// The webhook endpoints an overlay's server serves on its HTTP port. Each
/// one's secret comes from the Secret `buildkube-webhooks` (a file under the
/// overlay's `secrets/`); with `expose: ingress` an Ingress routes exactly
/// these paths, and nothing else of the HTTP port, to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhooksSpec {
    /// `POST /webhooks/github`, signed with the secret in
    /// `secrets/github-webhook-secret` (`--github-webhook-secret-file`).
    #[serde(default)]
    pub github: bool,
    /// `POST /webhooks/gitlab`, carrying the token in
    /// `secrets/gitlab-webhook-token` (`--gitlab-webhook-token-file`).
    #[serde(default)]
    pub gitlab: bool,
    /// Which clone URL of a delivery the jobs clone (`--webhook-clone-url`):
    /// `ssh` needs the workers' SSH key (`worker_credentials`), `https`
    /// clones public repositories without credentials and private ones with
    /// the credential store. Default: `ssh`.
    #[serde(default)]
    pub clone_url: CloneUrlSpec,
}

impl WebhooksSpec {
    /// Whether any webhook endpoint is on.
    pub fn any(&self) -> bool {
        self.github || self.gitlab
    }
}

/// A delivery's clone URL (`--webhook-clone-url`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CloneUrlSpec {
    /// `git@host:owner/name.git`.
    #[default]
    Ssh,
    /// `https://host/owner/name.git`.
    Https,
}

/// An overlay's sizes for one worker pool, replacing the pool's fields of the same names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolSizesSpec {
    /// Actions run at once per worker (`--concurrency`).
    pub concurrency: usize,
    /// Input file cache budget (`--cache-max-size`).
    pub cache_max_size: String,
    /// Size limit of the work directory emptyDir.
    pub work_dir_size: String,
    /// Largest total size of one action's output files (`--max-output-size`).
    pub max_output_size: String,
    /// Size limit of the `/tmp` emptyDir.
    pub tmp_size: String,
    /// Size limit of the HOME emptyDir.
    pub home_size: String,
    /// CPU and memory of one worker container.
    pub resources: ResourcesSpec,
}

fn default_server_tmp_size() -> String {
    "1Gi".into()
}

fn default_worker_tmp_size() -> String {
    "4Gi".into()
}

fn default_worker_home_size() -> String {
    "1Gi".into()
}

/// Image registry and tag; the images are `REGISTRY/buildkube-server:TAG`
/// and `REGISTRY/buildkube-worker:TAG`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImagesSpec {
    /// Registry and path prefix, e.g. `ghcr.io/acme`; unset for local images
    /// (as loaded into kind).
    #[serde(default)]
    pub registry: Option<String>,
    /// Tag of both images.
    pub tag: String,
}

/// How clients reach the server's gRPC port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ExposeSpec {
    /// Only inside the cluster, through the ClusterIP Service.
    ClusterIp,
    /// A NodePort on every node (for kind, mapped to the host).
    NodePort {
        /// The node port (30000-32767).
        node_port: i32,
    },
    /// A LoadBalancer Service (plaintext gRPC; for private networks).
    LoadBalancer,
    /// The `ingress-tls` component: TLS at the Ingress, host from `ingress`.
    Ingress,
}

/// Where an overlay's TLS certificates come from. With TLS the server's gRPC
/// and HTTP ports speak mutual TLS: every client presents a certificate of
/// the farm's CA (workers theirs, from Secret `buildkube-worker-tls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum TlsKind {
    /// Plaintext gRPC (h2c) inside the cluster.
    #[default]
    None,
    /// Mutual TLS from Secrets you create (`tls.crt`, `tls.key`, `ca.crt`
    /// each): `buildkube-server-tls` and `buildkube-worker-tls`.
    Secrets,
    /// The same Secrets, issued and renewed by cert-manager from a CA of the
    /// overlay's own (the `cert-manager` component).
    CertManager,
}

/// Which autoscaling component an overlay uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum AutoscalingKind {
    /// Fixed replicas.
    None,
    /// KEDA ScaledObjects on the queue depth from Prometheus.
    Keda,
    /// HorizontalPodAutoscalers on the queue depth as an external metric.
    Hpa,
}

/// A local kind cluster for the overlay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KindClusterSpec {
    /// Name of the kind cluster.
    pub name: String,
    /// Host port mapped to the server's node port.
    pub host_port: i32,
}

/// One problem in a spec, naming the field it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, e.g. `worker_pools[0].autoscaling.min_replicas`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

/// Every problem found in a spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecErrors(pub Vec<FieldError>);

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid stack spec:")?;
        for error in &self.0 {
            writeln!(f, "  {}: {}", error.field, error.message)?;
        }
        Ok(())
    }
}

/// Errors reading a spec file.
#[derive(Debug, thiserror::Error)]
pub enum SpecLoadError {
    /// The YAML does not have the spec's shape (unknown or missing field, wrong type).
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// serde_yaml's message, which names the field and line.
        source: serde_yaml::Error,
    },
    /// The YAML parsed but describes an impossible stack.
    #[error("{path}: {source}")]
    Invalid {
        /// The file.
        path: String,
        /// The problems.
        source: SpecErrors,
    },
}

impl StackSpec {
    /// Parses and validates a YAML spec; `path` only names it in errors.
    pub fn from_yaml(path: &str, text: &str) -> Result<StackSpec, SpecLoadError> {
        let spec: StackSpec =
            serde_yaml::from_str(text).map_err(|source| SpecLoadError::Parse {
                path: path.to_string(),
                source,
            })?;
        spec.validate().map_err(|source| SpecLoadError::Invalid {
            path: path.to_string(),
            source,
        })?;
        Ok(spec)
    }

    /// The pool with this name.
    pub fn pool(&self, name: &str) -> Option<&WorkerPoolSpec> {
        self.worker_pools.iter().find(|pool| pool.name == name)
    }

    /// The pool with this name as `overlay` deploys it: its `pool_sizes`
    /// replace the pool's.
    pub fn overlay_pool(&self, overlay: &OverlaySpec, name: &str) -> Option<WorkerPoolSpec> {
        let mut pool = self.pool(name)?.clone();
        if let Some(sizes) = overlay.pool_sizes.get(name) {
            pool.concurrency = sizes.concurrency;
            pool.cache_max_size = sizes.cache_max_size.clone();
            pool.work_dir_size = sizes.work_dir_size.clone();
            pool.max_output_size = sizes.max_output_size.clone();
            pool.tmp_size = sizes.tmp_size.clone();
            pool.home_size = sizes.home_size.clone();
            pool.resources = sizes.resources.clone();
        }
        Some(pool)
    }

    /// The stack as `overlay` deploys it: its server resources and pool
    /// sizes in place of the spec's.
    pub fn for_overlay(&self, overlay: &OverlaySpec) -> StackSpec {
        let mut spec = self.clone();
        if let Some(resources) = &overlay.server_resources {
            spec.server.resources = resources.clone();
        }
        for pool in &mut spec.worker_pools {
            *pool = self
                .overlay_pool(overlay, &pool.name)
                .expect("the pool exists");
        }
        spec
    }
}

mod defaults;
mod validate;

pub use validate::{human_bytes, parse_cidr, quantity_to_bytes};
