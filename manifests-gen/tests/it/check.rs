//! `manifests-gen --check` semantics, against the committed tree.

use manifests_gen::{outputs, StackSpec, REGENERATE};

use crate::workspace_root;

#[test]
fn committed_overlays_and_images_are_up_to_date() {
    let spec = StackSpec::default();
    for output in outputs(&spec) {
        let staleness = output
            .tree
            .check(&workspace_root().join(output.dir), &output.roots)
            .unwrap();
        assert!(
            staleness.is_fresh(),
            "{}/ is stale; regenerate with `{REGENERATE}` and commit:\n{}",
            output.dir,
            staleness.report
        );
    }
}

#[test]
fn check_mode_of_the_binary_passes_on_the_committed_tree() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_manifests-gen"))
        .args(["--check", "--out"])
        .arg(workspace_root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_mode_fails_with_a_diff_and_the_regenerate_command() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = StackSpec::default();
    for output in outputs(&spec) {
        output
            .tree
            .write(&dir.path().join(output.dir), &output.roots)
            .unwrap();
    }
    spec.server.max_attempts = 5;
    let config = dir.path().join("spec.yaml");
    std::fs::write(&config, serde_yaml::to_string(&spec).unwrap()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_manifests-gen"))
        .arg("--check")
        .arg("--config")
        .arg(&config)
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("--- a/base/server-deployment.yaml"),
        "{stdout}"
    );
    assert!(
        stdout.contains("-        - --max-attempts=3\n+        - --max-attempts=5"),
        "{stdout}"
    );
    assert!(stderr.contains(REGENERATE), "{stderr}");
}

#[test]
fn schema_subcommand_prints_the_spec_schema() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_manifests-gen"))
        .arg("schema")
        .output()
        .unwrap();
    assert!(out.status.success());
    let schema: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(schema["title"], "StackSpec");
    assert_eq!(
        schema["additionalProperties"], false,
        "unknown fields are rejected"
    );
    assert!(schema["properties"]["worker_pools"].is_object());
}
