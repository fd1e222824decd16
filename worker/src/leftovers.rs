//! Processes left behind by a previous worker that died without cleaning up
//! (SIGKILL, OOM kill). Actions run in their own process groups, so they
//! outlive the worker; at start-up the worker finds those still working in
//! its actions directory and kills their groups before reusing it.

use std::path::Path;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::{getpgid, Pid};

/// Kills the process group of every process whose working directory is
/// under `actions_dir`. Returns how many groups were killed.
pub(crate) fn kill_leftover_actions(actions_dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let own_group = getpgid(None).ok();
    let mut killed = std::collections::BTreeSet::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cwd) = std::fs::read_link(entry.path().join("cwd")) else {
            continue;
        };
        if !cwd.starts_with(actions_dir) {
            continue;
        }
        let Ok(group) = getpgid(Some(Pid::from_raw(pid))) else {
            continue;
        };
        if Some(group) == own_group || group.as_raw() <= 1 {
            continue;
        }
        if killed.insert(group.as_raw()) {
            tracing::warn!(pgid = group.as_raw(), cwd = %cwd.display(), "killing an action left running by a previous worker");
            let _ = killpg(group, Signal::SIGKILL);
        }
    }
    killed.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    #[test]
    fn kills_groups_working_under_the_directory_only() {
        let dir = tempfile::tempdir().unwrap();
        let actions = dir.path().join("actions");
        let inside = actions.join("a1/root");
        std::fs::create_dir_all(&inside).unwrap();
        let mut orphan = std::process::Command::new("sh")
            .args(["-c", "sleep 300 & exec sleep 300"])
            .current_dir(&inside)
            .process_group(0)
            .spawn()
            .unwrap();
        let mut bystander = std::process::Command::new("sleep")
            .arg("300")
            .current_dir(dir.path())
            .process_group(0)
            .spawn()
            .unwrap();
        // spawn() returns after exec, so the shell's cwd is already set; killing
        // its group also takes the background sleep, forked or not yet.
        assert_eq!(kill_leftover_actions(&actions), 1);
        let status = orphan.wait().unwrap();
        assert!(!status.success());
        assert!(
            bystander.try_wait().unwrap().is_none(),
            "a process outside the directory is left alone"
        );
        bystander.kill().unwrap();
        bystander.wait().unwrap();
    }
}
