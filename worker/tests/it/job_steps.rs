//! Issue 9: CI job steps run by a real worker against a real farm (the
//! server's CAS, ByteStream and worker protocol over the real scheduler, on
//! a loopback port): a PIPELINE step resolves the ref over SSH and reads
//! the pipeline file, COMMAND steps check out over SSH and HTTP through the
//! worker's mirror, run hooks and commands, stream a redacted, timestamped
//! log and upload artifacts; timeout and cancel kill the process group; an
//! unknown host key is refused. Needs git, ssh and sshd (see git_clone.rs).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use buildkube_config::WorkerArgs;
use buildkube_jobs::logs::StepLogKey;
use buildkube_proto::bytestream::byte_stream_server::ByteStreamServer;
use buildkube_proto::reapi::content_addressable_storage_server::ContentAddressableStorageServer;
use buildkube_proto::worker::worker_service_server::WorkerServiceServer;
use buildkube_proto::worker::{StepKind, StepResult, StepSpec};
use buildkube_reapi::{CasClient, Digest};
use buildkube_scheduler::{NewStep, Scheduler, SchedulerConfig, StepOutcome, StepProgress};
use buildkube_server::farm::Farm;
use buildkube_server::service;
use buildkube_worker::Worker;
use clap::Parser as _;
use tokio::sync::{oneshot, watch};

use crate::git_clone::{run, GitServers};

/// The farm token a step's bazelrc carries; must never reach the log.
const FARM_TOKEN: &str = "farm-token-0123456789";
/// A secret the step's env marks (`*_TOKEN`), printed in two pieces.
const DEPLOY_TOKEN: &str = "deploy-secret-value-42";
const PIPELINE_YAML: &str = "steps:\n  - key: build\n    commands: [\"make\"]\n";
const WAIT: Duration = Duration::from_secs(60);

