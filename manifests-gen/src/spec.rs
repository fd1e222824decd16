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

impl Default for ResourcesSpec {
    fn default() -> Self {
        ResourcesSpec {
            cpu_request: "500m".into(),
            memory_request: "512Mi".into(),
            cpu_limit: None,
            memory_limit: "2Gi".into(),
        }
    }
}

impl Default for StackSpec {
    /// The built-in stack behind the committed `overlays/`.
    fn default() -> Self {
        let instance = buildkube_config::DEFAULT_INSTANCE.to_string();
        let default_pool = WorkerPoolSpec {
            name: "default".into(),
            instance: instance.clone(),
            platform: BTreeMap::from([
                ("OSFamily".into(), "Linux".into()),
                // `plain` runs anywhere; `sandbox` (bubblewrap) needs user
                // namespaces, which most clusters' default seccomp denies.
                (buildkube_config::PLATFORM_RUNNER_KEY.into(), "plain".into()),
            ]),
            replicas: 2,
            concurrency: 4,
            cache_max_size: "10GiB".into(),
            // 10 GiB cache + 4 × (6 GiB outputs + 2 × 256 MiB stdio) = 36 GiB.
            work_dir_size: "40Gi".into(),
            tmp_size: default_worker_tmp_size(),
            home_size: default_worker_home_size(),
            // Bazel's longest test timeout (`eternal`).
            max_action_timeout_secs: 3600,
            max_output_size: "6GiB".into(),
            max_stdio_size: "256MiB".into(),
            // The longest action plus 5 minutes to fetch its inputs and
            // upload its outputs.
            drain_timeout_secs: 3900,
            termination_grace_margin_secs: 60,
            max_unavailable: 1,
            // Credentials reach every action of a pool: off unless a stack opts in.
            git_credentials: false,
            read_only_root_filesystem: true,
            resources: ResourcesSpec {
                cpu_request: "4".into(),
                memory_request: "8Gi".into(),
                cpu_limit: None,
                memory_limit: "16Gi".into(),
            },
            autoscaling: PoolAutoscalingSpec {
                min_replicas: 1,
                max_replicas: 20,
                scale_down_stabilization_secs: 600,
                scale_down_max_pods: 2,
                scale_down_period_secs: 60,
            },
        };
        let images = |registry: Option<&str>, tag: &str| ImagesSpec {
            registry: registry.map(str::to_string),
            tag: tag.to_string(),
        };
        let overlays = BTreeMap::from([
            (
                "example".to_string(),
                OverlaySpec {
                    description: "What you copy: auth and images to fill in.".into(),
                    namespace: "buildkube".into(),
                    images: images(Some("ghcr.io/buildkube"), env!("CARGO_PKG_VERSION")),
                    auth: true,
                    worker_credentials: false,
                    expose: ExposeSpec::ClusterIp,
                    autoscaling: AutoscalingKind::None,
                    prometheus: false,
                    external_stores: false,
                    tls: TlsKind::None,
                    worker_anti_affinity: false,
                    worker_replicas: BTreeMap::new(),
                    server_resources: None,
                    pool_sizes: BTreeMap::new(),
                    kind_cluster: None,
                },
            ),
            (
                "kind".to_string(),
                OverlaySpec {
                    description: "A local kind cluster running locally built images, without auth.".into(),
                    namespace: "buildkube".into(),
                    images: images(None, "dev"),
                    auth: false,
                    worker_credentials: false,
                    expose: ExposeSpec::NodePort { node_port: 30980 },
                    autoscaling: AutoscalingKind::None,
                    prometheus: false,
                    external_stores: false,
                    tls: TlsKind::None,
                    worker_anti_affinity: false,
                    worker_replicas: BTreeMap::from([("default".to_string(), 1)]),
                    // One 4-CPU/8-GiB node, beside kind's control plane
                    // (about 1 CPU and 0.5 GiB requested): room for the
                    // server and two workers while a rollout surges.
                    server_resources: Some(ResourcesSpec {
                        cpu_request: "500m".into(),
                        memory_request: "1Gi".into(),
                        cpu_limit: None,
                        memory_limit: "2Gi".into(),
                    }),
                    pool_sizes: BTreeMap::from([(
                        "default".to_string(),
                        PoolSizesSpec {
                            concurrency: 2,
                            cache_max_size: "2GiB".into(),
                            // 2 GiB cache + 2 × (2 GiB outputs + 2 × 256 MiB stdio) = 7 GiB.
                            work_dir_size: "8Gi".into(),
                            max_output_size: "2GiB".into(),
                            tmp_size: "2Gi".into(),
                            home_size: "512Mi".into(),
                            resources: ResourcesSpec {
                                cpu_request: "1".into(),
                                memory_request: "1536Mi".into(),
                                cpu_limit: None,
                                memory_limit: "3Gi".into(),
                            },
                        },
                    )]),
                    kind_cluster: Some(KindClusterSpec { name: "buildkube".into(), host_port: 8980 }),
                },
            ),
            (
                "production".to_string(),
                OverlaySpec {
                    description: "Auth, TLS ingress, mutual TLS inside (cert-manager), KEDA autoscaling, Prometheus, spread workers, external stores.".into(),
                    namespace: "buildkube".into(),
                    images: images(Some("ghcr.io/buildkube"), env!("CARGO_PKG_VERSION")),
                    auth: true,
                    worker_credentials: false,
                    expose: ExposeSpec::Ingress,
                    autoscaling: AutoscalingKind::Keda,
                    prometheus: true,
                    external_stores: true,
                    tls: TlsKind::CertManager,
                    worker_anti_affinity: true,
                    worker_replicas: BTreeMap::new(),
                    server_resources: None,
                    pool_sizes: BTreeMap::new(),
                    kind_cluster: None,
                },
            ),
        ]);
        StackSpec {
            instances: vec![instance],
            runners: vec!["plain".into(), "sandbox".into()],
            server: ServerSpec {
                storage_size: "100Gi".into(),
                storage_class: None,
                cas_max_size: "90GiB".into(),
                lease_timeout_secs: 30,
                max_attempts: 3,
                tmp_size: default_server_tmp_size(),
                resources: ResourcesSpec {
                    cpu_request: "2".into(),
                    memory_request: "4Gi".into(),
                    cpu_limit: None,
                    memory_limit: "8Gi".into(),
                },
                log_format: LogFormatSpec::Json,
            },
            worker_pools: vec![default_pool],
            monitoring: MonitoringSpec {
                prometheus_url: "http://prometheus-operated.monitoring.svc:9090".into(),
                scrape_interval: "15s".into(),
                namespace_labels: BTreeMap::from([(
                    "kubernetes.io/metadata.name".into(),
                    "monitoring".into(),
                )]),
            },
            worker_egress: Vec::new(),
            ingress: IngressSpec {
                host: "buildkube.example.com".into(),
                class_name: "nginx".into(),
                cluster_issuer: "letsencrypt".into(),
            },
            external_stores: ExternalStoresSpec {
                postgres_image: "postgres:16.4-bookworm".into(),
                postgres_storage_size: "20Gi".into(),
                redis_image: "redis:7.4.1-bookworm".into(),
                redis_memory: "1Gi".into(),
            },
            overlays,
        }
    }
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

