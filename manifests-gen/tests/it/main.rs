//! manifests-gen's integration tests: one binary, one module per concern.
//!
//! - `snapshots`: every generated file of every overlay, one snapshot per
//!   top-level directory (`==== path ====` headers);
//! - `check`: the committed `overlays/` is what the generator writes;
//! - `spec_errors`: rejected specs name the field;
//! - `built`: `kubectl kustomize` of every overlay, strict schema
//!   validation, and the cross-object invariants over the built objects;
//! - `jobs`: CI jobs' objects: pools that run steps, the webhook Secret and
//!   the webhook Ingress (their invariants run with `built`'s).

mod built;
mod check;
mod images;
mod jobs;
mod snapshots;
mod spec_errors;

use std::path::PathBuf;

/// The workspace root, holding the committed `overlays/` and `images/`.
pub(crate) fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Settings shared by the snapshot assertions.
pub(crate) fn insta_settings() -> insta::Settings {
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path("snapshots");
    settings.set_prepend_module_to_snapshot(false);
    settings
}
