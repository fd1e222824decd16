use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use buildkube_proto::bytestream::{
    byte_stream_server::ByteStream, QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest,
    ReadResponse, WriteRequest, WriteResponse,
};
use buildkube_reapi::{ReadResource, WriteResource, BYTESTREAM_CHUNK};
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tonic::{Request, Response, Status, Streaming};

use crate::error::bad_resource;
use crate::farm::Farm;
use crate::metrics::Metrics;
use crate::storage::BlobWriter;

type Upload = Arc<Mutex<BlobWriter>>;

/// An unfinished upload untouched this long is dropped (its temp file deleted).
const UPLOAD_IDLE_LIMIT: Duration = Duration::from_secs(15 * 60);

/// ByteStream Read / Write / QueryWriteStatus over the CAS. Unfinished writes
/// stay resumable (by resource name) for [`UPLOAD_IDLE_LIMIT`] or until the
/// server restarts.
pub struct ByteStreamService {
    farm: Arc<Farm>,
    uploads: Mutex<HashMap<String, (Instant, Upload)>>,
}

impl ByteStreamService {
    /// The service over `farm`.
    pub fn new(farm: Arc<Farm>) -> Self {
        ByteStreamService {
            farm,
            uploads: Mutex::new(HashMap::new()),
        }
    }

    fn upload_for(&self, name: &str, resource: &WriteResource) -> Result<Upload, Status> {
        let mut uploads = self.uploads.lock().unwrap();
        let now = Instant::now();
        uploads.retain(|name, (touched, _)| {
            let keep = now.duration_since(*touched) < UPLOAD_IDLE_LIMIT;
            if !keep {
                tracing::info!(resource = %name, "dropping abandoned upload");
            }
            keep
        });
        if let Some((touched, upload)) = uploads.get_mut(name) {
            *touched = now;
            return Ok(upload.clone());
        }
        let writer = self.farm.cas.begin_write(resource.digest)?;
        let upload = Arc::new(Mutex::new(writer));
        uploads.insert(name.to_string(), (now, upload.clone()));
        Ok(upload)
    }

    async fn write_inner(
        &self,
        mut stream: Streaming<WriteRequest>,
    ) -> Result<WriteResponse, Status> {
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("Write stream carried no request"))?;
        let name = first.resource_name.clone();
        let resource = WriteResource::parse(&name).map_err(bad_resource)?;
        self.farm.instances.check(&resource.instance)?;
        let digest = resource.digest;
        if self.farm.cas.contains(&digest) {
            // Already stored: the client may stop sending.
            self.uploads.lock().unwrap().remove(&name);
            return Ok(WriteResponse {
                committed_size: digest.size() as i64,
            });
        }
        let upload = self.upload_for(&name, &resource)?;
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
            let upload_for_chunk = upload.clone();
            let outcome = tokio::task::spawn_blocking(move || {
                let mut writer = upload_for_chunk.lock().unwrap();
                writer.append(message.write_offset, &message.data)?;
                if finish {
                    if writer.committed_size() != writer.digest().size() {
                        return Err(Status::invalid_argument(format!(
                            "finish_write after {} of {} bytes of {}",
                            writer.committed_size(),
                            writer.digest().size(),
                            writer.digest()
                        )));
                    }
                    writer.commit()?;
                }
                Ok::<_, Status>(())
            })
            .await
            .map_err(|e| Status::internal(format!("write task failed: {e}")))?;
            if let Err(status) = outcome {
                // A bad chunk poisons the upload: start over from zero.
                self.uploads.lock().unwrap().remove(&name);
                return Err(status);
            }
            if finish {
                self.uploads.lock().unwrap().remove(&name);
                Metrics::add(&self.farm.metrics.cas_bytes_written, digest.size());
                return Ok(WriteResponse {
                    committed_size: digest.size() as i64,
                });
            }
            request = stream.message().await?;
        }
        // The client went away without finishing: keep the upload for resumption.
        let committed = upload.lock().unwrap().committed_size();
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
        let request = request.into_inner();
        let resource = ReadResource::parse(&request.resource_name).map_err(bad_resource)?;
        self.farm.instances.check(&resource.instance)?;
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
        let available = size - request.read_offset;
        let mut remaining = if request.read_limit == 0 {
            available
        } else {
            request.read_limit.min(available)
        } as u64;
        if digest.is_empty_blob() {
            return Ok(Response::new(Box::pin(futures::stream::iter([Ok(
                ReadResponse {
                    data: Default::default(),
                },
            )]))));
        }
        let Some(mut file) = self.farm.cas.open_read(&digest).await? else {
            Metrics::add(&self.farm.metrics.cas_misses, 1);
            return Err(Status::not_found(format!("blob {digest} not found")));
        };
        Metrics::add(&self.farm.metrics.cas_hits, 1);
        file.seek(std::io::SeekFrom::Start(request.read_offset as u64))
            .await
            .map_err(|e| Status::internal(format!("seeking in blob {digest}: {e}")))?;
        let farm = self.farm.clone();
        let stream = async_read_stream(
            move || {
                let chunk = remaining.min(BYTESTREAM_CHUNK as u64) as usize;
                remaining -= chunk as u64;
                chunk
            },
            file,
            digest,
            farm,
        );
        Ok(Response::new(stream))
    }

    #[tracing::instrument(skip_all)]
    async fn write(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        self.write_inner(request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(resource = %request.get_ref().resource_name))]
    async fn query_write_status(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        let name = request.into_inner().resource_name;
        let resource = WriteResource::parse(&name).map_err(bad_resource)?;
        self.farm.instances.check(&resource.instance)?;
        if self.farm.cas.contains(&resource.digest) {
            return Ok(Response::new(QueryWriteStatusResponse {
                committed_size: resource.digest.size() as i64,
                complete: true,
            }));
        }
        let upload = self
            .uploads
            .lock()
            .unwrap()
            .get(&name)
            .map(|(_, upload)| upload.clone());
        match upload {
            Some(upload) => Ok(Response::new(QueryWriteStatusResponse {
                committed_size: upload.lock().unwrap().committed_size() as i64,
                complete: false,
            })),
            None => Err(Status::not_found(format!(
                "no upload in progress for {name}"
            ))),
        }
    }
}

/// Streams chunks from `file`; `next_len` says how many bytes the next chunk has (0 = done).
fn async_read_stream(
    mut next_len: impl FnMut() -> usize + Send + 'static,
    file: tokio::fs::File,
    digest: buildkube_reapi::Digest,
    farm: Arc<Farm>,
) -> BoxStream<'static, Result<ReadResponse, Status>> {
    futures::stream::unfold(Some(file), move |file| {
        let len = next_len();
        let farm = farm.clone();
        async move {
            let mut file = file?;
            if len == 0 {
                return None;
            }
            let mut buffer = vec![0u8; len];
            match file.read_exact(&mut buffer).await {
                Ok(_) => {
                    Metrics::add(&farm.metrics.cas_bytes_read, len as u64);
                    Some((
                        Ok(ReadResponse {
                            data: buffer.into(),
                        }),
                        Some(file),
                    ))
                }
                Err(e) => Some((
                    Err(Status::internal(format!("reading blob {digest}: {e}"))),
                    None,
                )),
            }
        }
    })
    .boxed()
}
