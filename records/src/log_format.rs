//! The bytes of the data-dir record log.
//!
//! ```text
//! file   = MAGIC frame*
//! frame  = len:u32le crc32(body):u32le body        (one RecordStore::apply)
//! body   = change*
//! change = 1:u8 kind_len:u8 kind key_len:u16le key value_len:u32le value   (put)
//!        | 2:u8 kind_len:u8 kind key_len:u16le key                         (delete)
//! ```
//!
//! A frame is written with one `write` and made durable by one fdatasync for
//! every frame of a group commit; a crash can leave only the last frames torn,
//! and the checksum finds them, so replay drops exactly what was never
//! acknowledged.

use crate::{RecordChange, MAX_APPLY_BYTES, MAX_KEY_BYTES, MAX_KIND_BYTES, MAX_RECORD_BYTES};

/// First bytes of a record log (and its format version).
pub(crate) const MAGIC: &[u8; 8] = b"BKREC01\n";
/// Frame header: length and checksum.
pub(crate) const FRAME_HEADER: usize = 8;
/// Largest body a frame may have: every change at its bounds.
pub(crate) const MAX_FRAME_BODY: usize = MAX_APPLY_BYTES + (1 << 20);

const PUT: u8 = 1;
const DELETE: u8 = 2;

/// Appends the frame of one apply to `out`; returns, per put, the offset
/// of its value from the frame's start and its length (in change order;
/// `None` for deletes).
pub(crate) fn encode_frame(changes: &[RecordChange], out: &mut Vec<u8>) -> Vec<Option<(u64, u32)>> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER]);
    let mut values = Vec::with_capacity(changes.len());
    for change in changes {
        let (kind, key) = (change.kind().as_bytes(), change.key().as_bytes());
        out.push(match change {
            RecordChange::Put { .. } => PUT,
            RecordChange::Delete { .. } => DELETE,
        });
        out.push(kind.len() as u8);
        out.extend_from_slice(kind);
        out.extend_from_slice(&(key.len() as u16).to_le_bytes());
        out.extend_from_slice(key);
        match change {
            RecordChange::Put { value, .. } => {
                out.extend_from_slice(&(value.len() as u32).to_le_bytes());
                values.push(Some(((out.len() - start) as u64, value.len() as u32)));
                out.extend_from_slice(value);
            }
            RecordChange::Delete { .. } => values.push(None),
        }
    }
    let body_len = (out.len() - start - FRAME_HEADER) as u32;
    let crc = crc32fast::hash(&out[start + FRAME_HEADER..]);
    out[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    values
}

/// One change as read back: the value by its place in the body.
pub(crate) enum StoredChange {
    Put {
        kind: String,
        key: String,
        /// Offset of the value within the body, and its length.
        value_at: usize,
        value_len: u32,
    },
    Delete {
        kind: String,
        key: String,
    },
}

/// Parses a frame body whose checksum matched. `None`: it is malformed
/// (a bug or a different format), which replay treats like a torn frame.
pub(crate) fn decode_body(body: &[u8]) -> Option<Vec<StoredChange>> {
    let mut cursor = Cursor { body, at: 0 };
    let mut changes = Vec::new();
    while cursor.at < body.len() {
        let op = cursor.take(1)?[0];
        let kind_len = cursor.take(1)?[0] as usize;
        if kind_len > MAX_KIND_BYTES {
            return None;
        }
        let kind = String::from_utf8(cursor.take(kind_len)?.to_vec()).ok()?;
        let key_len = u16::from_le_bytes(cursor.take(2)?.try_into().ok()?) as usize;
        if key_len > MAX_KEY_BYTES {
            return None;
        }
        let key = String::from_utf8(cursor.take(key_len)?.to_vec()).ok()?;
        match op {
            PUT => {
                let value_len = u32::from_le_bytes(cursor.take(4)?.try_into().ok()?);
                if value_len as usize > MAX_RECORD_BYTES {
                    return None;
                }
                let value_at = cursor.at;
                cursor.take(value_len as usize)?;
                changes.push(StoredChange::Put {
                    kind,
                    key,
                    value_at,
                    value_len,
                });
            }
            DELETE => changes.push(StoredChange::Delete { kind, key }),
            _ => return None,
        }
    }
    Some(changes)
}

struct Cursor<'a> {
    body: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let slice = self.body.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(slice)
    }
}
