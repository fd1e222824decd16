//! Secret values taken out of a step's log before it leaves the worker.
//!
//! Output arrives in pieces cut anywhere, so a secret can be split across
//! two reads. [`Redactor`] replaces every whole occurrence in what it holds
//! and releases only complete lines, or, of a line longer than
//! [`MAX_HELD_LINE`], all but the last `longest secret - 1` bytes: no
//! released byte can be the start of a secret whose end has not arrived.
//! A multi-line secret is redacted line by line, so no secret contains a
//! newline and a released complete line cannot hold half of one.

/// What a secret is replaced by.
pub(crate) const REDACTED: &str = "[REDACTED]";
/// Shorter values are not treated as secrets (they would mask ordinary
/// words all over the log).
pub(crate) const MIN_SECRET_LEN: usize = 6;
/// A line without a newline is released in parts beyond this length.
pub(crate) const MAX_HELD_LINE: usize = 16 * 1024;

/// Replaces secrets in a stream of output (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Redactor {
    /// Longest first, so a secret containing another is replaced whole.
    secrets: Vec<Vec<u8>>,
    held: Vec<u8>,
}

impl Redactor {
    /// A redactor for `values` (each multi-line value line by line; values
    /// shorter than [`MIN_SECRET_LEN`] are ignored).
    pub(crate) fn new<'a>(values: impl IntoIterator<Item = &'a str>) -> Redactor {
        let mut secrets: Vec<Vec<u8>> = values
            .into_iter()
            .flat_map(|value| value.lines())
            .map(|line| line.trim_end_matches('\r').as_bytes().to_vec())
            .filter(|line| line.len() >= MIN_SECRET_LEN)
            .collect();
        secrets.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        secrets.dedup();
        Redactor {
            secrets,
            held: Vec::new(),
        }
    }

    fn longest(&self) -> usize {
        self.secrets.first().map_or(0, Vec::len)
    }

    /// Takes `data` in; returns what can be released now.
    pub(crate) fn push(&mut self, data: &[u8]) -> Vec<u8> {
        self.held.extend_from_slice(data);
        self.held = replace_all(&self.held, &self.secrets);
        let cut = match self.held.iter().rposition(|&b| b == b'\n') {
            Some(newline) => newline + 1,
            None if self.held.len() > MAX_HELD_LINE => {
                self.held.len() - self.longest().saturating_sub(1)
            }
            None => 0,
        };
        let rest = self.held.split_off(cut);
        std::mem::replace(&mut self.held, rest)
    }

    /// Releases everything held (the stream ended).
    pub(crate) fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.held)
    }
}

/// `data` with every occurrence of each secret replaced.
fn replace_all(data: &[u8], secrets: &[Vec<u8>]) -> Vec<u8> {
    if secrets.is_empty() {
        return data.to_vec();
    }
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    'outer: while i < data.len() {
        for secret in secrets {
            if data[i..].starts_with(secret) {
                out.extend_from_slice(REDACTED.as_bytes());
                i += secret.len();
                continue 'outer;
            }
        }
        out.push(data[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(redactor: &mut Redactor, pieces: &[&[u8]]) -> String {
        let mut out = Vec::new();
        for piece in pieces {
            out.extend(redactor.push(piece));
        }
        out.extend(redactor.finish());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn job_step_log_secret_split_across_chunks_is_redacted() {
        let mut r = Redactor::new(["hunter2-secret", "abc"]);
        // Every way of cutting the line into two pieces.
        let line = b"token=hunter2-secret; abc stays\n";
        for cut in 0..line.len() {
            let out = run(&mut r, &[&line[..cut], &line[cut..]]);
            assert_eq!(out, "token=[REDACTED]; abc stays\n", "cut at {cut}");
        }
        // A line longer than what is held, the secret straddling the release point.
        let mut long = vec![b'x'; MAX_HELD_LINE + 3];
        long.extend_from_slice(b"hunter2-secret");
        let out = run(
            &mut r,
            &[&long[..MAX_HELD_LINE + 8], &long[MAX_HELD_LINE + 8..]],
        );
        assert!(out.ends_with("x[REDACTED]"), "{}", &out[out.len() - 20..]);
        assert!(!out.contains("hunter"));
    }

    #[test]
    fn job_step_log_multi_line_secrets_are_redacted_line_by_line() {
        let key = "-----BEGIN KEY-----\nAAAAsecretline1\nBBBBsecretline2\n-----END KEY-----\n";
        let mut r = Redactor::new([key, "short"]);
        let out = run(
            &mut r,
            &[b"cat key:\nAAAAsecretline1\nBBBBsecret", b"line2\nshort\n"],
        );
        assert_eq!(out, "cat key:\n[REDACTED]\n[REDACTED]\nshort\n");
    }
}
