//! The rendered overlays played as pods with podman, on images built from
//! this checkout, with Bazel building through them (tests/podman/README.md
//! says what the test patch changes and why). Select them with
//! `cargo nextest run -E 'test(/podman/)'`; they need buildah, podman, runc
//! and debootstrap (root) and fail, saying so, without them.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use buildkube_config::{DEFAULT_INSTANCE, METRIC_ACTIONS_RUNNING};
use buildkube_tests::fixture::{self, ALL_TARGETS, SLOW_TARGET};
use buildkube_tests::operations::{EVENT_REQUEUED, EVENT_RESTORED};
use buildkube_tests::podman::{
    Overlay, PlayedOverlay, Podman, CA_KEY, CERT_KEY, KEY_KEY, SERVER_IMAGE, WORKER_IMAGE,
    WORKER_TOOLCHAIN_IMAGE,
};
use buildkube_tests::{poll_until, Bazel, BazelRun};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

/// Pods start from images already built; the server opens an empty store.
const POD_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Bazel's first actions reach the worker pod.
const BUILD_START_TIMEOUT: Duration = Duration::from_secs(180);
const WORKER_WORKLOAD: &str = "buildkube-worker-default";
/// The Secret of the client certificate in the cert-manager component.
const CLIENT_TLS_SECRET: &str = "buildkube-client-tls";
/// The server's Service: the name its certificate is for.
const SERVER_SERVICE: &str = "buildkube-server";
const SERVER_WORKLOAD: &str = "buildkube-server";
/// The server pod's container, and the program it runs under tini.
const SERVER_CONTAINER: &str = "server";
const SERVER_PROGRAM: &str = "buildkube-server";
/// The worker pod's container, and the program it runs under tini.
const WORKER_CONTAINER: &str = "worker";
const WORKER_PROGRAM: &str = "buildkube-worker";
/// Long enough for a Complete call a stopped worker had sent to be recorded.
const COMPLETIONS_LAND: Duration = Duration::from_millis(500);

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

