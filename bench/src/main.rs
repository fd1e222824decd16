//! `reapi-bench`: parse flags, start tracing, run the scenario, print the report.

use std::process::ExitCode;

use clap::Parser;
use reapi_bench::{run, Cli};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let report = match run(&cli).await {
        Ok(report) => report,
        Err(error) => {
            eprintln!("reapi-bench {}: {error:#}", cli.scenario.name());
            return ExitCode::from(2);
        }
    };
    if cli.json {
        println!(
            "{}",
            serde_json::to_string(&report).expect("the report serializes")
        );
    } else {
        print!("{}", report.render_text());
    }
    if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "reapi-bench {}: FAILED: {}",
            report.scenario,
            report.failures.join("; ")
        );
        ExitCode::FAILURE
    }
}
