//! The bounds of a pipeline file. A repository is untrusted input: nothing
//! in it can make the server hold more than these allow.

/// Bytes of a pipeline file.
pub const MAX_PIPELINE_FILE_BYTES: usize = 256 * 1024;
/// Bytes of text in a parsed pipeline, all values together; YAML aliases
/// count each time they are used, so a small file cannot expand beyond this.
pub const MAX_PIPELINE_TEXT_BYTES: usize = 1024 * 1024;
/// Steps in a pipeline.
pub const MAX_STEPS: usize = 100;
/// Bytes of a step key.
pub const MAX_KEY_BYTES: usize = 64;
/// Commands of a step.
pub const MAX_COMMANDS: usize = 64;
/// Bytes of one command.
pub const MAX_COMMAND_BYTES: usize = 16 * 1024;
/// Environment variables of a step.
pub const MAX_ENV_VARS: usize = 64;
/// Bytes of an environment variable's name.
pub const MAX_ENV_NAME_BYTES: usize = 128;
/// Bytes of an environment variable's value.
pub const MAX_ENV_VALUE_BYTES: usize = 4 * 1024;
/// Platform properties of a step.
pub const MAX_PLATFORM_PROPERTIES: usize = 16;
/// Bytes of a platform property's name or value.
pub const MAX_PROPERTY_BYTES: usize = 256;
/// Artifact globs of a step.
pub const MAX_ARTIFACT_GLOBS: usize = 32;
/// Bytes of an artifact glob.
pub const MAX_GLOB_BYTES: usize = 1024;
/// A step's `timeout_secs` when it names none.
pub const DEFAULT_TIMEOUT_SECS: u64 = 3600;
/// The largest `timeout_secs` (one day).
pub const MAX_TIMEOUT_SECS: u64 = 24 * 3600;
/// Reruns after a lost worker when a step names none.
pub const DEFAULT_WORKER_LOST_RETRIES: u32 = 2;
/// The most reruns of either kind.
pub const MAX_RETRIES: u32 = 10;
/// Exit codes one step may list for reruns.
pub const MAX_RETRY_EXIT_CODES: usize = 16;
