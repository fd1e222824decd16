//! A step's log: output of git, hooks and commands, and the worker's own
//! notes, as timestamped lines (`2026-12-02T06:01:02.345Z | text`) with
//! secrets redacted, written to a file (uploaded to the CAS at the end) and
//! streamed live to the server with `AppendStepLog`.
//!
//! Memory stays bounded: producers hand pieces to one writer task through a
//! bounded channel; the streamer reads what to send back from the file, at
//! most [`MAX_CHUNK`] at a time, so a slow or unreachable server only makes
//! it fall behind. The file itself is capped (`--max-stdio-size`); beyond
//! it the output is dropped and the log says so.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tracing::{debug, warn};

use super::redact::Redactor;
use crate::backoff::Backoff;
use crate::server_link::{LogAppend, ServerLink};

/// The largest piece sent to the server at once.
pub(crate) const MAX_CHUNK: usize = 64 * 1024;
/// Pieces of output waiting for the writer (each at most [`MAX_CHUNK`]).
const QUEUED_PIECES: usize = 16;
/// How often the streamer sends what accumulated, at most.
const STREAM_INTERVAL: Duration = Duration::from_millis(200);

/// `time` as `2026-12-02T06:01:02.345Z`.
pub(crate) fn timestamp(time: SystemTime) -> String {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_millis()
    )
}

enum Piece {
    /// Output of a process.
    Output(Bytes),
    /// The process ended: release what the redactor holds.
    EndOfOutput,
    /// A line of the worker's own.
    Note(String),
    /// Stop and answer with the file's final length.
    Close(oneshot::Sender<u64>),
}

/// Where producers send output (cheap to clone).
#[derive(Clone)]
pub(crate) struct LogSink {
    pieces: mpsc::Sender<Piece>,
}

impl LogSink {
    /// Output of a process (any size; cut into pieces here).
    pub(crate) async fn output(&self, data: &[u8]) {
        for piece in data.chunks(MAX_CHUNK) {
            let _ = self
                .pieces
                .send(Piece::Output(Bytes::copy_from_slice(piece)))
                .await;
        }
    }

    /// The end of a process's output.
    pub(crate) async fn end_of_output(&self) {
        let _ = self.pieces.send(Piece::EndOfOutput).await;
    }

    /// A line from the worker (`[buildkube] ...`).
    pub(crate) async fn note(&self, text: impl Into<String>) {
        let _ = self.pieces.send(Piece::Note(text.into())).await;
    }
}

/// The writer: redacts, timestamps and appends to the file.
struct Writer {
    file: tokio::fs::File,
    written: watch::Sender<u64>,
    redactor: Redactor,
    at_line_start: bool,
    limit: u64,
    truncated: bool,
}

impl Writer {
    async fn write_lines(&mut self, text: &[u8]) -> std::io::Result<()> {
        if text.is_empty() || self.truncated {
            return Ok(());
        }
        let mut out = Vec::with_capacity(text.len() + 64);
        let stamp = timestamp(SystemTime::now());
        for segment in text.split_inclusive(|&b| b == b'\n') {
            if self.at_line_start {
                out.extend_from_slice(stamp.as_bytes());
                out.extend_from_slice(b" | ");
            }
            out.extend_from_slice(segment);
            self.at_line_start = segment.ends_with(b"\n");
        }
        let written = *self.written.borrow();
        if written + out.len() as u64 > self.limit {
            self.truncated = true;
            let keep = self.limit.saturating_sub(written) as usize;
            out.truncate(keep);
            out.extend_from_slice(
                format!(
                    "\n{stamp} | [buildkube] the log reached {} bytes (--max-stdio-size); the rest is dropped\n",
                    self.limit
                )
                .as_bytes(),
            );
        }
        self.file.write_all(&out).await?;
        self.file.flush().await?;
        self.written.send_modify(|n| *n += out.len() as u64);
        Ok(())
    }

    async fn line_break(&mut self) -> std::io::Result<()> {
        if !self.at_line_start {
            self.write_lines(b"\n").await?;
        }
        Ok(())
    }

    async fn run(mut self, mut pieces: mpsc::Receiver<Piece>) {
        let mut failed = false;
        while let Some(piece) = pieces.recv().await {
            let result = match piece {
                Piece::Output(data) => {
                    let ready = self.redactor.push(&data);
                    self.write_lines(&ready).await
                }
                Piece::EndOfOutput => {
                    let rest = self.redactor.finish();
                    match self.write_lines(&rest).await {
                        Ok(()) => self.line_break().await,
                        Err(e) => Err(e),
                    }
                }
                Piece::Note(text) => {
                    let line = format!("[buildkube] {text}\n");
                    let redacted = self.redactor.push(line.as_bytes());
                    let rest = self.redactor.finish();
                    match self.line_break().await {
                        Ok(()) => match self.write_lines(&redacted).await {
                            Ok(()) => self.write_lines(&rest).await,
                            Err(e) => Err(e),
                        },
                        Err(e) => Err(e),
                    }
                }
                Piece::Close(done) => {
                    let rest = self.redactor.finish();
                    if !failed {
                        let _ = self.write_lines(&rest).await;
                        let _ = self.line_break().await;
                        let _ = self.file.sync_all().await;
                    }
                    let _ = done.send(*self.written.borrow());
                    return;
                }
            };
            if let Err(error) = result {
                if !failed {
                    warn!(%error, "writing the step log failed; the rest of it is lost");
                }
                failed = true;
                self.truncated = true;
            }
        }
    }
}

