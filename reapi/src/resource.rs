//! ByteStream resource names, as the REAPI defines them:
//! reads `{instance}/blobs/{hash}/{size}[/...]`, writes
//! `{instance}/uploads/{uuid}/blobs/{hash}/{size}[/...]`; the instance part
//! may be empty (then the name starts with `blobs/` or `uploads/`).

use crate::digest::{Digest, DigestError};

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
    /// Compressed blobs were asked for; this server advertises no compressors.
    #[error("resource name `{0}` asks for compressed-blobs, but this server supports only identity (see GetCapabilities)")]
    Compressed(String),
    /// The digest in the name is invalid.
    #[error("resource name `{name}`: {source}")]
    Digest {
        /// The name as given.
        name: String,
        /// What was wrong with the digest.
        source: DigestError,
    },
}

/// A parsed ByteStream read resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadResource {
    /// Instance name ("" when absent).
    pub instance: String,
    /// Blob to read.
    pub digest: Digest,
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
}

const READ_SHAPE: &str = "[{instance}/]blobs/{hash}/{size}";
const WRITE_SHAPE: &str = "[{instance}/]uploads/{uuid}/blobs/{hash}/{size}";

fn parse_digest(
    name: &str,
    hash: &str,
    size: &str,
    expected: &'static str,
) -> Result<Digest, ResourceError> {
    let size: i64 = size.parse().map_err(|_| ResourceError::Malformed {
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
        if segments.contains(&"compressed-blobs") {
            return Err(ResourceError::Compressed(name.to_string()));
        }
        let at = segments
            .iter()
            .position(|s| *s == "blobs")
            .ok_or_else(malformed)?;
        if segments.len() < at + 3 || segments[..at].iter().any(|s| s.is_empty()) {
            return Err(malformed());
        }
        let digest = parse_digest(name, segments[at + 1], segments[at + 2], READ_SHAPE)?;
        Ok(ReadResource {
            instance: segments[..at].join("/"),
            digest,
        })
    }

    /// Formats a read resource name.
    pub fn format(instance: &str, digest: &Digest) -> String {
        let blob = format!("blobs/{}/{}", digest.hash_hex(), digest.size());
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
        if segments.contains(&"compressed-blobs") {
            return Err(ResourceError::Compressed(name.to_string()));
        }
        let at = segments
            .iter()
            .position(|s| *s == "uploads")
            .ok_or_else(malformed)?;
        if segments.len() < at + 5
            || segments[at + 1].is_empty()
            || segments[at + 2] != "blobs"
            || segments[..at].iter().any(|s| s.is_empty())
        {
            return Err(malformed());
        }
        let digest = parse_digest(name, segments[at + 3], segments[at + 4], WRITE_SHAPE)?;
        Ok(WriteResource {
            instance: segments[..at].join("/"),
            upload_id: segments[at + 1].to_string(),
            digest,
        })
    }

    /// Formats a write resource name.
    pub fn format(instance: &str, upload_id: &str, digest: &Digest) -> String {
        let blob = format!(
            "uploads/{upload_id}/blobs/{}/{}",
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
            ReadResource::parse(&format!("main/compressed-blobs/zstd/{HASH}/5")),
            Err(ResourceError::Compressed(_))
        ));
    }
}
