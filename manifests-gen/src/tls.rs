//! Mutual TLS inside the stack: the Secrets the `tls` component mounts into
//! the server and the workers, the flags that point the binaries at them, and
//! the cert-manager objects of the `cert-manager` component that issue and
//! renew them from a CA of the stack's own.
//!
//! Every Secret has cert-manager's keys: `tls.crt`, `tls.key` and `ca.crt`
//! (the CA). The server trusts the client certificates its own `ca.crt`
//! signed, so workers and clients need a certificate of the same CA.

use std::path::PathBuf;

use buildkube_config::{ClientTlsArgs, ServerTlsArgs};
use k8s_openapi::api::core::v1::{Volume, VolumeMount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::crd::{
    CaIssuer, Certificate, CertificatePrivateKey, CertificateSpec, Issuer, IssuerRef, IssuerSpec,
    SelfSignedIssuer, CERT_MANAGER_API_VERSION,
};
use crate::objects::{server_selector, SERVER_NAME};

/// Secret with the server's certificate, key and the CA its clients' certificates chain to.
pub const SERVER_TLS_SECRET: &str = "buildkube-server-tls";
/// Secret with the workers' client certificate, key and the CA of the server's certificate.
pub const WORKER_TLS_SECRET: &str = "buildkube-worker-tls";
/// Secret with a client certificate for in-cluster clients (CI jobs, the Ingress).
pub const CLIENT_TLS_SECRET: &str = "buildkube-client-tls";
/// Secret with the stack's CA (cert-manager component).
pub const CA_SECRET: &str = "buildkube-ca";
/// Self-signed Issuer that signs only the CA (cert-manager component).
pub const BOOTSTRAP_ISSUER: &str = "buildkube-selfsigned";
/// Issuer that signs the server, worker and client certificates with the CA.
pub const CA_ISSUER: &str = "buildkube-ca";
/// Certificate key in the Secrets.
pub const CERT_KEY: &str = "tls.crt";
/// Private key key in the Secrets.
pub const KEY_KEY: &str = "tls.key";
/// CA certificate key in the Secrets.
pub const CA_KEY: &str = "ca.crt";
/// Where the server and the workers mount their TLS Secret.
pub const TLS_MOUNT_DIR: &str = "/etc/buildkube/tls";
/// Where in-cluster clients are expected to mount [`CLIENT_TLS_SECRET`]
/// (the client configurations name files under it).
pub const CLIENT_TLS_MOUNT_DIR: &str = "/etc/buildkube/client-tls";

/// Lifetime of the server, worker and client certificates.
const LEAF_DURATION: &str = "2160h";
/// They are renewed a month before they expire; the binaries pick up the
/// new files without a restart.
const LEAF_RENEW_BEFORE: &str = "720h";
/// Lifetime of the CA; renewing it means every party must trust the new one.
const CA_DURATION: &str = "87600h";
const CA_RENEW_BEFORE: &str = "8760h";

fn file(dir: &str, key: &str) -> PathBuf {
    PathBuf::from(format!("{dir}/{key}"))
}

/// The server's TLS flags: its certificate, and client certificates required.
pub fn server_tls_args() -> ServerTlsArgs {
    ServerTlsArgs {
        tls_cert_file: Some(file(TLS_MOUNT_DIR, CERT_KEY)),
        tls_key_file: Some(file(TLS_MOUNT_DIR, KEY_KEY)),
        tls_client_ca_file: Some(file(TLS_MOUNT_DIR, CA_KEY)),
    }
}

/// A worker's TLS flags: trust the CA, present the worker certificate.
pub fn worker_tls_args() -> ClientTlsArgs {
    ClientTlsArgs {
        tls_ca_file: Some(file(TLS_MOUNT_DIR, CA_KEY)),
        tls_client_cert_file: Some(file(TLS_MOUNT_DIR, CERT_KEY)),
        tls_client_key_file: Some(file(TLS_MOUNT_DIR, KEY_KEY)),
    }
}

/// An in-cluster client's TLS files, under [`CLIENT_TLS_MOUNT_DIR`]: (CA, certificate, key).
pub fn client_tls_files() -> (PathBuf, PathBuf, PathBuf) {
    (
        file(CLIENT_TLS_MOUNT_DIR, CA_KEY),
        file(CLIENT_TLS_MOUNT_DIR, CERT_KEY),
        file(CLIENT_TLS_MOUNT_DIR, KEY_KEY),
    )
}

/// Volume and mount of a TLS Secret at [`TLS_MOUNT_DIR`] (mode 0440: the
/// process reads it through its fsGroup).
pub fn tls_volume(secret: &str) -> (Volume, VolumeMount) {
    crate::auth::secret_volume("tls", secret, TLS_MOUNT_DIR)
}

fn meta(name: &str) -> ObjectMeta {
    crate::objects::meta(name, server_selector())
}

fn private_key() -> CertificatePrivateKey {
    CertificatePrivateKey {
        algorithm: "ECDSA".into(),
        size: 256,
        // Bazel's --tls_client_key (netty) reads PKCS#8 only.
        encoding: "PKCS8".into(),
        rotation_policy: "Always".into(),
    }
}

fn issuer_ref(name: &str) -> IssuerRef {
    IssuerRef {
        name: name.into(),
        kind: Issuer::KIND.into(),
        group: CERT_MANAGER_API_VERSION
            .split('/')
            .next()
            .expect("group/version")
            .into(),
    }
}

fn leaf(secret: &str, common_name: &str, dns_names: Vec<String>, usage: &str) -> Certificate {
    Certificate::new(
        meta(secret),
        CertificateSpec {
            secret_name: secret.into(),
            common_name: common_name.into(),
            dns_names,
            is_ca: false,
            duration: LEAF_DURATION.into(),
            renew_before: LEAF_RENEW_BEFORE.into(),
            usages: vec!["digital signature".into(), usage.into()],
            private_key: private_key(),
            issuer_ref: issuer_ref(CA_ISSUER),
        },
    )
}

/// DNS names of the server certificate that hold in every namespace; an
/// overlay adds `buildkube-server.NAMESPACE.svc[.cluster.local]`.
pub fn server_dns_names() -> Vec<String> {
    vec![SERVER_NAME.into()]
}

/// The server's names in `namespace`, which overlays add to its certificate.
pub fn namespaced_server_dns_names(namespace: &str) -> Vec<String> {
    vec![
        format!("{SERVER_NAME}.{namespace}.svc"),
        format!("{SERVER_NAME}.{namespace}.svc.cluster.local"),
    ]
}

/// Objects, each with the name of the file it is written to.
pub type Named<T> = Vec<(String, T)>;

/// The cert-manager component's objects, each with its file name: a
/// self-signed Issuer that makes the CA, the CA Issuer, and the server,
/// worker and client certificates it signs.
pub fn cert_manager_objects() -> (Named<Issuer>, Named<Certificate>) {
    let issuers = vec![
        (
            "issuer-selfsigned.yaml".to_string(),
            Issuer::new(
                meta(BOOTSTRAP_ISSUER),
                IssuerSpec {
                    self_signed: Some(SelfSignedIssuer {}),
                    ca: None,
                },
            ),
        ),
        (
            "issuer-ca.yaml".to_string(),
            Issuer::new(
                meta(CA_ISSUER),
                IssuerSpec {
                    self_signed: None,
                    ca: Some(CaIssuer {
                        secret_name: CA_SECRET.into(),
                    }),
                },
            ),
        ),
    ];
    let ca = Certificate::new(
        meta(CA_SECRET),
        CertificateSpec {
            secret_name: CA_SECRET.into(),
            common_name: "buildkube CA".into(),
            dns_names: Vec::new(),
            is_ca: true,
            duration: CA_DURATION.into(),
            renew_before: CA_RENEW_BEFORE.into(),
            usages: vec!["cert sign".into(), "crl sign".into()],
            private_key: private_key(),
            issuer_ref: issuer_ref(BOOTSTRAP_ISSUER),
        },
    );
    let certificates = vec![
        ("certificate-ca.yaml".to_string(), ca),
        (
            "certificate-server.yaml".to_string(),
            leaf(
                SERVER_TLS_SECRET,
                SERVER_NAME,
                server_dns_names(),
                "server auth",
            ),
        ),
        (
            "certificate-worker.yaml".to_string(),
            leaf(
                WORKER_TLS_SECRET,
                "buildkube-worker",
                Vec::new(),
                "client auth",
            ),
        ),
        (
            "certificate-client.yaml".to_string(),
            leaf(
                CLIENT_TLS_SECRET,
                "buildkube-client",
                Vec::new(),
                "client auth",
            ),
        ),
    ];
    (issuers, certificates)
}

/// Annotations that make ingress-nginx speak mutual TLS to the server:
/// `backend_protocol` (`GRPCS` to the gRPC port, `HTTPS` to the HTTP port),
/// the server certificate checked against the stack's CA under the name
/// [`SERVER_NAME`], the client certificate of [`CLIENT_TLS_SECRET`] (in
/// `namespace`) presented.
pub fn ingress_backend_tls_annotations(
    namespace: &str,
    backend_protocol: &str,
) -> Vec<(&'static str, String)> {
    vec![
        (
            "nginx.ingress.kubernetes.io/backend-protocol",
            backend_protocol.into(),
        ),
        (
            "nginx.ingress.kubernetes.io/proxy-ssl-secret",
            format!("{namespace}/{CLIENT_TLS_SECRET}"),
        ),
        ("nginx.ingress.kubernetes.io/proxy-ssl-verify", "on".into()),
        (
            "nginx.ingress.kubernetes.io/proxy-ssl-name",
            SERVER_NAME.into(),
        ),
        (
            "nginx.ingress.kubernetes.io/proxy-ssl-server-name",
            "on".into(),
        ),
    ]
}
