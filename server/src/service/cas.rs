use std::sync::Arc;

use buildkube_proto::reapi::{
    self, batch_read_blobs_response, batch_update_blobs_response, compressor,
    content_addressable_storage_server::ContentAddressableStorage,
};
use buildkube_proto::rpc;
use buildkube_reapi::Digest;
use futures::stream::BoxStream;
use tonic::{Code, Request, Response, Status};

use super::get_tree::{stream_tree, PageToken, TreeOrders, DEFAULT_PAGE_SIZE};
use super::zstd_stream::decompress_exact;
use super::MAX_BATCH_TOTAL_BYTES;
use buildkube_config::auth::Scope;

use crate::auth::Caller;
use crate::error::bad_digest;
use crate::farm::Farm;
use crate::metrics::Metrics;
use crate::storage::cpu_work;

/// FindMissingBlobs, BatchUpdateBlobs, BatchReadBlobs, GetTree.
pub struct CasService {
    farm: Arc<Farm>,
    tree_orders: Arc<TreeOrders>,
}

impl CasService {
    /// The service over `farm`.
    pub fn new(farm: Arc<Farm>) -> Self {
        CasService {
            farm,
            tree_orders: Arc::default(),
        }
    }
}

fn item_status(code: Code, message: impl Into<String>) -> Option<rpc::Status> {
    Some(rpc::Status {
        code: code as i32,
        message: message.into(),
        details: vec![],
    })
}

fn parse_digests(digests: &[reapi::Digest], field: &str) -> Result<Vec<Digest>, Status> {
    digests
        .iter()
        .enumerate()
        .map(|(i, d)| Digest::try_from(d).map_err(|e| bad_digest(&format!("{field}[{i}]"), e)))
        .collect()
}

impl CasService {
    async fn update_one(
        &self,
        request: reapi::batch_update_blobs_request::Request,
    ) -> batch_update_blobs_response::Response {
        let digest = Digest::from_field(request.digest.as_ref());
        let data = match (&digest, compressor::Value::try_from(request.compressor)) {
            (Ok(d), Ok(compressor::Value::Zstd)) => decompress(*d, request.data).await,
            (_, Ok(compressor::Value::Identity)) | (Err(_), _) => Ok(request.data),
            (_, other) => Err(Status::invalid_argument(format!(
                "compressor {} is not supported: identity or zstd (see GetCapabilities)",
                other.map_or_else(
                    |_| request.compressor.to_string(),
                    |c| c.as_str_name().to_string()
                )
            ))),
        };
        let status = match (digest, data) {
            (Err(e), _) => item_status(Code::InvalidArgument, e.to_string()),
            (Ok(_), Err(status)) => item_status(status.code(), status.message()),
            (Ok(d), Ok(data)) => self.store_one(d, data).await,
        };
        batch_update_blobs_response::Response {
            digest: request.digest,
            status,
        }
    }

    async fn store_one(&self, digest: Digest, data: bytes::Bytes) -> Option<rpc::Status> {
        match digest {
            d if d.size() != data.len() as u64 => item_status(
                Code::InvalidArgument,
                format!(
                    "blob {d}: data is {} bytes, digest says {}",
                    data.len(),
                    d.size()
                ),
            ),
            d => match self.farm.cas.put(d, data).await {
                Ok(()) => {
                    Metrics::add(&self.farm.metrics.cas_bytes_written, d.size());
                    item_status(Code::Ok, "")
                }
                Err(e) => {
                    let status = Status::from(e);
                    item_status(status.code(), status.message())
                }
            },
        }
    }
}

/// A zstd-compressed batch item, decompressed (on a blocking thread when large).
async fn decompress(digest: Digest, data: bytes::Bytes) -> Result<bytes::Bytes, Status> {
    let what = format!("blob {digest}");
    cpu_work(data.len(), move || {
        decompress_exact(&data, digest.size(), &what)
    })
    .await
    .map_err(|e| Status::internal(format!("decompression task failed: {e}")))?
}

