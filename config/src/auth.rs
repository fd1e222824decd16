//! Who may call the server: worker and client credentials, read from the
//! YAML file named by `--auth-config`. Without that file the server is open.
//!
//! ```yaml
//! workers:
//!   - token_file: /etc/buildkube/worker/token
//! clients:
//!   - name: ci
//!     token_file: /etc/buildkube/clients/ci
//!     instances: [main]            # absent: every instance
//!     scopes: [read, write-cas, write-ac, execute]
//!   - name: dev
//!     token_file: /etc/buildkube/clients/dev
//!     scopes: [read, write-cas, execute]
//! ```
//!
//! A worker credential is valid only on the worker protocol (and, to fetch
//! inputs and upload outputs, on the content-addressed CAS); a client
//! credential never on the worker protocol. Several entries of one role may
//! be valid at once, so keys rotate without downtime; token files are
//! re-read when they change.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The credentials a server accepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Credentials of workers: valid on the worker protocol and the CAS
    /// (ContentAddressableStorage, ByteStream), nowhere else. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workers: Vec<WorkerCredential>,
    /// Credentials of clients (Bazel, CI, developers), each with its
    /// instances and scopes. Never valid on the worker protocol. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<ClientCredential>,
}

/// One worker key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerCredential {
    /// Name in logs and lease records. Default: the token file's path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// File holding the bearer token (surrounding whitespace ignored; an
    /// empty file is an error), e.g. a mounted Secret. Re-read when it changes.
    pub token_file: PathBuf,
}

/// One client key and what it may do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCredential {
    /// Name in logs. Default: the token file's path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// File holding the bearer token (surrounding whitespace ignored; an
    /// empty file is an error). Re-read when it changes.
    pub token_file: PathBuf,
    /// Instances the scopes apply to. Absent: every instance the server serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<Vec<String>>,
    /// What the client may do on those instances.
    pub scopes: BTreeSet<Scope>,
}

/// A right of a client on an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    /// Capabilities, FindMissingBlobs, BatchReadBlobs, ByteStream Read and
    /// QueryWriteStatus, GetTree, GetActionResult, Operations Get/List/Wait,
    /// WaitExecution, and the HTTP `/operations` pages.
    Read,
    /// BatchUpdateBlobs and ByteStream Write.
    WriteCas,
    /// UpdateActionResult: whoever has it can make any client's next build
    /// use a result of their choosing, so only trusted CI should.
    WriteAc,
    /// Execute and CancelOperation.
    Execute,
}

impl Scope {
    /// Every scope, in order.
    pub const ALL: [Scope; 4] = [Scope::Read, Scope::WriteCas, Scope::WriteAc, Scope::Execute];

    /// The name used in the config file and in error messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::WriteCas => "write-cas",
            Scope::WriteAc => "write-ac",
            Scope::Execute => "execute",
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// It could not be read.
    #[error("token file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// It holds nothing but whitespace: an empty bearer token would then work.
    #[error("token file {} is empty; put a random token in it (e.g. `openssl rand -hex 32`)", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// It holds text a header cannot carry.
    #[error("token file {}: the token must be printable ASCII without spaces", path.display())]
    NotHeaderText {
        /// The file.
        path: PathBuf,
    },
}

/// Reads a bearer token: the file's text without surrounding whitespace,
/// refused if empty or not printable ASCII. Server and worker both use it.
pub fn read_token_file(path: &Path) -> Result<String, TokenFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(TokenFileError::Empty {
            path: path.to_path_buf(),
        });
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TokenFileError::NotHeaderText {
            path: path.to_path_buf(),
        });
    }
    Ok(token.to_string())
}

impl AuthConfig {
    /// Parses YAML and checks it; errors name the field path.
    pub fn from_yaml(text: &str) -> Result<AuthConfig, String> {
        let config: AuthConfig = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        config.check()?;
        Ok(config)
    }

