use buildkube_proto::longrunning::operation;
use buildkube_proto::worker as wire;
use prost::Message;

use super::*;
use crate::operation::any;

fn platform(props: &[(&str, &str)]) -> reapi::Platform {
    reapi::Platform {
        properties: props
            .iter()
            .map(|(n, v)| reapi::platform::Property {
                name: n.to_string(),
                value: v.to_string(),
            })
            .collect(),
    }
}

/// A worker offering `props` that runs actions and CI steps.
pub(crate) fn worker(id: &str, props: &[(&str, &str)]) -> wire::WorkerInfo {
    wire::WorkerInfo {
        worker_id: id.into(),
        instance_name: "main".into(),
        platform: Some(platform(props)),
        concurrency: 1,
        runs_steps: true,
    }
}

pub(crate) fn action(tag: &str, props: &[(&str, &str)], priority: i32) -> NewAction {
    let command = reapi::Command {
        arguments: vec!["echo".into(), tag.into()],
        ..Default::default()
    };
    let action = reapi::Action {
        command_digest: Some(Digest::of_message(&command).to_proto()),
        platform: Some(platform(props)),
        ..Default::default()
    };
    NewAction {
        instance: "main".into(),
        action_digest: Digest::of_message(&action),
        action,
        command: std::sync::Arc::new(command),
        priority,
    }
}

fn ran(exit_code: i32) -> LeaseOutcome {
    LeaseOutcome::Ran(reapi::ActionResult {
        exit_code,
        ..Default::default()
    })
}

pub(crate) const NO_WAIT: Duration = Duration::from_millis(1);
/// The worker credential every test worker uses (as without auth).
pub(crate) const ID: &str = "open";

/// A scheduler with a 10 ms lease timeout whose one action was leased to
/// `w1`, and that lease expired and was reaped (the action requeued).
async fn lease_expired_on_w1() -> (
    Scheduler,
    String,
    wire::Lease,
    watch::Receiver<longrunning::Operation>,
) {
    let s = Scheduler::new(SchedulerConfig {
        lease_timeout: Duration::from_millis(10),
        ..Default::default()
    });
    let (name, receiver) = s.enqueue(action("x", &[], 0)).unwrap();
    let l1 = s.lease(&worker("w1", &[]), ID, NO_WAIT).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    s.reap();
    (s, name, l1, receiver)
}

pub(crate) fn holder(worker_id: &str) -> LeaseHolder {
    LeaseHolder {
        identity: ID.into(),
        worker_id: worker_id.into(),
    }
}

#[tokio::test]
async fn leases_by_platform_then_priority_then_fifo() {
    let s = Scheduler::new(SchedulerConfig::default());
    let (linux_late, _r1) = s.enqueue(action("a", &[("OSFamily", "Linux")], 0)).unwrap();
    let (gpu, _r2) = s.enqueue(action("b", &[("gpu", "1")], 0)).unwrap();
    let (urgent, _r3) = s.enqueue(action("c", &[], -5)).unwrap();
    let (linux_later, _r4) = s.enqueue(action("d", &[("OSFamily", "Linux")], 0)).unwrap();

    let cpu = worker("cpu", &[("OSFamily", "Linux")]);
    assert_eq!(
        s.lease(&cpu, ID, NO_WAIT).await.unwrap().operation_name,
        urgent
    );
    assert_eq!(
        s.lease(&cpu, ID, NO_WAIT).await.unwrap().operation_name,
        linux_late
    );
    assert_eq!(
        s.lease(&cpu, ID, NO_WAIT).await.unwrap().operation_name,
        linux_later
    );
    assert!(
        s.lease(&cpu, ID, NO_WAIT).await.is_none(),
        "gpu action must not go to a cpu worker"
    );
    let gpu_worker = worker("gpu", &[("gpu", "1"), ("OSFamily", "Linux")]);
    assert_eq!(
        s.lease(&gpu_worker, ID, NO_WAIT)
            .await
            .unwrap()
            .operation_name,
        gpu
    );
}

#[tokio::test]
async fn identical_in_flight_actions_merge_unless_do_not_cache() {
    let s = Scheduler::new(SchedulerConfig::default());
    let (a, _ra) = s.enqueue(action("same", &[], 0)).unwrap();
    let (b, _rb) = s.enqueue(action("same", &[], 0)).unwrap();
    assert_eq!(a, b);
    let mut uncached = action("same", &[], 0);
    uncached.action.do_not_cache = true;
    uncached.action_digest = Digest::of_message(&uncached.action);
    let (c, _rc) = s.enqueue(uncached.clone()).unwrap();
    let (d, _rd) = s.enqueue(uncached).unwrap();
    assert_ne!(c, d);
    assert_eq!(s.stats().queue_depth.values().sum::<usize>(), 3);
}

