//! Issue 7: with `--git-credentials-dir`, an action clones over SSH from
//! Debian's sshd on a loopback port (the key only, known_hosts enforced, an
//! unknown host refused) and over HTTP with git's credential store from git
//! http-backend behind a loopback server that demands the credentials.
//! Needs `git`, `ssh`, `ssh-keygen` and `sshd` (Debian: openssh-client,
//! openssh-server); fails, naming what is missing, without them.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use buildkube_config::{GIT_CREDENTIALS_FILE, KNOWN_HOSTS_FILE, SSH_KEY_FILE};

use crate::fake_server::FakeServer;
use crate::{enqueue, result_of, start_worker, text, Spec, WAIT};

pub(crate) const SSHD: &str = "/usr/sbin/sshd";
/// `Authorization` the HTTP server demands: Basic `buildkube:s3cret`.
pub(crate) const BASIC_AUTH: &str = "Basic YnVpbGRrdWJlOnMzY3JldA==";
/// What the repository's one file holds.
const CONTENT: &str = "cloned through the worker's credentials\n";

pub(crate) fn run(program: &str, args: &[&str], dir: &Path) {
    let output = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} ({e}): install git, openssh-client and openssh-server")
        });
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A bare repository `repo.git` under `root` with one commit.
fn bare_repository(root: &Path) -> PathBuf {
    let work = root.join("work");
    std::fs::create_dir_all(&work).unwrap();
    run("git", &["init", "-q", "-b", "main", "."], &work);
    std::fs::write(work.join("file"), CONTENT).unwrap();
    run("git", &["add", "file"], &work);
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
        &work,
    );
    let bare = root.join("repo.git");
    run(
        "git",
        &[
            "clone",
            "-q",
            "--bare",
            work.to_str().unwrap(),
            bare.to_str().unwrap(),
        ],
        root,
    );
    bare
}

/// sshd in inetd mode (`-i`) on each connection to a loopback listener:
/// the port is the kernel's choice, and every sshd is reaped on drop.
pub(crate) struct Sshd {
    pub(crate) port: u16,
    children: Arc<Mutex<Vec<Child>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Sshd {
    pub(crate) async fn start(config: PathBuf, log: PathBuf) -> Sshd {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let children = Arc::new(Mutex::new(Vec::new()));
        let spawned = children.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let stream = stream.into_std().unwrap();
                stream.set_nonblocking(false).unwrap();
                let output = OwnedFd::from(stream.try_clone().unwrap());
                let child = Command::new(SSHD)
                    .arg("-i")
                    .arg("-f")
                    .arg(&config)
                    .arg("-E")
                    .arg(&log)
                    .stdin(Stdio::from(OwnedFd::from(stream)))
                    .stdout(Stdio::from(output))
                    .spawn()
                    .unwrap_or_else(|e| {
                        panic!("cannot run {SSHD} ({e}): apt-get install openssh-server")
                    });
                spawned.lock().unwrap().push(child);
            }
        });
        Sshd {
            port,
            children,
            accept,
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.accept.abort();
        for mut child in self.children.lock().unwrap().drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// git http-backend as CGI, for requests carrying [`BASIC_AUTH`].
pub(crate) async fn git_http_backend(
    State(root): State<Arc<PathBuf>>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let header = |headers: &HeaderMap, name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    if header(&parts.headers, "authorization") != BASIC_AUTH {
        return (
            StatusCode::UNAUTHORIZED,
            [("www-authenticate", "Basic realm=\"git\"")],
            "credentials required\n",
        )
            .into_response();
    }
    let body = axum::body::to_bytes(body, 64 << 20).await.unwrap();
    let mut child = tokio::process::Command::new("git")
        .arg("http-backend")
        .env("GIT_PROJECT_ROOT", root.as_ref())
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
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stdin, &body)
        .await
        .unwrap();
    drop(stdin);
    let output = child.wait_with_output().await.unwrap();
    // CGI: headers, a blank line, the body.
    let split = output
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
        .expect("CGI headers end");
    let head = String::from_utf8_lossy(&output.stdout[..split.0]).to_string();
    let mut response = Response::builder();
    for line in head.lines() {
        let (name, value) = line.split_once(':').expect("CGI header");
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code: u16 = value[..3].parse().unwrap();
            response = response.status(code);
        } else {
            response = response.header(name, value);
        }
    }
    response
        .body(Body::from(output.stdout[split.0 + split.1..].to_vec()))
        .unwrap()
}

