//! `reapi-bench`: a load generator for any Remote Execution API v2 endpoint.
//!
//! Scenarios ([`Scenario`]) drive one part of the API each: CAS writes and
//! reads (batch or ByteStream), FindMissingBlobs, GetActionResult, Execute of
//! a no-op action on real workers, and `dispatch`, which is buildkube-specific:
//! it plays the workers itself over buildkube's worker protocol and checks
//! that every action is leased, completed and answered exactly once.
//!
//! [`run`] returns a [`Report`]; the binary prints it as text or JSON and
//! exits non-zero unless [`Report::is_clean`].

mod action_cache;
mod blobs;
mod cas;
pub mod checkout;
mod dispatch;
mod execute;
mod load;
mod stats;
pub mod webhook;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use buildkube_config::ClientTlsArgs;
use buildkube_reapi::{connect_channel, AuthChannel, CasClient};
use clap::{Args, Parser, Subcommand, ValueEnum};

pub use stats::{ErrorSample, LatencySummary, Report};

use crate::load::{LoadPlan, Measured};

/// Largest gRPC message the benchmark sends or accepts.
const MAX_MESSAGE: usize = 64 << 20;
/// Concurrent streams put on one HTTP/2 connection when `--connections` is auto.
const STREAMS_PER_CONNECTION: usize = 100;

/// Command line of `reapi-bench`.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "reapi-bench",
    version,
    about = "Load generator for any REAPI v2 endpoint",
    after_help = "Example: reapi-bench --target grpc://127.0.0.1:8980 --instance main cas-write --size 4KiB --count 10000 --concurrency 64"
)]
pub struct Cli {
    /// Endpoint to drive: grpc://HOST:PORT or http://HOST:PORT; grpcs:// or
    /// https:// for TLS (see --tls-ca-file).
    #[arg(
        long,
        global = true,
        env = "REAPI_BENCH_TARGET",
        default_value = "grpc://127.0.0.1:8980"
    )]
    pub target: String,
    /// REAPI instance name ("" for none).
    #[arg(long, global = true, default_value = buildkube_config::DEFAULT_INSTANCE)]
    pub instance: String,
    /// File holding a bearer token sent with every call.
    #[arg(long, global = true)]
    pub token_file: Option<PathBuf>,
    /// TLS towards a grpcs:// or https:// target.
    #[command(flatten)]
    pub tls: ClientTlsArgs,
    /// HTTP/2 connections the clients spread their calls over
    /// (0 = one per 100 concurrent operations). Simulated workers always
    /// have a connection each.
    #[arg(long, global = true, default_value_t = 0)]
    pub connections: usize,
    /// Print the report as one JSON object.
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress lines on stderr.
    #[arg(long, global = true)]
    pub quiet: bool,
    /// What to run.
    #[command(subcommand)]
    pub scenario: Scenario,
}

/// The load patterns.
#[derive(Subcommand, Debug, Clone)]
pub enum Scenario {
    /// Upload distinct random blobs.
    CasWrite(CasArgs),
    /// Upload a pool of blobs (not measured), then read them back, verifying each.
    CasRead(CasReadArgs),
    /// FindMissingBlobs over a mix of present and absent digests, checking the answer.
    FindMissing(FindMissingArgs),
    /// Seed the action cache (not measured), then GetActionResult.
    AcGet(AcGetArgs),
    /// Execute distinct no-op actions (unique salt, do_not_cache) on the endpoint's real workers.
    ExecuteNoop(ExecuteArgs),
    /// buildkube only: simulated workers lease and complete distinct no-op actions
    /// while clients Execute them; checks none is lost or duplicated.
    Dispatch(DispatchArgs),
}

impl Scenario {
    /// The scenario's command-line name.
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::CasWrite(_) => "cas-write",
            Scenario::CasRead(_) => "cas-read",
            Scenario::FindMissing(_) => "find-missing",
            Scenario::AcGet(_) => "ac-get",
            Scenario::ExecuteNoop(_) => "execute-noop",
            Scenario::Dispatch(_) => "dispatch",
        }
    }
}

