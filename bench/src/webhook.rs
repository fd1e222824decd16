//! `webhook-latency`: how long a push takes to reach a worker. Signed
//! GitHub push deliveries (each a distinct commit) are POSTed to a
//! buildkube server's `/webhooks/github`; simulated step runners long-poll
//! the worker protocol, and the latency of a job is from its POST being
//! sent to a worker holding the lease of its pipeline step (the step
//! running). Each pipeline step is then completed as failed (no pipeline
//! file), so the job ends and the server's unfinished-job bound is not what
//! is measured.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use buildkube_jobs::webhook::WebhookSecrets;
use buildkube_proto::worker::worker_service_client::WorkerServiceClient;
use buildkube_proto::worker::{
    complete_request, CompleteRequest, LeaseRequest, StepResult, WorkerInfo,
};
use buildkube_reapi::{connect_channel, AuthChannel};
use clap::Parser;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

use crate::stats::{LatencyRecorder, LatencySummary};

const GITHUB_PUSH: &str = include_str!("../../jobs/src/webhook/testdata/github-push.json");

/// Command line of `webhook-latency`.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "webhook-latency",
    about = "Webhook-to-step-running latency of a buildkube server (p50/p99)"
)]
pub struct WebhookArgs {
    /// The server's HTTP address (host:port), where /webhooks/github is.
    #[arg(long)]
    pub http: SocketAddr,
    /// The server's gRPC endpoint (worker protocol), e.g. grpc://127.0.0.1:8980.
    #[arg(long)]
    pub grpc: String,
    /// Instance webhook jobs run on (the server's --webhook-instance).
    #[arg(long, default_value = "main")]
    pub instance: String,
    /// The GitHub webhook secret file the server was given.
    #[arg(long)]
    pub secret_file: PathBuf,
    /// A worker credential's token file, if the server has --auth-config.
    #[arg(long)]
    pub worker_token_file: Option<PathBuf>,
    /// Deliveries measured.
    #[arg(long, default_value_t = 200)]
    pub count: usize,
    /// Deliveries in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Simulated step runners (each one Lease call at a time).
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What a run measured.
#[derive(Debug, Serialize)]
pub struct WebhookReport {
    /// Deliveries answered 201.
    pub jobs: usize,
    /// From POST sent to the pipeline step leased.
    pub webhook_to_step_running: LatencySummary,
    /// From POST sent to its 201 answer.
    pub webhook_answer: LatencySummary,
    /// Wall time of the run.
    pub elapsed_secs: f64,
}

impl WebhookReport {
    /// The report as text.
    pub fn render_text(&self) -> String {
        let line = |s: &LatencySummary| {
            format!(
                "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
                s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms, s.samples
            )
        };
        format!(
            "webhook-latency: {} jobs in {:.1} s\n  webhook -> step running: {}\n  webhook answered (201):   {}\n",
            self.jobs,
            self.elapsed_secs,
            line(&self.webhook_to_step_running),
            line(&self.webhook_answer)
        )
    }
}

#[derive(Default)]
struct Pending {
    /// Job id → when its delivery was sent (set once the 201 names it).
    sent: HashMap<String, Instant>,
    /// Job id → when a worker leased its pipeline step, for leases that
    /// arrived before the 201 was read.
    leased_early: HashMap<String, Instant>,
}

struct Ledger {
    maps: Mutex<Pending>,
    running: LatencyRecorder,
    answered: LatencyRecorder,
    done: Mutex<usize>,
    all_done: Notify,
}

impl Default for Ledger {
    fn default() -> Ledger {
        Ledger {
            maps: Mutex::default(),
            running: LatencyRecorder::new(),
            answered: LatencyRecorder::new(),
            done: Mutex::default(),
            all_done: Notify::new(),
        }
    }
}

impl Ledger {
    fn record(&self, latency: Duration) {
        self.running.record(latency);
        *self.done.lock().unwrap() += 1;
        self.all_done.notify_waiters();
    }

    // One lock for both maps: whichever of the 201 and the lease comes
    // second records the sample, exactly once.
    fn on_sent(&self, job: String, sent: Instant) {
        let leased = {
            let mut maps = self.maps.lock().unwrap();
            let leased = maps.leased_early.remove(&job);
            if leased.is_none() {
                maps.sent.insert(job, sent);
            }
            leased
        };
        if let Some(leased) = leased {
            self.record(leased - sent);
        }
    }

    fn on_leased(&self, job: String, leased: Instant) {
        let sent = {
            let mut maps = self.maps.lock().unwrap();
            let sent = maps.sent.remove(&job);
            if sent.is_none() {
                maps.leased_early.insert(job, leased);
            }
            sent
        };
        if let Some(sent) = sent {
            self.record(leased - sent);
        }
    }

