//! Bazel 4.2.3 as the REAPI client: the product's reference scenarios.
//!
//! Every test builds a private copy of `tests/fixtures/cc-workspace` with its
//! own Bazel output root, so no test sees another's local state, and checks
//! the outputs byte for byte against `buildkube_tests::fixture`.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use buildkube_config::storage::{
    FilesystemStore, ReadCacheStore, RedisStore, SizePartitionedStore, StorageConfig, StoreConfig,
};
use buildkube_tests::auth::DEV_TOKEN;
use buildkube_tests::fixture::{
    self, ALL_TARGETS, BROKEN_EXIT_CODE, BROKEN_MESSAGE, BROKEN_TARGET,
};
use buildkube_tests::{
    remote_cache_flags, remote_execution_flags, Bazel, BazelRun, Server, TestCredentials, Worker,
};

/// How long a fresh worker may take to show up in the server's metrics.
const WORKER_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// `args` followed by `extra`.
fn with(args: &[String], extra: &[&str]) -> Vec<String> {
    args.iter()
        .cloned()
        .chain(extra.iter().map(|s| s.to_string()))
        .collect()
}

/// A server and one worker in its own process, connected.
fn farm() -> Result<(Server, Worker)> {
    let server = Server::start()?;
    let worker = Worker::start(&server)?;
    server.wait_for_workers(1, WORKER_CONNECT_TIMEOUT)?;
    Ok((server, worker))
}

/// Every spawn ran remotely: nothing on this machine, something remote.
fn ensure_all_remote(run: &BazelRun) -> Result<()> {
    let summary = run.summary()?;
    ensure!(
        summary.local().is_empty(),
        "spawns ran locally: {summary}\n{run}"
    );
    ensure!(
        summary.remote() > 0,
        "no spawn ran remotely: {summary}\n{run}"
    );
    Ok(())
}

/// Every spawn was a cache hit: nothing executed, here or remotely.
fn ensure_all_cache_hits(run: &BazelRun, expected_hits: u64) -> Result<()> {
    let summary = run.summary()?;
    ensure!(
        summary.remote() == 0 && summary.local().is_empty(),
        "spawns were executed instead of served from the cache: {summary}\n{run}"
    );
    ensure!(
        summary.remote_cache_hits() == expected_hits,
        "expected {expected_hits} remote cache hits: {summary}\n{run}"
    );
    Ok(())
}

/// `bazel clean`, then the same build again: all `spawns` are cache hits and
/// the outputs are still byte-correct.
fn rebuild_after_clean_hits_the_cache(bazel: &Bazel, flags: &[String], spawns: u64) -> Result<()> {
    bazel.clean()?;
    let again = bazel.build(with(flags, &[ALL_TARGETS]))?;
    again.ensure_success()?;
    ensure_all_cache_hits(&again, spawns)?;
    fixture::check_build_outputs(bazel)
}

/// What Bazel says about the failing target: its exit code and its stderr.
fn ensure_reports_broken_target(run: &BazelRun) -> Result<()> {
    ensure!(
        run.exit_code == Some(1),
        "expected Bazel's build-failure exit code 1\n{run}"
    );
    ensure!(
        run.output().contains(&format!("(Exit {BROKEN_EXIT_CODE})")),
        "Bazel does not report the action's exit code {BROKEN_EXIT_CODE}\n{run}"
    );
    // A line of its own: the message also appears quoted in the command line.
    ensure!(
        run.has_line(BROKEN_MESSAGE),
        "Bazel does not show the action's stderr `{BROKEN_MESSAGE}`\n{run}"
    );
    Ok(())
}

/// The harness and fixture alone: Bazel builds and tests the workspace on
/// this machine with no remote at all, and the failing target fails as the
/// remote tests expect it to.
#[test]
fn local_build_and_test_need_no_remote() -> Result<()> {
    let bazel = Bazel::new()?;
    let build = bazel.build([ALL_TARGETS])?;
    build.ensure_success()?;
    ensure!(build.summary()?.remote() == 0, "{build}");
    fixture::check_build_outputs(&bazel)?;
    bazel.test([ALL_TARGETS])?.ensure_success()?;
    fixture::check_test_outputs(&bazel)?;
    ensure_reports_broken_target(&bazel.build([BROKEN_TARGET])?)
}

