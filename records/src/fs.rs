//! [`FsRecords`]: the data-dir record store. One append-only log file
//! (`records.log`, format in `log_format.rs`) plus an in-memory index of
//! where each live value sits in it.
//!
//! One thread owns the file. Concurrent [`RecordStore::apply`] calls queue
//! to it; it takes every call waiting (a group), appends one frame per call
//! with one write, makes them durable with one `fdatasync`, and only then
//! answers them all. So a slow disk makes callers wait about one flush, not
//! one flush per caller ahead of them. When dead entries outweigh live ones
//! the thread rewrites the live records into a new file (temp, fsync,
//! rename, fsync of the directory) between groups.
//!
//! What a crash loses: nothing acknowledged. A process kill loses at most
//! the group being written (not yet acknowledged); a machine crash the same,
//! since acknowledgement waits for `fdatasync`. A torn last frame fails its
//! checksum and is cut off at the next open.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use nix::fcntl::{Flock, FlockArg};
use tokio::sync::{mpsc, oneshot};

use crate::log_format::{
    decode_body, encode_frame, StoredChange, FRAME_HEADER, MAGIC, MAX_FRAME_BODY,
};
use crate::{check_changes, check_kind, RecordChange, RecordError, RecordStore};

/// Name of the log in the store's directory.
const LOG_FILE: &str = "records.log";
/// Name of the log being rewritten by compaction.
const COMPACT_FILE: &str = "records.log.compact";
/// Held (flock) while a server uses the directory.
const LOCK_FILE: &str = "lock";
/// Calls waiting for the log thread; more wait to be queued.
const QUEUE: usize = 1024;
/// Most value bytes written in one group.
const GROUP_BYTES: usize = 64 << 20;
/// The log is not compacted below this size.
const COMPACT_AT_LEAST: u64 = 8 << 20;
/// Body size of the frames compaction writes.
const COMPACT_FRAME: usize = 4 << 20;

enum Request {
    Apply(Vec<RecordChange>, oneshot::Sender<Result<(), RecordError>>),
    Read {
        kind: String,
        /// One key, or every key of the kind.
        key: Option<String>,
        reply: oneshot::Sender<Result<Vec<(String, Bytes)>, RecordError>>,
    },
}

/// Records in a log file under a directory (by default `--data-dir/records`).
pub struct FsRecords {
    requests: mpsc::Sender<Request>,
    dir: PathBuf,
}

impl FsRecords {
    /// Opens the store in `dir` (created if missing), replaying its log.
    /// Refuses a directory another process has open.
    pub async fn open(dir: &Path) -> Result<FsRecords, RecordError> {
        let owned = dir.to_path_buf();
        let log = tokio::task::spawn_blocking(move || Log::open(&owned))
            .await
            .map_err(|e| backend(dir, "opening", e))??;
        tracing::debug!(dir = %dir.display(), records = log.index.len(), bytes = log.len, "record log opened");
        let (requests, receiver) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("records-log".into())
            .spawn(move || log.serve(receiver))
            .map_err(|e| backend(dir, "starting its thread", e))?;
        Ok(FsRecords {
            requests,
            dir: dir.to_path_buf(),
        })
    }

    fn gone(&self) -> RecordError {
        backend(&self.dir, "writing", "the log thread stopped")
    }

    async fn read(
        &self,
        kind: &str,
        key: Option<&str>,
    ) -> Result<Vec<(String, Bytes)>, RecordError> {
        check_kind(kind)?;
        let (reply, answer) = oneshot::channel();
        let request = Request::Read {
            kind: kind.to_string(),
            key: key.map(str::to_string),
            reply,
        };
        self.requests.send(request).await.map_err(|_| self.gone())?;
        answer.await.map_err(|_| self.gone())?
    }
}

#[async_trait::async_trait]
impl RecordStore for FsRecords {
    async fn apply(&self, changes: Vec<RecordChange>) -> Result<(), RecordError> {
        check_changes(&changes)?;
        if changes.is_empty() {
            return Ok(());
        }
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request::Apply(changes, reply))
            .await
            .map_err(|_| self.gone())?;
        answer.await.map_err(|_| self.gone())?
    }

    async fn get(&self, kind: &str, key: &str) -> Result<Option<Bytes>, RecordError> {
        Ok(self.read(kind, Some(key)).await?.pop().map(|(_, v)| v))
    }

    async fn load_all(&self, kind: &str) -> Result<Vec<(String, Bytes)>, RecordError> {
        self.read(kind, None).await
    }

    fn describe(&self) -> String {
        format!("data-dir {}", self.dir.display())
    }
}

