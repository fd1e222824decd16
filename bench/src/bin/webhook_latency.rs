//! `webhook-latency`: webhook-to-step-running latency of a buildkube server
//! (see `reapi_bench::webhook`).

use std::process::ExitCode;

use clap::Parser;
use reapi_bench::webhook::{run, WebhookArgs};

#[tokio::main]
async fn main() -> ExitCode {
    let args = WebhookArgs::parse();
    match run(&args).await {
        Ok(report) if args.json => {
            println!(
                "{}",
                serde_json::to_string(&report).expect("the report serializes")
            );
            ExitCode::SUCCESS
        }
        Ok(report) => {
            print!("{}", report.render_text());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("webhook-latency: {error:#}");
            ExitCode::FAILURE
        }
    }
}