/// How many operations, how many at once.
#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    /// Measured operations (with --duration: at most this many).
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub count: u64,
    /// Operations in flight at once [default: 32; dispatch: --count].
    #[arg(long, short = 'c')]
    pub concurrency: Option<usize>,
    /// Unmeasured operations run first [default: count/10, at most 100].
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Stop starting operations after this many seconds.
    #[arg(long)]
    pub duration: Option<f64>,
}

/// Which CAS API moves the bytes.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum CasApi {
    /// BatchUpdateBlobs / BatchReadBlobs.
    Batch,
    /// ByteStream Write / Read.
    Bytestream,
    /// ByteStream with `compressed-blobs/zstd` names: writes send blobs
    /// compressed (level 1, compressed before the clock starts), reads
    /// decompress and verify (on the clock).
    BytestreamZstd,
}

/// Flags of `cas-write`.
#[derive(Args, Debug, Clone)]
pub struct CasArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub load: LoadArgs,
    /// Bytes per blob (suffixes K, KiB, M, MiB... accepted).
    #[arg(long, short = 's', default_value = "4KiB", value_parser = buildkube_config::parse_byte_size)]
    pub size: u64,
    /// API used.
    #[arg(long, value_enum, default_value_t = CasApi::Batch)]
    pub api: CasApi,
    /// Blobs per batch request (batch API only); one operation is one request.
    #[arg(long, default_value_t = 1)]
    pub batch_size: u32,
    /// Blobs that compress about 4:1 (a random KiB repeated with small
    /// changes) instead of random bytes.
    #[arg(long)]
    pub compressible: bool,
}

/// Flags of `cas-read`.
#[derive(Args, Debug, Clone)]
pub struct CasReadArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub cas: CasArgs,
    /// Distinct blobs uploaded before the run and read round-robin
    /// [default: the blobs the run reads, at most 1000].
    #[arg(long)]
    pub blobs: Option<u64>,
}

/// Flags of `find-missing`.
#[derive(Args, Debug, Clone)]
pub struct FindMissingArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub load: LoadArgs,
    /// Digests per request: half present, half absent.
    #[arg(long, default_value_t = 100)]
    pub digests: u32,
    /// Distinct small blobs uploaded before the run to be the present half.
    #[arg(long, default_value_t = 1000)]
    pub blobs: u64,
}

/// Flags of `ac-get`.
#[derive(Args, Debug, Clone)]
pub struct AcGetArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub load: LoadArgs,
    /// Action cache entries written (UpdateActionResult) before the run.
    #[arg(long, default_value_t = 1000)]
    pub entries: u64,
    /// Share of lookups for digests never written (expected misses), 0.0 to 1.0.
    #[arg(long, default_value_t = 0.0)]
    pub miss_ratio: f64,
}

/// Flags of `execute-noop`.
#[derive(Args, Debug, Clone)]
pub struct ExecuteArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub load: LoadArgs,
    /// The command's arguments (repeat the flag); run with PATH=/usr/bin:/bin.
    #[arg(long = "arg", default_values_t = ["true".to_string()])]
    pub command: Vec<String>,
    /// Platform property KEY=VALUE of the action (repeatable).
    #[arg(long, value_parser = parse_property)]
    pub platform: Vec<(String, String)>,
    /// Set skip_cache_lookup on every Execute.
    #[arg(long)]
    pub skip_cache_lookup: bool,
    /// Seconds one Execute may take before it counts as lost.
    #[arg(long, default_value_t = 120.0)]
    pub action_timeout: f64,
}

/// Flags of `dispatch`.
#[derive(Args, Debug, Clone)]
pub struct DispatchArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub execute: ExecuteArgs,
    /// Simulated workers, each with its own connection.
    #[arg(long, default_value_t = 50)]
    pub workers: usize,
    /// Concurrent Lease calls (slots) per simulated worker.
    #[arg(long, default_value_t = 1)]
    pub worker_slots: u32,
    /// Milliseconds a simulated worker "runs" each action before completing it.
    #[arg(long, default_value_t = 0)]
    pub work_ms: u64,
}

fn parse_property(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("`{text}` is not KEY=VALUE")),
    }
}