/// (a) `bazel build //...` and `bazel test //...` with every spawn executed
/// by a worker in its own process; outputs byte-correct.
#[test]
fn remote_execution_builds_and_tests_everything_remotely() -> Result<()> {
    let (server, _worker) = farm()?;
    let bazel = Bazel::new()?;
    let flags = remote_execution_flags(&server);

    let build = bazel.build(with(&flags, &[ALL_TARGETS]))?;
    build.ensure_success()?;
    ensure_all_remote(&build)?;
    fixture::check_build_outputs(&bazel)?;

    let test = bazel.test(with(&flags, &[ALL_TARGETS]))?;
    test.ensure_success()?;
    ensure_all_remote(&test)?;
    ensure!(
        test.stdout
            .lines()
            .chain(test.stderr.lines())
            .any(|line| line.contains("//app:greet_test") && line.contains("PASSED")),
        "no `//app:greet_test PASSED` line\n{test}"
    );
    fixture::check_test_outputs(&bazel)
}

/// (b) After `bazel clean`, the same build executes nothing: every spawn is
/// a remote cache hit.
#[test]
fn rebuild_after_clean_is_all_remote_cache_hits() -> Result<()> {
    let (server, _worker) = farm()?;
    let bazel = Bazel::new()?;
    let flags = remote_execution_flags(&server);

    let first = bazel.build(with(&flags, &[ALL_TARGETS]))?;
    first.ensure_success()?;
    ensure_all_remote(&first)?;
    let spawns = first.summary()?.spawns();

    rebuild_after_clean_hits_the_cache(&bazel, &flags, spawns)
}

/// (c) A failing action reports its exit code and its stderr through Bazel,
/// and is not cached: building it again fails the same way.
#[test]
fn failing_action_reports_exit_code_and_stderr() -> Result<()> {
    let (server, _worker) = farm()?;
    let bazel = Bazel::new()?;
    let flags = remote_execution_flags(&server);

    for attempt in 1..=2 {
        let run = bazel.build(with(&flags, &[BROKEN_TARGET]))?;
        ensure_reports_broken_target(&run).with_context(|| format!("attempt {attempt}"))?;
        let summary = run.summary()?;
        ensure!(
            summary.local().is_empty(),
            "attempt {attempt}: ran locally: {summary}\n{run}"
        );
        ensure!(
            summary.remote_cache_hits() == 0,
            "attempt {attempt}: a failed action was served from the cache: {summary}\n{run}"
        );
    }
    Ok(())
}

/// (d) `--remote_cache` alone: spawns run locally and are uploaded; after
/// `bazel clean` the same build is all cache hits.
#[test]
fn remote_cache_only_serves_local_builds() -> Result<()> {
    let server = Server::start()?;
    let bazel = Bazel::new()?;
    let flags = remote_cache_flags(&server);

    let first = bazel.build(with(&flags, &[ALL_TARGETS]))?;
    first.ensure_success()?;
    let summary = first.summary()?;
    ensure!(
        summary.remote() == 0 && summary.remote_cache_hits() == 0 && !summary.local().is_empty(),
        "a first cache-only build should run every spawn locally: {summary}\n{first}"
    );
    let spawns = summary.spawns();
    fixture::check_build_outputs(&bazel)?;

    rebuild_after_clean_hits_the_cache(&bazel, &flags, spawns)
}

/// (e) A server restarted on the same data dir still has the CAS and the
/// action cache: after clean and restart, the build is all cache hits.
#[test]
fn restart_keeps_cas_and_action_cache() -> Result<()> {
    let (mut server, _worker) = farm()?;
    let bazel = Bazel::new()?;

    let first = bazel.build(with(&remote_execution_flags(&server), &[ALL_TARGETS]))?;
    first.ensure_success()?;
    ensure_all_remote(&first)?;
    let spawns = first.summary()?.spawns();

    bazel.clean()?;
    server.restart()?;
    // The ports may have changed: the flags are made anew.
    let second = bazel.build(with(&remote_execution_flags(&server), &[ALL_TARGETS]))?;
    second.ensure_success()?;
    ensure_all_cache_hits(&second, spawns)?;
    fixture::check_build_outputs(&bazel)
}

/// The README's one-command farm: `buildkube-server --local-workers 2` alone
/// (no separate worker process) builds and tests everything remotely.
#[test]
fn one_process_farm_with_local_workers() -> Result<()> {
    let server = Server::start_with(|args| args.local_workers = 2)?;
    server.wait_for_workers(2, WORKER_CONNECT_TIMEOUT)?;
    let bazel = Bazel::new()?;
    let flags = remote_execution_flags(&server);
    let build = bazel.build(with(&flags, &[ALL_TARGETS]))?;
    build.ensure_success()?;
    ensure_all_remote(&build)?;
    fixture::check_build_outputs(&bazel)?;
    let test = bazel.test(with(&flags, &[ALL_TARGETS]))?;
    test.ensure_success()?;
    fixture::check_test_outputs(&bazel)
}

