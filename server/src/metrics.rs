//! Counters kept by the services and the Prometheus text rendering of them.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use buildkube_config as names;

use buildkube_scheduler::SchedulerStats;

/// Counters updated by the gRPC services.
#[derive(Default)]
pub struct Metrics {
    /// Blobs asked for (FindMissingBlobs, reads) that were present.
    pub cas_hits: AtomicU64,
    /// Blobs asked for that were missing.
    pub cas_misses: AtomicU64,
    /// Bytes accepted into the CAS.
    pub cas_bytes_written: AtomicU64,
    /// Bytes served from the CAS.
    pub cas_bytes_read: AtomicU64,
    /// Action cache lookups that hit.
    pub ac_hits: AtomicU64,
    /// Action cache lookups that missed (including results with missing outputs).
    pub ac_misses: AtomicU64,
    /// Requests refused by a limit, by the limit's name (a fixed set: the
    /// flags, without `--`).
    limits_hit: Mutex<BTreeMap<&'static str, u64>>,
}

impl Metrics {
    /// Adds to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts a request refused because of the limit `flag` (its name without `--`).
    pub fn limit_hit(&self, flag: &'static str) {
        *self.limits_hit.lock().unwrap().entry(flag).or_default() += 1;
    }

    /// Requests refused by `flag` so far.
    pub fn limit_hits(&self, flag: &str) -> u64 {
        self.limits_hit
            .lock()
            .unwrap()
            .get(flag)
            .copied()
            .unwrap_or(0)
    }

