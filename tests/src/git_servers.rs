//! Git servers on loopback for tests that clone from inside an action: a
//! bare repository, Debian's sshd serving it over SSH (one sshd per
//! connection, inetd style, so the port is the kernel's choice), and git
//! http-backend behind an HTTPS server that demands Basic credentials.
//! Needs git, ssh-keygen and sshd (Debian: git, openssh-client,
//! openssh-server); each fails naming what is missing.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

const SSHD: &str = "/usr/sbin/sshd";

/// Runs `program args` in `dir`; fails with its stderr.
pub fn run(program: &str, args: &[&str], dir: &Path) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .with_context(|| {
            format!("running {program}: install git, openssh-client and openssh-server")
        })?;
    if !output.status.success() {
        bail!(
            "{program} {args:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Makes `work` a git repository on `main` whose one commit holds every
/// file in it; returns the commit id.
pub fn commit_all(work: &Path) -> Result<String> {
    run("git", &["init", "-q", "-b", "main", "."], work)?;
    run("git", &["add", "-A"], work)?;
    run(
        "git",
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-qm",
            "one",
        ],
        work,
    )?;
    Ok(run("git", &["rev-parse", "HEAD"], work)?.trim().to_string())
}

/// A bare clone `NAME.git` of `work` under `root`.
pub fn bare_clone(root: &Path, name: &str, work: &Path) -> Result<PathBuf> {
    let bare = root.join(format!("{name}.git"));
    let (work, bare_arg) = (work.display().to_string(), bare.display().to_string());
    run("git", &["clone", "-q", "--bare", &work, &bare_arg], root)?;
    Ok(bare)
}

/// A bare repository `NAME.git` under `root` whose one commit holds `file`
/// with `content`.
pub fn bare_repository(root: &Path, name: &str, file: &str, content: &str) -> Result<PathBuf> {
    let work = root.join(format!("{name}-work"));
    std::fs::create_dir_all(&work)?;
    std::fs::write(work.join(file), content)?;
    commit_all(&work)?;
    bare_clone(root, name, &work)
}

/// An ed25519 key pair `dir/NAME` and `dir/NAME.pub`; returns the public
/// key as `TYPE BASE64` (no comment), as known_hosts and authorized_keys
/// take it.
pub fn ssh_key(dir: &Path, name: &str) -> Result<String> {
    run(
        "ssh-keygen",
        &["-q", "-t", "ed25519", "-N", "", "-C", name, "-f", name],
        dir,
    )?;
    let public = std::fs::read_to_string(dir.join(format!("{name}.pub")))?;
    Ok(public
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" "))
}

/// sshd on a loopback port serving this machine's files as `user` (the
/// user running the test), with `host_key` and `authorized_keys`; every
/// sshd it started is killed on drop.
pub struct Sshd {
    port: u16,
    children: Arc<Mutex<Vec<Child>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Sshd {
    /// Starts listening; writes `sshd_config` and the log under `dir`
    /// (file names prefixed with `name`).
    pub async fn start(
        dir: &Path,
        name: &str,
        host_key: &Path,
        authorized_keys: &Path,
    ) -> Result<Sshd> {
        let user = run("id", &["-un"], dir)?.trim().to_string();
        // sshd run as root keeps its privilege separation in /run/sshd
        // (which Debian's service makes; it is not running here).
        if run("id", &["-u"], dir)?.trim() == "0" {
            std::fs::create_dir_all("/run/sshd")?;
        }
        let config = dir.join(format!("{name}-sshd_config"));
        std::fs::write(
            &config,
            format!(
                "HostKey {}\nAuthorizedKeysFile {}\nAuthenticationMethods publickey\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
                 StrictModes no\nPidFile none\nPermitRootLogin prohibit-password\nAllowUsers {user}\n",
                host_key.display(),
                authorized_keys.display(),
            ),
        )?;
        let log = dir.join(format!("{name}-sshd.log"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let children = Arc::new(Mutex::new(Vec::new()));
        let spawned = children.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let child = (|| -> Result<Child> {
                    let stream = stream.into_std()?;
                    stream.set_nonblocking(false)?;
                    let output = OwnedFd::from(stream.try_clone()?);
                    Command::new(SSHD)
                        .args(["-i", "-f"])
                        .arg(&config)
                        .arg("-E")
                        .arg(&log)
                        .stdin(Stdio::from(OwnedFd::from(stream)))
                        .stdout(Stdio::from(output))
                        .spawn()
                        .with_context(|| format!("running {SSHD}: apt-get install openssh-server"))
                })();
                match child {
                    Ok(child) => spawned.lock().expect("sshd children").push(child),
                    Err(e) => eprintln!("sshd: {e:#}"),
                }
            }
        });
        Ok(Sshd {
            port,
            children,
            accept,
        })
    }

