//! The runner against the real scheduler, with a test standing in for the
//! worker (it leases steps and completes them as a worker would) and an
//! in-memory CAS and the data-dir record store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use buildkube_proto::worker as wire;
use buildkube_reapi::Digest;
use buildkube_records::{FsRecords, RecordStore};
use buildkube_scheduler::{LeaseHolder, LeaseOutcome, Scheduler, SchedulerConfig};
use bytes::Bytes;

use super::*;

#[derive(Default)]
struct MemoryCas(Mutex<HashMap<Digest, Bytes>>);

impl MemoryCas {
    fn put(&self, data: &[u8]) -> Digest {
        let digest = Digest::of_bytes(data);
        self.0
            .lock()
            .unwrap()
            .insert(digest, Bytes::copy_from_slice(data));
        digest
    }
}

#[async_trait]
impl BlobSource for MemoryCas {
    async fn read_blob(&self, digest: Digest) -> Result<Option<Bytes>, String> {
        Ok(self.0.lock().unwrap().get(&digest).cloned())
    }
}

/// Mints `token-N`, remembers which are live.
#[derive(Default)]
struct CountingCredentials {
    live: Mutex<HashMap<String, Vec<String>>>,
    minted: Mutex<u32>,
}

impl JobCredentials for CountingCredentials {
    fn mint(&self, job_id: &str, _instance: &str) -> Option<MintedToken> {
        let mut minted = self.minted.lock().unwrap();
        *minted += 1;
        let token = format!("token-{minted}");
        self.live
            .lock()
            .unwrap()
            .entry(job_id.into())
            .or_default()
            .push(token.clone());
        Some(MintedToken {
            hash: format!("hash-of-{token}"),
            token,
        })
    }
    fn honour(&self, job_id: &str, _instance: &str, hash: &str) {
        self.live
            .lock()
            .unwrap()
            .entry(job_id.into())
            .or_default()
            .push(hash.into());
    }
    fn revoke(&self, job_id: &str) {
        self.live.lock().unwrap().remove(job_id);
    }
}

struct Farm {
    scheduler: Arc<Scheduler>,
    cas: Arc<MemoryCas>,
    store: TestStore,
    credentials: Arc<CountingCredentials>,
    runner: JobRunner,
}

/// A data-dir record store in a temp dir, removed with the last clone.
#[derive(Clone)]
struct TestStore {
    records: Arc<dyn RecordStore>,
    _dir: Arc<tempfile::TempDir>,
}

async fn record_store() -> TestStore {
    let dir = tempfile::tempdir().unwrap();
    let records = Arc::new(FsRecords::open(dir.path()).await.unwrap());
    TestStore {
        records,
        _dir: Arc::new(dir),
    }
}

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

impl Farm {
    async fn new() -> Farm {
        Farm::with(
            Arc::new(Scheduler::new(SchedulerConfig::default())),
            record_store().await,
            Arc::new(MemoryCas::default()),
            JobLimits::default(),
        )
    }

    fn with(
        scheduler: Arc<Scheduler>,
        store: TestStore,
        cas: Arc<MemoryCas>,
        limits: JobLimits,
    ) -> Farm {
        let credentials = Arc::new(CountingCredentials::default());
        let runner = JobRunner::new(
            scheduler.clone(),
            cas.clone(),
            credentials.clone(),
            Some(store.records.clone()),
            limits,
        );
        Farm {
            scheduler,
            cas,
            store,
            credentials,
            runner,
        }
    }

    async fn start(&self) -> JobRecord {
        self.runner
            .start(JobRequest::run(
                "main",
                "file:///repo.git",
                "refs/heads/main",
                "",
            ))
            .await
            .unwrap()
    }

    /// Leases the next step as worker `worker`.
    async fn lease(&self, worker: &str) -> (wire::Lease, LeaseHolder) {
        let info = wire::WorkerInfo {
            worker_id: worker.into(),
            instance_name: "main".into(),
            platform: None,
            concurrency: 1,
            runs_steps: true,
        };
        let lease = self
            .scheduler
            .lease(&info, "open", Duration::from_secs(5))
            .await
            .expect("a step to lease");
        let holder = LeaseHolder {
            identity: "open".into(),
            worker_id: worker.into(),
        };
        (lease, holder)
    }