    /// Checks everything that serde cannot: names, references between
    /// fields, bounds. Returns every problem, each naming its field.
    pub fn validate(&self) -> Result<(), SpecErrors> {
        let mut v = Validator::default();
        if self.instances.is_empty() {
            v.error("instances", "at least one instance name is required");
        }
        for (i, instance) in self.instances.iter().enumerate() {
            v.instance_name(&format!("instances[{i}]"), instance);
            if self.instances[..i].contains(instance) {
                v.error(
                    &format!("instances[{i}]"),
                    format!("`{instance}` is listed twice"),
                );
            }
        }
        if self.runners.is_empty() {
            v.error("runners", "at least one runner is required");
        }
        for (i, runner) in self.runners.iter().enumerate() {
            v.label_value(&format!("runners[{i}]"), runner);
        }

        let server = &self.server;
        let storage = v.quantity_bytes("server.storage_size", &server.storage_size);
        let cas = v.byte_size("server.cas_max_size", &server.cas_max_size);
        if let (Some(storage), Some(cas)) = (storage, cas) {
            if cas > storage {
                v.error(
                    "server.cas_max_size",
                    format!(
                        "{} does not fit in server.storage_size {}",
                        server.cas_max_size, server.storage_size
                    ),
                );
            }
        }
        if server.lease_timeout_secs == 0 {
            v.error("server.lease_timeout_secs", "must be at least 1");
        }
        if server.max_attempts == 0 {
            v.error("server.max_attempts", "must be at least 1");
        }
        if let Some(class) = &server.storage_class {
            v.dns_subdomain("server.storage_class", class);
        }
        v.resources("server.resources", &server.resources);
        v.quantity_bytes("server.tmp_size", &server.tmp_size);

        if self.worker_pools.is_empty() {
            v.error("worker_pools", "at least one worker pool is required");
        }
        for (i, pool) in self.worker_pools.iter().enumerate() {
            let at = |field: &str| format!("worker_pools[{i}].{field}");
            v.dns_label(&at("name"), &pool.name, "buildkube-worker-".len());
            if self.worker_pools[..i]
                .iter()
                .any(|other| other.name == pool.name)
            {
                v.error(
                    &at("name"),
                    format!("pool `{}` is defined twice", pool.name),
                );
            }
            if !self.instances.contains(&pool.instance) {
                v.error(
                    &at("instance"),
                    format!(
                        "`{}` is not one of the served instances {:?}",
                        pool.instance, self.instances
                    ),
                );
            }
            for (key, value) in &pool.platform {
                v.platform_key(&at(&format!("platform.{key}")), key);
                if value.contains(',') {
                    v.error(
                        &at(&format!("platform.{key}")),
                        "a value must not contain `,`",
                    );
                }
            }
            match pool.platform.get(buildkube_config::PLATFORM_RUNNER_KEY) {
                None => v.error(
                    &at("platform"),
                    format!(
                        "no `{}` property: no runner would serve this pool (runners: {:?})",
                        buildkube_config::PLATFORM_RUNNER_KEY,
                        self.runners
                    ),
                ),
                Some(runner) if !self.runners.contains(runner) => v.error(
                    &at(&format!(
                        "platform.{}",
                        buildkube_config::PLATFORM_RUNNER_KEY
                    )),
                    format!(
                        "no runner serves `{runner}`; the runners are {:?}",
                        self.runners
                    ),
                ),
                Some(_) => {}
            }
            if pool.replicas < 0 {
                v.error(&at("replicas"), "must not be negative");
            }
            v.pool_sizes(&at, pool);
            if pool.max_action_timeout_secs == 0 {
                v.error(&at("max_action_timeout_secs"), "must be at least 1");
            }
            if pool.drain_timeout_secs < pool.max_action_timeout_secs {
                v.error(
                    &at("drain_timeout_secs"),
                    format!(
                        "{} is less than max_action_timeout_secs {}: a scale-down would kill \
                         actions that are within their timeout",
                        pool.drain_timeout_secs, pool.max_action_timeout_secs
                    ),
                );
            }
            // Each platform's load is counted for the first pool that can run
            // it; a pool all of whose platforms an earlier one runs would
            // never be scaled.
            if let Some(earlier) = self.worker_pools[..i].iter().find(|other| {
                other.instance == pool.instance
                    && pool
                        .platform
                        .iter()
                        .all(|(k, v)| other.platform.get(k) == Some(v))
            }) {
                v.error(
                    &at("platform"),
                    format!(
                        "pool `{}`, listed before, offers all of it, so the autoscaler counts \
                         this pool's work for that one; list this pool first or give it a \
                         property of its own",
                        earlier.name
                    ),
                );
            }
            if pool.platform.len() > MAX_POOL_PROPERTIES {
                v.error(
                    &at("platform"),
                    format!(
                        "{} properties; at most {MAX_POOL_PROPERTIES}: the autoscaler query \
                         lists every subset of them",
                        pool.platform.len()
                    ),
                );
            }
            if pool.termination_grace_margin_secs == 0 {
                v.error(
                    &at("termination_grace_margin_secs"),
                    "must be at least 1 so the pod outlives the drain",
                );
            }
            if pool.max_unavailable < 1 {
                v.error(
                    &at("max_unavailable"),
                    "must be at least 1 or node drains block forever",
                );
            }
            let bounds = &pool.autoscaling;
            if bounds.min_replicas < 0 {
                v.error(&at("autoscaling.min_replicas"), "must not be negative");
            }
            if bounds.max_replicas < 1 {
                v.error(&at("autoscaling.max_replicas"), "must be at least 1");
            }
            if bounds.scale_down_stabilization_secs < 0
                || bounds.scale_down_stabilization_secs > 3600
            {
                v.error(
                    &at("autoscaling.scale_down_stabilization_secs"),
                    "must be 0-3600 (the HPA's limit)",
                );
            }
            if bounds.scale_down_max_pods < 1 {
                v.error(
                    &at("autoscaling.scale_down_max_pods"),
                    "must be at least 1 or the pool never scales down",
                );
            }
            if !(1..=1800).contains(&bounds.scale_down_period_secs) {
                v.error(
                    &at("autoscaling.scale_down_period_secs"),
                    "must be 1-1800 (the HPA's limit)",
                );
            }
            if bounds.min_replicas > bounds.max_replicas {
                v.error(
                    &at("autoscaling.min_replicas"),
                    format!(
                        "{} is greater than max_replicas {}",
                        bounds.min_replicas, bounds.max_replicas
                    ),
                );
            }
        }

        if !self.monitoring.prometheus_url.starts_with("http://")
            && !self.monitoring.prometheus_url.starts_with("https://")
        {
            v.error(
                "monitoring.prometheus_url",
                "must start with http:// or https://",
            );
        }
        if !Regex::new(r"^[0-9]+(ms|s|m|h)$")
            .unwrap()
            .is_match(&self.monitoring.scrape_interval)
        {
            v.error(
                "monitoring.scrape_interval",
                "must be a duration such as 15s or 1m",
            );
        }
        v.dns_subdomain("ingress.host", &self.ingress.host);
        v.dns_subdomain("ingress.class_name", &self.ingress.class_name);
        v.dns_subdomain("ingress.cluster_issuer", &self.ingress.cluster_issuer);
        v.image_reference(
            "external_stores.postgres_image",
            &self.external_stores.postgres_image,
        );
        v.image_reference(
            "external_stores.redis_image",
            &self.external_stores.redis_image,
        );
        v.quantity_bytes(
            "external_stores.postgres_storage_size",
            &self.external_stores.postgres_storage_size,
        );
        if v.quantity_bytes(
            "external_stores.redis_memory",
            &self.external_stores.redis_memory,
        )
        .is_some_and(|bytes| bytes < 64 << 20)
        {
            v.error("external_stores.redis_memory", "must be at least 64Mi");
        }
        if self.monitoring.namespace_labels.is_empty() {
            v.error(
                "monitoring.namespace_labels",
                "at least one label: empty would admit every namespace to the metrics port",
            );
        }
        for (key, value) in &self.monitoring.namespace_labels {
            v.label_value(&format!("monitoring.namespace_labels.{key}"), value);
        }
        for (i, allow) in self.worker_egress.iter().enumerate() {
            if let Err(message) = parse_cidr(&allow.cidr) {
                v.error(&format!("worker_egress[{i}].cidr"), message);
            }
            if allow.ports.contains(&0) {
                v.error(&format!("worker_egress[{i}].ports"), "0 is not a port");
            }
        }

        if self.overlays.is_empty() {
            v.error("overlays", "at least one overlay is required");
        }
        let registry_re =
            Regex::new(r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)*$")
                .unwrap();
        let tag_re = Regex::new(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$").unwrap();
        for (name, overlay) in &self.overlays {
            let at = |field: &str| format!("overlays.{name}.{field}");
            if RESERVED_OVERLAY_NAMES.contains(&name.as_str()) {
                v.error(
                    &format!("overlays.{name}"),
                    format!("`{name}` is reserved for the generated tree"),
                );
            }
            v.dns_label(&format!("overlays.{name}"), name, 0);
            v.dns_label(&at("namespace"), &overlay.namespace, 0);
            if let Some(registry) = &overlay.images.registry {
                if !registry_re.is_match(registry) {
                    v.error(
                        &at("images.registry"),
                        format!("`{registry}` is not a registry/path prefix (lowercase, e.g. ghcr.io/acme)"),
                    );
                }
            }
            if !tag_re.is_match(&overlay.images.tag) {
                v.error(
                    &at("images.tag"),
                    format!("`{}` is not an image tag", overlay.images.tag),
                );
            } else if overlay.images.tag == "latest" {
                v.error(
                    &at("images.tag"),
                    "pin a version: `latest` changes under a running stack",
                );
            }
            if let ExposeSpec::NodePort { node_port } = overlay.expose {
                if !(30000..=32767).contains(&node_port) {
                    v.error(
                        &at("expose.node_port"),
                        format!("{node_port} is outside 30000-32767"),
                    );
                }
            }
            if overlay.kind_cluster.is_some()
                && !matches!(overlay.expose, ExposeSpec::NodePort { .. })
            {
                v.error(
                    &at("kind_cluster"),
                    "needs `expose: {type: node-port}` to reach the server from the host",
                );
            }
            if let Some(kind) = &overlay.kind_cluster {
                v.dns_label(&at("kind_cluster.name"), &kind.name, 0);
                if !(1..=65535).contains(&kind.host_port) {
                    v.error(
                        &at("kind_cluster.host_port"),
                        format!("{} is not a port", kind.host_port),
                    );
                }
            }
            if overlay.autoscaling != AutoscalingKind::None && !overlay.worker_replicas.is_empty() {
                v.error(
                    &at("worker_replicas"),
                    "the autoscaler sets the replicas; set worker_pools[].autoscaling bounds instead",
                );
            }
            if overlay.worker_credentials && !self.worker_pools.iter().any(|p| p.git_credentials) {
                v.error(
                    &at("worker_credentials"),
                    "no worker pool sets git_credentials, so the credentials would reach nothing",
                );
            }
            if let Some(resources) = &overlay.server_resources {
                v.resources(&at("server_resources"), resources);
            }
            for name in overlay.pool_sizes.keys() {
                let field = |f: &str| at(&format!("pool_sizes.{name}.{f}"));
                match self.overlay_pool(overlay, name) {
                    None => v.error(
                        &at(&format!("pool_sizes.{name}")),
                        format!("no worker pool is named `{name}`"),
                    ),
                    Some(pool) => v.pool_sizes(&field, &pool),
                }
            }
            for (pool, replicas) in &overlay.worker_replicas {
                match self.pool(pool) {
                    None => v.error(
                        &at(&format!("worker_replicas.{pool}")),
                        format!("no worker pool is named `{pool}`"),
                    ),
                    Some(_) if *replicas < 0 => v.error(
                        &at(&format!("worker_replicas.{pool}")),
                        "must not be negative",
                    ),
                    Some(_) => {}
                }
            }
        }
        v.finish()
    }
}

/// Parses `ADDRESS/PREFIX` (IPv4 or IPv6) into the address and prefix length.
pub fn parse_cidr(cidr: &str) -> Result<(std::net::IpAddr, u8), String> {
    let bad = || format!("`{cidr}` is not a CIDR such as 10.0.0.0/8 or fd00::/8");
    let (address, prefix) = cidr.split_once('/').ok_or_else(bad)?;
    let address: std::net::IpAddr = address.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    let max = if address.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(bad());
    }
    Ok((address, prefix))
}