    /// The loopback port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.accept.abort();
        for mut child in self.children.lock().expect("sshd children").drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// git http-backend for the repositories under a directory, over HTTPS on a
/// loopback port, answering only requests with the Basic credentials given;
/// stops on drop.
pub struct GitHttpsServer {
    addr: SocketAddr,
    serve: tokio::task::JoinHandle<()>,
}

struct Backend {
    root: PathBuf,
    authorization: String,
}

impl GitHttpsServer {
    /// Serves the repositories under `root` with the PEM certificate chain
    /// `cert` and key `key`, to clients sending `user` and `password`.
    pub async fn start(
        root: &Path,
        cert: &Path,
        key: &Path,
        user: &str,
        password: &str,
    ) -> Result<GitHttpsServer> {
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .with_context(|| format!("reading {}", cert.display()))?;
        let key = PrivateKeyDer::from_pem_file(key)
            .with_context(|| format!("reading {}", key.display()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = tcp.local_addr()?;
        let listener = TlsListener {
            tcp,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        };
        let backend = Arc::new(Backend {
            root: root.to_path_buf(),
            authorization: format!("Basic {}", base64(format!("{user}:{password}").as_bytes())),
        });
        let router = axum::Router::new()
            .fallback(git_http_backend)
            .with_state(backend);
        let serve = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                eprintln!("git https server: {e}");
            }
        });
        Ok(GitHttpsServer { addr, serve })
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }
}

impl Drop for GitHttpsServer {
    fn drop(&mut self) {
        self.serve.abort();
    }
}

/// TLS on a loopback listener for axum; a failed handshake is logged and
/// the next connection accepted.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            match self.acceptor.accept(tcp).await {
                Ok(tls) => return (tls, addr),
                Err(e) => eprintln!("git https server: TLS handshake with {addr}: {e}"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

/// git http-backend as CGI, for requests with the expected credentials.
async fn git_http_backend(State(backend): State<Arc<Backend>>, request: Request) -> Response {
    match cgi(&backend, request).await {
        Ok(response) => response,
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response(),
    }
}

async fn cgi(backend: &Backend, request: Request) -> Result<Response> {
    let (parts, body) = request.into_parts();
    let header = |headers: &HeaderMap, name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    if header(&parts.headers, "authorization") != backend.authorization {
        return Ok((
            StatusCode::UNAUTHORIZED,
            [("www-authenticate", "Basic realm=\"git\"")],
            "credentials required\n",
        )
            .into_response());
    }
    let body = axum::body::to_bytes(body, 64 << 20).await?;
    let mut child = tokio::process::Command::new("git")
        .arg("http-backend")
        .env("GIT_PROJECT_ROOT", &backend.root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REMOTE_USER", "buildkube")
        .env("REQUEST_METHOD", parts.method.as_str())
        .env("PATH_INFO", parts.uri.path())
        .env("QUERY_STRING", parts.uri.query().unwrap_or(""))
        .env("CONTENT_TYPE", header(&parts.headers, "content-type"))
        .env("CONTENT_LENGTH", body.len().to_string())
        .env(
            "HTTP_CONTENT_ENCODING",
            header(&parts.headers, "content-encoding"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("running git http-backend")?;
    let mut stdin = child.stdin.take().context("git http-backend's stdin")?;
    tokio::io::AsyncWriteExt::write_all(&mut stdin, &body).await?;
    drop(stdin);
    let output = child.wait_with_output().await?;
    // CGI: headers, a blank line, the body.
    let (end, gap) = output
        .stdout
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| {
            output
                .stdout
                .windows(2)
                .position(|w| w == b"\n\n")
                .map(|i| (i, 2))
        })
        .context("git http-backend printed no end of headers")?;
    let mut response = Response::builder();
    for line in String::from_utf8_lossy(&output.stdout[..end]).lines() {
        let (name, value) = line.split_once(':').context("a CGI header")?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            response = response.status(value.get(..3).unwrap_or("500").parse::<u16>()?);
        } else {
            response = response.header(name, value);
        }
    }
    Ok(response.body(Body::from(output.stdout[end + gap..].to_vec()))?)
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |n, b| (n << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_pads_like_the_rfc() {
        assert_eq!(
            super::base64(b"buildkube:s3cret"),
            "YnVpbGRrdWJlOnMzY3JldA=="
        );
        assert_eq!(super::base64(b"ab"), "YWI=");
        assert_eq!(super::base64(b"abc"), "YWJj");
    }
}
