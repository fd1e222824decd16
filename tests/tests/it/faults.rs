//! Fault injection (issue 4): a real Bazel build of the fixture, `//...`
//! plus the slow actions of `//slow`, against a server and two worker
//! processes, with a fault injected while actions run. Every build must
//! still succeed with byte-correct outputs, and every test shows from the
//! server's operation timelines that the fault hit running actions.
//!
//! The fault waits for a readiness signal (actions executing on the worker
//! to be hurt, read from `/operations`), never for a fixed time.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use buildkube_config::{METRIC_ACTIONS_RUNNING, METRIC_QUEUE_DEPTH};
use buildkube_tests::fixture::{self, ALL_TARGETS, SLOW_TARGET};
use buildkube_tests::operations::{Operation, EVENT_ASSIGNED, EVENT_REQUEUED, EVENT_RESTORED};
use buildkube_tests::{
    poll_until, processes_under, remote_execution_flags, Bazel, BazelRun, Server, TcpProxy, Worker,
};

/// Lease timeout of the servers here: short, so requeues come quickly.
const LEASE_TIMEOUT_SECS: u64 = 3;
/// How long a fresh or reconnecting worker may take to show up in /metrics.
const WORKER_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long Bazel may take from its start to running actions on a worker
/// (its own server start and analysis included).
const BUILD_START_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the server may take to requeue a lost worker's actions.
const REQUEUE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a SIGTERMed worker may take to finish its actions and exit.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// A server with a short lease timeout.
fn fault_server() -> Result<Server> {
    Server::start_with(|args| args.lease_timeout_secs = LEASE_TIMEOUT_SECS)
}

/// The build of every fault test: `//...` and the slow actions.
fn build_args(server: &Server) -> Vec<String> {
    let mut args = remote_execution_flags(server);
    args.extend([ALL_TARGETS.to_string(), SLOW_TARGET.to_string()]);
    args
}

/// Runs `bazel build args` on another thread while `fault` runs on this one;
/// returns both once both are done.
fn build_during<T>(
    bazel: &Bazel,
    args: &[String],
    fault: impl FnOnce() -> Result<T>,
) -> Result<(BazelRun, T)> {
    std::thread::scope(|scope| {
        let build = scope.spawn(|| bazel.build(args));
        let injected = fault();
        let run = build
            .join()
            .map_err(|_| anyhow::anyhow!("the Bazel thread panicked"))??;
        let injected =
            injected.with_context(|| format!("injecting the fault; the build:\n{run}"))?;
        Ok((run, injected))
    })
}

/// The build succeeded, every spawn ran remotely, and every output of
/// `//...` and `//slow` is byte-correct.
fn ensure_good_build(run: &BazelRun, bazel: &Bazel) -> Result<()> {
    run.ensure_success()?;
    let summary = run.summary()?;
    ensure!(
        summary.local().is_empty() && summary.remote() > 0,
        "expected every spawn to run remotely: {summary}\n{run}"
    );
    fixture::check_build_outputs(bazel)?;
    fixture::check_slow_outputs(bazel)
}

/// The operations executing on `worker` now, per the server.
fn running_on(server: &Server, worker: &str) -> Result<Vec<Operation>> {
    Ok(server
        .operations()?
        .into_iter()
        .filter(|op| op.is_running_on(worker))
        .collect())
}

/// Waits until at least `count` actions execute on `worker`.
fn wait_running_on(server: &Server, worker: &str, count: usize) -> Result<Vec<Operation>> {
    poll_until(
        &format!("{count} action(s) executing on {worker}"),
        BUILD_START_TIMEOUT,
        || {
            let ops = running_on(server, worker)?;
            Ok((ops.len() >= count).then_some(ops))
        },
    )
}

/// The operation called `name` in `ops`.
fn find<'a>(ops: &'a [Operation], name: &str) -> Result<&'a Operation> {
    ops.iter()
        .find(|op| op.name == name)
        .with_context(|| format!("operation {name} is not in the server's /operations"))
}

