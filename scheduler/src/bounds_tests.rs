//! What a client can make the scheduler hold: queues, series, operations.

use buildkube_proto::worker as wire;

use super::*;

fn platform_of(properties: &[(String, String)]) -> reapi::Platform {
    reapi::Platform {
        properties: properties
            .iter()
            .map(|(name, value)| reapi::platform::Property {
                name: name.clone(),
                value: value.clone(),
            })
            .collect(),
    }
}

fn action_on(instance: &str, tag: &str, properties: &[(String, String)]) -> NewAction {
    let command = reapi::Command {
        arguments: vec!["echo".into(), tag.into()],
        ..Default::default()
    };
    let action = reapi::Action {
        command_digest: Some(Digest::of_message(&command).to_proto()),
        platform: Some(platform_of(properties)),
        ..Default::default()
    };
    NewAction {
        instance: instance.into(),
        action_digest: Digest::of_message(&action),
        action,
        command: Arc::new(command),
        priority: 0,
    }
}

fn worker_offering(properties: &[(String, String)]) -> wire::WorkerInfo {
    wire::WorkerInfo {
        worker_id: "w".into(),
        instance_name: "main".into(),
        platform: Some(platform_of(properties)),
        concurrency: 1,
        runs_steps: false,
    }
}

const NO_WAIT: Duration = Duration::from_millis(1);

/// Worker `w` (credential `open`) reports a successful run; whether it was accepted.
fn report_success(s: &Scheduler, lease_id: &str, operation: &str) -> bool {
    let holder = LeaseHolder {
        identity: "open".into(),
        worker_id: "w".into(),
    };
    let outcome = LeaseOutcome::Ran(reapi::ActionResult::default());
    s.complete(&holder, lease_id, operation, outcome, String::new())
        .unwrap()
}

/// Issue 8, finding 7: every platform value a client sent left a queue
/// and two metric series behind forever.
#[tokio::test]
async fn finished_platforms_leave_no_queues_or_series() {
    let s = Scheduler::new(SchedulerConfig::default());
    let platforms: Vec<(String, String)> = (0..1500)
        .map(|i| ("pool".to_string(), format!("p{i}")))
        .collect();
    let worker = worker_offering(&platforms);
    let mut receivers = Vec::new();
    for (i, property) in platforms.iter().enumerate() {
        let new = action_on("main", &i.to_string(), std::slice::from_ref(property));
        receivers.push(s.enqueue(new).unwrap());
    }
    // One queue-depth series per stats entry (the server's /metrics renders them 1:1).
    assert_eq!(s.stats().queue_depth.len(), 1500);
    for _ in 0..1500 {
        let lease = s.lease(&worker, "open", NO_WAIT).await.unwrap();
        assert!(report_success(&s, &lease.lease_id, &lease.operation_name));
    }
    assert!(receivers.iter().all(|(_, r)| r.borrow().done));
    assert!(s.state.lock().unwrap().queues.is_empty());
    let idle = s.stats();
    assert!(idle.queue_depth.is_empty(), "{idle:?}");
    assert!(idle.running.is_empty(), "{idle:?}");
    assert_eq!(idle.workers_by_platform.len(), 1, "{idle:?}");
    assert_eq!(idle.outcomes.len(), 1, "{idle:?}");
}

/// A queue that empties because its action was cancelled goes too.
#[tokio::test]
async fn cancelled_actions_leave_no_queue() {
    let s = Scheduler::new(SchedulerConfig::default());
    let (name, _r) = s
        .enqueue(action_on("main", "x", &[("gpu".into(), "7".into())]))
        .unwrap();
    assert_eq!(s.stats().queue_depth.len(), 1);
    assert!(s.cancel(&name, "test"));
    assert!(s.stats().queue_depth.is_empty());
    assert!(s.stats().running.is_empty());
}

/// Issue 8, finding 6: no queue had a limit.
#[tokio::test]
async fn an_instance_holds_at_most_its_limit_of_unfinished_actions() {
    let s = Scheduler::new(SchedulerConfig {
        max_unfinished_per_instance: 2,
        ..Default::default()
    });
    let (first, _r1) = s.enqueue(action_on("main", "1", &[])).unwrap();
    let (second, _r2) = s.enqueue(action_on("main", "2", &[])).unwrap();
    // An identical action joins the one in flight: no new operation.
    let (joined, _r3) = s.enqueue(action_on("main", "1", &[])).unwrap();
    assert_eq!(joined, first);
    let err = s.enqueue(action_on("main", "3", &[])).unwrap_err();
    assert!(
        err.to_string().contains("\"main\"") && err.to_string().contains("2"),
        "{err}"
    );
    // Other instances have their own budget.
    let _r4 = s.enqueue(action_on("ci", "3", &[])).unwrap();
    // A finished action makes room (running ones still count).
    let lease = s
        .lease(&worker_offering(&[]), "open", NO_WAIT)
        .await
        .unwrap();
    assert!(s.enqueue(action_on("main", "3", &[])).is_err());
    assert!(report_success(&s, &lease.lease_id, &lease.operation_name));
    let _r5 = s.enqueue(action_on("main", "3", &[])).unwrap();
    assert!(s.enqueue(action_on("main", "4", &[])).is_err());
    // Cancelling frees a place too.
    assert!(s.cancel(&second, "test"));
    let _r6 = s.enqueue(action_on("main", "4", &[])).unwrap();
}

/// Issue 8, finding 9: the Lease names the Command by digest instead of
/// carrying it, and a finished operation lets go of its Command.
#[tokio::test]
async fn leases_carry_the_command_digest_and_finished_operations_drop_the_command() {
    let s = Scheduler::new(SchedulerConfig::default());
    let new = action_on("main", "x", &[]);
    let command = new.command.clone();
    let (name, _r) = s.enqueue(new.clone()).unwrap();
    assert_eq!(
        Arc::strong_count(&command),
        3,
        "held by the test, `new` and the operation"
    );
    let lease = s
        .lease(&worker_offering(&[]), "open", NO_WAIT)
        .await
        .unwrap();
    assert_eq!(lease.command_digest, new.action.command_digest);
    assert_eq!(
        lease.command_digest.unwrap(),
        Digest::of_message(&*command).to_proto()
    );
    assert!(report_success(&s, &lease.lease_id, &name));
    assert_eq!(Arc::strong_count(&command), 2);
}
