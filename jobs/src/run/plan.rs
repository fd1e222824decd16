//! The decisions of a job, without I/O: which steps may start, what an
//! attempt's end means for its step (passed, rerun, failed), which steps a
//! failure skips, and the job's outcome. The driver applies them.

use buildkube_reapi::Digest;

use super::record::{
    now_ms, ArtifactRecord, JobRecord, JobState, StepEvent, StepRecord, StepState,
    PIPELINE_STEP_KEY,
};
use crate::pipeline::{AttemptFailure, Pipeline, Retry};

/// How an attempt of a step ended, as the scheduler reported it.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptEnd {
    /// A worker ran the step to the end (whatever its exit code).
    Ran(RanAttempt),
    /// The step could not run: workers lost beyond its retries, refused,
    /// or the operation was cancelled.
    Failed {
        /// Why, naming the workers tried when they were lost.
        message: String,
        /// The operation was cancelled.
        cancelled: bool,
    },
}

/// What a worker reported for an attempt that ran.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RanAttempt {
    /// The commands' exit code; -1 when they did not exit by themselves
    /// (timeout, signal, or a failure before them: checkout, hooks).
    pub exit_code: i32,
    /// The worker's explanation, if any.
    pub message: String,
    /// The whole log in the CAS.
    pub log: Option<Digest>,
    /// Files kept.
    pub artifacts: Vec<ArtifactRecord>,
    /// The commit checked out.
    pub commit: Option<String>,
    /// PIPELINE: the pipeline file in the CAS.
    pub pipeline_file: Option<Digest>,
    /// The worker's phases (checkout, hooks, command, upload).
    pub phases: Vec<StepEvent>,
    /// The worker that ran it.
    pub worker: Option<String>,
}

/// What happens to a step after an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterAttempt {
    /// It passed.
    Passed,
    /// Its retry rules allow another attempt.
    Rerun,
    /// It failed for good.
    Failed,
    /// It was cancelled.
    Cancelled,
}

/// Records the end of `step`'s current attempt and decides what follows,
/// under the step's `retry` rules.
pub fn end_attempt(step: &mut StepRecord, end: AttemptEnd, retry: &Retry) -> AfterAttempt {
    let now = now_ms();
    match end {
        AttemptEnd::Ran(ran) => {
            step.exit_code = Some(ran.exit_code);
            step.log = ran.log;
            step.artifacts = ran.artifacts;
            if let Some(attempt) = step.current_mut() {
                attempt.log = ran.log;
                attempt.ended = true;
                if let Some(worker) = &ran.worker {
                    if attempt.workers.last() != Some(worker) {
                        attempt.workers.push(worker.clone());
                    }
                }
                attempt.timeline.extend(ran.phases);
                attempt.timeline.push(StepEvent {
                    name: if ran.exit_code < 0 {
                        "stopped".to_string()
                    } else {
                        format!("exited {}", ran.exit_code)
                    },
                    start_ms: now,
                    end_ms: None,
                    worker: ran.worker.clone(),
                });
            }
            if ran.exit_code == 0 {
                step.state = StepState::Succeeded;
                step.message.clear();
                return AfterAttempt::Passed;
            }
            let failure = if ran.exit_code < 0 {
                AttemptFailure::TimedOut
            } else {
                AttemptFailure::Exited(ran.exit_code)
            };
            let allowed = retry.reruns_allowed(failure);
            // -1: the commands never exited by themselves: the timeout, a
            // signal, or a failure before them (checkout, a hook), which
            // the worker's message names.
            let what = if ran.exit_code < 0 && ran.message.is_empty() {
                "stopped before its commands exited".to_string()
            } else if ran.exit_code < 0 {
                "did not complete".to_string()
            } else {
                format!("exited with code {}", ran.exit_code)
            };
            let detail = if ran.message.is_empty() {
                String::new()
            } else {
                format!(": {}", ran.message)
            };
            if step.exit_code_reruns < allowed {
                step.exit_code_reruns += 1;
                step.message = format!(
                    "attempt {} {what}{detail}; rerun {} of {allowed}",
                    step.attempts.len(),
                    step.exit_code_reruns
                );
                return AfterAttempt::Rerun;
            }
            step.state = StepState::Failed;
            step.message = format!("attempt {} {what}{detail}", step.attempts.len());
            AfterAttempt::Failed
        }
        AttemptEnd::Failed { message, cancelled } => {
            if let Some(attempt) = step.current_mut() {
                attempt.ended = true;
                attempt.timeline.push(StepEvent {
                    name: if cancelled { "cancelled" } else { "failed" }.into(),
                    start_ms: now,
                    end_ms: None,
                    worker: None,
                });
            }
            step.message = message;
            if cancelled {
                step.state = StepState::Cancelled;
                AfterAttempt::Cancelled
            } else {
                step.state = StepState::Failed;
                AfterAttempt::Failed
            }
        }
    }
}

