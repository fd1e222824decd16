//! Kubernetes objects as typed k8s-openapi values, built by functions of the
//! stack spec. Every name, port, label and path they share is a constant here
//! or in `buildkube-config`; container arguments come from
//! `ServerArgs::to_args` / `WorkerArgs::to_args`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use buildkube_config::storage::{
    FilesystemStore, PostgresStore, ReadCacheStore, RedisStore, SizePartitionedStore,
    StorageConfig, StoreConfig,
};
use buildkube_config::{
    LogFormat, ServerArgs, WorkerArgs, DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT, DEFAULT_METRICS_PORT,
    DEFAULT_WORKER_HTTP_PORT, HEALTHZ_PATH, READYZ_PATH,
};
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment, StatefulSet,
    StatefulSetSpec,
};
use k8s_openapi::api::core::v1::PodAntiAffinity;
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort,
    EmptyDirVolumeSource, EnvVar, EnvVarSource, ExecAction, HTTPGetAction, ObjectFieldSelector,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource,
    PodAffinityTerm, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
    SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext, Service,
    ServiceAccount, ServicePort, ServiceSpec, Volume, VolumeMount, VolumeResourceRequirements,
    WeightedPodAffinityTerm,
};
use k8s_openapi::api::networking::v1::{
    HTTPIngressPath, HTTPIngressRuleValue, Ingress, IngressBackend, IngressRule,
    IngressServiceBackend, IngressSpec as K8sIngressSpec, IngressTLS, NetworkPolicy,
    NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
    ServiceBackendPort,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::crd::{Endpoint, ServiceMonitor, ServiceMonitorSpec};
use crate::spec::{
    quantity_to_bytes, LogFormatSpec, ResourcesSpec, StackSpec, WebhooksSpec, WorkerPoolSpec,
};

/// Name of the server Deployment, Service, ServiceAccount and NetworkPolicy.
pub const SERVER_NAME: &str = "buildkube-server";
/// Prefix of a worker pool's Deployment name.
pub const WORKER_NAME_PREFIX: &str = "buildkube-worker-";
/// Name of the workers' ServiceAccount and NetworkPolicy.
pub const WORKER_NAME: &str = "buildkube-worker";
/// Image name of the server in the base (overlays pin registry and tag).
pub const SERVER_IMAGE: &str = "buildkube-server";
/// Image name of the worker in the base (overlays pin registry and tag).
pub const WORKER_IMAGE: &str = "buildkube-worker";
/// Name of the server container.
pub const SERVER_CONTAINER: &str = "server";
/// Name of the worker container.
pub const WORKER_CONTAINER: &str = "worker";
/// PersistentVolumeClaim holding the CAS.
pub const SERVER_DATA_PVC: &str = "buildkube-server-data";
/// Secret with the workers' git credentials, SSH key, known_hosts and env script.
pub const WORKER_CREDENTIALS_SECRET: &str = "buildkube-worker-credentials";
/// Keys of [`WORKER_CREDENTIALS_SECRET`]: the files the worker's
/// `--git-credentials-dir` reads.
pub const GIT_CREDENTIALS_KEY: &str = buildkube_config::GIT_CREDENTIALS_FILE;
/// SSH private key in [`WORKER_CREDENTIALS_SECRET`].
pub const SSH_KEY_KEY: &str = buildkube_config::SSH_KEY_FILE;
/// known_hosts in [`WORKER_CREDENTIALS_SECRET`].
pub const KNOWN_HOSTS_KEY: &str = buildkube_config::KNOWN_HOSTS_FILE;
/// Env script in [`WORKER_CREDENTIALS_SECRET`].
pub const ENV_SCRIPT_KEY: &str = "env.sh";
/// Secret with PostgreSQL's password (key [`POSTGRES_PASSWORD_KEY`]).
pub const POSTGRES_SECRET: &str = "buildkube-postgres";
/// Key of the password in [`POSTGRES_SECRET`].
pub const POSTGRES_PASSWORD_KEY: &str = "password";
/// PostgreSQL StatefulSet and Service.
pub const POSTGRES_NAME: &str = "buildkube-postgres";
/// Redis Deployment and Service.
pub const REDIS_NAME: &str = "buildkube-redis";
/// PostgreSQL role and database of the external stores.
pub const POSTGRES_USER: &str = "buildkube";
/// ConfigMap holding the server's `--storage-config` (key [`STORAGE_CONFIG_KEY`]).
pub const STORAGE_CONFIGMAP: &str = "buildkube-storage";
/// Key of the storage config in [`STORAGE_CONFIGMAP`].
pub const STORAGE_CONFIG_KEY: &str = "storage.yaml";
/// Where [`STORAGE_CONFIGMAP`] is mounted in the server.
pub const STORAGE_MOUNT_DIR: &str = "/etc/buildkube/storage";
/// Where [`POSTGRES_SECRET`] is mounted in the server.
pub const POSTGRES_MOUNT_DIR: &str = "/etc/buildkube/postgres";
/// Blobs up to this size go to PostgreSQL (behind the server's read cache);
/// larger ones stay on the server's volume. Also PostgreSQL's `max_blob_size`.
pub const POSTGRES_BLOB_LIMIT: u64 = 64 << 20;
/// Share of PostgreSQL's volume given to CAS blobs (its `max_size`); the
/// rest holds indexes, WAL, and deleted rows until autovacuum reuses them.
pub const POSTGRES_VOLUME_PERCENT: u64 = 60;
/// TLS Secret that cert-manager fills for the Ingress.
pub const TLS_SECRET: &str = "buildkube-tls";
/// Annotation that makes cert-manager issue [`TLS_SECRET`].
pub const CERT_MANAGER_ISSUER_ANNOTATION: &str = "cert-manager.io/cluster-issuer";

/// Name of the gRPC port on containers and Services.
pub const GRPC_PORT_NAME: &str = "grpc";
/// Name of the HTTP port on containers and Services.
pub const HTTP_PORT_NAME: &str = "http";
/// Name of the server's metrics port (`--metrics-listen`: /metrics and the
/// probes, plain HTTP) on its container and Service.
pub const METRICS_PORT_NAME: &str = "metrics";
/// Port of PostgreSQL.
pub const POSTGRES_PORT: i32 = 5432;
/// Port of Redis.
pub const REDIS_PORT: i32 = 6379;

/// uid and gid of the buildkube processes (the images' user).
pub const RUN_AS_ID: i64 = 10001;
/// Server data directory (the PVC).
pub const SERVER_DATA_DIR: &str = "/var/lib/buildkube";
/// Worker work directory (an emptyDir).
pub const WORKER_WORK_DIR: &str = "/var/lib/buildkube-worker";
/// HOME of the worker (an emptyDir).
pub const WORKER_HOME: &str = "/home/buildkube";
/// Where [`WORKER_CREDENTIALS_SECRET`] is mounted.
pub const CREDENTIALS_MOUNT_DIR: &str = "/etc/buildkube/credentials";

const LABEL_NAME: &str = "app.kubernetes.io/name";
const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
const LABEL_POOL: &str = "buildkube.dev/pool";
const LABEL_PART_OF: &str = "app.kubernetes.io/part-of";

fn map<const N: usize>(entries: [(&str, &str); N]) -> BTreeMap<String, String> {
    entries
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Labels selecting the server pod.
pub fn server_selector() -> BTreeMap<String, String> {
    map([(LABEL_NAME, "buildkube"), (LABEL_COMPONENT, "server")])
}

/// Labels selecting every worker pod, whatever its pool.
pub fn workers_selector() -> BTreeMap<String, String> {
    map([(LABEL_NAME, "buildkube"), (LABEL_COMPONENT, "worker")])
}

/// Labels selecting the pods of one pool.
pub fn pool_selector(pool: &str) -> BTreeMap<String, String> {
    let mut labels = workers_selector();
    labels.insert(LABEL_POOL.into(), pool.into());
    labels
}

fn store_selector(component: &str) -> BTreeMap<String, String> {
    map([(LABEL_NAME, "buildkube"), (LABEL_COMPONENT, component)])
}

fn with_part_of(mut labels: BTreeMap<String, String>) -> BTreeMap<String, String> {
    labels.insert(LABEL_PART_OF.into(), "buildkube".into());
    labels
}

pub(crate) fn meta(name: &str, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        labels: Some(with_part_of(labels)),
        ..Default::default()
    }
}

fn selector(labels: BTreeMap<String, String>) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels),
        ..Default::default()
    }
}

