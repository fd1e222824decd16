//! `.buildkube/pipeline.yaml`: the steps a repository asks the farm to run
//! on a push, typed. Parsing checks every value as it is read (errors name
//! the field path, line and column) and then the steps as a whole (unique
//! keys, `depends_on` naming steps, no cycle), so a [`Pipeline`] value is
//! always one the scheduler can run.
//!
//! ```yaml
//! steps:
//!   - key: build
//!     commands:
//!       - bazel build //...
//!     platform: { OSFamily: linux }
//!     timeout_secs: 1800
//!     retry:
//!       worker_lost: 2
//!       exit_codes: { codes: [75], limit: 1 }
//!     artifacts: ["bazel-bin/pkg/*.tar"]
//!   - key: test
//!     depends_on: [build]
//!     commands: ["bazel test //..."]
//!     env: { TEST_SHARDS: "4" }
//! ```

mod fields;
mod graph;
pub mod limits;
#[cfg(test)]
mod tests;

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use fields::{
    ArtifactGlob, BoundedMap, BoundedVec, EnvName, EnvValue, ExitCode, PropertyName, PropertyValue,
    ShellCommand, StepKey, RESERVED_ENV_PREFIX,
};

/// Where a repository keeps its pipeline, relative to its root.
pub const PIPELINE_PATH: &str = ".buildkube/pipeline.yaml";

/// A checked pipeline: its steps in the order of the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(
    title = "buildkube pipeline",
    description = "The steps of .buildkube/pipeline.yaml, run on buildkube's workers."
)]
pub struct Pipeline {
    /// The steps; each runs once the steps it depends on have passed.
    steps: BoundedVec<Step, 1, { limits::MAX_STEPS }>,
}

/// One step: commands run in order in a fresh checkout on one worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// The step's name, unique in the pipeline; `depends_on` refers to it.
    pub key: StepKey,
    /// Shell commands, each run by `sh -c` in the working tree, one after
    /// another; the step fails at the first that exits non-zero.
    pub commands: BoundedVec<ShellCommand, 1, { limits::MAX_COMMANDS }>,
    /// Properties a worker must offer to run the step (`name: value`, exact
    /// match, as for actions). Default: none, any job-capable worker.
    #[serde(default, skip_serializing_if = "BoundedMap::is_empty")]
    pub platform: BoundedMap<PropertyName, PropertyValue, { limits::MAX_PLATFORM_PROPERTIES }>,
    /// Environment variables added to the worker's for every command.
    #[serde(default, skip_serializing_if = "BoundedMap::is_empty")]
    pub env: BoundedMap<EnvName, EnvValue, { limits::MAX_ENV_VARS }>,
    /// Seconds the step may run, checkout and artifact upload included,
    /// before it is killed and fails. Default 3600, at most 86400.
    #[serde(
        default = "default_timeout_secs",
        deserialize_with = "fields::timeout_secs"
    )]
    #[schemars(range(min = 1, max = limits::MAX_TIMEOUT_SECS))]
    pub timeout_secs: u64,
    /// When a failed attempt is run again.
    #[serde(default)]
    pub retry: Retry,
    /// Files to keep after the commands ran (globs relative to the working
    /// tree); they are uploaded whether the step passed or failed.
    #[serde(default, skip_serializing_if = "BoundedVec::is_empty")]
    pub artifacts: BoundedVec<ArtifactGlob, 0, { limits::MAX_ARTIFACT_GLOBS }>,
    /// Keys of the steps that must pass before this one starts.
    #[serde(default, skip_serializing_if = "BoundedVec::is_empty")]
    pub depends_on: BoundedVec<StepKey, 0, { limits::MAX_STEPS }>,
}

fn default_timeout_secs() -> u64 {
    limits::DEFAULT_TIMEOUT_SECS
}

/// When a failed attempt of a step is run again, on any matching worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    /// Reruns after the worker running the step was lost (killed, evicted,
    /// its lease expired). Default 2, at most 10.
    #[serde(
        default = "default_worker_lost_retries",
        deserialize_with = "fields::retries"
    )]
    #[schemars(range(max = limits::MAX_RETRIES))]
    pub worker_lost: u32,
    /// Reruns when a command exits with one of the listed codes (a flaky
    /// test runner's "try again", say). Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_codes: Option<ExitCodeRetry>,
}

fn default_worker_lost_retries() -> u32 {
    limits::DEFAULT_WORKER_LOST_RETRIES
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            worker_lost: limits::DEFAULT_WORKER_LOST_RETRIES,
            exit_codes: None,
        }
    }
}

/// Reruns on listed exit codes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExitCodeRetry {
    /// Exit codes (1 to 255) that mean the attempt may pass if run again.
    pub codes: BoundedVec<ExitCode, 1, { limits::MAX_RETRY_EXIT_CODES }>,
    /// How many times at most, 1 to 10.
    #[serde(deserialize_with = "fields::retry_limit")]
    #[schemars(range(min = 1, max = limits::MAX_RETRIES))]
    pub limit: u32,
}

/// Why an attempt of a step ended without passing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptFailure {
    /// The worker running it went away (lease expired, pod killed).
    WorkerLost,
    /// A command exited with this non-zero code.
    Exited(i32),
    /// The step ran past its `timeout_secs`.
    TimedOut,
    /// Someone cancelled the job.
    Cancelled,
}

