//! Typed values of the custom resources the components use, for which
//! k8s-openapi has no types: KEDA's `ScaledObject` and the Prometheus
//! Operator's `ServiceMonitor`. Only the fields buildkube sets are modelled;
//! `deny_unknown_fields` lets the tests read the built output back into them.

use std::collections::BTreeMap;

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscalerBehavior;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::{Deserialize, Serialize};

/// `keda.sh/v1alpha1` `ScaledObject`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScaledObject {
    /// Always `keda.sh/v1alpha1`.
    pub api_version: String,
    /// Always `ScaledObject`.
    pub kind: String,
    /// Name and labels.
    pub metadata: ObjectMeta,
    /// What is scaled, within which bounds, on which trigger.
    pub spec: ScaledObjectSpec,
}

impl ScaledObject {
    /// API version of the KEDA CRD.
    pub const API_VERSION: &'static str = "keda.sh/v1alpha1";
    /// Kind of the KEDA CRD.
    pub const KIND: &'static str = "ScaledObject";

    /// A ScaledObject with the right apiVersion and kind.
    pub fn new(metadata: ObjectMeta, spec: ScaledObjectSpec) -> Self {
        ScaledObject {
            api_version: Self::API_VERSION.into(),
            kind: Self::KIND.into(),
            metadata,
            spec,
        }
    }
}

/// Spec of a [`ScaledObject`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScaledObjectSpec {
    /// The scaled workload.
    pub scale_target_ref: ScaleTargetRef,
    /// Fewest replicas (0 allowed).
    pub min_replica_count: i32,
    /// Most replicas.
    pub max_replica_count: i32,
    /// Seconds between trigger evaluations.
    pub polling_interval: i32,
    /// Seconds after the last active trigger before scaling to zero.
    pub cooldown_period: i32,
    /// The HPA KEDA creates.
    pub advanced: Advanced,
    /// Metrics that drive the scaling.
    pub triggers: Vec<Trigger>,
}

/// `spec.advanced` of a [`ScaledObject`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Advanced {
    /// Settings of the HPA KEDA creates.
    pub horizontal_pod_autoscaler_config: HorizontalPodAutoscalerConfig,
}

/// `spec.advanced.horizontalPodAutoscalerConfig` of a [`ScaledObject`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HorizontalPodAutoscalerConfig {
    /// Scaling behaviour (the HPA's own type).
    pub behavior: HorizontalPodAutoscalerBehavior,
}

/// Target of a [`ScaledObject`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScaleTargetRef {
    /// API version of the target.
    pub api_version: String,
    /// Kind of the target.
    pub kind: String,
    /// Name of the target.
    pub name: String,
}

/// One KEDA trigger; `metadata` is the scaler's string map.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Trigger {
    /// Scaler name, e.g. `prometheus`.
    #[serde(rename = "type")]
    pub type_: String,
    /// Scaler settings.
    pub metadata: BTreeMap<String, String>,
}

/// `monitoring.coreos.com/v1` `ServiceMonitor`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceMonitor {
    /// Always `monitoring.coreos.com/v1`.
    pub api_version: String,
    /// Always `ServiceMonitor`.
    pub kind: String,
    /// Name and labels.
    pub metadata: ObjectMeta,
    /// Which Services and ports are scraped.
    pub spec: ServiceMonitorSpec,
}

impl ServiceMonitor {
    /// API version of the Prometheus Operator CRD.
    pub const API_VERSION: &'static str = "monitoring.coreos.com/v1";
    /// Kind of the Prometheus Operator CRD.
    pub const KIND: &'static str = "ServiceMonitor";

    /// A ServiceMonitor with the right apiVersion and kind.
    pub fn new(metadata: ObjectMeta, spec: ServiceMonitorSpec) -> Self {
        ServiceMonitor {
            api_version: Self::API_VERSION.into(),
            kind: Self::KIND.into(),
            metadata,
            spec,
        }
    }
}

/// Spec of a [`ServiceMonitor`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceMonitorSpec {
    /// Services scraped.
    pub selector: LabelSelector,
    /// Ports scraped.
    pub endpoints: Vec<Endpoint>,
}

/// One scraped port of a [`ServiceMonitor`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    /// Service port name.
    pub port: String,
    /// HTTP path of the metrics.
    pub path: String,
    /// Scrape interval.
    pub interval: String,
    /// Keep the target's own labels on conflict.
    pub honor_labels: bool,
}
