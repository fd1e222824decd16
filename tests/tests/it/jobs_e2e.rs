//! Issue 9 end to end: a signed GitHub push webhook starts a two-step
//! pipeline on the farm's own workers (`buildkube-worker` processes holding
//! the overlay's git credentials: an SSH key and a known_hosts), checked out
//! over SSH from a bare repository that Debian's sshd serves on a loopback
//! port; a second worker, without `--run-steps`, only executes actions. The `build` step runs Bazel 4.2.3's `bazel test //...` on the
//! end-to-end fixture with every action executed remotely by the same
//! farm, through the bazelrc the worker writes for the step; its log is
//! followed live with `buildkube logs -f`, and its artifact (the fixture's
//! 10 MiB `gen/big.bin`) downloads byte for byte.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{ensure, Context, Result};
use buildkube_config::jobs::GITHUB_WEBHOOK_PATH;
use buildkube_config::{KNOWN_HOSTS_FILE, SSH_KEY_FILE};
use buildkube_jobs::webhook::WebhookSecrets;
use buildkube_proto::jobs::{self as api, jobs_client::JobsClient};
use buildkube_reapi::{connect_channel, AuthChannel, Digest};
use buildkube_tests::fixture::{self, BIG_PATH};
use buildkube_tests::git_servers::{bare_clone, commit_all, run, ssh_key, Sshd};
use buildkube_tests::{
    bin_path, copy_tree, fixtures_dir, http_post, job_finished, offline_bazelrc, poll_until,
    watch_job_until, ProcessSummary, Server, Worker,
};
use futures::StreamExt;

const SECRET: &str = "push-webhook-secret";
const GITHUB_PUSH: &[u8] = include_bytes!("../../../jobs/src/webhook/testdata/github-push.json");
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// The whole job: checkout, Bazel's start and a remote build of the fixture.
const JOB_TIMEOUT: Duration = Duration::from_secs(300);
/// The line the build step prints just before Bazel starts.
const BAZEL_STARTING: &str = "bazel starting";
/// Fewer spawns than `bazel test //...` of the fixture runs (16 with Bazel
/// 4.2.3: compiles, links, the genrules and the test).
const MIN_REMOTE_SPAWNS: u64 = 10;

/// `build` runs the fixture's build and tests with every spawn remote; the
/// farm's address comes only from the bazelrc the worker writes ($HOME/.bazelrc).
const PIPELINE: &str = r#"steps:
  - key: build
    commands:
      - echo "bazel starting"
      - bazel test //... --spawn_strategy=remote --genrule_strategy=remote --remote_local_fallback=false --jobs=8
      - mkdir -p out && cp bazel-bin/gen/big.bin out/big.bin && sha256sum out/big.bin
    artifacts: [out/big.bin]
  - key: test
    depends_on: [build]
    commands:
      - echo "checked out $(git rev-parse HEAD)"
"#;

/// The fixture workspace with the offline bazelrc as its `.bazelrc` and the
/// pipeline, committed on `main` and cloned bare as `farm-demo.git`;
/// returns the bare repository and the commit.
fn pushed_repository(root: &Path) -> Result<(PathBuf, String)> {
    let work = root.join("farm-demo");
    copy_tree(&fixtures_dir().join("cc-workspace"), &work)?;
    std::fs::write(work.join(".bazelrc"), offline_bazelrc()?)?;
    std::fs::create_dir_all(work.join(".buildkube"))?;
    std::fs::write(work.join(".buildkube/pipeline.yaml"), PIPELINE)?;
    let commit = commit_all(&work)?;
    let bare = bare_clone(root, "farm-demo", &work)?;
    Ok((bare, commit))
}

/// GitHub's push of `commit` to `main`, with `ssh_url` as the repository's
/// SSH address (the one the server clones by default).
fn push_payload(ssh_url: &str, commit: &str) -> Result<Vec<u8>> {
    let mut payload: serde_json::Value = serde_json::from_slice(GITHUB_PUSH)?;
    payload["after"] = commit.into();
    payload["head_commit"]["id"] = commit.into();
    payload["repository"]["ssh_url"] = ssh_url.into();
    Ok(serde_json::to_vec(&payload)?)
}

