//! The bazelrc that points a step's Bazel at this farm: written as the
//! step's `$HOME/.bazelrc` (so a plain `bazel build` in the step reads it)
//! and named by `BUILDKUBE_BAZELRC` (for `bazel --bazelrc=...` or a
//! workspace `.bazelrc` that imports it). It holds the job's farm token:
//! readable by the step's user only, and redacted from the step's log.

use std::path::{Path, PathBuf};

/// How a step's Bazel reaches this farm.
#[derive(Debug, Clone, Default)]
pub(crate) struct FarmEndpoint {
    /// `grpc://host:port` or `grpcs://host:port`; `None` when the worker's
    /// server address is not a network address.
    pub(crate) executor: Option<String>,
    /// CA certificate that verifies the server, for `grpcs://`.
    pub(crate) tls_ca_file: Option<PathBuf>,
}

impl FarmEndpoint {
    /// From the worker's `--server` (`http://` → `grpc://`, `https://` → `grpcs://`).
    pub(crate) fn from_server(server: &str, tls_ca_file: Option<PathBuf>) -> FarmEndpoint {
        let executor = if let Some(rest) = server.strip_prefix("http://") {
            Some(format!("grpc://{}", rest.trim_end_matches('/')))
        } else {
            server
                .strip_prefix("https://")
                .map(|rest| format!("grpcs://{}", rest.trim_end_matches('/')))
        };
        FarmEndpoint {
            executor,
            tls_ca_file,
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
    if let (Some(ca), Some(executor)) = (&farm.tls_ca_file, &farm.executor) {
        if executor.starts_with("grpcs://") {
            rc.push_str(&format!("build --tls_certificate={}\n", ca.display()));
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
        let farm = FarmEndpoint::from_server("https://farm.example:8980/", Some("/ca.pem".into()));
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
        let plain = FarmEndpoint::from_server("http://127.0.0.1:8980", None);
        assert_eq!(plain.executor.as_deref(), Some("grpc://127.0.0.1:8980"));
        assert_eq!(FarmEndpoint::from_server("in-process", None).executor, None);
    }
}
