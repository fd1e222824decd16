//! One overlay directory: its kustomization, placeholder secrets, replica
//! patches, disk check and kind cluster config.

use super::*;

const AUTH_CONFIGMAP_FILE: &str = "auth-configmap.yaml";
/// The overlay's file (under `secrets/`) of the workers' token.
const WORKER_TOKEN_FILE: &str = "worker-token";
/// The overlay's file of the CI client's token.
const CI_TOKEN_FILE: &str = "ci-token";
/// The overlay's file of the developer client's token (what the client configs use).
const DEV_TOKEN_FILE: &str = "dev-token";

/// A placeholder secret file and where it goes.
#[derive(Serialize)]
struct SecretFile {
    file: &'static str,
    secret: &'static str,
    key: &'static str,
    purpose: &'static str,
    placeholder: String,
}

fn secret_files(overlay: &OverlaySpec, env: &Environment<'_>) -> Vec<SecretFile> {
    let mut files = Vec::new();
    if overlay.auth {
        files.push(SecretFile {
            file: WORKER_TOKEN_FILE,
            secret: WORKER_TOKEN_SECRET,
            key: WORKER_TOKEN_KEY,
            purpose: "bearer token of the workers, valid only on the worker protocol and the CAS (`openssl rand -hex 32 > secrets/worker-token`)",
            placeholder: "REPLACE-ME-with-openssl-rand-hex-32\n".into(),
        });
        files.push(SecretFile {
            file: CI_TOKEN_FILE,
            secret: CLIENT_TOKENS_SECRET,
            key: CI_TOKEN_KEY,
            purpose: "bearer token of CI: read, write-cas, write-ac, execute (`openssl rand -hex 32 > secrets/ci-token`)",
            placeholder: "REPLACE-ME-with-openssl-rand-hex-32\n".into(),
        });
        files.push(SecretFile {
            file: DEV_TOKEN_FILE,
            secret: CLIENT_TOKENS_SECRET,
            key: DEV_TOKEN_KEY,
            purpose: "bearer token of developers: read, write-cas, execute, not write-ac (`openssl rand -hex 32 > secrets/dev-token`)",
            placeholder: "REPLACE-ME-with-openssl-rand-hex-32\n".into(),
        });
    }
    if overlay.worker_credentials {
        files.push(SecretFile {
            file: GIT_CREDENTIALS_KEY,
            secret: WORKER_CREDENTIALS_SECRET,
            key: GIT_CREDENTIALS_KEY,
            purpose: "git credentials for HTTP(S), one `https://USER:TOKEN@HOST` per line (git credential-store format)",
            placeholder: "https://REPLACE-ME-user:REPLACE-ME-token@github.com\n".into(),
        });
        files.push(SecretFile {
            file: SSH_KEY_KEY,
            secret: WORKER_CREDENTIALS_SECRET,
            key: SSH_KEY_KEY,
            purpose: "private SSH key for git over SSH (a deploy key or machine user; `ssh-keygen -t ed25519 -N '' -f secrets/ssh-private-key`)",
            placeholder: "REPLACE-ME with a private key (-----BEGIN OPENSSH PRIVATE KEY----- ...)\n".into(),
        });
        files.push(SecretFile {
            file: KNOWN_HOSTS_KEY,
            secret: WORKER_CREDENTIALS_SECRET,
            key: KNOWN_HOSTS_KEY,
            purpose: "host keys SSH trusts (`ssh-keyscan github.com > secrets/known_hosts`); unknown hosts are refused",
            placeholder: "# REPLACE-ME: ssh-keyscan github.com > secrets/known_hosts\n".into(),
        });
        files.push(SecretFile {
            file: "env.sh",
            secret: WORKER_CREDENTIALS_SECRET,
            key: ENV_SCRIPT_KEY,
            purpose:
                "bash script sourced before every command workers run (exports for build steps)",
            placeholder: render(env, "env.sh", credentials_context()),
        });
    }
    // Empty: the server refuses to start on an empty secrets file (naming
    // its flag), so a forgotten one never accepts a well-known secret.
    if overlay.webhooks.github {
        files.push(SecretFile {
            file: jobs::GITHUB_WEBHOOK_SECRET_FILE,
            secret: jobs::WEBHOOKS_SECRET,
            key: jobs::GITHUB_WEBHOOK_KEY,
            purpose: "GitHub webhook secret, one per line (two while rotating), the same as in the repository's webhook settings (`openssl rand -hex 32 > secrets/github-webhook-secret`); empty, the server does not start",
            placeholder: String::new(),
        });
    }
    if overlay.webhooks.gitlab {
        files.push(SecretFile {
            file: jobs::GITLAB_WEBHOOK_TOKEN_FILE,
            secret: jobs::WEBHOOKS_SECRET,
            key: jobs::GITLAB_WEBHOOK_KEY,
            purpose: "GitLab webhook secret token, one per line (two while rotating), the same as the hook's (`openssl rand -hex 32 > secrets/gitlab-webhook-token`); empty, the server does not start",
            placeholder: String::new(),
        });
    }
    if overlay.tls == TlsKind::Secrets {
        for (file, secret, key, purpose) in [
            ("server-tls.crt", tls::SERVER_TLS_SECRET, tls::CERT_KEY, "the server's PEM certificate chain (names: buildkube-server and its in-cluster Service names)"),
            ("server-tls.key", tls::SERVER_TLS_SECRET, tls::KEY_KEY, "its PEM private key"),
            ("server-ca.crt", tls::SERVER_TLS_SECRET, tls::CA_KEY, "the PEM CA whose client certificates the server accepts"),
            ("worker-tls.crt", tls::WORKER_TLS_SECRET, tls::CERT_KEY, "the workers' PEM client certificate (client auth), signed by that CA"),
            ("worker-tls.key", tls::WORKER_TLS_SECRET, tls::KEY_KEY, "its PEM private key"),
            ("worker-ca.crt", tls::WORKER_TLS_SECRET, tls::CA_KEY, "the PEM CA that signed the server's certificate"),
        ] {
            files.push(SecretFile {
                file,
                secret,
                key,
                purpose,
                placeholder: format!("REPLACE-ME with {purpose}\n"),
            });
        }
    }
    if overlay.external_stores {
        files.push(SecretFile {
            file: "postgres-password",
            secret: POSTGRES_SECRET,
            key: POSTGRES_PASSWORD_KEY,
            purpose: "PostgreSQL password (`openssl rand -hex 24 > secrets/postgres-password`)",
            placeholder: "REPLACE-ME-with-openssl-rand-hex-24\n".into(),
        });
    }
    files
}

