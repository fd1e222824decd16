//! Autoscaling of the worker pools: which of the server's queue series are a
//! pool's load, the PromQL that sums them, and the objects that read it
//! (KEDA's ScaledObject; the HPA with the prometheus-adapter rules it reads
//! through), each with a scale-down pace that does not flap.
//!
//! The server labels `buildkube_queue_depth` and `buildkube_actions_running`
//! with the action's instance and platform (`buildkube_config::platform_label`).
//! An action runs on a worker that offers every property it asks for, so a
//! pool can serve exactly the platforms that are subsets of its own. A
//! platform that several pools of an instance can serve is counted once, for
//! the first of them in the spec: the pools' loads add up to the instance's
//! load, with nothing counted twice.

use std::collections::BTreeSet;

use buildkube_config::{platform_label, METRIC_ACTIONS_RUNNING, METRIC_QUEUE_DEPTH};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, ExternalMetricSource, HPAScalingPolicy, HPAScalingRules,
    HorizontalPodAutoscaler, HorizontalPodAutoscalerBehavior, HorizontalPodAutoscalerSpec,
    MetricIdentifier, MetricSpec, MetricTarget,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde::{Deserialize, Serialize};

use crate::crd::{
    Advanced, HorizontalPodAutoscalerConfig, ScaleTargetRef, ScaledObject, ScaledObjectSpec,
    Trigger,
};
use crate::objects::{meta, pool_selector, worker_deployment_name};
use crate::spec::{StackSpec, WorkerPoolSpec};

/// Metric names the autoscaler queries read: the server's gauges, from
/// `buildkube-config`.
pub const LOAD_METRICS: [&str; 2] = [METRIC_QUEUE_DEPTH, METRIC_ACTIONS_RUNNING];

/// Seconds between KEDA's evaluations of a pool's query.
const KEDA_POLLING_SECS: i32 = 15;

/// The `platform` label values whose actions are this pool's load: every
/// subset of the pool's properties (each a platform the pool can run) that
/// no pool listed before it, on the same instance, can also run. Sorted.
pub fn pool_platform_labels(spec: &StackSpec, pool: &WorkerPoolSpec) -> Vec<String> {
    let earlier: Vec<&WorkerPoolSpec> = spec
        .worker_pools
        .iter()
        .take_while(|p| p.name != pool.name)
        .filter(|p| p.instance == pool.instance)
        .collect();
    let pairs: Vec<(&str, &str)> = pool
        .platform
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut labels = BTreeSet::new();
    for mask in 0u32..(1 << pairs.len()) {
        let subset: Vec<(&str, &str)> = (0..pairs.len())
            .filter(|i| mask & (1 << i) != 0)
            .map(|i| pairs[i])
            .collect();
        let served_before = earlier.iter().any(|p| {
            subset
                .iter()
                .all(|(k, v)| p.platform.get(*k).map(String::as_str) == Some(*v))
        });
        if !served_before {
            labels.insert(platform_label(subset));
        }
    }
    labels.into_iter().collect()
}

/// `text` as a literal in a Prometheus (RE2) regex; only metacharacters
/// are escaped, so labels stay readable.
fn regex_literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A PromQL double-quoted string.
fn promql_string(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The label matchers selecting this pool's series of either load metric.
pub fn pool_matchers(spec: &StackSpec, pool: &WorkerPoolSpec) -> String {
    let platforms: Vec<String> = pool_platform_labels(spec, pool)
        .iter()
        .map(|label| regex_literal(label))
        .collect();
    format!(
        "instance={},platform=~{}",
        promql_string(&pool.instance),
        promql_string(&platforms.join("|"))
    )
}

/// PromQL for a pool's load: its queued plus its running actions. Each sum
/// is 0, not empty, when the server has no such series yet.
pub fn pool_load_query(spec: &StackSpec, pool: &WorkerPoolSpec) -> String {
    let matchers = pool_matchers(spec, pool);
    LOAD_METRICS
        .iter()
        .map(|metric| format!("(sum({metric}{{{matchers}}}) or vector(0))"))
        .collect::<Vec<_>>()
        .join(" + ")
}

/// Scale-down pace of a pool, shared by KEDA (which creates an HPA) and the
/// HPA. Scale-up keeps the Kubernetes defaults (immediate).
pub fn scale_down_behavior(pool: &WorkerPoolSpec) -> HorizontalPodAutoscalerBehavior {
    let bounds = &pool.autoscaling;
    HorizontalPodAutoscalerBehavior {
        scale_down: Some(HPAScalingRules {
            stabilization_window_seconds: Some(bounds.scale_down_stabilization_secs),
            policies: Some(vec![HPAScalingPolicy {
                type_: "Pods".into(),
                value: bounds.scale_down_max_pods,
                period_seconds: bounds.scale_down_period_secs,
            }]),
            select_policy: Some("Min".into()),
            tolerance: None,
        }),
        scale_up: None,
    }
}

/// KEDA: replicas = ceil((queued + running actions) / concurrency).
pub fn worker_scaled_object(spec: &StackSpec, pool: &WorkerPoolSpec) -> ScaledObject {
    ScaledObject::new(
        meta(
            &worker_deployment_name(&pool.name),
            pool_selector(&pool.name),
        ),
        ScaledObjectSpec {
            scale_target_ref: ScaleTargetRef {
                api_version: "apps/v1".into(),
                kind: "Deployment".into(),
                name: worker_deployment_name(&pool.name),
            },
            min_replica_count: pool.autoscaling.min_replicas,
            max_replica_count: pool.autoscaling.max_replicas,
            polling_interval: KEDA_POLLING_SECS,
            // Only scaling to zero waits for it; the HPA behaviour below paces
            // every other scale-down.
            cooldown_period: pool.autoscaling.scale_down_stabilization_secs,
            advanced: Advanced {
                horizontal_pod_autoscaler_config: HorizontalPodAutoscalerConfig {
                    behavior: scale_down_behavior(pool),
                },
            },
            triggers: vec![Trigger {
                type_: "prometheus".into(),
                metadata: [
                    ("serverAddress", spec.monitoring.prometheus_url.clone()),
                    ("query", pool_load_query(spec, pool)),
                    ("threshold", pool.concurrency.to_string()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            }],
        },
    )
}

/// Name of a pool's load on the external metrics API, as the generated
/// prometheus-adapter rule serves it.
pub fn external_metric_name(pool: &WorkerPoolSpec) -> String {
    format!("buildkube_worker_load_{}", pool.name.replace('-', "_"))
}

/// HPA: the pool's load (from prometheus-adapter, see [`adapter_rules`]),
/// one worker per `concurrency` queued or running actions.
pub fn worker_hpa(pool: &WorkerPoolSpec) -> HorizontalPodAutoscaler {
    HorizontalPodAutoscaler {
        metadata: meta(
            &worker_deployment_name(&pool.name),
            pool_selector(&pool.name),
        ),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name: worker_deployment_name(&pool.name),
            },
            // The HPA cannot scale to zero (without an alpha feature gate).
            min_replicas: Some(pool.autoscaling.min_replicas.max(1)),
            max_replicas: pool.autoscaling.max_replicas,
            behavior: Some(scale_down_behavior(pool)),
            metrics: Some(vec![MetricSpec {
                type_: "External".into(),
                external: Some(ExternalMetricSource {
                    metric: MetricIdentifier {
                        name: external_metric_name(pool),
                        selector: None,
                    },
                    target: MetricTarget {
                        type_: "AverageValue".into(),
                        average_value: Some(Quantity(pool.concurrency.to_string())),
                        ..Default::default()
                    },
                }),
                ..Default::default()
            }]),
        }),
        ..Default::default()
    }
}