    /// Renders everything in the Prometheus text format.
    pub fn render(&self, stats: &SchedulerStats, cas_bytes: u64, cas_blobs: usize) -> String {
        let mut out = String::new();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut gauge = |name: &str, help: &str, kind: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        gauge(
            names::METRIC_QUEUE_DEPTH,
            "Actions waiting for a worker.",
            "gauge",
        );
        let mut lines = String::new();
        for ((instance, platform), n) in &stats.queue_depth {
            let _ = writeln!(
                lines,
                "{}{{instance=\"{instance}\",platform=\"{platform}\"}} {n}",
                names::METRIC_QUEUE_DEPTH
            );
        }
        // Empty queues are dropped (their series with them), so with nothing
        // queued one unlabelled 0 says so instead of no series at all.
        if stats.queue_depth.is_empty() {
            let _ = writeln!(lines, "{} 0", names::METRIC_QUEUE_DEPTH);
        }
        out.push_str(&lines);
        let _ = writeln!(
            out,
            "# HELP {0} Actions leased to workers.\n# TYPE {0} gauge",
            names::METRIC_ACTIONS_RUNNING
        );
        if stats.running.is_empty() {
            let _ = writeln!(out, "{} 0", names::METRIC_ACTIONS_RUNNING);
        }
        for ((instance, platform), n) in &stats.running {
            let _ = writeln!(
                out,
                "{}{{instance=\"{instance}\",platform=\"{platform}\"}} {n}",
                names::METRIC_ACTIONS_RUNNING
            );
        }
        for (metric, help, pick) in [
            (
                names::METRIC_WORKERS_CONNECTED,
                "Workers seen within the lease timeout, by the platform they offer.",
                0,
            ),
            (
                names::METRIC_WORKERS_BUSY,
                "Workers running at least one action, by the platform they offer.",
                1,
            ),
        ] {
            let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} gauge");
            if stats.workers_by_platform.is_empty() {
                let _ = writeln!(out, "{metric} 0");
            }
            for ((instance, platform), counts) in &stats.workers_by_platform {
                let n = if pick == 0 { counts.0 } else { counts.1 };
                let _ = writeln!(
                    out,
                    "{metric}{{instance=\"{instance}\",platform=\"{platform}\"}} {n}"
                );
            }
        }
        let _ = writeln!(out, "# HELP buildkube_actions_total Finished actions by outcome.\n# TYPE buildkube_actions_total counter");
        for (outcome, n) in &stats.outcomes {
            let _ = writeln!(
                out,
                "buildkube_actions_total{{outcome=\"{}\"}} {n}",
                outcome.label()
            );
        }
        let _ = writeln!(
            out,
            "# HELP {0} Requests refused because they exceeded a limit, by limit.\n# TYPE {0} counter",
            names::METRIC_LIMITS_HIT
        );
        for (limit, n) in self.limits_hit.lock().unwrap().iter() {
            let _ = writeln!(out, "{}{{limit=\"{limit}\"}} {n}", names::METRIC_LIMITS_HIT);
        }
        let hits = get(&self.cas_hits);
        let misses = get(&self.cas_misses);
        let ratio = if hits + misses == 0 {
            0.0
        } else {
            hits as f64 / (hits + misses) as f64
        };
        let ac_hits = get(&self.ac_hits);
        let ac_misses = get(&self.ac_misses);
        let ac_ratio = if ac_hits + ac_misses == 0 {
            0.0
        } else {
            ac_hits as f64 / (ac_hits + ac_misses) as f64
        };
        let _ = write!(
            out,
            "# HELP buildkube_cas_bytes Bytes stored in the CAS.\n# TYPE buildkube_cas_bytes gauge\nbuildkube_cas_bytes {cas_bytes}\n\
             # HELP buildkube_cas_blobs Blobs stored in the CAS.\n# TYPE buildkube_cas_blobs gauge\nbuildkube_cas_blobs {cas_blobs}\n\
             # HELP buildkube_cas_lookups_total Blob lookups by result.\n# TYPE buildkube_cas_lookups_total counter\n\
             buildkube_cas_lookups_total{{result=\"hit\"}} {hits}\nbuildkube_cas_lookups_total{{result=\"miss\"}} {misses}\n\
             # HELP buildkube_cas_hit_ratio Share of blob lookups that hit.\n# TYPE buildkube_cas_hit_ratio gauge\nbuildkube_cas_hit_ratio {ratio}\n\
             # HELP buildkube_cas_written_bytes_total Bytes accepted into the CAS.\n# TYPE buildkube_cas_written_bytes_total counter\nbuildkube_cas_written_bytes_total {}\n\
             # HELP buildkube_cas_read_bytes_total Bytes served from the CAS.\n# TYPE buildkube_cas_read_bytes_total counter\nbuildkube_cas_read_bytes_total {}\n\
             # HELP buildkube_action_cache_lookups_total Action cache lookups by result.\n# TYPE buildkube_action_cache_lookups_total counter\n\
             buildkube_action_cache_lookups_total{{result=\"hit\"}} {ac_hits}\nbuildkube_action_cache_lookups_total{{result=\"miss\"}} {ac_misses}\n\
             # HELP buildkube_action_cache_hit_ratio Share of action cache lookups that hit.\n# TYPE buildkube_action_cache_hit_ratio gauge\nbuildkube_action_cache_hit_ratio {ac_ratio}\n",
            get(&self.cas_bytes_written),
            get(&self.cas_bytes_read),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The series follow the scheduler's stats one to one, so a bounded
    /// stats map (see the scheduler's bounds tests) is a bounded /metrics.
    #[test]
    fn one_series_per_queue_and_one_zero_when_idle() {
        let series = |text: &str, metric: &str| {
            text.lines()
                .filter(|l| l.starts_with(metric) && !l.starts_with('#'))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        let mut stats = SchedulerStats::default();
        for platform in ["", "gpu=1"] {
            let labels = ("main".to_string(), platform.to_string());
            stats.queue_depth.insert(labels.clone(), 2);
            stats.running.insert(labels, 0);
        }
        let busy = Metrics::default().render(&stats, 0, 0);
        assert_eq!(
            series(&busy, names::METRIC_QUEUE_DEPTH),
            [
                "buildkube_queue_depth{instance=\"main\",platform=\"\"} 2",
                "buildkube_queue_depth{instance=\"main\",platform=\"gpu=1\"} 2"
            ]
        );
        assert_eq!(series(&busy, names::METRIC_ACTIONS_RUNNING).len(), 2);
        let idle = Metrics::default().render(&SchedulerStats::default(), 0, 0);
        assert_eq!(
            series(&idle, names::METRIC_QUEUE_DEPTH),
            ["buildkube_queue_depth 0"]
        );
        assert_eq!(
            series(&idle, names::METRIC_ACTIONS_RUNNING),
            ["buildkube_actions_running 0"]
        );
    }
}
