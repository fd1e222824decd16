use std::sync::Arc;

use super::*;

crate::record_store_conformance!(async {
    let dir = tempfile::tempdir().unwrap();
    let store = FsRecords::open(dir.path()).await.unwrap();
    (Arc::new(store) as Arc<dyn RecordStore>, dir)
});

/// Reopens the store in `dir` once the old one's thread let go of the lock.
async fn reopen(store: FsRecords, dir: &Path) -> FsRecords {
    drop(store);
    open_when_free(dir).await
}

/// Opens the store in `dir`, waiting for a dropped one's thread to let go.
async fn open_when_free(dir: &Path) -> FsRecords {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match FsRecords::open(dir).await {
            Ok(store) => return store,
            Err(e)
                if std::time::Instant::now() < deadline
                    && e.to_string().contains("another process") =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[tokio::test]
async fn records_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsRecords::open(dir.path()).await.unwrap();
    store
        .put(
            "operation",
            "main/operations/1",
            Bytes::from_static(b"queued"),
        )
        .await
        .unwrap();
    store
        .put(
            "operation",
            "main/operations/2",
            Bytes::from_static(b"leased"),
        )
        .await
        .unwrap();
    store
        .put("job", "j1", Bytes::from_static(b"running"))
        .await
        .unwrap();
    store
        .delete("operation", "main/operations/1")
        .await
        .unwrap();
    let store = reopen(store, dir.path()).await;
    assert_eq!(
        store.load_all("operation").await.unwrap(),
        vec![(
            "main/operations/2".to_string(),
            Bytes::from_static(b"leased")
        )]
    );
    assert_eq!(
        store.get("job", "j1").await.unwrap(),
        Some(Bytes::from_static(b"running"))
    );
}

#[tokio::test]
async fn a_second_server_on_the_same_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _store = FsRecords::open(dir.path()).await.unwrap();
    let err = FsRecords::open(dir.path()).await.err().unwrap().to_string();
    assert!(
        err.contains("another process") && err.contains("lock"),
        "{err}"
    );
}

#[tokio::test]
async fn a_torn_last_write_is_cut_off_and_earlier_records_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsRecords::open(dir.path()).await.unwrap();
    store
        .put("op", "kept", Bytes::from_static(b"v1"))
        .await
        .unwrap();
    store
        .put("op", "torn", Bytes::from(vec![7u8; 1000]))
        .await
        .unwrap();
    drop(store);
    let path = dir.path().join(LOG_FILE);
    let full = std::fs::metadata(&path).unwrap().len();
    // A crash in the middle of the second frame's write.
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(full - 500)
        .unwrap();
    let store = open_when_free(dir.path()).await;
    assert_eq!(
        store.load_all("op").await.unwrap(),
        vec![("kept".to_string(), Bytes::from_static(b"v1"))]
    );
    // Writing after the cut works, and survives another reopen.
    store
        .put("op", "after", Bytes::from_static(b"v2"))
        .await
        .unwrap();
    let store = reopen(store, dir.path()).await;
    assert_eq!(store.load_all("op").await.unwrap().len(), 2);
    // A flipped byte inside the last frame is caught by its checksum.
    drop(store);
    let len = std::fs::metadata(&path).unwrap().len();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, len - 1).unwrap();
    file.write_all_at(&[byte[0] ^ 0xff], len - 1).unwrap();
    drop(file);
    let store = open_when_free(dir.path()).await;
    assert_eq!(
        store.load_all("op").await.unwrap(),
        vec![("kept".to_string(), Bytes::from_static(b"v1"))]
    );
}

#[tokio::test]
async fn not_a_record_log_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(LOG_FILE), b"something else entirely").unwrap();
    let err = FsRecords::open(dir.path()).await.err().unwrap().to_string();
    assert!(
        err.contains("records.log") && err.contains("header"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_is_compacted_and_the_log_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsRecords::open(dir.path()).await.unwrap();
    let value = Bytes::from(vec![1u8; 50_000]);
    // 50 MB of puts and deletes over a live set of at most 10 records.
    for i in 0..1000u32 {
        store
            .put("op", &format!("k{}", i % 10), value.clone())
            .await
            .unwrap();
        if i % 3 == 0 {
            store
                .delete("op", &format!("k{}", (i + 5) % 10))
                .await
                .unwrap();
        }
    }
    let size = std::fs::metadata(dir.path().join(LOG_FILE)).unwrap().len();
    assert!(size < 2 * COMPACT_AT_LEAST, "log grew to {size} bytes");
    let before = store.load_all("op").await.unwrap();
    assert!(!before.is_empty());
    let store = reopen(store, dir.path()).await;
    assert_eq!(store.load_all("op").await.unwrap(), before);
    assert!(!dir.path().join(COMPACT_FILE).exists());
}