pub(crate) fn user_name() -> String {
    let out = Command::new("id").arg("-un").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A repository served over SSH by sshd (a host the worker's known_hosts
/// lists, and one it does not) and over HTTP by git http-backend behind
/// Basic auth, with the worker's credentials directory for both.
pub(crate) struct GitServers {
    pub(crate) trusted: Sshd,
    pub(crate) unknown: Sshd,
    pub(crate) http_port: u16,
    pub(crate) credentials: PathBuf,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Drop for GitServers {
    fn drop(&mut self) {
        self.http.abort();
    }
}

impl GitServers {
    /// Serves the bare repositories under `root` (the SSH path is absolute,
    /// the HTTP path relative to `root`).
    pub(crate) async fn start(root: &Path) -> GitServers {
        // sshd: its host key, the worker's key as the only authorized one.
        let keygen = |name: &str| {
            run(
                "ssh-keygen",
                &["-q", "-t", "ed25519", "-N", "", "-C", name, "-f", name],
                root,
            );
        };
        keygen("host_key");
        keygen("client_key");
        std::fs::copy(root.join("client_key.pub"), root.join("authorized_keys")).unwrap();
        // sshd running as root keeps its privilege separation in /run/sshd
        // (made by Debian's service, which is not running here).
        if unsafe { libc::geteuid() } == 0 {
            std::fs::create_dir_all("/run/sshd").unwrap();
        }
        let config = root.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "HostKey {root}/host_key\nAuthorizedKeysFile {root}/authorized_keys\n\
                 AuthenticationMethods publickey\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile none\n\
                 PermitRootLogin prohibit-password\nAllowUsers {user}\n",
                root = root.display(),
                user = user_name(),
            ),
        )
        .unwrap();
        let trusted = Sshd::start(config.clone(), root.join("sshd.log")).await;
        let unknown = Sshd::start(config, root.join("sshd-unknown.log")).await;

        // git http-backend behind a server that demands the credentials.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_port = listener.local_addr().unwrap().port();
        let router = axum::Router::new()
            .fallback(git_http_backend)
            .with_state(Arc::new(root.to_path_buf()));
        let http = tokio::spawn(async move { axum::serve(listener, router).await });

        // The worker's credentials: known_hosts lists only `trusted`.
        let credentials = root.join("credentials");
        std::fs::create_dir(&credentials).unwrap();
        std::fs::copy(root.join("client_key"), credentials.join(SSH_KEY_FILE)).unwrap();
        let host_key = std::fs::read_to_string(root.join("host_key.pub")).unwrap();
        let host_key: Vec<&str> = host_key.split_whitespace().take(2).collect();
        std::fs::write(
            credentials.join(KNOWN_HOSTS_FILE),
            format!("[127.0.0.1]:{} {}\n", trusted.port, host_key.join(" ")),
        )
        .unwrap();
        std::fs::write(
            credentials.join(GIT_CREDENTIALS_FILE),
            format!("http://buildkube:s3cret@127.0.0.1:{http_port}\n"),
        )
        .unwrap();
        GitServers {
            trusted,
            unknown,
            http_port,
            credentials,
            http,
        }
    }

    /// The SSH URL of the bare repository at `path` on sshd `port`.
    pub(crate) fn ssh_url(port: u16, path: &Path) -> String {
        format!("ssh://{}@127.0.0.1:{port}{}", user_name(), path.display())
    }
}

#[tokio::test]
async fn actions_clone_over_ssh_and_http_with_the_worker_s_credentials() {
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path();
    let repo = bare_repository(root);
    let servers = GitServers::start(root).await;
    let (trusted, unknown, http_port) = (&servers.trusted, &servers.unknown, servers.http_port);

    let server = FakeServer::start().await;
    let state = server.state.clone();
    let flag = format!("--git-credentials-dir={}", servers.credentials.display());
    let mut worker = start_worker(&server, &[&flag]).await;
    let clone =
        |port: u16, into: &str| format!("git clone -q {} {into}", GitServers::ssh_url(port, &repo));
    let script = format!(
        "export PATH=/usr/local/bin:/usr/bin:/bin && {} && \
         git clone -q http://127.0.0.1:{http_port}/repo.git over-http && \
         mkdir -p out && cat over-ssh/file over-http/file > out/both && \
         if {}; then echo unknown host accepted; exit 1; fi",
        clone(trusted.port, "over-ssh"),
        clone(unknown.port, "from-unknown"),
    );
    enqueue(
        &state,
        Spec {
            script: &script,
            output_files: &["out/both"],
            ..Default::default()
        },
    );
    let completed = state.wait_completed(1, WAIT).await;
    let result = result_of(&completed[0].0);
    let stderr = text(&state, &result.stderr_digest);
    assert_eq!(
        result.exit_code,
        0,
        "stdout: {}\nstderr: {stderr}\nsshd: {}",
        text(&state, &result.stdout_digest),
        std::fs::read_to_string(root.join("sshd.log")).unwrap_or_default()
    );
    assert_eq!(
        text(&state, &result.output_files[0].digest),
        format!("{CONTENT}{CONTENT}")
    );
    assert!(
        stderr.contains("Host key verification failed"),
        "the unknown host is refused for its key: {stderr}"
    );
    worker.drain().await.unwrap();
}
