//! Who is calling, and what they may do.
//!
//! One interceptor ([`interceptor`]) turns `authorization: Bearer TOKEN` into
//! a [`Caller`] in the request's extensions; every service method then asks
//! the caller for what it needs ([`Caller::require_worker`],
//! [`Caller::require_client`], [`Caller::require_cas`]). gRPC health asks
//! nothing, so probes work without a token.
//!
//! A worker credential is valid on the worker protocol and on the CAS
//! (ContentAddressableStorage and ByteStream), which workers need to fetch
//! inputs and upload outputs: the CAS is content addressed, so nothing a
//! worker writes there can stand for anything but its own bytes. It is never
//! valid on the ActionCache, Execution or Operations services: a worker's
//! results reach the action cache only through `Complete` of a lease it
//! holds, which the server checks and writes itself. A client credential is
//! never valid on the worker protocol.
//!
//! Tokens are compared by SHA-256 digest in constant time, and token files
//! are re-read by [`Authenticator::reload`] so keys rotate without a restart.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use buildkube_config::auth::{read_token_file, AuthConfig, Scope, TokenFileError};
use sha2::{Digest as _, Sha256};
use tonic::{Request, Status};

/// How often token files are re-read.
pub const TOKEN_RELOAD_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// A client credential's rights.
#[derive(Debug)]
pub struct ClientGrant {
    /// Name in logs and errors.
    pub name: String,
    /// Instances the scopes apply to; `None`: every instance.
    pub instances: Option<BTreeSet<String>>,
    /// What the client may do there.
    pub scopes: BTreeSet<Scope>,
}

impl ClientGrant {
    fn allows(&self, scope: Scope, instance: &str) -> bool {
        self.scopes.contains(&scope)
            && self
                .instances
                .as_ref()
                .is_none_or(|instances| instances.contains(instance))
    }
}

/// A credential the server recognised.
#[derive(Debug, Clone)]
pub enum Identity {
    /// A worker key: the worker protocol and the CAS.
    Worker {
        /// Name of the credential, recorded with every lease it takes.
        name: Arc<str>,
    },
    /// A client key with scopes per instance.
    Client(Arc<ClientGrant>),
}

/// The caller of one request, as the interceptor resolved it.
#[derive(Debug, Clone)]
pub enum Caller {
    /// The server runs without `--auth-config`: everything is allowed.
    Open,
    /// A recognised credential.
    Known(Identity),
    /// Auth is on and the request carries no valid token (the reason).
    Unauthenticated(&'static str),
}

/// Lease holders without auth all share this identity name.
pub const OPEN_IDENTITY: &str = "open";

impl Caller {
    /// The caller of `request` (UNAUTHENTICATED if the interceptor did not run).
    pub fn of<T>(request: &Request<T>) -> Caller {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or(Caller::Unauthenticated("no credentials were resolved"))
    }

    /// The worker identity name, for the worker protocol; a client
    /// credential is PERMISSION_DENIED here.
    pub fn require_worker(&self) -> Result<Arc<str>, Status> {
        match self {
            Caller::Open => Ok(Arc::from(OPEN_IDENTITY)),
            Caller::Known(Identity::Worker { name }) => Ok(name.clone()),
            Caller::Known(Identity::Client(grant)) => Err(Status::permission_denied(format!(
                "client credential `{}` cannot use the worker protocol; workers need a \
                 credential listed under `workers` in --auth-config",
                grant.name
            ))),
            Caller::Unauthenticated(why) => Err(Status::unauthenticated(*why)),
        }
    }

    /// Ok if a client credential has `scope` on `instance`.
    pub fn require_client(&self, scope: Scope, instance: &str) -> Result<(), Status> {
        match self {
            Caller::Open => Ok(()),
            Caller::Known(Identity::Client(grant)) => check_grant(grant, scope, instance),
            Caller::Known(Identity::Worker { name }) => Err(Status::permission_denied(format!(
                "worker credential `{name}` may use only the worker protocol and the CAS; \
                 this call needs a client credential with scope `{scope}` on instance {instance:?}"
            ))),
            Caller::Unauthenticated(why) => Err(Status::unauthenticated(*why)),
        }
    }

