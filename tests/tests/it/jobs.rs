//! CI jobs against the real server: webhooks on its HTTP port, the Jobs
//! service, a job's steps leased through the worker protocol by the test
//! standing in for a worker's step runner (it uploads the pipeline file and
//! completes steps as a worker would), and a job kept across a restart.

use std::time::Duration;

use buildkube_config::jobs::GITHUB_WEBHOOK_PATH;
use buildkube_jobs::webhook::WebhookSecrets;
use buildkube_proto::jobs::{self as api, jobs_client::JobsClient};
use buildkube_proto::worker::{self as wire, worker_service_client::WorkerServiceClient};
use buildkube_reapi::{connect_channel, AuthChannel, CasClient, Digest};
use buildkube_tests::{http_post, watch_job_until, Server};
use bytes::Bytes;
use futures::StreamExt;

const INSTANCE: &str = "main";
const SECRET: &str = "it's a secret to everybody";
const GITHUB_PUSH: &[u8] = include_bytes!("../../../jobs/src/webhook/testdata/github-push.json");
const PUSHED_COMMIT: &str = "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c";
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

const TWO_STEPS: &str = "steps:
  - key: build
    commands: [make]
  - key: test
    depends_on: [build]
    commands: [make test]
";

/// A server whose GitHub webhook accepts [`SECRET`] (from a file in the
/// returned directory).
fn server_with_webhook() -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("github-webhook-secret");
    std::fs::write(&path, format!("{SECRET}\n")).unwrap();
    let server =
        Server::start_with(|args| args.jobs.github_webhook_secret_file = Some(path)).unwrap();
    (server, dir)
}

/// The test's clients: Jobs, CAS, and the worker protocol as one worker.
struct Farm {
    jobs: JobsClient<AuthChannel>,
    cas: CasClient,
    worker: WorkerServiceClient<AuthChannel>,
}

impl Farm {
    fn connect(server: &Server) -> Farm {
        let channel =
            connect_channel(&server.worker_endpoint(), None, &Default::default()).unwrap();
        Farm {
            jobs: JobsClient::new(channel.clone()),
            cas: CasClient::new(channel.clone(), INSTANCE),
            worker: WorkerServiceClient::new(channel),
        }
    }

