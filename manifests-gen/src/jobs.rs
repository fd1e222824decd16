//! The objects of CI jobs: the hooks ConfigMap that pools with `jobs` mount
//! at `--hooks-dir`, the Secret of webhook secrets the server reads with
//! `--github-webhook-secret-file` / `--gitlab-webhook-token-file`, and the
//! Ingress that exposes exactly the webhook paths of the server's HTTP port
//! (its job pages and operation pages stay inside the cluster).

use std::collections::BTreeMap;
use std::path::PathBuf;

use buildkube_config::jobs::{GITHUB_WEBHOOK_PATH, GITLAB_WEBHOOK_PATH};
use buildkube_config::{JobArgs, WebhookCloneUrl};
use k8s_openapi::api::core::v1::{ConfigMap, ConfigMapVolumeSource, Volume, VolumeMount};
use k8s_openapi::api::networking::v1::{
    HTTPIngressPath, HTTPIngressRuleValue, Ingress, IngressBackend, IngressRule,
    IngressServiceBackend, IngressSpec as K8sIngressSpec, IngressTLS, ServiceBackendPort,
};

use crate::objects::{
    meta, server_selector, workers_selector, HTTP_PORT_NAME, SERVER_NAME, TLS_SECRET,
};
use crate::spec::{CloneUrlSpec, StackSpec, WebhooksSpec};

/// ConfigMap of the CI step hooks (`base/worker-hooks-configmap.yaml`;
/// an overlay adds hooks with a patch of it).
pub const HOOKS_CONFIGMAP: &str = "buildkube-hooks";
/// Where [`HOOKS_CONFIGMAP`] is mounted in the workers of pools with `jobs`.
pub const HOOKS_MOUNT_DIR: &str = "/etc/buildkube/hooks";
/// Key of [`HOOKS_CONFIGMAP`] that documents the hooks; not a hook name, so
/// the worker never runs it.
pub const HOOKS_README_KEY: &str = "README";
/// File mode of the hooks: executable by the worker (they hold no secret).
pub const HOOKS_MODE: i32 = 0o555;
/// Secret with the webhook secrets (keys [`GITHUB_WEBHOOK_KEY`], [`GITLAB_WEBHOOK_KEY`]).
pub const WEBHOOKS_SECRET: &str = "buildkube-webhooks";
/// Key of GitHub's webhook secrets in [`WEBHOOKS_SECRET`].
pub const GITHUB_WEBHOOK_KEY: &str = "github";
/// Key of GitLab's webhook tokens in [`WEBHOOKS_SECRET`].
pub const GITLAB_WEBHOOK_KEY: &str = "gitlab";
/// Where [`WEBHOOKS_SECRET`] is mounted in the server.
pub const WEBHOOKS_MOUNT_DIR: &str = "/etc/buildkube/webhooks";
/// Name of the Ingress of the webhook paths.
pub const WEBHOOKS_INGRESS: &str = "buildkube-server-webhooks";
/// The overlay's file (under `secrets/`) of the GitHub webhook secrets.
pub const GITHUB_WEBHOOK_SECRET_FILE: &str = "github-webhook-secret";
/// The overlay's file (under `secrets/`) of the GitLab webhook tokens.
pub const GITLAB_WEBHOOK_TOKEN_FILE: &str = "gitlab-webhook-token";
/// The base's file of the hooks ConfigMap (when a pool runs steps).
pub const HOOKS_CONFIGMAP_FILE: &str = "worker-hooks-configmap.yaml";
/// The overlay's file of the webhook Ingress (webhooks with `expose: ingress`).
pub const WEBHOOKS_INGRESS_FILE: &str = "server-webhooks-ingress.yaml";
/// Largest delivery the Ingress passes on (nginx's `proxy-body-size`): the
/// server's own limit, beyond which it answers 413 itself.
pub const WEBHOOK_BODY_BYTES: usize = buildkube_config::jobs::WEBHOOK_MAX_BODY_BYTES;

/// The `--hooks-dir` of pools with `jobs`.
pub fn hooks_dir() -> PathBuf {
    PathBuf::from(HOOKS_MOUNT_DIR)
}

/// What [`HOOKS_README_KEY`] says.
const HOOKS_README: &str = r#"CI step hooks of the buildkube workers that run steps (pools with `jobs`).

Add a key named after a hook (with a patch of this ConfigMap in your
overlay, docs/deploy.md); the worker runs it around every step:

  pre-checkout    in the step's directory, before the checkout
  post-checkout   in the checkout, after it
  pre-command     in the checkout, before the step's commands
  post-command    in the checkout, after them (also when a command failed)

Each runs with the step's environment (CI=true, BUILDKUBE_JOB_ID,
BUILDKUBE_STEP_KEY, BUILDKUBE_REPOSITORY, BUILDKUBE_COMMIT, ...). A hook that
exits non-zero fails the step with its exit code; its output is in the step's
log (with the same redaction). Variables it exports do not reach the commands.
The files are mounted read-only with mode 0555, so they need no chmod; the
kubelet updates them in place (within about a minute) when this ConfigMap
changes, without restarting the workers. Keys that are not hook names (this
README) are never run.