/// Issue 4's sandboxed runner: with `runner=sandbox` as the actions' platform,
/// every spawn runs under bubblewrap on the worker, and the build is the same.
#[test]
fn sandboxed_runner_builds_everything() -> Result<()> {
    let (server, _worker) = farm()?;
    let bazel = Bazel::new()?;
    let flags = remote_execution_flags(&server);
    let build = bazel.build(with(
        &flags,
        &[
            "--remote_default_exec_properties=runner=sandbox",
            ALL_TARGETS,
        ],
    ))?;
    build.ensure_success()?;
    ensure_all_remote(&build)?;
    fixture::check_build_outputs(&bazel)?;
    let operations = server.http_get("/operations?limit=1000")?;
    ensure!(
        operations.body.contains("runner=sandbox"),
        "no operation ran with the sandbox platform: {}",
        operations.body
    );
    Ok(())
}

/// The stores of the production overlay (`external-stores`): blobs up to
/// 1 MiB in PostgreSQL behind a read cache on the data dir, larger ones on
/// the data dir, action results in Redis. After a build, the server
/// restarts with its read cache deleted, and a rebuild after `bazel clean`
/// is all cache hits with byte-correct outputs: the small ones came back
/// from PostgreSQL. Needs the stores of `.ci/test-stores.sh`.
#[test]
fn bazel_builds_on_postgres_and_redis_and_rebuilds_from_them() -> Result<()> {
    let config_dir = tempfile::tempdir()?;
    let config = StorageConfig {
        cas: StoreConfig::SizePartitioned(Box::new(SizePartitionedStore {
            threshold: 1 << 20,
            small: StoreConfig::ReadCache(Box::new(ReadCacheStore {
                cache: StoreConfig::Filesystem(FilesystemStore {
                    path: "cas".into(),
                    max_size: None,
                }),
                backing: crate::external_stores::postgres(),
            })),
            large: StoreConfig::Filesystem(FilesystemStore {
                path: "cas-large".into(),
                max_size: None,
            }),
        })),
        // A prefix of its own: no result of another run may be a hit here.
        action_cache: StoreConfig::Redis(RedisStore {
            url: crate::external_stores::env_url("BUILDKUBE_TEST_REDIS_URL"),
            password_file: None,
            key_prefix: format!("buildkube-e2e-{}:", uuid::Uuid::new_v4()),
            expire_after_secs: 3600,
        }),
        records: StorageConfig::default_records(),
    };
    let config_path = config_dir.path().join("storage.yaml");
    std::fs::write(&config_path, config.to_yaml())?;
    let mut server = Server::start_with(|args| args.storage_config = Some(config_path))?;
    let _worker = Worker::start(&server)?;
    server.wait_for_workers(1, WORKER_CONNECT_TIMEOUT)?;
    let bazel = Bazel::new()?;

    let first = bazel.build(with(&remote_execution_flags(&server), &[ALL_TARGETS]))?;
    first.ensure_success()?;
    ensure_all_remote(&first)?;
    fixture::check_build_outputs(&bazel)?;
    let spawns = first.summary()?.spawns();

    server.terminate()?;
    let read_cache = server.data_dir().join("cas");
    ensure!(
        read_cache.is_dir(),
        "no read cache at {}",
        read_cache.display()
    );
    std::fs::remove_dir_all(&read_cache)?;
    server.start_again()?;
    rebuild_after_clean_hits_the_cache(&bazel, &remote_execution_flags(&server), spawns)
}

/// Auth as the deployment docs set it up: the server reads `--auth-config`,
/// the worker its worker token, Bazel sends a client token with
/// `--remote_header`. The developer client (no `write-ac`) builds
/// everything remotely; without a token Bazel is refused.
#[test]
fn bearer_token_auth_with_bazel() -> Result<()> {
    let credentials = TestCredentials::new()?;
    let server = Server::start_with(|args| args.auth_config = Some(credentials.config_path()))?;
    let _worker = Worker::start_with(&server, |args| {
        args.auth_token_file = Some(credentials.worker_token_file())
    })?;
    server.wait_for_workers(1, WORKER_CONNECT_TIMEOUT)?;
    let bazel = Bazel::new()?;
    let flags = remote_execution_flags(&server);

    let refused = bazel.build(with(&flags, &["//lib:greet"]))?;
    ensure!(
        !refused.success(),
        "a build without the token succeeded\n{refused}"
    );
    ensure!(
        refused.output().contains("UNAUTHENTICATED"),
        "Bazel does not say it was refused for auth\n{refused}"
    );

    let header = format!("--remote_header=authorization=Bearer {DEV_TOKEN}");
    let build = bazel.build(with(&flags, &[&header, ALL_TARGETS]))?;
    build.ensure_success()?;
    ensure_all_remote(&build)?;
    fixture::check_build_outputs(&bazel)
}