    /// Reads, parses and checks the file named by `--auth-config`.
    pub fn load(path: &Path) -> Result<AuthConfig, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--auth-config {}: {e}", path.display()))?;
        AuthConfig::from_yaml(&text).map_err(|e| format!("--auth-config {}: {e}", path.display()))
    }

    /// Renders YAML that [`AuthConfig::from_yaml`] reads back.
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("auth config serializes")
    }

    /// Checks what serde cannot: at least one credential, every client
    /// with a scope, instance names well formed, one file per role.
    pub fn check(&self) -> Result<(), String> {
        if self.workers.is_empty() && self.clients.is_empty() {
            return Err(
                "no credentials: list at least one entry under `workers` or `clients`".into(),
            );
        }
        for (i, client) in self.clients.iter().enumerate() {
            if client.scopes.is_empty() {
                return Err(format!(
                    "clients[{i}].scopes is empty; list some of: read, write-cas, write-ac, execute"
                ));
            }
            if let Some(instances) = &client.instances {
                if instances.is_empty() {
                    return Err(format!(
                        "clients[{i}].instances is empty; omit it for every instance"
                    ));
                }
                for (j, name) in instances.iter().enumerate() {
                    if !name.is_empty() {
                        crate::check_instance_name(name)
                            .map_err(|e| format!("clients[{i}].instances[{j}]: {e}"))?;
                    }
                }
            }
        }
        for (i, worker) in self.workers.iter().enumerate() {
            if let Some(j) = self
                .clients
                .iter()
                .position(|c| c.token_file == worker.token_file)
            {
                return Err(format!(
                    "workers[{i}].token_file and clients[{j}].token_file are both {}: \
                     a token is either a worker's or a client's",
                    worker.token_file.display()
                ));
            }
        }
        Ok(())
    }
}

impl WorkerCredential {
    /// The name in logs: `name`, or the token file's path.
    pub fn display_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| self.token_file.display().to_string())
    }
}

impl ClientCredential {
    /// The name in logs: `name`, or the token file's path.
    pub fn display_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| self.token_file.display().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "workers:\n  - token_file: /etc/buildkube/worker/token\nclients:\n  - token_file: /etc/buildkube/clients/ci\n    instances: [main]\n    scopes: [read, write-cas, write-ac, execute]\n  - token_file: /etc/buildkube/clients/dev\n    scopes: [read, write-cas, execute]\n";

    #[test]
    fn parses_the_documented_shape_and_round_trips() {
        let config = AuthConfig::from_yaml(EXAMPLE).unwrap();
        assert_eq!(config.workers.len(), 1);
        assert_eq!(config.clients[0].instances, Some(vec!["main".to_string()]));
        assert!(config.clients[0].scopes.contains(&Scope::WriteAc));
        assert!(!config.clients[1].scopes.contains(&Scope::WriteAc));
        assert_eq!(config.clients[1].instances, None);
        assert_eq!(AuthConfig::from_yaml(&config.to_yaml()).unwrap(), config);
    }

    #[test]
    fn errors_name_the_field() {
        let err =
            AuthConfig::from_yaml("clients:\n  - token_file: /t\n    scopes: [read, admin]\n")
                .unwrap_err();
        assert!(
            err.contains("clients[0].scopes") && err.contains("admin"),
            "{err}"
        );
        let err = AuthConfig::from_yaml("workers:\n  - token_fiel: /t\n").unwrap_err();
        assert!(
            err.contains("token_fiel") && err.contains("token_file"),
            "{err}"
        );
        let err =
            AuthConfig::from_yaml("clients:\n  - token_file: /t\n    scopes: []\n").unwrap_err();
        assert!(err.contains("clients[0].scopes"), "{err}");
        let err = AuthConfig::from_yaml(
            "clients:\n  - token_file: /t\n    instances: [x/blobs]\n    scopes: [read]\n",
        )
        .unwrap_err();
        assert!(err.contains("clients[0].instances[0]"), "{err}");
        let err = AuthConfig::from_yaml(
            "workers:\n  - token_file: /t\nclients:\n  - token_file: /t\n    scopes: [read]\n",
        )
        .unwrap_err();
        assert!(
            err.contains("workers[0]") && err.contains("clients[0]"),
            "{err}"
        );
        assert!(AuthConfig::from_yaml("{}\n").is_err());
    }

    #[test]
    fn empty_token_files_are_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("buildkube-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty");
        std::fs::write(&empty, " \n\t").unwrap();
        let err = read_token_file(&empty).unwrap_err().to_string();
        assert!(
            err.contains(&empty.display().to_string()) && err.contains("empty"),
            "{err}"
        );
        let good = dir.join("good");
        std::fs::write(&good, "s3cret\n").unwrap();
        assert_eq!(read_token_file(&good).unwrap(), "s3cret");
        let spaced = dir.join("spaced");
        std::fs::write(&spaced, "two words").unwrap();
        assert!(read_token_file(&spaced).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
