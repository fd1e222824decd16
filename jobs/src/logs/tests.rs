use super::*;

fn key(step: &str) -> StepLogKey {
    StepLogKey {
        job_id: "job-1".into(),
        step_key: step.into(),
        attempt: 1,
    }
}

fn limits(per_step: usize, total: usize, steps: usize) -> LiveLogLimits {
    LiveLogLimits {
        per_step,
        total,
        steps,
    }
}

async fn read_all(mut follower: LogFollower) -> Vec<LogChunk> {
    let mut chunks = vec![];
    while let Some(chunk) = follower.next().await {
        chunks.push(chunk);
    }
    chunks
}

fn joined(chunks: &[LogChunk]) -> String {
    chunks
        .iter()
        .map(|c| String::from_utf8_lossy(&c.data).into_owned())
        .collect()
}

#[tokio::test]
async fn job_log_appends_are_idempotent_by_offset() {
    let logs = Arc::new(LiveLogs::default());
    let k = key("build");
    assert_eq!(logs.append(&k, "L1", 0, b"hello ").unwrap(), 6);
    // A retried call, then one overlapping what arrived.
    assert_eq!(logs.append(&k, "L1", 0, b"hello ").unwrap(), 6);
    assert_eq!(logs.append(&k, "L1", 3, b"lo world").unwrap(), 11);
    logs.finish(&k);
    let chunks = read_all(logs.follow(&k, 0)).await;
    assert_eq!(joined(&chunks), "hello world");
    assert_eq!(logs.bytes_held(), 11);
    // From the middle.
    let chunks = read_all(logs.follow(&k, 8)).await;
    assert_eq!(joined(&chunks), "rld");
    assert_eq!(chunks[0].offset, 8);
    assert_eq!(
        logs.append(&k, "L1", 11, b"late"),
        Err(LogError::Finished { key: k.clone() })
    );
}

#[tokio::test]
async fn job_log_followers_wake_on_append_and_end_on_finish() {
    let logs = Arc::new(LiveLogs::default());
    let k = key("test");
    // Followed before the step wrote anything.
    let mut follower = logs.follow(&k, 0);
    let reader = tokio::spawn(async move {
        let first = follower.next().await.unwrap();
        let rest = read_all(follower).await;
        (first, rest)
    });
    tokio::task::yield_now().await;
    logs.append(&k, "L1", 0, b"line 1\n").unwrap();
    logs.append(&k, "L1", 7, b"line 2\n").unwrap();
    logs.finish(&k);
    let (first, rest) = reader.await.unwrap();
    assert_eq!(first.offset, 0);
    assert_eq!(
        format!("{}{}", String::from_utf8_lossy(&first.data), joined(&rest)),
        "line 1\nline 2\n"
    );
}

#[tokio::test]
async fn job_log_is_bounded_per_step_and_followers_see_the_gap() {
    let logs = Arc::new(LiveLogs::new(limits(10, 1000, 10)));
    let k = key("big");
    for i in 0..5u64 {
        logs.append(&k, "L1", i * 4, format!("{i}{i}{i}\n").as_bytes())
            .unwrap();
    }
    logs.finish(&k);
    assert!(logs.bytes_held() <= 10, "{}", logs.bytes_held());
    let chunks = read_all(logs.follow(&k, 0)).await;
    assert_eq!(joined(&chunks), "333\n444\n");
    assert_eq!(chunks[0].offset, 12, "the dropped start shows as a gap");
    let too_big = vec![b'x'; MAX_APPEND_BYTES + 1];
    assert!(matches!(
        logs.append(&key("other"), "L2", 0, &too_big),
        Err(LogError::ChunkTooLarge { .. })
    ));
}

#[tokio::test]
async fn job_logs_are_bounded_in_total_and_in_steps() {
    let logs = Arc::new(LiveLogs::new(limits(100, 150, 3)));
    let (a, b, c, d) = (key("a"), key("b"), key("c"), key("d"));
    let in_time = |f| tokio::time::timeout(std::time::Duration::from_secs(5), f);
    logs.append(&a, "L", 0, &[b'a'; 100]).unwrap();
    logs.finish(&a);
    logs.append(&b, "L", 0, &[b'b'; 100]).unwrap();
    // The finished step went first.
    assert_eq!(logs.bytes_held(), 100);
    assert_eq!(logs.steps_held(), 1);
    logs.append(&c, "L", 0, &[b'c'; 60]).unwrap();
    // No finished step left: the biggest buffer loses its oldest chunk.
    assert_eq!(logs.bytes_held(), 60);
    logs.append(&d, "L", 0, b"d").unwrap();
    assert_eq!(logs.steps_held(), 3);
    // A fourth buffer makes the oldest (b) go.
    let mut follower_of_b = logs.follow(&b, 0);
    logs.append(&key("e"), "L", 0, b"e").unwrap();
    assert_eq!(logs.steps_held(), 3);
    assert_eq!(
        in_time(follower_of_b.next()).await.unwrap(),
        None,
        "b's followers end"
    );
}

#[tokio::test]
async fn job_log_restarts_when_another_lease_reruns_the_step() {
    let logs = Arc::new(LiveLogs::default());
    let k = key("flaky");
    let mut follower = logs.follow(&k, 0);
    logs.append(&k, "lost", 0, b"first worker\n").unwrap();
    let first = follower.next().await.unwrap();
    assert!(!first.restarted);
    logs.append(&k, "rerun", 0, b"second\n").unwrap();
    logs.finish(&k);
    let again = follower.next().await.unwrap();
    assert!(again.restarted);
    assert_eq!((again.offset, &again.data[..]), (0, &b"second\n"[..]));
    assert!(follower.next().await.is_none());
    assert_eq!(logs.bytes_held(), 7);
}
