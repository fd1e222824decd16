//! A scheduler restored from its journal after a restart, on the data-dir
//! record store (the server-level tests in `tests/tests/it/restart.rs` also
//! run it on PostgreSQL).

use std::path::Path;
use std::sync::Arc;

use buildkube_proto::reapi;
use buildkube_proto::worker as wire;
use buildkube_records::{FsRecords, RecordStore};
use prost::Message;

use super::*;

const ID: &str = "open";
const NO_WAIT: Duration = Duration::from_millis(1);

fn worker(id: &str) -> wire::WorkerInfo {
    wire::WorkerInfo {
        worker_id: id.into(),
        instance_name: "main".into(),
        platform: None,
        concurrency: 1,
        runs_steps: false,
    }
}

fn holder(id: &str) -> LeaseHolder {
    LeaseHolder {
        identity: ID.into(),
        worker_id: id.into(),
    }
}

fn action(tag: &str, priority: i32) -> NewAction {
    let command = reapi::Command {
        arguments: vec!["echo".into(), tag.into()],
        ..Default::default()
    };
    let action = reapi::Action {
        command_digest: Some(Digest::of_message(&command).to_proto()),
        ..Default::default()
    };
    NewAction {
        instance: "main".into(),
        action_digest: Digest::of_message(&action),
        action,
        command: Arc::new(command),
        priority,
    }
}

fn ran(stdout: &'static [u8]) -> LeaseOutcome {
    LeaseOutcome::Ran(reapi::ActionResult {
        stdout_raw: stdout.into(),
        ..Default::default()
    })
}

/// Opens the data-dir records in `dir`, waiting for a dropped scheduler's
/// journal to let go of them (as a restarted server process would find them).
async fn records(dir: &Path) -> Arc<dyn RecordStore> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match FsRecords::open(dir).await {
            Ok(store) => return Arc::new(store),
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
}

async fn restored(dir: &Path, config: SchedulerConfig) -> Scheduler {
    Scheduler::restore(config, records(dir).await, |i| i == "main")
        .await
        .unwrap()
}