    fn complete(&self, lease: &wire::Lease, holder: &LeaseHolder, result: wire::StepResult) {
        let accepted = self
            .scheduler
            .complete(
                holder,
                &lease.lease_id,
                &lease.operation_name,
                LeaseOutcome::StepRan(result),
                String::new(),
            )
            .unwrap();
        assert!(accepted);
    }

    /// Runs the pipeline step as a worker would: the file goes to the CAS.
    async fn run_pipeline_step(&self, pipeline: &str) {
        let (lease, holder) = self.lease("w1").await;
        let spec = lease.step.clone().expect("a step lease");
        assert_eq!(spec.step_key, PIPELINE_STEP_KEY);
        assert_eq!(spec.kind(), wire::StepKind::Pipeline);
        assert!(
            spec.farm_token.is_empty(),
            "the pipeline step runs no Bazel"
        );
        let file = self.cas.put(pipeline.as_bytes());
        self.complete(
            &lease,
            &holder,
            wire::StepResult {
                exit_code: 0,
                commit: COMMIT.into(),
                pipeline_file: Some(file.to_proto()),
                ..Default::default()
            },
        );
    }

    async fn wait_for(&self, id: &str, what: &str, done: impl Fn(&JobRecord) -> bool) -> JobRecord {
        let mut updates = self.runner.watch("main", id).unwrap();
        let waited = tokio::time::timeout(Duration::from_secs(10), updates.wait_for(|r| done(r)))
            .await
            .is_ok();
        let record = updates.borrow().clone();
        assert!(waited, "timed out waiting for {what}: {record:#?}");
        record
    }
}

fn exited(code: i32) -> wire::StepResult {
    wire::StepResult {
        exit_code: code,
        commit: COMMIT.into(),
        ..Default::default()
    }
}

