//! The bazelrc that points a step's Bazel at this farm: written as the
//! step's `$HOME/.bazelrc` (so a plain `bazel build` in the step reads it)
//! and named by `BUILDKUBE_BAZELRC` (for `bazel --bazelrc=...` or a
//! workspace `.bazelrc` that imports it). It holds the job's farm token:
//! readable by the step's user only, and redacted from the step's log.

use std::path::{Path, PathBuf};

use buildkube_config::ClientTlsArgs;

/// How a step's Bazel reaches this farm.
#[derive(Debug, Clone, Default)]
pub(crate) struct FarmEndpoint {
    /// `grpc://host:port` or `grpcs://host:port`; `None` when the worker's
    /// server address is not a network address.
    pub(crate) executor: Option<String>,
    /// CA certificate that verifies the server, for `grpcs://`.
    pub(crate) tls_ca_file: Option<PathBuf>,
    /// The worker's own client certificate and key, for a server that
    /// requires mutual TLS (`--tls-client-ca-file`): without them the
    /// step's Bazel could not even connect. Steps run as the worker's user,
    /// which can read these files anyway; what a step may do on the farm is
    /// still only what the job's token allows.
    pub(crate) tls_client: Option<(PathBuf, PathBuf)>,
}

impl FarmEndpoint {
    /// From the worker's `--server` (`http://` → `grpc://`, `https://` →
    /// `grpcs://`) and its TLS files.
    pub(crate) fn from_server(server: &str, tls: &ClientTlsArgs) -> FarmEndpoint {
        let executor = if let Some(rest) = server.strip_prefix("http://") {
            Some(format!("grpc://{}", rest.trim_end_matches('/')))
        } else {
            server
                .strip_prefix("https://")
                .map(|rest| format!("grpcs://{}", rest.trim_end_matches('/')))
        };
        let tls_client = tls
            .tls_client_cert_file
            .clone()
            .zip(tls.tls_client_key_file.clone());
        FarmEndpoint {
            executor,
            tls_ca_file: tls.tls_ca_file.clone(),
            tls_client,
        }
    }
}

/// The bazelrc's text.
pub(crate) fn render(farm: &FarmEndpoint, instance: &str, token: &str) -> String {
    let mut rc = String::from(
        "# Written by buildkube-worker: this step's Bazel runs its actions on the farm that runs the step.\n",
    );
    match &farm.executor {
        Some(executor) => rc.push_str(&format!("build --remote_executor={executor}\n")),
        None => rc.push_str(
            "# The worker knows no network address of its server: no --remote_executor.\n",
        ),
    }
    if !instance.is_empty() {
        rc.push_str(&format!("build --remote_instance_name={instance}\n"));
    }
    if !token.is_empty() {
        rc.push_str(&format!(
            "build --remote_header=authorization=Bearer {token}\n"
        ));
    }
    if farm
        .executor
        .as_deref()
        .is_some_and(|e| e.starts_with("grpcs://"))
    {
        if let Some(ca) = &farm.tls_ca_file {
            rc.push_str(&format!("build --tls_certificate={}\n", ca.display()));
        }
        if let Some((cert, key)) = &farm.tls_client {
            rc.push_str(&format!(
                "build --tls_client_certificate={}\nbuild --tls_client_key={}\n",
                cert.display(),
                key.display()
            ));
        }
    }
    rc
}

/// Writes the bazelrc, readable by its owner only.
pub(crate) async fn write(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let (path, text) = (path.to_path_buf(), text.to_string());
    tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&path)?;
        file.write_all(text.as_bytes())
    })
    .await
    .map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_step_bazelrc_points_at_the_farm() {
        let ca_only = ClientTlsArgs {
            tls_ca_file: Some("/ca.pem".into()),
            ..Default::default()
        };
        let farm = FarmEndpoint::from_server("https://farm.example:8980/", &ca_only);
        let rc = render(&farm, "ci", "tok-123");
        assert_eq!(
            rc.lines().skip(1).collect::<Vec<_>>(),
            [
                "build --remote_executor=grpcs://farm.example:8980",
                "build --remote_instance_name=ci",
                "build --remote_header=authorization=Bearer tok-123",
                "build --tls_certificate=/ca.pem",
            ]
        );
        let none = ClientTlsArgs::default();
        let plain = FarmEndpoint::from_server("http://127.0.0.1:8980", &none);
        assert_eq!(plain.executor.as_deref(), Some("grpc://127.0.0.1:8980"));
        assert_eq!(
            FarmEndpoint::from_server("in-process", &none).executor,
            None
        );
    }

    #[test]
    fn job_step_bazelrc_carries_the_workers_client_certificate_for_mutual_tls() {
        let mutual = ClientTlsArgs {
            tls_ca_file: Some("/tls/ca.crt".into()),
            tls_client_cert_file: Some("/tls/tls.crt".into()),
            tls_client_key_file: Some("/tls/tls.key".into()),
        };
        let rc = render(
            &FarmEndpoint::from_server("https://buildkube-server:8980", &mutual),
            "main",
            "",
        );
        assert!(
            rc.contains("build --tls_certificate=/tls/ca.crt\n")
                && rc.contains("build --tls_client_certificate=/tls/tls.crt\n")
                && rc.contains("build --tls_client_key=/tls/tls.key\n"),
            "{rc}"
        );
        // Never towards a plaintext endpoint.
        let rc = render(
            &FarmEndpoint::from_server("http://buildkube-server:8980", &mutual),
            "main",
            "",
        );
        assert!(!rc.contains("--tls_"), "{rc}");
    }
}