impl LoadArgs {
    fn plan(&self, default_concurrency: usize, quiet: bool) -> LoadPlan {
        LoadPlan {
            count: self.count,
            concurrency: self.concurrency.unwrap_or(default_concurrency).max(1),
            warmup: self.warmup.unwrap_or((self.count / 10).min(100)),
            duration: self.duration.map(Duration::from_secs_f64),
            quiet,
        }
    }

    fn params(&self, plan: &LoadPlan) -> BTreeMap<String, serde_json::Value> {
        let mut params = BTreeMap::new();
        params.insert("count".into(), plan.count.into());
        params.insert("concurrency".into(), plan.concurrency.into());
        params.insert("warmup".into(), plan.warmup.into());
        if let Some(duration) = self.duration {
            params.insert("duration_secs".into(), duration.into());
        }
        params
    }
}

/// The endpoint and the connections to it.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) endpoint: String,
    pub(crate) instance: String,
    pub(crate) token: Option<String>,
    tls: ClientTlsArgs,
    channels: Vec<AuthChannel>,
}

impl Target {
    fn connect(cli: &Cli, concurrency: usize) -> anyhow::Result<Target> {
        let token = match &cli.token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading the token file {}", path.display()))?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        let connections = match cli.connections {
            0 => concurrency.div_ceil(STREAMS_PER_CONNECTION).max(1),
            n => n,
        };
        let channels = (0..connections)
            .map(|_| {
                connect_channel(&cli.target, token.as_deref(), &cli.tls)
                    .map_err(anyhow::Error::from)
            })
            .collect::<anyhow::Result<Vec<_>>>()
            .with_context(|| format!("connecting to {}", cli.target))?;
        Ok(Target {
            endpoint: cli.target.clone(),
            instance: cli.instance.clone(),
            token,
            tls: cli.tls.clone(),
            channels,
        })
    }

    /// The connection operation `index` uses.
    pub(crate) fn channel(&self, index: u64) -> AuthChannel {
        self.channels[(index % self.channels.len() as u64) as usize].clone()
    }

    /// A fresh connection of its own (for a simulated worker).
    pub(crate) fn dedicated_channel(&self) -> anyhow::Result<AuthChannel> {
        connect_channel(&self.endpoint, self.token.as_deref(), &self.tls)
            .with_context(|| format!("connecting to {}", self.endpoint))
    }

    pub(crate) fn cas(&self, index: u64) -> CasClient {
        CasClient::new(self.channel(index), &self.instance)
    }

    pub(crate) fn connections(&self) -> usize {
        self.channels.len()
    }
}

/// What a scenario hands back to [`run`] to be turned into a [`Report`].
pub(crate) struct Outcome {
    pub(crate) measured: Measured,
    pub(crate) params: BTreeMap<String, serde_json::Value>,
    pub(crate) counters: BTreeMap<String, u64>,
    pub(crate) dispatch_latency: Option<LatencySummary>,
    /// Failures beyond failed operations (lost, duplicated, mismatched...).
    pub(crate) failures: Vec<String>,
}

