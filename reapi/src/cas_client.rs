//! A CAS client over the REAPI ContentAddressableStorage and ByteStream
//! services: small blobs go in batches, big ones stream, and every byte read
//! is checked against its digest.

use std::path::Path;

use buildkube_proto::bytestream::byte_stream_client::ByteStreamClient;
use buildkube_proto::bytestream::{ReadRequest, WriteRequest};
use buildkube_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use buildkube_proto::reapi::{self, batch_update_blobs_request};
use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use buildkube_config::ClientTlsArgs;

use crate::digest::{Digest, Hasher};
use crate::resource::{ReadResource, WriteResource};
use crate::tls::{TlsConnector, TlsError};

/// Chunk size of ByteStream reads and writes.
pub const BYTESTREAM_CHUNK: usize = 64 * 1024;
/// Blobs up to this size travel in batches; larger ones stream.
const BATCH_BLOB_LIMIT: u64 = 1 << 20;
/// Total payload of one batch request: under every server's 4 MiB default.
const BATCH_TOTAL_LIMIT: u64 = 3 << 20;
/// Digests per FindMissingBlobs call.
const FIND_MISSING_CHUNK: usize = 10_000;
/// Largest gRPC message accepted from the server.
const MAX_MESSAGE: usize = 64 << 20;

/// Adds `authorization: Bearer ...` to every call when a token is set.
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel that carries the bearer token, for any generated client.
pub type AuthChannel = InterceptedService<Channel, BearerToken>;

/// Why a CAS operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CasClientError {
    /// The endpoint address is not a URL tonic accepts.
    #[error("invalid endpoint `{endpoint}`: {message}")]
    Endpoint {
        /// Endpoint as given.
        endpoint: String,
        /// Parser's complaint.
        message: String,
    },
    /// The TLS files for an `https://` endpoint are unusable.
    #[error("TLS towards `{endpoint}`: {source}")]
    Tls {
        /// Endpoint as given.
        endpoint: String,
        /// What is wrong with the files.
        source: TlsError,
    },
    /// The bearer token holds characters a header cannot carry.
    #[error("the auth token is not valid header text")]
    TokenNotHeaderText,
    /// A call failed.
    #[error("{call} failed: {status}")]
    Rpc {
        /// Which call.
        call: &'static str,
        /// The gRPC status.
        status: tonic::Status,
    },
    /// The server does not have the blob.
    #[error("blob {0} is missing from the CAS")]
    Missing(Digest),
    /// The server sent bytes that do not match the digest.
    #[error("blob {expected} arrived corrupt: got {actual}")]
    Corrupt {
        /// What we asked for.
        expected: Digest,
        /// What the bytes hash to.
        actual: Digest,
    },
    /// A local file could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        /// What we were doing.
        action: &'static str,
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

impl CasClientError {
    /// The gRPC status this error came from, if any.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            CasClientError::Rpc { status, .. } => Some(status),
            _ => None,
        }
    }
}

fn io_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> CasClientError + 'a {
    move |source| CasClientError::Io {
        action,
        path: path.display().to_string(),
        source,
    }
}

/// Opens a lazily connecting channel to `endpoint` that sends `token` if set:
/// `http://host:port` (`grpc://` is a synonym) in plaintext, or
/// `https://host:port` (`grpcs://`) over TLS as `tls` says.
pub fn connect_channel(
    endpoint: &str,
    token: Option<&str>,
    tls: &ClientTlsArgs,
) -> Result<AuthChannel, CasClientError> {
    let bad = |message: String| CasClientError::Endpoint {
        endpoint: endpoint.to_string(),
        message,
    };
    let (url, secure) = if let Some(rest) = endpoint.strip_prefix("grpcs://") {
        (format!("https://{rest}"), true)
    } else if let Some(rest) = endpoint.strip_prefix("grpc://") {
        (format!("http://{rest}"), false)
    } else {
        (endpoint.to_string(), endpoint.starts_with("https://"))
    };
    let builder = Endpoint::from_shared(url)
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_while_idle(true);
    let channel = if secure {
        let connector = TlsConnector::new(tls.clone()).map_err(|source| CasClientError::Tls {
            endpoint: endpoint.to_string(),
            source,
        })?;
        builder.connect_with_connector_lazy(connector)
    } else if tls.is_set() {
        return Err(bad(
            "TLS files are set but the endpoint is plaintext; use https:// or grpcs://".into(),
        ));
    } else {
        builder.connect_lazy()
    };
    with_bearer_token(channel, token)
}