/// Deployment name of a worker pool.
pub fn worker_deployment_name(pool: &str) -> String {
    format!("{WORKER_NAME_PREFIX}{pool}")
}

/// In-cluster gRPC address the workers use (same namespace, so the short
/// name, which the server certificate carries); `https://` with TLS.
pub fn server_grpc_url(tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    format!("{scheme}://{SERVER_NAME}:{DEFAULT_GRPC_PORT}")
}

fn log_format(spec: &StackSpec) -> LogFormat {
    match spec.server.log_format {
        LogFormatSpec::Text => LogFormat::Text,
        LogFormatSpec::Json => LogFormat::Json,
    }
}

fn any_addr(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))
}

/// The server's flags; `auth` adds the auth config, `external_stores` the
/// storage config of [`external_storage_config`], `tls` the certificate
/// files of the `tls` component (mutual TLS), `webhooks` the webhook
/// secret files and clone URL.
// `..Default` keeps flags added to the binary later at their defaults until
// the spec models them, even when every current field is set here.
#[allow(clippy::needless_update)]
pub fn server_args(
    spec: &StackSpec,
    auth: bool,
    external_stores: bool,
    tls: bool,
    webhooks: &WebhooksSpec,
) -> ServerArgs {
    ServerArgs {
        listen: any_addr(DEFAULT_GRPC_PORT),
        http_listen: any_addr(DEFAULT_HTTP_PORT),
        metrics_listen: any_addr(DEFAULT_METRICS_PORT),
        tls: if tls {
            crate::tls::server_tls_args()
        } else {
            Default::default()
        },
        data_dir: SERVER_DATA_DIR.into(),
        instances: spec.instances.clone(),
        local_workers: 0,
        cas_max_size: buildkube_config::parse_byte_size(&spec.server.cas_max_size)
            .expect("validated: server.cas_max_size"),
        lease_timeout_secs: spec.server.lease_timeout_secs,
        max_attempts: spec.server.max_attempts,
        auth_config: auth.then(crate::auth::auth_config_path),
        log_format: log_format(spec),
        addr_file: None,
        storage_config: external_stores.then(storage_config_path),
        jobs: crate::jobs::job_args(webhooks),
        // Flags added later keep the binary's defaults until the spec models them.
        ..ServerArgs::default()
    }
}

