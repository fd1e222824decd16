//! Decoding a `Tree` message one `Directory` at a time, from chunks of its
//! encoding: memory bounded by the largest directory, not by the tree. An
//! action result's output tree can be as large as the CAS allows; whoever
//! checks it (the server, before serving a cached result) must not hold it
//! whole.

use buildkube_proto::reapi;
use bytes::{Buf, BytesMut};
use prost::Message;

/// Why a Tree encoding could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeStreamError {
    /// One directory's encoding is larger than the decoder accepts.
    #[error("a directory in the tree is {size} bytes, over the {limit}-byte limit")]
    DirectoryTooLarge {
        /// Its encoded size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The bytes are not a Tree message.
    #[error("not a valid Tree message: {0}")]
    Malformed(String),
}

/// Feeds on a Tree's encoding chunk by chunk and yields its directories
/// (`root` and `children`, in encoding order).
pub struct TreeStreamDecoder {
    buffer: BytesMut,
    max_directory_bytes: u64,
}

const WIRE_VARINT: u64 = 0;
const WIRE_FIXED64: u64 = 1;
const WIRE_LEN: u64 = 2;
const WIRE_FIXED32: u64 = 5;
/// Tree.root and Tree.children: both are Directory messages.
const FIELD_ROOT: u64 = 1;
const FIELD_CHILDREN: u64 = 2;

impl TreeStreamDecoder {
    /// A decoder refusing any directory encoded in more than `max_directory_bytes`.
    pub fn new(max_directory_bytes: u64) -> TreeStreamDecoder {
        TreeStreamDecoder {
            buffer: BytesMut::new(),
            max_directory_bytes,
        }
    }

    /// Adds `chunk` and returns every directory now complete.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<reapi::Directory>, TreeStreamError> {
        self.buffer.extend_from_slice(chunk);
        let mut directories = Vec::new();
        while let Some(directory) = self.next_field()? {
            directories.extend(directory);
        }
        Ok(directories)
    }

    /// Ends the input: an error if it stopped inside a field.
    pub fn finish(self) -> Result<(), TreeStreamError> {
        if self.buffer.is_empty() {
            Ok(())
        } else {
            Err(TreeStreamError::Malformed(format!(
                "{} bytes of an unfinished field at the end",
                self.buffer.len()
            )))
        }
    }

    /// Decodes the next whole field in the buffer: `Some(Some(dir))` for a
    /// directory, `Some(None)` for a skipped unknown field, `None` if the
    /// buffer ends before the field does.
    #[allow(clippy::option_option)]
    fn next_field(&mut self) -> Result<Option<Option<reapi::Directory>>, TreeStreamError> {
        let mut view = &self.buffer[..];
        let Some(key) = varint(&mut view)? else {
            return Ok(None);
        };
        let (field, wire_type) = (key >> 3, key & 7);
        if field == 0 {
            return Err(TreeStreamError::Malformed("field number 0".into()));
        }
        let body = match wire_type {
            WIRE_VARINT => match varint(&mut view)? {
                Some(_) => 0,
                None => return Ok(None),
            },
            WIRE_FIXED64 => 8,
            WIRE_FIXED32 => 4,
            WIRE_LEN => match varint(&mut view)? {
                Some(len) => len,
                None => return Ok(None),
            },
            other => {
                return Err(TreeStreamError::Malformed(format!(
                    "wire type {other} of field {field}"
                )))
            }
        };
        let is_directory =
            wire_type == WIRE_LEN && (field == FIELD_ROOT || field == FIELD_CHILDREN);
        // Every length-delimited field is held whole before it is decoded or
        // dropped, so each one is bounded (a Tree has only directories).
        if body > self.max_directory_bytes {
            return Err(if is_directory {
                TreeStreamError::DirectoryTooLarge {
                    size: body,
                    limit: self.max_directory_bytes,
                }
            } else {
                TreeStreamError::Malformed(format!(
                    "field {field} of {body} bytes, over the {}-byte limit",
                    self.max_directory_bytes
                ))
            });
        }
        if (view.len() as u64) < body {
            return Ok(None);
        }
        let header = self.buffer.len() - view.len();
        self.buffer.advance(header);
        let bytes = self.buffer.split_to(body as usize);
        if !is_directory {
            return Ok(Some(None));
        }
        reapi::Directory::decode(bytes.freeze())
            .map(|d| Some(Some(d)))
            .map_err(|e| TreeStreamError::Malformed(format!("field {field}: {e}")))
    }
}

