//! The default stack: what `manifests-gen` generates without `--config`.

use std::collections::BTreeMap;

use super::*;

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
            // One pool runs actions and CI steps: the queue gauges cannot
            // tell them apart, so a separate steps pool could not be scaled
            // on its own queue (docs/deploy.md, "CI jobs").
            jobs: true,
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
                    webhooks: WebhooksSpec::default(),
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
                    webhooks: WebhooksSpec::default(),
                },
            ),
            (
                "production".to_string(),
                OverlaySpec {
                    description: "Auth, TLS ingress (gRPC, GitHub webhooks), mutual TLS inside (cert-manager), KEDA autoscaling, Prometheus, spread workers, external stores.".into(),
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
                    // GitHub through the Ingress; HTTPS clone URLs, so public
                    // repositories build without credentials on the workers.
                    webhooks: WebhooksSpec {
                        github: true,
                        gitlab: false,
                        clone_url: CloneUrlSpec::Https,
                    },
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
