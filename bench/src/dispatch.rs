//! `dispatch`: buildkube's scheduler under load. Simulated workers speak the
//! worker protocol (long-poll Lease, then Complete at once with exit code 0
//! and a stdout naming the action) while clients Execute distinct no-op
//! actions. Every action must be leased once, completed once, and answered
//! on its own Execute stream with its own result.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use buildkube_proto::reapi::{ActionResult, ExecutedActionMetadata};
use buildkube_proto::worker::worker_service_client::WorkerServiceClient;
use buildkube_proto::worker::{
    complete_request, CompleteRequest, KeepAliveRequest, Lease, LeaseRequest, WorkerInfo,
};
use buildkube_reapi::{AuthChannel, Digest};
use bytes::Bytes;
use futures::future::try_join_all;

use crate::execute::{execute, execution_client, upload_noop_actions};
use crate::load::{drive, Done, LoadPlan};
use crate::stats::{ErrorLog, LatencyRecorder};
use crate::{DispatchArgs, Outcome, Target, MAX_MESSAGE};

/// How long one Lease call may wait on the server for work.
const LEASE_WAIT: Duration = Duration::from_secs(5);
/// Pause after a failed worker call before the next.
const WORKER_RETRY_PAUSE: Duration = Duration::from_millis(100);

/// What the simulated workers saw of one action.
struct LeaseSeen {
    first_at: Instant,
    leases: u32,
    operation_name: String,
}

/// Everything the clients and the simulated workers record, checked at the end.
#[derive(Default)]
struct Ledger {
    /// When the Execute of each action was sent.
    sent: Mutex<HashMap<Digest, Instant>>,
    /// Leases per action.
    leased: Mutex<HashMap<Digest, LeaseSeen>>,
    /// Complete calls per operation name.
    completes: Mutex<HashMap<String, u32>>,
    lease_count: AtomicU64,
    complete_count: AtomicU64,
    completes_rejected: AtomicU64,
    worker_errors: AtomicU64,
    worker_error_log: ErrorLog,
    lost: AtomicU64,
    mismatched: AtomicU64,
}

impl Ledger {
    fn on_lease(&self, lease: &Lease) -> anyhow::Result<Digest> {
        let now = Instant::now();
        let digest = Digest::from_field(lease.action_digest.as_ref())
            .with_context(|| format!("lease {} carries a bad action digest", lease.lease_id))?;
        self.lease_count.fetch_add(1, Ordering::Relaxed);
        let mut leased = self.leased.lock().expect("ledger lock");
        let seen = leased.entry(digest).or_insert_with(|| LeaseSeen {
            first_at: now,
            leases: 0,
            operation_name: lease.operation_name.clone(),
        });
        seen.leases += 1;
        Ok(digest)
    }

    /// Counts a Complete call as it is sent: the client may see its result
    /// (and the run end) before the worker sees the server's answer.
    fn on_complete_sent(&self, operation_name: &str) {
        self.complete_count.fetch_add(1, Ordering::Relaxed);
        *self
            .completes
            .lock()
            .expect("ledger lock")
            .entry(operation_name.to_string())
            .or_default() += 1;
    }

