//! The objects of an overlay with auth: one Secret with the worker token,
//! one with the client tokens (a CI client that may write the action cache,
//! a developer client that may not), and the server's `--auth-config`,
//! rendered from the typed [`AuthConfig`] into a ConfigMap.
//!
//! The server mounts all three; workers mount only the worker token, so an
//! action on a worker never finds a client credential.

use std::collections::BTreeMap;
use std::path::PathBuf;

use buildkube_config::auth::{AuthConfig, ClientCredential, Scope, WorkerCredential};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, SecretVolumeSource, Volume, VolumeMount,
};

use crate::objects::{meta, server_selector};

/// Secret with the workers' bearer token (key [`WORKER_TOKEN_KEY`]).
pub const WORKER_TOKEN_SECRET: &str = "buildkube-worker-token";
/// Key of the token in [`WORKER_TOKEN_SECRET`].
pub const WORKER_TOKEN_KEY: &str = "token";
/// Where [`WORKER_TOKEN_SECRET`] is mounted (server and workers).
pub const WORKER_TOKEN_MOUNT_DIR: &str = "/etc/buildkube/worker-token";
/// Secret with the clients' bearer tokens (keys [`CI_TOKEN_KEY`], [`DEV_TOKEN_KEY`]).
pub const CLIENT_TOKENS_SECRET: &str = "buildkube-client-tokens";
/// Key of the CI client's token: every scope.
pub const CI_TOKEN_KEY: &str = "ci";
/// Key of the developer client's token: read, write-cas, execute (no write-ac).
pub const DEV_TOKEN_KEY: &str = "dev";
/// Where [`CLIENT_TOKENS_SECRET`] is mounted (the server only).
pub const CLIENT_TOKENS_MOUNT_DIR: &str = "/etc/buildkube/client-tokens";
/// ConfigMap holding the server's `--auth-config` (key [`AUTH_CONFIG_KEY`]).
pub const AUTH_CONFIGMAP: &str = "buildkube-auth";
/// Key of the auth config in [`AUTH_CONFIGMAP`].
pub const AUTH_CONFIG_KEY: &str = "auth.yaml";
/// Where [`AUTH_CONFIGMAP`] is mounted in the server.
pub const AUTH_CONFIG_MOUNT_DIR: &str = "/etc/buildkube/auth";

/// The worker token's path in server and worker pods.
pub fn worker_token_path() -> PathBuf {
    PathBuf::from(format!("{WORKER_TOKEN_MOUNT_DIR}/{WORKER_TOKEN_KEY}"))
}

/// The server's `--auth-config` path.
pub fn auth_config_path() -> PathBuf {
    PathBuf::from(format!("{AUTH_CONFIG_MOUNT_DIR}/{AUTH_CONFIG_KEY}"))
}

/// The credentials the server accepts: the workers' token, the CI client
/// (every scope) and the developer client (no `write-ac`), on every instance.
pub fn auth_config() -> AuthConfig {
    let client_token = |key: &str| PathBuf::from(format!("{CLIENT_TOKENS_MOUNT_DIR}/{key}"));
    AuthConfig {
        workers: vec![WorkerCredential {
            name: Some("workers".into()),
            token_file: worker_token_path(),
        }],
        clients: vec![
            ClientCredential {
                name: Some("ci".into()),
                token_file: client_token(CI_TOKEN_KEY),
                instances: None,
                scopes: Scope::ALL.into_iter().collect(),
            },
            ClientCredential {
                name: Some("dev".into()),
                token_file: client_token(DEV_TOKEN_KEY),
                instances: None,
                scopes: [Scope::Read, Scope::WriteCas, Scope::Execute].into(),
            },
        ],
    }
}

/// [`auth_config`] as the ConfigMap the server mounts.
pub fn auth_configmap() -> ConfigMap {
    ConfigMap {
        metadata: meta(AUTH_CONFIGMAP, server_selector()),
        data: Some(BTreeMap::from([(
            AUTH_CONFIG_KEY.into(),
            auth_config().to_yaml(),
        )])),
        ..Default::default()
    }
}

/// A Secret mounted read-only at `dir`, files mode 0440 (readable by the
/// pod's fsGroup).
pub(crate) fn secret_volume(name: &str, secret: &str, dir: &str) -> (Volume, VolumeMount) {
    (
        Volume {
            name: name.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.into()),
                default_mode: Some(0o440),
                ..Default::default()
            }),
            ..Default::default()
        },
        VolumeMount {
            name: name.into(),
            mount_path: dir.into(),
            read_only: Some(true),
            ..Default::default()
        },
    )
}

/// Volume and mount of the worker token (server and workers).
pub fn worker_token_volume() -> (Volume, VolumeMount) {
    secret_volume("worker-token", WORKER_TOKEN_SECRET, WORKER_TOKEN_MOUNT_DIR)
}

/// Volumes and mounts of the server: the worker token, the client tokens
/// and the auth config.
pub fn server_auth_volumes() -> Vec<(Volume, VolumeMount)> {
    vec![
        worker_token_volume(),
        secret_volume(
            "client-tokens",
            CLIENT_TOKENS_SECRET,
            CLIENT_TOKENS_MOUNT_DIR,
        ),
        (
            Volume {
                name: "auth-config".into(),
                config_map: Some(ConfigMapVolumeSource {
                    name: AUTH_CONFIGMAP.into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            VolumeMount {
                name: "auth-config".into(),
                mount_path: AUTH_CONFIG_MOUNT_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
        ),
    ]
}