/// [`remote_flags`] over mutual TLS with what cert-manager would issue: the
/// CA and the client certificate of `buildkube-client-tls`; the server's
/// certificate names `buildkube-server`, which Bazel dials as 127.0.0.1.
fn mutual_tls_flags(played: &PlayedOverlay) -> Result<Vec<String>> {
    let file = |key| played.issued_file(CLIENT_TLS_SECRET, key);
    let mut flags = remote_flags(played);
    flags.extend([
        format!("--tls_certificate={}", file(CA_KEY)?.display()),
        format!("--tls_client_certificate={}", file(CERT_KEY)?.display()),
        format!("--tls_client_key={}", file(KEY_KEY)?.display()),
        format!("--tls_authority_override={SERVER_SERVICE}"),
    ]);
    Ok(flags)
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
fn build_and_test_through(played: &PlayedOverlay, bazel: &Bazel, flags: &[String]) -> Result<()> {
    let build = bazel.build(with(flags, &[ALL_TARGETS]))?;
    ensure_all_remote(&build).with_context(|| played.logs())?;
    fixture::check_build_outputs(bazel)?;
    let test = bazel.test(with(flags, &[ALL_TARGETS]))?;
    ensure_all_remote(&test).with_context(|| played.logs())?;
    fixture::check_test_outputs(bazel)?;

    let spawns = build.summary()?.spawns();
    bazel.clean()?;
    let again = bazel.build(with(flags, &[ALL_TARGETS]))?;
    again.ensure_success()?;
    let summary = again.summary()?;
    ensure!(
        summary.remote_cache_hits() == spawns && summary.remote() == 0,
        "after clean, expected {spawns} cache hits: {summary}\n{again}"
    );
    fixture::check_build_outputs(bazel)
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
    build_and_test_through(&played, &Bazel::new()?, &remote_flags(&played))
}

/// `overlays/production` as pods: the server, a worker, PostgreSQL and
/// Redis, mutual TLS between them with the certificates cert-manager would
/// issue. Bazel builds and tests the fixture through the server pod with
/// the client certificate; the CAS's small blobs land in PostgreSQL and the
/// action cache in Redis, which serve the cache hits after `bazel clean`.
#[test]
fn podman_production_overlay_builds_and_tests_through_the_pods_over_mutual_tls() -> Result<()> {
    let bazel = Bazel::new()?;
    bazel.ensure_tls_capable()?;
    let (podman, played) = play(Overlay::Production)?;
    ensure!(played.tls(), "the production server pod does not speak TLS");
    build_and_test_through(&played, &bazel, &mutual_tls_flags(&played)?)?;

    let ports = played.ports();
    let redis_keys = podman.run([
        "exec",
        &played.container("buildkube-redis", "redis"),
        "redis-cli",
        "-p",
        &ports.redis.to_string(),
        "--no-auth-warning",
        "eval",
        "return #redis.call('keys', ARGV[1])",
        "0",
        "buildkube:*",
    ])?;
    let postgres_blobs = podman.run([
        "exec",
        &played.container("buildkube-postgres", "postgres"),
        "psql",
        "-p",
        &ports.postgres.to_string(),
        "-U",
        "buildkube",
        "-d",
        "buildkube",
        "-tAc",
        "SELECT count(*) FROM buildkube_cas_blobs",
    ])?;
    eprintln!(
        "action results in Redis: {}; CAS blobs in PostgreSQL: {}",
        redis_keys.trim(),
        postgres_blobs.trim()
    );
    for (store, count) in [("Redis", &redis_keys), ("PostgreSQL", &postgres_blobs)] {
        let count: u64 = count
            .trim()
            .parse()
            .with_context(|| format!("{store} count {count:?}"))?;
        ensure!(count > 0, "the build stored nothing in the {store} pod");
    }
    Ok(())
}

/// Runs `bazel build //... //slow` on another thread while `during` runs
/// on this one, once actions run on the worker pod.
fn build_during(
    played: &PlayedOverlay,
    bazel: &Bazel,
    during: impl FnOnce() -> Result<()>,
) -> Result<BazelRun> {
    build_during_with(played, bazel, &[], during)
}

/// [`build_during`] with `extra` Bazel flags.
fn build_during_with(
    played: &PlayedOverlay,
    bazel: &Bazel,
    extra: &[&str],
    during: impl FnOnce() -> Result<()>,
) -> Result<BazelRun> {
    let args = with(
        &with(&remote_flags(played), extra),
        &[ALL_TARGETS, SLOW_TARGET],
    );
    std::thread::scope(|scope| {
        let build = scope.spawn(|| bazel.build(&args));
        let done = poll_until(
            "actions running on the worker pod",
            BUILD_START_TIMEOUT,
            || Ok((played.metric(METRIC_ACTIONS_RUNNING).unwrap_or(0.0) >= 1.0).then_some(())),
        )
        .and_then(|()| during());
        let run = build
            .join()
            .map_err(|_| anyhow::anyhow!("the Bazel thread panicked"))??;
        done.with_context(|| format!("the build:\n{run}"))?;
        Ok(run)
    })
}

/// The worker pod stopped with its grace period while it runs actions (a
/// node drain): it finishes and reports them and exits 0; the pod started
/// again (the Deployment's replacement) takes the rest; nothing is lost.
#[test]
fn podman_example_worker_pod_stopped_mid_build_drains() -> Result<()> {
    let (podman, played) = play(Overlay::Example)?;
    // The worker's id is its pod's name (BUILDKUBE_WORKER_ID from metadata.name).
    let pod = played.pod(WORKER_WORKLOAD);
    let worker_id = pod.clone();
    let container = played.container(WORKER_WORKLOAD, "worker");
    let grace = played.termination_grace_secs(WORKER_WORKLOAD)?;
    let bazel = Bazel::new()?;
    let mut draining = Vec::new();
    let run = build_during(&played, &bazel, || {
        draining = played
            .operations()?
            .into_iter()
            .filter(|op| op.is_running_on(&worker_id))
            .map(|op| op.name)
            .collect();
        ensure!(
            !draining.is_empty(),
            "no action ran on {worker_id} at the stop"
        );
        let stopped = Instant::now();
        podman.run(["pod", "stop", "--time", &grace.to_string(), &pod])?;
        eprintln!("the worker pod stopped after {:?}", stopped.elapsed());
        let code = played.exit_code(&container)?;
        ensure!(
            code == 0,
            "the drained worker exited with {code}\n{}",
            played.logs()
        );
        podman.run(["pod", "start", &pod])?;
        Ok(())
    })?;
    ensure_all_remote(&run)?;
    fixture::check_build_outputs(&bazel)?;
    fixture::check_slow_outputs(&bazel)?;
    let ops = played.operations()?;
    for name in &draining {
        let op = ops
            .iter()
            .find(|op| &op.name == name)
            .with_context(|| format!("operation {name} is gone"))?;
        // The pod started again has the same name, so the same worker id:
        // only a timeline without a requeue shows the drained worker did it.
        ensure!(
            op.completed_by() == Some(worker_id.as_str())
                && !op.timeline.iter().any(|e| e.event == EVENT_REQUEUED),
            "{name}, running at the stop, was not completed by the draining worker: {}",
            op.describe()
        );
    }
    eprintln!(
        "{} action(s) running at the stop were finished by the draining worker",
        draining.len()
    );
    Ok(())
}

/// A process stopped with SIGSTOP, continued (SIGCONT) on drop, also when
/// the test fails meanwhile.
struct Stopped(Pid);

impl Stopped {
    fn stop(pid: Pid) -> Result<Stopped> {
        signal::kill(pid, Signal::SIGSTOP).with_context(|| format!("SIGSTOP to pid {pid}"))?;
        Ok(Stopped(pid))
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Err(e) = signal::kill(self.0, Signal::SIGCONT) {
            eprintln!("SIGCONT to pid {}: {e}", self.0);
        }
    }
}

/// Bazel 4.2.3 retries a failed remote call `--remote_retries` times (default
/// 5) with exponential backoff from 100 ms, capped at 5 s: 5 retries wait
/// about 3 s, 10 about 26 s, 20 about 76 s. But Bazel sees the server back
/// only when its gRPC channel next reconnects: grpc-java waits 1 s, then
/// 1.6 times longer after each refused connection (±20%), failing calls at
/// once meanwhile (with `podman pod kill` and `pod start`, Bazel's calls in
/// the 150 ms the restarted server listened still failed with the earlier
/// "connection refused"). Its
/// attempts come about 1, 2.6, 5.2, 9.3, 15.8, 26.3 and 43 s after the
/// server goes, so a server away for more than about 16 s is seen only
/// after 26 s, when 10 retries are spent. podman restarting the killed
/// server took up to 20 s here with the machine loaded (load 8 on 2 cores);
/// 20 retries ride out an absence of up to about 40 s.
const SURVIVE_SERVER_RESTART: &str = "--remote_retries=20";

/// The server pod's server killed (SIGKILL, no grace period: a crash, an
/// OOM kill) while actions run, and restarted in its pod by podman's
/// restart policy as the kubelet would: the journal on its data volume
/// brings the operations back, the worker pod keeps its leases and
/// completes them, Bazel re-attaches with WaitExecution, and the build
/// completes with byte-correct outputs, nothing that ran at the kill run
/// again.
///
/// The kill is of the process, not `podman pod kill` then `podman pod
/// start`, which podman 4.3 undoes: see [`PlayedOverlay::await_restart`]. Done that way (its first CI
/// run, and again here) the pod came back, podman's cleanup of the killed
/// container stopped it again a moment later, and Bazel gave up after its
/// 10 retries of WaitExecution (~26 s of `UNAVAILABLE: io exception`,
/// connection refused) with exit code 34.
#[test]
fn podman_example_server_pod_killed_mid_build_completes() -> Result<()> {
    let (_podman, played) = play(Overlay::Example)?;
    let bazel = Bazel::new()?;
    let mut executing = Vec::new();
    let run = build_during_with(&played, &bazel, &[SURVIVE_SERVER_RESTART], || {
        let server = played.main_pid(SERVER_WORKLOAD, SERVER_CONTAINER, SERVER_PROGRAM)?;
        let worker = played.main_pid(WORKER_WORKLOAD, WORKER_CONTAINER, WORKER_PROGRAM)?;
        let restarts = played.restart_count(SERVER_WORKLOAD, SERVER_CONTAINER)?;
        {
            // What executes at the kill must be what the snapshot says: an
            // action completing in between is (rightly) unknown to the
            // restarted server. The worker stopped, nothing completes; its
            // Complete calls already sent land first.
            let _frozen = Stopped::stop(worker)?;
            std::thread::sleep(COMPLETIONS_LAND);
            executing = played
                .operations()?
                .into_iter()
                .filter(|op| op.is_executing())
                .collect();
            ensure!(!executing.is_empty(), "no action ran at the kill");
            signal::kill(server, Signal::SIGKILL).context("SIGKILL to the server")?;
        }
        let killed = Instant::now();
        played.await_restart(
            SERVER_WORKLOAD,
            SERVER_CONTAINER,
            restarts,
            POD_READY_TIMEOUT,
        )?;
        let restarted = killed.elapsed();
        played.wait_until_server_ready(POD_READY_TIMEOUT)?;
        eprintln!(
            "podman restarted the killed server after {restarted:?}; ready after {:?}",
            killed.elapsed()
        );
        Ok(())
    })?;
    ensure_all_remote(&run).with_context(|| played.logs())?;
    fixture::check_build_outputs(&bazel)?;
    fixture::check_slow_outputs(&bazel)?;
    let ops = played.operations()?;
    for before in &executing {
        let worker = before
            .last_assigned_worker()
            .context("an executing operation names its worker")?;
        let after = ops
            .iter()
            .find(|op| op.name == before.name)
            .with_context(|| format!("{} was not restored", before.describe()))?;
        ensure!(
            after.has_event(EVENT_RESTORED, worker)
                && after.completed_by() == Some(worker)
                && !after.timeline.iter().any(|e| e.event == EVENT_REQUEUED),
            "expected {} to be restored and completed by {worker} without a requeue",
            after.describe()
        );
    }
    eprintln!(
        "{} action(s) running at the kill were restored and completed by their worker",
        executing.len()
    );
    Ok(())
}
