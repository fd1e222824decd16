//! REAPI domain types shared by buildkube's server, worker and tools:
//! parsed digests, ByteStream resource names, the rules for input trees and
//! command paths, a CAS client that picks batch or streaming calls by size,
//! and the channel (plaintext or TLS) it and the other clients talk over.

mod cas_client;
mod digest;
mod paths;
mod resource;
pub mod tls;
mod tree;
mod tree_stream;

pub use cas_client::{
    connect_channel, with_bearer_token, AuthChannel, BearerToken, CasClient, CasClientError,
    BYTESTREAM_CHUNK,
};
pub use digest::{Digest, DigestError, Hasher};
pub use paths::{
    command_outputs, relative_path, CommandPath, CommandPathError, CommandPathField, PathError,
};
pub use resource::{Compression, ReadResource, ResourceError, WriteResource};
pub use tree::{
    validate_directory, validate_tree, EntryKind, TreeError, TreeLimits, TreePath, TreeStats,
};
pub use tree_stream::{TreeStreamDecoder, TreeStreamError};
