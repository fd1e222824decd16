//! Zstandard for the CAS's `compressed-blobs` resources and compressed
//! batch uploads: streaming in both directions, with bounded memory.
//! Decompression never produces more than the blob's declared size, so a
//! small "zip bomb" cannot make the server allocate more than that.

use bytes::Bytes;
use futures::{Stream, StreamExt as _};
use tonic::Status;
use zstd::stream::raw::{Decoder, Encoder, Operation as _};

use crate::storage::{BlobStream, StorageError};

/// Compression level of blobs the server sends compressed: the fastest
/// level, since a 2-core server otherwise spends its reads compressing.
const LEVEL: i32 = 1;

/// Output produced per step.
const STEP: usize = 128 * 1024;

fn zstd_error(what: &str) -> impl FnOnce(std::io::Error) -> Status + '_ {
    move |e| Status::invalid_argument(format!("{what}: not valid zstd data: {e}"))
}

/// A streaming decompressor for one `compressed-blobs` write stream.
pub(crate) struct ZstdDecoder {
    raw: Decoder<'static>,
    out: Vec<u8>,
}

impl ZstdDecoder {
    pub(crate) fn new() -> Result<ZstdDecoder, Status> {
        Ok(ZstdDecoder {
            raw: Decoder::new()
                .map_err(|e| Status::internal(format!("starting a zstd decoder: {e}")))?,
            out: vec![0; STEP],
        })
    }

    /// The next piece (at most one step) of what `input` decompresses to,
    /// advancing `consumed`; `None` once `input` is used up and everything
    /// it holds was returned, or the decoder makes no more progress.
    pub(crate) fn next_piece(
        &mut self,
        input: &[u8],
        consumed: &mut usize,
        what: &str,
    ) -> Result<Option<Bytes>, Status> {
        loop {
            let before = *consumed;
            let status = self
                .raw
                .run_on_buffers(&input[*consumed..], &mut self.out)
                .map_err(zstd_error(what))?;
            *consumed += status.bytes_read;
            if status.bytes_written > 0 {
                return Ok(Some(Bytes::copy_from_slice(
                    &self.out[..status.bytes_written],
                )));
            }
            if *consumed == input.len() || *consumed == before {
                return Ok(None);
            }
        }
    }
}

/// Decompresses a whole batch-uploaded blob of `size` bytes; data that
/// expands beyond `size` is refused, not allocated.
pub(crate) fn decompress_exact(data: &[u8], size: u64, what: &str) -> Result<Bytes, Status> {
    let mut decoder = ZstdDecoder::new()?;
    let mut consumed = 0;
    let mut out = Vec::with_capacity(size.min(64 << 20) as usize);
    while let Some(piece) = decoder.next_piece(data, &mut consumed, what)? {
        if (out.len() + piece.len()) as u64 > size {
            return Err(Status::invalid_argument(format!(
                "{what}: decompresses to more than its {size} bytes"
            )));
        }
        out.extend_from_slice(&piece);
    }
    Ok(out.into())
}

/// The blob's chunks, zstd-compressed as one frame, in pieces of at most
/// a step each.
pub(crate) fn compress_stream(
    chunks: BlobStream,
) -> Result<impl Stream<Item = Result<Bytes, StorageError>>, Status> {
    let encoder = Encoder::new(LEVEL)
        .map_err(|e| Status::internal(format!("starting a zstd encoder: {e}")))?;
    struct State {
        chunks: Option<BlobStream>,
        encoder: Encoder<'static>,
        out: Vec<u8>,
    }
    let state = State {
        chunks: Some(chunks),
        encoder,
        out: vec![0; STEP],
    };
    let compressed = futures::stream::unfold(state, |mut state| async move {
        let chunks = state.chunks.as_mut()?;
        let result = match chunks.next().await {
            Some(Ok(chunk)) => compress_chunk(&mut state.encoder, &mut state.out, &chunk),
            Some(Err(e)) => {
                state.chunks = None;
                Err(e)
            }
            None => {
                state.chunks = None;
                finish_frame(&mut state.encoder, &mut state.out)
            }
        };
        Some((result, state))
    });
    Ok(compressed
        .filter(|piece| futures::future::ready(!matches!(piece, Ok(bytes) if bytes.is_empty()))))
}

fn compress_chunk(
    encoder: &mut Encoder<'static>,
    out: &mut [u8],
    chunk: &[u8],
) -> Result<Bytes, StorageError> {
    let mut compressed = Vec::new();
    let mut consumed = 0;
    while consumed < chunk.len() {
        let status = encoder
            .run_on_buffers(&chunk[consumed..], out)
            .map_err(encoder_error)?;
        consumed += status.bytes_read;
        compressed.extend_from_slice(&out[..status.bytes_written]);
    }
    Ok(compressed.into())
}

fn finish_frame(encoder: &mut Encoder<'static>, out: &mut [u8]) -> Result<Bytes, StorageError> {
    let mut compressed = Vec::new();
    loop {
        let mut buffer = zstd::stream::raw::OutBuffer::around(&mut *out);
        let remaining = encoder.finish(&mut buffer, true).map_err(encoder_error)?;
        let written = buffer.pos();
        compressed.extend_from_slice(&out[..written]);
        if remaining == 0 {
            return Ok(compressed.into());
        }
    }
}

fn encoder_error(e: std::io::Error) -> StorageError {
    StorageError::Backend {
        store: "zstd",
        action: "compressing a blob".into(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use futures::TryStreamExt as _;

    use super::*;

    fn sample(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i % 251) as u8 ^ (i / 4096) as u8)
            .collect()
    }

    /// The whole compressed stream of `chunks`.
    async fn compress_all(chunks: BlobStream) -> Vec<u8> {
        let pieces: Vec<Bytes> = compress_stream(chunks)
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        pieces.concat()
    }

    #[tokio::test]
    async fn compressed_stream_decodes_to_the_blob() {
        let data = sample(3 * STEP + 17);
        let chunks: BlobStream = Box::pin(futures::stream::iter(
            data.chunks(50_000)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect::<Vec<_>>(),
        ));
        let compressed = compress_all(chunks).await;
        assert!(compressed.len() < data.len() / 2);
        assert_eq!(zstd::decode_all(&compressed[..]).unwrap(), data);
        assert_eq!(
            decompress_exact(&compressed, data.len() as u64, "blob").unwrap(),
            data
        );
    }

    #[tokio::test]
    async fn empty_blob_is_one_empty_frame() {
        let chunks: BlobStream = Box::pin(futures::stream::empty());
        let compressed = compress_all(chunks).await;
        assert!(!compressed.is_empty());
        assert!(zstd::decode_all(&compressed[..]).unwrap().is_empty());
    }

    #[test]
    fn expansion_beyond_the_declared_size_is_refused() {
        // 64 MiB of zeros compress to a few KiB.
        let bomb = zstd::encode_all(&vec![0u8; 64 << 20][..], 3).unwrap();
        assert!(bomb.len() < 64 << 10);
        let err = decompress_exact(&bomb, 1 << 20, "blob x").unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().contains("more than its 1048576 bytes"),
            "{err}"
        );
        let err = decompress_exact(b"not zstd at all", 10, "blob y").unwrap_err();
        assert!(err.message().contains("not valid zstd"), "{err}");
    }
}