    /// Ok for a client with `scope` on `instance`, or any worker (the CAS
    /// is content addressed: a worker cannot forge anything there).
    pub fn require_cas(&self, scope: Scope, instance: &str) -> Result<(), Status> {
        match self {
            Caller::Known(Identity::Worker { .. }) => Ok(()),
            other => other.require_client(scope, instance),
        }
    }

    /// Whether the caller may read `instance`'s operations and results.
    pub fn may_read(&self, instance: &str) -> bool {
        self.require_client(Scope::Read, instance).is_ok()
    }
}

fn check_grant(grant: &ClientGrant, scope: Scope, instance: &str) -> Result<(), Status> {
    if grant.allows(scope, instance) {
        return Ok(());
    }
    let why = if grant.scopes.contains(&scope) {
        "is not granted that instance"
    } else {
        "lacks that scope"
    };
    Err(Status::permission_denied(format!(
        "client credential `{}` {why}: this call needs scope `{scope}` on instance {instance:?}",
        grant.name
    )))
}

/// Why the auth configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A token file is unreadable or empty.
    #[error("--auth-config: {0}")]
    TokenFile(#[from] TokenFileError),
    /// One token is configured for a worker and for a client.
    #[error("--auth-config: {worker} and {client} hold the same token; a token is either a worker's or a client's")]
    SharedToken {
        /// The worker's token file.
        worker: String,
        /// The client's token file.
        client: String,
    },
}

type TokenDigest = [u8; 32];

fn digest_of(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

/// Compares two digests without an early exit, so timing tells nothing
/// about how much of a guess matched.
fn same_digest(a: &TokenDigest, b: &TokenDigest) -> bool {
    let difference = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | std::hint::black_box(x ^ y));
    difference == 0
}

struct Credential {
    identity: Identity,
    /// `None` for in-memory credentials (the in-process workers').
    token_file: Option<PathBuf>,
    /// `None` while the file is unreadable or empty: it then accepts nothing.
    digest: Option<TokenDigest>,
}

/// The credentials of a server with `--auth-config`.
pub struct Authenticator {
    credentials: RwLock<Vec<Credential>>,
}

impl Authenticator {
    /// Reads every token file; an unreadable or empty one is an error naming it.
    pub fn from_config(config: &AuthConfig) -> Result<Authenticator, AuthError> {
        let mut credentials = Vec::new();
        for worker in &config.workers {
            credentials.push(Credential {
                identity: Identity::Worker {
                    name: Arc::from(worker.display_name()),
                },
                digest: Some(digest_of(&read_token_file(&worker.token_file)?)),
                token_file: Some(worker.token_file.clone()),
            });
        }
        for client in &config.clients {
            credentials.push(Credential {
                identity: Identity::Client(Arc::new(ClientGrant {
                    name: client.display_name(),
                    instances: client
                        .instances
                        .as_ref()
                        .map(|names| names.iter().cloned().collect()),
                    scopes: client.scopes.clone(),
                })),
                digest: Some(digest_of(&read_token_file(&client.token_file)?)),
                token_file: Some(client.token_file.clone()),
            });
        }
        check_roles_apart(&credentials)?;
        Ok(Authenticator {
            credentials: RwLock::new(credentials),
        })
    }

    /// Adds a worker credential that lives only in memory, for the
    /// in-process `--local-workers`, and returns its token.
    pub fn add_local_worker_token(&self) -> String {
        let token = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        self.credentials.write().unwrap().push(Credential {
            identity: Identity::Worker {
                name: Arc::from("local-workers"),
            },
            token_file: None,
            digest: Some(digest_of(&token)),
        });
        token
    }

