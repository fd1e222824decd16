//! Credentials for a server with `--auth-config`, written to a temp dir: a
//! worker token, a CI client (every scope, instance `main` only) and a
//! developer client (no `write-ac`, every instance), as the deployment
//! docs set them up.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use buildkube_config::auth::{AuthConfig, ClientCredential, Scope, WorkerCredential};
use tempfile::TempDir;

/// Token files and the auth config naming them; removed on drop.
#[derive(Debug)]
pub struct TestCredentials {
    dir: TempDir,
    /// What the files hold.
    pub config: AuthConfig,
}

/// The worker's token.
pub const WORKER_TOKEN: &str = "worker-token-1";
/// The CI client's token: every scope on `main`.
pub const CI_TOKEN: &str = "ci-token-1";
/// The developer client's token: read, write-cas, execute on every instance.
pub const DEV_TOKEN: &str = "dev-token-1";

impl TestCredentials {
    /// Writes the three tokens and the config.
    pub fn new() -> Result<TestCredentials> {
        let dir = tempfile::Builder::new()
            .prefix("buildkube-auth-")
            .tempdir()
            .context("creating the credentials' temp dir")?;
        let file = |name: &str, token: &str| -> Result<PathBuf> {
            let path = dir.path().join(name);
            std::fs::write(&path, format!("{token}\n"))
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        };
        let config = AuthConfig {
            workers: vec![WorkerCredential {
                name: Some("workers".into()),
                token_file: file("worker", WORKER_TOKEN)?,
            }],
            clients: vec![
                ClientCredential {
                    name: Some("ci".into()),
                    token_file: file("ci", CI_TOKEN)?,
                    instances: Some(vec!["main".into()]),
                    scopes: Scope::ALL.into_iter().collect(),
                },
                ClientCredential {
                    name: Some("dev".into()),
                    token_file: file("dev", DEV_TOKEN)?,
                    instances: None,
                    scopes: [Scope::Read, Scope::WriteCas, Scope::Execute].into(),
                },
            ],
        };
        let credentials = TestCredentials { dir, config };
        credentials.write_config(&credentials.config)?;
        Ok(credentials)
    }

    /// Writes `config` as the server's `--auth-config` file.
    pub fn write_config(&self, config: &AuthConfig) -> Result<()> {
        std::fs::write(self.config_path(), config.to_yaml())
            .with_context(|| format!("writing {}", self.config_path().display()))
    }

    /// The `--auth-config` file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("auth.yaml")
    }

    /// The worker's token file, for `--auth-token-file`.
    pub fn worker_token_file(&self) -> PathBuf {
        self.dir.path().join("worker")
    }

    /// The temp dir, for more token files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