/// POSTs a signed push delivery; returns the new job's id.
fn deliver(server: &Server, body: &[u8]) -> Result<String> {
    let signature = WebhookSecrets::new(vec![SECRET.as_bytes().to_vec()])
        .context("the webhook secret")?
        .github_signature(body);
    let delivery = uuid::Uuid::new_v4().to_string();
    let response = http_post(
        server.http_addr(),
        GITHUB_WEBHOOK_PATH,
        &[
            ("X-GitHub-Event", "push"),
            ("X-GitHub-Delivery", &delivery),
            ("X-Hub-Signature-256", &signature),
            ("Content-Type", "application/json"),
        ],
        body,
        HTTP_TIMEOUT,
    )?;
    ensure!(response.status == 201, "webhook: {response:?}");
    let created: serde_json::Value = serde_json::from_str(&response.body)?;
    Ok(created["job"]
        .as_str()
        .context("the 201 names the job")?
        .to_string())
}

/// Watches job `id` until it finishes; fails after [`JOB_TIMEOUT`].
async fn finished(
    jobs: &mut JobsClient<AuthChannel>,
    instance: &str,
    id: &str,
) -> Result<api::Job> {
    watch_job_until(
        jobs,
        instance,
        id,
        "the job to finish",
        JOB_TIMEOUT,
        job_finished,
    )
    .await
}

/// The whole log of a finished step, from the Jobs service.
async fn step_log(
    jobs: &mut JobsClient<AuthChannel>,
    instance: &str,
    id: &str,
    key: &str,
) -> Result<String> {
    let mut chunks = jobs
        .stream_logs(api::StreamLogsRequest {
            instance_name: instance.into(),
            job_id: id.into(),
            step_key: key.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut text = Vec::new();
    while let Some(chunk) = chunks.next().await {
        text.extend_from_slice(&chunk?.data);
    }
    Ok(String::from_utf8_lossy(&text).into_owned())
}

fn step<'a>(job: &'a api::Job, key: &str) -> Result<&'a api::JobStep> {
    job.steps
        .iter()
        .find(|s| s.key == key)
        .with_context(|| format!("step {key} in {job:#?}"))
}

/// The text of a log line after its `TIMESTAMP | `.
fn text_of(line: &str) -> &str {
    line.split_once(" | ").map_or(line, |(_, text)| text)
}

