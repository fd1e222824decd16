use std::sync::Arc;

use buildkube_proto::bytestream::{
    byte_stream_server::ByteStream, QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest,
    ReadResponse, WriteRequest, WriteResponse,
};
use buildkube_reapi::{Compression, ReadResource, WriteResource, BYTESTREAM_CHUNK};
use futures::stream::BoxStream;
use futures::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use buildkube_config::auth::Scope;

use crate::auth::Caller;
use crate::error::bad_resource;
use crate::farm::Farm;
use crate::metrics::Metrics;
use crate::storage::{contains, BlobSink, BlobStream, StorageError};

use super::uploads::{OpenError, UploadTable};
use super::zstd_stream::{compress_stream, ZstdDecoder};

/// ByteStream Read / Write / QueryWriteStatus over the CAS. Unfinished writes
/// stay resumable by resource name, within the bounds of [`UploadTable`].
pub struct ByteStreamService {
    farm: Arc<Farm>,
    uploads: Arc<UploadTable>,
}

impl ByteStreamService {
    /// The service over `farm`, holding at most `max_open_uploads` unfinished uploads.
    pub fn new(farm: Arc<Farm>, max_open_uploads: usize) -> Self {
        ByteStreamService {
            farm,
            uploads: UploadTable::new(max_open_uploads),
        }
    }

    /// Appends to an upload; when unfinished uploads fill the store's
    /// budget, abandoned ones are dropped to make room and it is tried again.
    async fn append(
        &self,
        writer: &mut Box<dyn BlobSink>,
        offset: i64,
        data: bytes::Bytes,
    ) -> Result<(), Status> {
        match writer.append(offset, data.clone()).await {
            Err(StorageError::UploadsFull { .. }) if self.uploads.drop_parked() > 0 => {
                tracing::info!(digest = %writer.digest(), "dropped abandoned uploads to make room for an upload");
                Ok(writer
                    .append(offset, data)
                    .await
                    .inspect_err(|e| self.note_full(e))?)
            }
            result => Ok(result.inspect_err(|e| self.note_full(e))?),
        }
    }

    fn note_full(&self, error: &StorageError) {
        if matches!(error, StorageError::UploadsFull { .. }) {
            self.farm.metrics.limit_hit("cas-max-size");
            tracing::warn!(%error, "upload refused");
        }
    }

    async fn write_inner(
        &self,
        caller: Caller,
        mut stream: Streaming<WriteRequest>,
    ) -> Result<WriteResponse, Status> {
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("Write stream carried no request"))?;
        let name = first.resource_name.clone();
        let resource = WriteResource::parse(&name).map_err(bad_resource)?;
        self.farm.instances.check(&resource.instance)?;
        caller.require_cas(Scope::WriteCas, &resource.instance)?;
        let digest = resource.digest;
        let compressed = resource.compression == Compression::Zstd;
        if contains(&*self.farm.cas, &digest).await? {
            // Already stored: the client may stop sending (-1 for a
            // compressed upload, as the REAPI says).
            self.uploads.remove(&name);
            return Ok(WriteResponse {
                committed_size: if compressed { -1 } else { digest.size() as i64 },
            });
        }
        let hold = self
            .uploads
            .open(&name, || self.farm.cas.begin_write(resource.digest))
            .await
            .inspect_err(|e| {
                if let OpenError::Full { .. } = e {
                    self.farm.metrics.limit_hit("max-open-uploads");
                    tracing::warn!(error = %e, "upload refused");
                }
            })?;
        let upload = hold.upload.clone();
        // A compressed stream is decoded as it arrives. Its first
        // write_offset is where it starts in the uncompressed blob (0, or
        // where QueryWriteStatus said to resume); later ones add the
        // compressed bytes sent so far.
        let mut decoder = if compressed {
            Some(ZstdDecoder::new()?)
        } else {
            None
        };
        let mut next_offset: Option<i64> = None;
        let mut request = Some(first);
        loop {
            let Some(message) = request.take() else { break };
            if !message.resource_name.is_empty() && message.resource_name != name {
                return Err(Status::invalid_argument(format!(
                    "resource_name changed mid-stream from {name:?} to {:?}",
                    message.resource_name
                )));
            }
            let finish = message.finish_write;
            let outcome = async {
                let mut writer = upload.lock().await;
                match decoder.as_mut() {
                    None => {
                        self.append(&mut writer, message.write_offset, message.data)
                            .await?
                    }
                    Some(decoder) => {
                        let expected =
                            next_offset.unwrap_or_else(|| writer.committed_size() as i64);
                        if message.write_offset != expected {
                            return Err(Status::invalid_argument(format!(
                                "write_offset {} of compressed upload {name:?}, expected {expected}",
                                message.write_offset
                            )));
                        }
                        next_offset = Some(expected + message.data.len() as i64);
                        let what = format!("compressed upload of {digest}");
                        let mut consumed = 0;
                        while let Some(piece) =
                            decoder.next_piece(&message.data, &mut consumed, &what)?
                        {
                            let at = writer.committed_size() as i64;
                            self.append(&mut writer, at, piece).await?;
                        }
                    }
                }
                if finish {
                    if writer.committed_size() != writer.digest().size() {
                        return Err(Status::invalid_argument(format!(
                            "finish_write after {} of {} bytes of {}",
                            writer.committed_size(),
                            writer.digest().size(),
                            writer.digest()
                        )));
                    }
                    writer.commit().await?;
                }
                Ok::<_, Status>(())
            }
            .await;
            if let Err(status) = outcome {
                // A bad chunk poisons the upload: start over from zero.
                self.uploads.remove(&name);
                return Err(status);
            }
            if finish {
                self.uploads.remove(&name);
                Metrics::add(&self.farm.metrics.cas_bytes_written, digest.size());
                return Ok(WriteResponse {
                    // Compressed: the offset the client's next byte would have had.
                    committed_size: next_offset.unwrap_or(digest.size() as i64),
                });
            }
            request = stream.message().await?;
        }
        // The client went away without finishing: keep the upload for resumption.
        let committed = upload.lock().await.committed_size();
        Err(Status::invalid_argument(format!(
            "Write stream for {digest} ended at {committed} bytes without finish_write; resume with QueryWriteStatus"
        )))
    }
}