impl Retry {
    /// How many reruns a failure of this kind allows in all: a step whose
    /// attempts failed this way that many times plus one fails for good.
    pub fn reruns_allowed(&self, failure: AttemptFailure) -> u32 {
        match failure {
            AttemptFailure::WorkerLost => self.worker_lost,
            AttemptFailure::Exited(code) => match &self.exit_codes {
                Some(rule) if rule.codes.iter().any(|c| i32::from(c.get()) == code) => rule.limit,
                _ => 0,
            },
            AttemptFailure::TimedOut | AttemptFailure::Cancelled => 0,
        }
    }
}

impl Step {
    /// The artifact globs as one matcher over paths relative to the working
    /// tree (`/`-separated), for the worker to pick the files to upload.
    pub fn artifact_matcher(&self) -> globset::GlobSet {
        let mut set = globset::GlobSetBuilder::new();
        for glob in self.artifacts.iter() {
            set.add(fields::artifact_glob_matcher(glob).expect("checked when parsed"));
        }
        set.build().expect("globs checked when parsed")
    }
}

/// Where in the file a parse error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

fn at(location: &Option<Location>) -> String {
    location.map(|l| format!(" at {l}")).unwrap_or_default()
}

/// Why a pipeline file was refused. Each names the field path (`steps[1].env`)
/// and, for what parsing found, the line and column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PipelineError {
    /// The file is larger than [`limits::MAX_PIPELINE_FILE_BYTES`].
    #[error("{PIPELINE_PATH} is {size} bytes, more than the limit of {max}")]
    TooLarge {
        /// The file's size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The file is not UTF-8 text.
    #[error("{PIPELINE_PATH} is not UTF-8 text (invalid byte at offset {offset})")]
    NotText {
        /// Offset of the first invalid byte.
        offset: usize,
    },
    /// The YAML does not parse, or a field is unknown, missing or holds a
    /// value it may not.
    #[error("{PIPELINE_PATH}: {path}{}: {message}", at(.location))]
    Parse {
        /// The field, e.g. `steps[0].timeout_secs`; `(top level)` for the document.
        path: String,
        /// Where in the file, when the parser knows.
        location: Option<Location>,
        /// What is wrong.
        message: String,
    },
    /// A step refers to steps in a way the pipeline cannot run.
    #[error("{PIPELINE_PATH}: {path}: {message}")]
    Invalid {
        /// The field, e.g. `steps[2].depends_on[0]`.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// Steps depend on each other in a circle; the keys in order, the first
    /// repeated at the end.
    #[error("{PIPELINE_PATH}: steps depend on each other in a cycle: {}", .cycle.join(" -> "))]
    Cycle {
        /// `[a, b, a]`: a depends on b, which depends on a.
        cycle: Vec<String>,
    },
}

impl Pipeline {
    /// Parses and checks the bytes of a pipeline file.
    pub fn from_bytes(bytes: &[u8]) -> Result<Pipeline, PipelineError> {
        if bytes.len() > limits::MAX_PIPELINE_FILE_BYTES {
            return Err(PipelineError::TooLarge {
                size: bytes.len(),
                max: limits::MAX_PIPELINE_FILE_BYTES,
            });
        }
        let text = std::str::from_utf8(bytes).map_err(|e| PipelineError::NotText {
            offset: e.valid_up_to(),
        })?;
        Pipeline::from_yaml(text)
    }

    /// Parses and checks pipeline YAML.
    pub fn from_yaml(text: &str) -> Result<Pipeline, PipelineError> {
        if text.len() > limits::MAX_PIPELINE_FILE_BYTES {
            return Err(PipelineError::TooLarge {
                size: text.len(),
                max: limits::MAX_PIPELINE_FILE_BYTES,
            });
        }
        let pipeline: Pipeline = fields::with_text_budget(limits::MAX_PIPELINE_TEXT_BYTES, || {
            serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(text))
        })
        .map_err(parse_error)?;
        graph::check(&pipeline.steps)?;
        Ok(pipeline)
    }

    /// Builds a pipeline from steps, with the checks parsing does.
    pub fn new(steps: Vec<Step>) -> Result<Pipeline, PipelineError> {
        let steps = BoundedVec::new(steps).map_err(|message| PipelineError::Invalid {
            path: "steps".into(),
            message,
        })?;
        graph::check(&steps)?;
        Ok(Pipeline { steps })
    }

    /// The steps in the order of the file.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// The step with this key.
    pub fn step(&self, key: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.key.as_str() == key)
    }

    /// Every step after all it depends on; among steps free to go, the one
    /// earlier in the file first.
    pub fn topological_order(&self) -> Vec<&Step> {
        graph::topological_order(&self.steps)
            .into_iter()
            .map(|i| &self.steps[i])
            .collect()
    }

    /// YAML that [`Pipeline::from_yaml`] reads back as this pipeline.
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("a pipeline serializes")
    }
}

fn parse_error(error: serde_path_to_error::Error<serde_yaml::Error>) -> PipelineError {
    let path = error.path().to_string();
    let inner = error.inner();
    let location = inner.location().map(|l| Location {
        line: l.line(),
        column: l.column(),
    });
    // serde_yaml's message may carry its own position and its own (shorter)
    // copy of the path; the error states both once.
    let mut message = inner.to_string();
    if let Some(l) = inner.location() {
        message = message.replace(&format!(" at line {} column {}", l.line(), l.column()), "");
    }
    if let Some((prefix, rest)) = message.split_once(": ") {
        let is_path_prefix = path == prefix
            || path
                .strip_prefix(prefix)
                .is_some_and(|tail| tail.starts_with(['.', '[']));
        if is_path_prefix {
            message = rest.to_string();
        }
    }
    PipelineError::Parse {
        path: if path == "." {
            "(top level)".into()
        } else {
            path
        },
        location,
        message,
    }
}
