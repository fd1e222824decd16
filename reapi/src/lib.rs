//! REAPI domain types shared by buildkube's server, worker and tools:
//! parsed digests, ByteStream resource names, the rules for input trees and
//! command paths, and a CAS client that picks batch or streaming calls by
//! size.

mod cas_client;
mod digest;
mod paths;
mod resource;
mod tree;

pub use cas_client::{
    connect_channel, AuthChannel, BearerToken, CasClient, CasClientError, BYTESTREAM_CHUNK,
};
pub use digest::{Digest, DigestError, Hasher};
pub use paths::{
    command_outputs, relative_path, CommandPath, CommandPathError, CommandPathField, PathError,
};
pub use resource::{Compression, ReadResource, ResourceError, WriteResource};
pub use tree::{
    validate_directory, validate_tree, EntryKind, TreeError, TreeLimits, TreePath, TreeStats,
};