/// The pool's replicas in this overlay, when fixed.
fn pool_replicas(overlay: &OverlaySpec, pool: &str) -> Option<i32> {
    overlay.worker_replicas.get(pool).copied()
}

pub(super) fn overlay_dir(
    spec: &StackSpec,
    env: &Environment<'_>,
    name: &str,
    overlay: &OverlaySpec,
    tree: &mut Tree,
) {
    let dir = |file: &str| format!("{name}/{file}");
    let mut kustomization = Kustomization::new_kustomization();
    kustomization.namespace = Some(overlay.namespace.clone());
    kustomization.resources = vec!["../base".into(), "client-configmap.yaml".into()];
    kustomization.components = overlay_components(overlay)
        .into_iter()
        .map(|c| format!("../components/{c}"))
        .collect();

    // Secrets, generated from the files under secrets/.
    let secrets = secret_files(overlay, env);
    let mut by_secret: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for s in &secrets {
        by_secret
            .entry(s.secret)
            .or_default()
            .push(format!("{}=secrets/{}", s.key, s.file));
        tree.insert(
            &dir(&format!("secrets/{}", s.file)),
            GeneratedFile::text(s.placeholder.clone()),
        );
    }
    kustomization.secret_generator = by_secret
        .into_iter()
        .map(|(secret, files)| SecretGenerator {
            name: secret.into(),
            type_: "Opaque".into(),
            files,
        })
        .collect();

    // Server: its resources in this overlay; the auth config and every token, if auth is on.
    let mut server_ops = Vec::new();
    if overlay.server_resources.is_some() {
        server_ops.push(PatchOp::replace(
            "/spec/template/spec/containers/0/resources",
            server_resources(&spec.for_overlay(overlay)),
        ));
    }
    if overlay.auth || overlay.webhooks.any() {
        server_ops.push(PatchOp::replace(
            "/spec/template/spec/containers/0/args",
            server_args(
                spec,
                overlay.auth,
                overlay.external_stores,
                overlay.tls != TlsKind::None,
                &overlay.webhooks,
            )
            .to_args(),
        ));
    }
    if overlay.webhooks.any() {
        let (volume, mount) = jobs::webhooks_volume();
        server_ops.push(PatchOp::add("/spec/template/spec/volumes/-", volume));
        server_ops.push(PatchOp::add(
            "/spec/template/spec/containers/0/volumeMounts/-",
            mount,
        ));
        if matches!(overlay.expose, ExposeSpec::Ingress) {
            kustomization
                .resources
                .push(jobs::WEBHOOKS_INGRESS_FILE.into());
            let backend_tls = (overlay.tls != TlsKind::None).then_some(overlay.namespace.as_str());
            tree.insert(
                &dir(jobs::WEBHOOKS_INGRESS_FILE),
                yaml(&jobs::webhooks_ingress(
                    spec,
                    &overlay.webhooks,
                    backend_tls,
                )),
            );
        }
    }
    if overlay.auth {
        kustomization.resources.push(AUTH_CONFIGMAP_FILE.into());
        tree.insert(&dir(AUTH_CONFIGMAP_FILE), yaml(&auth::auth_configmap()));
        for (volume, mount) in auth::server_auth_volumes() {
            server_ops.push(PatchOp::add("/spec/template/spec/volumes/-", volume));
            server_ops.push(PatchOp::add(
                "/spec/template/spec/containers/0/volumeMounts/-",
                mount,
            ));
        }
    }
    if !server_ops.is_empty() {
        let ops = server_ops;
        let path = "patches/server.yaml".to_string();
        tree.insert(&dir(&path), yaml(&ops));
        kustomization.patches.push(PatchRef {
            path,
            target: deployment_target(SERVER_NAME),
        });
    }

    // Worker pools: sizes, token, credentials, spreading, replicas.
    for base_pool in &spec.worker_pools {
        let pool = &spec
            .overlay_pool(overlay, &base_pool.name)
            .expect("the pool exists");
        let mut ops = Vec::new();
        let resized = overlay.pool_sizes.contains_key(&pool.name);
        if resized {
            // Before the volumes below are appended.
            ops.push(PatchOp::replace(
                "/spec/template/spec/containers/0/resources",
                worker_resources(pool),
            ));
            for (i, volume) in worker_volumes(pool).into_iter().enumerate() {
                ops.push(PatchOp::replace(
                    &format!("/spec/template/spec/volumes/{i}"),
                    volume,
                ));
            }
        }
        // Credentials only for the pools that opt in: every action there can read them.
        let credentials = overlay.worker_credentials && pool.git_credentials;
        if overlay.auth || credentials || resized {
            ops.push(PatchOp::replace(
                "/spec/template/spec/containers/0/args",
                worker_args(
                    spec,
                    pool,
                    overlay.auth,
                    credentials,
                    overlay.tls != TlsKind::None,
                )
                .to_args(),
            ));
        }
        if overlay.auth {
            // The worker token only: no client credential on a worker.
            let (volume, mount) = auth::worker_token_volume();
            ops.push(PatchOp::add("/spec/template/spec/volumes/-", volume));
            ops.push(PatchOp::add(
                "/spec/template/spec/containers/0/volumeMounts/-",
                mount,
            ));
        }
        if credentials {
            let (volume, mount) = credentials_volume();
            ops.push(PatchOp::add("/spec/template/spec/volumes/-", volume));
            ops.push(PatchOp::add(
                "/spec/template/spec/containers/0/volumeMounts/-",
                mount,
            ));
        }
        if overlay.worker_anti_affinity {
            ops.push(PatchOp::add(
                "/spec/template/spec/affinity",
                pool_anti_affinity(&pool.name),
            ));
        }
        if let Some(replicas) = pool_replicas(overlay, &pool.name) {
            ops.push(PatchOp::replace("/spec/replicas", replicas));
        }
        if !ops.is_empty() {
            let path = format!("patches/worker-{}.yaml", pool.name);
            tree.insert(&dir(&path), yaml(&ops));
            kustomization.patches.push(PatchRef {
                path,
                target: deployment_target(&worker_deployment_name(&pool.name)),
            });
        }
    }

    // The server certificate's names in this namespace (the component
    // knows only the short name).
    if overlay.tls == TlsKind::CertManager {
        let ops: Vec<PatchOp> = tls::namespaced_server_dns_names(&overlay.namespace)
            .into_iter()
            .map(|name| PatchOp::add("/spec/dnsNames/-", name))
            .collect();
        let path = "patches/certificate-server.yaml".to_string();
        tree.insert(&dir(&path), yaml(&ops));
        kustomization.patches.push(PatchRef {
            path,
            target: PatchTarget {
                group: "cert-manager.io".into(),
                version: "v1".into(),
                kind: crate::crd::Certificate::KIND.into(),
                name: tls::SERVER_TLS_SECRET.into(),
            },
        });
    }
    // The Ingress speaks mutual TLS to the server with the client certificate.
    if overlay.tls != TlsKind::None && matches!(overlay.expose, ExposeSpec::Ingress) {
        let annotation = |key: &str| {
            format!(
                "/metadata/annotations/{}",
                key.replace('~', "~0").replace('/', "~1")
            )
        };
        let ops: Vec<PatchOp> = tls::ingress_backend_tls_annotations(&overlay.namespace, "GRPCS")
            .into_iter()
            .map(|(key, value)| PatchOp::add(&annotation(key), value))
            .collect();
        let path = "patches/server-ingress.yaml".to_string();
        tree.insert(&dir(&path), yaml(&ops));
        kustomization.patches.push(PatchRef {
            path,
            target: PatchTarget {
                group: "networking.k8s.io".into(),
                version: "v1".into(),
                kind: "Ingress".into(),
                name: SERVER_NAME.into(),
            },
        });
    }

    // Node port for the gRPC port (first in the Service).
    if let ExposeSpec::NodePort { node_port } = overlay.expose {
        let ops = vec![
            PatchOp::replace("/spec/type", "NodePort"),
            PatchOp::add("/spec/ports/0/nodePort", node_port),
        ];
        let path = "patches/server-service.yaml".to_string();
        tree.insert(&dir(&path), yaml(&ops));
        kustomization.patches.push(PatchRef {
            path,
            target: service_target(SERVER_NAME),
        });
    }

    let (server_image, worker_image) = image_references(overlay);
    let split = |reference: &str, name: &str| -> ImageOverride {
        let (new_name, new_tag) = reference.rsplit_once(':').expect("references carry a tag");
        ImageOverride {
            name: name.into(),
            new_name: new_name.into(),
            new_tag: new_tag.into(),
        }
    };
    kustomization.images = vec![
        split(&server_image, SERVER_IMAGE),
        split(&worker_image, WORKER_IMAGE),
    ];

    // Client configuration: files for clients outside the cluster, and a
    // ConfigMap for clients inside it.
    let endpoint = client_endpoint(overlay, spec);
    let instance = spec.instances[0].clone();
    for (file, text) in client_files(env, spec, name, overlay, false) {
        tree.insert(&dir(&format!("client/{file}")), GeneratedFile::text(text));
    }
    tree.insert(
        &dir("client-configmap.yaml"),
        yaml(&client_configmap(&client_files(
            env, spec, name, overlay, true,
        ))),
    );

    if let Some(kind) = &overlay.kind_cluster {
        let pools: Vec<String> = spec
            .worker_pools
            .iter()
            .map(|p| worker_deployment_name(&p.name))
            .collect();
        let ctx = context! {
            overlay => name,
            cluster => kind.name.as_str(),
            namespace => overlay.namespace.as_str(),
            server_image => server_image.as_str(),
            worker_image => worker_image.as_str(),
            pools => pools,
            endpoint => endpoint.bazel.as_str(),
            instance => instance.as_str(),
            image_annotation => IMAGE_ID_ANNOTATION,
        };
        tree.insert(
            &dir("bin/up"),
            GeneratedFile::executable(render(env, "up", ctx.clone())),
        );
        tree.insert(
            &dir("bin/down"),
            GeneratedFile::executable(render(env, "down", ctx)),
        );
        let ExposeSpec::NodePort { node_port } = overlay.expose else {
            unreachable!("validated: kind_cluster needs a node port")
        };
        tree.insert(
            &dir("kind-cluster.yaml"),
            yaml(&kind_cluster_config(node_port, kind.host_port)),
        );
    }

    // Where a forge posts its deliveries.
    let webhook_urls: Vec<String> = jobs::webhook_paths(&overlay.webhooks)
        .into_iter()
        .map(|path| match overlay.expose {
            ExposeSpec::Ingress => format!("https://{}{path}", spec.ingress.host),
            _ => format!(
                "{}://{SERVER_NAME}.{}.svc:{}{path}",
                if overlay.tls == TlsKind::None {
                    "http"
                } else {
                    "https"
                },
                overlay.namespace,
                buildkube_config::DEFAULT_HTTP_PORT
            ),
        })
        .collect();
    let deployed = spec.for_overlay(overlay);
    let readme = render(
        env,
        "overlay-README.md",
        context! {
            overlay => name,
            description => overlay.description.as_str(),
            namespace => overlay.namespace.as_str(),
            server_image => server_image,
            worker_image => worker_image,
            instances => Serde(&spec.instances),
            instance => instance,
            components => overlay_components(overlay),
            kind_cluster => Serde(&overlay.kind_cluster),
            secrets => Serde(&secrets),
            endpoint => Serde(&endpoint),
            in_cluster_endpoint => Serde(in_cluster_endpoint(overlay, spec)),
            server_resources => Serde(&deployed.server.resources),
            worker_resources => Serde(&deployed.worker_pools[0].resources),
            disk_needed => crate::spec::human_bytes(disk_needed(&deployed, overlay)),
            auth => overlay.auth,
            auth_header => AUTHORIZATION_HEADER,
            host_token_path => HOST_TOKEN_PATH.0,
            auth_secret => CLIENT_TOKENS_SECRET,
            auth_mount_dir => auth::CLIENT_TOKENS_MOUNT_DIR,
            webhook_urls => webhook_urls,
            jobs_pools => spec.worker_pools.iter().filter(|p| p.jobs).map(|p| p.name.clone()).collect::<Vec<_>>(),
        },
    );
    tree.insert(&dir("README.md"), GeneratedFile::text(readme));
    tree.insert(&dir("kustomization.yaml"), yaml(&kustomization));
}