/// A worker pool's flags; `auth` adds the worker token file, `credentials`
/// the git credentials directory and the env script, `tls` an `https://`
/// server and the worker's certificate; a pool with `jobs` runs steps,
/// with the hooks directory.
#[allow(clippy::needless_update)]
pub fn worker_args(
    spec: &StackSpec,
    pool: &WorkerPoolSpec,
    auth: bool,
    credentials: bool,
    tls: bool,
) -> WorkerArgs {
    WorkerArgs {
        server: server_grpc_url(tls),
        tls: if tls {
            crate::tls::worker_tls_args()
        } else {
            Default::default()
        },
        instance: pool.instance.clone(),
        work_dir: WORKER_WORK_DIR.into(),
        concurrency: Some(pool.concurrency),
        platform: pool
            .platform
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        // From the pod name, through the flag's env fallback
        // (WORKER_ID_ENV): an argument substitution such as `$(POD_NAME)`
        // is expanded by the kubelet but not by every runtime (podman).
        worker_id: None,
        auth_token_file: auth.then(crate::auth::worker_token_path),
        env_script: credentials
            .then(|| PathBuf::from(format!("{CREDENTIALS_MOUNT_DIR}/{ENV_SCRIPT_KEY}"))),
        git_credentials_dir: credentials.then(|| PathBuf::from(CREDENTIALS_MOUNT_DIR)),
        run_steps: pool.jobs,
        hooks_dir: pool.jobs.then(crate::jobs::hooks_dir),
        cache_max_size: buildkube_config::parse_byte_size(&pool.cache_max_size)
            .expect("validated: cache_max_size"),
        drain_timeout_secs: pool.drain_timeout_secs,
        max_output_size: buildkube_config::parse_byte_size(&pool.max_output_size)
            .expect("validated: max_output_size"),
        max_stdio_size: buildkube_config::parse_byte_size(&pool.max_stdio_size)
            .expect("validated: max_stdio_size"),
        max_action_timeout_secs: pool.max_action_timeout_secs,
        http_listen: any_addr(DEFAULT_WORKER_HTTP_PORT),
        log_format: log_format(spec),
        // Flags added later keep the binary's defaults until the spec models them.
        ..WorkerArgs::default()
    }
}

