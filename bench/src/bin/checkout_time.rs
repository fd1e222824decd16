//! `checkout-time`: CI step checkout time with a cold and a warm git mirror
//! (see `reapi_bench::checkout`).

use std::process::ExitCode;

use clap::Parser;
use reapi_bench::checkout::{run, CheckoutArgs, CheckoutReport};

#[tokio::main]
async fn main() -> ExitCode {
    let args = CheckoutArgs::parse();
    reapi_bench::finish(
        "checkout-time",
        run(&args).await,
        args.json,
        CheckoutReport::render_text,
    )
}
