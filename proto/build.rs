//! Compiles the .proto files under protos/ with a vendored protoc, so a fresh
//! machine builds with `cargo build` alone.

use std::{env, path::PathBuf};

const PROTOS: &[&str] = &[
    "protos/build/bazel/semver/semver.proto",
    "protos/build/bazel/remote/execution/v2/remote_execution.proto",
    "protos/google/bytestream/bytestream.proto",
    "protos/google/longrunning/operations.proto",
    "protos/google/rpc/code.proto",
    "protos/google/rpc/error_details.proto",
    "protos/google/rpc/status.proto",
    "protos/buildkube/worker/v1/worker.proto",
    "protos/buildkube/jobs/v1/jobs.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Always the vendored protoc: the same compiler everywhere.
    env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    let well_known = protoc_bin_vendored::include_path()?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    println!("cargo:rerun-if-changed=protos");

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Blob payloads are shared, not copied, on their way to and from disk.
        .bytes(".")
        // Undecodable requests are INVALID_ARGUMENT, not INTERNAL.
        .codec_path("crate::codec::ProtoCodec")
        .file_descriptor_set_path(out_dir.join("file_descriptor_set.bin"))
        .compile_protos(
            &PROTOS.iter().map(PathBuf::from).collect::<Vec<_>>(),
            &[PathBuf::from("protos"), well_known],
        )?;
    Ok(())
}
