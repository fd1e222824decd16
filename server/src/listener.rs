//! Where connections come from: a TCP listener, in plaintext or TLS
//! ([`crate::tls::ServerTls`]), plus in-process connections from the
//! `--local-workers`, all as one stream of [`Connection`]s that the gRPC
//! server (tonic) or the HTTP server ([`serve_http`]) serves.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::transport::{Channel, Endpoint};

use crate::tls::ServerTls;

/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; connections beyond it are closed at once,
/// so a flood of idle sockets cannot hold unbounded tasks and memory.
const MAX_PENDING_HANDSHAKES: usize = 512;
/// Pause after a failed accept (e.g. out of file descriptors) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Bytes buffered in each direction of an in-process connection.
const IN_PROCESS_BUFFER: usize = 1 << 20;
/// How long a stopping HTTP server waits for open connections to finish.
const HTTP_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// One accepted connection.
#[derive(Debug)]
pub enum Connection {
    /// Plaintext TCP.
    Tcp(TcpStream),
    /// TCP with TLS (the handshake is done).
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// An in-process worker's connection: never leaves the process.
    InProcess(DuplexStream),
}

macro_rules! delegate {
    ($self:ident, $stream:ident => $call:expr) => {
        match $self.get_mut() {
            Connection::Tcp($stream) => $call,
            Connection::Tls($stream) => $call,
            Connection::InProcess($stream) => $call,
        }
    };
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Connection::Tcp(s) => s.is_write_vectored(),
            Connection::Tls(s) => s.is_write_vectored(),
            Connection::InProcess(s) => s.is_write_vectored(),
        }
    }
}

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        match self {
            Connection::Tcp(s) => s.connect_info(),
            Connection::Tls(s) => s.get_ref().0.connect_info(),
            Connection::InProcess(_) => TcpConnectInfo {
                local_addr: None,
                remote_addr: None,
            },
        }
    }
}

/// The connections `listener` accepts, TLS-wrapped when `tls` is set, and
/// those dialed in-process through `in_process`. Handshakes run
/// concurrently, so a slow client delays no one else. Accepting stops when
/// the stream is dropped.
pub fn accept(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    mut in_process: Option<mpsc::Receiver<DuplexStream>>,
) -> impl Stream<Item = Result<Connection, Infallible>> {
    let (sender, receiver) = mpsc::channel(64);
    let handshakes = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let next_in_process = async {
                match &mut in_process {
                    Some(receiver) => receiver.recv().await,
                    None => std::future::pending().await,
                }
            };
            let (tcp, peer) = tokio::select! {
                _ = sender.closed() => return,
                Some(stream) = next_in_process => {
                    if sender.send(Ok(Connection::InProcess(stream))).await.is_err() {
                        return;
                    }
                    continue;
                }
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "accepting a connection failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let Some(tls) = &tls else {
                if sender.send(Ok(Connection::Tcp(tcp))).await.is_err() {
                    return;
                }
                continue;
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                tracing::warn!(%peer, limit = MAX_PENDING_HANDSHAKES, "too many TLS handshakes in progress; closing the connection");
                continue;
            };
            let (tls, sender) = (tls.clone(), sender.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = sender.send(Ok(Connection::Tls(Box::new(stream)))).await;
                    }
                    // A client's mistake (wrong CA, no certificate under mTLS,
                    // plaintext on a TLS port): the client sees the reason.
                    Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(receiver)
}

/// Dials the server from inside its own process: each connection is a
/// duplex pipe whose far end goes to [`accept`]'s stream. The in-process
/// workers use it, so they connect whatever TLS the TCP listener requires.
#[derive(Debug, Clone)]
pub struct InProcessConnector {
    server: mpsc::Sender<DuplexStream>,
}

impl InProcessConnector {
    /// A connector and the receiver to hand to [`accept`].
    pub fn new() -> (InProcessConnector, mpsc::Receiver<DuplexStream>) {
        let (server, receiver) = mpsc::channel(16);
        (InProcessConnector { server }, receiver)
    }

    /// A lazily connecting channel to the server through this connector.
    pub fn channel(&self) -> Channel {
        Endpoint::from_static("http://in-process.invalid").connect_with_connector_lazy(self.clone())
    }
}

impl tower_service::Service<http::Uri> for InProcessConnector {
    type Response = TokioIo<DuplexStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let server = self.server.clone();
        Box::pin(async move {
            let (client_end, server_end) = tokio::io::duplex(IN_PROCESS_BUFFER);
            server.send(server_end).await.map_err(|_| {
                io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    "the server has stopped accepting",
                )
            })?;
            Ok(TokioIo::new(client_end))
        })
    }
}

/// Serves `router` over HTTP/1.1 and HTTP/2 on the connections of
/// `incoming` until `shutdown` resolves, then lets open requests finish for
/// up to [`HTTP_DRAIN_TIMEOUT`].
pub async fn serve_http(
    incoming: impl Stream<Item = Result<Connection, Infallible>>,
    router: axum::Router,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // Boxed, not pinned on the stack, so that dropping it below really
    // drops the stream and the accept loop stops taking connections.
    let mut incoming = Box::pin(incoming);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let connection = tokio::select! {
            _ = &mut shutdown => break,
            next = incoming.next() => match next {
                Some(Ok(connection)) => connection,
                None => break,
            },
        };
        let service = TowerToHyperService::new(router.clone());
        let serving = builder
            .serve_connection_with_upgrades(TokioIo::new(connection), service)
            .into_owned();
        let serving = graceful.watch(serving);
        tokio::spawn(async move {
            if let Err(error) = serving.await {
                tracing::debug!(%error, "HTTP connection ended with an error");
            }
        });
    }
    drop(incoming);
    if tokio::time::timeout(HTTP_DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("HTTP connections still open at shutdown; closing them");
    }
}
