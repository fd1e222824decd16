//! Issue 7: the server answers its liveness probe while storage is still
//! opening (a large CAS, a database not reachable yet), so Kubernetes does
//! not restart-loop it; it turns ready once storage is open.
//!
//! Opening is made observable, and held, by putting the PostgreSQL CAS
//! behind a loopback proxy that accepts connections but forwards nothing
//! until the test opens its gate. Needs PostgreSQL (see the README).

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use buildkube_config::storage::{FilesystemStore, PostgresStore, StorageConfig, StoreConfig};
use buildkube_config::{HEALTHZ_PATH, METRICS_PATH, READYZ_PATH};
use buildkube_tests::Server;

use crate::external_stores::env_url;

/// A TCP proxy that accepts at once but holds every connection, unanswered,
/// until [`GatedProxy::open`]; then it forwards each to `target`.
struct GatedProxy {
    addr: SocketAddr,
    accepted: mpsc::Receiver<()>,
    gate: Arc<(Mutex<bool>, Condvar)>,
}

impl GatedProxy {
    fn start(target: String) -> GatedProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (notify, accepted) = mpsc::channel();
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let held = gate.clone();
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let _ = notify.send(());
                let (target, held) = (target.clone(), held.clone());
                thread::spawn(move || {
                    let (open, opened) = &*held;
                    drop(opened.wait_while(open.lock().unwrap(), |open| !*open));
                    let _ = forward(client, &target);
                });
            }
        });
        GatedProxy {
            addr,
            accepted,
            gate,
        }
    }

    /// Waits until someone has connected.
    fn wait_for_connection(&self) {
        self.accepted
            .recv_timeout(Duration::from_secs(60))
            .expect("the server connects to its store while opening storage");
    }

    fn open(&self) {
        let (open, opened) = &*self.gate;
        *open.lock().unwrap() = true;
        opened.notify_all();
    }
}

fn forward(client: TcpStream, target: &str) -> io::Result<()> {
    let server = TcpStream::connect(target)?;
    let (mut client_read, mut server_write) = (client.try_clone()?, server.try_clone()?);
    let upstream = thread::spawn(move || io::copy(&mut client_read, &mut server_write));
    let (mut server_read, mut client_write) = (server, client);
    io::copy(&mut server_read, &mut client_write)?;
    let _ = upstream.join();
    Ok(())
}

/// `postgres://USER:PASSWORD@HOST:PORT/DB` → (`HOST:PORT`, the URL with `proxy` instead).
fn through(url: &str, proxy: SocketAddr) -> (String, String) {
    let (scheme_user, rest) = url.rsplit_once('@').expect("the test URL names user@host");
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    (
        authority.to_string(),
        format!("{scheme_user}@{proxy}/{path}"),
    )
}

#[test]
fn healthz_answers_while_storage_is_opening_and_readyz_once_open() {
    let (target, _) = through(
        &env_url("BUILDKUBE_TEST_POSTGRES_URL"),
        "127.0.0.1:1".parse().unwrap(),
    );
    let proxy = GatedProxy::start(target);
    let (_, url) = through(&env_url("BUILDKUBE_TEST_POSTGRES_URL"), proxy.addr);
    let dir = tempfile::tempdir().unwrap();
    let config = StorageConfig {
        cas: StoreConfig::Postgres(PostgresStore {
            url,
            password_file: None,
            pool_size: 1,
            max_blob_size: 1 << 20,
            max_size: None,
            expire_unused_after_secs: None,
        }),
        action_cache: StoreConfig::Filesystem(FilesystemStore {
            path: "ac".into(),
            max_size: None,
        }),
        records: StorageConfig::default_records(),
    };
    let config_path = dir.path().join("storage.yaml");
    std::fs::write(&config_path, config.to_yaml()).unwrap();

    let mut server =
        Server::start_listening_with(|args| args.storage_config = Some(config_path)).unwrap();
    // The server is connecting to its CAS: storage is opening, and stays so
    // until the gate opens.
    proxy.wait_for_connection();
    let live = server.http_get(HEALTHZ_PATH).unwrap();
    assert_eq!(
        live.status, 200,
        "{HEALTHZ_PATH} while storage opens: {live:?}"
    );
    let ready = server.http_get(READYZ_PATH).unwrap();
    assert_eq!(
        (ready.status, ready.body.as_str()),
        (503, "opening storage\n"),
        "{READYZ_PATH} while storage opens"
    );
    // The metrics listener, where the manifests' probes go, answers the same.
    assert_eq!(server.metrics_get(HEALTHZ_PATH).unwrap().status, 200);
    let ready = server.metrics_get(READYZ_PATH).unwrap();
    assert_eq!(
        (ready.status, ready.body.as_str()),
        (503, "opening storage\n")
    );
    assert_eq!(server.metrics_get(METRICS_PATH).unwrap().status, 503);

    proxy.open();
    server.wait_ready().unwrap();
    assert_eq!(server.http_get(HEALTHZ_PATH).unwrap().status, 200);
    assert_eq!(server.http_get(READYZ_PATH).unwrap().status, 200);
    assert_eq!(server.metrics_get(METRICS_PATH).unwrap().status, 200);
}
