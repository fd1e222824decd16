//! What every service shares: storage, the scheduler, instances, counters.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use buildkube_config::ActionLimits;
use buildkube_jobs::logs::LiveLogs;
use buildkube_proto::reapi;
use buildkube_reapi::Digest;
use prost::Message;
use tonic::Status;

use crate::error::{bad_digest, missing_blobs_status, to_tonic};
use crate::instances::Instances;
use crate::metrics::Metrics;
use crate::storage::{ActionResultStore, SharedBlobStore};
use buildkube_records::RecordStore;
use buildkube_scheduler::Scheduler;
use futures::StreamExt;

/// Digests of a cached result checked per FindMissing while its output
/// trees are read.
const RESULT_CHECK_BATCH: usize = 10_000;

/// Shared state of one server.
pub struct Farm {
    /// Blob storage (shared by all instances: content addressing makes that safe).
    pub cas: SharedBlobStore,
    /// Action results, per instance.
    pub action_cache: Arc<dyn ActionResultStore>,
    /// Durable records (`--storage-config` `records`: the data dir by
    /// default): the scheduler's journal of unfinished operations, CI jobs.
    pub records: Arc<dyn RecordStore>,
    /// Operations and workers.
    pub scheduler: Arc<Scheduler>,
    /// Served instance names.
    pub instances: Instances,
    /// Counters.
    pub metrics: Metrics,
    /// Turns true when the server is shutting down: open Execute streams end
    /// with UNAVAILABLE (clients retry) and waiting Lease calls return empty.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// Bounds on Action, Command and Directory blobs and on input trees.
    pub limits: ActionLimits,
    /// Commands decoded once and shared by the operations that run them.
    pub commands: SharedCommands,
    /// Live logs of the CI steps workers run (AppendStepLog writes them).
    pub live_logs: Arc<LiveLogs>,
}

/// Decoded Commands by digest, held weakly: a Command stays decoded (once)
/// while any queued operation or Execute call holds it, and is forgotten
/// when the last one lets go.
#[derive(Default)]
pub struct SharedCommands {
    decoded: Mutex<HashMap<Digest, Weak<reapi::Command>>>,
}

impl SharedCommands {
    fn get(&self, digest: &Digest) -> Option<Arc<reapi::Command>> {
        self.decoded.lock().unwrap().get(digest)?.upgrade()
    }

    fn insert(&self, digest: Digest, command: reapi::Command) -> Arc<reapi::Command> {
        let mut decoded = self.decoded.lock().unwrap();
        if let Some(shared) = decoded.get(&digest).and_then(Weak::upgrade) {
            return shared; // decoded meanwhile by another call
        }
        let command = Arc::new(command);
        decoded.insert(digest, Arc::downgrade(&command));
        // Forget dead entries now and then, so the map stays as small as what is held.
        if decoded.len().is_power_of_two() {
            decoded.retain(|_, weak| weak.strong_count() > 0);
        }
        command
    }

    /// Distinct Commands held decoded right now.
    pub fn len(&self) -> usize {
        self.decoded
            .lock()
            .unwrap()
            .values()
            .filter(|weak| weak.strong_count() > 0)
            .count()
    }

    /// Whether no Command is held decoded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Farm {
    /// Reads and decodes a message stored in the CAS; `None` if absent.
    pub async fn read_message<M: Message + Default>(
        &self,
        digest: &Digest,
        what: &str,
    ) -> Result<Option<M>, Status> {
        let Some(data) = self.cas.get(digest).await? else {
            return Ok(None);
        };
        M::decode(data).map(Some).map_err(|e| {
            Status::invalid_argument(format!("{what} {digest} is not a valid message: {e}"))
        })
    }

    /// Reads and decodes an Action, Command or Directory, refusing (with
    /// INVALID_ARGUMENT naming the digest and the limit) one larger than
    /// `--max-message-blob-size` before reading a byte of it.
    pub async fn read_bounded_message<M: Message + Default>(
        &self,
        digest: &Digest,
        what: &str,
    ) -> Result<Option<M>, Status> {
        if let Err(message) =
            self.limits
                .check_message_size(what, &digest.to_string(), digest.size())
        {
            self.metrics.limit_hit("max-message-blob-size");
            tracing::warn!(%digest, what, "{message}");
            return Err(Status::invalid_argument(message));
        }
        self.read_message(digest, what).await
    }

    /// The Command `digest`, decoded once while anything holds it; `None` if absent.
    pub async fn command(&self, digest: &Digest) -> Result<Option<Arc<reapi::Command>>, Status> {
        if let Some(command) = self.commands.get(digest) {
            return Ok(Some(command));
        }
        let Some(command) = self.read_bounded_message(digest, "command").await? else {
            return Ok(None);
        };
        Ok(Some(self.commands.insert(*digest, command)))
    }

