//! The load driver: runs numbered operations with a fixed concurrency, first
//! a warm-up that is not measured, then the measured phase, printing progress
//! to stderr once a second.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::stats::{ErrorLog, LatencyRecorder};

/// How much load to generate.
#[derive(Debug, Clone)]
pub(crate) struct LoadPlan {
    /// Measured operations (an upper bound when `duration` is set).
    pub(crate) count: u64,
    /// Operations in flight at once.
    pub(crate) concurrency: usize,
    /// Unmeasured operations run first.
    pub(crate) warmup: u64,
    /// Stop starting operations after this long.
    pub(crate) duration: Option<Duration>,
    /// No progress lines.
    pub(crate) quiet: bool,
}

impl LoadPlan {
    /// Operation indices used in all: warm-up ones come first.
    pub(crate) fn total(&self) -> u64 {
        self.warmup + self.count
    }
}

/// What one successful operation did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Done {
    /// Payload bytes moved.
    pub(crate) bytes: u64,
    /// Time the operation took, excluding the client's own preparation.
    pub(crate) latency: Duration,
}

/// What the measured phase did.
pub(crate) struct Measured {
    pub(crate) ok: u64,
    pub(crate) errors: u64,
    pub(crate) bytes: u64,
    pub(crate) elapsed: Duration,
    pub(crate) latency: LatencyRecorder,
    pub(crate) error_log: ErrorLog,
}

struct Phase {
    next: AtomicU64,
    end: u64,
    deadline: Option<Instant>,
    ok: AtomicU64,
    errors: AtomicU64,
    bytes: AtomicU64,
    latency: LatencyRecorder,
    error_log: ErrorLog,
}

/// Runs `op(i)` for every index of the plan: `0..warmup` unmeasured, then
/// `warmup..warmup+count` measured. `progress_extra` adds scenario state to
/// the progress line.
pub(crate) async fn drive<F, Fut>(
    name: &str,
    plan: &LoadPlan,
    op: F,
    progress_extra: impl Fn() -> String + Send + Sync + 'static,
) -> Measured
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<Done>> + Send + 'static,
{
    let op = Arc::new(op);
    let progress_extra = Arc::new(progress_extra);
    if plan.warmup > 0 {
        let warmup = run_phase(
            &format!("{name} (warm-up)"),
            plan,
            0,
            plan.warmup,
            None,
            op.clone(),
            progress_extra.clone(),
        )
        .await;
        if warmup.errors > 0 && !plan.quiet {
            eprintln!(
                "{name}: {} of {} warm-up operations failed",
                warmup.errors, plan.warmup
            );
            for sample in warmup.error_log.samples() {
                eprintln!("  x{}: {}", sample.count, sample.message);
            }
        }
    }
    run_phase(
        name,
        plan,
        plan.warmup,
        plan.total(),
        plan.duration,
        op,
        progress_extra,
    )
    .await
}

