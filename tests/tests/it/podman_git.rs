//! Issue 7: from inside an action on the worker pod, git clones over SSH
//! and over HTTPS with the credentials of the overlay's
//! `buildkube-worker-credentials` Secret. The overlay is rendered by
//! `manifests-gen --config` from the built-in stack spec with
//! `worker_credentials` on the overlay and `git_credentials` on the pool,
//! and played with podman (tests/podman/README.md). The git servers run on
//! this machine's loopback, which the pod shares (hostNetwork): Debian's
//! sshd, and git http-backend behind a TLS server of a private CA.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use buildkube_proto::reapi;
use buildkube_reapi::Digest;
use buildkube_tests::git_servers::{bare_repository, ssh_key, GitHttpsServer, Sshd};
use buildkube_tests::podman::{PlayedOverlay, Podman};
use buildkube_tests::{bin_path, TestPki};
use serde_yaml::Value;

use crate::reapi_client::{execute, last_operation, response_of, upload_shell_action, Clients};

const POD_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// What the repository's one file holds.
const CONTENT: &str = "cloned on the worker pod with the Secret's credentials\n";
/// The Basic credentials the HTTPS server demands (in `git-credentials`).
const GIT_USER: &str = "buildkube";
const GIT_PASSWORD: &str = "s3cret-for-the-podman-test";
/// Where the worker pod mounts `buildkube-worker-credentials`.
const CREDENTIALS_DIR: &str = "/etc/buildkube/credentials";
/// The private CA of the HTTPS git server, added to the Secret by the test
/// as a user adds a file to their copy of the overlay.
const GIT_CA_FILE: &str = "git-ca.crt";
const CREDENTIALS_SECRET: &str = "buildkube-worker-credentials";

/// `manifests-gen --config` of the built-in stack spec with the worker
/// credentials on (overlay `example`, pool `default`), egress to the
/// loopback `ports` allowed as a cluster would need; the `overlays/` it
/// wrote, with [`GIT_CA_FILE`] added to the credentials Secret.
fn overlays_with_credentials(dir: &Path, ports: &[u16]) -> Result<PathBuf> {
    let generator = bin_path("manifests-gen");
    let output = Command::new(&generator).arg("spec").output()?;
    ensure!(output.status.success(), "manifests-gen spec: {output:?}");
    let mut spec: Value = serde_yaml::from_slice(&output.stdout)?;
    let mut example = spec["overlays"]["example"].clone();
    example["worker_credentials"] = true.into();
    spec["overlays"] = serde_yaml::from_str("{}")?;
    spec["overlays"]["example"] = example;
    spec["worker_pools"][0]["git_credentials"] = true.into();
    spec["worker_egress"] = serde_yaml::to_value([BTreeMap::from([
        ("cidr", serde_yaml::to_value("127.0.0.1/32")?),
        ("ports", serde_yaml::to_value(ports)?),
    ])])?;
    let spec_file = dir.join("stack.yaml");
    std::fs::write(&spec_file, serde_yaml::to_string(&spec)?)?;
    let out = dir.join("generated");
    let status = Command::new(&generator)
        .arg("--config")
        .arg(&spec_file)
        .arg("--out")
        .arg(&out)
        .status()?;
    ensure!(
        status.success(),
        "manifests-gen --config {}: {status}",
        spec_file.display()
    );

    let overlay = out.join("overlays/example");
    let kustomization = overlay.join("kustomization.yaml");
    let text = std::fs::read_to_string(&kustomization)?;
    let last_file = "  - env.sh=secrets/env.sh\n";
    ensure!(
        text.contains(&format!("- name: {CREDENTIALS_SECRET}\n")) && text.contains(last_file),
        "{} has no {CREDENTIALS_SECRET} with env.sh:\n{text}",
        kustomization.display()
    );
    let added = format!("{last_file}  - {GIT_CA_FILE}=secrets/{GIT_CA_FILE}\n");
    std::fs::write(&kustomization, text.replacen(last_file, &added, 1))?;
    std::fs::write(
        overlay.join("secrets").join(GIT_CA_FILE),
        "filled in by the test\n",
    )?;
    Ok(out.join("overlays"))
}