/// terminationGracePeriodSeconds of a pool: the drain (at least the longest
/// action, by validation) plus a margin to report the last results, so the
/// kubelet never SIGKILLs a worker whose action is within its timeout.
pub fn termination_grace_secs(pool: &WorkerPoolSpec) -> i64 {
    (pool.drain_timeout_secs + pool.termination_grace_margin_secs) as i64
}

/// Ephemeral storage a container gets beyond its emptyDirs: its logs (the
/// kubelet keeps 5 × 10 MiB by default) and writes to a writable root
/// filesystem, which the manifests keep read-only by default.
pub const EPHEMERAL_STORAGE_ALLOWANCE: u64 = 256 << 20;
/// Size limit of the small scratch emptyDirs of PostgreSQL (its socket) and
/// Redis (which persists nothing).
const STORE_SCRATCH_SIZE: &str = "64Mi";

/// A byte count as a Kubernetes quantity (`36Gi`, `1280Mi`, `1000`).
pub fn quantity(bytes: u64) -> Quantity {
    let text = if bytes.is_multiple_of(1 << 30) {
        format!("{}Gi", bytes >> 30)
    } else if bytes.is_multiple_of(1 << 20) {
        format!("{}Mi", bytes >> 20)
    } else {
        bytes.to_string()
    };
    Quantity(text)
}

/// Bytes of validated Kubernetes quantities, summed.
fn sum_of(quantities: &[&str]) -> u64 {
    quantities
        .iter()
        .map(|q| quantity_to_bytes(q).expect("validated: a quantity of bytes"))
        .sum()
}

/// Requests and limits: CPU and memory from the spec; ephemeral storage
/// requested and limited at `ephemeral` bytes (the pod's emptyDirs plus
/// [`EPHEMERAL_STORAGE_ALLOWANCE`]), so the scheduler reserves the disk that
/// the size limits allow.
fn resources(spec: &ResourcesSpec, ephemeral: u64) -> ResourceRequirements {
    let mut limits = BTreeMap::from([
        ("memory".to_string(), Quantity(spec.memory_limit.clone())),
        ("ephemeral-storage".to_string(), quantity(ephemeral)),
    ]);
    if let Some(cpu) = &spec.cpu_limit {
        limits.insert("cpu".into(), Quantity(cpu.clone()));
    }
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity(spec.cpu_request.clone())),
            ("memory".to_string(), Quantity(spec.memory_request.clone())),
            ("ephemeral-storage".to_string(), quantity(ephemeral)),
        ])),
        limits: Some(limits),
        ..Default::default()
    }
}

/// Ephemeral storage of the server container: its `/tmp` and the allowance.
pub fn server_ephemeral_bytes(spec: &StackSpec) -> u64 {
    sum_of(&[&spec.server.tmp_size]) + EPHEMERAL_STORAGE_ALLOWANCE
}

/// Ephemeral storage of a worker container: the work directory, `/tmp` and
/// HOME at their size limits, and the allowance.
pub fn worker_ephemeral_bytes(pool: &WorkerPoolSpec) -> u64 {
    sum_of(&[&pool.work_dir_size, &pool.tmp_size, &pool.home_size]) + EPHEMERAL_STORAGE_ALLOWANCE
}

/// The server container's requests and limits.
pub fn server_resources(spec: &StackSpec) -> ResourceRequirements {
    resources(&spec.server.resources, server_ephemeral_bytes(spec))
}

/// A worker container's requests and limits.
pub fn worker_resources(pool: &WorkerPoolSpec) -> ResourceRequirements {
    resources(&pool.resources, worker_ephemeral_bytes(pool))
}

/// The emptyDirs of a worker pod, each with its size limit: work
/// directory, HOME, `/tmp`.
pub fn worker_volumes(pool: &WorkerPoolSpec) -> Vec<Volume> {
    vec![
        empty_dir("work", Some(&pool.work_dir_size)),
        empty_dir("home", Some(&pool.home_size)),
        empty_dir("tmp", Some(&pool.tmp_size)),
    ]
}

fn pod_security(id: i64) -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(id),
        run_as_group: Some(id),
        // fsGroup makes the PVC and emptyDirs writable by the non-root user.
        fs_group: Some(id),
        fs_group_change_policy: Some("OnRootMismatch".into()),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn container_security(read_only_root: bool) -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        read_only_root_filesystem: Some(read_only_root),
        run_as_non_root: Some(true),
        ..Default::default()
    }
}

