//! buildkube's REAPI server: CAS, ByteStream, ActionCache, Execution,
//! Operations and Capabilities over embedded storage, plus the worker
//! protocol and the scheduler behind it.
//!
//! Where things happen: bytes enter through [`service::CasService`] and
//! [`service::ByteStreamService`] into a [`storage::BlobStore`] (built by
//! [`storage::factory`] from `--storage-config`); actions are queued
//! by [`service::ExecutionService`] in [`buildkube_scheduler::Scheduler`] and leased to
//! workers through [`service::WorkerProtocolService`].

// Deprecated REAPI fields (Command.platform, output_files...) are still what
// older clients such as Bazel 4 send, so they are read deliberately.
#![allow(deprecated)]

pub mod auth;
pub mod error;
pub mod farm;
pub mod http;
pub mod http_jobs;
mod input_tree;
pub mod instances;
pub mod job_logs;
pub mod jobs;
pub mod listener;
pub mod metrics;
pub mod service;
pub mod storage;
pub mod tls;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use buildkube_config::{ServerArgs, WorkerArgs};
use buildkube_proto::bytestream::byte_stream_server::ByteStreamServer;
use buildkube_proto::jobs::jobs_server::JobsServer;
use buildkube_proto::longrunning::operations_server::OperationsServer;
use buildkube_proto::reapi::action_cache_server::ActionCacheServer;
use buildkube_proto::reapi::capabilities_server::CapabilitiesServer;
use buildkube_proto::reapi::content_addressable_storage_server::ContentAddressableStorageServer;
use buildkube_proto::reapi::execution_server::ExecutionServer;
use buildkube_proto::worker::worker_service_server::WorkerServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::Authenticator;
use crate::farm::Farm;
use crate::instances::Instances;
use crate::metrics::Metrics;
use crate::service::MAX_GRPC_MESSAGE;
use buildkube_scheduler::{Scheduler, SchedulerConfig};

fn write_addr_file(
    path: &Path,
    grpc: SocketAddr,
    http: SocketAddr,
    metrics: SocketAddr,
) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        format!("grpc={grpc}\nhttp={http}\nmetrics={metrics}\n"),
    )
    .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} into place", path.display()))?;
    Ok(())
}

