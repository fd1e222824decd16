//! The server's TLS configuration from `--tls-cert-file`, `--tls-key-file`
//! and `--tls-client-ca-file`, read again whenever one of the files changes.
//!
//! cert-manager (and any Kubernetes Secret volume) renews certificates by
//! swapping the files in place. Before each handshake the files' inode, size
//! and mtime are compared with those last loaded; on a change the whole
//! configuration (chain, key and client CA) is rebuilt, so new connections get
//! the new certificate and established ones keep theirs. If the new files do
//! not load (say a key that does not match the chain, mid-rotation), the old
//! configuration stays in use and the failure is logged once.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use buildkube_config::ServerTlsArgs;
use buildkube_reapi::tls::{
    crypto_provider, read_certificates, read_private_key, read_roots, TlsError,
};
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// ALPN protocols of the gRPC listener.
pub const GRPC_ALPN: &[&[u8]] = &[b"h2"];
/// ALPN protocols of the HTTP listener (browsers and curl may speak either).
pub const HTTP_ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// Identity of a file's content as far as `stat` tells.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    inode: u64,
    len: u64,
    modified: Option<SystemTime>,
}

fn stamps(paths: &[PathBuf]) -> Vec<Option<FileStamp>> {
    paths
        .iter()
        .map(|path| {
            // metadata follows symlinks: a Secret volume's `..data` swap
            // shows as a new inode.
            std::fs::metadata(path).ok().map(|m| FileStamp {
                inode: m.ino(),
                len: m.len(),
                modified: m.modified().ok(),
            })
        })
        .collect()
}

struct Loaded {
    stamps: Vec<Option<FileStamp>>,
    config: Arc<ServerConfig>,
    /// The stamps of files that last failed to load, so that failure is
    /// logged once rather than at every handshake.
    failed: Option<Vec<Option<FileStamp>>>,
}

/// A listener's TLS configuration, reloaded when its files change.
pub struct ServerTls {
    files: ServerTlsArgs,
    alpn: &'static [&'static [u8]],
    loaded: Mutex<Loaded>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .finish()
    }
}

impl ServerTls {
    /// The TLS configuration `files` describe, offering `alpn`; `None` when
    /// no certificate is configured (plaintext).
    pub fn load(
        files: &ServerTlsArgs,
        alpn: &'static [&'static [u8]],
    ) -> Result<Option<Arc<ServerTls>>, TlsError> {
        if files.tls_cert_file.is_none() {
            return Ok(None);
        }
        let paths = watched_paths(files);
        let stamps = stamps(&paths);
        let config = build(files, alpn)?;
        Ok(Some(Arc::new(ServerTls {
            files: files.clone(),
            alpn,
            loaded: Mutex::new(Loaded {
                stamps,
                config: Arc::new(config),
                failed: None,
            }),
        })))
    }

    /// Whether clients must present a certificate.
    pub fn requires_client_certificates(&self) -> bool {
        self.files.tls_client_ca_file.is_some()
    }

    /// The configuration for a new connection: rebuilt first if a file
    /// changed since the last load. Reads files: call off the runtime.
    pub fn current(&self) -> Arc<ServerConfig> {
        let now = stamps(&watched_paths(&self.files));
        let mut loaded = self.loaded.lock().expect("TLS state lock poisoned");
        if now == loaded.stamps || loaded.failed.as_ref() == Some(&now) {
            return loaded.config.clone();
        }
        match build(&self.files, self.alpn) {
            Ok(config) => {
                tracing::info!(cert = %path_text(&self.files.tls_cert_file), "TLS files changed; new connections get the new certificate");
                loaded.config = Arc::new(config);
                loaded.stamps = now;
                loaded.failed = None;
            }
            Err(error) => {
                tracing::warn!(%error, "TLS files changed but do not load; still serving the previous certificate");
                loaded.failed = Some(now);
            }
        }
        loaded.config.clone()
    }

    /// Runs the server side of a handshake on `tcp` with the current configuration.
    pub async fn accept(self: Arc<Self>, tcp: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        let this = self.clone();
        let config = tokio::task::spawn_blocking(move || this.current())
            .await
            .map_err(std::io::Error::other)?;
        tokio_rustls::TlsAcceptor::from(config).accept(tcp).await
    }
}

fn path_text(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn watched_paths(files: &ServerTlsArgs) -> Vec<PathBuf> {
    [
        &files.tls_cert_file,
        &files.tls_key_file,
        &files.tls_client_ca_file,
    ]
    .into_iter()
    .flatten()
    .cloned()
    .collect()
}

fn build(files: &ServerTlsArgs, alpn: &[&[u8]]) -> Result<ServerConfig, TlsError> {
    let (Some(cert), Some(key)) = (&files.tls_cert_file, &files.tls_key_file) else {
        unreachable!("clap requires --tls-cert-file and --tls-key-file together");
    };
    let chain = read_certificates("--tls-cert-file", cert)?;
    let private_key = read_private_key("--tls-key-file", key)?;
    let builder = ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports rustls' default protocol versions");
    let builder = match &files.tls_client_ca_file {
        Some(ca) => {
            let roots = read_roots("--tls-client-ca-file", ca)?;
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), crypto_provider())
                    .build()
                    .map_err(|e| TlsError::Invalid {
                        flag: "--tls-client-ca-file",
                        path: ca.clone(),
                        message: e.to_string(),
                    })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config =
        builder
            .with_single_cert(chain, private_key)
            .map_err(|e| TlsError::Invalid {
                flag: "--tls-key-file",
                path: key.clone(),
                message: format!("does not go with --tls-cert-file {}: {e}", cert.display()),
            })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}
