//! Distinct blobs made cheaply: random filler shared by all blobs, made
//! unique by a prefix of the run's nonce and the blob's index.

use buildkube_reapi::Digest;
use bytes::{BufMut, Bytes, BytesMut};
use rand::Rng as _;

/// Bytes of the unique prefix; smaller blobs are truncated prefixes and may repeat.
const PREFIX_LEN: usize = 16;

/// Makes blob number `i` of a given size, different from every other run's.
#[derive(Clone)]
pub(crate) struct BlobMaker {
    nonce: u64,
    filler: Bytes,
}

impl BlobMaker {
    /// A maker for blobs of up to `max_size` bytes: random, or with
    /// `compressible` a random KiB repeated, every repeat with one byte
    /// changed (zstd level 1 makes about a quarter of it).
    pub(crate) fn new(max_size: u64, compressible: bool) -> BlobMaker {
        let mut filler = vec![0u8; max_size as usize];
        if compressible {
            let mut pattern = [0u8; 1024];
            rand::rng().fill_bytes(&mut pattern);
            for (n, block) in filler.chunks_mut(pattern.len()).enumerate() {
                block.copy_from_slice(&pattern[..block.len()]);
                block[0] = n as u8;
            }
            // Random runs between the repeats keep the ratio near 4:1.
            for block in filler.chunks_mut(4096) {
                let random = block.len().min(768);
                rand::rng().fill_bytes(&mut block[..random]);
            }
        } else {
            rand::rng().fill_bytes(&mut filler);
        }
        BlobMaker {
            nonce: rand::random(),
            filler: filler.into(),
        }
    }

    /// Blob `index` of `size` bytes (at most the maker's `max_size`) and its digest.
    pub(crate) fn blob(&self, index: u64, size: u64) -> (Digest, Bytes) {
        let size = size as usize;
        let mut data = BytesMut::with_capacity(size.max(PREFIX_LEN));
        data.put_u64(self.nonce);
        data.put_u64(index);
        data.truncate(size);
        if size > PREFIX_LEN {
            data.extend_from_slice(&self.filler[PREFIX_LEN..size]);
        }
        let data = data.freeze();
        (Digest::of_bytes(&data), data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_have_the_size_asked_and_differ_by_index() {
        let maker = BlobMaker::new(4096, false);
        let (d1, b1) = maker.blob(1, 4096);
        let (d2, b2) = maker.blob(2, 4096);
        assert_eq!((b1.len(), b2.len()), (4096, 4096));
        assert_ne!(d1, d2);
        assert_eq!(maker.blob(1, 4096).0, d1);
        assert_eq!(maker.blob(3, 5).1.len(), 5);
        assert_eq!(maker.blob(3, 0).0, Digest::EMPTY);
        assert_ne!(
            BlobMaker::new(64, false).blob(1, 64).0,
            BlobMaker::new(64, false).blob(1, 64).0
        );
    }
}
