//! The `external-stores` component: PostgreSQL (CAS and action cache) and
//! Redis (read cache), and the storage config that points the server at them.

use super::*;

fn store_service(name: &str, component: &str, port_number: i32) -> Service {
    Service {
        metadata: meta(name, store_selector(component)),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(store_selector(component)),
            ports: Some(vec![ServicePort {
                name: Some(component.into()),
                port: port_number,
                target_port: Some(IntOrString::String(component.into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn store_network_policy(name: &str, component: &str) -> NetworkPolicy {
    NetworkPolicy {
        metadata: meta(name, store_selector(component)),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(selector(store_selector(component))),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![NetworkPolicyPeer {
                    pod_selector: Some(selector(server_selector())),
                    ..Default::default()
                }]),
                ports: Some(vec![tcp_port(IntOrString::String(component.into()))]),
            }]),
            ..Default::default()
        }),
    }
}

fn exec_probe(command: &[&str], period: i32) -> Probe {
    Probe {
        exec: Some(ExecAction {
            command: Some(command.iter().map(|s| s.to_string()).collect()),
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(5),
        failure_threshold: Some(3),
        ..Default::default()
    }
}

/// PostgreSQL's CAS budget: [`POSTGRES_VOLUME_PERCENT`] of its volume.
pub fn postgres_cas_max_size(spec: &StackSpec) -> u64 {
    let volume = quantity_to_bytes(&spec.external_stores.postgres_storage_size)
        .expect("validated: external_stores.postgres_storage_size");
    volume / 100 * POSTGRES_VOLUME_PERCENT
}

/// Path of the server's `--storage-config` with external stores.
pub fn storage_config_path() -> PathBuf {
    PathBuf::from(format!("{STORAGE_MOUNT_DIR}/{STORAGE_CONFIG_KEY}"))
}

/// The server's stores with the `external-stores` component: blobs up to
/// [`POSTGRES_BLOB_LIMIT`] in PostgreSQL behind a read cache on the server's
/// volume, larger ones on that volume (half the CAS budget each),
/// PostgreSQL kept within [`postgres_cas_max_size`]; action results in Redis
/// (entries expire after 7 days).
pub fn external_storage_config(spec: &StackSpec) -> StorageConfig {
    let budget = buildkube_config::parse_byte_size(&spec.server.cas_max_size)
        .expect("validated: server.cas_max_size");
    StorageConfig {
        cas: StoreConfig::SizePartitioned(Box::new(SizePartitionedStore {
            threshold: POSTGRES_BLOB_LIMIT,
            small: StoreConfig::ReadCache(Box::new(ReadCacheStore {
                cache: StoreConfig::Filesystem(FilesystemStore {
                    path: "cas".into(),
                    max_size: Some(budget / 2),
                }),
                backing: StoreConfig::Postgres(PostgresStore {
                    url: format!(
                        "postgres://{POSTGRES_USER}@{POSTGRES_NAME}:{POSTGRES_PORT}/{POSTGRES_USER}"
                    ),
                    password_file: Some(
                        format!("{POSTGRES_MOUNT_DIR}/{POSTGRES_PASSWORD_KEY}").into(),
                    ),
                    pool_size: 8,
                    max_blob_size: POSTGRES_BLOB_LIMIT,
                    max_size: Some(postgres_cas_max_size(spec)),
                    expire_unused_after_secs: None,
                }),
            })),
            large: StoreConfig::Filesystem(FilesystemStore {
                path: "cas-large".into(),
                max_size: Some(budget / 2),
            }),
        })),
        action_cache: StoreConfig::Redis(RedisStore {
            url: format!("redis://{REDIS_NAME}:{REDIS_PORT}/0"),
            password_file: None,
            key_prefix: "buildkube:".into(),
            expire_after_secs: 7 * 24 * 3600,
        }),
        records: StorageConfig::default_records(),
    }
}

/// The ConfigMap with the server's storage config.
pub fn storage_configmap(spec: &StackSpec) -> ConfigMap {
    ConfigMap {
        metadata: meta(STORAGE_CONFIGMAP, server_selector()),
        data: Some(BTreeMap::from([(
            STORAGE_CONFIG_KEY.into(),
            external_storage_config(spec).to_yaml(),
        )])),
        ..Default::default()
    }
}

/// Volumes and mounts the server needs for the external stores: the
/// storage config and the PostgreSQL password.
pub fn storage_volumes() -> Vec<(Volume, VolumeMount)> {
    vec![
        (
            Volume {
                name: "storage-config".into(),
                config_map: Some(ConfigMapVolumeSource {
                    name: STORAGE_CONFIGMAP.into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            mount("storage-config", STORAGE_MOUNT_DIR, true),
        ),
        (
            Volume {
                name: "postgres-password".into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(POSTGRES_SECRET.into()),
                    default_mode: Some(0o440),
                    ..Default::default()
                }),
                ..Default::default()
            },
            mount("postgres-password", POSTGRES_MOUNT_DIR, true),
        ),
    ]
}

/// The postgres and redis images run as uid 999.
const STORE_UID: i64 = 999;

/// The pod of an external store (PostgreSQL, Redis): non-root, no service
/// account token or service links, one container and one scratch volume.
fn store_pod_template(component: &str, container: Container, volume: Volume) -> PodTemplateSpec {
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(with_part_of(store_selector(component))),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            security_context: Some(pod_security(STORE_UID)),
            containers: vec![container],
            volumes: Some(vec![volume]),
            ..Default::default()
        }),
    }
}

/// PostgreSQL: a StatefulSet with its own volume, its Service and a policy
/// that lets only the server in.
pub fn postgres(spec: &StackSpec) -> (StatefulSet, Service, NetworkPolicy) {
    let component = "postgres";
    let container = Container {
        name: component.into(),
        image: Some(spec.external_stores.postgres_image.clone()),
        image_pull_policy: Some("IfNotPresent".into()),
        env: Some(vec![
            env("POSTGRES_USER", POSTGRES_USER),
            env("POSTGRES_DB", POSTGRES_USER),
            env("PGDATA", "/var/lib/postgresql/data/pgdata"),
            EnvVar {
                name: "POSTGRES_PASSWORD".into(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: POSTGRES_SECRET.into(),
                        key: POSTGRES_PASSWORD_KEY.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ]),
        ports: Some(vec![ContainerPort {
            name: Some(component.into()),
            container_port: POSTGRES_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        readiness_probe: Some(exec_probe(&["pg_isready", "-U", POSTGRES_USER], 10)),
        liveness_probe: Some(exec_probe(&["pg_isready", "-U", POSTGRES_USER], 30)),
        resources: Some(resources(
            &ResourcesSpec::default(),
            sum_of(&[STORE_SCRATCH_SIZE]) + EPHEMERAL_STORAGE_ALLOWANCE,
        )),
        security_context: Some(container_security(false)),
        volume_mounts: Some(vec![
            mount("data", "/var/lib/postgresql/data", false),
            mount("run", "/var/run/postgresql", false),
        ]),
        ..Default::default()
    };
    let statefulset = StatefulSet {
        metadata: meta(POSTGRES_NAME, store_selector(component)),
        spec: Some(StatefulSetSpec {
            replicas: Some(1),
            service_name: Some(POSTGRES_NAME.into()),
            selector: selector(store_selector(component)),
            template: store_pod_template(
                component,
                container,
                empty_dir("run", Some(STORE_SCRATCH_SIZE)),
            ),
            volume_claim_templates: Some(vec![PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some("data".into()),
                    ..Default::default()
                },
                spec: Some(PersistentVolumeClaimSpec {
                    access_modes: Some(vec!["ReadWriteOnce".into()]),
                    resources: Some(VolumeResourceRequirements {
                        requests: Some(BTreeMap::from([(
                            "storage".into(),
                            Quantity(spec.external_stores.postgres_storage_size.clone()),
                        )])),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    (
        statefulset,
        store_service(POSTGRES_NAME, component, POSTGRES_PORT),
        store_network_policy(POSTGRES_NAME, component),
    )
}

/// Redis's `maxmemory`: this share of its container's memory. The rest is
/// Redis's own overhead (allocator fragmentation, client and replication
/// buffers), which `maxmemory` does not count.
pub const REDIS_MAXMEMORY_PERCENT: u64 = 75;

/// Redis's `maxmemory` in bytes, from `external_stores.redis_memory`.
pub fn redis_maxmemory(spec: &StackSpec) -> u64 {
    let memory = quantity_to_bytes(&spec.external_stores.redis_memory)
        .expect("validated: external_stores.redis_memory");
    memory / 100 * REDIS_MAXMEMORY_PERCENT
}

/// Redis without persistence (a cache), its Service and its policy.
///
/// It holds only the action cache, so it is bounded by `maxmemory` with
/// `allkeys-lru`: when full, the least recently used results go, which only
/// costs a re-execution, while the hot ones stay. (Redis's default,
/// `noeviction`, would instead fail every UpdateActionResult once full;
/// `volatile-*` policies would do the same for a key without a TTL.)
pub fn redis(spec: &StackSpec) -> (Deployment, Service, NetworkPolicy) {
    let component = "redis";
    let memory = &spec.external_stores.redis_memory;
    let container = Container {
        name: component.into(),
        image: Some(spec.external_stores.redis_image.clone()),
        image_pull_policy: Some("IfNotPresent".into()),
        args: Some(vec![
            "--save".into(),
            "".into(),
            "--appendonly".into(),
            "no".into(),
            "--maxmemory".into(),
            redis_maxmemory(spec).to_string(),
            "--maxmemory-policy".into(),
            "allkeys-lru".into(),
        ]),
        ports: Some(vec![ContainerPort {
            name: Some(component.into()),
            container_port: REDIS_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        readiness_probe: Some(exec_probe(&["redis-cli", "ping"], 10)),
        liveness_probe: Some(exec_probe(&["redis-cli", "ping"], 30)),
        // Request what it may use, so it is never the pod evicted first.
        resources: Some(resources(
            &ResourcesSpec {
                memory_request: memory.clone(),
                memory_limit: memory.clone(),
                ..ResourcesSpec::default()
            },
            sum_of(&[STORE_SCRATCH_SIZE]) + EPHEMERAL_STORAGE_ALLOWANCE,
        )),
        security_context: Some(container_security(true)),
        volume_mounts: Some(vec![mount("data", "/data", false)]),
        ..Default::default()
    };
    let deployment = Deployment {
        metadata: meta(REDIS_NAME, store_selector(component)),
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            selector: selector(store_selector(component)),
            template: store_pod_template(
                component,
                container,
                empty_dir("data", Some(STORE_SCRATCH_SIZE)),
            ),
            ..Default::default()
        }),
        ..Default::default()
    };
    (
        deployment,
        store_service(REDIS_NAME, component, REDIS_PORT),
        store_network_policy(REDIS_NAME, component),
    )
}