Example:

  pre-command: |
    #!/bin/sh
    set -eu
    echo "step $BUILDKUBE_STEP_KEY of job $BUILDKUBE_JOB_ID at $BUILDKUBE_COMMIT"
    df -h "$BUILDKUBE_CHECKOUT" | tail -n 1

docs/pipelines.md has the details.
"#;

/// The hooks ConfigMap as generated: only the README (no hook runs).
pub fn hooks_configmap() -> ConfigMap {
    ConfigMap {
        metadata: meta(HOOKS_CONFIGMAP, workers_selector()),
        data: Some(BTreeMap::from([(
            HOOKS_README_KEY.to_string(),
            HOOKS_README.to_string(),
        )])),
        ..Default::default()
    }
}

/// Volume and read-only mount of the hooks ConfigMap (workers of pools with
/// `jobs`). Not through `subPath`, so edits reach running workers.
pub fn hooks_volume() -> (Volume, VolumeMount) {
    (
        Volume {
            name: "hooks".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: HOOKS_CONFIGMAP.into(),
                default_mode: Some(HOOKS_MODE),
                ..Default::default()
            }),
            ..Default::default()
        },
        VolumeMount {
            name: "hooks".into(),
            mount_path: HOOKS_MOUNT_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        },
    )
}

/// The file of `key` in [`WEBHOOKS_SECRET`] as the server sees it.
pub fn webhook_secret_path(key: &str) -> PathBuf {
    PathBuf::from(format!("{WEBHOOKS_MOUNT_DIR}/{key}"))
}

/// The server's job flags for `webhooks`: a secret file per endpoint, the
/// clone URL; the bounds keep the binary's defaults.
pub fn job_args(webhooks: &WebhooksSpec) -> JobArgs {
    JobArgs {
        github_webhook_secret_file: webhooks
            .github
            .then(|| webhook_secret_path(GITHUB_WEBHOOK_KEY)),
        gitlab_webhook_token_file: webhooks
            .gitlab
            .then(|| webhook_secret_path(GITLAB_WEBHOOK_KEY)),
        webhook_clone_url: match webhooks.clone_url {
            CloneUrlSpec::Ssh => WebhookCloneUrl::Ssh,
            CloneUrlSpec::Https => WebhookCloneUrl::Https,
        },
        ..JobArgs::default()
    }
}

/// Volume and mount of [`WEBHOOKS_SECRET`] (the server only).
pub fn webhooks_volume() -> (Volume, VolumeMount) {
    crate::auth::secret_volume("webhooks", WEBHOOKS_SECRET, WEBHOOKS_MOUNT_DIR)
}

/// The HTTP paths of the webhook endpoints that are on.
pub fn webhook_paths(webhooks: &WebhooksSpec) -> Vec<&'static str> {
    [
        (webhooks.github, GITHUB_WEBHOOK_PATH),
        (webhooks.gitlab, GITLAB_WEBHOOK_PATH),
    ]
    .into_iter()
    .filter_map(|(on, path)| on.then_some(path))
    .collect()
}

/// An Ingress on the gRPC Ingress's host and certificate that routes
/// exactly the webhook paths (`Exact`) to the server's HTTP port: the gRPC
/// Ingress speaks gRPC to its backend, so the HTTP port needs its own.
/// `backend_tls` is the overlay's namespace when the server's HTTP port
/// speaks mutual TLS: nginx then presents the client certificate.
pub fn webhooks_ingress(
    spec: &StackSpec,
    webhooks: &WebhooksSpec,
    backend_tls: Option<&str>,
) -> Ingress {
    let body_size = format!("{}m", WEBHOOK_BODY_BYTES >> 20);
    let mut annotations: BTreeMap<String, String> = BTreeMap::from([
        (
            "nginx.ingress.kubernetes.io/backend-protocol".to_string(),
            "HTTP".to_string(),
        ),
        (
            "nginx.ingress.kubernetes.io/proxy-body-size".to_string(),
            body_size,
        ),
    ]);
    if let Some(namespace) = backend_tls {
        annotations.extend(
            crate::tls::ingress_backend_tls_annotations(namespace, "HTTPS")
                .into_iter()
                .map(|(k, v)| (k.to_string(), v)),
        );
    }
    // No cert-manager annotation: the gRPC Ingress has the certificate of
    // this host issued into TLS_SECRET; two would make two Certificates
    // fight over one Secret.
    let mut metadata = meta(WEBHOOKS_INGRESS, server_selector());
    metadata.annotations = Some(annotations);
    let path = |path: &str| HTTPIngressPath {
        path: Some(path.into()),
        path_type: "Exact".into(),
        backend: IngressBackend {
            service: Some(IngressServiceBackend {
                name: SERVER_NAME.into(),
                port: Some(ServiceBackendPort {
                    name: Some(HTTP_PORT_NAME.into()),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        },
    };
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
                    paths: webhook_paths(webhooks).into_iter().map(path).collect(),
                }),
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}
