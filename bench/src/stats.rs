//! What a run measured: latency histograms, counters, error samples, and the
//! report printed at the end (text or one JSON object).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Longest latency the histograms resolve (10 minutes, in microseconds);
/// longer samples are clamped to it.
const MAX_LATENCY_MICROS: u64 = 600_000_000;
/// Distinct error messages kept as samples; further ones are only counted.
const MAX_ERROR_SAMPLES: usize = 20;

/// A latency histogram shared by concurrent tasks.
pub(crate) struct LatencyRecorder(Mutex<Histogram<u64>>);

impl LatencyRecorder {
    pub(crate) fn new() -> LatencyRecorder {
        LatencyRecorder(Mutex::new(
            Histogram::new_with_bounds(1, MAX_LATENCY_MICROS, 3).expect("valid histogram bounds"),
        ))
    }

    pub(crate) fn record(&self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        self.0
            .lock()
            .expect("histogram lock")
            .saturating_record(micros);
    }

    pub(crate) fn summary(&self) -> LatencySummary {
        LatencySummary::of(&self.0.lock().expect("histogram lock"))
    }
}

/// Error messages seen, with how often each occurred.
#[derive(Default)]
pub(crate) struct ErrorLog(Mutex<BTreeMap<String, u64>>);

impl ErrorLog {
    pub(crate) fn record(&self, message: String) {
        let mut samples = self.0.lock().expect("error log lock");
        if samples.len() < MAX_ERROR_SAMPLES || samples.contains_key(&message) {
            *samples.entry(message).or_default() += 1;
        } else {
            *samples.entry("(other errors)".to_string()).or_default() += 1;
        }
    }

    pub(crate) fn samples(&self) -> Vec<ErrorSample> {
        let mut samples: Vec<ErrorSample> = self
            .0
            .lock()
            .expect("error log lock")
            .iter()
            .map(|(message, count)| ErrorSample {
                message: message.clone(),
                count: *count,
            })
            .collect();
        samples.sort_by(|a, b| {
            b.count
                .cmp(&a.count)
                .then_with(|| a.message.cmp(&b.message))
        });
        samples
    }
}

/// Percentiles of one latency histogram, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct LatencySummary {
    /// Number of samples.
    pub samples: u64,
    /// Mean.
    pub mean_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest sample.
    pub max_ms: f64,
}

impl LatencySummary {
    fn of(histogram: &Histogram<u64>) -> LatencySummary {
        let ms = |micros: u64| micros as f64 / 1000.0;
        if histogram.is_empty() {
            return LatencySummary {
                samples: 0,
                mean_ms: 0.0,
                p50_ms: 0.0,
                p90_ms: 0.0,
                p99_ms: 0.0,
                max_ms: 0.0,
            };
        }
        LatencySummary {
            samples: histogram.len(),
            mean_ms: histogram.mean() / 1000.0,
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p90_ms: ms(histogram.value_at_quantile(0.90)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            max_ms: ms(histogram.max()),
        }
    }

    fn render(&self) -> String {
        format!(
            "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms (mean {:.2} ms, {} samples)",
            self.p50_ms, self.p90_ms, self.p99_ms, self.max_ms, self.mean_ms, self.samples
        )
    }
}

/// One distinct error message and how often it occurred.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ErrorSample {
    /// The message.
    pub message: String,
    /// Occurrences.
    pub count: u64,
}

/// The result of one scenario run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Scenario name (`cas-write`, `dispatch`, ...).
    pub scenario: String,
    /// Endpoint driven.
    pub target: String,
    /// Instance name used.
    pub instance: String,
    /// The scenario's parameters as run (count, concurrency, size...).
    pub params: BTreeMap<String, serde_json::Value>,
    /// Measured operations that succeeded (warm-up excluded).
    pub ops: u64,
    /// Measured operations that failed.
    pub errors: u64,
    /// Wall-clock time of the measured phase.
    pub elapsed_secs: f64,
    /// Successful operations per second.
    pub ops_per_sec: f64,
    /// Payload megabytes (10^6 bytes) per second moved by successful operations.
    pub mb_per_sec: f64,
    /// Latency of one operation as the client saw it.
    pub latency: LatencySummary,
    /// `dispatch` only: time from Execute sent to a simulated worker holding the lease.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dispatch_latency: Option<LatencySummary>,
    /// Scenario-specific counts (cache hits, leases, duplicates...).
    pub counters: BTreeMap<String, u64>,
    /// Why things failed: each distinct message with its count.
    pub error_samples: Vec<ErrorSample>,
    /// Each a sentence saying what went wrong; empty when the run is clean.
    pub failures: Vec<String>,
}

impl Report {
    /// Whether nothing failed, was lost or was duplicated.
    pub fn is_clean(&self) -> bool {
        self.failures.is_empty()
    }

    /// The report as human-readable lines.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} against {} (instance `{}`)",
            self.scenario, self.target, self.instance
        );
        let params: Vec<String> = self
            .params
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(out, "  params:     {}", params.join(" "));
        let _ = writeln!(
            out,
            "  ops:        {} ok, {} errors in {:.3} s",
            self.ops, self.errors, self.elapsed_secs
        );
        let _ = writeln!(
            out,
            "  throughput: {:.1} ops/s, {:.2} MB/s",
            self.ops_per_sec, self.mb_per_sec
        );
        let _ = writeln!(out, "  latency:    {}", self.latency.render());
        if let Some(dispatch) = &self.dispatch_latency {
            let _ = writeln!(out, "  dispatch:   {}", dispatch.render());
        }
        if !self.counters.is_empty() {
            let counters: Vec<String> = self
                .counters
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let _ = writeln!(out, "  counters:   {}", counters.join(" "));
        }
        for sample in &self.error_samples {
            let _ = writeln!(out, "  error x{}: {}", sample.count, sample.message);
        }
        for failure in &self.failures {
            let _ = writeln!(out, "  FAILED: {failure}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_in_milliseconds() {
        let recorder = LatencyRecorder::new();
        for ms in 1..=100u64 {
            recorder.record(Duration::from_millis(ms));
        }
        let summary = recorder.summary();
        assert_eq!(summary.samples, 100);
        assert!((summary.p50_ms - 50.0).abs() < 0.1, "{summary:?}");
        assert!((summary.p99_ms - 99.0).abs() < 0.1, "{summary:?}");
        assert!((summary.max_ms - 100.0).abs() < 0.1, "{summary:?}");
    }

    #[test]
    fn empty_histogram_is_all_zero() {
        assert_eq!(LatencyRecorder::new().summary().samples, 0);
    }

    #[test]
    fn error_log_caps_distinct_messages() {
        let log = ErrorLog::default();
        for i in 0..30 {
            log.record(format!("error {i}"));
        }
        log.record("error 0".to_string());
        let samples = log.samples();
        assert_eq!(samples.len(), MAX_ERROR_SAMPLES + 1);
        assert_eq!(
            samples[0],
            ErrorSample {
                message: "(other errors)".into(),
                count: 10
            }
        );
        assert_eq!(
            samples[1],
            ErrorSample {
                message: "error 0".into(),
                count: 2
            }
        );
    }
}
