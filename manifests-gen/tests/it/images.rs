//! The generated Dockerfile's builder image can build this workspace: its
//! Rust version (the workspace `rust-version`) is at least what every locked
//! dependency declares.

use std::process::Command;

/// `1.89` and `1.89.0` compare equal.
fn version(text: &str) -> [u64; 3] {
    let mut parts = [0; 3];
    for (slot, part) in parts.iter_mut().zip(text.split('.')) {
        *slot = part.parse().unwrap_or(0);
    }
    parts
}

#[test]
fn builder_image_rust_is_new_enough_for_every_locked_dependency() {
    let ours = env!("CARGO_PKG_RUST_VERSION");
    let dockerfile =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../images/Dockerfile"))
            .unwrap();
    assert!(
        dockerfile.contains(&format!("ARG RUST_IMAGE=rust:{ours}-bookworm")),
        "images/Dockerfile does not build with the workspace rust-version {ours}; run `cargo run -p manifests-gen`"
    );
    // Only the packages built for this (Linux) host, as in the image: the
    // sources of other platforms' dependencies are never downloaded by a
    // build, so --offline could not read them.
    let rustc = Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("rustc -vV runs");
    let host = String::from_utf8_lossy(&rustc.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("host: ").map(str::to_string))
        .expect("rustc -vV names the host");
    let output = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--offline", "--locked"])
        .args(["--filter-platform", &host])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let too_new: Vec<String> = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| {
            let needs = p["rust_version"].as_str()?;
            (version(needs) > version(ours))
                .then(|| format!("{} {} needs Rust {needs}", p["name"], p["version"]))
        })
        .collect();
    assert!(
        too_new.is_empty(),
        "the workspace rust-version {ours} (and the image's builder) is older than: {too_new:?}; raise rust-version in Cargo.toml"
    );
}
