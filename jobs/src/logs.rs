//! Live logs of running CI steps: what workers append (`AppendStepLog`) and
//! followers (`logs -f`, HTTP) read while the step runs.
//!
//! One buffer per (job, step, attempt). Appends carry their offset in the
//! step's log, so a retried append is idempotent and a gap (the server
//! restarted and lost the start) is kept as a gap. Memory is bounded: a
//! step keeps at most [`LiveLogLimits::per_step`] bytes (its oldest chunks
//! are dropped for followers; the whole log is in the CAS when the step
//! ends), all steps together at most [`LiveLogLimits::total`] (finished
//! steps go first, then the oldest chunks of the biggest buffer), and at
//! most [`LiveLogLimits::steps`] buffers are kept.
//!
//! A step rerun after its worker was lost appends under a new lease: its
//! buffer starts again from offset 0, and followers are told
//! ([`LogChunk::restarted`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::watch;

/// The largest chunk a worker may append at once.
pub const MAX_APPEND_BYTES: usize = 64 * 1024;

/// Which step's log: a job's step, at one of the job's attempts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StepLogKey {
    /// The job.
    pub job_id: String,
    /// The step's key (`:pipeline` for the pipeline step).
    pub step_key: String,
    /// The job's attempt of the step (`StepSpec.attempt`).
    pub attempt: u32,
}

impl std::fmt::Display for StepLogKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}#{}", self.job_id, self.step_key, self.attempt)
    }
}

/// Bounds on what live logs hold.
#[derive(Debug, Clone, Copy)]
pub struct LiveLogLimits {
    /// Bytes kept per step (default 4 MiB).
    pub per_step: usize,
    /// Bytes kept for all steps together (default 256 MiB).
    pub total: usize,
    /// Step buffers kept, finished ones included (default 10,000).
    pub steps: usize,
}

impl Default for LiveLogLimits {
    fn default() -> Self {
        LiveLogLimits {
            per_step: 4 << 20,
            total: 256 << 20,
            steps: 10_000,
        }
    }
}

/// Why an append was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LogError {
    /// The chunk is larger than [`MAX_APPEND_BYTES`].
    #[error("log chunk of {len} bytes for {key} is larger than {MAX_APPEND_BYTES} bytes")]
    ChunkTooLarge {
        /// The step.
        key: StepLogKey,
        /// The chunk's length.
        len: usize,
    },
    /// The step already finished.
    #[error("the log of {key} is closed: the step finished")]
    Finished {
        /// The step.
        key: StepLogKey,
    },
}

/// What a follower reads: bytes of the log at `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChunk {
    /// Where `data` starts in the step's log. Past the offset the follower
    /// asked for when the bytes between were dropped (bounded buffer) or
    /// never arrived.
    pub offset: u64,
    /// The bytes.
    pub data: Bytes,
    /// The step started again (its worker was lost and another reruns it):
    /// what follows is a new log from offset 0.
    pub restarted: bool,
}

struct StepBuffer {
    /// The lease whose run this buffer holds.
    lease: String,
    /// Runs so far (a new lease starts a new one).
    run: u32,
    chunks: VecDeque<(u64, Bytes)>,
    kept: usize,
    /// End of the furthest byte appended.
    end: u64,
    finished: bool,
    /// Bumped on every change; followers wait on it.
    changed: watch::Sender<u64>,
    /// Order of creation, for evicting the oldest.
    seq: u64,
}

impl StepBuffer {
    fn new(seq: u64) -> StepBuffer {
        StepBuffer {
            lease: String::new(),
            run: 0,
            chunks: VecDeque::new(),
            kept: 0,
            end: 0,
            finished: false,
            changed: watch::channel(0).0,
            seq,
        }
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// Drops the oldest chunk; returns its length.
    fn drop_oldest(&mut self) -> usize {
        match self.chunks.pop_front() {
            Some((_, data)) => {
                self.kept -= data.len();
                data.len()
            }
            None => 0,
        }
    }
}

#[derive(Default)]
struct Buffers {
    steps: HashMap<StepLogKey, StepBuffer>,
    total: usize,
    next_seq: u64,
}

impl Buffers {
    fn entry(&mut self, key: &StepLogKey, limits: &LiveLogLimits) -> &mut StepBuffer {
        if !self.steps.contains_key(key) {
            while self.steps.len() >= limits.steps.max(1) {
                if !self.evict_one_step() {
                    break;
                }
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            self.steps.insert(key.clone(), StepBuffer::new(seq));
        }
        self.steps.get_mut(key).expect("inserted above")
    }

    /// Forgets the oldest finished buffer, or else the oldest one.
    fn evict_one_step(&mut self) -> bool {
        let victim = self
            .steps
            .iter()
            .min_by_key(|(_, b)| (!b.finished, b.seq))
            .map(|(k, _)| k.clone());
        match victim.and_then(|k| self.steps.remove(&k)) {
            Some(buffer) => {
                // Dropping the buffer drops its sender: its followers end.
                self.total -= buffer.kept;
                true
            }
            None => false,
        }
    }

    /// Brings the total under `limit`: finished steps' buffers go first,
    /// then the oldest chunks of the biggest buffer.
    fn trim_total(&mut self, limit: usize, keep: &StepLogKey) {
        while self.total > limit {
            let finished = self
                .steps
                .iter()
                .filter(|(k, b)| b.finished && *k != keep)
                .min_by_key(|(_, b)| b.seq)
                .map(|(k, _)| k.clone());
            if let Some(key) = finished {
                if let Some(buffer) = self.steps.remove(&key) {
                    self.total -= buffer.kept;
                }
                continue;
            }
            let biggest = self
                .steps
                .values_mut()
                .filter(|b| b.kept > 0)
                .max_by_key(|b| b.kept);
            match biggest {
                Some(buffer) => {
                    self.total -= buffer.drop_oldest();
                    buffer.bump();
                }
                None => break,
            }
        }
    }
}

/// The live logs of every running step (see the module docs).
pub struct LiveLogs {
    buffers: Mutex<Buffers>,
    limits: LiveLogLimits,
}

impl Default for LiveLogs {
    fn default() -> Self {
        LiveLogs::new(LiveLogLimits::default())
    }
}

impl LiveLogs {
    /// Empty live logs with these bounds.
    pub fn new(limits: LiveLogLimits) -> LiveLogs {
        LiveLogs {
            buffers: Mutex::new(Buffers::default()),
            limits,
        }
    }

