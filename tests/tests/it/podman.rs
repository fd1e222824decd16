//! The rendered overlays played as pods with podman, on images built from
//! this checkout, with Bazel building through them (tests/podman/README.md
//! says what the test patch changes and why). Select them with
//! `cargo nextest run -E 'test(/podman/)'`; they need buildah, podman, runc
//! and debootstrap (root) and fail, saying so, without them.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use buildkube_config::DEFAULT_INSTANCE;
use buildkube_tests::fixture::{self, ALL_TARGETS};
use buildkube_tests::podman::{
    Overlay, PlayedOverlay, Podman, SERVER_IMAGE, WORKER_IMAGE, WORKER_TOOLCHAIN_IMAGE,
};
use buildkube_tests::{Bazel, BazelRun};

/// Pods start from images already built; the server opens an empty store.
const POD_READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Bazel's flags for an all-remote build through the played server pod,
/// with the token of the generated Secret.
fn remote_flags(played: &PlayedOverlay) -> Vec<String> {
    vec![
        format!("--remote_executor={}", played.grpc_url()),
        format!("--remote_instance_name={DEFAULT_INSTANCE}"),
        format!("--remote_header=authorization=Bearer {}", played.token()),
        "--spawn_strategy=remote".into(),
        "--genrule_strategy=remote".into(),
        "--jobs=8".into(),
    ]
}

fn with(flags: &[String], extra: &[&str]) -> Vec<String> {
    flags
        .iter()
        .cloned()
        .chain(extra.iter().map(|s| s.to_string()))
        .collect()
}

/// Plays `overlay` and waits for its server and one worker.
fn play(overlay: Overlay) -> Result<(Podman, PlayedOverlay)> {
    let podman = Podman::with_images()?;
    let started = Instant::now();
    let played = PlayedOverlay::play(&podman, overlay)?;
    played.wait_until_server_ready(POD_READY_TIMEOUT)?;
    played.wait_for_workers(1, POD_READY_TIMEOUT)?;
    eprintln!("{overlay:?}: pods ready after {:?}", started.elapsed());
    Ok((podman, played))
}

fn ensure_all_remote(run: &BazelRun) -> Result<()> {
    run.ensure_success()?;
    let summary = run.summary()?;
    ensure!(
        summary.local().is_empty() && summary.remote() > 0,
        "expected every spawn to run remotely: {summary}\n{run}"
    );
    Ok(())
}

/// `bazel build //...` and `bazel test //...`, every spawn on the worker
/// pod, outputs byte-correct; after `bazel clean`, all cache hits.
fn build_and_test_through(played: &PlayedOverlay) -> Result<()> {
    let bazel = Bazel::new()?;
    let flags = remote_flags(played);
    let build = bazel.build(with(&flags, &[ALL_TARGETS]))?;
    ensure_all_remote(&build).with_context(|| played.logs())?;
    fixture::check_build_outputs(&bazel)?;
    let test = bazel.test(with(&flags, &[ALL_TARGETS]))?;
    ensure_all_remote(&test).with_context(|| played.logs())?;
    fixture::check_test_outputs(&bazel)?;

    let spawns = build.summary()?.spawns();
    bazel.clean()?;
    let again = bazel.build(with(&flags, &[ALL_TARGETS]))?;
    again.ensure_success()?;
    let summary = again.summary()?;
    ensure!(
        summary.remote_cache_hits() == spawns && summary.remote() == 0,
        "after clean, expected {spawns} cache hits: {summary}\n{again}"
    );
    fixture::check_build_outputs(&bazel)
}

/// The images carry what the manifests assume: a passwd and group entry
/// for uid 10001 (OpenSSH refuses to run without one), HOME, tini, bash,
/// git, ssh, bwrap and the CA certificates, and binaries that run there.
#[test]
fn podman_images_carry_what_the_manifests_assume() -> Result<()> {
    let podman = Podman::with_images()?;
    for image in [WORKER_IMAGE, WORKER_TOOLCHAIN_IMAGE] {
        let out = podman.run_image(
            image,
            "/bin/bash",
            &[
                "-euc",
                "id -u; id -g; getent passwd \"$(id -u)\"; getent group \"$(id -g)\"; echo \"HOME=$HOME\"; \
                 command -v tini git ssh bwrap bash; test -s /etc/ssl/certs/ca-certificates.crt; \
                 ssh -G example.com >/dev/null && echo ssh-runs; buildkube-worker --version",
            ],
        )?;
        eprintln!("{image}:\n{out}");
        for expected in [
            "10001\n10001\n",
            "buildkube:x:10001:10001:buildkube:/home/buildkube:/bin/bash",
            "buildkube:x:10001:",
            "HOME=/home/buildkube",
            "/usr/local/bin/tini",
            "/usr/bin/git",
            "/usr/bin/ssh",
            "/usr/bin/bwrap",
            "ssh-runs",
            "buildkube-worker",
        ] {
            ensure!(out.contains(expected), "{image}: no `{expected}` in\n{out}");
        }
    }
    let out = podman.run_image(
        SERVER_IMAGE,
        "/bin/sh",
        &[
            "-euc",
            "id -u; getent passwd \"$(id -u)\"; echo \"HOME=$HOME\"; test -s /etc/ssl/certs/ca-certificates.crt; \
             /usr/bin/tini-static --version; buildkube-server --version",
        ],
    )?;
    eprintln!("{SERVER_IMAGE}:\n{out}");
    for expected in [
        "10001\n",
        "buildkube:x:10001:10001",
        "HOME=/home/buildkube",
        "tini version",
        "buildkube-server",
    ] {
        ensure!(
            out.contains(expected),
            "{SERVER_IMAGE}: no `{expected}` in\n{out}"
        );
    }
    Ok(())
}

/// `overlays/example` as pods: Bazel builds and tests the fixture through
/// the server pod, every action on the worker pod.
#[test]
fn podman_example_overlay_builds_and_tests_through_the_pods() -> Result<()> {
    let (_podman, played) = play(Overlay::Example)?;
    build_and_test_through(&played)
}