/// Runs the server until `shutdown` resolves, then stops accepting calls,
/// drains in-process workers and returns.
pub async fn run(
    args: ServerArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let instances = Instances::new(&args.instances)?;
    let auth = match &args.auth_config {
        Some(path) => {
            let config =
                buildkube_config::auth::AuthConfig::load(path).map_err(anyhow::Error::msg)?;
            Some(Arc::new(Authenticator::from_config(&config)?))
        }
        None => {
            tracing::warn!("no --auth-config: this server is open, anyone who can reach it may read, write and execute, and serve as a worker");
            None
        }
    };
    // The in-process workers get a worker credential that exists only in memory.
    let local_worker_token = match &auth {
        Some(auth) if args.local_workers > 0 => Some(auth.add_local_worker_token()),
        _ => None,
    };
    let webhooks = jobs::Webhooks::load(&args.jobs, instances.first())?;
    instances
        .check(&webhooks.instance)
        .map_err(|e| anyhow::anyhow!("--webhook-instance: {}", e.message()))?;
    let grpc_tls = tls::ServerTls::load(&args.tls, tls::GRPC_ALPN)?;
    let http_tls = tls::ServerTls::load(&args.tls, tls::HTTP_ALPN)?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating --data-dir {}", args.data_dir.display()))?;
    let storage_config = match &args.storage_config {
        Some(path) => {
            buildkube_config::storage::StorageConfig::load(path).map_err(anyhow::Error::msg)?
        }
        None => buildkube_config::storage::StorageConfig::embedded(),
    };

    // All ports are bound, and HTTP serves (/healthz live, /readyz 503),
    // before storage opens: opening a large CAS stats every blob, and a
    // liveness probe must not kill the server meanwhile.
    let grpc_listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding --listen {}", args.listen))?;
    let http_listener = TcpListener::bind(args.http_listen)
        .await
        .with_context(|| format!("binding --http-listen {}", args.http_listen))?;
    let metrics_listener = TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("binding --metrics-listen {}", args.metrics_listen))?;
    let grpc_addr = grpc_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;
    let metrics_addr = metrics_listener.local_addr()?;

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let http_state = http::HttpState {
        auth: auth.clone(),
        ..Default::default()
    };
    let http = tokio::spawn(listener::serve_http(
        listener::accept(http_listener, http_tls, None),
        http::router(http_state.clone()),
        stopped(stop_rx.clone()),
    ));
    let metrics_http = tokio::spawn(listener::serve_http(
        listener::accept(metrics_listener, None, None),
        http::metrics_router(http_state.clone()),
        stopped(stop_rx.clone()),
    ));
    if let Some(path) = &args.addr_file {
        write_addr_file(path, grpc_addr, http_addr, metrics_addr)?;
    }
    tracing::info!(grpc = %grpc_addr, http = %http_addr, metrics = %metrics_addr, "listening; opening storage");

    let opened = tokio::select! {
        opened = storage::factory::open(&storage_config, &args.data_dir, args.cas_max_size) => opened,
        () = stopped(stop_rx.clone()) => {
            tracing::info!("stopped while opening storage");
            http.await?;
            metrics_http.await?;
            return Ok(());
        }
    };
    let storage::factory::Stores {
        cas,
        action_cache,
        records,
    } = opened.context("opening storage (--storage-config)")?;
    let scheduler_config = SchedulerConfig {
        lease_timeout: Duration::from_secs(args.lease_timeout_secs.max(1)),
        max_attempts: args.max_attempts.max(1),
        orphan_timeout: Duration::from_secs(args.orphan_timeout_secs.max(1)),
        max_unfinished_per_instance: args.max_queued_actions,
        ..Default::default()
    };
    // Logs how many operations came back (info).
    let scheduler = Arc::new(
        Scheduler::restore(scheduler_config, records.clone(), |i| {
            instances.check(i).is_ok()
        })
        .await
        .context("restoring unfinished operations from the journal (--storage-config records)")?,
    );
    let farm = Arc::new(Farm {
        cas,
        action_cache,
        records,
        scheduler: scheduler.clone(),
        instances,
        metrics: Metrics::default(),
        stopping: stop_rx.clone(),
        limits: args.action_limits.clone(),
        commands: Default::default(),
        live_logs: Default::default(),
    });
    let _ = http_state.farm.set(farm.clone());

    // CI jobs: restored before anything is served, so their steps'
    // operations are watched again before the orphan timeout.
    let job_runner = jobs::runner(
        &args.jobs,
        scheduler.clone(),
        farm.cas.clone(),
        auth.clone(),
        farm.records.clone(),
    );
    job_runner
        .restore()
        .await
        .map_err(|e| anyhow::anyhow!("restoring stored jobs: {e}"))?;
    let step_logs =
        job_logs::StepLogs::new(job_runner.clone(), farm.live_logs.clone(), farm.cas.clone());
    let _ = http_state.jobs.set(http_jobs::JobsHttp {
        runner: job_runner.clone(),
        logs: step_logs.clone(),
        webhooks,
    });

    let reaper = {
        let scheduler = scheduler.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                scheduler.reap();
            }
        })
    };
    // Kubernetes replaces a Secret's files in place: re-read them so keys
    // rotate without a restart.
    let token_reloader = auth.clone().map(|auth| {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(auth::TOKEN_RELOAD_INTERVAL);
            loop {
                tick.tick().await;
                let auth = auth.clone();
                let _ = tokio::task::spawn_blocking(move || auth.reload()).await;
            }
        })
    });

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<ExecutionServer<service::ExecutionService>>()
        .await;
    health
        .set_serving::<ContentAddressableStorageServer<service::CasService>>()
        .await;

    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        // Outermost: every status, the interceptor's included, leaves through it.
        .layer(crate::error::TruncateStatusLayer)
        .layer(tonic::service::InterceptorLayer::new(auth::interceptor(
            auth.clone(),
        )))
        .add_service(health_service)
        .add_service(CapabilitiesServer::new(service::CapabilitiesService::new(
            farm.clone(),
        )))
        .add_service(
            ContentAddressableStorageServer::new(service::CasService::new(farm.clone()))
                .max_decoding_message_size(MAX_GRPC_MESSAGE)
                .max_encoding_message_size(MAX_GRPC_MESSAGE),
        )
        .add_service(
            ByteStreamServer::new(service::ByteStreamService::new(
                farm.clone(),
                args.max_open_uploads,
            ))
            .max_decoding_message_size(MAX_GRPC_MESSAGE)
            .max_encoding_message_size(MAX_GRPC_MESSAGE),
        )
        .add_service(
            ActionCacheServer::new(service::ActionCacheService::new(farm.clone()))
                .max_decoding_message_size(MAX_GRPC_MESSAGE)
                .max_encoding_message_size(MAX_GRPC_MESSAGE),
        )
        .add_service(ExecutionServer::new(service::ExecutionService::new(
            farm.clone(),
        )))
        .add_service(OperationsServer::new(service::OperationsService::new(
            farm.clone(),
        )))
        .add_service(JobsServer::new(service::JobsService::new(
            job_runner.clone(),
            step_logs,
            farm.instances.clone(),
        )))
        .add_service(
            WorkerServiceServer::new(service::WorkerProtocolService::new(farm.clone()))
                .max_decoding_message_size(MAX_GRPC_MESSAGE)
                .max_encoding_message_size(MAX_GRPC_MESSAGE),
        );
    // listener::accept sets TCP_NODELAY on every connection (the builder's
    // tcp_nodelay applies only to listeners it binds itself), or small
    // replies (leases) stall on delayed ACKs for ~40 ms.
    let (in_process, in_process_connections) = listener::InProcessConnector::new();
    let grpc_incoming = listener::accept(
        grpc_listener,
        grpc_tls.clone(),
        Some(in_process_connections),
    );
    let grpc =
        tokio::spawn(router.serve_with_incoming_shutdown(grpc_incoming, stopped(stop_rx.clone())));

    // In-process workers dial through a pipe, not the TCP listener, so
    // they connect whatever TLS or mTLS the listener requires; their
    // `server` is the listener's real address, which the CI steps they run
    // point Bazel at.
    let local_server = {
        let mut addr = grpc_addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(if addr.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
        let scheme = if grpc_tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{addr}")
    };
    let mut local_workers = Vec::new();
    for i in 0..args.local_workers {
        let worker_args = WorkerArgs {
            server: local_server.clone(),
            instance: farm.instances.first().to_string(),
            work_dir: args.data_dir.join("local-workers").join(i.to_string()),
            concurrency: Some(1),
            worker_id: Some(format!("local-{i}")),
            // The one-process farm does everything, CI steps included.
            run_steps: true,
            http_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            log_format: args.log_format,
            action_limits: args.action_limits.clone(),
            ..WorkerArgs::default()
        };
        let worker = buildkube_worker::Worker::start_in_process(
            worker_args,
            local_worker_token.clone(),
            in_process.channel(),
        )
        .await
        .with_context(|| format!("starting in-process worker {i}"))?;
        local_workers.push(tokio::spawn(worker.run(stopped(stop_rx.clone()))));
    }

    http_state.ready.store(true, Ordering::Release);
    let tls_mode = match &grpc_tls {
        None => "off",
        Some(tls) if tls.requires_client_certificates() => "mutual",
        Some(_) => "on",
    };
    tracing::info!(grpc = %grpc_addr, http = %http_addr, metrics = %metrics_addr, tls = tls_mode, data_dir = %args.data_dir.display(),
        instances = ?farm.instances.names().collect::<Vec<_>>(), local_workers = args.local_workers, "buildkube server ready");

    for worker in local_workers {
        if let Ok(Err(e)) = worker.await {
            tracing::error!(error = %e, "in-process worker failed");
        }
    }
    grpc.await?.context("gRPC server failed")?;
    // Jobs stay as stored, to resume at the next start.
    job_runner.stop();
    http.await?;
    metrics_http.await?;
    reaper.abort();
    if let Some(reloader) = token_reloader {
        reloader.abort();
    }
    tracing::info!("buildkube server stopped");
    Ok(())
}