/// `buildkube logs -f JOB`, its stdout lines recorded as they arrive.
struct Follower {
    child: Child,
    lines: Arc<Mutex<Vec<(SystemTime, String)>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Follower {
    fn start(server: &Server, id: &str) -> Result<Follower> {
        let mut child = Command::new(bin_path("buildkube"))
            .arg("--server")
            .arg(server.worker_endpoint())
            .args(["logs", "-f", id])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting buildkube logs -f")?;
        let stdout = child.stdout.take().context("its stdout")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let reader = {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    lines
                        .lock()
                        .expect("follower lines")
                        .push((SystemTime::now(), line));
                }
            })
        };
        Ok(Follower {
            child,
            lines,
            reader: Some(reader),
        })
    }

    /// Waits for the client to exit (it does when the job finished);
    /// returns its exit code and stderr.
    fn wait(&mut self, timeout: Duration) -> Result<(Option<i32>, String)> {
        let status = poll_until("buildkube logs -f to exit", timeout, || {
            Ok(self.child.try_wait()?)
        })?;
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            std::io::Read::read_to_string(&mut pipe, &mut stderr)?;
        }
        Ok((status.code(), stderr))
    }

    fn lines(&self) -> Vec<(SystemTime, String)> {
        self.lines.lock().expect("follower lines").clone()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Processes a step of `worker` started that are still alive: working in,
/// or naming on their command line (a Bazel server's output base), the
/// worker's steps directory.
fn step_processes(worker: &Worker) -> Vec<String> {
    let steps = worker.work_dir().join("steps");
    let steps_text = format!("{}/", steps.display());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|entry| {
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let cwd = std::fs::read_link(entry.path().join("cwd")).unwrap_or_default();
            (cwd.starts_with(&steps) || cmdline.contains(&steps_text)).then(|| {
                format!(
                    "pid {} in {}: {cmdline}",
                    entry.file_name().to_string_lossy(),
                    cwd.display()
                )
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_push_runs_a_pipeline_over_ssh_whose_bazel_test_executes_remotely_on_the_same_farm(
) -> Result<()> {
    let started = Instant::now();
    let scratch = tempfile::tempdir()?;
    let root = scratch.path();
    let (repo, commit) = pushed_repository(root)?;

    // sshd: the client key only; the worker trusts one host key.
    let client_key = ssh_key(root, "client_key")?;
    std::fs::write(root.join("authorized_keys"), format!("{client_key}\n"))?;
    let trusted_host_key = ssh_key(root, "trusted_host_key")?;
    ssh_key(root, "unknown_host_key")?;
    let authorized = root.join("authorized_keys");
    let trusted = Sshd::start(root, "trusted", &root.join("trusted_host_key"), &authorized).await?;
    let unknown = Sshd::start(root, "unknown", &root.join("unknown_host_key"), &authorized).await?;
    let user = run("id", &["-un"], root)?.trim().to_string();
    let ssh_url = |port: u16| format!("ssh://{user}@127.0.0.1:{port}{}", repo.display());

    // The worker Secret's files, as the overlay mounts them.
    let credentials = root.join("git-credentials");
    std::fs::create_dir_all(&credentials)?;
    std::fs::copy(root.join("client_key"), credentials.join(SSH_KEY_FILE))?;
    std::fs::write(
        credentials.join(KNOWN_HOSTS_FILE),
        format!("[127.0.0.1]:{} {trusted_host_key}\n", trusted.port()),
    )?;

    let secret_file = root.join("github-webhook-secret");
    std::fs::write(&secret_file, format!("{SECRET}\n"))?;
    let server =
        Server::start_with(|args| args.jobs.github_webhook_secret_file = Some(secret_file))?;
    let instance = server.args().instances.first().cloned().unwrap_or_default();
    // A step worker (--run-steps, the git credentials) and an action-only
    // worker, as the overlays' pools are.
    let workers = [
        Worker::start_with(&server, |args| {
            args.run_steps = true;
            args.git_credentials_dir = Some(credentials.clone());
        })?,
        Worker::start_with(&server, |args| args.run_steps = false)?,
    ];
    server.wait_for_workers(workers.len(), Duration::from_secs(30))?;
    let worker_ids: Vec<&str> = workers.iter().map(Worker::id).collect();
    let channel = connect_channel(&server.worker_endpoint(), None, &Default::default())?;
    let mut jobs = JobsClient::new(channel);

    // A host whose key known_hosts does not list is refused: its job fails
    // at the checkout.
    let refused = deliver(&server, &push_payload(&ssh_url(unknown.port()), &commit)?)?;
    let refused_job = finished(&mut jobs, &instance, &refused).await?;
    ensure!(
        refused_job.state() == api::JobState::Failed,
        "{refused_job:#?}"
    );
    let refused_log = step_log(&mut jobs, &instance, &refused, ":pipeline").await?;
    ensure!(
        refused_log.contains("Host key verification failed"),
        "the unknown host's key is refused:\n{refused_log}"
    );
    let operations_before = server.operations()?.len();

    // The push: the job runs the pushed commit, followed live.
    let id = deliver(&server, &push_payload(&ssh_url(trusted.port()), &commit)?)?;
    let mut follower = Follower::start(&server, &id)?;
    let job = finished(&mut jobs, &instance, &id).await?;
    let left: Vec<String> = workers.iter().flat_map(step_processes).collect();
    let (code, follower_stderr) = follower.wait(Duration::from_secs(30))?;
    let build_log = step_log(&mut jobs, &instance, &id, "build").await?;
    ensure!(
        job.state() == api::JobState::Succeeded,
        "the job failed: {job:#?}\n---- build log ----\n{build_log}\n---- worker logs ----\n{}\n{}",
        workers[0].logs().tail(40),
        workers[1].logs().tail(40),
    );
    ensure!(
        (job.commit.as_str(), job.repository.as_str())
            == (commit.as_str(), ssh_url(trusted.port()).as_str()),
        "the job runs the pushed commit from the SSH URL: {job:#?}"
    );
    let keys: Vec<&str> = job.steps.iter().map(|s| s.key.as_str()).collect();
    ensure!(keys == [":pipeline", "build", "test"], "{job:#?}");
    let build = step(&job, "build")?;
    ensure!(
        job.steps.iter().all(|s| s.workers == [workers[0].id()]),
        "every step ran on the step worker: {job:#?}"
    );

    // Bazel ran its spawns on this farm: none here, and the server executed
    // at least as many actions as Bazel counted remote.
    let summary = build_log
        .lines()
        .filter_map(|line| ProcessSummary::parse_line(text_of(line)))
        .next_back()
        .with_context(|| format!("no `INFO: N processes` line in the step's log:\n{build_log}"))?;
    ensure!(
        summary.local().is_empty() && summary.remote() >= MIN_REMOTE_SPAWNS,
        "every spawn of the step's Bazel runs remotely: {summary}\n{build_log}"
    );
    let operations = server.operations()?;
    let executed = operations
        .iter()
        .filter(|op| op.completed_by().is_some_and(|w| worker_ids.contains(&w)))
        .count();
    // This job's three steps are operations too.
    let actions = operations.len() - operations_before - job.steps.len();
    ensure!(
        actions as u64 >= summary.remote().max(MIN_REMOTE_SPAWNS) && executed == operations.len(),
        "the server executed {actions} actions on its workers for Bazel's {summary}"
    );
    ensure!(
        build_log
            .lines()
            .any(|l| text_of(l).starts_with("//app:greet_test") && l.contains("PASSED")),
        "the fixture's test passed:\n{build_log}"
    );

    // The follower saw the step live: the line printed before Bazel
    // started reached it while the step's commands were still running.
    let lines = follower.lines();
    ensure!(
        code == Some(0),
        "logs -f exits with the job's outcome: {code:?} {follower_stderr}"
    );
    let (seen, _) = lines
        .iter()
        .find(|(_, line)| text_of(line) == BAZEL_STARTING)
        .with_context(|| format!("logs -f printed no `{BAZEL_STARTING}`: {lines:#?}"))?;
    let commands_end: SystemTime = build
        .timeline
        .iter()
        .find(|e| e.name == "command")
        .and_then(|e| e.end)
        .with_context(|| format!("the build step's command phase: {build:#?}"))?
        .try_into()?;
    ensure!(
        *seen + Duration::from_secs(2) < commands_end,
        "`{BAZEL_STARTING}` reached logs -f at {seen:?}, not well before the commands ended at \
         {commands_end:?}"
    );
    let followed: Vec<&str> = lines.iter().map(|(_, line)| text_of(line)).collect();
    let tested = format!("checked out {commit}");
    ensure!(
        followed
            .iter()
            .any(|l| ProcessSummary::parse_line(l).is_some())
            && followed.contains(&tested.as_str()),
        "logs -f shows both steps' output: {followed:#?}"
    );

    // The artifact: the fixture's bytes, and the checksum the step printed.
    let artifact = build
        .artifacts
        .iter()
        .find(|a| a.path == "out/big.bin")
        .with_context(|| format!("the artifact: {build:#?}"))?;
    let file = root.join("downloaded-big.bin");
    let output = Command::new(bin_path("buildkube"))
        .arg("--server")
        .arg(server.worker_endpoint())
        .args(["artifacts", "download", &id, "out/big.bin", "-o"])
        .arg(&file)
        .output()?;
    ensure!(
        output.status.success(),
        "artifacts download: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let bytes = std::fs::read(&file)?;
    fixture::ensure_same_bytes(BIG_PATH, &bytes, &fixture::big_contents())?;
    let digest = Digest::of_bytes(&bytes);
    ensure!(
        Some(digest.to_proto()) == artifact.digest,
        "the download is the artifact"
    );
    let printed = format!("{}  out/big.bin", digest.hash_hex());
    ensure!(
        build_log.lines().any(|l| text_of(l) == printed),
        "the step's sha256sum matches the download ({printed}):\n{build_log}"
    );

    // The step's Bazel server did not outlive the step: the worker killed
    // it before it reported the step's end. (Looked at as soon as the job
    // ended: once the worker removed the step's directory, Bazel's server
    // would notice its pid file is gone and exit by itself seconds later.)
    ensure!(left.is_empty(), "left running after the steps: {left:#?}");
    let by_worker: Vec<(&str, usize)> = worker_ids
        .iter()
        .map(|w| {
            let n = operations
                .iter()
                .filter(|op| op.completed_by() == Some(*w))
                .count();
            (*w, n)
        })
        .collect();
    eprintln!(
        "push to finished job in {:?}; Bazel: {summary}; operations completed by worker: {by_worker:?}",
        started.elapsed()
    );
    Ok(())
}
