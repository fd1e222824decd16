//! Typed kustomize files: `kustomization.yaml` (Kustomization or Component)
//! and JSON 6902 patches whose values are typed Kubernetes values.

use serde::Serialize;

/// A `kustomization.yaml`.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Kustomization {
    /// `kustomize.config.k8s.io/v1beta1` or, for a component, `v1alpha1`.
    pub api_version: String,
    /// `Kustomization` or `Component`.
    pub kind: String,
    /// Namespace set on every object.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Files and directories included.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<String>,
    /// Component directories included.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub components: Vec<String>,
    /// Secrets built from files.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub secret_generator: Vec<SecretGenerator>,
    /// Patches applied to the resources.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub patches: Vec<PatchRef>,
    /// Image names rewritten to pinned references.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<ImageOverride>,
}

impl Kustomization {
    /// An empty Kustomization.
    pub fn new_kustomization() -> Self {
        Kustomization {
            api_version: "kustomize.config.k8s.io/v1beta1".into(),
            kind: "Kustomization".into(),
            ..Default::default()
        }
    }

    /// An empty Component.
    pub fn new_component() -> Self {
        Kustomization {
            api_version: "kustomize.config.k8s.io/v1alpha1".into(),
            kind: "Component".into(),
            ..Default::default()
        }
    }
}

/// A `secretGenerator` entry.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretGenerator {
    /// Secret name (kustomize appends a content hash and rewrites references).
    pub name: String,
    /// Secret type, e.g. `Opaque`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `key=path` entries.
    pub files: Vec<String>,
}

/// A `patches` entry: a JSON 6902 patch file and the object it applies to.
#[derive(Debug, Clone, Serialize)]
pub struct PatchRef {
    /// Path of the patch file.
    pub path: String,
    /// The patched object.
    pub target: PatchTarget,
}

/// The object a patch applies to.
#[derive(Debug, Clone, Serialize)]
pub struct PatchTarget {
    /// API group (empty for core).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub group: String,
    /// API version.
    pub version: String,
    /// Kind.
    pub kind: String,
    /// Name.
    pub name: String,
}

/// One JSON 6902 operation; values are serialized typed objects.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum PatchOp {
    /// Adds `value` at `path` (`/-` appends to a list).
    Add {
        /// JSON pointer.
        path: String,
        /// The value.
        value: serde_json::Value,
    },
    /// Replaces the value at `path`.
    Replace {
        /// JSON pointer.
        path: String,
        /// The value.
        value: serde_json::Value,
    },
    /// Removes the value at `path`.
    Remove {
        /// JSON pointer.
        path: String,
    },
}

impl PatchOp {
    /// `add` of a typed value.
    pub fn add(path: &str, value: impl Serialize) -> Self {
        PatchOp::Add {
            path: path.into(),
            value: serde_json::to_value(value).expect("serializable"),
        }
    }

    /// `replace` with a typed value.
    pub fn replace(path: &str, value: impl Serialize) -> Self {
        PatchOp::Replace {
            path: path.into(),
            value: serde_json::to_value(value).expect("serializable"),
        }
    }
}

/// An `images` entry.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageOverride {
    /// Image name as written in the base.
    pub name: String,
    /// Replacement name (registry and path).
    pub new_name: String,
    /// Pinned tag.
    pub new_tag: String,
}