/// Timelines of `names`, for messages.
fn describe(ops: &[Operation], names: &[String]) -> String {
    names
        .iter()
        .map(|name| match find(ops, name) {
            Ok(op) => op.describe(),
            Err(e) => e.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn names(ops: &[Operation]) -> Vec<String> {
    ops.iter().map(|op| op.name.clone()).collect()
}

/// Waits until at least two actions execute on `worker`, injects `fault`,
/// and returns the names of the actions the server still sees executing on
/// it then: at least one, else the error says `none_running`.
fn fault_while_running(
    server: &Server,
    worker: &str,
    fault: impl FnOnce() -> Result<()>,
    none_running: &str,
) -> Result<Vec<String>> {
    wait_running_on(server, worker, 2)?;
    fault()?;
    let running = names(&running_on(server, worker)?);
    ensure!(!running.is_empty(), "{none_running}");
    Ok(running)
}

/// [`fault_while_running`] with the fault cutting `worker`'s link to the
/// server, which runs through `proxy`.
fn cut_while_running(server: &Server, proxy: &TcpProxy, worker: &str) -> Result<Vec<String>> {
    fault_while_running(
        server,
        worker,
        || {
            proxy.cut();
            Ok(())
        },
        "no action was running on the worker when its link was cut",
    )
}

/// Ensures `expected` of each operation in `names`; the error says
/// `unexpected(name)` and shows the timelines of all of `names`.
fn ensure_each(
    ops: &[Operation],
    names: &[String],
    expected: impl Fn(&Operation) -> bool,
    unexpected: impl Fn(&str) -> String,
) -> Result<()> {
    for name in names {
        let op = find(ops, name)?;
        ensure!(
            expected(op),
            "{}:\n{}",
            unexpected(name),
            describe(ops, names)
        );
    }
    Ok(())
}

/// Completed by `worker` and never requeued.
fn completed_by_without_requeue(op: &Operation, worker: &str) -> bool {
    op.completed_by() == Some(worker) && !op.timeline.iter().any(|e| e.event == EVENT_REQUEUED)
}

/// Prints how many of the operations `names` did `what`, with their timelines.
fn report(ops: &[Operation], names: &[String], what: &str) {
    eprintln!(
        "{} action(s) {what}:\n{}",
        names.len(),
        describe(ops, names)
    );
}

/// A worker connected through a proxy, which can cut it off, and one
/// connected directly: `(proxy, through the proxy, direct)`, both connected.
fn proxied_and_direct_workers(server: &Server) -> Result<(TcpProxy, Worker, Worker)> {
    let proxy = TcpProxy::start(server.grpc_addr())?;
    let proxied = Worker::start_with(server, |args| args.server = proxy.http_url())?;
    let direct = Worker::start(server)?;
    server.wait_for_workers(2, WORKER_CONNECT_TIMEOUT)?;
    Ok((proxy, proxied, direct))
}

/// A worker SIGKILLed while it runs actions: the server requeues them after
/// the lease timeout, the other worker runs them, the build succeeds.
#[test]
fn worker_killed_mid_build() -> Result<()> {
    let server = fault_server()?;
    let mut victim = Worker::start(&server)?;
    let survivor = Worker::start(&server)?;
    server.wait_for_workers(2, WORKER_CONNECT_TIMEOUT)?;
    let victim_id = victim.id().to_string();
    let bazel = Bazel::new()?;

    let (run, orphaned) = build_during(&bazel, &build_args(&server), || {
        // Once the victim is dead, whatever the server still sees running on
        // it was cut off mid-run and can only finish by a requeue.
        fault_while_running(
            &server,
            &victim_id,
            || victim.kill().map(drop),
            "no action was left running on the killed worker",
        )
    })?;
    ensure_good_build(&run, &bazel)?;

    let ops = server.operations()?;
    ensure_each(
        &ops,
        &orphaned,
        |op| op.has_event(EVENT_REQUEUED, &victim_id) && op.completed_by() == Some(survivor.id()),
        |name| {
            format!(
                "{name} should be requeued from {victim_id} and completed by {}",
                survivor.id()
            )
        },
    )?;
    report(
        &ops,
        &orphaned,
        "running on the killed worker were requeued and rerun",
    );
    Ok(())
}

/// A worker SIGTERMed while it runs actions (a Kubernetes scale-down): it
/// takes no new work, finishes and reports what it runs, exits 0.
#[test]
fn worker_terminated_mid_build_drains() -> Result<()> {
    let server = fault_server()?;
    let mut leaver = Worker::start_with(&server, |args| args.drain_timeout_secs = 60)?;
    let stayer = Worker::start(&server)?;
    server.wait_for_workers(2, WORKER_CONNECT_TIMEOUT)?;
    let leaver_id = leaver.id().to_string();
    let bazel = Bazel::new()?;

    let (run, draining) = build_during(&bazel, &build_args(&server), || {
        // Still running after the signal: these are what the drain must finish.
        let draining = fault_while_running(
            &server,
            &leaver_id,
            || leaver.send_sigterm(),
            "no action was running on the worker when it got SIGTERM",
        )?;
        let status = leaver.terminate(DRAIN_TIMEOUT)?;
        ensure!(status.success(), "the drained worker exited with {status}");
        Ok(draining)
    })?;
    ensure_good_build(&run, &bazel)?;

    let ops = server.operations()?;
    ensure_each(
        &ops,
        &draining,
        |op| completed_by_without_requeue(op, &leaver_id),
        |name| format!("{name} should be completed by the draining {leaver_id}, never requeued"),
    )?;
    let after_stop = ops
        .iter()
        .filter(|op| op.completed_by() == Some(stayer.id()))
        .count();
    ensure!(after_stop > 0, "the remaining worker completed nothing");
    report(&ops, &draining, "finished by the draining worker");
    Ok(())
}

/// The server SIGKILLed while actions run and restarted on the same data
/// dir and port: the workers reconnect on their own and keep their leases
/// (the operations are restored from the journal, issue 7 item 3), Bazel
/// re-attaches with WaitExecution, the build succeeds, and no action that
/// was running at the kill ran again.
#[test]
fn server_killed_and_restarted_mid_build() -> Result<()> {
    server_restarted_mid_build(Server::kill_and_restart)
}

/// The same with a graceful stop (SIGTERM, as in a rolling update): the
/// server must exit promptly although Bazel and the workers hold streams open.
#[test]
fn server_terminated_and_restarted_mid_build() -> Result<()> {
    server_restarted_mid_build(Server::restart)
}

fn server_restarted_mid_build(restart: fn(&mut Server) -> Result<()>) -> Result<()> {
    let mut server = fault_server()?;
    let mut workers = [Worker::start(&server)?, Worker::start(&server)?];
    server.wait_for_workers(2, WORKER_CONNECT_TIMEOUT)?;
    let bazel = Bazel::new()?;
    let args = build_args(&server);

    let (run, (running_at_stop, executing)) = build_during(&bazel, &args, || {
        let running = poll_until("actions running", BUILD_START_TIMEOUT, || {
            let running = server.metric(METRIC_ACTIONS_RUNNING)?.unwrap_or(0.0);
            Ok((running >= 2.0).then_some(running))
        })?;
        let executing: Vec<Operation> = server
            .operations()?
            .into_iter()
            .filter(Operation::is_executing)
            .collect();
        let before = server.grpc_addr();
        let stopped = std::time::Instant::now();
        restart(&mut server)?;
        eprintln!("the server was back after {:?}", stopped.elapsed());
        ensure!(
            server.grpc_addr() == before,
            "the server came back on {} instead of {before}, where Bazel looks for it",
            server.grpc_addr()
        );
        server.wait_for_workers(2, WORKER_CONNECT_TIMEOUT)?;
        Ok((running, executing))
    })?;
    ensure_good_build(&run, &bazel)?;

    let ops = server.operations()?;
    ensure!(
        ops.iter().any(|op| op.completed_by().is_some()),
        "the restarted server ran no action: the build did not go on after the stop"
    );
    // What ran at the stop was restored and finished by the worker that
    // held it, without running again (before the journal, the restarted
    // server did not know these names and Bazel Executed them anew).
    ensure!(
        !executing.is_empty(),
        "no operation was executing at the stop"
    );
    for before in &executing {
        let worker = before
            .last_assigned_worker()
            .context("an executing operation names its worker")?;
        let after = find(&ops, &before.name).with_context(|| {
            format!(
                "{} was executing at the stop but the restarted server does not know it",
                before.describe()
            )
        })?;
        ensure!(
            after.has_event(EVENT_RESTORED, worker) && completed_by_without_requeue(after, worker),
            "expected {} to be restored and completed by {worker} without a requeue",
            after.describe()
        );
    }
    report(
        &ops,
        &names(&executing),
        "restored and completed by their worker",
    );
    for worker in &mut workers {
        ensure!(worker.is_running()?, "{} exited", worker.id());
    }
    eprintln!(
        "{running_at_stop} action(s) were running at the stop; {} operation(s) after the restart",
        ops.len()
    );
    Ok(())
}

/// A worker's connection to the server cut (through a proxy) for longer
/// than the lease timeout, then restored: its actions are requeued (and run
/// by whichever worker leases them next, itself included once it is back),
/// it reconnects on its own, the build succeeds.
#[test]
fn worker_connection_cut_and_restored_mid_build() -> Result<()> {
    let server = fault_server()?;
    let (proxy, mut cut_off, _direct) = proxied_and_direct_workers(&server)?;
    let cut_id = cut_off.id().to_string();
    let bazel = Bazel::new()?;

    let (run, lost) = build_during(&bazel, &build_args(&server), || {
        let lost = cut_while_running(&server, &proxy, &cut_id)?;
        // Cut for longer than the lease timeout: until the server gave up on
        // every lease of the cut-off worker.
        poll_until(
            &format!("the server to requeue the actions of {cut_id}"),
            REQUEUE_TIMEOUT,
            || {
                let ops = server.operations()?;
                let all = lost.iter().all(|name| {
                    find(&ops, name).is_ok_and(|op| op.has_event(EVENT_REQUEUED, &cut_id))
                });
                Ok(all.then_some(()))
            },
        )?;
        let connections = proxy.forwarded();
        proxy.restore();
        poll_until(
            "the cut-off worker to reconnect",
            WORKER_CONNECT_TIMEOUT,
            || Ok((proxy.forwarded() > connections).then_some(())),
        )?;
        Ok(lost)
    })?;
    ensure_good_build(&run, &bazel)?;

    ensure!(cut_off.is_running()?, "the cut-off worker exited");
    server.wait_for_workers(2, WORKER_CONNECT_TIMEOUT)?;
    let ops = server.operations()?;
    ensure_each(
        &ops,
        &lost,
        |op| op.is_completed() && op.completed_by().is_some(),
        |name| format!("{name} did not complete after the cut"),
    )?;
    report(&ops, &lost, "were running on the cut-off worker");
    Ok(())
}

/// A worker's connection cut for less than the lease timeout, until the
/// commands it ran at the cut have ended: it keeps its leases, uploads and
/// reports once the link is back, and the server takes its results without
/// requeueing anything.
#[test]
fn worker_connection_cut_briefly_keeps_its_leases() -> Result<()> {
    // Longer than keep-alive interval + the cut + the reconnect backoff.
    let server = Server::start_with(|args| args.lease_timeout_secs = 30)?;
    let (proxy, cut_off, _direct) = proxied_and_direct_workers(&server)?;
    let cut_id = cut_off.id().to_string();
    let bazel = Bazel::new()?;

    let (run, lost) = build_during(&bazel, &build_args(&server), || {
        let mut commands = 0;
        let lost = fault_while_running(
            &server,
            &cut_id,
            || {
                // Leased is not yet running: an action may still be fetching
                // its inputs. Cut once a command of the worker really runs.
                commands = poll_until(
                    "a command of the worker to run",
                    BUILD_START_TIMEOUT,
                    || {
                        let running = processes_under(cut_off.work_dir()).len();
                        Ok((running > 0).then_some(running))
                    },
                )?;
                proxy.cut();
                Ok(())
            },
            "no action was running on the worker when its link was cut",
        )?;
        // Until every command running at the cut has ended: their results
        // can only reach the server after the restore.
        poll_until(
            "the cut-off worker's commands to end",
            REQUEUE_TIMEOUT,
            || Ok((processes_under(cut_off.work_dir()).is_empty()).then_some(())),
        )?;
        proxy.restore();
        Ok((lost, commands))
    })
    .map(|(run, (lost, commands))| {
        eprintln!("{commands} command(s) of the cut-off worker ran through the cut");
        (run, lost)
    })?;
    ensure_good_build(&run, &bazel)?;

    let ops = server.operations()?;
    ensure_each(
        &ops,
        &lost,
        |op| completed_by_without_requeue(op, &cut_id),
        |name| format!("{name} should be completed by {cut_id} through the cut, never requeued"),
    )?;
    report(
        &ops,
        &lost,
        "ran through the cut and were reported after it",
    );
    Ok(())
}

/// A worker started while the build runs with a backlog takes work from it.
#[test]
fn worker_joining_mid_build_takes_work() -> Result<()> {
    let server = fault_server()?;
    let first = Worker::start_with(&server, |args| args.concurrency = Some(2))?;
    server.wait_for_workers(1, WORKER_CONNECT_TIMEOUT)?;
    let bazel = Bazel::new()?;

    let (run, joiner) = build_during(&bazel, &build_args(&server), || {
        poll_until(
            "a backlog behind the first worker",
            BUILD_START_TIMEOUT,
            || {
                let queued = server.metric(METRIC_QUEUE_DEPTH)?.unwrap_or(0.0);
                let busy = running_on(&server, first.id())?.len();
                Ok((queued >= 1.0 && busy >= 1).then_some(()))
            },
        )?;
        let joiner = Worker::start(&server)?;
        server.wait_for_workers(2, WORKER_CONNECT_TIMEOUT)?;
        Ok(joiner)
    })?;
    ensure_good_build(&run, &bazel)?;

    let ops = server.operations()?;
    let taken = ops
        .iter()
        .filter(|op| op.has_event(EVENT_ASSIGNED, joiner.id()))
        .count();
    let completed = ops
        .iter()
        .filter(|op| op.completed_by() == Some(joiner.id()))
        .count();
    ensure!(
        completed > 0,
        "the worker that joined mid-build completed no action ({taken} assigned)"
    );
    eprintln!(
        "the joining worker completed {completed} of {} action(s)",
        ops.len()
    );
    Ok(())
}
