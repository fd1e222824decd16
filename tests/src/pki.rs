//! A throwaway PKI for TLS tests: a CA, a server certificate valid for
//! `127.0.0.1` and `localhost`, and a client certificate, written as PEM
//! files (keys as PKCS#8, the format Bazel's `--tls_client_key` reads).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use buildkube_config::{ClientTlsArgs, ServerTlsArgs};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The PEM files of one test CA and the certificates it signed.
#[derive(Debug, Clone)]
pub struct TestPki {
    /// The CA certificate.
    pub ca_cert: PathBuf,
    /// Server certificate (SANs `127.0.0.1`, `localhost`).
    pub server_cert: PathBuf,
    /// Server private key.
    pub server_key: PathBuf,
    /// Client certificate (client-auth usage).
    pub client_cert: PathBuf,
    /// Client private key.
    pub client_key: PathBuf,
}

impl TestPki {
    /// Generates a CA named `name` and its certificates into `dir` (files
    /// `NAME-ca.pem`, `NAME-server.pem`, ...).
    pub fn generate(dir: &Path, name: &str) -> Result<TestPki> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("buildkube test CA {name}"));
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf = |common_name: &str, sans: Vec<String>, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(sans)?;
            params
                .distinguished_name
                .push(DnType::CommonName, common_name);
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &issuer)?;
            anyhow::Ok((cert.pem(), key.serialize_pem()))
        };
        let (server_cert, server_key) = leaf(
            "buildkube-server",
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let (client_cert, client_key) = leaf(
            "buildkube-test-client",
            vec![],
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;

        let write = |suffix: &str, pem: &str| -> Result<PathBuf> {
            let path = dir.join(format!("{name}-{suffix}.pem"));
            std::fs::write(&path, pem).with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        };
        Ok(TestPki {
            ca_cert: write("ca", &ca_cert.pem())?,
            server_cert: write("server", &server_cert)?,
            server_key: write("server-key", &server_key)?,
            client_cert: write("client", &client_cert)?,
            client_key: write("client-key", &client_key)?,
        })
    }

    /// Server flags: TLS with this PKI's server certificate; with
    /// `mutual`, client certificates signed by this CA are required.
    pub fn server_args(&self, mutual: bool) -> ServerTlsArgs {
        ServerTlsArgs {
            tls_cert_file: Some(self.server_cert.clone()),
            tls_key_file: Some(self.server_key.clone()),
            tls_client_ca_file: mutual.then(|| self.ca_cert.clone()),
        }
    }

    /// Client flags trusting this CA, presenting the client certificate if
    /// `with_certificate`.
    pub fn client_args(&self, with_certificate: bool) -> ClientTlsArgs {
        ClientTlsArgs {
            tls_ca_file: Some(self.ca_cert.clone()),
            tls_client_cert_file: with_certificate.then(|| self.client_cert.clone()),
            tls_client_key_file: with_certificate.then(|| self.client_key.clone()),
        }
    }
}
