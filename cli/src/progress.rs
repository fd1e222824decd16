//! A job's progress on stderr: one line rewritten in place on a terminal,
//! a line per change otherwise (CI logs, pipes).

use std::io::IsTerminal;

use buildkube_proto::jobs as api;

/// Shows a job's progress as it changes.
pub(crate) struct Progress {
    terminal: bool,
    last: String,
}

impl Progress {
    pub(crate) fn new() -> Progress {
        Progress {
            terminal: std::io::stderr().is_terminal(),
            last: String::new(),
        }
    }

    /// Shows `job` if its summary changed.
    pub(crate) fn show(&mut self, job: &api::Job) {
        let line = summary(job);
        if line == self.last {
            return;
        }
        if self.terminal {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
        self.last = line;
    }

    /// Ends the in-place line.
    pub(crate) fn done(&mut self) {
        if self.terminal && !self.last.is_empty() {
            eprintln!();
        }
        self.last.clear();
    }
}

/// The state's name as the API spells it, without the prefix.
pub(crate) fn job_state(job: &api::Job) -> &'static str {
    match job.state() {
        api::JobState::Unspecified => "UNKNOWN",
        api::JobState::Queued => "QUEUED",
        api::JobState::Running => "RUNNING",
        api::JobState::Succeeded => "SUCCEEDED",
        api::JobState::Failed => "FAILED",
        api::JobState::Cancelled => "CANCELLED",
    }
}

/// The step state's name.
pub(crate) fn step_state(step: &api::JobStep) -> &'static str {
    match step.state() {
        api::StepState::Unspecified => "unknown",
        api::StepState::Waiting => "waiting",
        api::StepState::Queued => "queued",
        api::StepState::Running => "running",
        api::StepState::Succeeded => "passed",
        api::StepState::Failed => "failed",
        api::StepState::Skipped => "skipped",
        api::StepState::Cancelled => "cancelled",
    }
}

/// `job 1b2c… RUNNING 1/3 steps done; build running on w1; test queued`.
pub(crate) fn summary(job: &api::Job) -> String {
    let done = job
        .steps
        .iter()
        .filter(|s| {
            matches!(
                s.state(),
                api::StepState::Succeeded
                    | api::StepState::Failed
                    | api::StepState::Skipped
                    | api::StepState::Cancelled
            )
        })
        .count();
    let mut line = format!(
        "job {} {} {done}/{} steps done",
        job.id,
        job_state(job),
        job.steps.len()
    );
    for step in &job.steps {
        match step.state() {
            api::StepState::Running => {
                line.push_str(&format!("; {} running", step.key));
                if let Some(worker) = step.workers.last() {
                    line.push_str(&format!(" on {worker}"));
                }
            }
            api::StepState::Queued => line.push_str(&format!("; {} queued", step.key)),
            api::StepState::Failed => line.push_str(&format!("; {} failed", step.key)),
            _ => {}
        }
    }
    if !job.message.is_empty() {
        line.push_str(&format!(": {}", job.message));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_progress_names_running_and_failed_steps() {
        let step = |key: &str, state: api::StepState, workers: &[&str]| api::JobStep {
            key: key.into(),
            state: state as i32,
            workers: workers.iter().map(|w| w.to_string()).collect(),
            ..Default::default()
        };
        let job = api::Job {
            id: "j1".into(),
            state: api::JobState::Running as i32,
            steps: vec![
                step(":pipeline", api::StepState::Succeeded, &["w0"]),
                step("build", api::StepState::Running, &["w0", "w1"]),
                step("test", api::StepState::Waiting, &[]),
            ],
            ..Default::default()
        };
        assert_eq!(
            summary(&job),
            "job j1 RUNNING 1/3 steps done; build running on w1"
        );
    }
}