/// Runs the scenario `cli` names and reports what it measured.
///
/// Errors are setup failures (bad flags, the endpoint unreachable while
/// preparing data); failed operations are counted in the report instead.
pub async fn run(cli: &Cli) -> anyhow::Result<Report> {
    let (plan, load) = match &cli.scenario {
        Scenario::CasWrite(args) => (args.load.plan(32, cli.quiet), &args.load),
        Scenario::CasRead(args) => (args.cas.load.plan(32, cli.quiet), &args.cas.load),
        Scenario::FindMissing(args) => (args.load.plan(32, cli.quiet), &args.load),
        Scenario::AcGet(args) => (args.load.plan(32, cli.quiet), &args.load),
        Scenario::ExecuteNoop(args) => (args.load.plan(32, cli.quiet), &args.load),
        Scenario::Dispatch(args) => {
            let load = &args.execute.load;
            (load.plan(load.count as usize, cli.quiet), load)
        }
    };
    let target = Target::connect(cli, plan.concurrency)?;
    let mut outcome = match &cli.scenario {
        Scenario::CasWrite(args) => cas::write(&target, &plan, args).await?,
        Scenario::CasRead(args) => cas::read(&target, &plan, args).await?,
        Scenario::FindMissing(args) => cas::find_missing(&target, &plan, args).await?,
        Scenario::AcGet(args) => action_cache::get(&target, &plan, args).await?,
        Scenario::ExecuteNoop(args) => execute::noop(&target, &plan, args).await?,
        Scenario::Dispatch(args) => dispatch::run(&target, &plan, args).await?,
    };
    let mut params = load.params(&plan);
    params.insert("connections".into(), target.connections().into());
    params.append(&mut outcome.params);
    let measured = outcome.measured;
    let secs = measured.elapsed.as_secs_f64().max(f64::EPSILON);
    let mut failures = Vec::new();
    if measured.errors > 0 {
        failures.push(format!(
            "{} of {} operations failed",
            measured.errors,
            measured.ok + measured.errors
        ));
    }
    failures.extend(outcome.failures);
    Ok(Report {
        scenario: cli.scenario.name().to_string(),
        target: cli.target.clone(),
        instance: cli.instance.clone(),
        params,
        ops: measured.ok,
        errors: measured.errors,
        elapsed_secs: measured.elapsed.as_secs_f64(),
        ops_per_sec: measured.ok as f64 / secs,
        mb_per_sec: measured.bytes as f64 / 1e6 / secs,
        latency: measured.latency.summary(),
        dispatch_latency: outcome.dispatch_latency,
        counters: outcome.counters,
        error_samples: measured.error_log.samples(),
        failures,
    })
}

/// Turns a failed call's status into a short error naming the call.
pub(crate) fn rpc_error(
    call: impl std::fmt::Display,
) -> impl FnOnce(tonic::Status) -> anyhow::Error {
    move |status| anyhow::anyhow!("{call}: {:?}: {}", status.code(), status.message())
}

/// Prints a line to stderr unless quiet (setup steps of long runs).
pub(crate) fn note(quiet: bool, message: impl std::fmt::Display) {
    if !quiet {
        eprintln!("{message}");
    }
}

/// Ends a report binary: the report as JSON (`json`) or as `text`, exit 0;
/// the error after `name: `, exit 1.
pub fn finish<R: serde::Serialize>(
    name: &str,
    outcome: anyhow::Result<R>,
    json: bool,
    text: impl FnOnce(&R) -> String,
) -> std::process::ExitCode {
    match outcome {
        Ok(report) if json => {
            println!(
                "{}",
                serde_json::to_string(&report).expect("the report serializes")
            );
            std::process::ExitCode::SUCCESS
        }
        Ok(report) => {
            print!("{}", text(&report));
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{name}: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_before_and_after_the_scenario() {
        let cli = Cli::try_parse_from([
            "reapi-bench",
            "--target",
            "grpc://127.0.0.1:1",
            "--instance",
            "",
            "dispatch",
            "--count",
            "2000",
            "--workers",
            "60",
            "--platform",
            "OSFamily=linux",
            "--json",
        ])
        .unwrap();
        assert!(cli.json);
        assert_eq!(cli.instance, "");
        let Scenario::Dispatch(args) = &cli.scenario else {
            panic!("{cli:?}")
        };
        assert_eq!(args.workers, 60);
        assert_eq!(
            args.execute.platform,
            vec![("OSFamily".to_string(), "linux".to_string())]
        );
        let plan = args
            .execute
            .load
            .plan(args.execute.load.count as usize, false);
        assert_eq!(
            (plan.count, plan.concurrency, plan.warmup),
            (2000, 2000, 100)
        );
    }

    #[test]
    fn sizes_take_units_and_bad_properties_are_rejected() {
        let cli = Cli::try_parse_from([
            "reapi-bench",
            "cas-read",
            "--size",
            "1MiB",
            "--api",
            "bytestream",
        ])
        .unwrap();
        let Scenario::CasRead(args) = &cli.scenario else {
            panic!("{cli:?}")
        };
        assert_eq!((args.cas.size, args.cas.api), (1 << 20, CasApi::Bytestream));
        assert!(
            Cli::try_parse_from(["reapi-bench", "execute-noop", "--platform", "novalue"]).is_err()
        );
    }
}
