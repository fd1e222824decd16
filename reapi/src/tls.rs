//! TLS from PEM files, with rustls: the client configuration and connector
//! that workers and `reapi-bench` dial an `https://` server through, and the
//! PEM readers the server's listener shares.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use buildkube_config::ClientTlsArgs;
use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::RootCertStore;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// ALPN protocol of gRPC: HTTP/2 (gRPC clients such as Bazel require it).
pub const ALPN_H2: &[u8] = b"h2";

/// Why TLS files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("reading {flag} {path}: {source}")]
    Read {
        /// The flag that named the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file held nothing usable, or rustls refused what it held.
    #[error("{flag} {path}: {message}")]
    Invalid {
        /// The flag that named the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// No CA file was given and the system's roots could not be loaded.
    #[error("no --tls-ca-file and no usable system roots: {0}")]
    SystemRoots(String),
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.to_path_buf(),
        source,
    })
}

fn invalid(flag: &'static str, path: &Path, message: impl ToString) -> TlsError {
    TlsError::Invalid {
        flag,
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// The PEM certificates in the file `flag` names (at least one).
pub fn read_certificates(
    flag: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(flag, path)?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(flag, path, format!("bad PEM: {e}")))?;
    if certificates.is_empty() {
        return Err(invalid(flag, path, "holds no PEM CERTIFICATE"));
    }
    Ok(certificates)
}

/// The PEM private key (PKCS#8, PKCS#1 or SEC1) in the file `flag` names.
pub fn read_private_key(
    flag: &'static str,
    path: &Path,
) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(flag, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            invalid(flag, path, "holds no PEM private key")
        }
        e => invalid(flag, path, format!("bad PEM: {e}")),
    })
}

/// A trust store of the PEM CA certificates in the file `flag` names.
pub fn read_roots(flag: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for certificate in read_certificates(flag, path)? {
        roots
            .add(certificate)
            .map_err(|e| invalid(flag, path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// The crypto provider of every TLS configuration here: ring, named
/// explicitly so another crate enabling a second provider changes nothing.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
        return Err(TlsError::SystemRoots(if errors.is_empty() {
            "none found".into()
        } else {
            errors.join("; ")
        }));
    }
    Ok(roots)
}

/// The rustls client configuration `tls` describes: trust its CA file (or
/// the system's roots), present its client certificate if set, offer h2.
pub fn client_config(tls: &ClientTlsArgs) -> Result<rustls::ClientConfig, TlsError> {
    let roots = match &tls.tls_ca_file {
        Some(path) => read_roots("--tls-ca-file", path)?,
        None => system_roots()?,
    };
    let builder = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports rustls' default protocol versions")
        .with_root_certificates(roots);
    let mut config = match (&tls.tls_client_cert_file, &tls.tls_client_key_file) {
        (Some(cert), Some(key)) => {
            let chain = read_certificates("--tls-client-cert-file", cert)?;
            let key = read_private_key("--tls-client-key-file", key)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| invalid("--tls-client-cert-file", cert, e))?
        }
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), None) => {
            return Err(invalid(
                "--tls-client-cert-file",
                cert,
                "needs --tls-client-key-file",
            ))
        }
        (None, Some(key)) => {
            return Err(invalid(
                "--tls-client-key-file",
                key,
                "needs --tls-client-cert-file",
            ))
        }
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// Dials `https://HOST:PORT` URIs over TCP and TLS for a tonic channel.
///
/// The files are read again for every connection, so a renewed client
/// certificate or CA is picked up at the next reconnect without a restart.
#[derive(Debug, Clone)]
pub struct TlsConnector {
    files: ClientTlsArgs,
}

impl TlsConnector {
    /// A connector using `files`, which are read once now so that a missing
    /// or malformed file is an error at startup rather than at each connect.
    pub fn new(files: ClientTlsArgs) -> Result<TlsConnector, TlsError> {
        client_config(&files)?;
        Ok(TlsConnector { files })
    }
}

/// Why a TLS connection failed; its text names the address and the cause.
type ConnectError = Box<dyn std::error::Error + Send + Sync>;

async fn connect(
    files: ClientTlsArgs,
    uri: Uri,
) -> Result<TokioIo<TlsStream<TcpStream>>, ConnectError> {
    let host = uri.host().ok_or_else(|| format!("`{uri}` names no host"))?;
    // IPv6 literals come bracketed in a URI.
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(443);
    let server_name = ServerName::try_from(host.clone())
        .map_err(|e| format!("`{host}` is not a TLS server name: {e}"))?;
    let config = tokio::task::spawn_blocking(move || client_config(&files)).await??;
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
    tcp.set_nodelay(true)?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server_name, tcp)
        .await
        .map_err(|e| format!("TLS handshake with {host}:{port} failed: {e}"))?;
    Ok(TokioIo::new(stream))
}

impl tower_service::Service<Uri> for TlsConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(connect(self.files.clone(), uri))
    }
}
