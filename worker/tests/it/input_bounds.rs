//! Issue 8: what one leased action may make a worker hold or do before it
//! runs (findings 8 and 9).

use std::sync::atomic::Ordering;

use super::*;

/// A tree of `levels` directories, each holding its child twice, with one
/// file at the bottom: a few hundred bytes of messages for 2^levels - 1
/// directories.
fn doubling_tree(state: &State, levels: usize) -> Digest {
    let mut current = state.put_message(&reapi::Directory {
        files: vec![file("leaf.txt", state.put("leaf\n"), false)],
        ..Default::default()
    });
    for _ in 1..levels {
        current = state.put_message(&reapi::Directory {
            directories: ["a", "b"]
                .iter()
                .map(|name| reapi::DirectoryNode {
                    name: name.to_string(),
                    digest: Some(current.to_proto()),
                })
                .collect(),
            ..Default::default()
        });
    }
    current
}

/// Finding 8: 6 KB of Directory messages made a worker create 8,191
/// directories and 32,764 links.
#[tokio::test]
async fn input_trees_beyond_the_limits_are_refused_before_anything_is_created() {
    let server = FakeServer::start().await;
    let mut worker = start_worker(&server, &["--max-input-directories=100"]).await;
    let (lease, _) = enqueue(
        &server.state,
        Spec {
            script: "echo ran > ran.txt",
            input_root: Some(doubling_tree(&server.state, 12)),
            ..Default::default()
        },
    );
    let completed = server.state.wait_completed(1, WAIT).await;
    let (complete, _) = &completed[0];
    assert_eq!(complete.lease_id, lease);
    let error = error_of(complete);
    assert_eq!(error.code, tonic::Code::InvalidArgument as i32, "{error:?}");
    assert!(
        error.message.contains("--max-input-directories=100"),
        "{}",
        error.message
    );
    // Stopped while planning: not one input file was fetched.
    assert_eq!(
        buildkube_worker_cache_misses(&worker).await,
        0,
        "nothing was materialized"
    );
    worker.drain().await.unwrap();
}

async fn buildkube_worker_cache_misses(worker: &Running) -> u64 {
    let (_, metrics) = http_get(worker.http, "/metrics").await;
    metrics
        .lines()
        .find(|l| l.starts_with(buildkube_worker::METRIC_CACHE_MISSES))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .expect("cache misses metric")
}

/// Finding 8: fetching inputs was not covered by the action timeout.
#[tokio::test]
async fn inputs_slower_than_the_timeout_end_deadline_exceeded_and_stop_fetching() {
    let server = FakeServer::start().await;
    let mut worker = start_worker(&server, &[]).await;
    let slow = server.state.put("a blob the CAS never delivers\n");
    server.state.stalled.lock().unwrap().insert(slow);
    let root = server.state.put_message(&reapi::Directory {
        files: vec![file("slow.txt", slow, false)],
        ..Default::default()
    });
    let started = std::time::Instant::now();
    enqueue(
        &server.state,
        Spec {
            script: "cat slow.txt",
            input_root: Some(root),
            timeout_secs: 1,
            ..Default::default()
        },
    );
    let completed = server.state.wait_completed(1, WAIT).await;
    let error = error_of(&completed[0].0);
    assert_eq!(
        error.code,
        tonic::Code::DeadlineExceeded as i32,
        "{error:?}"
    );
    assert!(
        error.message.contains("fetching the inputs"),
        "{}",
        error.message
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    // The fetch was dropped with its call: nothing keeps reading the CAS.
    let state = server.state.clone();
    wait_for(move || state.reads_in_flight.load(Ordering::SeqCst) == 0).await;
    worker.drain().await.unwrap();
}

/// Finding 9: the lease names the Command by digest; the worker reads it
/// from the CAS, and refuses one beyond its limit before reading it.
#[tokio::test]
async fn commands_come_from_the_cas_within_the_message_limit() {
    let server = FakeServer::start().await;
    let mut worker = start_worker(&server, &["--max-message-blob-size=200"]).await;
    let (small, _) = enqueue(&server.state, Spec::default());
    let big_script = format!("echo {}", "x".repeat(300));
    let (big, _) = enqueue(
        &server.state,
        Spec {
            script: &big_script,
            ..Default::default()
        },
    );
    let completed = server.state.wait_completed(2, WAIT).await;
    let by_lease = |id: &str| &completed.iter().find(|(c, _)| c.lease_id == id).unwrap().0;
    assert_eq!(result_of(by_lease(&small)).exit_code, 0);
    let error = error_of(by_lease(&big));
    assert_eq!(error.code, tonic::Code::InvalidArgument as i32, "{error:?}");
    assert!(
        error.message.contains("--max-message-blob-size"),
        "{}",
        error.message
    );
    worker.drain().await.unwrap();
}
