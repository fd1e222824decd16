//! Processes left running under a directory. Actions and step commands
//! run in their own process groups, and a daemon they start (Bazel's
//! server) leaves that group for a session of its own, so neither dies
//! with its parent. At start-up the worker kills what a previous worker
//! left in its actions and steps directories (it died without cleaning
//! up: SIGKILL, OOM kill); at a step's end, what the step left in its own
//! directory.

use std::path::Path;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::{getpgid, Pid};

/// Kills the process group of every process whose working directory is
/// under `actions_dir`, logging each. Returns how many groups were killed.
pub(crate) fn kill_leftover_actions(actions_dir: &Path) -> usize {
    let killed = kill_groups_working_under(actions_dir);
    for (pgid, cwd) in &killed {
        tracing::warn!(pgid, cwd = %cwd.display(), "killing an action left running by a previous worker");
    }
    killed.len()
}

/// SIGKILLs the process group of every process (other than the worker's
/// own group) whose working directory is under `dir`; returns each group
/// killed with the working directory it was found by.
pub(crate) fn kill_groups_working_under(dir: &Path) -> Vec<(i32, std::path::PathBuf)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let own_group = getpgid(None).ok();
    let mut killed = std::collections::BTreeMap::new();
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
        if !cwd.starts_with(dir) {
            continue;
        }
        let Ok(group) = getpgid(Some(Pid::from_raw(pid))) else {
            continue;
        };
        if Some(group) == own_group || group.as_raw() <= 1 {
            continue;
        }
        if let std::collections::btree_map::Entry::Vacant(slot) = killed.entry(group.as_raw()) {
            let _ = killpg(group, Signal::SIGKILL);
            slot.insert(cwd);
        }
    }
    killed.into_iter().collect()
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