#[derive(Default)]
struct Validator {
    errors: Vec<FieldError>,
}

impl Validator {
    fn error(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(FieldError {
            field: field.to_string(),
            message: message.into(),
        });
    }

    fn finish(self) -> Result<(), SpecErrors> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(SpecErrors(self.errors))
        }
    }

    /// A DNS-1123 label; `prefix_len` counts a prefix the name will get.
    fn dns_label(&mut self, field: &str, value: &str, prefix_len: usize) {
        let re = Regex::new(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$").unwrap();
        if !re.is_match(value) {
            self.error(
                field,
                format!("`{value}` is not a DNS label (lowercase letters, digits, `-`)"),
            );
        } else if value.len() + prefix_len > 63 {
            self.error(
                field,
                format!("`{value}` is too long: names are at most 63 characters with their prefix"),
            );
        }
    }

    fn dns_subdomain(&mut self, field: &str, value: &str) {
        let re = Regex::new(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
            .unwrap();
        if !re.is_match(value) || value.len() > 253 {
            self.error(field, format!("`{value}` is not a DNS name"));
        }
    }

    fn label_value(&mut self, field: &str, value: &str) {
        let re = Regex::new(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$").unwrap();
        if !re.is_match(value) {
            self.error(
                field,
                format!("`{value}` must be letters, digits, `-_.`, at most 63"),
            );
        }
    }

    fn platform_key(&mut self, field: &str, key: &str) {
        let re = Regex::new(r"^[A-Za-z][A-Za-z0-9_.-]*$").unwrap();
        if !re.is_match(key) {
            self.error(field, format!("`{key}` is not a platform property name"));
        }
    }

    fn instance_name(&mut self, field: &str, name: &str) {
        if let Err(message) = buildkube_config::check_instance_name(name) {
            self.error(field, message);
        }
    }

    fn image_reference(&mut self, field: &str, reference: &str) {
        let re = Regex::new(
            r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)*(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?$",
        )
        .unwrap();
        if !re.is_match(reference) {
            self.error(field, format!("`{reference}` is not an image reference"));
        } else if !reference.contains(':') || reference.ends_with(":latest") {
            self.error(
                field,
                format!("`{reference}` must pin a tag other than latest"),
            );
        }
    }

    fn byte_size(&mut self, field: &str, value: &str) -> Option<u64> {
        match buildkube_config::parse_byte_size(value) {
            Ok(bytes) => Some(bytes),
            Err(message) => {
                self.error(field, message);
                None
            }
        }
    }

    fn quantity_bytes(&mut self, field: &str, value: &str) -> Option<u64> {
        match quantity_to_bytes(value) {
            Some(bytes) => Some(bytes),
            None => {
                self.error(
                    field,
                    format!("`{value}` is not a Kubernetes quantity of bytes (e.g. 512Mi, 20Gi)"),
                );
                None
            }
        }
    }

    /// A pool's sizes: the work directory holds the cache and, for each
    /// running action, its outputs, stdout and stderr.
    fn pool_sizes(&mut self, at: &dyn Fn(&str) -> String, pool: &WorkerPoolSpec) {
        if pool.concurrency == 0 {
            self.error(&at("concurrency"), "must be at least 1");
        }
        let cache = self.byte_size(&at("cache_max_size"), &pool.cache_max_size);
        let work = self.quantity_bytes(&at("work_dir_size"), &pool.work_dir_size);
        let output = self.byte_size(&at("max_output_size"), &pool.max_output_size);
        let stdio = self.byte_size(&at("max_stdio_size"), &pool.max_stdio_size);
        if stdio == Some(0) {
            self.error(&at("max_stdio_size"), "must be at least 1 byte");
        }
        self.quantity_bytes(&at("tmp_size"), &pool.tmp_size);
        self.quantity_bytes(&at("home_size"), &pool.home_size);
        if let (Some(cache), Some(work), Some(output), Some(stdio)) = (cache, work, output, stdio) {
            let needed = (pool.concurrency as u64)
                .checked_mul(output.saturating_add(stdio.saturating_mul(2)))
                .and_then(|actions| actions.checked_add(cache));
            if needed.is_none_or(|needed| needed > work) {
                self.error(
                    &at("work_dir_size"),
                    format!(
                        "{} is less than cache_max_size {} + concurrency {} × (max_output_size {} \
                         + 2 × max_stdio_size {}) = {}: a full work directory would get the pod \
                         evicted with every action on it",
                        pool.work_dir_size,
                        pool.cache_max_size,
                        pool.concurrency,
                        pool.max_output_size,
                        pool.max_stdio_size,
                        needed.map_or("more than 16 EiB".into(), human_bytes),
                    ),
                );
            }
        }
        self.resources(&at("resources"), &pool.resources);
    }

    fn cpu(&mut self, field: &str, value: &str) {
        if !Regex::new(r"^([0-9]+(\.[0-9]+)?|[0-9]+m)$")
            .unwrap()
            .is_match(value)
            || cpu_millis(value) == Some(0)
        {
            self.error(
                field,
                format!("`{value}` is not a CPU quantity (e.g. 500m, 2)"),
            );
        }
    }

    fn resources(&mut self, at: &str, resources: &ResourcesSpec) {
        self.cpu(&format!("{at}.cpu_request"), &resources.cpu_request);
        let request =
            self.quantity_bytes(&format!("{at}.memory_request"), &resources.memory_request);
        let limit = self.quantity_bytes(&format!("{at}.memory_limit"), &resources.memory_limit);
        if let (Some(request), Some(limit)) = (request, limit) {
            if request > limit {
                self.error(
                    &format!("{at}.memory_request"),
                    format!(
                        "{} exceeds memory_limit {}",
                        resources.memory_request, resources.memory_limit
                    ),
                );
            }
        }
        if let Some(cpu_limit) = &resources.cpu_limit {
            self.cpu(&format!("{at}.cpu_limit"), cpu_limit);
            if let (Some(request), Some(limit)) =
                (cpu_millis(&resources.cpu_request), cpu_millis(cpu_limit))
            {
                if request > limit {
                    self.error(
                        &format!("{at}.cpu_request"),
                        format!("{} exceeds cpu_limit {cpu_limit}", resources.cpu_request),
                    );
                }
            }
        }
    }
}

/// Bytes of a Kubernetes quantity such as `20Gi`, `500M` or `1024`.
pub fn quantity_to_bytes(value: &str) -> Option<u64> {
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, suffix) = value.split_at(split);
    let number: u64 = number.parse().ok()?;
    let multiplier: u64 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return None,
    };
    number.checked_mul(multiplier)
}

/// Bytes in binary units, e.g. `36GiB`, `1536MiB`, `100B`.
pub fn human_bytes(bytes: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes}B")
}

fn cpu_millis(value: &str) -> Option<u64> {
    if let Some(millis) = value.strip_suffix('m') {
        return millis.parse().ok();
    }
    let cores: f64 = value.parse().ok()?;
    Some((cores * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_spec_is_valid() {
        StackSpec::default().validate().unwrap();
    }

    #[test]
    fn default_spec_round_trips_through_yaml() {
        let spec = StackSpec::default();
        let text = serde_yaml::to_string(&spec).unwrap();
        assert_eq!(StackSpec::from_yaml("default.yaml", &text).unwrap(), spec);
    }

    #[test]
    fn quantities() {
        assert_eq!(quantity_to_bytes("20Gi"), Some(20 << 30));
        assert_eq!(quantity_to_bytes("5G"), Some(5_000_000_000));
        assert_eq!(quantity_to_bytes("1.5Gi"), None);
        assert_eq!(cpu_millis("500m"), Some(500));
        assert_eq!(cpu_millis("2"), Some(2000));
    }
}
