//! `webhook-latency`: webhook-to-step-running latency of a buildkube server
//! (see `reapi_bench::webhook`).

use std::process::ExitCode;

use clap::Parser;
use reapi_bench::webhook::{run, WebhookArgs, WebhookReport};

#[tokio::main]
async fn main() -> ExitCode {
    let args = WebhookArgs::parse();
    reapi_bench::finish(
        "webhook-latency",
        run(&args).await,
        args.json,
        WebhookReport::render_text,
    )
}
