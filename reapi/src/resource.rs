//! ByteStream resource names, as the REAPI defines them:
//! reads `{instance}/blobs/{hash}/{size}[/...]`, writes
//! `{instance}/uploads/{uuid}/blobs/{hash}/{size}[/...]`; the instance part
//! may be empty (then the name starts with `blobs/` or `uploads/`). In
//! place of `blobs`, `compressed-blobs/zstd` names the same blob carried
//! zstd-compressed (hash and size stay those of the uncompressed bytes).

use crate::digest::{parse_size, Digest, DigestError};

/// Why a resource name was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResourceError {
    /// The name does not have the expected shape.
    #[error("resource name `{name}` is malformed: expected {expected}")]
    Malformed {
        /// The name as given.
        name: String,
        /// The shape we wanted.
        expected: &'static str,
    },
    /// A compressor other than those supported was asked for.
    #[error("resource name `{name}` asks for compressor `{compressor}`; supported: zstd (see GetCapabilities)")]
    UnsupportedCompressor {
        /// The name as given.
        name: String,
        /// The compressor segment.
        compressor: String,
    },
    /// The digest in the name is invalid.
    #[error("resource name `{name}`: {source}")]
    Digest {
        /// The name as given.
        name: String,
        /// What was wrong with the digest.
        source: DigestError,
    },
}

/// How the bytes of a ByteStream resource travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// As they are (`blobs/...`).
    #[default]
    Identity,
    /// Zstandard-compressed (`compressed-blobs/zstd/...`).
    Zstd,
}

impl Compression {
    /// The path segments that precede `{hash}/{size}`.
    fn blob_prefix(self) -> &'static str {
        match self {
            Compression::Identity => "blobs",
            Compression::Zstd => "compressed-blobs/zstd",
        }
    }
}

/// A parsed ByteStream read resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadResource {
    /// Instance name ("" when absent).
    pub instance: String,
    /// Blob to read.
    pub digest: Digest,
    /// How its bytes are sent.
    pub compression: Compression,
}

/// A parsed ByteStream write resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteResource {
    /// Instance name ("" when absent).
    pub instance: String,
    /// Client-chosen upload id (a UUID by convention; any non-empty segment accepted).
    pub upload_id: String,
    /// Blob being written.
    pub digest: Digest,
    /// How its bytes arrive.
    pub compression: Compression,
}

const READ_SHAPE: &str =
    "[{instance}/]blobs/{hash}/{size} or [{instance}/]compressed-blobs/zstd/{hash}/{size}";
const WRITE_SHAPE: &str = "[{instance}/]uploads/{uuid}/blobs/{hash}/{size} or [{instance}/]uploads/{uuid}/compressed-blobs/zstd/{hash}/{size}";

/// Parses `segments[at..]` as `blobs/{hash}/{size}` or
/// `compressed-blobs/{compressor}/{hash}/{size}` (trailing metadata allowed).
fn parse_blob(
    name: &str,
    segments: &[&str],
    at: usize,
    expected: &'static str,
) -> Result<(Digest, Compression), ResourceError> {
    let malformed = || ResourceError::Malformed {
        name: name.to_string(),
        expected,
    };
    let (compression, rest) = match segments.get(at).copied() {
        Some("blobs") => (Compression::Identity, &segments[at + 1..]),
        Some("compressed-blobs") => match segments.get(at + 1).copied() {
            Some("zstd") => (Compression::Zstd, &segments[at + 2..]),
            Some(other) => {
                return Err(ResourceError::UnsupportedCompressor {
                    name: name.to_string(),
                    compressor: other.to_string(),
                })
            }
            None => return Err(malformed()),
        },
        _ => return Err(malformed()),
    };
    if rest.len() < 2 {
        return Err(malformed());
    }
    Ok((parse_digest(name, rest[0], rest[1], expected)?, compression))
}

fn parse_digest(
    name: &str,
    hash: &str,
    size: &str,
    expected: &'static str,
) -> Result<Digest, ResourceError> {
    let size = parse_size(size).ok_or_else(|| ResourceError::Malformed {
        name: name.to_string(),
        expected,
    })?;
    Digest::from_hex(hash, size).map_err(|source| ResourceError::Digest {
        name: name.to_string(),
        source,
    })
}

impl ReadResource {
    /// Parses a read resource name.
    pub fn parse(name: &str) -> Result<ReadResource, ResourceError> {
        let segments: Vec<&str> = name.split('/').collect();
        let malformed = || ResourceError::Malformed {
            name: name.to_string(),
            expected: READ_SHAPE,
        };
        let at = segments
            .iter()
            .position(|s| *s == "blobs" || *s == "compressed-blobs")
            .ok_or_else(malformed)?;
        if segments[..at].iter().any(|s| s.is_empty()) {
            return Err(malformed());
        }
        let (digest, compression) = parse_blob(name, &segments, at, READ_SHAPE)?;
        Ok(ReadResource {
            instance: segments[..at].join("/"),
            digest,
            compression,
        })
    }

    /// Formats a read resource name.
    pub fn format(instance: &str, digest: &Digest) -> String {
        ReadResource::format_with(instance, digest, Compression::Identity)
    }

    /// Formats a read resource name for bytes sent with `compression`.
    pub fn format_with(instance: &str, digest: &Digest, compression: Compression) -> String {
        let blob = format!(
            "{}/{}/{}",
            compression.blob_prefix(),
            digest.hash_hex(),
            digest.size()
        );
        if instance.is_empty() {
            blob
        } else {
            format!("{instance}/{blob}")
        }
    }
}