/// A base-128 varint from the front of `buf`; `None` if it is cut short.
fn varint(buf: &mut &[u8]) -> Result<Option<u64>, TreeStreamError> {
    let mut value = 0u64;
    for (i, byte) in buf.iter().enumerate() {
        if i == 10 {
            return Err(TreeStreamError::Malformed(
                "varint longer than 10 bytes".into(),
            ));
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            *buf = &buf[i + 1..];
            return Ok(Some(value));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn directory(name: &str, files: usize) -> reapi::Directory {
        reapi::Directory {
            files: (0..files)
                .map(|i| reapi::FileNode {
                    name: format!("{name}-{i}"),
                    digest: Some(reapi::Digest {
                        hash: format!("{i:064x}"),
                        size_bytes: i as i64,
                    }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn tree() -> reapi::Tree {
        reapi::Tree {
            root: Some(directory("root", 3)),
            children: (0..20).map(|i| directory(&format!("c{i}"), i)).collect(),
        }
    }

    fn decode_in_chunks(
        bytes: &[u8],
        chunk: usize,
        limit: u64,
    ) -> Result<Vec<reapi::Directory>, TreeStreamError> {
        let mut decoder = TreeStreamDecoder::new(limit);
        let mut out = Vec::new();
        for piece in bytes.chunks(chunk) {
            out.extend(decoder.push(piece)?);
        }
        decoder.finish()?;
        Ok(out)
    }

    #[test]
    fn yields_every_directory_whatever_the_chunking() {
        let tree = tree();
        let bytes = tree.encode_to_vec();
        let expected: Vec<_> = tree.root.iter().chain(&tree.children).cloned().collect();
        for chunk in [1, 2, 3, 7, 64, 1000, bytes.len()] {
            assert_eq!(
                decode_in_chunks(&bytes, chunk, 1 << 20).unwrap(),
                expected,
                "chunks of {chunk}"
            );
        }
    }

    #[test]
    fn a_directory_over_the_limit_is_refused_before_it_is_buffered() {
        let big = reapi::Tree {
            root: Some(directory("root", 1000)),
            children: vec![],
        };
        let bytes = big.encode_to_vec();
        let mut decoder = TreeStreamDecoder::new(1024);
        // Only the field header has arrived: the declared size already refuses it.
        let err = decoder.push(&bytes[..4]).unwrap_err();
        assert!(
            matches!(err, TreeStreamError::DirectoryTooLarge { limit: 1024, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_cut_tree_or_garbage_is_malformed() {
        let bytes = tree().encode_to_vec();
        let err = decode_in_chunks(&bytes[..bytes.len() - 1], 5, 1 << 20).unwrap_err();
        assert!(matches!(err, TreeStreamError::Malformed(_)), "{err}");
        // Field 1 with wire type 3 (a deprecated group).
        let err = decode_in_chunks(&[0x0b, 0], 1, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("wire type 3"), "{err}");
        // A length-delimited field 1 whose body is not a Directory.
        let err = decode_in_chunks(&[0x0a, 0x02, 0xff, 0xff], 1, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("field 1"), "{err}");
    }

    #[test]
    fn unknown_fields_are_skipped() {
        let mut bytes = vec![0x18, 0x96, 0x01]; // field 3, varint 150
        bytes.extend([0x22, 0x02, b'h', b'i']); // field 4, 2 bytes
        bytes.extend(tree().encode_to_vec());
        assert_eq!(decode_in_chunks(&bytes, 3, 1 << 20).unwrap().len(), 21);
    }
}