/// The farm side: the server's services over a real scheduler, on a loopback port.
struct TestFarm {
    farm: Arc<Farm>,
    addr: SocketAddr,
    _stop: watch::Sender<bool>,
    serve: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Drop for TestFarm {
    fn drop(&mut self) {
        self.serve.abort();
    }
}

impl TestFarm {
    async fn start() -> TestFarm {
        let dir = tempfile::tempdir().unwrap();
        let (stop, stopping) = watch::channel(false);
        let farm = Arc::new(Farm {
            cas: Arc::new(
                buildkube_server::storage::FsCas::open(&dir.path().join("cas"), u64::MAX)
                    .await
                    .unwrap(),
            ),
            action_cache: Arc::new(
                buildkube_server::storage::FsActionCache::open(&dir.path().join("ac")).unwrap(),
            ),
            records: Arc::new(
                buildkube_records::FsRecords::open(&dir.path().join("records"))
                    .await
                    .unwrap(),
            ),
            // Keep-alives every half second: a cancel reaches the worker fast.
            scheduler: Arc::new(Scheduler::new(SchedulerConfig {
                lease_timeout: Duration::from_secs(3),
                ..Default::default()
            })),
            instances: buildkube_server::instances::Instances::new(&["main".into()]).unwrap(),
            metrics: Default::default(),
            stopping,
            limits: Default::default(),
            commands: Default::default(),
            live_logs: Default::default(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = tonic::transport::Server::builder()
            .layer(tonic::service::InterceptorLayer::new(
                buildkube_server::auth::interceptor(None),
            ))
            .add_service(ContentAddressableStorageServer::new(
                service::CasService::new(farm.clone()),
            ))
            .add_service(ByteStreamServer::new(service::ByteStreamService::new(
                farm.clone(),
                16,
            )))
            .add_service(WorkerServiceServer::new(
                service::WorkerProtocolService::new(farm.clone()),
            ));
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let serve = tokio::spawn(async move {
            let _ = router.serve_with_incoming(incoming).await;
        });
        TestFarm {
            farm,
            addr,
            _stop: stop,
            serve,
            _dir: dir,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn enqueue(&self, spec: StepSpec) -> (String, watch::Receiver<StepProgress>) {
        self.farm
            .scheduler
            .enqueue_step(NewStep {
                instance: "main".into(),
                platform: vec![],
                priority: 0,
                spec,
                max_attempts: 1,
            })
            .unwrap()
    }

    async fn blob(&self, digest: &Option<buildkube_proto::reapi::Digest>) -> Vec<u8> {
        let digest = Digest::try_from(digest.as_ref().expect("a digest")).unwrap();
        let channel =
            buildkube_reapi::connect_channel(&self.endpoint(), None, &Default::default()).unwrap();
        CasClient::new(channel, "main")
            .read_blob(digest)
            .await
            .unwrap()
            .to_vec()
    }
}

/// Waits for a step's end.
async fn finished(mut progress: watch::Receiver<StepProgress>) -> StepOutcome {
    let outcome = tokio::time::timeout(WAIT, async {
        loop {
            if let StepProgress::Finished(outcome) = &*progress.borrow_and_update() {
                return outcome.clone();
            }
            progress.changed().await.unwrap();
        }
    })
    .await;
    outcome.expect("the step finished in time")
}

async fn ran(progress: watch::Receiver<StepProgress>) -> StepResult {
    match finished(progress).await {
        StepOutcome::Ran(result) => result,
        StepOutcome::Failed(status) => panic!("the step could not run: {status:?}"),
    }
}

struct RunningWorker {
    drain: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), buildkube_worker::WorkerError>>,
    work_dir: PathBuf,
}

impl RunningWorker {
    async fn start(farm: &TestFarm, dir: &Path, extra: &[String]) -> RunningWorker {
        let work_dir = dir.join("work");
        let mut argv = vec![
            "buildkube-worker".to_string(),
            format!("--server={}", farm.endpoint()),
            format!("--work-dir={}", work_dir.display()),
            "--concurrency=1".into(),
            "--worker-id=step-worker".into(),
            "--run-steps".into(),
        ];
        argv.extend(extra.iter().cloned());
        let worker = Worker::start(WorkerArgs::parse_from(argv)).await.unwrap();
        let (drain, drained) = oneshot::channel::<()>();
        let task = tokio::spawn(worker.run(async {
            let _ = drained.await;
        }));
        RunningWorker {
            drain: Some(drain),
            task,
            work_dir,
        }
    }

    async fn stop(mut self) {
        let _ = self.drain.take().unwrap().send(());
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("drained in time")
            .unwrap()
            .unwrap();
    }
}

fn git(args: &[&str], dir: &Path) {
    run("git", args, dir);
}

/// A bare repository `name` under `root` with the pipeline file and a
/// script; returns its path and its commit.
fn repository(root: &Path, name: &str) -> (PathBuf, String) {
    let work = root.join(format!("{name}-work"));
    std::fs::create_dir_all(work.join(".buildkube")).unwrap();
    git(&["init", "-q", "-b", "main", "."], &work);
    std::fs::write(work.join(".buildkube/pipeline.yaml"), PIPELINE_YAML).unwrap();
    std::fs::write(work.join("hello.txt"), "hello from the repository\n").unwrap();
    git(&["add", "."], &work);
    git(
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-qm",
            "one",
        ],
        &work,
    );
    let bare = root.join(name);
    git(
        &["clone", "-q", "--bare", ".", bare.to_str().unwrap()],
        &work,
    );
    let head = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(&work)
        .output()
        .unwrap();
    (
        bare,
        String::from_utf8(head.stdout).unwrap().trim().to_string(),
    )
}

fn step(kind: StepKind, key: &str, repository: &str, commit: &str, commands: &[&str]) -> StepSpec {
    StepSpec {
        job_id: "job-1".into(),
        step_key: key.into(),
        kind: kind as i32,
        repository: repository.into(),
        git_ref: "refs/heads/main".into(),
        commit: commit.into(),
        commands: commands.iter().map(|c| c.to_string()).collect(),
        farm_token: FARM_TOKEN.into(),
        instance_name: "main".into(),
        attempt: 1,
        ..Default::default()
    }
}

fn phase_ms(result: &StepResult, name: &str) -> f64 {
    let phase = result
        .phases
        .iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no phase {name}: {:?}", result.phases));
    let at = |t: &Option<prost_types::Timestamp>| {
        let t = t.as_ref().unwrap();
        t.seconds as f64 * 1000.0 + t.nanos as f64 / 1e6
    };
    at(&phase.end) - at(&phase.start)
}

fn is_timestamped(line: &str) -> bool {
    // 2026-12-02T06:01:02.345Z | text
    let bytes = line.as_bytes();
    line.len() >= 27
        && bytes[4] == b'-'
        && bytes[10] == b'T'
        && bytes[19] == b'.'
        && &line[23..27] == "Z | "
}

#[tokio::test]
async fn job_steps_check_out_over_ssh_and_http_through_the_worker_mirror() {
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path();
    let (repo, commit) = repository(root, "repo.git");
    let servers = GitServers::start(root).await;
    let farm = TestFarm::start().await;

    // Hooks: post-checkout leaves a mark the command reads; pre-command logs.
    let hooks = root.join("hooks");
    std::fs::create_dir(&hooks).unwrap();
    let hook = |name: &str, body: &str| {
        let path = hooks.join(name);
        std::fs::write(&path, format!("#!/bin/bash\nset -e\n{body}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    hook(
        "post-checkout",
        "echo post-checkout ran > \"$BUILDKUBE_CHECKOUT/.hook-mark\"",
    );
    hook(
        "pre-command",
        "echo pre-command hook sees $BUILDKUBE_STEP_KEY",
    );
    std::fs::write(hooks.join("post-command"), "not executable").unwrap();
    let env_script = root.join("env.sh");
    std::fs::write(&env_script, "export FROM_ENV_SCRIPT=sourced\n").unwrap();
    let worker = RunningWorker::start(
        &farm,
        root,
        &[
            format!("--git-credentials-dir={}", servers.credentials.display()),
            format!("--hooks-dir={}", hooks.display()),
            format!("--env-script={}", env_script.display()),
        ],
    )
    .await;
    let ssh = GitServers::ssh_url(servers.trusted.port, &repo);

    // PIPELINE over SSH, cold mirror: the ref resolves, the file is read.
    let cold_started = Instant::now();
    let (_, progress) = farm.enqueue(step(StepKind::Pipeline, ":pipeline", &ssh, "", &[]));
    let pipeline = ran(progress).await;
    let cold_wall = cold_started.elapsed();
    let log = String::from_utf8(farm.blob(&pipeline.log).await).unwrap();
    assert_eq!(pipeline.exit_code, 0, "{}\n{log}", pipeline.message);
    assert_eq!(pipeline.commit, commit);
    assert_eq!(
        farm.blob(&pipeline.pipeline_file).await,
        PIPELINE_YAML.as_bytes()
    );
    assert!(
        log.contains(&format!("refs/heads/main is commit {commit}")),
        "{log}"
    );

    // PIPELINE again: the warm mirror fetches, but nothing new.
    let (_, progress) = farm.enqueue(step(StepKind::Pipeline, ":pipeline-again", &ssh, "", &[]));
    let again = ran(progress).await;
    assert_eq!(
        (again.exit_code, again.commit.as_str()),
        (0, commit.as_str())
    );

    // COMMAND over SSH at the commit: the mirror has it, nothing is fetched.
    let key = StepLogKey {
        job_id: "job-1".into(),
        step_key: "build".into(),
        attempt: 1,
    };
    let mut follower = farm.farm.live_logs.follow(&key, 0);
    let mut build = step(
        StepKind::Command,
        "build",
        &ssh,
        &commit,
        &[
            "cat .hook-mark hello.txt",
            "echo \"env script: $FROM_ENV_SCRIPT\"; grep -c Bearer \"$BUILDKUBE_BAZELRC\"; cat \"$BUILDKUBE_BAZELRC\"",
            // The secret in two writes, with a pause: two chunks, one line.
            "printf 'deploy token: %s' \"${DEPLOY_TOKEN:0:8}\"; sleep 0.3; printf '%s\\n' \"${DEPLOY_TOKEN:8}\"; echo s3cret",
            "mkdir -p out && seq 1 20000 > out/numbers.txt && ln -s /etc/passwd out/passwd.txt && echo to stderr >&2",
        ],
    );
    build.env.insert("DEPLOY_TOKEN".into(), DEPLOY_TOKEN.into());
    build.artifact_globs = vec!["out/*.txt".into()];
    let (_, progress) = farm.enqueue(build);
    let live = tokio::spawn(async move {
        let mut text = Vec::new();
        while let Some(chunk) = follower.next().await {
            text.extend_from_slice(&chunk.data);
        }
        String::from_utf8(text).unwrap()
    });
    let result = ran(progress).await;
    let log = String::from_utf8(farm.blob(&result.log).await).unwrap();
    assert_eq!(result.exit_code, 0, "{}\n{log}", result.message);
    assert_eq!(result.commit, commit);
    assert!(
        log.contains("is in the worker's mirror; nothing to fetch"),
        "{log}"
    );
    assert!(
        !log.contains("fetching"),
        "a warm checkout asks the remote nothing:\n{log}"
    );
    for expected in [
        "post-checkout ran",
        "hello from the repository",
        "pre-command hook sees build",
        "hook post-command is not an executable file; skipped",
        "env script: sourced",
        "build --remote_header=authorization=Bearer [REDACTED]",
        "deploy token: [REDACTED]",
        "to stderr",
        "artifact out/passwd.txt: a symlink to outside the checkout",
        &format!("build --remote_executor=grpc://{}", farm.addr),
    ] {
        assert!(log.contains(expected), "{expected:?} missing from:\n{log}");
    }
    for secret in [FARM_TOKEN, DEPLOY_TOKEN, "s3cret", "deploy-s"] {
        assert!(!log.contains(secret), "{secret:?} leaked into:\n{log}");
    }
    assert!(
        log.lines().all(is_timestamped),
        "every line is timestamped:\n{log}"
    );
    // The live log is the same text, streamed while the step ran.
    let live = tokio::time::timeout(WAIT, live).await.unwrap().unwrap();
    assert_eq!(live, log);
    // The artifact, byte-exact; the symlink out of the checkout not uploaded.
    let paths: Vec<&str> = result.artifacts.iter().map(|a| a.path.as_str()).collect();
    assert_eq!(paths, ["out/numbers.txt"]);
    let numbers: String = (1..=20000).map(|i| format!("{i}\n")).collect();
    assert_eq!(
        farm.blob(&result.artifacts[0].digest).await,
        numbers.as_bytes()
    );
    let phases: Vec<&str> = result.phases.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        phases,
        [
            "checkout",
            "hooks:post-checkout",
            "hooks:pre-command",
            "command",
            "upload"
        ]
    );

    // Over HTTP with the credential store: another mirror, fetched cold.
    let http = format!("http://127.0.0.1:{}/repo.git", servers.http_port);
    let (_, progress) = farm.enqueue(step(
        StepKind::Command,
        "http",
        &http,
        &commit,
        &["cat hello.txt"],
    ));
    let over_http = ran(progress).await;
    let log = String::from_utf8(farm.blob(&over_http.log).await).unwrap();
    assert_eq!(over_http.exit_code, 0, "{}\n{log}", over_http.message);
    assert!(
        log.contains("hello from the repository") && log.contains("fetching"),
        "{log}"
    );

    // The mirrors stay for the next job; the step directories do not.
    let mirrors = std::fs::read_dir(worker.work_dir.join("git/mirrors"))
        .unwrap()
        .count();
    assert_eq!(mirrors, 2, "one mirror per remote (SSH, HTTP)");
    assert_eq!(
        std::fs::read_dir(worker.work_dir.join("steps"))
            .unwrap()
            .count(),
        0
    );

    // A host whose key the worker does not know is refused.
    let unknown = GitServers::ssh_url(servers.unknown.port, &repo);
    let (_, progress) = farm.enqueue(step(
        StepKind::Pipeline,
        ":pipeline-unknown",
        &unknown,
        "",
        &[],
    ));
    let refused = ran(progress).await;
    let log = String::from_utf8(farm.blob(&refused.log).await).unwrap();
    assert_eq!(refused.exit_code, -1, "{log}");
    assert!(refused.message.contains("fetching"), "{}", refused.message);
    assert!(log.contains("Host key verification failed"), "{log}");

    println!(
        "checkout figures: cold mirror PIPELINE checkout {:.0} ms (step {:.0} ms wall), \
         warm mirror PIPELINE re-fetch {:.0} ms, warm mirror COMMAND checkout (no fetch, fresh tree) {:.0} ms, \
         cold HTTP COMMAND checkout {:.0} ms",
        phase_ms(&pipeline, "checkout"),
        cold_wall.as_secs_f64() * 1000.0,
        phase_ms(&again, "checkout"),
        phase_ms(&result, "checkout"),
        phase_ms(&over_http, "checkout"),
    );
    worker.stop().await;
}

/// Waits until `path` holds a pid, and returns it.
async fn pid_in(path: &Path) -> i32 {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(pid) = std::fs::read_to_string(path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                return pid;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the step started its child")
}

/// Gone, or a zombie waiting for init to reap it.
fn is_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
    }
}

async fn wait_gone(pid: i32) {
    tokio::time::timeout(WAIT, async {
        while !is_gone(pid) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("process {pid} outlived its step"));
}

/// A step that starts a child `sleep` and waits for it, recording its pid.
fn sleeper(key: &str, repo: &str, commit: &str, pid_file: &Path) -> StepSpec {
    let mut spec = step(
        StepKind::Command,
        key,
        repo,
        commit,
        &["sleep 600 & echo $! > \"$PID_FILE\"; echo started; wait"],
    );
    spec.env
        .insert("PID_FILE".into(), pid_file.display().to_string());
    spec
}

#[tokio::test]
async fn job_step_timeout_and_cancel_kill_the_process_group() {
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path();
    let (repo, commit) = repository(root, "repo.git");
    let url = format!("file://{}", repo.display());
    let farm = TestFarm::start().await;
    let worker = RunningWorker::start(&farm, root, &[]).await;

    // Timeout: the step ends at its deadline, the child sleep with it.
    let pid_file = root.join("timeout.pid");
    let mut spec = sleeper("slow", &url, &commit, &pid_file);
    spec.timeout = Some(prost_types::Duration {
        seconds: 3,
        nanos: 0,
    });
    let (_, progress) = farm.enqueue(spec);
    let child = pid_in(&pid_file).await;
    let result = ran(progress).await;
    assert_eq!(result.exit_code, -1);
    assert!(
        result.message.contains("timed out after 3s"),
        "{}",
        result.message
    );
    wait_gone(child).await;
    let log = String::from_utf8(farm.blob(&result.log).await).unwrap();
    assert!(
        log.contains("started") && log.contains("timed out"),
        "{log}"
    );

    // Cancel: the server abandons the lease; the worker kills the group
    // and reports nothing.
    let pid_file = root.join("cancel.pid");
    let (name, progress) = farm.enqueue(sleeper("cancelled", &url, &commit, &pid_file));
    let child = pid_in(&pid_file).await;
    assert!(farm
        .farm
        .scheduler
        .cancel(&name, "job cancelled by the test"));
    match finished(progress).await {
        StepOutcome::Failed(status) => {
            assert_eq!(status.code, tonic::Code::Cancelled as i32, "{status:?}")
        }
        other => panic!("{other:?}"),
    }
    wait_gone(child).await;
    worker.stop().await;
}

#[tokio::test]
async fn job_step_daemon_that_left_its_process_group_dies_with_the_step() {
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path();
    let (repo, commit) = repository(root, "repo.git");
    let url = format!("file://{}", repo.display());
    let farm = TestFarm::start().await;
    let worker = RunningWorker::start(&farm, root, &[]).await;
    // A session of its own, as Bazel's server makes: killing the step's
    // process group misses it.
    let pid_file = root.join("daemon.pid");
    let mut spec = step(
        StepKind::Command,
        "daemon",
        &url,
        &commit,
        &["setsid sleep 600 < /dev/null > /dev/null 2>&1 & echo $! > \"$PID_FILE\"; echo started"],
    );
    spec.env
        .insert("PID_FILE".into(), pid_file.display().to_string());
    let (_, progress) = farm.enqueue(spec);
    let result = ran(progress).await;
    assert_eq!(result.exit_code, 0, "{}", result.message);
    let daemon = pid_in(&pid_file).await;
    // Killed before the step was reported; allow for the signal's delivery.
    if tokio::time::timeout(Duration::from_secs(2), wait_gone(daemon))
        .await
        .is_err()
    {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &daemon.to_string()])
            .status();
        panic!("the step's daemon {daemon} outlived the step");
    }
    worker.stop().await;
}

#[tokio::test]
async fn job_step_pipeline_file_missing_fails_with_a_clear_message() {
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path();
    let work = root.join("bare-work");
    std::fs::create_dir_all(&work).unwrap();
    git(&["init", "-q", "-b", "main", "."], &work);
    std::fs::write(work.join("README"), "no pipeline here\n").unwrap();
    git(&["add", "."], &work);
    git(
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-qm",
            "one",
        ],
        &work,
    );
    let url = format!("file://{}", work.display());
    let farm = TestFarm::start().await;
    let worker = RunningWorker::start(&farm, root, &[]).await;
    let (_, progress) = farm.enqueue(step(StepKind::Pipeline, ":pipeline", &url, "", &[]));
    let result = ran(progress).await;
    assert_eq!(result.exit_code, -1);
    assert!(
        result
            .message
            .contains(".buildkube/pipeline.yaml does not exist at commit"),
        "{}",
        result.message
    );
    assert!(result.pipeline_file.is_none());
    worker.stop().await;
}

#[tokio::test]
async fn job_step_running_when_the_worker_drains_is_finished_and_reported() {
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path();
    let (repo, commit) = repository(root, "repo.git");
    let url = format!("file://{}", repo.display());
    let farm = TestFarm::start().await;
    let worker = RunningWorker::start(&farm, root, &[]).await;
    let started = root.join("started");
    let mut spec = step(
        StepKind::Command,
        "drained",
        &url,
        &commit,
        &["touch \"$STARTED\"; sleep 2; echo finished after the drain began"],
    );
    spec.env
        .insert("STARTED".into(), started.display().to_string());
    let (_, progress) = farm.enqueue(spec);
    tokio::time::timeout(WAIT, async {
        while !started.exists() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the step started");
    // SIGTERM's path: drain; the running step finishes and is reported.
    worker.stop().await;
    let result = ran(progress).await;
    let log = String::from_utf8(farm.blob(&result.log).await).unwrap();
    assert_eq!(result.exit_code, 0, "{}\n{log}", result.message);
    assert!(log.contains("finished after the drain began"), "{log}");
}

#[tokio::test]
async fn job_step_leased_to_a_worker_without_run_steps_is_refused_not_run() {
    // The real scheduler never does this (scheduler::step_tests); a server
    // that does (older, or forged) gets a clear refusal and nothing runs.
    let server = crate::fake_server::FakeServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let mut worker = crate::start_worker(&server, &[]).await;
    server.state.enqueue(buildkube_proto::worker::Lease {
        lease_id: "lease-1".into(),
        operation_name: "main/operations/step-1".into(),
        attempt: 1,
        step: Some(StepSpec {
            job_id: "job-1".into(),
            step_key: "build".into(),
            kind: StepKind::Command as i32,
            repository: "file:///nowhere".into(),
            commit: "a".repeat(40),
            commands: vec![format!("touch {}", marker.display())],
            attempt: 1,
            ..Default::default()
        }),
        ..Default::default()
    });
    let completed = server.state.wait_completed(1, WAIT).await;
    let Some(buildkube_proto::worker::complete_request::Outcome::Error(status)) =
        &completed[0].0.outcome
    else {
        panic!("{:?}", completed[0].0.outcome)
    };
    assert_eq!(status.code, tonic::Code::FailedPrecondition as i32);
    assert!(
        status.message.contains("does not run CI steps") && status.message.contains("job-1/build"),
        "{}",
        status.message
    );
    assert!(!marker.exists());
    assert!(!server.state.workers.lock().unwrap()[0].runs_steps);
    worker.drain().await.unwrap();

    // With --run-steps the worker says so when it asks for work.
    let server = crate::fake_server::FakeServer::start().await;
    let mut worker = crate::start_worker(&server, &["--run-steps"]).await;
    let deadline = Instant::now() + WAIT;
    while server.state.workers.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the worker never polled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(server.state.workers.lock().unwrap()[0].runs_steps);
    worker.drain().await.unwrap();
}
