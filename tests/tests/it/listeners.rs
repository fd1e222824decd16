//! The server's listeners: TLS and mutual TLS on gRPC and HTTP (Bazel 4.2.3,
//! workers and plain gRPC clients as TLS clients; certificates renewed in
//! place), and /metrics on a listener of its own.
//!
//! Debian's Bazel 4.2.3 speaks TLS only through netty-tcnative: its netty
//! 4.1.48 has the JDK's ALPN support removed (`JdkSslContext.toNegotiator`
//! accepts only NONE, so the JDK provider fails with "JDK provider does not
//! support ALPN protocol"). The harness gives Bazel's JVM Debian's
//! `libnetty-tcnative-jni` (see `Bazel::ensure_tls_capable`), with which
//! grpc-java picks the OpenSSL provider.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use buildkube_config::{ClientTlsArgs, METRICS_PATH, METRIC_WORKERS_CONNECTED};
use buildkube_proto::reapi::capabilities_client::CapabilitiesClient;
use buildkube_proto::reapi::GetCapabilitiesRequest;
use buildkube_reapi::connect_channel;
use buildkube_tests::fixture::{self, ALL_TARGETS};
use buildkube_tests::{poll_until, remote_execution_flags, Bazel, Server, TestPki, Worker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WORKER_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// GetCapabilities over `endpoint` with `tls`: the error text on failure.
async fn capabilities(endpoint: &str, tls: &ClientTlsArgs) -> Result<(), String> {
    let channel = connect_channel(endpoint, None, tls).map_err(|e| e.to_string())?;
    CapabilitiesClient::new(channel)
        .get_capabilities(GetCapabilitiesRequest {
            instance_name: "main".into(),
        })
        .await
        .map(drop)
        .map_err(|status| format!("{status:?}"))
}

/// A TLS server on pki's certificate (mutual: client certificates required).
fn tls_server(pki: &TestPki, mutual: bool) -> Result<Server> {
    let tls = pki.server_args(mutual);
    Server::start_with(move |args| args.tls = tls)
}

/// Bazel builds every target of the fixture remotely: all spawns remote,
/// outputs byte-correct.
fn ensure_bazel_builds_remotely(bazel: &Bazel, flags: &[String]) -> Result<()> {
    let mut args = flags.to_vec();
    args.push(ALL_TARGETS.into());
    let build = bazel.build(&args)?;
    build.ensure_success()?;
    let summary = build.summary()?;
    ensure!(
        summary.local().is_empty() && summary.remote() > 0,
        "not all spawns ran remotely: {summary}\n{build}"
    );
    fixture::check_build_outputs(bazel)
}

#[test]
fn bazel_builds_the_fixture_over_tls() -> Result<()> {
    let bazel = Bazel::new()?;
    bazel.ensure_tls_capable()?;
    let dir = tempfile::tempdir()?;
    let pki = TestPki::generate(dir.path(), "farm")?;
    let server = tls_server(&pki, false)?;
    let tls = pki.client_args(false);
    let _worker = Worker::start_with(&server, move |args| args.tls = tls)?;
    server.wait_for_workers(1, WORKER_CONNECT_TIMEOUT)?;
    ensure!(server.grpc_url().starts_with("grpcs://"));

    let mut flags = remote_execution_flags(&server);
    flags.push(format!("--tls_certificate={}", pki.ca_cert.display()));
    ensure_bazel_builds_remotely(&bazel, &flags)
}

#[test]
fn bazel_builds_the_fixture_over_mutual_tls_and_is_refused_without_a_certificate() -> Result<()> {
    let bazel = Bazel::new()?;
    bazel.ensure_tls_capable()?;
    let dir = tempfile::tempdir()?;
    let pki = TestPki::generate(dir.path(), "farm")?;
    let server = tls_server(&pki, true)?;
    let tls = pki.client_args(true);
    let _worker = Worker::start_with(&server, move |args| args.tls = tls)?;
    server.wait_for_workers(1, WORKER_CONNECT_TIMEOUT)?;

    let mut flags = remote_execution_flags(&server);
    flags.push(format!("--tls_certificate={}", pki.ca_cert.display()));
    let mut refused = flags.clone();
    refused.push(ALL_TARGETS.into());
    let run = bazel.build(&refused)?;
    // Refused by the handshake, for the missing certificate (TLS 1.3's
    // `certificate_required` alert), not for anything else.
    ensure!(
        run.exit_code != Some(0) && run.stderr.contains("certificate required"),
        "Bazel without a client certificate was not refused for it by an mTLS server\n{run}"
    );

    flags.push(format!(
        "--tls_client_certificate={}",
        pki.client_cert.display()
    ));
    flags.push(format!("--tls_client_key={}", pki.client_key.display()));
    ensure_bazel_builds_remotely(&bazel, &flags)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_clients_without_a_trusted_certificate() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::generate(dir.path(), "farm")?;
    let stranger = TestPki::generate(dir.path(), "stranger")?;
    // In-process workers must connect whatever the listener requires.
    let tls = pki.server_args(true);
    let server = Server::start_with(move |args| {
        args.tls = tls;
        args.local_workers = 1;
    })?;
    server.wait_for_workers(1, WORKER_CONNECT_TIMEOUT)?;
    let endpoint = server.worker_endpoint();

    capabilities(&endpoint, &pki.client_args(true))
        .await
        .map_err(anyhow::Error::msg)
        .context("a client with a certificate of the client CA")?;
    let no_certificate = capabilities(&endpoint, &pki.client_args(false)).await;
    ensure!(
        no_certificate.is_err(),
        "a client without a certificate got in"
    );
    // A certificate of another CA is refused too.
    let foreign = ClientTlsArgs {
        tls_ca_file: Some(pki.ca_cert.clone()),
        ..stranger.client_args(true)
    };
    let foreign_certificate = capabilities(&endpoint, &foreign).await;
    ensure!(
        foreign_certificate.is_err(),
        "a client with a foreign certificate got in"
    );
    // And so is plaintext.
    let plaintext = capabilities(
        &format!("http://{}", server.grpc_addr()),
        &Default::default(),
    )
    .await;
    ensure!(plaintext.is_err(), "a plaintext client got in");
    Ok(())
}

#[test]
fn a_worker_that_does_not_trust_the_server_certificate_says_why() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::generate(dir.path(), "farm")?;
    let stranger = TestPki::generate(dir.path(), "stranger")?;
    let server = tls_server(&pki, false)?;
    let tls = stranger.client_args(false);
    let worker = Worker::start_with(&server, move |args| args.tls = tls)?;
    let line = poll_until(
        "the worker to log why it cannot connect",
        WORKER_CONNECT_TIMEOUT,
        || {
            let logs = std::fs::read_to_string(&worker.logs().stderr).unwrap_or_default();
            Ok(logs
                .lines()
                .find(|line| line.contains("certificate"))
                .map(str::to_string))
        },
    )
    .with_context(|| worker.logs().tail(20))?;
    ensure!(
        line.contains("UnknownIssuer") && line.contains(&server.grpc_addr().to_string()),
        "the worker's log does not say the server's certificate has an unknown issuer: {line}"
    );
    ensure!(
        server.metric(METRIC_WORKERS_CONNECTED)?.unwrap_or(0.0) == 0.0,
        "a worker that distrusts the server got connected"
    );
    Ok(())
}