    /// Re-reads the token files; a changed one takes effect at once. A file
    /// that became unreadable or empty accepts nothing until it is fixed.
    pub fn reload(&self) {
        let files: Vec<(usize, PathBuf)> = self
            .credentials
            .read()
            .unwrap()
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.token_file.clone().map(|path| (i, path)))
            .collect();
        let read: Vec<(usize, Result<TokenDigest, TokenFileError>)> = files
            .into_iter()
            .map(|(i, path)| (i, read_token_file(&path).map(|t| digest_of(&t))))
            .collect();
        let mut credentials = self.credentials.write().unwrap();
        for (i, digest) in read {
            let credential = &mut credentials[i];
            let path = credential.token_file.as_ref().expect("file credential");
            match digest {
                Ok(digest) if credential.digest != Some(digest) => {
                    tracing::info!(token_file = %path.display(), "token file changed; using the new token");
                    credential.digest = Some(digest);
                }
                Ok(_) => {}
                Err(error) if credential.digest.is_some() => {
                    tracing::error!(%error, "token file unusable; its credential accepts nothing until it is fixed");
                    credential.digest = None;
                }
                Err(_) => {}
            }
        }
    }

    /// The caller presenting `authorization` (the header's value, if any).
    pub fn resolve(&self, authorization: Option<&[u8]>) -> Caller {
        let Some(value) = authorization else {
            return Caller::Unauthenticated("this server requires `authorization: Bearer <token>`");
        };
        let Some(token) = value
            .strip_prefix(b"Bearer ")
            .map(|t| t.trim_ascii())
            .filter(|t| !t.is_empty())
        else {
            return Caller::Unauthenticated("the authorization header is not `Bearer <token>`");
        };
        let digest: TokenDigest = Sha256::digest(token).into();
        let credentials = self.credentials.read().unwrap();
        let mut found: Option<&Identity> = None;
        for credential in credentials.iter() {
            let matches = credential
                .digest
                .as_ref()
                .is_some_and(|d| same_digest(d, &digest));
            if matches && found.is_none() {
                found = Some(&credential.identity);
            } else if matches {
                let both_roles = matches!(
                    (found, &credential.identity),
                    (Some(Identity::Worker { .. }), Identity::Client(_))
                        | (Some(Identity::Client(_)), Identity::Worker { .. })
                );
                if both_roles {
                    tracing::error!(
                        "one token is configured for a worker and for a client; refusing it"
                    );
                    return Caller::Unauthenticated(
                        "this token is configured for a worker and for a client; the server refuses it",
                    );
                }
            }
        }
        match found {
            Some(identity) => Caller::Known(identity.clone()),
            None => Caller::Unauthenticated("unknown bearer token"),
        }
    }
}

fn check_roles_apart(credentials: &[Credential]) -> Result<(), AuthError> {
    let name = |c: &Credential| {
        c.token_file
            .as_ref()
            .map_or_else(|| "in-memory".to_string(), |p| p.display().to_string())
    };
    for worker in credentials
        .iter()
        .filter(|c| matches!(c.identity, Identity::Worker { .. }))
    {
        for client in credentials
            .iter()
            .filter(|c| matches!(c.identity, Identity::Client(_)))
        {
            if worker.digest.is_some() && worker.digest == client.digest {
                return Err(AuthError::SharedToken {
                    worker: name(worker),
                    client: name(client),
                });
            }
        }
    }
    Ok(())
}