impl JobRecord {
    /// Adds the pipeline's steps, all waiting.
    pub fn add_pipeline_steps(&mut self, pipeline: &Pipeline) {
        for step in pipeline.steps() {
            self.steps.push(StepRecord::new(
                step.key.as_str(),
                step.depends_on.iter().map(|k| k.to_string()).collect(),
            ));
        }
    }

    /// Keys of the waiting steps whose dependencies all passed, in file order.
    pub fn ready_steps(&self) -> Vec<String> {
        self.steps
            .iter()
            .filter(|s| s.state == StepState::Waiting && s.key != PIPELINE_STEP_KEY)
            .filter(|s| {
                s.depends_on.iter().all(|d| {
                    self.step(d)
                        .is_some_and(|dep| dep.state == StepState::Succeeded)
                })
            })
            .map(|s| s.key.clone())
            .collect()
    }

    /// Skips every waiting step one of whose dependencies will not pass
    /// (failed, skipped or cancelled), transitively; returns the keys skipped.
    pub fn skip_blocked_steps(&mut self) -> Vec<String> {
        let mut skipped = Vec::new();
        loop {
            let blocked: Vec<(usize, String)> = self
                .steps
                .iter()
                .enumerate()
                .filter(|(_, s)| s.state == StepState::Waiting)
                .filter_map(|(i, s)| {
                    s.depends_on.iter().find_map(|d| {
                        let dep = self.step(d)?;
                        matches!(
                            dep.state,
                            StepState::Failed | StepState::Skipped | StepState::Cancelled
                        )
                        .then(|| (i, d.clone()))
                    })
                })
                .collect();
            if blocked.is_empty() {
                return skipped;
            }
            for (i, dependency) in blocked {
                let dep_state = self.step(&dependency).map(|s| s.state);
                let step = &mut self.steps[i];
                step.state = StepState::Skipped;
                step.message = format!(
                    "not run: step {dependency} {}",
                    match dep_state {
                        Some(StepState::Skipped) => "was skipped",
                        Some(StepState::Cancelled) => "was cancelled",
                        _ => "failed",
                    }
                );
                skipped.push(step.key.clone());
            }
        }
    }