/// Ephemeral storage the overlay's pods request, with one extra worker per
/// pool for a rollout's surge, rounded up to a GiB.
fn disk_needed(deployed: &StackSpec, overlay: &OverlaySpec) -> u64 {
    let workers: u64 = deployed
        .worker_pools
        .iter()
        .map(|pool| {
            let replicas = pool_replicas(overlay, &pool.name).unwrap_or(pool.replicas);
            (replicas.max(0) as u64 + 1) * worker_ephemeral_bytes(pool)
        })
        .sum();
    (server_ephemeral_bytes(deployed) + workers).div_ceil(1 << 30) << 30
}

/// kind's cluster configuration (not a Kubernetes object; read by `kind create cluster`).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct KindCluster {
    kind: &'static str,
    api_version: &'static str,
    nodes: Vec<KindNode>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct KindNode {
    role: &'static str,
    extra_port_mappings: Vec<KindPortMapping>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct KindPortMapping {
    container_port: i32,
    host_port: i32,
    listen_address: &'static str,
    protocol: &'static str,
}

fn kind_cluster_config(node_port: i32, host_port: i32) -> KindCluster {
    KindCluster {
        kind: "Cluster",
        api_version: "kind.x-k8s.io/v1alpha4",
        nodes: vec![KindNode {
            role: "control-plane",
            extra_port_mappings: vec![KindPortMapping {
                container_port: node_port,
                host_port,
                listen_address: "127.0.0.1",
                protocol: "TCP",
            }],
        }],
    }
}
