//! `reapi-bench` against a real `buildkube-server` process on loopback
//! (started and killed, also on panic, by the `buildkube-tests` harness).
//! Checks correctness only: the figures a run prints are for notes, never
//! asserted. Build the binaries first: `cargo build --workspace --bins`.

use buildkube_tests::Server;
use clap::Parser;
use reapi_bench::{run, Cli, Report};

async fn bench(server: &Server, scenario: &[&str]) -> Report {
    let target = server.grpc_url();
    let mut args = vec!["reapi-bench", "--target", &target, "--quiet"];
    args.extend_from_slice(scenario);
    let cli = Cli::try_parse_from(&args).expect("valid flags");
    let report = run(&cli).await.unwrap_or_else(|e| {
        panic!(
            "{scenario:?} failed to run: {e:#}\nserver logs:\n{}",
            server.logs().tail(40)
        )
    });
    assert!(
        report.is_clean(),
        "{scenario:?}:\n{}\nserver logs:\n{}",
        report.render_text(),
        server.logs().tail(40)
    );
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_through_simulated_workers_loses_and_duplicates_nothing() {
    let server = Server::start().expect("buildkube-server starts");
    let report = bench(
        &server,
        &[
            // Issue 4's load shape: 1,000 actions in flight at once
            // through 50 worker connections (plus a warm-up).
            "dispatch",
            "--count",
            "1000",
            "--warmup",
            "20",
            "--workers",
            "50",
        ],
    )
    .await;
    assert_eq!((report.ops, report.errors), (1000, 0));
    let counter = |name: &str| report.counters[name];
    assert_eq!(counter("actions_sent"), 1020);
    assert_eq!(counter("leases"), 1020);
    assert_eq!(counter("completes"), 1020);
    for zero in [
        "lost",
        "mismatched",
        "leased_twice",
        "completed_twice",
        "unleased",
        "worker_errors",
    ] {
        assert_eq!(counter(zero), 0, "{zero}");
    }
    assert_eq!(
        report.dispatch_latency.expect("dispatch latency").samples,
        1000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_scenarios_run_clean() {
    let server = Server::start().expect("buildkube-server starts");
    for scenario in [
        &[
            "cas-write",
            "--count",
            "100",
            "--size",
            "1KiB",
            "--batch-size",
            "4",
        ][..],
        &[
            "cas-write",
            "--count",
            "20",
            "--size",
            "200KiB",
            "--api",
            "bytestream",
        ],
        &[
            "cas-read",
            "--count",
            "100",
            "--size",
            "1KiB",
            "--batch-size",
            "4",
        ],
        &[
            "cas-read",
            "--count",
            "20",
            "--size",
            "200KiB",
            "--api",
            "bytestream",
        ],
        &[
            "cas-write",
            "--count",
            "20",
            "--size",
            "300KiB",
            "--api",
            "bytestream-zstd",
            "--compressible",
        ],
        &[
            "cas-read",
            "--count",
            "20",
            "--size",
            "300KiB",
            "--api",
            "bytestream-zstd",
        ],
        &[
            "find-missing",
            "--count",
            "50",
            "--digests",
            "20",
            "--blobs",
            "100",
        ],
        &[
            "ac-get",
            "--count",
            "100",
            "--entries",
            "50",
            "--miss-ratio",
            "0.5",
        ],
    ] {
        let report = bench(&server, scenario).await;
        assert_eq!(report.errors, 0, "{scenario:?}");
    }
}
