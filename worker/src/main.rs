//! `buildkube-worker`: parse flags, start logging, run until SIGTERM/SIGINT,
//! drain, exit 0.

use anyhow::Context as _;
use buildkube_config::{LogFormat, WorkerArgs};
use clap::Parser as _;
use tracing_subscriber::EnvFilter;

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
}

/// Completes on the first SIGTERM (Kubernetes scale-down) or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing the SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = WorkerArgs::parse();
    init_tracing(args.log_format);
    let worker = buildkube_worker::Worker::start(args)
        .await
        .context("starting the worker")?;
    worker
        .run(shutdown_signal())
        .await
        .context("running the worker")?;
    Ok(())
}
