use std::fmt;

use buildkube_proto::reapi;
use sha2::Digest as _;

/// A parsed SHA-256 content digest: 32 bytes of hash and a non-negative size.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hash: [u8; 32],
    size: u64,
}

/// Why a wire digest was rejected.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    /// The hash is not 64 lowercase hex characters.
    #[error("digest hash `{0}` is not 64 lowercase hex characters (SHA-256)")]
    BadHash(String),
    /// The size is negative.
    #[error("digest {hash} has negative size {size}")]
    NegativeSize {
        /// The hash as given.
        hash: String,
        /// The size as given.
        size: i64,
    },
    /// The digest field was absent.
    #[error("digest is missing")]
    Missing,
}

impl Digest {
    /// The digest of the empty blob.
    pub const EMPTY: Digest = Digest {
        hash: [
            0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f,
            0xb9, 0x24, 0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b,
            0x78, 0x52, 0xb8, 0x55,
        ],
        size: 0,
    };

    /// Digest of a byte slice.
    pub fn of_bytes(data: &[u8]) -> Digest {
        let mut hasher = Hasher::new();
        hasher.update(data);
        hasher.finish()
    }

    /// Digest of a protobuf message's canonical encoding.
    pub fn of_message<M: prost::Message>(message: &M) -> Digest {
        Digest::of_bytes(&message.encode_to_vec())
    }

    /// Builds a digest from its parts.
    pub fn new(hash: [u8; 32], size: u64) -> Digest {
        Digest { hash, size }
    }

    /// Parses a hex hash and a size, as found in resource names.
    pub fn from_hex(hash: &str, size: i64) -> Result<Digest, DigestError> {
        if hash.len() != 64 || !hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(DigestError::BadHash(hash.to_string()));
        }
        if size < 0 {
            return Err(DigestError::NegativeSize {
                hash: hash.to_string(),
                size,
            });
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hash, &mut bytes).map_err(|_| DigestError::BadHash(hash.into()))?;
        Ok(Digest {
            hash: bytes,
            size: size as u64,
        })
    }

    /// Parses an optional wire digest (a message field).
    pub fn from_field(digest: Option<&reapi::Digest>) -> Result<Digest, DigestError> {
        digest
            .ok_or(DigestError::Missing)
            .and_then(Digest::try_from)
    }

    /// The hash as 64 lowercase hex characters.
    pub fn hash_hex(&self) -> String {
        hex::encode(self.hash)
    }

    /// The raw hash bytes.
    pub fn hash_bytes(&self) -> &[u8; 32] {
        &self.hash
    }

    /// The blob size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether this is the empty blob, which always exists.
    pub fn is_empty_blob(&self) -> bool {
        *self == Digest::EMPTY
    }

    /// The wire form.
    pub fn to_proto(&self) -> reapi::Digest {
        reapi::Digest {
            hash: self.hash_hex(),
            size_bytes: self.size as i64,
        }
    }
}

impl TryFrom<&reapi::Digest> for Digest {
    type Error = DigestError;
    fn try_from(digest: &reapi::Digest) -> Result<Digest, DigestError> {
        Digest::from_hex(&digest.hash, digest.size_bytes)
    }
}

impl From<Digest> for reapi::Digest {
    fn from(digest: Digest) -> reapi::Digest {
        digest.to_proto()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.hash_hex(), self.size)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl std::str::FromStr for Digest {
    type Err = DigestError;
    /// Parses `HASH/SIZE`.
    fn from_str(text: &str) -> Result<Digest, DigestError> {
        let (hash, size) = text
            .split_once('/')
            .ok_or_else(|| DigestError::BadHash(text.to_string()))?;
        let size = parse_size(size).ok_or_else(|| DigestError::BadHash(text.to_string()))?;
        Digest::from_hex(hash, size)
    }
}

/// Parses a size written in text (resource names, `HASH/SIZE`) as the REAPI
/// prints it: decimal digits without a `+` or leading zeros, so that one
/// blob has one name. A leading `-` parses, for the negative-size error.
pub(crate) fn parse_size(text: &str) -> Option<i64> {
    let size: i64 = text.parse().ok()?;
    (size.to_string() == text).then_some(size)
}

/// Incremental digest computation.
#[derive(Default)]
pub struct Hasher {
    inner: sha2::Sha256,
    size: u64,
}

impl Hasher {
    /// A hasher with nothing hashed yet.
    pub fn new() -> Hasher {
        Hasher::default()
    }

    /// Adds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.inner.update(data);
        self.size += data.len() as u64;
    }

    /// Bytes hashed so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The digest of everything added.
    pub fn finish(self) -> Digest {
        Digest {
            hash: self.inner.finalize().into(),
            size: self.size,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_blob_constant_matches_sha256() {
        assert_eq!(Digest::of_bytes(b""), Digest::EMPTY);
        assert!(Digest::EMPTY.is_empty_blob());
    }

    #[test]
    fn known_digest() {
        let d = Digest::of_bytes(b"hello");
        assert_eq!(
            d.hash_hex(),
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(d.size(), 5);
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
    }

    #[test]
    fn rejects_bad_hashes_and_sizes() {
        assert!(matches!(
            Digest::from_hex("abc", 1),
            Err(DigestError::BadHash(_))
        ));
        let upper = "2CF24DBA5FB0A30E26E83B2AC5B9E29E1B161E5C1FA7425E73043362938B9824";
        assert!(matches!(
            Digest::from_hex(upper, 5),
            Err(DigestError::BadHash(_))
        ));
        let ok = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        assert!(matches!(
            Digest::from_hex(ok, -1),
            Err(DigestError::NegativeSize { size: -1, .. })
        ));
        assert_eq!(Digest::from_field(None), Err(DigestError::Missing));
        assert!("nonsense".parse::<Digest>().is_err());
    }

    #[test]
    fn text_sizes_are_canonical_decimal() {
        let hash = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        assert_eq!(
            format!("{hash}/5").parse::<Digest>().map(|d| d.size()),
            Ok(5)
        );
        assert_eq!(
            format!("{hash}/0").parse::<Digest>().map(|d| d.size()),
            Ok(0)
        );
        // Found by the resource_names fuzz target: these parsed as size 5
        // (or 0) and printed back differently.
        for size in ["05", "+5", "-0", "00", " 5", ""] {
            assert_eq!(
                format!("{hash}/{size}").parse::<Digest>(),
                Err(DigestError::BadHash(format!("{hash}/{size}"))),
                "{size:?}"
            );
        }
    }

    #[test]
    fn incremental_equals_one_shot() {
        let mut h = Hasher::new();
        h.update(b"hel");
        h.update(b"lo");
        assert_eq!(h.finish(), Digest::of_bytes(b"hello"));
    }
}