fn http_probe(path: &str, port: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String(port.to_string()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

fn port(name: &str, number: u16) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_string()),
        container_port: number.into(),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

fn empty_dir(name: &str, size_limit: Option<&str>) -> Volume {
    Volume {
        name: name.to_string(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: size_limit.map(|s| Quantity(s.into())),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.to_string(),
        mount_path: path.to_string(),
        read_only: read_only.then_some(true),
        ..Default::default()
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

/// Volume and mount of the worker credentials secret. Files are root-owned
/// with group `fsGroup` and mode 0440: readable by the worker, and accepted
/// by ssh (which only rejects group-readable keys the user itself owns).
pub fn credentials_volume() -> (Volume, VolumeMount) {
    crate::auth::secret_volume(
        "credentials",
        WORKER_CREDENTIALS_SECRET,
        CREDENTIALS_MOUNT_DIR,
    )
}

/// The server's ServiceAccount; the server never calls the Kubernetes API.
pub fn service_account(name: &str, labels: BTreeMap<String, String>) -> ServiceAccount {
    ServiceAccount {
        metadata: meta(name, labels),
        automount_service_account_token: Some(false),
        ..Default::default()
    }
}

/// The CAS volume claim.
pub fn server_pvc(spec: &StackSpec) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: meta(SERVER_DATA_PVC, server_selector()),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: spec.server.storage_class.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".into(),
                    Quantity(spec.server.storage_size.clone()),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The server: one replica (the queue and the CAS live in it), replaced with
/// `Recreate` because its ReadWriteOnce volume attaches to one pod at a time.
pub fn server_deployment(spec: &StackSpec) -> Deployment {
    let container = Container {
        name: SERVER_CONTAINER.into(),
        image: Some(SERVER_IMAGE.into()),
        image_pull_policy: Some("IfNotPresent".into()),
        args: Some(server_args(spec, false, false, false, &WebhooksSpec::default()).to_args()),
        ports: Some(vec![
            port(GRPC_PORT_NAME, DEFAULT_GRPC_PORT),
            port(HTTP_PORT_NAME, DEFAULT_HTTP_PORT),
            port(METRICS_PORT_NAME, DEFAULT_METRICS_PORT),
        ]),
        resources: Some(server_resources(spec)),
        // The metrics port serves /healthz before storage opens, so a long
        // open (every blob of a large CAS is stat'ed) never fails liveness;
        // /readyz answers 503 until the server serves, keeping it out of
        // the Service meanwhile. The startup probe covers only the process
        // start. Probes use the metrics port: plain HTTP whatever TLS the
        // others require, so the kubelet needs no client certificate.
        startup_probe: Some(http_probe(HEALTHZ_PATH, METRICS_PORT_NAME, 2, 30)),
        liveness_probe: Some(http_probe(HEALTHZ_PATH, METRICS_PORT_NAME, 10, 3)),
        readiness_probe: Some(http_probe(READYZ_PATH, METRICS_PORT_NAME, 5, 2)),
        security_context: Some(container_security(true)),
        volume_mounts: Some(vec![
            mount("data", SERVER_DATA_DIR, false),
            mount("tmp", "/tmp", false),
        ]),
        ..Default::default()
    };
    Deployment {
        metadata: meta(SERVER_NAME, server_selector()),
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            selector: selector(server_selector()),
            strategy: Some(DeploymentStrategy {
                type_: Some("Recreate".into()),
                ..Default::default()
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(with_part_of(server_selector())),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(SERVER_NAME.into()),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(pod_security(RUN_AS_ID)),
                    termination_grace_period_seconds: Some(30),
                    containers: vec![container],
                    volumes: Some(vec![
                        Volume {
                            name: "data".into(),
                            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                                claim_name: SERVER_DATA_PVC.into(),
                                ..Default::default()
                            }),
                            ..Default::default()
                        },
                        empty_dir("tmp", Some(&spec.server.tmp_size)),
                    ]),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The server Service: the gRPC port (h2c, so proxies and meshes speak
/// HTTP/2 cleartext to it; the `tls` component makes it TLS) first, then
/// HTTP, then metrics.
pub fn server_service() -> Service {
    Service {
        metadata: meta(SERVER_NAME, server_selector()),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(server_selector()),
            ports: Some(vec![
                ServicePort {
                    name: Some(GRPC_PORT_NAME.into()),
                    port: DEFAULT_GRPC_PORT.into(),
                    target_port: Some(IntOrString::String(GRPC_PORT_NAME.into())),
                    protocol: Some("TCP".into()),
                    app_protocol: Some("kubernetes.io/h2c".into()),
                    ..Default::default()
                },
                ServicePort {
                    name: Some(HTTP_PORT_NAME.into()),
                    port: DEFAULT_HTTP_PORT.into(),
                    target_port: Some(IntOrString::String(HTTP_PORT_NAME.into())),
                    protocol: Some("TCP".into()),
                    app_protocol: Some("http".into()),
                    ..Default::default()
                },
                ServicePort {
                    name: Some(METRICS_PORT_NAME.into()),
                    port: DEFAULT_METRICS_PORT.into(),
                    target_port: Some(IntOrString::String(METRICS_PORT_NAME.into())),
                    protocol: Some("TCP".into()),
                    app_protocol: Some("http".into()),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A LoadBalancer Service for the gRPC port only.
pub fn server_load_balancer() -> Service {
    let mut service = server_service();
    service.metadata.name = Some(format!("{SERVER_NAME}-grpc"));
    let spec = service.spec.as_mut().expect("built above");
    spec.type_ = Some("LoadBalancer".into());
    spec.ports.as_mut().expect("built above").truncate(1);
    service
}

/// A ConfigMap of client configuration files, for in-cluster clients.
pub fn client_configmap(files: &BTreeMap<String, String>) -> ConfigMap {
    ConfigMap {
        metadata: meta(
            "buildkube-client-config",
            map([(LABEL_NAME, "buildkube"), (LABEL_COMPONENT, "client")]),
        ),
        data: Some(files.clone()),
        ..Default::default()
    }
}

fn tcp_port(port: IntOrString) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(port),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

/// Prometheus Operator: scrape the server's metrics port.
pub fn server_service_monitor(spec: &StackSpec) -> ServiceMonitor {
    ServiceMonitor::new(
        meta(SERVER_NAME, server_selector()),
        ServiceMonitorSpec {
            selector: selector(server_selector()),
            endpoints: vec![Endpoint {
                port: METRICS_PORT_NAME.into(),
                path: buildkube_config::METRICS_PATH.into(),
                interval: spec.monitoring.scrape_interval.clone(),
                // The queue gauges carry an `instance` label (the REAPI
                // instance); without this Prometheus renames it to
                // `exported_instance` and the autoscalers' queries miss.
                honor_labels: true,
            }],
        },
    )
}

/// gRPC over TLS through ingress-nginx, certificate from cert-manager.
pub fn server_ingress(spec: &StackSpec) -> Ingress {
    let mut metadata = meta(SERVER_NAME, server_selector());
    metadata.annotations = Some(map([
        ("nginx.ingress.kubernetes.io/backend-protocol", "GRPC"),
        // Long-running Execute and WaitExecution streams.
        ("nginx.ingress.kubernetes.io/proxy-read-timeout", "3600"),
        ("nginx.ingress.kubernetes.io/proxy-send-timeout", "3600"),
        ("nginx.ingress.kubernetes.io/proxy-body-size", "0"),
        (
            CERT_MANAGER_ISSUER_ANNOTATION,
            spec.ingress.cluster_issuer.as_str(),
        ),
    ]));
    Ingress {
        metadata,
        spec: Some(K8sIngressSpec {
            ingress_class_name: Some(spec.ingress.class_name.clone()),
            tls: Some(vec![IngressTLS {
                hosts: Some(vec![spec.ingress.host.clone()]),
                secret_name: Some(TLS_SECRET.into()),
            }]),
            rules: Some(vec![IngressRule {
                host: Some(spec.ingress.host.clone()),
                http: Some(HTTPIngressRuleValue {
                    paths: vec![HTTPIngressPath {
                        path: Some("/".into()),
                        path_type: "Prefix".into(),
                        backend: IngressBackend {
                            service: Some(IngressServiceBackend {
                                name: SERVER_NAME.into(),
                                port: Some(ServiceBackendPort {
                                    name: Some(GRPC_PORT_NAME.into()),
                                    ..Default::default()
                                }),
                            }),
                            ..Default::default()
                        },
                    }],
                }),
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

mod stores;
mod worker;

pub use stores::*;
pub use worker::*;
