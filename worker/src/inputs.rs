//! Materializes an action's input root: directories and symlinks are
//! created, files are hardlinked from the [`FileCache`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};

use buildkube_config::{ActionLimits, InputTreeSize};
use buildkube_proto::reapi::Directory;
use buildkube_reapi::{validate_tree, CasClient, CasClientError, Digest, TreeLimits};
use prost::Message as _;

use crate::action_error::ActionError;
use crate::file_cache::{CacheKey, FetchError, FileCache, FileRequest};

/// What was put in place.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InputStats {
    pub(crate) directories: usize,
    pub(crate) files: usize,
    pub(crate) symlinks: usize,
}

impl From<FetchError> for ActionError {
    fn from(error: FetchError) -> ActionError {
        match error {
            FetchError::Missing(digests) => ActionError::missing_inputs(digests),
            FetchError::Cas { source, .. } => ActionError::cas("fetching input files", &source),
            FetchError::Io {
                action,
                path,
                source,
            } => ActionError::io(action, &path, &source),
        }
    }
}

/// The input tree as lists of what to create, in creation order.
#[derive(Debug, Default)]
struct Plan {
    directories: Vec<PathBuf>,
    files: Vec<FileRequest>,
    symlinks: Vec<(PathBuf, String)>,
}

/// Every directory of the tree under `root` by digest; those the CAS lacks
/// are listed in `missing`. One read by digest larger than
/// `--max-message-blob-size` is refused before it is read.
async fn fetch_tree(
    cas: &CasClient,
    root: Digest,
    missing: &mut Vec<Digest>,
    limits: &ActionLimits,
) -> Result<HashMap<Digest, Directory>, ActionError> {
    let directories = cas.get_tree(root).await.map_err(|e| match e {
        CasClientError::Missing(d) => ActionError::missing_inputs(vec![d]),
        e => ActionError::cas("fetching the input tree", &e),
    })?;
    // Clients encode canonically, so re-encoding gives the digest they used;
    // a directory not found that way is read by its digest below.
    let mut index: HashMap<Digest, Directory> = directories
        .into_iter()
        .map(|d| (Digest::of_message(&d), d))
        .collect();
    let mut seen = HashSet::from([root]);
    let mut queue = VecDeque::from([root]);
    while let Some(digest) = queue.pop_front() {
        if !index.contains_key(&digest) && digest.size() != 0 {
            limits
                .check_message_size("input directory", &digest.to_string(), digest.size())
                .map_err(ActionError::invalid)?;
            match cas.read_blob(digest).await {
                Ok(bytes) => {
                    let directory = Directory::decode(bytes).map_err(|e| {
                        ActionError::invalid(format!(
                            "input directory {digest} is not a Directory message: {e}"
                        ))
                    })?;
                    index.insert(digest, directory);
                }
                Err(CasClientError::Missing(d)) => {
                    missing.push(d);
                    continue;
                }
                Err(e) => return Err(ActionError::cas("fetching an input directory", &e)),
            }
        }
        let Some(directory) = index.get(&digest) else {
            continue; // the empty directory
        };
        for sub in &directory.directories {
            // Bad digests are reported by the validation that follows.
            if let Ok(sub) = Digest::from_field(sub.digest.as_ref()) {
                if seen.insert(sub) {
                    queue.push_back(sub);
                }
            }
        }
    }
    Ok(index)
}

/// What to create for a tree that passed [`validate_tree`]: every
/// occurrence of every directory, counted as it goes: a tree beyond
/// `limits` (files, directories, bytes, depth) is refused before anything
/// is created, however few Directory messages describe it.
fn plan(
    index: &HashMap<Digest, Directory>,
    root: Digest,
    dest: &Path,
    limits: &ActionLimits,
) -> Result<Plan, ActionError> {
    let empty = Directory::default();
    let mut plan = Plan::default();
    let mut size = InputTreeSize::default();
    let over = |e: String| ActionError::invalid(format!("input root {root}: {e}"));
    let mut queue = VecDeque::from([(root, dest.to_path_buf(), 1u64)]);
    while let Some((digest, path, depth)) = queue.pop_front() {
        size.directories += 1;
        size.depth = size.depth.max(depth);
        limits.check_input_tree(&size).map_err(over)?;
        let directory = index.get(&digest).unwrap_or(&empty);
        for file in &directory.files {
            let file_digest = Digest::from_field(file.digest.as_ref()).expect("validated");
            plan.files.push(FileRequest {
                key: CacheKey {
                    digest: file_digest,
                    executable: file.is_executable,
                },
                dest: path.join(&file.name),
            });
            size.files += 1;
            size.bytes = size.bytes.saturating_add(file_digest.size());
        }
        limits.check_input_tree(&size).map_err(over)?;
        for link in &directory.symlinks {
            plan.symlinks
                .push((path.join(&link.name), link.target.clone()));
        }
        for sub in &directory.directories {
            let sub_digest = Digest::from_field(sub.digest.as_ref()).expect("validated");
            plan.directories.push(path.join(&sub.name));
            queue.push_back((sub_digest, path.join(&sub.name), depth + 1));
        }
    }
    Ok(plan)
}

/// Creates the input root `root_digest` at `dest` (an existing, empty
/// directory). Blobs the CAS lacks are all reported in one
/// FAILED_PRECONDITION error.
pub(crate) async fn materialize(
    cas: &CasClient,
    cache: &FileCache,
    root_digest: Digest,
    dest: &Path,
    limits: &ActionLimits,
) -> Result<InputStats, ActionError> {
    if root_digest.size() == 0 {
        return Ok(InputStats::default()); // the empty Directory
    }
    let mut missing = Vec::new();
    let index = fetch_tree(cas, root_digest, &mut missing, limits).await?;
    if !missing.is_empty() {
        return Err(ActionError::missing_inputs(missing));
    }
    // The rules the server checked at Execute (the same function): a tree
    // that breaks them is refused before anything is created.
    validate_tree(root_digest, &index, &TreeLimits::default())
        .map_err(|e| ActionError::invalid(format!("input root {root_digest}: {e}")))?;
    let plan = plan(&index, root_digest, dest, limits)?;
    let stats = InputStats {
        directories: plan.directories.len(),
        files: plan.files.len(),
        symlinks: plan.symlinks.len(),
    };
    let directories = plan.directories;
    tokio::task::spawn_blocking(move || -> Result<(), ActionError> {
        for dir in directories {
            std::fs::create_dir(&dir)
                .map_err(|e| ActionError::io("creating input directory", &dir, &e))?;
        }
        Ok(())
    })
    .await
    .expect("mkdir task panicked")?;
    cache.link_into(cas, &plan.files).await?;
    let symlinks = plan.symlinks;
    tokio::task::spawn_blocking(move || -> Result<(), ActionError> {
        for (path, target) in symlinks {
            std::os::unix::fs::symlink(&target, &path)
                .map_err(|e| ActionError::io("creating input symlink", &path, &e))?;
        }
        Ok(())
    })
    .await
    .expect("symlink task panicked")?;
    Ok(stats)
}