    /// Once every step is finished, sets the job's outcome (succeeded only if
    /// every step passed; else failed, naming the failed steps); returns
    /// whether the job is finished.
    pub fn settle(&mut self) -> bool {
        if self.state.is_finished() {
            return true;
        }
        if !self.steps.iter().all(|s| s.state.is_finished()) {
            return false;
        }
        let failed: Vec<&StepRecord> = self
            .steps
            .iter()
            .filter(|s| s.state == StepState::Failed)
            .collect();
        if failed.is_empty() && self.steps.iter().all(|s| s.state == StepState::Succeeded) {
            self.finish(JobState::Succeeded, String::new());
        } else if let Some(first) = failed.first() {
            let message = if failed.len() == 1 {
                format!("step {} failed: {}", first.key, first.message)
            } else {
                format!(
                    "steps {} failed; {}: {}",
                    failed
                        .iter()
                        .map(|s| s.key.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    first.key,
                    first.message
                )
            };
            self.finish(JobState::Failed, message);
        } else {
            self.finish(JobState::Cancelled, "steps were cancelled".into());
        }
        true
    }

    /// Ends the job with `state`: every step not finished is cancelled (or,
    /// if it never started, skipped).
    pub fn finish(&mut self, state: JobState, message: String) {
        for step in &mut self.steps {
            match step.state {
                StepState::Waiting => {
                    step.state = if state == JobState::Cancelled {
                        StepState::Cancelled
                    } else {
                        StepState::Skipped
                    };
                    if step.message.is_empty() {
                        step.message = format!("not run: {message}");
                    }
                }
                StepState::Queued | StepState::Running => {
                    step.state = StepState::Cancelled;
                    step.message = format!("stopped: {message}");
                    if let Some(attempt) = step.current_mut() {
                        attempt.ended = true;
                    }
                }
                _ => {}
            }
        }
        self.state = state;
        self.message = message;
        self.finished_ms = Some(now_ms());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::record::{AttemptRecord, TriggerRecord};

    fn job(pipeline: &str) -> JobRecord {
        let mut job = JobRecord {
            id: "j".into(),
            instance: "main".into(),
            repository: "file:///r".into(),
            git_ref: "refs/heads/main".into(),
            commit: None,
            trigger: TriggerRecord {
                source: "api".into(),
                event: "run".into(),
                delivery: None,
            },
            state: JobState::Running,
            message: String::new(),
            created_ms: 0,
            finished_ms: None,
            pipeline_file: None,
            steps: vec![StepRecord::new(PIPELINE_STEP_KEY, vec![])],
            token_hashes: vec![],
        };
        job.steps[0].state = StepState::Succeeded;
        job.add_pipeline_steps(&Pipeline::from_yaml(pipeline).unwrap());
        job
    }

    fn start(job: &mut JobRecord, key: &str) {
        let step = job.step_mut(key).unwrap();
        step.state = StepState::Running;
        let attempt = step.attempts.len() as u32 + 1;
        step.attempts.push(AttemptRecord {
            attempt,
            operation: format!("op-{key}-{attempt}"),
            workers: vec!["w".into()],
            timeline: vec![],
            log: None,
            ended: false,
        });
    }

    fn exited(code: i32) -> AttemptEnd {
        AttemptEnd::Ran(RanAttempt {
            exit_code: code,
            worker: Some("w".into()),
            ..Default::default()
        })
    }

    const DIAMOND: &str = "steps:
  - { key: a, commands: [x] }
  - { key: b, commands: [x], depends_on: [a] }
  - { key: c, commands: [x], depends_on: [a] }
  - { key: d, commands: [x], depends_on: [b, c] }
  - { key: e, commands: [x] }
";

    #[test]
    fn pipeline_steps_start_once_their_dependencies_passed() {
        let mut job = job(DIAMOND);
        assert_eq!(job.ready_steps(), ["a", "e"]);
        start(&mut job, "a");
        start(&mut job, "e");
        assert!(job.ready_steps().is_empty());
        let retry = Retry::default();
        let a = job.step_mut("a").unwrap();
        assert_eq!(end_attempt(a, exited(0), &retry), AfterAttempt::Passed);
        assert_eq!(job.ready_steps(), ["b", "c"]);
        start(&mut job, "b");
        start(&mut job, "c");
        end_attempt(job.step_mut("b").unwrap(), exited(0), &retry);
        assert!(job.ready_steps().is_empty(), "d still waits for c");
        end_attempt(job.step_mut("c").unwrap(), exited(0), &retry);
        assert_eq!(job.ready_steps(), ["d"]);
        start(&mut job, "d");
        end_attempt(job.step_mut("d").unwrap(), exited(0), &retry);
        assert!(!job.settle(), "e still runs");
        end_attempt(job.step_mut("e").unwrap(), exited(0), &retry);
        assert!(job.settle());
        assert_eq!(job.state, JobState::Succeeded);
        assert!(job.finished_ms.is_some());
    }

    #[test]
    fn a_failed_pipeline_step_skips_its_dependants_transitively_and_fails_the_job() {
        let mut job = job(DIAMOND);
        start(&mut job, "a");
        start(&mut job, "e");
        let retry = Retry::default();
        assert_eq!(
            end_attempt(job.step_mut("a").unwrap(), exited(3), &retry),
            AfterAttempt::Failed
        );
        assert_eq!(job.skip_blocked_steps(), ["b", "c", "d"]);
        assert_eq!(job.step("b").unwrap().message, "not run: step a failed");
        assert_eq!(
            job.step("d").unwrap().message,
            "not run: step b was skipped"
        );
        assert!(job.ready_steps().is_empty());
        assert!(!job.settle(), "e still runs");
        end_attempt(job.step_mut("e").unwrap(), exited(0), &retry);
        assert!(job.settle());
        assert_eq!(job.state, JobState::Failed);
        assert_eq!(job.message, "step a failed: attempt 1 exited with code 3");
    }

    #[test]
    fn a_job_step_reruns_on_listed_exit_codes_up_to_its_limit() {
        let mut job = job("steps:
  - key: flaky
    commands: [x]
    retry: { worker_lost: 0, exit_codes: { codes: [75], limit: 2 } }
");
        let retry = Pipeline::from_yaml(
            "steps: [{key: flaky, commands: [x], retry: {worker_lost: 0, exit_codes: {codes: [75], limit: 2}}}]",
        )
        .unwrap()
        .steps()[0]
            .retry
            .clone();
        for rerun in 1..=2 {
            start(&mut job, "flaky");
            let step = job.step_mut("flaky").unwrap();
            assert_eq!(end_attempt(step, exited(75), &retry), AfterAttempt::Rerun);
            assert!(
                step.message.contains(&format!("rerun {rerun} of 2")),
                "{}",
                step.message
            );
        }
        start(&mut job, "flaky");
        let step = job.step_mut("flaky").unwrap();
        assert_eq!(end_attempt(step, exited(75), &retry), AfterAttempt::Failed);
        assert_eq!(step.attempts.len(), 3);
        // An unlisted code is not rerun.
        let mut other = job.clone();
        let step = other.step_mut("flaky").unwrap();
        step.exit_code_reruns = 0;
        step.state = StepState::Running;
        assert_eq!(end_attempt(step, exited(1), &retry), AfterAttempt::Failed);
        // Nor is a timeout.
        step.state = StepState::Running;
        let timed_out = AttemptEnd::Ran(RanAttempt {
            exit_code: -1,
            message: "the step timed out after 60s (the commands were running)".into(),
            ..Default::default()
        });
        assert_eq!(end_attempt(step, timed_out, &retry), AfterAttempt::Failed);
        assert!(
            step.message.ends_with(
                "did not complete: the step timed out after 60s (the commands were running)"
            ),
            "{}",
            step.message
        );
        // A checkout that failed is said as such, not as a kill.
        step.state = StepState::Running;
        let fetch = AttemptEnd::Ran(RanAttempt {
            exit_code: -1,
            message: "fetching refs/heads/main failed: exit code 128".into(),
            ..Default::default()
        });
        assert_eq!(end_attempt(step, fetch, &retry), AfterAttempt::Failed);
        assert!(
            step.message
                .ends_with("did not complete: fetching refs/heads/main failed: exit code 128")
                && !step.message.contains("kill"),
            "{}",
            step.message
        );
    }

    #[test]
    fn cancelling_a_job_stops_running_steps_and_cancels_waiting_ones() {
        let mut job = job(DIAMOND);
        start(&mut job, "a");
        job.finish(JobState::Cancelled, "cancelled by ci".into());
        assert_eq!(job.state, JobState::Cancelled);
        assert_eq!(job.step("a").unwrap().state, StepState::Cancelled);
        assert_eq!(job.step("d").unwrap().state, StepState::Cancelled);
        assert_eq!(
            job.step(PIPELINE_STEP_KEY).unwrap().state,
            StepState::Succeeded
        );
        assert!(job.settle());
    }

    #[test]
    fn job_records_round_trip_through_json() {
        let mut job = job(DIAMOND);
        start(&mut job, "a");
        job.step_mut("a").unwrap().log = Some(Digest::of_bytes(b"log"));
        job.pipeline_file = Some(Digest::of_bytes(b"steps"));
        let text = serde_json::to_string(&job).unwrap();
        let back: JobRecord = serde_json::from_str(&text).unwrap();
        assert_eq!(back, job);
    }
}