    async fn run(&mut self) -> api::Job {
        self.jobs
            .run(api::RunRequest {
                instance_name: INSTANCE.into(),
                repository: "file:///srv/git/demo.git".into(),
                git_ref: "refs/heads/main".into(),
                commit: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn job(&mut self, id: &str) -> api::Job {
        self.jobs
            .get_job(api::GetJobRequest {
                instance_name: INSTANCE.into(),
                job_id: id.into(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn list(&mut self) -> Vec<api::Job> {
        self.jobs
            .list_jobs(api::ListJobsRequest {
                instance_name: INSTANCE.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .jobs
    }

    /// Watches job `id` until `done` holds (at most 30 s).
    async fn wait_for(
        &mut self,
        id: &str,
        what: &str,
        done: impl Fn(&api::Job) -> bool,
    ) -> api::Job {
        watch_job_until(
            &mut self.jobs,
            INSTANCE,
            id,
            what,
            Duration::from_secs(30),
            done,
        )
        .await
        .unwrap()
    }

    fn info(worker: &str) -> wire::WorkerInfo {
        wire::WorkerInfo {
            worker_id: worker.into(),
            instance_name: INSTANCE.into(),
            platform: None,
            concurrency: 1,
            runs_steps: true,
        }
    }

    /// Leases the next step as `worker` (waiting up to 10 s).
    async fn lease(&mut self, worker: &str) -> wire::Lease {
        let lease = self
            .worker
            .lease(wire::LeaseRequest {
                worker: Some(Farm::info(worker)),
                wait: Some(prost_types::Duration {
                    seconds: 10,
                    nanos: 0,
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .lease
            .expect("a step to lease within 10 s");
        assert!(lease.step.is_some(), "a step lease: {lease:?}");
        lease
    }

    async fn complete(&mut self, worker: &str, lease: &wire::Lease, result: wire::StepResult) {
        let accepted = self
            .worker
            .complete(wire::CompleteRequest {
                worker: Some(Farm::info(worker)),
                lease_id: lease.lease_id.clone(),
                operation_name: lease.operation_name.clone(),
                outcome: Some(wire::complete_request::Outcome::StepResult(result)),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .accepted;
        assert!(accepted, "the server accepts the step's result");
    }

    /// Does the pipeline step's work: the file goes to the CAS.
    async fn run_pipeline_step(&mut self, pipeline: &str) -> wire::StepSpec {
        let lease = self.lease("w1").await;
        let spec = lease.step.clone().unwrap();
        assert_eq!(spec.step_key, ":pipeline");
        let file = Digest::of_bytes(pipeline.as_bytes());
        self.cas
            .upload_blob(file, Bytes::copy_from_slice(pipeline.as_bytes()))
            .await
            .unwrap();
        let commit = if spec.commit.is_empty() {
            "1111111111111111111111111111111111111111".to_string()
        } else {
            spec.commit.clone()
        };
        self.complete(
            "w1",
            &lease,
            wire::StepResult {
                commit,
                pipeline_file: Some(file.to_proto()),
                ..Default::default()
            },
        )
        .await;
        spec
    }
}

fn state(job: &api::Job) -> api::JobState {
    job.state()
}

fn step<'a>(job: &'a api::Job, key: &str) -> &'a api::JobStep {
    job.steps
        .iter()
        .find(|s| s.key == key)
        .unwrap_or_else(|| panic!("step {key} in {job:#?}"))
}

#[tokio::test]
async fn webhook_github_push_signed_creates_a_job_and_a_bad_signature_is_401_and_creates_nothing() {
    let (server, _secrets) = server_with_webhook();
    let mut farm = Farm::connect(&server);
    let post = |signature: Option<&str>| {
        let mut headers = vec![
            ("X-GitHub-Event", "push"),
            ("X-GitHub-Delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958"),
            ("Content-Type", "application/json"),
        ];
        if let Some(signature) = signature {
            headers.push(("X-Hub-Signature-256", signature));
        }
        http_post(
            server.http_addr(),
            GITHUB_WEBHOOK_PATH,
            &headers,
            GITHUB_PUSH,
            HTTP_TIMEOUT,
        )
        .unwrap()
    };
    let wrong = WebhookSecrets::new(vec![b"not the secret".to_vec()])
        .unwrap()
        .github_signature(GITHUB_PUSH);
    for (signature, what) in [(None, "missing"), (Some(wrong.as_str()), "wrong")] {
        let response = post(signature);
        assert_eq!(response.status, 401, "{what} signature: {}", response.body);
    }
    assert!(
        farm.list().await.is_empty(),
        "a refused delivery creates nothing"
    );

    let signature = WebhookSecrets::new(vec![SECRET.as_bytes().to_vec()])
        .unwrap()
        .github_signature(GITHUB_PUSH);
    let response = post(Some(&signature));
    assert_eq!(response.status, 201, "{}", response.body);
    let created: serde_json::Value = serde_json::from_str(&response.body).unwrap();
    let id = created["job"].as_str().unwrap().to_string();
    let jobs = farm.list().await;
    assert_eq!(jobs.len(), 1);
    let job = farm.job(&id).await;
    assert_eq!(job.commit, PUSHED_COMMIT);
    assert_eq!(job.git_ref, "refs/heads/main");
    assert_eq!(
        job.repository,
        "git@github.com:buildkube-test/farm-demo.git"
    );
    let trigger = job.trigger.clone().unwrap();
    assert_eq!(
        (trigger.source.as_str(), trigger.event.as_str()),
        ("github", "push")
    );
    // Its pipeline step asks a worker for exactly the pushed commit.
    let lease = farm.lease("w1").await;
    let spec = lease.step.unwrap();
    assert_eq!(spec.kind(), wire::StepKind::Pipeline);
    assert_eq!(
        (spec.job_id.as_str(), spec.commit.as_str()),
        (id.as_str(), PUSHED_COMMIT)
    );
    // The job's JSON page, without its credential hashes.
    let page = server.http_get(&format!("/jobs/{id}")).unwrap();
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(
        page.body.contains(PUSHED_COMMIT) && !page.body.contains("token_hashes"),
        "{}",
        page.body
    );
}

#[tokio::test]
async fn invalid_pipeline_fails_the_job_naming_the_field_and_its_line() {
    let server = Server::start().unwrap();
    let mut farm = Farm::connect(&server);
    let job = farm.run().await;
    farm.run_pipeline_step("steps:\n  - key: build\n    comands: [make]\n")
        .await;
    let done = farm
        .wait_for(&job.id, "the job to fail", |j| {
            state(j) == api::JobState::Failed
        })
        .await;
    assert!(
        done.message.contains("steps[0].comands") && done.message.contains("line 3"),
        "{}",
        done.message
    );
    assert_eq!(done.steps.len(), 1, "{done:#?}");
}

#[tokio::test]
async fn two_step_pipeline_job_runs_build_before_test() {
    let server = Server::start().unwrap();
    let mut farm = Farm::connect(&server);
    let job = farm.run().await;
    farm.run_pipeline_step(TWO_STEPS).await;

    let build = farm.lease("w1").await;
    assert_eq!(build.step.as_ref().unwrap().step_key, "build");
    // `test` is not handed out while `build` runs.
    let nothing = farm
        .worker
        .lease(wire::LeaseRequest {
            worker: Some(Farm::info("w2")),
            wait: Some(prost_types::Duration {
                seconds: 0,
                nanos: 300_000_000,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(nothing.lease.is_none(), "{nothing:?}");
    let log = Digest::of_bytes(b"2026-12-02T06:01:02.345Z | built\n");
    farm.cas
        .upload_blob(
            log,
            Bytes::from_static(b"2026-12-02T06:01:02.345Z | built\n"),
        )
        .await
        .unwrap();
    farm.complete(
        "w1",
        &build,
        wire::StepResult {
            log: Some(log.to_proto()),
            ..Default::default()
        },
    )
    .await;

    let test = farm.lease("w2").await;
    assert_eq!(test.step.as_ref().unwrap().step_key, "test");
    farm.complete("w2", &test, wire::StepResult::default())
        .await;
    let done = farm
        .wait_for(&job.id, "the job to pass", |j| {
            state(j) == api::JobState::Succeeded
        })
        .await;
    let keys: Vec<&str> = done.steps.iter().map(|s| s.key.as_str()).collect();
    assert_eq!(keys, [":pipeline", "build", "test"]);
    assert_eq!(step(&done, "build").workers, ["w1"]);
    assert_eq!(step(&done, "test").workers, ["w2"]);

    // The finished step's log, from the CAS.
    let mut chunks = farm
        .jobs
        .stream_logs(api::StreamLogsRequest {
            instance_name: INSTANCE.into(),
            job_id: job.id.clone(),
            step_key: "build".into(),
            follow: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut text = Vec::new();
    while let Some(chunk) = chunks.next().await {
        text.extend_from_slice(&chunk.unwrap().data);
    }
    assert_eq!(text, b"2026-12-02T06:01:02.345Z | built\n");
}

#[tokio::test]
async fn cancelling_a_job_kills_its_running_step_and_skips_the_rest() {
    let server = Server::start().unwrap();
    let mut farm = Farm::connect(&server);
    let job = farm.run().await;
    farm.run_pipeline_step(TWO_STEPS).await;
    let build = farm.lease("w1").await;
    farm.wait_for(&job.id, "build running", |j| {
        step(j, "build").state() == api::StepState::Running
    })
    .await;
    let cancelled = farm
        .jobs
        .cancel_job(api::CancelJobRequest {
            instance_name: INSTANCE.into(),
            job_id: job.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        state(&cancelled),
        api::JobState::Cancelled,
        "{cancelled:#?}"
    );
    assert_eq!(step(&cancelled, "build").state(), api::StepState::Cancelled);
    assert_eq!(step(&cancelled, "test").state(), api::StepState::Cancelled);
    // The worker is told to stop the step at its next keep-alive.
    let abandon = farm
        .worker
        .keep_alive(wire::KeepAliveRequest {
            worker: Some(Farm::info("w1")),
            leases: vec![wire::LeaseProgress {
                lease_id: build.lease_id.clone(),
                ..Default::default()
            }],
            draining: false,
        })
        .await
        .unwrap()
        .into_inner()
        .abandon_lease_ids;
    assert_eq!(abandon, std::slice::from_ref(&build.lease_id));
    // Another instance's caller cannot see it: an unknown instance is refused.
    let other = farm
        .jobs
        .get_job(api::GetJobRequest {
            instance_name: "other".into(),
            job_id: job.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(other.code(), tonic::Code::InvalidArgument, "{other}");
}

#[tokio::test]
async fn a_job_survives_a_server_restart_and_finishes_after_it() {
    // A short lease timeout: the lost worker's lease expires soon, whether
    // the step's operation survived the restart or the job runs it again.
    let mut server = Server::start_with(|args| args.lease_timeout_secs = 2).unwrap();
    let mut farm = Farm::connect(&server);
    let job = farm.run().await;
    farm.run_pipeline_step(TWO_STEPS).await;
    let _build = farm.lease("w1").await;
    farm.wait_for(&job.id, "build running", |j| {
        step(j, "build").state() == api::StepState::Running
    })
    .await;

    server.kill_and_restart().unwrap();
    let mut farm = Farm::connect(&server);
    let restored = farm.job(&job.id).await;
    assert_eq!(state(&restored), api::JobState::Running, "{restored:#?}");
    assert_eq!(
        step(&restored, ":pipeline").state(),
        api::StepState::Succeeded
    );
    // The build step runs again (on any worker) and the job goes on.
    let build = farm.lease("w2").await;
    assert_eq!(build.step.as_ref().unwrap().step_key, "build");
    farm.complete("w2", &build, wire::StepResult::default())
        .await;
    let test = farm.lease("w2").await;
    assert_eq!(test.step.as_ref().unwrap().step_key, "test");
    farm.complete("w2", &test, wire::StepResult::default())
        .await;
    let done = farm
        .wait_for(&job.id, "the job to pass", |j| {
            state(j) == api::JobState::Succeeded
        })
        .await;
    assert_eq!(step(&done, "test").workers, ["w2"]);
}

/// Runs the `buildkube` client against `server`; its exit code and stdout.
fn buildkube_cli(server: &Server, args: &[&str]) -> (i32, String) {
    let output = std::process::Command::new(buildkube_tests::bin_path("buildkube"))
        .arg("--server")
        .arg(server.worker_endpoint())
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.code().is_some(),
        "buildkube {args:?} was killed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    (
        output.status.code().unwrap(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[tokio::test]
async fn buildkube_run_job_on_real_workers_then_logs_and_artifact_download_byte_exact() {
    let repo = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(repo.path().join(".buildkube")).unwrap();
    std::fs::write(
        repo.path().join(".buildkube/pipeline.yaml"),
        "steps:
  - key: build
    commands: ['mkdir -p out && head -c 100000 /dev/urandom > out/blob.bin && echo built']
    artifacts: ['out/*.bin']
  - key: test
    depends_on: [build]
    commands: ['echo tested']
",
    )
    .unwrap();
    buildkube_tests::git_servers::commit_all(repo.path()).unwrap();
    let server = Server::start_with(|args| args.local_workers = 1).unwrap();
    let url = format!("file://{}", repo.path().display());
    let (code, stdout) = buildkube_cli(
        &server,
        &["run", "--repo", &url, "--ref", "refs/heads/main", "--wait"],
    );
    assert_eq!(code, 0, "run --wait exits with the job's outcome");
    let id = stdout.trim().to_string();
    let (code, log) = buildkube_cli(&server, &["logs", "-f", &id]);
    assert_eq!(code, 0);
    assert!(
        log.contains(" | built\n") && log.contains(" | tested\n"),
        "{log}"
    );
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("blob.bin");
    let (code, _) = buildkube_cli(
        &server,
        &[
            "artifacts",
            "download",
            &id,
            "out/blob.bin",
            "-o",
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0);
    let mut farm = Farm::connect(&server);
    let job = farm.job(&id).await;
    let artifact = &step(&job, "build").artifacts[0];
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(bytes.len(), 100_000);
    assert_eq!(
        Digest::of_bytes(&bytes).to_proto(),
        artifact.digest.clone().unwrap(),
        "the download is the artifact, byte for byte"
    );
    let (code, _) = buildkube_cli(&server, &["cancel", &id]);
    assert_eq!(code, 0, "cancelling a finished job reports its outcome");
}
