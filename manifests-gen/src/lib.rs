//! manifests-gen: the buildkube kustomize tree (`overlays/`) and its client
//! configuration, generated from one typed [`spec::StackSpec`].
//!
//! - [`spec`]: the stack spec (serde + JSON Schema), its defaults and validation;
//! - [`objects`]: Kubernetes objects as typed k8s-openapi values;
//! - [`auth`]: the worker and client token Secrets and the server's auth config;
//! - [`autoscaling`]: each pool's load query, KEDA and HPA objects, adapter rules;
//! - [`jobs`]: CI jobs' hooks ConfigMap, webhook Secret and webhook Ingress;
//! - [`crd`]: typed KEDA, Prometheus Operator and cert-manager resources;
//! - [`network`]: the server's and workers' NetworkPolicies;
//! - [`tls`]: mutual TLS Secrets, flags and cert-manager certificates;
//! - [`kustomize`]: typed kustomization files and JSON 6902 patches;
//! - [`overlays`]: the whole tree from a spec;
//! - [`tree`]: writing, checking (`--check`) and pruning it.

pub mod auth;
pub mod autoscaling;
pub mod crd;
pub mod jobs;
pub mod kustomize;
pub mod network;
pub mod objects;
pub mod overlays;
pub mod spec;
pub mod tls;
pub mod tree;

pub use overlays::{
    generate, generate_images, outputs, owned_roots, Output, KUBERNETES_VERSION, REGENERATE,
    SUPPORTED_KUBERNETES_VERSIONS,
};
pub use spec::StackSpec;
