//! Issue 8, finding 11: after a rename into the CAS or the action cache,
//! the directory holding the new name must be fsynced. Nothing in-process
//! can see an fsync, so the test runs a child (this test binary, one
//! ignored test) under strace and reads the system calls it made.

use std::path::Path;

use buildkube_reapi::Digest;
use bytes::Bytes;

use super::{ActionResultStore, BlobStore, FsActionCache, FsCas};

const CHILD_DIR: &str = "BUILDKUBE_DURABILITY_CHILD_DIR";

/// The child: one CAS write (batch path), one streamed write, one action
/// result, into the directory the parent names.
#[tokio::test]
#[ignore = "run by renames_are_followed_by_an_fsync_of_the_directory under strace"]
async fn durability_child() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    let dir = Path::new(&dir);
    let cas = FsCas::open(&dir.join("cas"), u64::MAX).await.unwrap();
    let data = Bytes::from_static(b"durable blob");
    cas.put(Digest::of_bytes(&data), data).await.unwrap();
    let streamed = Bytes::from(vec![7u8; 3 << 20]);
    let mut sink = cas.begin_write(Digest::of_bytes(&streamed)).await.unwrap();
    sink.append(0, streamed).await.unwrap();
    sink.commit().await.unwrap();
    let ac = FsActionCache::open(&dir.join("ac")).unwrap();
    ac.put("main", &Digest::of_bytes(b"action"), &Default::default())
        .await
        .unwrap();
}

#[test]
fn renames_are_followed_by_an_fsync_of_the_directory() {
    if std::process::Command::new("strace")
        .arg("-V")
        .output()
        .is_err()
    {
        eprintln!("skipping: strace is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("strace.log");
    let status = std::process::Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-e",
            "trace=rename,renameat,renameat2,openat,fsync",
        ])
        .arg("-o")
        .arg(&log)
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "storage::durability_tests::durability_child",
            "--ignored",
        ])
        .env(CHILD_DIR, dir.path())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let calls = std::fs::read_to_string(&log).unwrap();
    // Each rename into cas/ or ac/, then: the target's directory opened and
    // that descriptor fsynced.
    let lines: Vec<&str> = calls.lines().collect();
    let renames: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains("rename") && !l.contains("= -1"))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(renames.len(), 3, "{calls}");
    for at in renames {
        let target = lines[at]
            .rsplit('"')
            .nth(1)
            .expect("rename names its target");
        let parent = Path::new(target).parent().unwrap().display().to_string();
        let opened = lines[at..]
            .iter()
            .find_map(|l| {
                (l.contains("openat") && l.contains(&format!("\"{parent}\"")))
                    .then(|| l.rsplit("= ").next().unwrap().trim().to_string())
            })
            .unwrap_or_else(|| panic!("{parent} not opened after the rename:\n{calls}"));
        assert!(
            lines[at..]
                .iter()
                .any(|l| l.contains(&format!("fsync({opened})")) && l.ends_with("= 0")),
            "{parent} (fd {opened}) not fsynced after the rename:\n{calls}"
        );
    }
}
