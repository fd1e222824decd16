//! Issue 9: a worker lost mid-step. Two real worker processes run CI steps
//! for a real server whose leases time out in 2 s; the worker running a
//! step is SIGKILLed. The step reruns on the other worker and the job
//! succeeds, its step naming both workers; with no retries left it fails
//! naming them. Nothing the killed worker ran outlives it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use buildkube_proto::jobs::{self as api, jobs_client::JobsClient};
use buildkube_reapi::{connect_channel, AuthChannel};
use buildkube_tests::{processes_under, watch_job_until, Server, Worker};

const INSTANCE: &str = "main";
const WAIT: Duration = Duration::from_secs(60);

/// A git repository whose pipeline has one step, `slow`: it writes
/// `started/$BUILDKUBE_WORKER_ID`, then waits for the file `go`.
fn repository(dir: &Path, worker_lost_retries: u32) -> String {
    let repo = dir.join("repo");
    std::fs::create_dir_all(repo.join(".buildkube")).unwrap();
    std::fs::create_dir_all(dir.join("started")).unwrap();
    let (started, go) = (dir.join("started"), dir.join("go"));
    std::fs::write(
        repo.join(".buildkube/pipeline.yaml"),
        format!(
            "steps:
  - key: slow
    commands:
      - 'touch {}/$BUILDKUBE_WORKER_ID && while [ ! -e {} ]; do sleep 0.05; done && echo done on $BUILDKUBE_WORKER_ID'
    retry: {{ worker_lost: {worker_lost_retries} }}
",
            started.display(),
            go.display()
        ),
    )
    .unwrap();
    buildkube_tests::git_servers::commit_all(&repo).unwrap();
    format!("file://{}", repo.display())
}

struct Farm {
    /// Held so the server runs (and is stopped) with the farm.
    _server: Server,
    workers: Vec<Worker>,
    jobs: JobsClient<AuthChannel>,
}

impl Farm {
    fn start() -> Farm {
        let server = Server::start_with(|args| args.lease_timeout_secs = 2).unwrap();
        let workers: Vec<Worker> = (0..2)
            .map(|_| Worker::start_with(&server, |args| args.concurrency = Some(1)).unwrap())
            .collect();
        server.wait_for_workers(2, WAIT).unwrap();
        let channel =
            connect_channel(&server.worker_endpoint(), None, &Default::default()).unwrap();
        Farm {
            _server: server,
            workers,
            jobs: JobsClient::new(channel),
        }
    }

    async fn run(&mut self, repository: &str) -> String {
        let job = self
            .jobs
            .run(api::RunRequest {
                instance_name: INSTANCE.into(),
                repository: repository.into(),
                git_ref: "refs/heads/main".into(),
                commit: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        job.id
    }

    async fn wait_for(
        &mut self,
        id: &str,
        what: &str,
        done: impl Fn(&api::Job) -> bool,
    ) -> api::Job {
        watch_job_until(&mut self.jobs, INSTANCE, id, what, WAIT, done)
            .await
            .unwrap()
    }

    /// Kills the worker that started the step (named by the file it
    /// wrote in `started`), and nothing else; returns its id. Whatever it
    /// ran must die with it.
    async fn kill_the_one_running(&mut self, started: &Path, skip: &[String]) -> String {
        let id = wait_for_start(started, skip).await;
        let worker = self
            .workers
            .iter_mut()
            .find(|w| w.id() == id)
            .unwrap_or_else(|| panic!("no worker {id}"));
        assert!(
            !processes_under(worker.work_dir()).is_empty(),
            "the step runs under {id}'s work dir"
        );
        worker.kill_process_only().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = processes_under(worker.work_dir());
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "processes of the step {id} ran outlived it: {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        id
    }
}

/// Waits until a worker other than those in `skip` started the step.
async fn wait_for_start(started: &Path, skip: &[String]) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let found: Vec<String> = std::fs::read_dir(started)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| !skip.contains(name))
            .collect();
        if let Some(id) = found.into_iter().next() {
            return id;
        }
        assert!(Instant::now() < deadline, "no worker started the step");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn slow(job: &api::Job) -> Option<&api::JobStep> {
    job.steps.iter().find(|s| s.key == "slow")
}

#[tokio::test]
async fn job_step_whose_worker_is_killed_reruns_on_the_other_worker_and_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let repository = repository(dir.path(), 1);
    let started: PathBuf = dir.path().join("started");
    let mut farm = Farm::start();
    let id = farm.run(&repository).await;
    let victim = farm.kill_the_one_running(&started, &[]).await;
    let survivor = wait_for_start(&started, std::slice::from_ref(&victim)).await;
    assert_ne!(survivor, victim);
    std::fs::write(dir.path().join("go"), b"").unwrap();
    let job = farm
        .wait_for(&id, "the job to end", |j| {
            j.state() != api::JobState::Queued && j.state() != api::JobState::Running
        })
        .await;
    assert_eq!(job.state(), api::JobState::Succeeded, "{job:#?}");
    let step = slow(&job).unwrap();
    assert_eq!(step.workers, [victim, survivor], "{step:#?}");
}

#[tokio::test]
async fn job_step_whose_workers_are_all_lost_beyond_its_retries_fails_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let repository = repository(dir.path(), 1);
    let started: PathBuf = dir.path().join("started");
    let mut farm = Farm::start();
    let id = farm.run(&repository).await;
    let first = farm.kill_the_one_running(&started, &[]).await;
    let second = farm
        .kill_the_one_running(&started, std::slice::from_ref(&first))
        .await;
    let job = farm
        .wait_for(&id, "the job to fail", |j| {
            j.state() == api::JobState::Failed
        })
        .await;
    let step = slow(&job).unwrap();
    assert_eq!(step.state(), api::StepState::Failed, "{step:#?}");
    assert_eq!(step.workers, [first.clone(), second.clone()], "{step:#?}");
    assert!(
        step.message
            .contains(&format!("workers: {first}, {second}")),
        "{}",
        step.message
    );
}