    /// Appends `data`, which starts at `offset` of the log written under
    /// `lease`. Bytes already appended are ignored (a retried call); a new
    /// lease restarts the log. Returns the end of the log so far.
    pub fn append(
        &self,
        key: &StepLogKey,
        lease: &str,
        offset: u64,
        data: &[u8],
    ) -> Result<u64, LogError> {
        if data.len() > MAX_APPEND_BYTES {
            return Err(LogError::ChunkTooLarge {
                key: key.clone(),
                len: data.len(),
            });
        }
        let limits = self.limits;
        let mut guard = self.buffers.lock().unwrap();
        let buffers = &mut *guard;
        let buffer = buffers.entry(key, &limits);
        if buffer.finished {
            return Err(LogError::Finished { key: key.clone() });
        }
        let mut freed = 0;
        if buffer.lease != lease {
            if !buffer.lease.is_empty() {
                tracing::info!(step = %key, "the step's log restarts: another lease runs it");
            }
            freed += buffer.kept;
            buffer.chunks.clear();
            buffer.kept = 0;
            buffer.end = 0;
            buffer.lease = lease.to_string();
            buffer.run += 1;
        }
        let chunk_end = offset + data.len() as u64;
        let mut added = 0;
        if chunk_end > buffer.end && !data.is_empty() {
            // Only what lies past what we have: a retry may overlap it.
            let skip = buffer.end.saturating_sub(offset) as usize;
            let start = offset.max(buffer.end);
            let tail = Bytes::copy_from_slice(&data[skip..]);
            added = tail.len();
            buffer.kept += tail.len();
            buffer.chunks.push_back((start, tail));
            buffer.end = chunk_end;
            while buffer.kept > limits.per_step {
                freed += buffer.drop_oldest();
            }
        }
        let end = buffer.end;
        buffer.bump();
        buffers.total = buffers.total + added - freed;
        buffers.trim_total(limits.total, key);
        Ok(end)
    }

    /// Closes a step's log: its followers read what is left and end.
    pub fn finish(&self, key: &StepLogKey) {
        let mut buffers = self.buffers.lock().unwrap();
        if let Some(buffer) = buffers.steps.get_mut(key) {
            buffer.finished = true;
            buffer.bump();
        }
    }

    /// Reads a step's log from `offset` as it grows, until the step
    /// finishes (or its buffer is forgotten). A step not started yet is
    /// waited for.
    pub fn follow(self: &Arc<Self>, key: &StepLogKey, offset: u64) -> LogFollower {
        let limits = self.limits;
        let mut buffers = self.buffers.lock().unwrap();
        let buffer = buffers.entry(key, &limits);
        LogFollower {
            logs: self.clone(),
            key: key.clone(),
            offset,
            run: buffer.run,
            restart_pending: false,
            changed: buffer.changed.subscribe(),
        }
    }

    /// Bytes held for all steps.
    pub fn bytes_held(&self) -> usize {
        self.buffers.lock().unwrap().total
    }

    /// Step buffers held.
    pub fn steps_held(&self) -> usize {
        self.buffers.lock().unwrap().steps.len()
    }
}

/// A reader of one step's live log (see [`LiveLogs::follow`]).
pub struct LogFollower {
    logs: Arc<LiveLogs>,
    key: StepLogKey,
    offset: u64,
    run: u32,
    /// The run changed and the next chunk tells so.
    restart_pending: bool,
    changed: watch::Receiver<u64>,
}

enum Read {
    Chunk(LogChunk),
    Wait,
    End,
}

impl LogFollower {
    /// The next chunk; `None` once the step finished and everything kept
    /// was read, or its buffer was forgotten.
    pub async fn next(&mut self) -> Option<LogChunk> {
        loop {
            self.changed.borrow_and_update();
            match self.read() {
                Read::Chunk(chunk) => return Some(chunk),
                Read::End => return None,
                Read::Wait => {
                    if self.changed.changed().await.is_err() {
                        // Forgotten: whatever was kept is gone with it.
                        return None;
                    }
                }
            }
        }
    }

    fn read(&mut self) -> Read {
        let buffers = self.logs.buffers.lock().unwrap();
        let Some(buffer) = buffers.steps.get(&self.key) else {
            return Read::End;
        };
        if buffer.run != self.run {
            if self.run != 0 {
                self.restart_pending = true;
                self.offset = 0;
            }
            self.run = buffer.run;
        }
        let next = buffer
            .chunks
            .iter()
            .find(|(start, data)| start + data.len() as u64 > self.offset);
        match next {
            Some((start, data)) => {
                let skip = self.offset.saturating_sub(*start) as usize;
                let offset = (*start).max(self.offset);
                let data = data.slice(skip..);
                self.offset = offset + data.len() as u64;
                Read::Chunk(LogChunk {
                    offset,
                    data,
                    restarted: std::mem::take(&mut self.restart_pending),
                })
            }
            None if buffer.finished => Read::End,
            None => Read::Wait,
        }
    }

    /// Where the next read starts.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

#[cfg(test)]
mod tests;
