//! CI job steps queued beside actions: the same queues, platform matching,
//! priorities, leases, requeue, cancel and metrics; never merged.

use super::tests::{action, holder, worker, ID, NO_WAIT};
use super::*;

fn step(key: &str, props: &[(&str, &str)], priority: i32, max_attempts: u32) -> NewStep {
    NewStep {
        instance: "main".into(),
        platform: props
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect(),
        priority,
        spec: wire::StepSpec {
            job_id: "job-1".into(),
            step_key: key.into(),
            kind: wire::StepKind::Command as i32,
            repository: "file:///repo".into(),
            commit: "a".repeat(40),
            commands: vec!["make test".into()],
            farm_token: "secret-token".into(),
            instance_name: "main".into(),
            attempt: 1,
            ..Default::default()
        },
        max_attempts,
    }
}

fn step_result(exit_code: i32) -> wire::StepResult {
    wire::StepResult {
        exit_code,
        commit: "a".repeat(40),
        ..Default::default()
    }
}

fn progress_of(lease: &wire::Lease) -> [wire::LeaseProgress; 1] {
    [wire::LeaseProgress {
        lease_id: lease.lease_id.clone(),
        stage: wire::Stage::Executing as i32,
        since: None,
    }]
}

#[tokio::test]
async fn job_steps_lease_by_platform_and_priority_beside_actions() {
    let s = Scheduler::new(SchedulerConfig::default());
    let (gpu_step, _r1) = s.enqueue_step(step("gpu", &[("gpu", "1")], 0, 1)).unwrap();
    let (act, _r2) = s.enqueue(action("a", &[], 0)).unwrap();
    let (urgent_step, mut progress) = s.enqueue_step(step("urgent", &[], -5, 1)).unwrap();
    assert_eq!(*progress.borrow(), StepProgress::Queued { attempt: 0 });

    let cpu = worker("cpu", &[]);
    let first = s.lease(&cpu, ID, NO_WAIT).await.unwrap();
    assert_eq!(first.operation_name, urgent_step);
    let spec = first.step.as_ref().expect("a step lease carries its spec");
    assert_eq!(
        (spec.step_key.as_str(), spec.farm_token.as_str()),
        ("urgent", "secret-token")
    );
    assert!(first.action.is_none() && first.action_digest.is_none());
    progress.changed().await.unwrap();
    assert_eq!(
        *progress.borrow(),
        StepProgress::Running {
            worker: "cpu".into(),
            attempt: 1
        }
    );
    let second = s.lease(&cpu, ID, NO_WAIT).await.unwrap();
    assert_eq!(second.operation_name, act);
    assert!(second.step.is_none());
    assert!(
        s.lease(&cpu, ID, NO_WAIT).await.is_none(),
        "a gpu step must not go to a cpu worker"
    );
    let gpu = worker("gpu", &[("gpu", "1")]);
    assert_eq!(
        s.lease(&gpu, ID, NO_WAIT).await.unwrap().operation_name,
        gpu_step
    );
}

/// A worker offering `props` that runs actions only (no `--run-steps`).
fn action_worker(id: &str, props: &[(&str, &str)]) -> wire::WorkerInfo {
    wire::WorkerInfo {
        runs_steps: false,
        ..worker(id, props)
    }
}

fn timeline_events(s: &Scheduler, name: &str) -> Vec<String> {
    let summary = s.summary_of(name).unwrap();
    summary.timeline.into_iter().map(|e| e.event).collect()
}

#[tokio::test]
async fn job_steps_go_only_to_workers_that_run_steps_actions_to_every_worker() {
    let s = Scheduler::new(SchedulerConfig::default());
    // Before any worker that runs steps polled, a step says it waits for one.
    let (step_name, _r1) = s.enqueue_step(step("build", &[], -5, 1)).unwrap();
    assert_eq!(timeline_events(&s, &step_name), ["queued", "waiting"]);
    let (act, _r2) = s.enqueue(action("a", &[], 0)).unwrap();

    // The step comes first by priority, but a worker that does not run
    // steps (whatever else it asks for) gets the action, then nothing.
    let plain = action_worker("plain", &[]);
    let first = s.lease(&plain, ID, NO_WAIT).await.unwrap();
    assert_eq!(first.operation_name, act);
    assert!(first.step.is_none());
    assert!(
        s.lease(&plain, ID, NO_WAIT).await.is_none(),
        "a step must not go to a worker without --run-steps"
    );
    assert_eq!(timeline_events(&s, &step_name), ["queued", "waiting"]);

    // A worker that runs steps but lacks the platform of a step does not get it.
    let (gpu_step, _r3) = s.enqueue_step(step("gpu", &[("gpu", "1")], -9, 1)).unwrap();
    let cpu_steps = worker("cpu-steps", &[]);
    let lease = s.lease(&cpu_steps, ID, NO_WAIT).await.unwrap();
    assert_eq!(lease.operation_name, step_name);
    assert!(lease.step.is_some());
    assert!(s.lease(&cpu_steps, ID, NO_WAIT).await.is_none());
    // Now that one is connected, a new step no longer says it waits.
    let (later, _r4) = s.enqueue_step(step("later", &[], 0, 1)).unwrap();
    assert_eq!(timeline_events(&s, &later), ["queued"]);

    // Actions still go to step workers too.
    let (act2, _r5) = s.enqueue(action("b", &[], -20)).unwrap();
    assert_eq!(
        s.lease(&cpu_steps, ID, NO_WAIT)
            .await
            .unwrap()
            .operation_name,
        act2
    );
    assert!(s
        .lease(&action_worker("gpu-plain", &[("gpu", "1")]), ID, NO_WAIT)
        .await
        .is_none());
    let gpu_steps = worker("gpu-steps", &[("gpu", "1")]);
    assert_eq!(
        s.lease(&gpu_steps, ID, NO_WAIT)
            .await
            .unwrap()
            .operation_name,
        gpu_step
    );
}

