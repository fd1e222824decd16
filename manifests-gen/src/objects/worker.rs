//! A worker pool's Deployment, its spreading across nodes and its disruption budget.

use super::*;

/// One worker pool's Deployment; a pool with `jobs` mounts the hooks.
pub fn worker_deployment(spec: &StackSpec, pool: &WorkerPoolSpec) -> Deployment {
    let mut volumes = worker_volumes(pool);
    let mut mounts = vec![
        mount("work", WORKER_WORK_DIR, false),
        mount("home", WORKER_HOME, false),
        mount("tmp", "/tmp", false),
    ];
    if pool.jobs {
        let (volume, mount) = crate::jobs::hooks_volume();
        volumes.push(volume);
        mounts.push(mount);
    }
    let container = Container {
        name: WORKER_CONTAINER.into(),
        image: Some(WORKER_IMAGE.into()),
        image_pull_policy: Some("IfNotPresent".into()),
        args: Some(worker_args(spec, pool, false, false, false).to_args()),
        env: Some(vec![
            EnvVar {
                name: buildkube_config::WORKER_ID_ENV.into(),
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        field_path: "metadata.name".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
            env("HOME", WORKER_HOME),
        ]),
        ports: Some(vec![port(HTTP_PORT_NAME, DEFAULT_WORKER_HTTP_PORT)]),
        resources: Some(worker_resources(pool)),
        liveness_probe: Some(http_probe(HEALTHZ_PATH, HTTP_PORT_NAME, 10, 3)),
        // Not ready while draining, so rollouts wait for the drain.
        readiness_probe: Some(http_probe(READYZ_PATH, HTTP_PORT_NAME, 5, 2)),
        security_context: Some(container_security(pool.read_only_root_filesystem)),
        volume_mounts: Some(mounts),
        ..Default::default()
    };
    Deployment {
        metadata: meta(
            &worker_deployment_name(&pool.name),
            pool_selector(&pool.name),
        ),
        spec: Some(DeploymentSpec {
            replicas: Some(pool.replicas),
            selector: selector(pool_selector(&pool.name)),
            // Start the new worker before the old one drains.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(with_part_of(pool_selector(&pool.name))),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(WORKER_NAME.into()),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(pod_security(RUN_AS_ID)),
                    // SIGTERM drains: running actions get drain_timeout_secs to finish.
                    termination_grace_period_seconds: Some(termination_grace_secs(pool)),
                    containers: vec![container],
                    volumes: Some(volumes),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Prefer spreading a pool's pods over nodes.
pub fn pool_anti_affinity(pool: &str) -> Affinity {
    Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: PodAffinityTerm {
                        label_selector: Some(selector(pool_selector(pool))),
                        topology_key: "kubernetes.io/hostname".into(),
                        ..Default::default()
                    },
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A pool's disruption budget: node drains and the cluster autoscaler evict
/// `max_unavailable` workers at a time, each of which drains its running
/// actions (a draining worker is unready, so it uses up the budget until it
/// exits). Unready workers may always be evicted: a worker is unready only
/// while starting or draining, neither of which the budget protects, and a
/// crash-looping worker must not block a node drain.
pub fn worker_pdb(pool: &WorkerPoolSpec) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(
            &worker_deployment_name(&pool.name),
            pool_selector(&pool.name),
        ),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(pool.max_unavailable)),
            selector: Some(selector(pool_selector(&pool.name))),
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}