/// A step's log while the step runs.
pub(crate) struct StepLog {
    path: PathBuf,
    sink: LogSink,
    writer: tokio::task::JoinHandle<()>,
    streamer: tokio::task::JoinHandle<()>,
    finished_len: watch::Sender<Option<u64>>,
}

impl StepLog {
    /// Creates the log file at `path`, redacting `secrets`, and starts
    /// streaming it on `lease_id`. `abandon` is told when the server says
    /// the lease is no longer held.
    pub(crate) async fn start(
        path: &Path,
        secrets: Redactor,
        limit: u64,
        link: Arc<ServerLink>,
        lease_id: String,
        abandon: Arc<Notify>,
    ) -> std::io::Result<StepLog> {
        let file = tokio::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(path)
            .await?;
        let (pieces_tx, pieces_rx) = mpsc::channel(QUEUED_PIECES);
        let (written_tx, written_rx) = watch::channel(0u64);
        let writer = Writer {
            file,
            written: written_tx,
            redactor: secrets,
            at_line_start: true,
            limit,
            truncated: false,
        };
        let writer = tokio::spawn(writer.run(pieces_rx));
        let (finished_len, finished_rx) = watch::channel(None);
        let streamer = tokio::spawn(stream(
            path.to_path_buf(),
            written_rx,
            finished_rx,
            link,
            lease_id,
            abandon,
        ));
        Ok(StepLog {
            path: path.to_path_buf(),
            sink: LogSink { pieces: pieces_tx },
            writer,
            streamer,
            finished_len,
        })
    }

    /// Where producers send output.
    pub(crate) fn sink(&self) -> LogSink {
        self.sink.clone()
    }

    /// Writes what is pending, sends the rest to the server (for up to
    /// `stream_grace`) and returns the file and its length.
    pub(crate) async fn finish(self, stream_grace: Duration) -> (PathBuf, u64) {
        let (done_tx, done_rx) = oneshot::channel();
        let _ = self.sink.pieces.send(Piece::Close(done_tx)).await;
        let len = done_rx.await.unwrap_or(0);
        let _ = self.writer.await;
        self.finished_len.send_replace(Some(len));
        let mut streamer = self.streamer;
        if tokio::time::timeout(stream_grace, &mut streamer)
            .await
            .is_err()
        {
            debug!("the live log did not reach the server in time; the CAS has it");
            streamer.abort();
        }
        (self.path, len)
    }
}

/// Sends the file's new bytes to the server as they are written, in order,
/// each chunk at its offset (a retried chunk is idempotent).
async fn stream(
    path: PathBuf,
    mut written: watch::Receiver<u64>,
    mut finished: watch::Receiver<Option<u64>>,
    link: Arc<ServerLink>,
    lease_id: String,
    abandon: Arc<Notify>,
) {
    let mut sent = 0u64;
    let mut buffer = vec![0u8; MAX_CHUNK];
    let mut file = None;
    let mut backoff = Backoff::default();
    loop {
        let available = *written.borrow_and_update();
        let end = *finished.borrow_and_update();
        if sent >= available {
            if end.is_some_and(|end| sent >= end) {
                return;
            }
            let more = tokio::select! {
                changed = written.changed() => changed.is_ok() || finished.changed().await.is_ok(),
                changed = finished.changed() => changed.is_ok(),
            };
            if !more {
                return; // the log was dropped unfinished
            }
            // Let output gather into fuller chunks.
            if end.is_none() {
                tokio::time::sleep(STREAM_INTERVAL).await;
            }
            continue;
        }
        if file.is_none() {
            match tokio::fs::File::open(&path).await {
                Ok(f) => file = Some(f),
                Err(error) => {
                    warn!(%error, "cannot read the step log to stream it");
                    return;
                }
            }
        }
        let f = file.as_mut().expect("opened above");
        let want = ((available - sent) as usize).min(MAX_CHUNK);
        let read = async {
            f.seek(std::io::SeekFrom::Start(sent)).await?;
            f.read_exact(&mut buffer[..want]).await
        };
        if let Err(error) = read.await {
            warn!(%error, "cannot read the step log to stream it");
            return;
        }
        let chunk = Bytes::copy_from_slice(&buffer[..want]);
        match link.append_step_log(&lease_id, sent, chunk).await {
            LogAppend::Appended => {
                backoff.reset();
                sent += want as u64;
            }
            LogAppend::Abandon => {
                abandon.notify_one();
                return;
            }
            LogAppend::Retry => tokio::time::sleep(backoff.next_delay()).await,
            LogAppend::Refused => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_step_log_timestamps_are_utc_with_milliseconds() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_191_262_345);
        assert_eq!(timestamp(at), "2026-12-02T06:01:02.345Z");
        assert_eq!(
            timestamp(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000Z"
        );
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(timestamp(leap), "2000-02-29T00:00:00.000Z");
    }
}
