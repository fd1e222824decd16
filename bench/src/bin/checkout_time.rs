//! `checkout-time`: CI step checkout time with a cold and a warm git mirror
//! (see `reapi_bench::checkout`).

use std::process::ExitCode;

use clap::Parser;
use reapi_bench::checkout::{run, CheckoutArgs};

#[tokio::main]
async fn main() -> ExitCode {
    let args = CheckoutArgs::parse();
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
            eprintln!("checkout-time: {error:#}");
            ExitCode::FAILURE
        }
    }
}