    /// Every directory of the tree under `root`, root first (breadth first),
    /// each distinct directory once, at most `max_depth` levels below the
    /// root (INVALID_ARGUMENT beyond). Missing directories are collected in
    /// `missing` instead of failing. More distinct directories than
    /// `--max-input-directories` is an error.
    pub async fn walk_tree(
        &self,
        root: Digest,
        max_depth: usize,
        missing: &mut Vec<Digest>,
    ) -> Result<Vec<(Digest, reapi::Directory)>, Status> {
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut frontier = vec![root];
        let mut depth = 0;
        while !frontier.is_empty() {
            if depth > max_depth {
                return Err(Status::invalid_argument(format!(
                    "input root {root}: the input tree is more than {max_depth} directories deep"
                )));
            }
            depth += 1;
            let mut next = Vec::new();
            for digest in frontier {
                if !seen.insert(digest) {
                    continue;
                }
                if out.len() as u64 >= self.limits.max_input_directories {
                    self.metrics.limit_hit("max-input-directories");
                    return Err(Status::invalid_argument(format!(
                        "the tree under {root} has more than {limit} directories (--max-input-directories={limit})",
                        limit = self.limits.max_input_directories
                    )));
                }
                let Some(directory) = self
                    .read_bounded_message::<reapi::Directory>(&digest, "directory")
                    .await?
                else {
                    missing.push(digest);
                    continue;
                };
                for child in &directory.directories {
                    next.push(Digest::from_field(child.digest.as_ref()).map_err(|e| {
                        bad_digest(&format!("directory {digest} entry {:?}", child.name), e)
                    })?);
                }
                out.push((digest, directory));
            }
            frontier = next;
        }
        Ok(out)
    }

    /// Fails with FAILED_PRECONDITION (and a PreconditionFailure listing every
    /// missing blob) unless the input root and all it references are stored.
    pub async fn check_inputs(&self, input_root: Digest) -> Result<(), Status> {
        let limits = buildkube_reapi::TreeLimits::default();
        let mut missing = Vec::new();
        let tree = self
            .walk_tree(input_root, limits.max_depth, &mut missing)
            .await?;
        // The worker checks the same rules; a tree it would refuse is the
        // client's mistake, answered before the action is queued.
        let directories: HashMap<Digest, reapi::Directory> = tree.iter().cloned().collect();
        buildkube_reapi::validate_tree(input_root, &directories, &limits)
            .map_err(|e| Status::invalid_argument(format!("input root {input_root}: {e}")))?;
        let by_digest: HashMap<Digest, &reapi::Directory> = tree
            .iter()
            .map(|(digest, directory)| (*digest, directory))
            .collect();
        let size = crate::input_tree::measure(input_root, &by_digest);
        if let Err(message) = self.limits.check_input_tree(&size) {
            self.metrics.limit_hit("input-tree");
            tracing::warn!(input_root = %input_root, ?size, "refusing an action: {message}");
            return Err(Status::invalid_argument(format!(
                "input root {input_root}: {message}"
            )));
        }
        let mut files = Vec::new();
        for (digest, directory) in &tree {
            for file in &directory.files {
                files.push(Digest::from_field(file.digest.as_ref()).map_err(|e| {
                    bad_digest(&format!("directory {digest} file {:?}", file.name), e)
                })?);
            }
        }
        files.sort();
        files.dedup();
        missing.extend(self.cas.find_missing(&files).await?);
        if missing.is_empty() {
            Ok(())
        } else {
            Err(to_tonic(missing_blobs_status("input", &missing)))
        }
    }

    /// Whether every blob an action result references is still stored
    /// (outputs, stdout/stderr, output trees and the files inside them).
    /// Output trees are read as a stream, one directory at a time (each
    /// bounded by `--max-message-blob-size`), and their files checked in
    /// batches: a result pointing at a huge Tree costs bounded memory. A
    /// tree that cannot be decoded makes the result incomplete (not served).
    pub async fn result_is_complete(&self, result: &reapi::ActionResult) -> Result<bool, Status> {
        let mut wanted = Vec::new();
        let parse = |d: Option<&reapi::Digest>| Digest::from_field(d).ok();
        for file in &result.output_files {
            wanted.extend(parse(file.digest.as_ref()));
        }
        wanted.extend(parse(result.stdout_digest.as_ref()));
        wanted.extend(parse(result.stderr_digest.as_ref()));
        for dir in &result.output_directories {
            let Some(tree_digest) = parse(dir.tree_digest.as_ref()) else {
                return Ok(false);
            };
            let Some(mut chunks) = self.cas.read(&tree_digest, 0, tree_digest.size()).await? else {
                return Ok(false);
            };
            let mut decoder =
                buildkube_reapi::TreeStreamDecoder::new(self.limits.max_message_blob_size);
            while let Some(chunk) = chunks.next().await {
                let directories = match decoder.push(&chunk?) {
                    Ok(directories) => directories,
                    Err(e) => {
                        tracing::warn!(tree = %tree_digest, error = %e, "cached result's output tree is unusable; not serving it");
                        return Ok(false);
                    }
                };
                for directory in &directories {
                    for file in &directory.files {
                        wanted.extend(parse(file.digest.as_ref()));
                    }
                }
                if wanted.len() >= RESULT_CHECK_BATCH {
                    if !self.cas.find_missing(&wanted).await?.is_empty() {
                        return Ok(false);
                    }
                    wanted.clear();
                }
            }
            if let Err(e) = decoder.finish() {
                tracing::warn!(tree = %tree_digest, error = %e, "cached result's output tree is unusable; not serving it");
                return Ok(false);
            }
        }
        Ok(self.cas.find_missing(&wanted).await?.is_empty())
    }
}
