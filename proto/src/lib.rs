//! Generated protobuf and gRPC types for buildkube.
//!
//! Generated code, and the [codec](codec) it uses: the module tree mirrors
//! the protobuf packages under `protos/`, and the short aliases below are
//! what the other crates use.
//! Well-known types (`Any`, `Duration`, `Timestamp`, ...) are [`prost_types`].

pub mod codec;

pub use prost;
pub use prost_types;
pub use tonic;
pub use tonic_prost;

/// `build.*` protobuf packages.
pub mod build {
    /// `build.bazel.*` protobuf packages.
    pub mod bazel {
        /// `build.bazel.remote.*` protobuf packages.
        pub mod remote {
            /// `build.bazel.remote.execution.*` protobuf packages.
            pub mod execution {
                /// Remote Execution API v2.
                #[allow(clippy::all, unreachable_pub, missing_docs, rustdoc::all)]
                pub mod v2 {
                    tonic::include_proto!("build.bazel.remote.execution.v2");
                }
            }
        }
        /// Semantic versions used by the capabilities API.
        #[allow(clippy::all, unreachable_pub, missing_docs, rustdoc::all)]
        pub mod semver {
            tonic::include_proto!("build.bazel.semver");
        }
    }
}

/// `google.*` protobuf packages.
pub mod google {
    /// The ByteStream API (large CAS blob transfer).
    #[allow(clippy::all, unreachable_pub, missing_docs, rustdoc::all)]
    pub mod bytestream {
        tonic::include_proto!("google.bytestream");
    }
    /// Long-running operations (wraps REAPI executions).
    #[allow(clippy::all, unreachable_pub, missing_docs, rustdoc::all)]
    pub mod longrunning {
        tonic::include_proto!("google.longrunning");
    }
    /// `google.rpc.Status`, `Code` and the standard error details.
    #[allow(clippy::all, unreachable_pub, missing_docs, rustdoc::all)]
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

/// `buildkube.*` protobuf packages.
pub mod buildkube {
    /// `buildkube.worker.*` protobuf packages.
    pub mod worker {
        /// The server/worker protocol.
        #[allow(clippy::all, unreachable_pub, missing_docs, rustdoc::all)]
        pub mod v1 {
            tonic::include_proto!("buildkube.worker.v1");
        }
    }
    /// `buildkube.jobs.*` protobuf packages.
    pub mod jobs {
        /// CI jobs: run, follow, cancel, logs.
        #[allow(clippy::all, unreachable_pub, missing_docs, rustdoc::all)]
        pub mod v1 {
            tonic::include_proto!("buildkube.jobs.v1");
        }
    }
}

pub use build::bazel::remote::execution::v2 as reapi;
pub use build::bazel::semver;
pub use buildkube::jobs::v1 as jobs;
pub use buildkube::worker::v1 as worker;
pub use google::bytestream;
pub use google::longrunning;
pub use google::rpc;

/// Encoded `FileDescriptorSet` of every file compiled into this crate, for
/// gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/file_descriptor_set.bin"));

#[cfg(test)]
mod tests;
