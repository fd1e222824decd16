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
//!
//! A CI job's steps get a credential of their own, minted for the job
//! ([`Authenticator`]'s `JobCredentials`): a client with scopes `read`,
//! `write-cas` and `execute` on the job's instance only (never `write-ac`,
//! never the worker protocol), revoked when the job ends. Only its SHA-256
//! is kept, in memory and in the job's stored record.

use std::collections::{BTreeSet, HashMap};
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

/// The scopes of a job's farm credential: what a step's Bazel needs to
/// build remotely, and nothing that could change another build's results.
pub const JOB_TOKEN_SCOPES: [Scope; 3] = [Scope::Read, Scope::WriteCas, Scope::Execute];

/// Prefix of minted job tokens, so one found in a log is recognisable.
const JOB_TOKEN_PREFIX: &str = "bkjob_";

/// Credentials minted for CI jobs, by the SHA-256 of their token.
#[derive(Default)]
struct JobTokens {
    by_digest: HashMap<TokenDigest, Arc<ClientGrant>>,
    by_job: HashMap<String, Vec<TokenDigest>>,
}

impl JobTokens {
    fn add(&mut self, job_id: &str, instance: &str, digest: TokenDigest) {
        let grant = Arc::new(ClientGrant {
            name: format!("job {job_id}"),
            instances: Some([instance.to_string()].into()),
            scopes: JOB_TOKEN_SCOPES.into(),
        });
        self.by_digest.insert(digest, grant);
        self.by_job
            .entry(job_id.to_string())
            .or_default()
            .push(digest);
    }
}

/// The credentials of a server with `--auth-config`.
pub struct Authenticator {
    credentials: RwLock<Vec<Credential>>,
    jobs: RwLock<JobTokens>,
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
            jobs: RwLock::default(),
        })
    }

    /// Mints a credential for CI job `job_id`'s steps: a random token
    /// valid for [`JOB_TOKEN_SCOPES`] on `instance` until
    /// [`Authenticator::revoke_job_tokens`]. Returns the token and the hex
    /// SHA-256 that is all the server keeps of it.
    pub fn mint_job_token(&self, job_id: &str, instance: &str) -> (String, String) {
        let token = format!(
            "{JOB_TOKEN_PREFIX}{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let digest = digest_of(&token);
        self.jobs.write().unwrap().add(job_id, instance, digest);
        (token, hex::encode(digest))
    }

    /// Accepts again a job token minted before a restart, known by its hex
    /// SHA-256; a hash that is not 64 hex digits is ignored (logged).
    pub fn honour_job_token(&self, job_id: &str, instance: &str, hash: &str) {
        let mut digest = [0u8; 32];
        if hex::decode_to_slice(hash, &mut digest).is_err() {
            tracing::warn!(
                job = job_id,
                "a stored job token hash is not SHA-256 hex; ignored"
            );
            return;
        }
        self.jobs.write().unwrap().add(job_id, instance, digest);
    }

    /// Revokes every token of job `job_id`.
    pub fn revoke_job_tokens(&self, job_id: &str) {
        let mut jobs = self.jobs.write().unwrap();
        for digest in jobs.by_job.remove(job_id).unwrap_or_default() {
            jobs.by_digest.remove(&digest);
        }
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
        if let Some(identity) = found {
            return Caller::Known(identity.clone());
        }
        // Job tokens are 244 random bits: a hash-map lookup by their SHA-256
        // tells a guesser nothing a comparison would hide.
        match self.jobs.read().unwrap().by_digest.get(&digest) {
            Some(grant) => Caller::Known(Identity::Client(grant.clone())),
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
    fn job_tokens_execute_on_their_instance_only_and_are_revoked_when_the_job_ends() {
        let dir = tempfile::tempdir().unwrap();
        let auth = Authenticator::from_config(&config(dir.path())).unwrap();
        let (token, hash) = auth.mint_job_token("j1", "main");
        assert_eq!(hash, hex::encode(Sha256::digest(token.as_bytes())));
        let header = format!("Bearer {token}");
        let caller = auth.resolve(Some(header.as_bytes()));
        for scope in JOB_TOKEN_SCOPES {
            assert!(caller.require_client(scope, "main").is_ok(), "{scope}");
            assert_eq!(
                caller.require_client(scope, "other").unwrap_err().code(),
                tonic::Code::PermissionDenied
            );
        }
        let denied = caller.require_client(Scope::WriteAc, "main").unwrap_err();
        assert!(denied.message().contains("job j1"), "{}", denied.message());
        assert_eq!(
            caller.require_worker().unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        // A second token of the same job (minted after a restart) and the
        // first honoured again by its hash: both go with the job.
        auth.revoke_job_tokens("j1");
        assert!(matches!(
            auth.resolve(Some(header.as_bytes())),
            Caller::Unauthenticated(_)
        ));
        auth.honour_job_token("j1", "main", &hash);
        let (second, _) = auth.mint_job_token("j1", "main");
        let (other_job, _) = auth.mint_job_token("j2", "main");
        assert!(matches!(
            auth.resolve(Some(header.as_bytes())),
            Caller::Known(_)
        ));
        auth.revoke_job_tokens("j1");
        for revoked in [&token, &second] {
            let header = format!("Bearer {revoked}");
            assert!(matches!(
                auth.resolve(Some(header.as_bytes())),
                Caller::Unauthenticated(_)
            ));
        }
        let header = format!("Bearer {other_job}");
        assert!(matches!(
            auth.resolve(Some(header.as_bytes())),
            Caller::Known(_)
        ));
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