/// Replaces `to`'s contents with `from`'s the way a Secret volume does: a
/// new file renamed over the old one.
fn swap_in(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    let staged = to.with_extension("staged");
    std::fs::copy(from, &staged)?;
    std::fs::rename(&staged, to)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_server_certificate_is_served_without_a_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let old = TestPki::generate(dir.path(), "old")?;
    let new = TestPki::generate(dir.path(), "new")?;
    // The server reads its own copies, which the "renewal" replaces.
    let live = dir.path().join("live");
    std::fs::create_dir(&live)?;
    let (cert, key) = (live.join("tls.crt"), live.join("tls.key"));
    swap_in(&old.server_cert, &cert)?;
    swap_in(&old.server_key, &key)?;
    let (cert_arg, key_arg) = (cert.clone(), key.clone());
    let server = Server::start_with(move |args| {
        args.tls.tls_cert_file = Some(cert_arg);
        args.tls.tls_key_file = Some(key_arg);
    })?;
    let endpoint = server.worker_endpoint();
    capabilities(&endpoint, &old.client_args(false))
        .await
        .map_err(anyhow::Error::msg)
        .context("before the renewal, trusting the old CA")?;

    // A key that does not match the chain yet (half-way through a
    // rotation) is not loaded: the old certificate is still served.
    swap_in(&new.server_key, &key)?;
    capabilities(&endpoint, &old.client_args(false))
        .await
        .map_err(anyhow::Error::msg)
        .context("with a new key but the old chain")?;

    swap_in(&new.server_cert, &cert)?;
    capabilities(&endpoint, &new.client_args(false))
        .await
        .map_err(anyhow::Error::msg)
        .context("after the renewal, trusting the new CA")?;
    let old_trust = capabilities(&endpoint, &old.client_args(false)).await;
    ensure!(
        old_trust.is_err(),
        "the old certificate is still served after the renewal"
    );
    Ok(())
}

/// `GET path` over HTTPS/1.1 trusting `ca`: the whole response.
async fn https_get(server: &Server, tls: &ClientTlsArgs, path: &str) -> Result<String> {
    let mut config = buildkube_reapi::tls::client_config(tls)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(server.http_addr()).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    let mut stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_listener_speaks_tls_and_metrics_have_their_own_plain_listener() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::generate(dir.path(), "farm")?;
    let server = tls_server(&pki, true)?;

    let healthz = https_get(&server, &pki.client_args(true), "/healthz").await?;
    ensure!(healthz.starts_with("HTTP/1.1 200"), "{healthz}");
    // Under TLS 1.3 the refusal arrives after the client's handshake: as an
    // error or an empty answer, never a response.
    let without_certificate = https_get(&server, &pki.client_args(false), "/healthz").await;
    ensure!(
        !without_certificate
            .as_deref()
            .unwrap_or("")
            .starts_with("HTTP"),
        "the HTTP listener served a client without a certificate: {without_certificate:?}"
    );
    // Metrics are not on the (TLS) HTTP listener, only on the metrics one.
    let on_http = https_get(&server, &pki.client_args(true), METRICS_PATH).await?;
    ensure!(on_http.starts_with("HTTP/1.1 404"), "{on_http}");
    let metrics = server.metrics_get(METRICS_PATH)?;
    ensure!(
        metrics.status == 200 && metrics.body.contains(METRIC_WORKERS_CONNECTED),
        "{metrics:?}"
    );
    Ok(())
}
