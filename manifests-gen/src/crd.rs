//! Typed values of the custom resources the components use, for which
//! k8s-openapi has no types: KEDA's `ScaledObject`, the Prometheus
//! Operator's `ServiceMonitor`, cert-manager's `Issuer` and `Certificate`. Only the fields buildkube sets are modelled;
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

/// API version of cert-manager's `Issuer` and `Certificate`.
pub const CERT_MANAGER_API_VERSION: &str = "cert-manager.io/v1";

/// `cert-manager.io/v1` `Issuer`: signs the Certificates of one namespace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Issuer {
    /// Always [`CERT_MANAGER_API_VERSION`].
    pub api_version: String,
    /// Always `Issuer`.
    pub kind: String,
    /// Name and labels.
    pub metadata: ObjectMeta,
    /// How it signs.
    pub spec: IssuerSpec,
}

impl Issuer {
    /// Kind of the cert-manager CRD.
    pub const KIND: &'static str = "Issuer";

    /// An Issuer with the right apiVersion and kind.
    pub fn new(metadata: ObjectMeta, spec: IssuerSpec) -> Self {
        Issuer {
            api_version: CERT_MANAGER_API_VERSION.into(),
            kind: Self::KIND.into(),
            metadata,
            spec,
        }
    }
}

/// Spec of an [`Issuer`]: exactly one of its fields is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IssuerSpec {
    /// Each Certificate signs itself (used once, to make the CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_signed: Option<SelfSignedIssuer>,
    /// Certificates are signed by the CA in a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<CaIssuer>,
}

/// `spec.selfSigned` of an [`Issuer`] (no settings).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelfSignedIssuer {}

/// `spec.ca` of an [`Issuer`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CaIssuer {
    /// Secret holding the CA's `tls.crt` and `tls.key`.
    pub secret_name: String,
}

/// `cert-manager.io/v1` `Certificate`: a key and certificate that
/// cert-manager keeps valid in a Secret (`tls.crt`, `tls.key`, `ca.crt`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Certificate {
    /// Always [`CERT_MANAGER_API_VERSION`].
    pub api_version: String,
    /// Always `Certificate`.
    pub kind: String,
    /// Name and labels.
    pub metadata: ObjectMeta,
    /// What is issued, by whom, for how long.
    pub spec: CertificateSpec,
}

impl Certificate {
    /// Kind of the cert-manager CRD.
    pub const KIND: &'static str = "Certificate";

    /// A Certificate with the right apiVersion and kind.
    pub fn new(metadata: ObjectMeta, spec: CertificateSpec) -> Self {
        Certificate {
            api_version: CERT_MANAGER_API_VERSION.into(),
            kind: Self::KIND.into(),
            metadata,
            spec,
        }
    }
}

/// Spec of a [`Certificate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertificateSpec {
    /// Secret the key and certificate are written to.
    pub secret_name: String,
    /// Subject common name.
    pub common_name: String,
    /// DNS subject alternative names (servers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_names: Vec<String>,
    /// A CA certificate (signs others); cert-manager spells it `isCA`.
    #[serde(rename = "isCA", default, skip_serializing_if = "std::ops::Not::not")]
    pub is_ca: bool,
    /// Lifetime, e.g. `2160h`.
    pub duration: String,
    /// Renewed this long before it expires, e.g. `720h`.
    pub renew_before: String,
    /// Key usages, e.g. `server auth`, `client auth`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub usages: Vec<String>,
    /// The key's algorithm, encoding and rotation.
    pub private_key: CertificatePrivateKey,
    /// Which Issuer signs it.
    pub issuer_ref: IssuerRef,
}

/// `spec.privateKey` of a [`Certificate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertificatePrivateKey {
    /// `ECDSA`, `RSA` or `Ed25519`.
    pub algorithm: String,
    /// Key size in bits (256 for ECDSA P-256).
    pub size: u32,
    /// `PKCS1` or `PKCS8` (Bazel's `--tls_client_key` reads PKCS#8).
    pub encoding: String,
    /// `Always`: a renewal makes a new key.
    pub rotation_policy: String,
}

/// `spec.issuerRef` of a [`Certificate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IssuerRef {
    /// Issuer name.
    pub name: String,
    /// `Issuer` (same namespace) or `ClusterIssuer`.
    pub kind: String,
    /// Always `cert-manager.io`.
    pub group: String,
}
