//! gRPC services: thin trait impls over [`crate::farm::Farm`].

mod action_cache;
mod bytestream;
mod capabilities;
mod cas;
mod execution;
mod get_tree;
mod jobs;
mod operations;
mod uploads;
mod worker;
mod zstd_stream;

pub use action_cache::ActionCacheService;
pub use bytestream::ByteStreamService;
pub use capabilities::CapabilitiesService;
pub use cas::CasService;
pub use execution::ExecutionService;
pub use jobs::JobsService;
pub use operations::OperationsService;
pub use worker::WorkerProtocolService;

/// Largest total payload accepted in one BatchUpdateBlobs / returned by BatchReadBlobs.
pub const MAX_BATCH_TOTAL_BYTES: i64 = 4 * 1024 * 1024;
/// Largest gRPC message the server decodes (batch limit plus framing headroom).
pub const MAX_GRPC_MESSAGE: usize = 8 * 1024 * 1024;