/// The interceptor that puts the [`Caller`] into every request's
/// extensions; `None` (no `--auth-config`) makes every caller [`Caller::Open`].
pub fn interceptor(
    auth: Option<Arc<Authenticator>>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut request: Request<()>| {
        let caller = match &auth {
            None => Caller::Open,
            Some(auth) => auth.resolve(
                request
                    .metadata()
                    .get(buildkube_config::AUTHORIZATION_HEADER)
                    .map(|v| v.as_bytes()),
            ),
        };
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use buildkube_config::auth::{ClientCredential, WorkerCredential};

    fn write(dir: &std::path::Path, name: &str, token: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, token).unwrap();
        path
    }

    fn config(dir: &std::path::Path) -> AuthConfig {
        AuthConfig {
            workers: vec![WorkerCredential {
                name: Some("pool".into()),
                token_file: write(dir, "worker", "w-token\n"),
            }],
            clients: vec![
                ClientCredential {
                    name: Some("ci".into()),
                    token_file: write(dir, "ci", "ci-token"),
                    instances: Some(vec!["main".into()]),
                    scopes: Scope::ALL.into_iter().collect(),
                },
                ClientCredential {
                    name: Some("dev".into()),
                    token_file: write(dir, "dev", "dev-token"),
                    instances: None,
                    scopes: [Scope::Read, Scope::WriteCas, Scope::Execute].into(),
                },
            ],
        }
    }

    #[test]
    fn tokens_resolve_to_their_identity_and_scopes() {
        let dir = tempfile::tempdir().unwrap();
        let auth = Authenticator::from_config(&config(dir.path())).unwrap();
        let worker = auth.resolve(Some(b"Bearer w-token"));
        assert_eq!(&*worker.require_worker().unwrap(), "pool");
        assert_eq!(
            worker
                .require_client(Scope::Read, "main")
                .unwrap_err()
                .code(),
            tonic::Code::PermissionDenied
        );
        assert!(worker.require_cas(Scope::WriteCas, "main").is_ok());

        let ci = auth.resolve(Some(b"Bearer ci-token"));
        assert!(ci.require_client(Scope::WriteAc, "main").is_ok());
        let other = ci.require_client(Scope::Read, "other").unwrap_err();
        assert_eq!(other.code(), tonic::Code::PermissionDenied);
        assert!(other.message().contains("\"other\""), "{}", other.message());
        assert_eq!(
            ci.require_worker().unwrap_err().code(),
            tonic::Code::PermissionDenied
        );

        let dev = auth.resolve(Some(b"Bearer dev-token"));
        let denied = dev.require_client(Scope::WriteAc, "main").unwrap_err();
        assert!(
            denied.message().contains("write-ac"),
            "{}",
            denied.message()
        );
        assert!(dev.require_client(Scope::Execute, "anything").is_ok());

        for bad in [
            None,
            Some(&b"Bearer nope"[..]),
            Some(b"Bearer "),
            Some(b"w-token"),
        ] {
            let caller = auth.resolve(bad);
            assert_eq!(
                caller.require_cas(Scope::Read, "main").unwrap_err().code(),
                tonic::Code::Unauthenticated,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn changed_token_files_take_effect_on_reload() {
        let dir = tempfile::tempdir().unwrap();
        let auth = Authenticator::from_config(&config(dir.path())).unwrap();
        write(dir.path(), "dev", "dev-token-2\n");
        auth.reload();
        assert!(matches!(
            auth.resolve(Some(b"Bearer dev-token")),
            Caller::Unauthenticated(_)
        ));
        assert!(matches!(
            auth.resolve(Some(b"Bearer dev-token-2")),
            Caller::Known(_)
        ));
        // Emptied: the credential accepts nothing, not an empty token.
        write(dir.path(), "dev", "");
        auth.reload();
        assert!(matches!(
            auth.resolve(Some(b"Bearer dev-token-2")),
            Caller::Unauthenticated(_)
        ));
        assert!(matches!(
            auth.resolve(Some(b"Bearer ")),
            Caller::Unauthenticated(_)
        ));
    }

    #[test]
    fn a_token_cannot_be_worker_and_client() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path());
        write(dir.path(), "ci", "w-token");
        let err = Authenticator::from_config(&config)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("worker") && err.contains("ci"), "{err}");
        config.clients[0].token_file = write(dir.path(), "empty", "\n");
        let err = Authenticator::from_config(&config)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("empty"), "{err}");
    }

    #[test]
    fn local_worker_tokens_are_workers() {
        let dir = tempfile::tempdir().unwrap();
        let auth = Authenticator::from_config(&config(dir.path())).unwrap();
        let token = auth.add_local_worker_token();
        let caller = auth.resolve(Some(format!("Bearer {token}").as_bytes()));
        assert_eq!(&*caller.require_worker().unwrap(), "local-workers");
    }
}