/// Wraps `channel` so that every call carries `token` (if set) as a bearer token.
pub fn with_bearer_token(
    channel: Channel,
    token: Option<&str>,
) -> Result<AuthChannel, CasClientError> {
    let token = match token {
        Some(token) => Some(
            format!("Bearer {}", token.trim())
                .parse()
                .map_err(|_| CasClientError::TokenNotHeaderText)?,
        ),
        None => None,
    };
    Ok(InterceptedService::new(channel, BearerToken(token)))
}

/// Client of one instance's CAS.
#[derive(Clone)]
pub struct CasClient {
    instance: String,
    cas: ContentAddressableStorageClient<AuthChannel>,
    bytestream: ByteStreamClient<AuthChannel>,
}

impl CasClient {
    /// A client of `instance` over `channel`.
    pub fn new(channel: AuthChannel, instance: &str) -> CasClient {
        CasClient {
            instance: instance.to_string(),
            cas: ContentAddressableStorageClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            bytestream: ByteStreamClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        }
    }

    /// The instance name this client talks to.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Which of `digests` the server lacks.
    pub async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, CasClientError> {
        let mut missing = Vec::new();
        for chunk in digests.chunks(FIND_MISSING_CHUNK) {
            let response = self
                .cas
                .clone()
                .find_missing_blobs(reapi::FindMissingBlobsRequest {
                    instance_name: self.instance.clone(),
                    blob_digests: chunk.iter().map(Digest::to_proto).collect(),
                    ..Default::default()
                })
                .await
                .map_err(|status| CasClientError::Rpc {
                    call: "FindMissingBlobs",
                    status,
                })?;
            for d in &response.get_ref().missing_blob_digests {
                missing.push(Digest::try_from(d).map_err(|e| CasClientError::Rpc {
                    call: "FindMissingBlobs",
                    status: tonic::Status::internal(format!("server returned a bad digest: {e}")),
                })?);
            }
        }
        Ok(missing)
    }

    /// Uploads in-memory blobs, batching the small ones.
    pub async fn upload_blobs(&self, blobs: Vec<(Digest, Bytes)>) -> Result<(), CasClientError> {
        let mut batch: Vec<batch_update_blobs_request::Request> = Vec::new();
        let mut batch_bytes = 0u64;
        for (digest, data) in blobs {
            if digest.size() > BATCH_BLOB_LIMIT {
                self.write_bytestream(digest, futures::stream::iter(chunks(data)).map(Ok))
                    .await?;
                continue;
            }
            if batch_bytes + digest.size() > BATCH_TOTAL_LIMIT {
                self.send_batch(std::mem::take(&mut batch)).await?;
                batch_bytes = 0;
            }
            batch_bytes += digest.size();
            batch.push(batch_update_blobs_request::Request {
                digest: Some(digest.to_proto()),
                data,
                ..Default::default()
            });
        }
        if !batch.is_empty() {
            self.send_batch(batch).await?;
        }
        Ok(())
    }

    /// Uploads one in-memory blob.
    pub async fn upload_blob(&self, digest: Digest, data: Bytes) -> Result<(), CasClientError> {
        self.upload_blobs(vec![(digest, data)]).await
    }