#[tokio::test]
async fn queued_and_leased_operations_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = restored(dir.path(), SchedulerConfig::default()).await;
    let (finished, _) = s.enqueue(action("finished", 0)).unwrap();
    let done_lease = s.lease(&worker("w0"), ID, NO_WAIT).await.unwrap();
    assert!(s
        .complete(
            &holder("w0"),
            &done_lease.lease_id,
            &finished,
            ran(b"0"),
            String::new()
        )
        .unwrap());
    let (running, _) = s.enqueue(action("running", 0)).unwrap();
    let lease = s.lease(&worker("w1"), ID, NO_WAIT).await.unwrap();
    assert_eq!(lease.operation_name, running);
    let (first, _) = s.enqueue(action("first", 5)).unwrap();
    let (second, _) = s.enqueue(action("second", 5)).unwrap();
    let (urgent, _) = s.enqueue(action("urgent", -1)).unwrap();
    s.journal_written().await.unwrap();
    drop(s);

    let s = restored(dir.path(), SchedulerConfig::default()).await;
    // Every unfinished operation is known again, in the stage it had.
    let stage = |name: &str| {
        let op = s.get(name).unwrap_or_else(|| panic!("{name} not restored"));
        assert!(!op.done, "{name}");
        let metadata =
            reapi::ExecuteOperationMetadata::decode(op.metadata.unwrap().value.as_slice()).unwrap();
        execution_stage::Value::try_from(metadata.stage).unwrap()
    };
    assert_eq!(stage(&running), execution_stage::Value::Executing);
    for queued in [&first, &second, &urgent] {
        assert_eq!(stage(queued), execution_stage::Value::Queued);
    }
    let mut watch_running = s.watch(&running).unwrap();
    // The finished one is not restored, and what is said of it is true.
    assert!(s.get(&finished).is_none());
    let said = s.finished_before_restart(&finished).unwrap();
    assert!(
        said.contains("finished before the server restarted")
            && said.contains("exited with code 0"),
        "{said}"
    );
    assert!(s.finished_before_restart(&running).is_none());
    // Merge keys are back: the same action again joins its operation.
    assert_eq!(s.enqueue(action("second", 5)).unwrap().0, second);

    // The worker that kept running through the restart keeps its lease
    // alive and completes it; the result reaches the operation's watchers.
    let progress = [wire::LeaseProgress {
        lease_id: lease.lease_id.clone(),
        stage: wire::Stage::Executing as i32,
        since: None,
    }];
    assert!(s
        .keep_alive(&worker("w1"), ID, &progress)
        .unwrap()
        .is_empty());
    // Nobody else may report on it.
    assert!(s
        .complete(
            &holder("intruder"),
            &lease.lease_id,
            &running,
            ran(b"x"),
            String::new()
        )
        .is_err());
    assert!(s
        .complete(
            &holder("w1"),
            &lease.lease_id,
            &running,
            ran(b"ran through"),
            String::new()
        )
        .unwrap());
    let done = watch_running.wait_for(|op| op.done).await.unwrap().clone();
    let Some(longrunning::operation::Result::Response(any)) = done.result else {
        panic!("{done:?}")
    };
    let response = reapi::ExecuteResponse::decode(any.value.as_slice()).unwrap();
    assert_eq!(response.result.unwrap().stdout_raw, &b"ran through"[..]);

    // Queued work runs in its old order: priority, then arrival.
    for expected in [&urgent, &first, &second] {
        let next = s.lease(&worker("w2"), ID, NO_WAIT).await.unwrap();
        assert_eq!(&next.operation_name, expected);
    }
    assert!(s.lease(&worker("w2"), ID, NO_WAIT).await.is_none());
    // New operations queue behind the restored ones' order numbers.
    let (later, _) = s.enqueue(action("later", 5)).unwrap();
    assert!(s.get(&later).is_some());
    s.journal_written().await.unwrap();
    drop(s);

    // After another restart: the completed one is a tombstone, the three
    // leased to w2 and the new one are unfinished.
    let s = restored(dir.path(), SchedulerConfig::default()).await;
    assert!(s.get(&running).is_none());
    assert!(s.finished_before_restart(&running).is_some());
    for name in [&urgent, &first, &second, &later] {
        assert!(s.get(name).is_some(), "{name}");
    }
    assert_eq!(s.stats().queue_depth.values().sum::<usize>(), 1);
}

#[tokio::test]
async fn a_restored_lease_whose_worker_never_returns_is_requeued() {
    let dir = tempfile::tempdir().unwrap();
    let config = SchedulerConfig {
        lease_timeout: Duration::from_millis(50),
        ..Default::default()
    };
    let s = restored(dir.path(), config.clone()).await;
    let (name, _) = s.enqueue(action("lost", 0)).unwrap();
    s.lease(&worker("gone"), ID, NO_WAIT).await.unwrap();
    s.journal_written().await.unwrap();
    drop(s);
    let s = restored(dir.path(), config).await;
    // The deadline is fresh: not expired at once.
    s.reap();
    assert!(s.lease(&worker("w2"), ID, NO_WAIT).await.is_none());
    tokio::time::sleep(Duration::from_millis(80)).await;
    s.reap();
    let lease = s.lease(&worker("w2"), ID, NO_WAIT).await.unwrap();
    assert_eq!(lease.operation_name, name);
    assert_eq!(lease.attempt, 2);
}

#[tokio::test]
async fn operations_of_instances_no_longer_served_stay_in_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let s = restored(dir.path(), SchedulerConfig::default()).await;
    let (name, _) = s.enqueue(action("kept", 0)).unwrap();
    s.journal_written().await.unwrap();
    drop(s);
    let s = Scheduler::restore(
        SchedulerConfig::default(),
        records(dir.path()).await,
        |_| false,
    )
    .await
    .unwrap();
    assert!(s.get(&name).is_none());
    drop(s);
    assert!(restored(dir.path(), SchedulerConfig::default())
        .await
        .get(&name)
        .is_some());
}