#[tokio::test]
async fn waiting_worker_wakes_when_work_arrives() {
    let s = std::sync::Arc::new(Scheduler::new(SchedulerConfig::default()));
    let s2 = s.clone();
    let waiter = tokio::spawn(async move {
        s2.lease(&worker("w", &[]), ID, Duration::from_secs(30))
            .await
    });
    tokio::task::yield_now().await;
    let (name, _r) = s.enqueue(action("x", &[], 0)).unwrap();
    let lease = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lease.unwrap().operation_name, name);
}

#[tokio::test]
async fn completion_reaches_watchers_and_counts_outcome() {
    let s = Scheduler::new(SchedulerConfig::default());
    let (name, mut updates) = s.enqueue(action("x", &[], 0)).unwrap();
    let w = worker("w", &[]);
    let lease = s.lease(&w, ID, NO_WAIT).await.unwrap();
    assert!(s
        .keep_alive(
            &w,
            ID,
            &[wire::LeaseProgress {
                lease_id: lease.lease_id.clone(),
                stage: wire::Stage::Executing as i32,
                since: None
            }]
        )
        .unwrap()
        .is_empty());
    let stamp = |s: i64| {
        Some(prost_types::Timestamp {
            seconds: s,
            nanos: 0,
        })
    };
    let result = reapi::ActionResult {
        execution_metadata: Some(reapi::ExecutedActionMetadata {
            input_fetch_completed_timestamp: stamp(1),
            execution_completed_timestamp: stamp(2),
            output_upload_completed_timestamp: stamp(3),
            ..Default::default()
        }),
        ..Default::default()
    };
    assert!(s
        .complete(
            &holder("w"),
            &lease.lease_id,
            &name,
            LeaseOutcome::Ran(result),
            String::new()
        )
        .unwrap());
    updates.changed().await.unwrap();
    let op = updates.borrow().clone();
    assert!(op.done);
    let Some(operation::Result::Response(any)) = op.result else {
        panic!("no response")
    };
    let response = reapi::ExecuteResponse::decode(any.value.as_slice()).unwrap();
    assert!(response
        .result
        .unwrap()
        .execution_metadata
        .unwrap()
        .queued_timestamp
        .is_some());
    assert_eq!(s.stats().outcomes[&Outcome::Success], 1);
    let timeline = s.summary_of(&name).unwrap().timeline;
    assert!(
        timeline.windows(2).all(|w| w[0].at_ms <= w[1].at_ms),
        "timeline is in time order"
    );
    let mut events: Vec<String> = timeline.into_iter().map(|e| e.event).collect();
    // The worker's stamps (seconds 1..3 here) sort first; the server's follow.
    let worker_events: Vec<String> = events.drain(..3).collect();
    assert_eq!(
        worker_events,
        ["inputs_fetched", "executed", "outputs_uploaded"]
    );
    assert_eq!(events, ["queued", "assigned", "executing", "completed"]);
}

