//! Webhook secrets: read from a file (a mounted Secret), one per line, all
//! valid at once so a secret can be rotated without dropping deliveries;
//! compared in constant time.

use std::fmt;
use std::path::{Path, PathBuf};

use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Bytes of a secrets file.
pub const MAX_SECRETS_FILE_BYTES: u64 = 64 * 1024;
/// Secrets in one file.
pub const MAX_SECRETS: usize = 16;

/// Why a secrets file was refused.
#[derive(Debug, thiserror::Error)]
pub enum SecretsFileError {
    /// The file could not be read.
    #[error("webhook secrets file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file holds no secret (empty, or only blank lines): every delivery
    /// would be refused, or worse, an empty key would be accepted.
    #[error("webhook secrets file {path} holds no secret")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// The file is larger than [`MAX_SECRETS_FILE_BYTES`] or holds more than
    /// [`MAX_SECRETS`] secrets.
    #[error("webhook secrets file {path} is too large: at most {MAX_SECRETS} secrets in {MAX_SECRETS_FILE_BYTES} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
}

/// The secrets a webhook endpoint accepts. `Debug` shows how many, never
/// their bytes.
#[derive(Clone)]
pub struct WebhookSecrets {
    secrets: Vec<Vec<u8>>,
}

impl fmt::Debug for WebhookSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WebhookSecrets({} redacted)", self.secrets.len())
    }
}

impl WebhookSecrets {
    /// Reads secrets from `path`: each non-blank line is one secret, taken
    /// as it is but for the line ending (GitHub secrets may hold spaces).
    pub fn from_file(path: &Path) -> Result<WebhookSecrets, SecretsFileError> {
        let read_error = |source| SecretsFileError::Read {
            path: path.to_path_buf(),
            source,
        };
        let size = std::fs::metadata(path).map_err(read_error)?.len();
        if size > MAX_SECRETS_FILE_BYTES {
            return Err(SecretsFileError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read_error)?;
        let secrets: Vec<Vec<u8>> = text
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| line.as_bytes().to_vec())
            .collect();
        if secrets.len() > MAX_SECRETS {
            return Err(SecretsFileError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        WebhookSecrets::new(secrets).ok_or_else(|| SecretsFileError::Empty {
            path: path.to_path_buf(),
        })
    }

    /// The given secrets, or `None` if there is none or one is blank.
    pub fn new(secrets: Vec<Vec<u8>>) -> Option<WebhookSecrets> {
        let usable = !secrets.is_empty()
            && secrets
                .iter()
                .all(|s| !s.iter().all(|b| b.is_ascii_whitespace()));
        usable.then_some(WebhookSecrets { secrets })
    }

    /// How many secrets are accepted.
    pub fn len(&self) -> usize {
        self.secrets.len()
    }

    /// Always false: a `WebhookSecrets` holds at least one secret.
    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// Whether `signature` is the HMAC-SHA256 of `body` under any of the
    /// secrets. Every secret is tried (no early exit) and each comparison is
    /// constant-time.
    pub(super) fn signs(&self, body: &[u8], signature: &[u8]) -> bool {
        let mut matched = false;
        for secret in &self.secrets {
            let mut mac = hmac::Hmac::<Sha256>::new_from_slice(secret)
                .expect("HMAC takes a key of any length");
            mac.update(body);
            matched |= mac.verify_slice(signature).is_ok();
        }
        matched
    }

    /// Whether `token` equals any of the secrets, comparing SHA-256 digests
    /// in constant time (so neither the length nor a common prefix of the
    /// secret shows in the time taken).
    pub(super) fn is_token(&self, token: &[u8]) -> bool {
        let presented = Sha256::digest(token);
        let mut matched = subtle::Choice::from(0);
        for secret in &self.secrets {
            matched |= Sha256::digest(secret)
                .as_slice()
                .ct_eq(presented.as_slice());
        }
        matched.into()
    }

    /// The `X-Hub-Signature-256` value GitHub sends for `body` signed with
    /// the first secret (for tests and for replaying a delivery by hand).
    pub fn github_signature(&self, body: &[u8]) -> String {
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(&self.secrets[0])
            .expect("HMAC takes a key of any length");
        mac.update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }
}
