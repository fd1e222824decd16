//! The `buildkube` client of a buildkube server's Jobs service: start a CI
//! job, list and watch jobs, follow a step's log, cancel, and download an
//! artifact (a ByteStream read of its digest, verified).
//!
//! Exit codes (the job's outcome where there is a job):
//! 0 succeeded (or the command did what it was asked), 1 the job failed,
//! 2 the job was cancelled, 3 bad usage, 4 the server could not be reached
//! or refused the call, 5 a local file could not be written.

mod commands;
mod progress;

use std::ffi::OsString;

use buildkube_config::ClientArgs;
use clap::{Args, Parser, Subcommand};

pub use commands::Failure;

const EXIT_CODES: &str = "\
Exit codes:
  0  the job succeeded (run --wait, logs -f, cancel: the job's outcome), or the command did what it was asked
  1  the job failed
  2  the job was cancelled
  3  bad usage (unknown flag, missing argument)
  4  the server could not be reached or refused the call (credential, scope, unknown job)
  5  a local file could not be written";

/// Command line of `buildkube`.
#[derive(Parser, Debug)]
#[command(
    name = "buildkube",
    version,
    about = "Run CI jobs on a buildkube farm, follow them, cancel them, download their artifacts",
    after_help = EXIT_CODES
)]
pub struct Cli {
    /// Server, instance, credential and TLS.
    #[command(flatten)]
    pub client: ClientArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start a job: the repository's .buildkube/pipeline.yaml at REF.
    Run(RunArgs),
    /// List the instance's jobs, newest first.
    Jobs {
        /// Keep the list up to date until interrupted.
        #[arg(long)]
        watch: bool,
        /// How many jobs to show.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Print a step's log; without STEP, every step's in order.
    Logs {
        /// Follow: keep printing while the steps run, then exit with the job's outcome.
        #[arg(short = 'f', long)]
        follow: bool,
        /// The job's id.
        job: String,
        /// The step's key (`:pipeline` for the pipeline step).
        step: Option<String>,
    },
    /// Cancel a job: its queued steps are dropped, its running ones killed.
    Cancel {
        /// The job's id.
        job: String,
    },
    /// A job's artifacts.
    #[command(subcommand)]
    Artifacts(ArtifactsCommand),
}

/// `buildkube run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Clone URL (ssh://…, git@host:path, https://…, file://…).
    #[arg(long)]
    pub repo: String,
    /// Ref or branch to run (refs/heads/main, main, a tag).
    #[arg(long = "ref")]
    pub git_ref: String,
    /// Run exactly this commit (40 or 64 hex digits) instead of the ref's tip.
    #[arg(long)]
    pub commit: Option<String>,
    /// Wait for the job to finish, showing its progress; exit with its outcome.
    #[arg(long)]
    pub wait: bool,
}

/// `buildkube artifacts ...`.
#[derive(Subcommand, Debug)]
pub enum ArtifactsCommand {
    /// Download an artifact by its path, byte for byte (its digest is verified).
    Download {
        /// The job's id.
        job: String,
        /// The artifact's path, relative to the step's working tree.
        path: String,
        /// Where to write it (default: the path's file name, in the current directory).
        #[arg(short = 'o', long)]
        output: Option<std::path::PathBuf>,
        /// The step that kept it, when several did.
        #[arg(long)]
        step: Option<String>,
    },
}

/// How the process ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0.
    Success,
    /// 1.
    JobFailed,
    /// 2.
    JobCancelled,
    /// 3.
    Usage,
    /// 4.
    Server,
    /// 5.
    LocalFile,
}

impl Exit {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::JobFailed => 1,
            Exit::JobCancelled => 2,
            Exit::Usage => 3,
            Exit::Server => 4,
            Exit::LocalFile => 5,
        }
    }
}

/// Parses `args` (program name first), runs the command, reports errors on
/// stderr, and returns how the process should exit.
pub async fn main(args: impl IntoIterator<Item = impl Into<OsString> + Clone>) -> Exit {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() {
                Exit::Usage
            } else {
                Exit::Success // --help, --version
            };
        }
    };
    match commands::run(cli).await {
        Ok(exit) => exit,
        Err(failure) => {
            eprintln!("buildkube: {failure}");
            failure.exit()
        }
    }
}