fn backend(dir: &Path, action: &str, error: impl std::fmt::Display) -> RecordError {
    RecordError::Backend {
        store: format!("data-dir {}", dir.display()),
        action: action.to_string(),
        message: error.to_string(),
    }
}

/// Where a live value sits in the log.
#[derive(Clone, Copy)]
struct Slot {
    offset: u64,
    len: u32,
}

/// The log file and its index, owned by the log thread.
struct Log {
    dir: PathBuf,
    file: File,
    _lock: Flock<File>,
    len: u64,
    index: BTreeMap<(String, String), Slot>,
    /// Bytes the live records would take in a fresh log.
    live_bytes: u64,
    /// Set when a failed write could not be undone: later writes would land
    /// after garbage, so every write is refused until a restart.
    broken: Option<String>,
}

fn encoded_size(kind: &str, key: &str, len: u32) -> u64 {
    (1 + 1 + kind.len() + 2 + key.len() + 4) as u64 + len as u64
}

impl Log {
    fn err(&self, action: &str, error: impl std::fmt::Display) -> RecordError {
        backend(&self.dir, action, error)
    }

    fn open(dir: &Path) -> Result<Log, RecordError> {
        let fail = |action: &str, e: std::io::Error| backend(dir, action, e);
        std::fs::create_dir_all(dir).map_err(|e| fail("creating the directory", e))?;
        let lock =
            File::create(dir.join(LOCK_FILE)).map_err(|e| fail("creating its lock file", e))?;
        let lock = Flock::lock(lock, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
            backend(
                dir,
                "locking",
                format!(
                    "another process holds {} ({errno}): two servers cannot share a data dir",
                    dir.join(LOCK_FILE).display()
                ),
            )
        })?;
        match std::fs::remove_file(dir.join(COMPACT_FILE)) {
            Ok(()) => {
                tracing::info!(dir = %dir.display(), "removed an interrupted compaction of the record log")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail("removing an interrupted compaction", e)),
        }
        let path = dir.join(LOG_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| fail("opening records.log", e))?;
        let mut log = Log {
            dir: dir.to_path_buf(),
            file,
            _lock: lock,
            len: 0,
            index: BTreeMap::new(),
            live_bytes: 0,
            broken: None,
        };
        let size = log
            .file
            .metadata()
            .map_err(|e| fail("reading records.log", e))?
            .len();
        if size == 0 {
            log.file
                .write_all_at(MAGIC, 0)
                .map_err(|e| fail("writing records.log", e))?;
            log.file
                .sync_all()
                .map_err(|e| fail("flushing records.log", e))?;
            sync_dir(dir).map_err(|e| fail("flushing the directory", e))?;
            log.len = MAGIC.len() as u64;
        } else {
            log.replay(size)?;
        }
        Ok(log)
    }

    /// Rebuilds the index from the file; cuts off a torn tail.
    fn replay(&mut self, size: u64) -> Result<(), RecordError> {
        let mut reader = std::io::BufReader::with_capacity(1 << 20, &self.file);
        let mut magic = [0u8; 8];
        if reader.read_exact(&mut magic).is_err() || &magic != MAGIC {
            return Err(self.err(
                "reading records.log",
                "it does not start with a record log header: not a buildkube record log, or a newer format",
            ));
        }
        let mut at = MAGIC.len() as u64;
        let mut frames = Vec::new();
        loop {
            let mut header = [0u8; FRAME_HEADER];
            if at == size || reader.read_exact(&mut header).is_err() {
                break;
            }
            let body_len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
            let crc = u32::from_le_bytes(header[4..].try_into().unwrap());
            if body_len > MAX_FRAME_BODY || at + (FRAME_HEADER + body_len) as u64 > size {
                break;
            }
            let mut body = vec![0u8; body_len];
            if reader.read_exact(&mut body).is_err() || crc32fast::hash(&body) != crc {
                break;
            }
            let Some(changes) = decode_body(&body) else {
                break;
            };
            frames.push((at + FRAME_HEADER as u64, changes));
            at += (FRAME_HEADER + body_len) as u64;
        }
        drop(reader);
        for (body_at, changes) in frames {
            self.index_changes(body_at, changes);
        }
        if at < size {
            tracing::warn!(dir = %self.dir.display(), dropped_bytes = size - at,
                "record log ends in a torn write (a crash while writing, never acknowledged); cutting it off");
            self.file
                .set_len(at)
                .map_err(|e| self.err("truncating records.log", e))?;
            self.file
                .sync_all()
                .map_err(|e| self.err("flushing records.log", e))?;
        }
        self.len = at;
        Ok(())
    }

    fn index_changes(&mut self, body_at: u64, changes: Vec<StoredChange>) {
        for change in changes {
            match change {
                StoredChange::Put {
                    kind,
                    key,
                    value_at,
                    value_len,
                } => {
                    let size = encoded_size(&kind, &key, value_len);
                    let slot = Slot {
                        offset: body_at + value_at as u64,
                        len: value_len,
                    };
                    if let Some(old) = self.index.insert((kind, key), slot) {
                        self.live_bytes -= size - value_len as u64 + old.len as u64;
                    }
                    self.live_bytes += size;
                }
                StoredChange::Delete { kind, key } => {
                    if let Some(old) = self.index.remove(&(kind.clone(), key.clone())) {
                        self.live_bytes -= encoded_size(&kind, &key, old.len);
                    }
                }
            }
        }
    }

    fn recount(&mut self) {
        self.live_bytes = self
            .index
            .iter()
            .map(|((kind, key), slot)| encoded_size(kind, key, slot.len))
            .sum();
    }

    fn serve(mut self, mut requests: mpsc::Receiver<Request>) {
        while let Some(first) = requests.blocking_recv() {
            let mut group = vec![first];
            let mut bytes = 0usize;
            while bytes < GROUP_BYTES {
                let Ok(next) = requests.try_recv() else { break };
                if let Request::Apply(changes, _) = &next {
                    bytes += changes.iter().map(|c| c.value_len()).sum::<usize>();
                }
                group.push(next);
            }
            let mut applies = Vec::new();
            let mut reads = Vec::new();
            for request in group {
                match request {
                    Request::Apply(changes, reply) => applies.push((changes, reply)),
                    Request::Read { kind, key, reply } => reads.push((kind, key, reply)),
                }
            }
            if !applies.is_empty() {
                let result = self.append(applies.iter().map(|(changes, _)| changes.as_slice()));
                for (_, reply) in applies {
                    let _ = reply.send(result.clone());
                }
                if result.is_ok() {
                    if let Err(e) = self.compact_if_worth_it() {
                        tracing::warn!(error = %e, "could not compact the record log; it keeps growing until a compaction succeeds");
                    }
                }
            }
            for (kind, key, reply) in reads {
                let _ = reply.send(self.read(&kind, key.as_deref()));
            }
        }
    }

    /// Appends one frame per apply with one write and one fdatasync.
    fn append<'a>(
        &mut self,
        applies: impl Iterator<Item = &'a [RecordChange]>,
    ) -> Result<(), RecordError> {
        if let Some(why) = &self.broken {
            return Err(self.err("writing", why));
        }
        let mut buf = Vec::new();
        let mut frames = Vec::new();
        for changes in applies {
            let frame_at = buf.len();
            let values = encode_frame(changes, &mut buf);
            frames.push((frame_at, changes, values));
        }
        let start = self.len;
        let written = self
            .file
            .write_all_at(&buf, start)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // Undo, so later frames do not follow a torn one.
            if let Err(undo) = self
                .file
                .set_len(start)
                .and_then(|()| self.file.sync_data())
            {
                self.broken = Some(format!(
                    "a failed write ({e}) could not be undone ({undo}); restart the server"
                ));
            }
            return Err(self.err("appending to records.log", e));
        }
        self.len = start + buf.len() as u64;
        for (frame_at, changes, values) in frames {
            let body_at = start + (frame_at + FRAME_HEADER) as u64;
            let stored = changes
                .iter()
                .zip(values)
                .map(|(change, value)| match (change, value) {
                    (RecordChange::Put { kind, key, .. }, Some((value_at, value_len))) => {
                        StoredChange::Put {
                            kind: kind.clone(),
                            key: key.clone(),
                            value_at: value_at as usize - FRAME_HEADER,
                            value_len,
                        }
                    }
                    _ => StoredChange::Delete {
                        kind: change.kind().to_string(),
                        key: change.key().to_string(),
                    },
                })
                .collect();
            self.index_changes(body_at, stored);
        }
        Ok(())
    }

    fn read(&self, kind: &str, key: Option<&str>) -> Result<Vec<(String, Bytes)>, RecordError> {
        let slots: Vec<(&String, Slot)> = match key {
            Some(key) => self
                .index
                .get_key_value(&(kind.to_string(), key.to_string()))
                .map(|((_, key), slot)| (key, *slot))
                .into_iter()
                .collect(),
            None => self
                .index
                .range((kind.to_string(), String::new())..)
                .take_while(|((k, _), _)| k == kind)
                .map(|((_, key), slot)| (key, *slot))
                .collect(),
        };
        slots
            .into_iter()
            .map(|(key, slot)| {
                let mut value = vec![0u8; slot.len as usize];
                self.file
                    .read_exact_at(&mut value, slot.offset)
                    .map_err(|e| self.err("reading records.log", e))?;
                Ok((key.clone(), Bytes::from(value)))
            })
            .collect()
    }

    fn compact_if_worth_it(&mut self) -> Result<(), RecordError> {
        if self.len < COMPACT_AT_LEAST || self.len < 2 * self.live_bytes + COMPACT_AT_LEAST / 2 {
            return Ok(());
        }
        self.compact()
    }

    /// Writes the live records to a new log and renames it over the old one.
    fn compact(&mut self) -> Result<(), RecordError> {
        let started = std::time::Instant::now();
        let before = self.len;
        let path = self.dir.join(COMPACT_FILE);
        let fail = |action: &str, e: std::io::Error| backend(&self.dir, action, e);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| fail("creating records.log.compact", e))?;
        let mut buf = MAGIC.to_vec();
        let mut new_index = BTreeMap::new();
        let mut written = 0u64;
        let mut pending: Vec<RecordChange> = Vec::new();
        let mut pending_bytes = 0usize;
        let entries: Vec<((String, String), Slot)> =
            self.index.iter().map(|(k, s)| (k.clone(), *s)).collect();
        let mut flush = |buf: &mut Vec<u8>,
                         pending: &mut Vec<RecordChange>,
                         new_index: &mut BTreeMap<(String, String), Slot>|
         -> std::io::Result<()> {
            let frame_at = buf.len();
            let values = encode_frame(pending, buf);
            for (change, value) in pending.drain(..).zip(values) {
                if let Some((value_at, len)) = value {
                    new_index.insert(
                        (change.kind().to_string(), change.key().to_string()),
                        Slot {
                            offset: written + (frame_at as u64) + value_at,
                            len,
                        },
                    );
                }
            }
            file.write_all_at(buf, written)?;
            written += buf.len() as u64;
            buf.clear();
            Ok(())
        };
        for ((kind, key), slot) in entries {
            let mut value = vec![0u8; slot.len as usize];
            self.file
                .read_exact_at(&mut value, slot.offset)
                .map_err(|e| fail("reading records.log", e))?;
            pending_bytes += value.len();
            pending.push(RecordChange::put(&kind, &key, value));
            if pending_bytes >= COMPACT_FRAME {
                flush(&mut buf, &mut pending, &mut new_index)
                    .map_err(|e| fail("writing records.log.compact", e))?;
                pending_bytes = 0;
            }
        }
        if !pending.is_empty() || !buf.is_empty() {
            if pending.is_empty() {
                // Only the header is left to write.
                file.write_all_at(&buf, written)
                    .map_err(|e| fail("writing records.log.compact", e))?;
                written += buf.len() as u64;
            } else {
                flush(&mut buf, &mut pending, &mut new_index)
                    .map_err(|e| fail("writing records.log.compact", e))?;
            }
        }
        file.sync_all()
            .map_err(|e| fail("flushing records.log.compact", e))?;
        std::fs::rename(&path, self.dir.join(LOG_FILE))
            .map_err(|e| fail("renaming the compacted log into place", e))?;
        sync_dir(&self.dir).map_err(|e| fail("flushing the directory", e))?;
        self.file = file;
        self.len = written;
        self.index = new_index;
        self.recount();
        tracing::info!(dir = %self.dir.display(), before_bytes = before, after_bytes = self.len, records = self.index.len(),
            took_ms = started.elapsed().as_millis() as u64, "record log compacted");
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests;