    fn waiting(&self, job: &str) -> bool {
        self.maps.lock().unwrap().sent.contains_key(job)
    }
}

/// A push delivery for a distinct commit `n`, and its signature.
fn delivery(secrets: &WebhookSecrets, n: usize) -> (Vec<u8>, String) {
    let mut payload: serde_json::Value = serde_json::from_str(GITHUB_PUSH).expect("test payload");
    payload["after"] = format!("{:040x}", n + 1).into();
    let body = serde_json::to_vec(&payload).expect("serializes");
    let signature = secrets.github_signature(&body);
    (body, signature)
}

/// POSTs one delivery (HTTP/1.1, one connection each); returns the job id.
async fn post(addr: SocketAddr, n: usize, body: &[u8], signature: &str) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to http://{addr}"))?;
    stream.set_nodelay(true)?;
    let head = format!(
        "POST /webhooks/github HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         X-GitHub-Event: push\r\nX-GitHub-Delivery: bench-{n}\r\nX-Hub-Signature-256: {signature}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    let status = text.split_whitespace().nth(1).unwrap_or_default();
    if status != "201" {
        bail!(
            "delivery {n} answered {status}: {}",
            text.lines().last().unwrap_or_default()
        );
    }
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    let json: serde_json::Value =
        serde_json::from_str(body).with_context(|| format!("the 201 body {body:?}"))?;
    json["job"]
        .as_str()
        .map(str::to_string)
        .context("the 201 body names no job")
}

/// A simulated step runner: leases steps and fails each pipeline step at once.
async fn step_runner(
    mut client: WorkerServiceClient<AuthChannel>,
    info: WorkerInfo,
    ledger: Arc<Ledger>,
    count: usize,
) -> anyhow::Result<()> {
    while *ledger.done.lock().unwrap() < count {
        let lease = client
            .lease(LeaseRequest {
                worker: Some(info.clone()),
                wait: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
            })
            .await
            .context("Lease")?
            .into_inner()
            .lease;
        let Some(lease) = lease else { continue };
        let leased = Instant::now();
        let Some(step) = lease.step.clone() else {
            bail!("leased an action, not a step: run against a server with no other clients");
        };
        ledger.on_leased(step.job_id.clone(), leased);
        client
            .complete(CompleteRequest {
                worker: Some(info.clone()),
                lease_id: lease.lease_id,
                operation_name: lease.operation_name,
                outcome: Some(complete_request::Outcome::StepResult(StepResult {
                    exit_code: 1,
                    message: "webhook-latency: not a real step runner".into(),
                    ..Default::default()
                })),
                ..Default::default()
            })
            .await
            .context("Complete")?;
    }
    Ok(())
}

/// Runs the benchmark.
pub async fn run(args: &WebhookArgs) -> anyhow::Result<WebhookReport> {
    ensure!(
        args.count > 0 && args.concurrency > 0 && args.workers > 0,
        "--count, --concurrency and --workers must be positive"
    );
    let secrets = WebhookSecrets::from_file(&args.secret_file)?;
    let token = args
        .worker_token_file
        .as_ref()
        .map(|p| buildkube_config::auth::read_token_file(p))
        .transpose()?;
    let channel = connect_channel(&args.grpc, token.as_deref(), &Default::default())?;
    let ledger = Arc::new(Ledger::default());
    let mut runners = Vec::new();
    for i in 0..args.workers {
        let info = WorkerInfo {
            worker_id: format!("webhook-latency-{i}"),
            instance_name: args.instance.clone(),
            platform: None,
            concurrency: 1,
            runs_steps: true,
        };
        runners.push(tokio::spawn(step_runner(
            WorkerServiceClient::new(channel.clone()),
            info,
            ledger.clone(),
            args.count,
        )));
    }
    let started = Instant::now();
    let next = Arc::new(Mutex::new(0usize));
    let mut senders = Vec::new();
    for _ in 0..args.concurrency {
        let (next, ledger, secrets, addr, count) = (
            next.clone(),
            ledger.clone(),
            secrets.clone(),
            args.http,
            args.count,
        );
        senders.push(tokio::spawn(async move {
            loop {
                let n = {
                    let mut next = next.lock().unwrap();
                    if *next >= count {
                        return anyhow::Ok(());
                    }
                    *next += 1;
                    *next - 1
                };
                let (body, signature) = delivery(&secrets, n);
                let sent = Instant::now();
                let job = post(addr, n, &body, &signature).await?;
                ledger.answered.record(sent.elapsed());
                ledger.on_sent(job.clone(), sent);
                // One job of this sender at a time until a worker holds it:
                // at most `concurrency` jobs wait for a worker at once.
                while ledger.waiting(&job) {
                    let notified = ledger.all_done.notified();
                    let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
                }
            }
        }));
    }
    for sender in senders {
        sender.await??;
    }
    tokio::time::timeout(Duration::from_secs(60), async {
        while *ledger.done.lock().unwrap() < args.count {
            let notified = ledger.all_done.notified();
            if *ledger.done.lock().unwrap() >= args.count {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
        }
    })
    .await
    .context("waiting for every job's pipeline step to be leased")?;
    for runner in runners {
        runner.abort();
    }
    Ok(WebhookReport {
        jobs: args.count,
        webhook_to_step_running: ledger.running.summary(),
        webhook_answer: ledger.answered.summary(),
        elapsed_secs: started.elapsed().as_secs_f64(),
    })
}
