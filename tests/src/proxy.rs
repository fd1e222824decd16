//! A TCP proxy on loopback whose link can be cut and restored, to give a
//! worker a network fault without touching the processes at either end.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};

/// How often the accept loop looks at the stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(10);

/// Forwards connections from a kernel-chosen `127.0.0.1` port to `upstream`,
/// byte for byte, until [`TcpProxy::cut`]. Stopped on drop.
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_thread: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Shared {
    /// While set, live connections are gone and new ones are closed at once.
    cut: AtomicBool,
    stop: AtomicBool,
    /// Both sockets of every live connection, to shut them down on cut.
    connections: Mutex<Vec<(TcpStream, TcpStream)>>,
    /// Connections accepted and forwarded, since start.
    forwarded: AtomicUsize,
}

impl TcpProxy {
    /// Starts forwarding to `upstream`.
    pub fn start(upstream: SocketAddr) -> Result<TcpProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the proxy")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let accept_thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("proxy-{addr}"))
                .spawn(move || accept_loop(&listener, upstream, &shared))?
        };
        Ok(TcpProxy {
            addr,
            shared,
            accept_thread: Some(accept_thread),
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, as a worker's `--server` wants it.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops every live connection (both sides see it end) and closes new
    /// ones as soon as they are accepted, until [`TcpProxy::restore`].
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        self.shared.shut_down_all();
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }

    /// Connections forwarded so far (a reconnect counts anew).
    pub fn forwarded(&self) -> usize {
        self.shared.forwarded.load(Ordering::SeqCst)
    }
}

impl Shared {
    fn shut_down_all(&self) {
        let connections = std::mem::take(&mut *self.connections.lock().unwrap());
        for (client, upstream) in connections {
            let _ = client.shutdown(Shutdown::Both);
            let _ = upstream.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.shut_down_all();
        if let Some(thread) = self.accept_thread.take() {
            let _ = thread.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, upstream: SocketAddr, shared: &Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(ACCEPT_POLL);
                continue;
            }
            Err(_) => continue,
        };
        if shared.cut.load(Ordering::SeqCst) {
            drop(client); // refused: the link is down
            continue;
        }
        if let Err(e) = forward(client, upstream, shared) {
            eprintln!("proxy to {upstream}: {e:#}");
        }
    }
}

/// Connects to `upstream` and copies bytes both ways on two threads.
fn forward(client: TcpStream, upstream: SocketAddr, shared: &Arc<Shared>) -> Result<()> {
    client.set_nonblocking(false)?;
    let server =
        TcpStream::connect(upstream).with_context(|| format!("connecting to {upstream}"))?;
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    {
        let mut connections = shared.connections.lock().unwrap();
        // Checked under the lock, so a cut racing with this accept still sees the pair.
        if shared.cut.load(Ordering::SeqCst) {
            return Ok(());
        }
        connections.push((client.try_clone()?, server.try_clone()?));
    }
    shared.forwarded.fetch_add(1, Ordering::SeqCst);
    for (from, to) in [(client.try_clone()?, server.try_clone()?), (server, client)] {
        std::thread::Builder::new()
            .name("proxy-copy".into())
            .spawn(move || copy_until_closed(from, to))?;
    }
    Ok(())
}

fn copy_until_closed(mut from: TcpStream, mut to: TcpStream) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buffer[..n]).is_err() {
                    break;
                }
            }
        }
    }
    // Either end gone: the whole connection is.
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