    /// Uploads a file whose digest is known, streaming it if it is big.
    pub async fn upload_file(&self, digest: Digest, path: &Path) -> Result<(), CasClientError> {
        if digest.size() <= BATCH_BLOB_LIMIT {
            let data = tokio::fs::read(path)
                .await
                .map_err(io_error("reading", path))?;
            return self.upload_blob(digest, data.into()).await;
        }
        let file = tokio::fs::File::open(path)
            .await
            .map_err(io_error("opening", path))?;
        let path_text = path.display().to_string();
        let stream = futures::stream::unfold(Some(file), move |file| {
            let path_text = path_text.clone();
            async move {
                let mut file = file?;
                let mut buffer = vec![0u8; BYTESTREAM_CHUNK];
                match file.read(&mut buffer).await {
                    Ok(0) => None,
                    Ok(n) => {
                        buffer.truncate(n);
                        Some((Ok(Bytes::from(buffer)), Some(file)))
                    }
                    Err(source) => Some((
                        Err(CasClientError::Io {
                            action: "reading",
                            path: path_text,
                            source,
                        }),
                        None,
                    )),
                }
            }
        });
        self.write_bytestream(digest, stream).await
    }

    async fn send_batch(
        &self,
        requests: Vec<batch_update_blobs_request::Request>,
    ) -> Result<(), CasClientError> {
        let response = self
            .cas
            .clone()
            .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
                instance_name: self.instance.clone(),
                requests,
                ..Default::default()
            })
            .await
            .map_err(|status| CasClientError::Rpc {
                call: "BatchUpdateBlobs",
                status,
            })?;
        for r in &response.get_ref().responses {
            let code = r.status.as_ref().map_or(0, |s| s.code);
            if code != 0 {
                let message = r
                    .status
                    .as_ref()
                    .map(|s| s.message.clone())
                    .unwrap_or_default();
                return Err(CasClientError::Rpc {
                    call: "BatchUpdateBlobs",
                    status: tonic::Status::new(tonic::Code::from(code), message),
                });
            }
        }
        Ok(())
    }

    /// Streams a blob through ByteStream.Write.
    pub async fn write_bytestream<S>(&self, digest: Digest, data: S) -> Result<(), CasClientError>
    where
        S: futures::Stream<Item = Result<Bytes, CasClientError>> + Send + 'static,
    {
        let resource =
            WriteResource::format(&self.instance, &uuid::Uuid::new_v4().to_string(), &digest);
        let size = digest.size() as i64;
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteRequest>(4);
        let (err_tx, mut err_rx) = tokio::sync::oneshot::channel();
        let feeder = tokio::spawn(async move {
            let mut offset = 0i64;
            let mut data = std::pin::pin!(data);
            let mut first = true;
            while let Some(chunk) = data.next().await {
                let chunk = match chunk {
                    Ok(chunk) => chunk,
                    Err(e) => {
                        let _ = err_tx.send(e);
                        return;
                    }
                };
                let len = chunk.len() as i64;
                let request = WriteRequest {
                    resource_name: if first {
                        resource.clone()
                    } else {
                        String::new()
                    },
                    write_offset: offset,
                    finish_write: offset + len == size,
                    data: chunk,
                };
                first = false;
                offset += len;
                if tx.send(request).await.is_err() {
                    return;
                }
            }
            if first || offset != size {
                // Empty blob or a short source: send a final (possibly empty) frame.
                let _ = tx
                    .send(WriteRequest {
                        resource_name: if first {
                            resource.clone()
                        } else {
                            String::new()
                        },
                        write_offset: offset,
                        finish_write: true,
                        data: Bytes::new(),
                    })
                    .await;
            }
        });
        let result = self
            .bytestream
            .clone()
            .write(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        let _ = feeder.await;
        if let Ok(e) = err_rx.try_recv() {
            return Err(e);
        }
        let response = result.map_err(|status| CasClientError::Rpc {
            call: "ByteStream.Write",
            status,
        })?;
        let committed = response.get_ref().committed_size;
        if committed != size && committed != -1 {
            return Err(CasClientError::Rpc {
                call: "ByteStream.Write",
                status: tonic::Status::data_loss(format!(
                    "server committed {committed} bytes of {digest}"
                )),
            });
        }
        Ok(())
    }

    /// Reads one blob into memory and verifies it.
    pub async fn read_blob(&self, digest: Digest) -> Result<Bytes, CasClientError> {
        if digest.is_empty_blob() {
            return Ok(Bytes::new());
        }
        if digest.size() <= BATCH_BLOB_LIMIT {
            // A response that leaves the blob out means it is missing, not empty.
            let blobs = self.read_blobs(&[digest]).await?;
            return blobs
                .into_iter()
                .find(|(d, _)| *d == digest)
                .map(|(_, data)| data)
                .ok_or(CasClientError::Missing(digest));
        }
        let mut stream = self.read_stream(digest, 0, 0).await?;
        let mut data = Vec::with_capacity(digest.size() as usize);
        while let Some(chunk) = stream.next().await {
            data.extend_from_slice(&chunk?);
        }
        verify(digest, &data)?;
        Ok(data.into())
    }

    /// Reads several blobs (each must exist), verifying each.
    pub async fn read_blobs(
        &self,
        digests: &[Digest],
    ) -> Result<Vec<(Digest, Bytes)>, CasClientError> {
        let mut out = Vec::with_capacity(digests.len());
        let mut batch = Vec::new();
        let mut batch_bytes = 0u64;
        for digest in digests {
            if digest.size() > BATCH_BLOB_LIMIT {
                out.push((*digest, Box::pin(self.read_blob(*digest)).await?));
                continue;
            }
            if batch_bytes + digest.size() > BATCH_TOTAL_LIMIT {
                out.extend(self.read_batch(std::mem::take(&mut batch)).await?);
                batch_bytes = 0;
            }
            batch_bytes += digest.size();
            batch.push(*digest);
        }
        if !batch.is_empty() {
            out.extend(self.read_batch(batch).await?);
        }
        Ok(out)
    }

    async fn read_batch(
        &self,
        digests: Vec<Digest>,
    ) -> Result<Vec<(Digest, Bytes)>, CasClientError> {
        let response = self
            .cas
            .clone()
            .batch_read_blobs(reapi::BatchReadBlobsRequest {
                instance_name: self.instance.clone(),
                digests: digests.iter().map(Digest::to_proto).collect(),
                ..Default::default()
            })
            .await
            .map_err(|status| CasClientError::Rpc {
                call: "BatchReadBlobs",
                status,
            })?;
        let mut out = Vec::with_capacity(digests.len());
        for r in response.into_inner().responses {
            let digest =
                Digest::from_field(r.digest.as_ref()).map_err(|e| CasClientError::Rpc {
                    call: "BatchReadBlobs",
                    status: tonic::Status::internal(format!("server returned a bad digest: {e}")),
                })?;
            let code = r.status.as_ref().map_or(0, |s| s.code);
            if code == tonic::Code::NotFound as i32 {
                return Err(CasClientError::Missing(digest));
            }
            if code != 0 {
                let message = r.status.map(|s| s.message).unwrap_or_default();
                return Err(CasClientError::Rpc {
                    call: "BatchReadBlobs",
                    status: tonic::Status::new(tonic::Code::from(code), message),
                });
            }
            verify(digest, &r.data)?;
            out.push((digest, r.data));
        }
        // Every requested blob must be answered: one left out is missing.
        let answered: std::collections::HashSet<Digest> = out.iter().map(|(d, _)| *d).collect();
        if let Some(absent) = digests.iter().find(|d| !answered.contains(*d)) {
            return Err(CasClientError::Missing(*absent));
        }
        Ok(out)
    }

    /// Streams a blob's bytes from `offset`, at most `limit` bytes (0 = to the end).
    pub async fn read_stream(
        &self,
        digest: Digest,
        offset: i64,
        limit: i64,
    ) -> Result<impl futures::Stream<Item = Result<Bytes, CasClientError>>, CasClientError> {
        let response = self
            .bytestream
            .clone()
            .read(ReadRequest {
                resource_name: ReadResource::format(&self.instance, &digest),
                read_offset: offset,
                read_limit: limit,
            })
            .await
            .map_err(|status| match status.code() {
                tonic::Code::NotFound => CasClientError::Missing(digest),
                _ => CasClientError::Rpc {
                    call: "ByteStream.Read",
                    status,
                },
            })?;
        Ok(response.into_inner().map(move |item| match item {
            Ok(r) => Ok(r.data),
            Err(status) if status.code() == tonic::Code::NotFound => {
                Err(CasClientError::Missing(digest))
            }
            Err(status) => Err(CasClientError::Rpc {
                call: "ByteStream.Read",
                status,
            }),
        }))
    }

    /// Downloads a blob into `path` (created or truncated), verifying its digest.
    pub async fn download_to_file(
        &self,
        digest: Digest,
        path: &Path,
    ) -> Result<(), CasClientError> {
        let mut file = tokio::fs::File::create(path)
            .await
            .map_err(io_error("creating", path))?;
        if digest.size() <= BATCH_BLOB_LIMIT {
            let data = self.read_blob(digest).await?;
            file.write_all(&data)
                .await
                .map_err(io_error("writing", path))?;
        } else {
            let mut hasher = Hasher::new();
            let mut stream = std::pin::pin!(self.read_stream(digest, 0, 0).await?);
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                hasher.update(&chunk);
                file.write_all(&chunk)
                    .await
                    .map_err(io_error("writing", path))?;
            }
            let actual = hasher.finish();
            if actual != digest {
                return Err(CasClientError::Corrupt {
                    expected: digest,
                    actual,
                });
            }
        }
        file.flush().await.map_err(io_error("writing", path))?;
        Ok(())
    }

    /// Every directory under `root` (root first), following GetTree's pages.
    pub async fn get_tree(&self, root: Digest) -> Result<Vec<reapi::Directory>, CasClientError> {
        let mut directories = Vec::new();
        let mut page_token = String::new();
        loop {
            let mut stream = self
                .cas
                .clone()
                .get_tree(reapi::GetTreeRequest {
                    instance_name: self.instance.clone(),
                    root_digest: Some(root.to_proto()),
                    page_size: 0,
                    page_token: page_token.clone(),
                    ..Default::default()
                })
                .await
                .map_err(|status| match status.code() {
                    tonic::Code::NotFound => CasClientError::Missing(root),
                    _ => CasClientError::Rpc {
                        call: "GetTree",
                        status,
                    },
                })?
                .into_inner();
            let mut next = String::new();
            while let Some(page) = stream.next().await {
                let page = page.map_err(|status| match status.code() {
                    tonic::Code::NotFound => CasClientError::Missing(root),
                    _ => CasClientError::Rpc {
                        call: "GetTree",
                        status,
                    },
                })?;
                directories.extend(page.directories);
                next = page.next_page_token;
            }
            if next.is_empty() {
                return Ok(directories);
            }
            page_token = next;
        }
    }
}

fn verify(expected: Digest, data: &[u8]) -> Result<(), CasClientError> {
    let actual = Digest::of_bytes(data);
    if actual != expected {
        return Err(CasClientError::Corrupt { expected, actual });
    }
    Ok(())
}

fn chunks(data: Bytes) -> Vec<Bytes> {
    if data.is_empty() {
        return vec![];
    }
    (0..data.len())
        .step_by(BYTESTREAM_CHUNK)
        .map(|start| data.slice(start..(start + BYTESTREAM_CHUNK).min(data.len())))
        .collect()
}