#[tokio::test]
async fn expired_lease_is_requeued_then_fails_after_max_attempts() {
    let s = Scheduler::new(SchedulerConfig {
        lease_timeout: Duration::from_millis(10),
        max_attempts: 2,
        ..Default::default()
    });
    let (name, _r) = s.enqueue(action("x", &[], 0)).unwrap();
    let l1 = s.lease(&worker("w1", &[]), ID, NO_WAIT).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    s.reap();
    let l2 = s.lease(&worker("w2", &[]), ID, NO_WAIT).await.unwrap();
    assert_eq!(l2.operation_name, name);
    assert_eq!(l2.attempt, 2);
    assert_ne!(l1.lease_id, l2.lease_id);
    // The first worker is told to abandon its stale lease.
    assert_eq!(
        s.keep_alive(
            &worker("w1", &[]),
            ID,
            &[wire::LeaseProgress {
                lease_id: l1.lease_id.clone(),
                stage: 0,
                since: None
            }]
        )
        .unwrap(),
        vec![l1.lease_id.clone()]
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    s.reap();
    let op = s.get(&name).unwrap();
    assert!(op.done);
    let Some(operation::Result::Response(any)) = op.result else {
        panic!()
    };
    let status = reapi::ExecuteResponse::decode(any.value.as_slice())
        .unwrap()
        .status
        .unwrap();
    assert_eq!(status.code, tonic::Code::Aborted as i32);
    assert!(status.message.contains("w1, w2"), "{}", status.message);
}

#[tokio::test]
async fn late_result_of_expired_lease_is_accepted_once() {
    let (s, name, l1, _r) = lease_expired_on_w1().await;
    assert!(s
        .complete(&holder("w1"), &l1.lease_id, &name, ran(0), String::new())
        .unwrap());
    assert!(
        s.lease(&worker("w2", &[]), ID, NO_WAIT).await.is_none(),
        "requeued copy must be withdrawn"
    );
    assert!(
        !s.complete(&holder("w1"), &l1.lease_id, &name, ran(0), String::new())
            .unwrap(),
        "second report is a duplicate"
    );
    assert_eq!(s.stats().outcomes[&Outcome::Success], 1);
}

#[tokio::test]
async fn cancel_queued_and_running() {
    let s = Scheduler::new(SchedulerConfig::default());
    let (queued, _r1) = s.enqueue(action("q", &[("never", "matched")], 0)).unwrap();
    assert!(s.cancel(&queued, "test"));
    assert!(s.get(&queued).unwrap().done);
    assert_eq!(s.stats().queue_depth.values().sum::<usize>(), 0);

    let (running, _r2) = s.enqueue(action("r", &[], 0)).unwrap();
    let w = worker("w", &[]);
    let lease = s.lease(&w, ID, NO_WAIT).await.unwrap();
    assert!(s.cancel(&running, "test"));
    let progress = [wire::LeaseProgress {
        lease_id: lease.lease_id.clone(),
        stage: 2,
        since: None,
    }];
    assert_eq!(
        s.keep_alive(&w, ID, &progress).unwrap(),
        vec![lease.lease_id]
    );
    assert!(!s.cancel("operations/unknown", "test"));
}

#[tokio::test]
async fn unwatched_operation_is_cancelled_after_grace() {
    let s = Scheduler::new(SchedulerConfig {
        orphan_timeout: Duration::from_millis(10),
        ..Default::default()
    });
    let (name, receiver) = s.enqueue(action("x", &[], 0)).unwrap();
    s.reap();
    assert!(!s.get(&name).unwrap().done);
    drop(receiver);
    s.reap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    s.reap();
    assert!(s.get(&name).unwrap().done);
    assert_eq!(s.stats().outcomes[&Outcome::Cancelled], 1);
}

#[tokio::test]
async fn stats_count_queue_running_and_workers() {
    let s = Scheduler::new(SchedulerConfig::default());
    let (_a, _r1) = s.enqueue(action("a", &[], 0)).unwrap();
    let (_b, _r2) = s.enqueue(action("b", &[], 0)).unwrap();
    let (_c, _r3) = s.enqueue(action("c", &[("gpu", "1")], 0)).unwrap();
    let _lease = s.lease(&worker("w1", &[]), ID, NO_WAIT).await.unwrap();
    assert!(s
        .lease(&worker("w2", &[("x", "y")]), ID, NO_WAIT)
        .await
        .is_some());
    let stats = s.stats();
    assert_eq!(stats.queue_depth[&("main".to_string(), String::new())], 0);
    assert_eq!(
        stats.queue_depth[&("main".to_string(), "gpu=1".to_string())],
        1
    );
    assert_eq!(stats.running[&("main".to_string(), String::new())], 2);
    assert_eq!((stats.workers_connected, stats.workers_busy), (2, 2));
    let idle = worker("w3", &[("x", "y")]);
    assert!(s.lease(&idle, ID, NO_WAIT).await.is_none());
    let by_platform = s.stats().workers_by_platform;
    assert_eq!(by_platform[&("main".to_string(), String::new())], (1, 1));
    assert_eq!(
        by_platform[&("main".to_string(), "x=y".to_string())],
        (2, 1)
    );
}

#[tokio::test]
async fn error_carries_partial_result_and_drain_kill_requeues() {
    let s = Scheduler::new(SchedulerConfig::default());
    let (name, _r) = s.enqueue(action("x", &[], 0)).unwrap();
    let l1 = s.lease(&worker("w1", &[]), ID, NO_WAIT).await.unwrap();
    let gave_back = rpc::Status {
        code: tonic::Code::Unavailable as i32,
        message: "worker draining".into(),
        details: vec![],
    };
    assert!(s
        .complete(
            &holder("w1"),
            &l1.lease_id,
            &name,
            LeaseOutcome::Failed(gave_back),
            String::new()
        )
        .unwrap());
    assert!(
        !s.get(&name).unwrap().done,
        "a drained action goes back to the queue"
    );
    let l2 = s.lease(&worker("w2", &[]), ID, NO_WAIT).await.unwrap();
    assert_eq!(l2.operation_name, name);

    let partial = reapi::ActionResult {
        exit_code: -1,
        stdout_raw: bytes::Bytes::from_static(b"so far"),
        ..Default::default()
    };
    let timeout = rpc::Status {
        code: tonic::Code::DeadlineExceeded as i32,
        message: "action timed out after 2s".into(),
        details: vec![any(
            "build.bazel.remote.execution.v2.ActionResult",
            &partial,
        )],
    };
    assert!(s
        .complete(
            &holder("w2"),
            &l2.lease_id,
            &name,
            LeaseOutcome::Failed(timeout),
            String::new()
        )
        .unwrap());
    let Some(operation::Result::Response(any)) = s.get(&name).unwrap().result else {
        panic!()
    };
    let response = reapi::ExecuteResponse::decode(any.value.as_slice()).unwrap();
    assert_eq!(
        response.status.unwrap().code,
        tonic::Code::DeadlineExceeded as i32
    );
    assert_eq!(response.result.unwrap().stdout_raw.as_ref(), b"so far");
}

#[tokio::test]
async fn only_the_lease_holder_may_report_on_a_lease() {
    let s = Scheduler::new(SchedulerConfig::default());
    let (name, _r) = s.enqueue(action("x", &[], 0)).unwrap();
    let w1 = worker("w1", &[]);
    let lease = s.lease(&w1, ID, NO_WAIT).await.unwrap();
    let progress = [wire::LeaseProgress {
        lease_id: lease.lease_id.clone(),
        stage: 2,
        since: None,
    }];
    // Another worker id, or the same id under another credential.
    assert!(s.keep_alive(&worker("w2", &[]), ID, &progress).is_err());
    assert!(s.keep_alive(&w1, "other-pool", &progress).is_err());
    let stranger = LeaseHolder {
        identity: "other-pool".into(),
        worker_id: "w1".into(),
    };
    for (who, lease_id) in [
        (&holder("w2"), lease.lease_id.as_str()),
        (&stranger, lease.lease_id.as_str()),
        (&holder("w1"), "made-up"),
        (&holder("w2"), "made-up"),
    ] {
        let refused = s
            .complete(who, lease_id, &name, ran(0), String::new())
            .unwrap_err();
        assert_eq!(refused.operation, name);
    }
    assert!(!s.get(&name).unwrap().done, "no forged result was accepted");
    assert!(s
        .complete(&holder("w1"), &lease.lease_id, &name, ran(0), String::new())
        .unwrap());
    assert!(s.get(&name).unwrap().done);
    // Its lease ended: a repeat is a duplicate, a stranger still refused.
    assert!(!s
        .complete(&holder("w1"), &lease.lease_id, &name, ran(0), String::new())
        .unwrap());
    assert!(s
        .complete(&holder("w2"), &lease.lease_id, &name, ran(0), String::new())
        .is_err());
}

#[tokio::test]
async fn late_result_is_accepted_only_from_the_expired_lease_holder() {
    let (s, name, l1, _r) = lease_expired_on_w1().await;
    assert!(s
        .complete(&holder("w2"), &l1.lease_id, &name, ran(0), String::new())
        .is_err());
    assert!(!s.get(&name).unwrap().done);
    assert!(s
        .complete(&holder("w1"), &l1.lease_id, &name, ran(0), String::new())
        .unwrap());
}

#[test]
fn operation_names_carry_the_instance() {
    let s = Scheduler::new(SchedulerConfig::default());
    let (name, _r) = s.enqueue(action("x", &[], 0)).unwrap();
    assert!(name.starts_with("main/operations/"), "{name}");
    assert_eq!(instance_of_operation(&name), Some("main"));
    let id = name.rsplit('/').next().unwrap();
    assert_eq!(s.summary_by_id(id).unwrap().name, name);
}