const TWO_STEPS: &str = "steps:
  - key: build
    commands: [make]
    env: { CC: clang }
    artifacts: [out/*.tar]
  - key: test
    depends_on: [build]
    commands: [make test]
";

#[tokio::test]
async fn two_step_pipeline_job_runs_its_steps_in_dependency_order() {
    let farm = Farm::new().await;
    let job = farm.start().await;
    assert_eq!(job.state, JobState::Queued);
    farm.run_pipeline_step(TWO_STEPS).await;

    let (lease, holder) = farm.lease("w1").await;
    let spec = lease.step.clone().unwrap();
    assert_eq!(
        (spec.step_key.as_str(), spec.kind()),
        ("build", wire::StepKind::Command)
    );
    assert_eq!(spec.commit, COMMIT, "command steps run the resolved commit");
    assert_eq!(spec.commands, ["make"]);
    assert_eq!(spec.env.get("CC").map(String::as_str), Some("clang"));
    assert_eq!(spec.artifact_globs, ["out/*.tar"]);
    assert_eq!(spec.farm_token, "token-1");
    assert_eq!(spec.attempt, 1);
    // `test` waits for `build`: nothing else to lease meanwhile.
    let info = wire::WorkerInfo {
        worker_id: "w2".into(),
        instance_name: "main".into(),
        runs_steps: true,
        ..Default::default()
    };
    assert!(farm
        .scheduler
        .lease(&info, "open", Duration::from_millis(50))
        .await
        .is_none());
    let running = farm
        .wait_for(&job.id, "build running", |r| {
            r.step("build")
                .is_some_and(|s| s.state == StepState::Running)
        })
        .await;
    assert_eq!(running.state, JobState::Running);
    assert_eq!(running.step("test").unwrap().state, StepState::Waiting);

    let artifact = Digest::of_bytes(b"tarball");
    farm.complete(
        &lease,
        &holder,
        wire::StepResult {
            artifacts: vec![wire::StepArtifact {
                path: "out/site.tar".into(),
                digest: Some(artifact.to_proto()),
            }],
            ..exited(0)
        },
    );
    let (lease, holder) = farm.lease("w2").await;
    assert_eq!(lease.step.as_ref().unwrap().step_key, "test");
    farm.complete(&lease, &holder, exited(0));

    let done = farm
        .wait_for(&job.id, "the job to finish", |r| r.state.is_finished())
        .await;
    assert_eq!(done.state, JobState::Succeeded, "{done:#?}");
    assert_eq!(done.commit.as_deref(), Some(COMMIT));
    let build = done.step("build").unwrap();
    assert_eq!(build.artifacts[0].digest, artifact);
    assert_eq!(build.attempts[0].workers, ["w1"]);
    let proto = done.to_proto();
    assert_eq!(
        proto
            .steps
            .iter()
            .map(|s| s.key.as_str())
            .collect::<Vec<_>>(),
        [PIPELINE_STEP_KEY, "build", "test"]
    );
    assert!(
        farm.credentials.live.lock().unwrap().is_empty(),
        "the job's token is revoked when it ends"
    );
    assert_eq!(farm.runner.counts().1.get("main"), None);
}

#[tokio::test]
async fn invalid_pipeline_fails_the_job_naming_the_field_and_line() {
    let farm = Farm::new().await;
    let job = farm.start().await;
    farm.run_pipeline_step("steps:\n  - key: build\n    commands: [make]\n    timeout: 5\n")
        .await;
    let done = farm
        .wait_for(&job.id, "the job to fail", |r| r.state.is_finished())
        .await;
    assert_eq!(done.state, JobState::Failed);
    assert!(
        done.message.contains("steps[0].timeout") && done.message.contains("line 4"),
        "{}",
        done.message
    );
    assert_eq!(
        done.steps.len(),
        1,
        "no step of a refused pipeline is created"
    );
}

#[tokio::test]
async fn failed_job_step_skips_its_dependants_and_fails_the_job() {
    let farm = Farm::new().await;
    let job = farm.start().await;
    farm.run_pipeline_step(TWO_STEPS).await;
    let (lease, holder) = farm.lease("w1").await;
    farm.complete(
        &lease,
        &holder,
        wire::StepResult {
            message: "make: *** [all] Error 2".into(),
            ..exited(2)
        },
    );
    let done = farm
        .wait_for(&job.id, "the job to fail", |r| r.state.is_finished())
        .await;
    assert_eq!(done.state, JobState::Failed);
    assert_eq!(
        done.message,
        "step build failed: attempt 1 exited with code 2: make: *** [all] Error 2"
    );
    let test = done.step("test").unwrap();
    assert_eq!(test.state, StepState::Skipped);
    assert!(test.attempts.is_empty());
}

#[tokio::test]
async fn job_step_reruns_as_a_new_attempt_on_a_listed_exit_code() {
    let farm = Farm::new().await;
    let job = farm.start().await;
    farm.run_pipeline_step(
        "steps: [{key: flaky, commands: [x], retry: {exit_codes: {codes: [75], limit: 1}}}]",
    )
    .await;
    let (lease, holder) = farm.lease("w1").await;
    farm.complete(&lease, &holder, exited(75));
    let (lease, holder) = farm.lease("w2").await;
    assert_eq!(lease.step.as_ref().unwrap().attempt, 2);
    farm.complete(&lease, &holder, exited(0));
    let done = farm
        .wait_for(&job.id, "the job to finish", |r| r.state.is_finished())
        .await;
    assert_eq!(done.state, JobState::Succeeded, "{done:#?}");
    let flaky = done.step("flaky").unwrap();
    assert_eq!(flaky.attempts.len(), 2);
    assert_ne!(flaky.attempts[0].operation, flaky.attempts[1].operation);
}

#[tokio::test]
async fn job_step_gives_the_scheduler_its_worker_lost_retries() {
    // A 10 ms lease timeout: the test's worker never sends a keep-alive.
    let scheduler = Arc::new(Scheduler::new(SchedulerConfig {
        lease_timeout: Duration::from_millis(10),
        ..Default::default()
    }));
    let farm = Farm::with(
        scheduler,
        record_store().await,
        Arc::default(),
        JobLimits::default(),
    );
    let job = farm.start().await;
    farm.run_pipeline_step("steps: [{key: a, commands: [x], retry: {worker_lost: 1}}]")
        .await;
    for worker in ["w1", "w2"] {
        let _ = farm.lease(worker).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        farm.scheduler.reap();
    }
    let done = farm
        .wait_for(&job.id, "the job to fail", |r| r.state.is_finished())
        .await;
    assert_eq!(done.state, JobState::Failed);
    let a = done.step("a").unwrap();
    assert!(
        a.message.contains("w1") && a.message.contains("w2"),
        "{}",
        a.message
    );
    assert_eq!(
        a.attempts.len(),
        1,
        "worker loss retries within one attempt"
    );
}

#[tokio::test]
async fn cancelling_a_job_cancels_its_running_step_operation() {
    let farm = Farm::new().await;
    let job = farm.start().await;
    farm.run_pipeline_step(TWO_STEPS).await;
    let (lease, _holder) = farm.lease("w1").await;
    farm.wait_for(&job.id, "build running", |r| {
        r.step("build")
            .is_some_and(|s| s.state == StepState::Running)
    })
    .await;
    let cancelled = farm.runner.cancel("main", &job.id, "by ci").await.unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert_eq!(cancelled.message, "cancelled: by ci");
    assert_eq!(cancelled.step("build").unwrap().state, StepState::Cancelled);
    assert_eq!(cancelled.step("test").unwrap().state, StepState::Cancelled);
    // The worker is told to abandon the lease on its next keep-alive.
    let info = wire::WorkerInfo {
        worker_id: "w1".into(),
        instance_name: "main".into(),
        runs_steps: true,
        ..Default::default()
    };
    let abandon = farm
        .scheduler
        .keep_alive(
            &info,
            "open",
            &[wire::LeaseProgress {
                lease_id: lease.lease_id.clone(),
                ..Default::default()
            }],
        )
        .unwrap();
    assert_eq!(abandon, std::slice::from_ref(&lease.lease_id));
    assert!(farm.credentials.live.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_job_survives_a_restart_of_its_runner_and_resumes_its_running_step() {
    let scheduler = Arc::new(Scheduler::new(SchedulerConfig::default()));
    let store = record_store().await;
    let cas = Arc::new(MemoryCas::default());
    let first = Farm::with(
        scheduler.clone(),
        store.clone(),
        cas.clone(),
        JobLimits::default(),
    );
    let job = first.start().await;
    first.run_pipeline_step(TWO_STEPS).await;
    let (lease, holder) = first.lease("w1").await;
    first
        .wait_for(&job.id, "build running", |r| {
            r.step("build")
                .is_some_and(|s| s.state == StepState::Running)
        })
        .await;
    first.runner.stop();
    drop(first);

    // A new runner over the same store and (durable) scheduler.
    let second = Farm::with(scheduler, store, cas, JobLimits::default());
    assert_eq!(second.runner.restore().await.unwrap(), (1, 1));
    assert_eq!(
        second.credentials.live.lock().unwrap()[&job.id],
        ["hash-of-token-1"],
        "the running step's token is honoured again"
    );
    second.complete(&lease, &holder, exited(0));
    let (lease, holder) = second.lease("w2").await;
    let spec = lease.step.clone().unwrap();
    assert_eq!(spec.step_key, "test");
    assert_eq!(
        spec.farm_token, "token-1",
        "a fresh token after the restart"
    );
    second.complete(&lease, &holder, exited(0));
    let done = second
        .wait_for(&job.id, "the job to finish", |r| r.state.is_finished())
        .await;
    assert_eq!(done.state, JobState::Succeeded, "{done:#?}");
}

#[tokio::test]
async fn jobs_per_instance_and_retained_finished_jobs_are_bounded() {
    let farm = Farm::with(
        Arc::new(Scheduler::new(SchedulerConfig::default())),
        record_store().await,
        Arc::default(),
        JobLimits {
            max_unfinished_per_instance: 2,
            retain_finished: 1,
            ..Default::default()
        },
    );
    let a = farm.start().await;
    let b = farm.start().await;
    let refused = farm
        .runner
        .start(JobRequest::run("main", "file:///r", "main", ""))
        .await
        .unwrap_err();
    assert!(
        matches!(refused, JobError::InstanceFull { limit: 2, .. }),
        "{refused}"
    );
    // Another instance has its own count.
    let other = farm
        .runner
        .start(JobRequest::run("other", "file:///r", "main", ""))
        .await
        .unwrap();
    assert!(farm.runner.get("main", &other.id).is_err(), "{other:?}");
    for job in [&a, &b] {
        farm.runner.cancel("main", &job.id, "test").await.unwrap();
    }
    let (held, _) = farm.runner.counts();
    assert_eq!(
        held, 2,
        "one finished job retained, plus the other instance's"
    );
    assert!(
        farm.runner.get("main", &a.id).is_err(),
        "the oldest finished job is dropped"
    );
    assert_eq!(
        farm.store
            .records
            .load_all(JOB_RECORD_KIND)
            .await
            .unwrap()
            .len(),
        2
    );
    farm.start().await;
}

#[tokio::test]
async fn pipeline_step_failure_fails_the_job_with_the_workers_message() {
    let farm = Farm::new().await;
    let job = farm.start().await;
    let (lease, holder) = farm.lease("w1").await;
    farm.complete(
        &lease,
        &holder,
        wire::StepResult {
            exit_code: 1,
            message: ".buildkube/pipeline.yaml does not exist at 0123abc".into(),
            ..Default::default()
        },
    );
    let done = farm
        .wait_for(&job.id, "the job to fail", |r| r.state.is_finished())
        .await;
    assert_eq!(done.state, JobState::Failed);
    assert!(
        done.message.contains("does not exist") && done.message.contains(PIPELINE_STEP_KEY),
        "{}",
        done.message
    );
}

/// A record store whose writes take a while, as on a slow disk.
struct SlowWrites {
    inner: Arc<dyn RecordStore>,
    delay: Duration,
}

#[async_trait]
impl RecordStore for SlowWrites {
    async fn apply(
        &self,
        changes: Vec<buildkube_records::RecordChange>,
    ) -> Result<(), buildkube_records::RecordError> {
        tokio::time::sleep(self.delay).await;
        self.inner.apply(changes).await
    }
    async fn get(
        &self,
        kind: &str,
        key: &str,
    ) -> Result<Option<Bytes>, buildkube_records::RecordError> {
        self.inner.get(kind, key).await
    }
    async fn load_all(
        &self,
        kind: &str,
    ) -> Result<Vec<(String, Bytes)>, buildkube_records::RecordError> {
        self.inner.load_all(kind).await
    }
    fn describe(&self) -> String {
        format!("slow {}", self.inner.describe())
    }
}

#[tokio::test]
async fn a_pipeline_step_is_in_the_job_record_before_a_worker_can_lease_it() {
    let plain = record_store().await;
    let store = TestStore {
        records: Arc::new(SlowWrites {
            inner: plain.records.clone(),
            delay: Duration::from_millis(300),
        }),
        _dir: plain._dir.clone(),
    };
    let farm = Farm::with(
        Arc::new(Scheduler::new(SchedulerConfig::default())),
        store,
        Arc::new(MemoryCas::default()),
        JobLimits::default(),
    );
    let job = farm.start().await;
    farm.run_pipeline_step(TWO_STEPS).await;
    let (lease, _holder) = farm.lease("w1").await;
    assert_eq!(lease.step.unwrap().step_key, "build");
    // Watchers see it, and so would a server restarted now.
    let seen = farm.runner.get("main", &job.id).unwrap();
    assert!(seen.step("build").is_some(), "{seen:#?}");
    let stored = plain.records.get(JOB_RECORD_KIND, &job.id).await.unwrap();
    let stored: JobRecord = serde_json::from_slice(&stored.unwrap()).unwrap();
    assert!(stored.step("build").is_some(), "{stored:#?}");
}
