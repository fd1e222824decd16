//! Git credentials for actions (`--git-credentials-dir`). The worker clears
//! every action's environment, so credentials mounted into the worker reach
//! an action only through the variables set here: git's credential store
//! for HTTP(S), and an SSH command with the key and the pinned host keys.
//! Every action on the worker can read them: give them only to a pool whose
//! clients may all use them.

use std::path::{Path, PathBuf};

use buildkube_config::{GIT_CREDENTIALS_FILE, KNOWN_HOSTS_FILE, SSH_KEY_FILE};

/// Why `--git-credentials-dir` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum GitCredentialsError {
    /// The directory cannot be read.
    #[error("--git-credentials-dir {}: {source}", dir.display())]
    Unreadable {
        /// The directory.
        dir: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The directory holds neither credentials nor a key.
    #[error("--git-credentials-dir {} holds neither {GIT_CREDENTIALS_FILE} nor {SSH_KEY_FILE}", dir.display())]
    Empty {
        /// The directory.
        dir: PathBuf,
    },
    /// An SSH key without host keys: every host would be refused.
    #[error("--git-credentials-dir {} has {SSH_KEY_FILE} but no {KNOWN_HOSTS_FILE}: \
             unknown hosts are refused, so SSH would reach none", dir.display())]
    NoKnownHosts {
        /// The directory.
        dir: PathBuf,
    },
}

/// The variables that give an action the credentials.
#[derive(Debug, Clone)]
pub(crate) struct GitCredentials {
    env: Vec<(String, String)>,
    /// The credential store, whose passwords are secrets.
    store: Option<PathBuf>,
    /// The SSH key, whose lines are secrets.
    key: Option<PathBuf>,
}

/// `%XX` escapes decoded (an invalid escape is kept as written).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `text` as one shell word.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

impl GitCredentials {
    /// Reads which files `dir` holds (`git-credentials`, `ssh-private-key`,
    /// `known_hosts`).
    pub(crate) fn from_dir(dir: &Path) -> Result<GitCredentials, GitCredentialsError> {
        let unreadable = |source| GitCredentialsError::Unreadable {
            dir: dir.to_path_buf(),
            source,
        };
        let dir = std::path::absolute(dir).map_err(unreadable)?;
        std::fs::read_dir(&dir).map_err(unreadable)?;
        let file = |name: &str| Some(dir.join(name)).filter(|path| path.is_file());
        let store = file(GIT_CREDENTIALS_FILE);
        let key = file(SSH_KEY_FILE);
        let known_hosts = file(KNOWN_HOSTS_FILE);
        let mut env = vec![
            // Fail instead of waiting for a password nobody types.
            ("GIT_TERMINAL_PROMPT".to_string(), "0".to_string()),
        ];
        match (&store, &key) {
            (None, None) => return Err(GitCredentialsError::Empty { dir }),
            (_, Some(_)) if known_hosts.is_none() => {
                return Err(GitCredentialsError::NoKnownHosts { dir })
            }
            _ => {}
        }
        if let Some(store) = &store {
            // Configuration by environment (git 2.31+): no file to write,
            // and the action's own ~/.gitconfig, if any, still applies.
            env.extend([
                ("GIT_CONFIG_COUNT".to_string(), "1".to_string()),
                (
                    "GIT_CONFIG_KEY_0".to_string(),
                    "credential.helper".to_string(),
                ),
                (
                    "GIT_CONFIG_VALUE_0".to_string(),
                    format!("store --file={}", shell_quote(&store.display().to_string())),
                ),
            ]);
        }
        if let (Some(key), Some(known_hosts)) = (&key, known_hosts) {
            let option = |o: &str| format!("-o {}", shell_quote(o));
            let command = [
                "ssh".to_string(),
                format!("-i {}", shell_quote(&key.display().to_string())),
                option("IdentitiesOnly=yes"),
                option(&format!("UserKnownHostsFile={}", known_hosts.display())),
                option("GlobalKnownHostsFile=/dev/null"),
                option("StrictHostKeyChecking=yes"),
                option("BatchMode=yes"),
            ]
            .join(" ");
            env.push(("GIT_SSH_COMMAND".to_string(), command));
        }
        Ok(GitCredentials { env, store, key })
    }

    /// The values a log must not show: the passwords of the credential
    /// store (as written and percent-decoded) and the SSH key's lines.
    /// Read now, so that rotated files count.
    pub(crate) fn secret_values(&self) -> Vec<String> {
        let mut secrets = Vec::new();
        if let Some(text) = self
            .store
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
        {
            for line in text.lines() {
                // scheme://user:password@host/...
                let Some((_, rest)) = line.trim().split_once("://") else {
                    continue;
                };
                let userinfo = rest.split('/').next().unwrap_or("");
                let Some((userinfo, _host)) = userinfo.rsplit_once('@') else {
                    continue;
                };
                if let Some((_, password)) = userinfo.split_once(':') {
                    secrets.push(password.to_string());
                    secrets.push(percent_decode(password));
                }
            }
        }
        if let Some(text) = self
            .key
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
        {
            secrets.push(text);
        }
        secrets.sort();
        secrets.dedup();
        secrets
    }

    /// Adds the variables to an action's environment, except those the
    /// action sets itself (its own git configuration wins as a whole).
    pub(crate) fn apply(&self, env: &mut Vec<(String, String)>) {
        let sets = |env: &[(String, String)], name: &str| env.iter().any(|(n, _)| n == name);
        let own_config = sets(env, "GIT_CONFIG_COUNT");
        let additions: Vec<(String, String)> = self
            .env
            .iter()
            .filter(|(name, _)| !sets(env, name))
            .filter(|(name, _)| !(own_config && name.starts_with("GIT_CONFIG_")))
            .cloned()
            .collect();
        env.extend(additions);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_without_known_hosts_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(SSH_KEY_FILE), "key").unwrap();
        let error = GitCredentials::from_dir(dir.path())
            .unwrap_err()
            .to_string();
        assert!(error.contains(KNOWN_HOSTS_FILE), "{error}");
        std::fs::remove_file(dir.path().join(SSH_KEY_FILE)).unwrap();
        let error = GitCredentials::from_dir(dir.path())
            .unwrap_err()
            .to_string();
        assert!(error.contains("holds neither"), "{error}");
    }

    #[test]
    fn job_step_log_secrets_are_the_store_passwords_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(GIT_CREDENTIALS_FILE),
            "https://ci:s3cr%40t-pass@git.example\nhttps://nopass@host\n",
        )
        .unwrap();
        let git = GitCredentials::from_dir(dir.path()).unwrap();
        assert_eq!(git.secret_values(), ["s3cr%40t-pass", "s3cr@t-pass"]);
    }

    #[test]
    fn the_action_s_own_variables_win() {
        let dir = tempfile::tempdir().unwrap();
        for file in [GIT_CREDENTIALS_FILE, SSH_KEY_FILE, KNOWN_HOSTS_FILE] {
            std::fs::write(dir.path().join(file), "x").unwrap();
        }
        let git = GitCredentials::from_dir(dir.path()).unwrap();
        let mut env = vec![
            ("GIT_SSH_COMMAND".to_string(), "ssh -v".to_string()),
            ("GIT_CONFIG_COUNT".to_string(), "0".to_string()),
        ];
        git.apply(&mut env);
        let names: Vec<&str> = env.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["GIT_SSH_COMMAND", "GIT_CONFIG_COUNT", "GIT_TERMINAL_PROMPT"]
        );
        assert_eq!(env[0].1, "ssh -v");
    }
}
