//! buildkube's end-to-end tests: one test binary, one module per area.
//!
//! They run the real `buildkube-server`, `buildkube-worker` and Bazel; build
//! the binaries first: `cargo build --workspace --bins`.

mod auth;
mod bounds;
mod cancel;
mod compression;
mod e2e_bazel;
mod execution;
mod external_stores;
mod faults;
mod jobs;
mod jobs_e2e;
mod jobs_worker_lost;
mod listeners;
mod podman;
mod podman_git;
mod protocol;
mod reapi_client;
mod restart;
mod right_answers;
mod startup;
