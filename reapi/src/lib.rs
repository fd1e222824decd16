//! REAPI domain types shared by buildkube's server, worker and tools:
//! parsed digests, ByteStream resource names, and a CAS client that picks
//! batch or streaming calls by size.

mod cas_client;
mod digest;
mod resource;

pub use cas_client::{
    connect_channel, AuthChannel, BearerToken, CasClient, CasClientError, BYTESTREAM_CHUNK,
};
pub use digest::{Digest, DigestError, Hasher};
pub use resource::{Compression, ReadResource, ResourceError, WriteResource};