#[test]
fn podman_worker_pod_actions_clone_over_ssh_and_https_with_the_secret_s_credentials() -> Result<()>
{
    let runtime = tokio::runtime::Runtime::new()?;
    let scratch = tempfile::tempdir()?;
    let root = scratch.path();
    let repo = bare_repository(root, "repo", "file", CONTENT)?;
    let client_key = ssh_key(root, "client_key")?;
    std::fs::write(root.join("authorized_keys"), format!("{client_key}\n"))?;
    let trusted_host_key = ssh_key(root, "trusted_host_key")?;
    ssh_key(root, "unknown_host_key")?;
    let pki = TestPki::generate(&root.join("pki"), "git")?;
    let authorized = root.join("authorized_keys");
    let (trusted, unknown, https) = runtime.block_on(async {
        anyhow::Ok((
            Sshd::start(root, "trusted", &root.join("trusted_host_key"), &authorized).await?,
            Sshd::start(root, "unknown", &root.join("unknown_host_key"), &authorized).await?,
            GitHttpsServer::start(
                root,
                &pki.server_cert,
                &pki.server_key,
                GIT_USER,
                GIT_PASSWORD,
            )
            .await?,
        ))
    })?;
    let https_port = https.url().rsplit(':').next().unwrap_or_default().parse()?;

    let overlays = overlays_with_credentials(root, &[trusted.port(), unknown.port(), https_port])?;
    let secrets = BTreeMap::from([
        (
            "git-credentials".to_string(),
            format!("https://{GIT_USER}:{GIT_PASSWORD}@127.0.0.1:{https_port}\n"),
        ),
        (
            "ssh-private-key".to_string(),
            std::fs::read_to_string(root.join("client_key"))?,
        ),
        // Only the trusted sshd's key: the other one must be refused.
        (
            "known_hosts".to_string(),
            format!("[127.0.0.1]:{} {trusted_host_key}\n", trusted.port()),
        ),
        (
            "env.sh".to_string(),
            format!("export GIT_SSL_CAINFO={CREDENTIALS_DIR}/{GIT_CA_FILE}\n"),
        ),
        (
            GIT_CA_FILE.to_string(),
            std::fs::read_to_string(&pki.ca_cert)?,
        ),
    ]);
    let podman = Podman::with_images()?;
    let started = Instant::now();
    let played = PlayedOverlay::play_from(&podman, &overlays, "example", &secrets)?;
    played.wait_until_server_ready(POD_READY_TIMEOUT)?;
    played.wait_for_workers(1, POD_READY_TIMEOUT)?;
    eprintln!(
        "the credentials overlay's pods ready after {:?}",
        started.elapsed()
    );

    let user = String::from_utf8(Command::new("id").arg("-un").output()?.stdout)?;
    let ssh_url = |port: u16| format!("ssh://{}@127.0.0.1:{port}{}", user.trim(), repo.display());
    let https_url = format!("{}/repo.git", https.url());
    // Each refusal must happen for its reason: the unknown host key, the
    // missing credentials (this action's own empty git configuration wins
    // over the worker's credential store).
    let script = format!(
        "set -eu\n\
         git clone -q {trusted} over-ssh\n\
         git clone -q {https_url} over-https\n\
         mkdir -p out\n\
         cat over-ssh/file over-https/file > out/both\n\
         if git clone -q {unknown} from-unknown 2> out/unknown-host.err; then echo 'unknown host accepted'; exit 1; fi\n\
         if GIT_CONFIG_COUNT=0 git clone -q {https_url} no-credentials 2> out/no-credentials.err; then \
           echo 'cloned without credentials'; exit 1; fi\n",
        trusted = ssh_url(trusted.port()),
        unknown = ssh_url(unknown.port()),
    );
    let outputs = ["out/both", "out/unknown-host.err", "out/no-credentials.err"];
    let endpoint = format!("http://127.0.0.1:{}", played.ports().grpc);
    let files = runtime.block_on(async {
        let mut clients = Clients::connect_to(&endpoint, Some(played.token()));
        let action = reapi::Action {
            do_not_cache: true,
            timeout: Some(prost_types::Duration {
                seconds: 120,
                nanos: 0,
            }),
            ..Default::default()
        };
        let action = upload_shell_action(&mut clients, &script, &outputs, action).await;
        let operation = last_operation(execute(&mut clients, action).await).await;
        let response = response_of(&operation);
        let result = response.result.context("no ActionResult")?;
        let cas = clients.cas_client();
        let text = |digest: Option<reapi::Digest>| {
            let cas = cas.clone();
            async move {
                let Some(digest) = digest else {
                    return anyhow::Ok(String::new());
                };
                let blob = cas.read_blob(Digest::try_from(&digest)?).await?;
                anyhow::Ok(String::from_utf8_lossy(&blob).into_owned())
            }
        };
        if result.exit_code != 0 {
            bail!(
                "the action exited {}\nstdout: {}\nstderr: {}\n{}",
                result.exit_code,
                text(result.stdout_digest).await?,
                text(result.stderr_digest).await?,
                played.logs()
            );
        }
        let mut files = BTreeMap::new();
        for file in result.output_files {
            files.insert(file.path.clone(), text(file.digest).await?);
        }
        anyhow::Ok(files)
    })?;
    eprintln!("the action's outputs: {files:#?}");
    let file = |path: &str| files.get(path).with_context(|| format!("no output {path}"));
    ensure!(
        file("out/both")? == &format!("{CONTENT}{CONTENT}"),
        "the clones over SSH and HTTPS do not hold the repository's file"
    );
    ensure!(
        file("out/unknown-host.err")?.contains("Host key verification failed"),
        "the sshd with an unknown host key was not refused for its key"
    );
    ensure!(
        file("out/no-credentials.err")?.contains("could not read Username"),
        "without the credential store, the HTTPS clone did not fail for lack of credentials"
    );
    drop((trusted, unknown, https));
    Ok(())
}