async fn run_phase<F, Fut>(
    name: &str,
    plan: &LoadPlan,
    start: u64,
    end: u64,
    duration: Option<Duration>,
    op: Arc<F>,
    progress_extra: Arc<impl Fn() -> String + Send + Sync + 'static>,
) -> Measured
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<Done>> + Send + 'static,
{
    let began = Instant::now();
    let phase = Arc::new(Phase {
        next: AtomicU64::new(start),
        end,
        deadline: duration.map(|d| began + d),
        ok: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        latency: LatencyRecorder::new(),
        error_log: ErrorLog::default(),
    });
    let progress = (!plan.quiet).then(|| {
        let phase = phase.clone();
        let name = name.to_string();
        let planned = end - start;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let mut last = 0;
            loop {
                tick.tick().await;
                let done = phase.ok.load(Ordering::Relaxed) + phase.errors.load(Ordering::Relaxed);
                let extra = progress_extra();
                eprintln!(
                    "{name}: {:>4.0}s {done}/{planned} ops, {} ops/s now, {} errors{}{extra}",
                    began.elapsed().as_secs_f64(),
                    done - last,
                    phase.errors.load(Ordering::Relaxed),
                    if extra.is_empty() { "" } else { ", " },
                );
                last = done;
            }
        })
    });
    let workers = plan.concurrency.max(1).min((end - start).max(1) as usize);
    let mut tasks = Vec::with_capacity(workers);
    for _ in 0..workers {
        let phase = phase.clone();
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                if phase.deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let index = phase.next.fetch_add(1, Ordering::Relaxed);
                if index >= phase.end {
                    break;
                }
                // Each operation is its own task so a panic is one error, not a stall.
                match tokio::spawn(op(index)).await {
                    Ok(Ok(done)) => {
                        phase.latency.record(done.latency);
                        phase.bytes.fetch_add(done.bytes, Ordering::Relaxed);
                        phase.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(error)) => {
                        phase.error_log.record(format!("{error:#}"));
                        phase.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(join) => {
                        phase
                            .error_log
                            .record(format!("operation task failed: {join}"));
                        phase.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let elapsed = began.elapsed();
    if let Some(progress) = progress {
        progress.abort();
        // Awaiting the aborted task drops its handle on the phase.
        let _ = progress.await;
    }
    let phase = Arc::try_unwrap(phase).unwrap_or_else(|_| unreachable!("all tasks joined"));
    Measured {
        ok: phase.ok.into_inner(),
        errors: phase.errors.into_inner(),
        bytes: phase.bytes.into_inner(),
        elapsed,
        latency: phase.latency,
        error_log: phase.error_log,
    }
}

/// Times `future`, turning its byte count into a [`Done`].
pub(crate) async fn timed<Fut>(future: Fut) -> anyhow::Result<Done>
where
    Fut: Future<Output = anyhow::Result<u64>>,
{
    let started = Instant::now();
    let bytes = future.await?;
    Ok(Done {
        bytes,
        latency: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Mutex;

    fn plan(count: u64, warmup: u64) -> LoadPlan {
        LoadPlan {
            count,
            concurrency: 8,
            warmup,
            duration: None,
            quiet: true,
        }
    }

    #[tokio::test]
    async fn every_index_runs_once_and_warmup_is_not_measured() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let measured = drive(
            "test",
            &plan(100, 10),
            move |i| {
                let record = record.clone();
                async move {
                    record.lock().unwrap().push(i);
                    if i % 25 == 0 {
                        anyhow::bail!("index {i} fails");
                    }
                    Ok(Done {
                        bytes: 2,
                        latency: Duration::from_millis(1),
                    })
                }
            },
            String::new,
        )
        .await;
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 110);
        assert_eq!(seen.iter().copied().collect::<HashSet<_>>().len(), 110);
        // Measured indices are 10..110; of these 25, 50, 75 and 100 fail.
        assert_eq!((measured.ok, measured.errors, measured.bytes), (96, 4, 192));
        assert_eq!(measured.latency.summary().samples, 96);
        assert_eq!(measured.error_log.samples().len(), 4);
    }

    #[tokio::test]
    async fn a_panicking_operation_counts_as_an_error() {
        let measured = drive(
            "test",
            &plan(3, 0),
            |i| async move {
                assert_ne!(i, 1, "boom");
                Ok(Done {
                    bytes: 0,
                    latency: Duration::ZERO,
                })
            },
            String::new,
        )
        .await;
        assert_eq!((measured.ok, measured.errors), (2, 1));
    }

    #[tokio::test]
    async fn duration_stops_early() {
        let mut plan = plan(1_000_000, 0);
        plan.duration = Some(Duration::from_millis(50));
        let measured = drive(
            "test",
            &plan,
            |_| async {
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok(Done {
                    bytes: 0,
                    latency: Duration::ZERO,
                })
            },
            String::new,
        )
        .await;
        assert!(measured.ok < 1000, "{} ops ran", measured.ok);
    }
}