    fn on_complete_answered(&self, accepted: bool) {
        if !accepted {
            self.completes_rejected.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn worker_error(&self, message: String) {
        self.worker_errors.fetch_add(1, Ordering::Relaxed);
        self.worker_error_log.record(message);
    }
}

/// What the simulated worker writes as the action's stdout.
fn simulated_stdout(worker_id: &str, action: Digest, operation_name: &str) -> String {
    format!("reapi-bench simulated worker {worker_id} ran action {action} for operation {operation_name}\n")
}

/// One simulated worker: `slots` loops of Lease then Complete over one connection.
struct SimulatedWorker {
    client: WorkerServiceClient<AuthChannel>,
    info: WorkerInfo,
}

impl SimulatedWorker {
    fn new(
        channel: AuthChannel,
        instance: &str,
        id: String,
        slots: u32,
        platform: Option<buildkube_proto::reapi::Platform>,
    ) -> Self {
        SimulatedWorker {
            client: WorkerServiceClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            info: WorkerInfo {
                worker_id: id,
                instance_name: instance.to_string(),
                platform,
                concurrency: slots,
                runs_steps: false,
            },
        }
    }

    /// A KeepAlive with no leases: fails fast if the target does not speak
    /// the worker protocol, and opens the connection before the clients start.
    async fn hello(&self) -> anyhow::Result<()> {
        self.client
            .clone()
            .keep_alive(KeepAliveRequest {
                worker: Some(self.info.clone()),
                leases: Vec::new(),
                draining: false,
            })
            .await
            .with_context(|| {
                format!(
                    "worker protocol KeepAlive as {} failed: is the target a buildkube server?",
                    self.info.worker_id
                )
            })?;
        Ok(())
    }

    async fn slot(self: Arc<Self>, ledger: Arc<Ledger>, work: Duration) {
        let mut client = self.client.clone();
        loop {
            let response = client
                .lease(LeaseRequest {
                    worker: Some(self.info.clone()),
                    wait: Some(prost_types::Duration {
                        seconds: LEASE_WAIT.as_secs() as i64,
                        nanos: 0,
                    }),
                })
                .await;
            let lease = match response {
                Ok(response) => match response.into_inner().lease {
                    Some(lease) => lease,
                    None => continue,
                },
                Err(status) => {
                    ledger.worker_error(format!(
                        "Lease: {:?}: {}",
                        status.code(),
                        status.message()
                    ));
                    tokio::time::sleep(WORKER_RETRY_PAUSE).await;
                    continue;
                }
            };
            let digest = match ledger.on_lease(&lease) {
                Ok(digest) => digest,
                Err(error) => {
                    ledger.worker_error(format!("{error:#}"));
                    continue;
                }
            };
            if !work.is_zero() {
                tokio::time::sleep(work).await;
            }
            let stdout = simulated_stdout(&self.info.worker_id, digest, &lease.operation_name);
            let request = CompleteRequest {
                worker: Some(self.info.clone()),
                lease_id: lease.lease_id.clone(),
                operation_name: lease.operation_name.clone(),
                action_digest: lease.action_digest.clone(),
                outcome: Some(complete_request::Outcome::Result(ActionResult {
                    exit_code: 0,
                    stdout_raw: Bytes::from(stdout),
                    execution_metadata: Some(ExecutedActionMetadata {
                        worker: self.info.worker_id.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })),
                message: String::new(),
            };
            ledger.on_complete_sent(&lease.operation_name);
            match client.complete(request).await {
                Ok(response) => ledger.on_complete_answered(response.into_inner().accepted),
                Err(status) => ledger.worker_error(format!(
                    "Complete of lease {} (action {digest}): {:?}: {}",
                    lease.lease_id,
                    status.code(),
                    status.message()
                )),
            }
        }
    }
}

/// Checks that an Execute result is the one a simulated worker produced for `action`.
async fn check_own_result(
    target: &Target,
    index: u64,
    action: Digest,
    operation_name: &str,
    result: Option<&ActionResult>,
) -> anyhow::Result<()> {
    let result = result.with_context(|| {
        format!("action {action} (operation {operation_name}): no ActionResult")
    })?;
    ensure!(
        result.exit_code == 0,
        "action {action} (operation {operation_name}): exit code {}",
        result.exit_code
    );
    let stdout = match (&result.stdout_raw, &result.stdout_digest) {
        (raw, _) if !raw.is_empty() => raw.clone(),
        (_, Some(digest)) => {
            let digest = Digest::try_from(digest).context("stdout digest")?;
            target
                .cas(index)
                .read_blob(digest)
                .await
                .with_context(|| format!("reading the stdout of action {action}"))?
        }
        _ => Bytes::new(),
    };
    let stdout = String::from_utf8_lossy(&stdout);
    let marker = format!("ran action {action} ");
    ensure!(
        stdout.contains(&marker),
        "action {action} (operation {operation_name}) got a result that is not its own: stdout {stdout:?}"
    );
    Ok(())
}

pub(crate) async fn run(
    target: &Target,
    plan: &LoadPlan,
    args: &DispatchArgs,
) -> anyhow::Result<Outcome> {
    ensure!(args.workers >= 1, "--workers must be at least 1");
    ensure!(args.worker_slots >= 1, "--worker-slots must be at least 1");
    let exec = &args.execute;
    let actions = Arc::new(upload_noop_actions(target, exec, plan.total(), plan.quiet).await?);
    let ledger = Arc::new(Ledger::default());

    let run_id = format!("{:08x}", rand::random::<u32>());
    let platform = crate::execute::platform(&exec.platform);
    let workers = (0..args.workers)
        .map(|n| {
            Ok(Arc::new(SimulatedWorker::new(
                target.dedicated_channel()?,
                &target.instance,
                format!("reapi-bench-{run_id}-{n}"),
                args.worker_slots,
                platform.clone(),
            )))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    try_join_all(workers.iter().map(|w| w.hello())).await?;
    let work = Duration::from_millis(args.work_ms);
    let slots: Vec<_> = workers
        .iter()
        .flat_map(|worker| (0..args.worker_slots).map(move |_| worker.clone()))
        .map(|worker| tokio::spawn(worker.slot(ledger.clone(), work)))
        .collect();

    let target_for_ops = target.clone();
    let actions_for_ops = actions.clone();
    let ledger_for_ops = ledger.clone();
    let ledger_for_progress = ledger.clone();
    let skip_cache_lookup = exec.skip_cache_lookup;
    let timeout = Duration::from_secs_f64(exec.action_timeout);
    let measured = drive(
        "dispatch",
        plan,
        move |index| {
            let target = target_for_ops.clone();
            let ledger = ledger_for_ops.clone();
            let action = actions_for_ops[index as usize];
            async move {
                let client = execution_client(target.channel(index));
                let sent = Instant::now();
                ledger.sent.lock().expect("ledger lock").insert(action, sent);
                let executed = match tokio::time::timeout(
                    timeout,
                    execute(client, &target.instance, action, skip_cache_lookup),
                )
                .await
                {
                    Ok(Ok(executed)) => executed,
                    Ok(Err(error)) => {
                        ledger.lost.fetch_add(1, Ordering::Relaxed);
                        return Err(error.context("lost"));
                    }
                    Err(_) => {
                        ledger.lost.fetch_add(1, Ordering::Relaxed);
                        anyhow::bail!("action {action}: no result within {timeout:?} (lost)");
                    }
                };
                let latency = sent.elapsed();
                let leased_as = ledger
                    .leased
                    .lock()
                    .expect("ledger lock")
                    .get(&action)
                    .map(|seen| seen.operation_name.clone());
                let checked = match leased_as {
                    Some(name) if name != executed.operation_name => Err(anyhow::anyhow!(
                        "action {action}: Execute answered as operation {} but was leased as {name}",
                        executed.operation_name
                    )),
                    _ => {
                        check_own_result(
                            &target,
                            index,
                            action,
                            &executed.operation_name,
                            executed.response.result.as_ref(),
                        )
                        .await
                    }
                };
                if let Err(error) = checked {
                    ledger.mismatched.fetch_add(1, Ordering::Relaxed);
                    return Err(error);
                }
                Ok(Done { bytes: 0, latency })
            }
        },
        move || {
            format!(
                "{} leases, {} completes",
                ledger_for_progress.lease_count.load(Ordering::Relaxed),
                ledger_for_progress.complete_count.load(Ordering::Relaxed)
            )
        },
    )
    .await;
    for slot in &slots {
        slot.abort();
    }
    for slot in slots {
        let _ = slot.await;
    }

    let sent = ledger.sent.lock().expect("ledger lock");
    let leased = ledger.leased.lock().expect("ledger lock");
    let completes = ledger.completes.lock().expect("ledger lock");
    let dispatch_latency = LatencyRecorder::new();
    let mut unleased = 0u64;
    for action in &actions[plan.warmup as usize..] {
        let Some(sent_at) = sent.get(action) else {
            continue;
        };
        match leased.get(action) {
            Some(seen) => {
                dispatch_latency.record(seen.first_at.saturating_duration_since(*sent_at))
            }
            None => unleased += 1,
        }
    }
    let unleased_total = actions
        .iter()
        .filter(|a| sent.contains_key(a) && !leased.contains_key(a))
        .count() as u64;
    let leased_twice = leased.values().filter(|seen| seen.leases > 1).count() as u64;
    let completed_twice = completes.values().filter(|&&n| n > 1).count() as u64;
    let foreign = leased.keys().filter(|d| !sent.contains_key(d)).count() as u64;
    let count = |a: &AtomicU64| a.load(Ordering::Relaxed);

    let mut failures = Vec::new();
    let lost = count(&ledger.lost);
    if lost > 0 {
        failures.push(format!(
            "{lost} actions lost: their Execute ended without a result"
        ));
    }
    let mismatched = count(&ledger.mismatched);
    if mismatched > 0 {
        failures.push(format!(
            "{mismatched} Execute streams ended with a result that was not their action's"
        ));
    }
    if leased_twice > 0 {
        failures.push(format!("{leased_twice} actions were leased more than once"));
    }
    if completed_twice > 0 {
        failures.push(format!(
            "{completed_twice} operations were completed more than once"
        ));
    }
    if unleased_total > 0 {
        failures.push(format!(
            "{unleased_total} actions were never leased by a simulated worker (does the server run its own \
             workers, e.g. --local-workers?)"
        ));
    }
    let rejected = count(&ledger.completes_rejected);
    if rejected > 0 {
        failures.push(format!(
            "{rejected} Complete calls were not accepted by the server"
        ));
    }
    let worker_errors = count(&ledger.worker_errors);
    if worker_errors > 0 {
        let samples: Vec<String> = ledger
            .worker_error_log
            .samples()
            .into_iter()
            .map(|s| format!("x{} {}", s.count, s.message))
            .collect();
        failures.push(format!(
            "{worker_errors} worker protocol calls failed: {}",
            samples.join("; ")
        ));
    }
    if foreign > 0 {
        failures.push(format!(
            "simulated workers leased {foreign} actions this run never sent"
        ));
    }

    let mut params = BTreeMap::new();
    params.insert("workers".into(), args.workers.into());
    params.insert("worker_slots".into(), args.worker_slots.into());
    params.insert("work_ms".into(), args.work_ms.into());
    params.insert("skip_cache_lookup".into(), exec.skip_cache_lookup.into());
    let mut counters = BTreeMap::new();
    counters.insert("actions_sent".into(), sent.len() as u64);
    counters.insert("leases".into(), count(&ledger.lease_count));
    counters.insert("completes".into(), count(&ledger.complete_count));
    counters.insert("completes_rejected".into(), rejected);
    counters.insert("lost".into(), lost);
    counters.insert("mismatched".into(), mismatched);
    counters.insert("leased_twice".into(), leased_twice);
    counters.insert("completed_twice".into(), completed_twice);
    counters.insert("unleased".into(), unleased);
    counters.insert("worker_errors".into(), worker_errors);
    Ok(Outcome {
        measured,
        params,
        counters,
        dispatch_latency: Some(dispatch_latency.summary()),
        failures,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_counts_leases_per_action_and_completes_per_operation() {
        let ledger = Ledger::default();
        let action = Digest::of_bytes(b"action");
        let lease = Lease {
            lease_id: "l1".into(),
            operation_name: "op1".into(),
            action_digest: Some(action.to_proto()),
            ..Default::default()
        };
        assert_eq!(ledger.on_lease(&lease).unwrap(), action);
        ledger.on_lease(&lease).unwrap();
        ledger.on_complete_sent("op1");
        ledger.on_complete_sent("op1");
        ledger.on_complete_answered(true);
        ledger.on_complete_answered(false);
        assert_eq!(ledger.leased.lock().unwrap()[&action].leases, 2);
        assert_eq!(ledger.completes.lock().unwrap()["op1"], 2);
        assert_eq!(ledger.completes_rejected.load(Ordering::Relaxed), 1);
        assert!(ledger.on_lease(&Lease::default()).is_err());
    }

    #[test]
    fn stdout_names_the_action_with_a_terminator() {
        let action = Digest::of_bytes(b"a");
        let stdout = simulated_stdout("w", action, "op");
        assert!(stdout.contains(&format!("ran action {action} ")));
    }
}