#[tokio::test]
async fn job_steps_are_never_merged_and_count_in_queue_depth() {
    let s = Scheduler::new(SchedulerConfig::default());
    let (a, _ra) = s
        .enqueue_step(step("same", &[("os", "linux")], 0, 1))
        .unwrap();
    let (b, _rb) = s
        .enqueue_step(step("same", &[("os", "linux")], 0, 1))
        .unwrap();
    assert_ne!(a, b);
    let labels = ("main".to_string(), "os=linux".to_string());
    let stats = s.stats();
    assert_eq!(stats.queue_depth[&labels], 2);
    assert_eq!(stats.running[&labels], 0);
    s.lease(&worker("w", &[("os", "linux")]), ID, NO_WAIT)
        .await
        .unwrap();
    let stats = s.stats();
    assert_eq!((stats.queue_depth[&labels], stats.running[&labels]), (1, 1));
}

#[tokio::test]
async fn job_step_result_reaches_its_watchers_and_closes_the_lease() {
    let s = Scheduler::new(SchedulerConfig::default());
    let (name, _progress) = s.enqueue_step(step("build", &[], 0, 1)).unwrap();
    let mut watcher = s.watch_step(&name).unwrap();
    let w = worker("w", &[]);
    let lease = s.lease(&w, ID, NO_WAIT).await.unwrap();
    let info = s.step_lease("w", &lease.lease_id).unwrap();
    assert_eq!(
        info,
        StepLeaseInfo {
            holder: holder("w"),
            operation: name.clone(),
            job_id: "job-1".into(),
            step_key: "build".into(),
            attempt: 1,
        }
    );
    assert!(s.step_lease("other", &lease.lease_id).is_none());
    assert!(s
        .complete(
            &holder("w"),
            &lease.lease_id,
            &name,
            LeaseOutcome::StepRan(step_result(3)),
            String::new()
        )
        .unwrap());
    watcher.changed().await.unwrap();
    assert_eq!(
        *watcher.borrow(),
        StepProgress::Finished(StepOutcome::Ran(step_result(3)))
    );
    assert!(s.step_lease("w", &lease.lease_id).is_none());
    assert_eq!(s.stats().outcomes[&Outcome::NonZeroExit], 1);
    assert_eq!(s.summary_of(&name).unwrap().stage, "COMPLETED");
    // An action is not a step.
    let (act, _r) = s.enqueue(action("a", &[], 0)).unwrap();
    assert!(s.watch_step(&act).is_none());
    let action_lease = s.lease(&w, ID, NO_WAIT).await.unwrap();
    assert!(s.step_lease("w", &action_lease.lease_id).is_none());
}

#[tokio::test]
async fn job_step_result_of_the_wrong_kind_fails_it() {
    let s = Scheduler::new(SchedulerConfig::default());
    let (name, progress) = s.enqueue_step(step("build", &[], 0, 1)).unwrap();
    let lease = s.lease(&worker("w", &[]), ID, NO_WAIT).await.unwrap();
    let ran = LeaseOutcome::Ran(reapi::ActionResult::default());
    s.complete(&holder("w"), &lease.lease_id, &name, ran, String::new())
        .unwrap();
    let StepProgress::Finished(StepOutcome::Failed(status)) = progress.borrow().clone() else {
        panic!("{:?}", progress.borrow())
    };
    assert_eq!(status.code, tonic::Code::Internal as i32);
    assert!(status.message.contains("action result"), "{status:?}");
}

