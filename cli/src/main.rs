//! `buildkube`: parse the command line, run the command, exit with its code
//! (a job's outcome; see `buildkube --help`).

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let exit = buildkube_cli::main(std::env::args_os()).await;
    ExitCode::from(exit.code())
}