#[tonic::async_trait]
impl ContentAddressableStorage for CasService {
    #[tracing::instrument(skip_all, fields(instance = %request.get_ref().instance_name, blobs = request.get_ref().blob_digests.len()))]
    async fn find_missing_blobs(
        &self,
        request: Request<reapi::FindMissingBlobsRequest>,
    ) -> Result<Response<reapi::FindMissingBlobsResponse>, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        self.farm.instances.check(&request.instance_name)?;
        caller.require_cas(Scope::Read, &request.instance_name)?;
        let digests = parse_digests(&request.blob_digests, "blob_digests")?;
        let missing = self.farm.cas.find_missing(&digests).await?;
        Metrics::add(&self.farm.metrics.cas_misses, missing.len() as u64);
        Metrics::add(
            &self.farm.metrics.cas_hits,
            (digests.len() - missing.len()) as u64,
        );
        Ok(Response::new(reapi::FindMissingBlobsResponse {
            missing_blob_digests: missing.iter().map(Digest::to_proto).collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(instance = %request.get_ref().instance_name, blobs = request.get_ref().requests.len()))]
    async fn batch_update_blobs(
        &self,
        request: Request<reapi::BatchUpdateBlobsRequest>,
    ) -> Result<Response<reapi::BatchUpdateBlobsResponse>, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        self.farm.instances.check(&request.instance_name)?;
        caller.require_cas(Scope::WriteCas, &request.instance_name)?;
        let total: i64 = request.requests.iter().map(|r| r.data.len() as i64).sum();
        if total > MAX_BATCH_TOTAL_BYTES {
            return Err(Status::invalid_argument(format!(
                "batch carries {total} bytes, over max_batch_total_size_bytes {MAX_BATCH_TOTAL_BYTES}; use ByteStream.Write for large blobs"
            )));
        }
        let responses =
            futures::future::join_all(request.requests.into_iter().map(|r| self.update_one(r)))
                .await;
        Ok(Response::new(reapi::BatchUpdateBlobsResponse { responses }))
    }

    #[tracing::instrument(skip_all, fields(instance = %request.get_ref().instance_name, blobs = request.get_ref().digests.len()))]
    async fn batch_read_blobs(
        &self,
        request: Request<reapi::BatchReadBlobsRequest>,
    ) -> Result<Response<reapi::BatchReadBlobsResponse>, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        self.farm.instances.check(&request.instance_name)?;
        caller.require_cas(Scope::Read, &request.instance_name)?;
        let digests = parse_digests(&request.digests, "digests")?;
        let total: u64 = digests.iter().map(Digest::size).sum();
        if total > MAX_BATCH_TOTAL_BYTES as u64 {
            return Err(Status::invalid_argument(format!(
                "batch asks for {total} bytes, over max_batch_total_size_bytes {MAX_BATCH_TOTAL_BYTES}; use ByteStream.Read for large blobs"
            )));
        }
        let mut responses = Vec::with_capacity(digests.len());
        for (digest, wire) in digests.iter().zip(request.digests) {
            let (data, status) = match self.farm.cas.get(digest).await {
                Ok(Some(data)) => {
                    Metrics::add(&self.farm.metrics.cas_hits, 1);
                    Metrics::add(&self.farm.metrics.cas_bytes_read, digest.size());
                    (data, item_status(Code::Ok, ""))
                }
                Ok(None) => {
                    Metrics::add(&self.farm.metrics.cas_misses, 1);
                    (
                        Default::default(),
                        item_status(Code::NotFound, format!("blob {digest} not found")),
                    )
                }
                Err(e) => {
                    let status = Status::from(e);
                    (
                        Default::default(),
                        item_status(status.code(), status.message()),
                    )
                }
            };
            responses.push(batch_read_blobs_response::Response {
                digest: Some(wire),
                data,
                status,
                compressor: compressor::Value::Identity as i32,
            });
        }
        Ok(Response::new(reapi::BatchReadBlobsResponse { responses }))
    }

    type GetTreeStream = BoxStream<'static, Result<reapi::GetTreeResponse, Status>>;

    #[tracing::instrument(skip_all, fields(instance = %request.get_ref().instance_name))]
    async fn get_tree(
        &self,
        request: Request<reapi::GetTreeRequest>,
    ) -> Result<Response<Self::GetTreeStream>, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        self.farm.instances.check(&request.instance_name)?;
        caller.require_cas(Scope::Read, &request.instance_name)?;
        let root = Digest::from_field(request.root_digest.as_ref())
            .map_err(|e| bad_digest("root_digest", e))?;
        if request.page_size < 0 {
            return Err(Status::invalid_argument(format!(
                "page_size {} is negative",
                request.page_size
            )));
        }
        let start = PageToken::parse(&request.page_token, root)?;
        // Answered before the stream starts, as clients expect.
        if !self.farm.cas.find_missing(&[root]).await?.is_empty() {
            return Err(Status::not_found(format!(
                "root directory {root} not found"
            )));
        }
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n as usize,
        };
        // Two pages in flight at most: the walk waits for a slow client.
        let (pages, stream) = tokio::sync::mpsc::channel(2);
        tokio::spawn(stream_tree(
            self.farm.clone(),
            self.tree_orders.clone(),
            start,
            page_size,
            pages,
        ));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(stream),
        )))
    }
}