#[tokio::test]
async fn job_step_is_requeued_on_worker_loss_then_fails_naming_every_worker() {
    // The scheduler's --max-attempts (5) does not apply: the step's own does.
    let s = Scheduler::new(SchedulerConfig {
        lease_timeout: Duration::from_millis(10),
        max_attempts: 5,
        ..Default::default()
    });
    let (name, mut progress) = s.enqueue_step(step("flaky", &[], 0, 2)).unwrap();
    let l1 = s.lease(&worker("w1", &[]), ID, NO_WAIT).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    s.reap();
    assert_eq!(
        *progress.borrow_and_update(),
        StepProgress::Queued { attempt: 1 }
    );
    let l2 = s.lease(&worker("w2", &[]), ID, NO_WAIT).await.unwrap();
    assert_eq!((l2.operation_name.as_str(), l2.attempt), (name.as_str(), 2));
    assert_eq!(
        s.keep_alive(&worker("w1", &[]), ID, &progress_of(&l1))
            .unwrap(),
        vec![l1.lease_id.clone()],
        "the lost worker is told to stop"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    s.reap();
    let StepProgress::Finished(StepOutcome::Failed(status)) = progress.borrow().clone() else {
        panic!("{:?}", progress.borrow())
    };
    assert_eq!(status.code, tonic::Code::Aborted as i32);
    assert!(
        status.message.contains("step job-1/flaky")
            && status.message.contains("workers: w1, w2")
            && status.message.contains("max attempts 2"),
        "{}",
        status.message
    );
    assert!(s.lease(&worker("w3", &[]), ID, NO_WAIT).await.is_none());
}

#[tokio::test]
async fn job_step_given_back_by_a_draining_worker_is_requeued_within_its_attempts() {
    let s = Scheduler::new(SchedulerConfig::default());
    let (name, progress) = s.enqueue_step(step("drain", &[], 0, 1)).unwrap();
    let lease = s.lease(&worker("w1", &[]), ID, NO_WAIT).await.unwrap();
    let gave_back = LeaseOutcome::Failed(operation::status(tonic::Code::Unavailable, "draining"));
    s.complete(
        &holder("w1"),
        &lease.lease_id,
        &name,
        gave_back,
        String::new(),
    )
    .unwrap();
    // One attempt only: no requeue.
    assert!(matches!(
        &*progress.borrow(),
        StepProgress::Finished(StepOutcome::Failed(s)) if s.code == tonic::Code::Unavailable as i32
    ));
}

#[tokio::test]
async fn job_step_cancel_queued_and_running() {
    let s = Scheduler::new(SchedulerConfig::default());
    let (queued, progress) = s.enqueue_step(step("q", &[("never", "x")], 0, 1)).unwrap();
    assert!(s.cancel(&queued, "job cancelled"));
    let StepProgress::Finished(StepOutcome::Failed(status)) = progress.borrow().clone() else {
        panic!("{:?}", progress.borrow())
    };
    assert_eq!(status.code, tonic::Code::Cancelled as i32);
    assert!(status.message.contains("job cancelled"), "{status:?}");
    assert_eq!(s.stats().queue_depth.values().sum::<usize>(), 0);

    let (running, _progress) = s.enqueue_step(step("r", &[], 0, 1)).unwrap();
    let w = worker("w", &[]);
    let lease = s.lease(&w, ID, NO_WAIT).await.unwrap();
    assert!(s.step_lease("w", &lease.lease_id).is_some());
    assert!(s.cancel(&running, "job cancelled"));
    assert!(s.step_lease("w", &lease.lease_id).is_none());
    assert_eq!(
        s.keep_alive(&w, ID, &progress_of(&lease)).unwrap(),
        vec![lease.lease_id.clone()]
    );
    assert_eq!(s.stats().outcomes[&Outcome::Cancelled], 2);
}

#[tokio::test]
async fn job_step_nobody_watches_is_cancelled_after_grace() {
    let s = Scheduler::new(SchedulerConfig {
        orphan_timeout: Duration::from_millis(10),
        ..Default::default()
    });
    let (name, progress) = s.enqueue_step(step("x", &[], 0, 1)).unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    s.reap();
    assert_eq!(*progress.borrow(), StepProgress::Queued { attempt: 0 });
    drop(progress);
    s.reap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    s.reap();
    assert!(s.get(&name).unwrap().done);
    assert!(matches!(
        &*s.watch_step(&name).unwrap().borrow(),
        StepProgress::Finished(StepOutcome::Failed(_))
    ));
}

#[tokio::test]
async fn job_step_refused_when_the_instance_is_full() {
    let s = Scheduler::new(SchedulerConfig {
        max_unfinished_per_instance: 1,
        ..Default::default()
    });
    let (_a, _r) = s.enqueue(action("a", &[], 0)).unwrap();
    assert!(matches!(
        s.enqueue_step(step("x", &[], 0, 1)),
        Err(EnqueueError::InstanceFull { limit: 1, .. })
    ));
}