impl WriteResource {
    /// Parses a write resource name.
    pub fn parse(name: &str) -> Result<WriteResource, ResourceError> {
        let segments: Vec<&str> = name.split('/').collect();
        let malformed = || ResourceError::Malformed {
            name: name.to_string(),
            expected: WRITE_SHAPE,
        };
        let at = segments
            .iter()
            .position(|s| *s == "uploads")
            .ok_or_else(malformed)?;
        if segments.len() < at + 2
            || segments[at + 1].is_empty()
            || segments[..at].iter().any(|s| s.is_empty())
        {
            return Err(malformed());
        }
        let (digest, compression) = parse_blob(name, &segments, at + 2, WRITE_SHAPE)?;
        Ok(WriteResource {
            instance: segments[..at].join("/"),
            upload_id: segments[at + 1].to_string(),
            digest,
            compression,
        })
    }

    /// Formats a write resource name.
    pub fn format(instance: &str, upload_id: &str, digest: &Digest) -> String {
        WriteResource::format_with(instance, upload_id, digest, Compression::Identity)
    }

    /// Formats a write resource name for bytes sent with `compression`.
    pub fn format_with(
        instance: &str,
        upload_id: &str,
        digest: &Digest,
        compression: Compression,
    ) -> String {
        let blob = format!(
            "uploads/{upload_id}/{}/{}/{}",
            compression.blob_prefix(),
            digest.hash_hex(),
            digest.size()
        );
        if instance.is_empty() {
            blob
        } else {
            format!("{instance}/{blob}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    #[test]
    fn read_with_and_without_instance() {
        let r = ReadResource::parse(&format!("main/blobs/{HASH}/5")).unwrap();
        assert_eq!(r.instance, "main");
        assert_eq!(r.digest.size(), 5);
        let r = ReadResource::parse(&format!("blobs/{HASH}/5")).unwrap();
        assert_eq!(r.instance, "");
        let r = ReadResource::parse(&format!("a/b/blobs/{HASH}/5/extra")).unwrap();
        assert_eq!(r.instance, "a/b");
        assert_eq!(
            ReadResource::parse(&ReadResource::format("a/b", &r.digest)).unwrap(),
            r
        );
    }

    #[test]
    fn write_with_and_without_instance() {
        let name = format!("main/uploads/1234/blobs/{HASH}/5");
        let w = WriteResource::parse(&name).unwrap();
        assert_eq!(
            (w.instance.as_str(), w.upload_id.as_str()),
            ("main", "1234")
        );
        let w = WriteResource::parse(&format!("uploads/x/blobs/{HASH}/5/meta")).unwrap();
        assert_eq!(w.instance, "");
        assert_eq!(
            WriteResource::parse(&WriteResource::format("", "x", &w.digest)).unwrap(),
            w
        );
    }

    #[test]
    fn rejects_malformed_names() {
        for bad in [
            "".to_string(),
            "main".to_string(),
            "main/blobs".to_string(),
            format!("main/blobs/{HASH}"),
            format!("main/blobs/{HASH}/five"),
            format!("//blobs/{HASH}/5"),
            format!("main/uploads/blobs/{HASH}/5"),
            format!("main/uploads//blobs/{HASH}/5"),
            "main/compressed-blobs".to_string(),
            format!("main/compressed-blobs/zstd/{HASH}"),
            format!("main/uploads/u/compressed-blobs/zstd/{HASH}"),
            // Sizes as the REAPI prints them only (found by the
            // resource_names fuzz target: these named the blob of size 12).
            format!("main/blobs/{HASH}/012"),
            format!("main/blobs/{HASH}/+12"),
            format!("main/uploads/u/blobs/{HASH}/012"),
            format!("main/uploads/u/compressed-blobs/zstd/{HASH}/+12"),
        ] {
            assert!(
                matches!(
                    ReadResource::parse(&bad)
                        .err()
                        .or(WriteResource::parse(&bad).err()),
                    Some(ResourceError::Malformed { .. })
                ),
                "{bad:?} accepted"
            );
        }
        assert!(matches!(
            ReadResource::parse(&format!("main/blobs/{HASH}/-5")),
            Err(ResourceError::Digest { .. })
        ));
        assert!(matches!(
            ReadResource::parse("main/blobs/XYZ/5"),
            Err(ResourceError::Digest { .. })
        ));
        assert!(matches!(
            ReadResource::parse(&format!("main/compressed-blobs/deflate/{HASH}/5")),
            Err(ResourceError::UnsupportedCompressor { compressor, .. }) if compressor == "deflate"
        ));
    }

    #[test]
    fn compressed_names_round_trip() {
        let r = ReadResource::parse(&format!("a/b/compressed-blobs/zstd/{HASH}/5")).unwrap();
        assert_eq!(
            (r.instance.as_str(), r.compression, r.digest.size()),
            ("a/b", Compression::Zstd, 5)
        );
        assert_eq!(
            ReadResource::format_with("a/b", &r.digest, Compression::Zstd),
            format!("a/b/compressed-blobs/zstd/{HASH}/5")
        );
        let w = WriteResource::parse(&format!("uploads/u1/compressed-blobs/zstd/{HASH}/5/meta"))
            .unwrap();
        assert_eq!(
            (w.instance.as_str(), w.upload_id.as_str(), w.compression),
            ("", "u1", Compression::Zstd)
        );
        assert_eq!(
            WriteResource::parse(&WriteResource::format_with(
                "main",
                "u1",
                &w.digest,
                Compression::Zstd
            ))
            .unwrap()
            .compression,
            Compression::Zstd
        );
        assert_eq!(
            ReadResource::parse(&format!("main/blobs/{HASH}/5"))
                .unwrap()
                .compression,
            Compression::Identity
        );
    }
}
