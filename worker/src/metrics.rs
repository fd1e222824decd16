//! The worker's Prometheus metrics, kept as atomics and rendered as text.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Gauge: actions running on this worker.
pub const METRIC_ACTIONS_RUNNING: &str = "buildkube_worker_actions_running";
/// Counter: finished actions, labelled `outcome`.
pub const METRIC_ACTIONS_COMPLETED: &str = "buildkube_worker_actions_completed_total";
/// Counter: input files found in the local file cache.
pub const METRIC_CACHE_HITS: &str = "buildkube_worker_file_cache_hits_total";
/// Counter: input files fetched from the CAS.
pub const METRIC_CACHE_MISSES: &str = "buildkube_worker_file_cache_misses_total";
/// Gauge: bytes held by the local file cache.
pub const METRIC_CACHE_BYTES: &str = "buildkube_worker_file_cache_bytes";
/// Counter: bytes downloaded from the CAS.
pub const METRIC_BYTES_DOWNLOADED: &str = "buildkube_worker_bytes_downloaded_total";
/// Counter: bytes uploaded to the CAS.
pub const METRIC_BYTES_UPLOADED: &str = "buildkube_worker_bytes_uploaded_total";
/// Gauge: action slots (the worker's concurrency).
pub const METRIC_SLOTS: &str = "buildkube_worker_slots";
/// Gauge: 1 while the worker drains (takes no new work).
pub const METRIC_DRAINING: &str = "buildkube_worker_draining";

/// How an action ended, as counted in [`METRIC_ACTIONS_COMPLETED`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Ran and exited 0.
    Success,
    /// Ran and exited non-zero (or was killed by a signal).
    Failure,
    /// Hit its timeout.
    Timeout,
    /// Could not be run or its outputs not collected (an error status).
    Error,
    /// The server told us to stop it; nothing reported.
    Abandoned,
}

impl Outcome {
    const ALL: [Outcome; 5] = [
        Outcome::Success,
        Outcome::Failure,
        Outcome::Timeout,
        Outcome::Error,
        Outcome::Abandoned,
    ];

    fn label(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Timeout => "timeout",
            Outcome::Error => "error",
            Outcome::Abandoned => "abandoned",
        }
    }
}

/// Counters and gauges shared by every part of the worker.
#[derive(Debug, Default)]
pub(crate) struct WorkerMetrics {
    pub(crate) actions_running: AtomicU64,
    completed: [AtomicU64; 5],
    pub(crate) cache_hits: AtomicU64,
    pub(crate) cache_misses: AtomicU64,
    pub(crate) cache_bytes: AtomicU64,
    pub(crate) bytes_downloaded: AtomicU64,
    pub(crate) bytes_uploaded: AtomicU64,
    pub(crate) slots: AtomicU64,
    pub(crate) draining: AtomicBool,
}

impl WorkerMetrics {
    pub(crate) fn completed(&self, outcome: Outcome) {
        let index = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0);
        self.completed[index].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn completed_count(&self, outcome: Outcome) -> u64 {
        let index = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0);
        self.completed[index].load(Ordering::Relaxed)
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Prometheus text exposition format, labelled with the worker id.
    pub(crate) fn render(&self, worker_id: &str) -> String {
        let mut out = String::new();
        let worker = worker_id.replace('\\', "\\\\").replace('"', "\\\"");
        let mut gauge = |name: &str, help: &str, kind: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{worker=\"{worker}\"}} {value}"
            );
        };
        gauge(
            METRIC_ACTIONS_RUNNING,
            "Actions running on this worker.",
            "gauge",
            self.actions_running.load(Ordering::Relaxed),
        );
        gauge(
            METRIC_SLOTS,
            "Actions this worker runs at once.",
            "gauge",
            self.slots.load(Ordering::Relaxed),
        );
        gauge(
            METRIC_DRAINING,
            "1 while the worker drains.",
            "gauge",
            self.draining.load(Ordering::Relaxed) as u64,
        );
        gauge(
            METRIC_CACHE_HITS,
            "Input files found in the local file cache.",
            "counter",
            self.cache_hits.load(Ordering::Relaxed),
        );
        gauge(
            METRIC_CACHE_MISSES,
            "Input files fetched from the CAS.",
            "counter",
            self.cache_misses.load(Ordering::Relaxed),
        );
        gauge(
            METRIC_CACHE_BYTES,
            "Bytes held by the local file cache.",
            "gauge",
            self.cache_bytes.load(Ordering::Relaxed),
        );
        gauge(
            METRIC_BYTES_DOWNLOADED,
            "Bytes downloaded from the CAS.",
            "counter",
            self.bytes_downloaded.load(Ordering::Relaxed),
        );
        gauge(
            METRIC_BYTES_UPLOADED,
            "Bytes uploaded to the CAS.",
            "counter",
            self.bytes_uploaded.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP {METRIC_ACTIONS_COMPLETED} Finished actions by outcome.\n# TYPE {METRIC_ACTIONS_COMPLETED} counter"
        );
        for outcome in Outcome::ALL {
            let _ = writeln!(
                out,
                "{METRIC_ACTIONS_COMPLETED}{{worker=\"{worker}\",outcome=\"{}\"}} {}",
                outcome.label(),
                self.completed_count(outcome)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_outcome() {
        let metrics = WorkerMetrics::default();
        metrics.completed(Outcome::Timeout);
        WorkerMetrics::add(&metrics.cache_hits, 3);
        let text = metrics.render("w\"1");
        assert!(
            text.contains(
                r#"buildkube_worker_actions_completed_total{worker="w\"1",outcome="timeout"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"buildkube_worker_file_cache_hits_total{worker="w\"1"} 3"#),
            "{text}"
        );
        assert_eq!(text.matches("outcome=").count(), 5);
    }
}