#[tonic::async_trait]
impl ByteStream for ByteStreamService {
    type ReadStream = BoxStream<'static, Result<ReadResponse, Status>>;

    #[tracing::instrument(skip_all, fields(resource = %request.get_ref().resource_name))]
    async fn read(
        &self,
        request: Request<ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        let resource = ReadResource::parse(&request.resource_name).map_err(bad_resource)?;
        self.farm.instances.check(&resource.instance)?;
        caller.require_cas(Scope::Read, &resource.instance)?;
        let digest = resource.digest;
        let size = digest.size() as i64;
        if request.read_offset < 0 || request.read_offset > size {
            return Err(Status::out_of_range(format!(
                "read_offset {} is outside blob {digest}",
                request.read_offset
            )));
        }
        if request.read_limit < 0 {
            return Err(Status::invalid_argument(format!(
                "read_limit {} is negative",
                request.read_limit
            )));
        }
        let compressed = resource.compression == Compression::Zstd;
        if compressed && request.read_limit != 0 {
            return Err(Status::invalid_argument(format!(
                "read_limit {} with compressed-blobs: it must be 0 (the REAPI has no limit on compressed reads)",
                request.read_limit
            )));
        }
        let available = size - request.read_offset;
        let remaining = if request.read_limit == 0 {
            available
        } else {
            request.read_limit.min(available)
        } as u64;
        if digest.is_empty_blob() && !compressed {
            return Ok(Response::new(Box::pin(futures::stream::iter([Ok(
                ReadResponse {
                    data: Default::default(),
                },
            )]))));
        }
        let chunks: BlobStream = if digest.is_empty_blob() {
            Box::pin(futures::stream::empty())
        } else {
            let Some(chunks) = self
                .farm
                .cas
                .read(&digest, request.read_offset as u64, remaining)
                .await?
            else {
                Metrics::add(&self.farm.metrics.cas_misses, 1);
                return Err(Status::not_found(format!("blob {digest} not found")));
            };
            chunks
        };
        Metrics::add(&self.farm.metrics.cas_hits, 1);
        let chunks: BlobStream = if compressed {
            Box::pin(compress_stream(chunks)?)
        } else {
            chunks
        };
        let farm = self.farm.clone();
        let stream = chunks.flat_map(move |chunk| {
            let responses: Vec<Result<ReadResponse, Status>> = match chunk {
                Ok(chunk) => {
                    Metrics::add(&farm.metrics.cas_bytes_read, chunk.len() as u64);
                    (0..chunk.len())
                        .step_by(BYTESTREAM_CHUNK)
                        .map(|at| {
                            Ok(ReadResponse {
                                data: chunk.slice(at..(at + BYTESTREAM_CHUNK).min(chunk.len())),
                            })
                        })
                        .collect()
                }
                Err(e) => vec![Err(Status::from(e))],
            };
            futures::stream::iter(responses)
        });
        Ok(Response::new(stream.boxed()))
    }

    #[tracing::instrument(skip_all)]
    async fn write(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        let caller = Caller::of(&request);
        self.write_inner(caller, request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(resource = %request.get_ref().resource_name))]
    async fn query_write_status(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        let caller = Caller::of(&request);
        let name = request.into_inner().resource_name;
        let resource = WriteResource::parse(&name).map_err(bad_resource)?;
        self.farm.instances.check(&resource.instance)?;
        caller.require_cas(Scope::Read, &resource.instance)?;
        if contains(&*self.farm.cas, &resource.digest).await? {
            return Ok(Response::new(QueryWriteStatusResponse {
                committed_size: resource.digest.size() as i64,
                complete: true,
            }));
        }
        let upload = self.uploads.get(&name);
        match upload {
            Some(upload) => Ok(Response::new(QueryWriteStatusResponse {
                committed_size: upload.lock().await.committed_size() as i64,
                complete: false,
            })),
            None => Err(Status::not_found(format!(
                "no upload in progress for {name}"
            ))),
        }
    }
}