/// prometheus-adapter configuration (the `externalRules` of its config file;
/// `rules.external` in its Helm chart) serving each pool's load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdapterRules {
    /// One rule per pool.
    pub external_rules: Vec<AdapterRule>,
}

/// One prometheus-adapter external metric rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdapterRule {
    /// Series whose presence makes the adapter list the metric.
    pub series_query: String,
    /// Name of the metric on the external metrics API.
    pub name: AdapterRuleName,
    /// PromQL answering a request for the metric.
    pub metrics_query: String,
}

/// Naming part of an [`AdapterRule`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterRuleName {
    /// Regex over the discovered series' names.
    pub matches: String,
    /// The name served.
    #[serde(rename = "as")]
    pub as_: String,
}

/// The adapter rules of every pool. Discovery uses the always-present
/// `buildkube_workers_connected`, so the metric exists before the first
/// queue does; the query itself is the same as KEDA's.
pub fn adapter_rules(spec: &StackSpec) -> AdapterRules {
    let discovery = buildkube_config::METRIC_WORKERS_CONNECTED;
    AdapterRules {
        external_rules: spec
            .worker_pools
            .iter()
            .map(|pool| AdapterRule {
                series_query: discovery.into(),
                name: AdapterRuleName {
                    matches: format!("^{discovery}$"),
                    as_: external_metric_name(pool),
                },
                metrics_query: pool_load_query(spec, pool),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(name: &str, pairs: &[(&str, &str)]) -> WorkerPoolSpec {
        let mut pool = StackSpec::default().worker_pools[0].clone();
        pool.name = name.into();
        pool.platform = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        pool
    }

    #[test]
    fn a_single_pool_takes_every_platform_it_can_run() {
        let spec = StackSpec::default();
        assert_eq!(
            pool_platform_labels(&spec, &spec.worker_pools[0]),
            [
                "",
                "OSFamily=Linux",
                "OSFamily=Linux,runner=plain",
                "runner=plain"
            ]
        );
    }

    #[test]
    fn a_platform_two_pools_can_run_counts_for_the_first_only() {
        let spec = StackSpec {
            worker_pools: vec![
                pool("plain", &[("OSFamily", "Linux"), ("runner", "plain")]),
                pool("sandbox", &[("OSFamily", "Linux"), ("runner", "sandbox")]),
            ],
            ..StackSpec::default()
        };
        assert_eq!(
            pool_platform_labels(&spec, &spec.worker_pools[1]),
            ["OSFamily=Linux,runner=sandbox", "runner=sandbox"]
        );
        // Every platform either pool can run is counted exactly once.
        let first = pool_platform_labels(&spec, &spec.worker_pools[0]);
        let second = pool_platform_labels(&spec, &spec.worker_pools[1]);
        assert!(first.iter().all(|l| !second.contains(l)));
        assert_eq!(first.len() + second.len(), 6);
    }

    #[test]
    fn values_are_escaped_for_the_regex_and_the_string() {
        let spec = StackSpec {
            worker_pools: vec![pool("img", &[("container-image", "docker://x.io/a\"b")])],
            ..StackSpec::default()
        };
        assert_eq!(
            pool_matchers(&spec, &spec.worker_pools[0]),
            r#"instance="main",platform=~"|container-image=docker://x\\.io/a\"b""#
        );
    }
}
