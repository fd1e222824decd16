//! What an overlay tells its clients: the server endpoint in each client's
//! syntax and the client configuration files (bazelrc, recc.env, buildstream.conf).

use super::*;

/// Where clients of an overlay reach the server, in each client's syntax.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClientEndpoint {
    /// Bazel `--remote_executor` (`grpc://` or `grpcs://`).
    pub bazel: String,
    /// recc and BuildStream URL (`http://` or `https://`).
    pub http: String,
    /// A note on how the address is reached, if any.
    pub note: Option<String>,
    /// With mutual TLS to the server itself (not through the Ingress): the
    /// files a client needs.
    pub tls: Option<ClientTlsFiles>,
}

/// The CA and client certificate a client of a mutual-TLS overlay uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClientTlsFiles {
    /// The CA certificate (Bazel `--tls_certificate`).
    pub ca: String,
    /// The client certificate (Bazel `--tls_client_certificate`).
    pub cert: String,
    /// Its PKCS#8 key (Bazel `--tls_client_key`).
    pub key: String,
    /// The Secret holding them.
    pub secret: String,
}

/// The endpoint an overlay's clients use, derived from how it is exposed.
pub fn client_endpoint(overlay: &OverlaySpec, spec: &StackSpec) -> ClientEndpoint {
    let (host, port, tls, note) = match &overlay.expose {
        ExposeSpec::ClusterIp => (
            format!("{SERVER_NAME}.{}.svc.cluster.local", overlay.namespace),
            DEFAULT_GRPC_PORT as i32,
            false,
            Some("inside the cluster; from outside, `kubectl port-forward svc/buildkube-server 8980` and use localhost".into()),
        ),
        ExposeSpec::NodePort { node_port } => match &overlay.kind_cluster {
            Some(kind) => ("localhost".to_string(), kind.host_port, false, Some("kind maps the node port to the host".into())),
            None => ("NODE_ADDRESS".to_string(), *node_port, false, Some("any node's address".into())),
        },
        ExposeSpec::LoadBalancer => (
            "LOADBALANCER_ADDRESS".to_string(),
            DEFAULT_GRPC_PORT as i32,
            false,
            Some("`kubectl get service buildkube-server-grpc` shows the address".into()),
        ),
        ExposeSpec::Ingress => (spec.ingress.host.clone(), 443, true, None),
    };
    let tls_files = mutual_tls_files(overlay);
    let tls = tls || tls_files.is_some();
    let (grpc, http) = if tls {
        ("grpcs", "https")
    } else {
        ("grpc", "http")
    };
    ClientEndpoint {
        bazel: format!("{grpc}://{host}:{port}"),
        http: format!("{http}://{host}:{port}"),
        note,
        tls: tls_files,
    }
}

/// The files a client needs for the server's own mutual TLS, when it talks
/// to the server directly. Through the Ingress, clients see its public
/// certificate instead.
pub(super) fn mutual_tls_files(overlay: &OverlaySpec) -> Option<ClientTlsFiles> {
    let mutual = overlay.tls != TlsKind::None && !matches!(overlay.expose, ExposeSpec::Ingress);
    mutual.then(|| {
        let (ca, cert, key) = tls::client_tls_files();
        ClientTlsFiles {
            ca: ca.display().to_string(),
            cert: cert.display().to_string(),
            key: key.display().to_string(),
            secret: tls::CLIENT_TLS_SECRET.into(),
        }
    })
}

/// The endpoint clients running in the cluster use: the ClusterIP Service
/// (with the server's mutual TLS when the overlay has it), or the Ingress
/// when there is one (TLS, so recc and BuildStream can send a token).
pub fn in_cluster_endpoint(overlay: &OverlaySpec, spec: &StackSpec) -> ClientEndpoint {
    if matches!(overlay.expose, ExposeSpec::Ingress) {
        return ClientEndpoint {
            note: Some("through the Ingress, with TLS".into()),
            ..client_endpoint(overlay, spec)
        };
    }
    let host = format!("{SERVER_NAME}.{}.svc.cluster.local", overlay.namespace);
    let tls_files = mutual_tls_files(overlay);
    let (grpc, http) = if tls_files.is_some() {
        ("grpcs", "https")
    } else {
        ("grpc", "http")
    };
    ClientEndpoint {
        bazel: format!("{grpc}://{host}:{DEFAULT_GRPC_PORT}"),
        http: format!("{http}://{host}:{DEFAULT_GRPC_PORT}"),
        note: Some("the ClusterIP Service".into()),
        tls: tls_files,
    }
}

/// Where a client outside the cluster keeps the token (never a path in
/// this repository): in the syntax of a path, and of a shell variable.
pub const HOST_TOKEN_PATH: (&str, &str) = (
    "~/.config/buildkube/auth-token",
    "$HOME/.config/buildkube/auth-token",
);

/// The client configuration files (bazelrc, recc.env, buildstream.conf) for
/// one endpoint; `in_cluster` picks the token path of a client pod (the
/// Secret mounted where the server reads it) or of a user's machine.
pub(super) fn client_files(
    env: &Environment<'_>,
    spec: &StackSpec,
    name: &str,
    overlay: &OverlaySpec,
    in_cluster: bool,
) -> BTreeMap<String, String> {
    let (endpoint, audience, token_path, token_path_env, token_note) = if in_cluster {
        let path = format!("{}/{DEV_TOKEN_KEY}", auth::CLIENT_TOKENS_MOUNT_DIR);
        let endpoint = in_cluster_endpoint(overlay, spec);
        (
            endpoint,
            "For clients running in the cluster (ConfigMap buildkube-client-config).".to_string(),
            path.clone(),
            path,
            format!(
                "the developer token: mount the Secret {CLIENT_TOKENS_SECRET} at {} in the client's pod",
                auth::CLIENT_TOKENS_MOUNT_DIR
            ),
        )
    } else {
        let endpoint = client_endpoint(overlay, spec);
        let audience = match &endpoint.note {
            Some(note) => format!("For clients outside the cluster: {note}."),
            None => "For clients outside the cluster.".to_string(),
        };
        (
            endpoint,
            audience,
            HOST_TOKEN_PATH.0.to_string(),
            HOST_TOKEN_PATH.1.to_string(),
            "copy your overlay's secrets/dev-token there (CI: secrets/ci-token), mode 0600"
                .to_string(),
        )
    };
    let tls = endpoint.http.starts_with("https://");
    let ctx = context! {
        overlay => name,
        audience => audience,
        endpoint => Serde(&endpoint),
        tls => tls,
        instance => spec.instances[0].clone(),
        auth => overlay.auth,
        auth_header => AUTHORIZATION_HEADER,
        token_path => token_path,
        token_path_env => token_path_env,
        token_note => token_note,
    };
    ["bazelrc", "recc.env", "buildstream.conf"]
        .into_iter()
        .map(|file| (file.to_string(), render(env, file, ctx.clone())))
        .collect()
}
