//! The one definition of a valid input tree, used by the server before it
//! queues an action and by the worker before it creates anything.
//!
//! A `Directory` is valid as the REAPI requires: every entry name is one
//! path segment (not empty, not `.` or `..`, no `/` and no NUL byte); the
//! files, directories and symlinks are each sorted by name (by UTF-8
//! bytes, the order clients use to make digests reproducible); no name
//! appears twice across the three lists (a file and a directory of the same
//! name cannot both be created); every digest parses. A tree is valid when
//! each of its directories is, and it stays within [`TreeLimits`] (depth,
//! name and path lengths a worker's filesystem can hold).
//!
//! [`validate_directory`] checks one message; [`validate_tree`] checks a
//! whole tree given as its directories by digest, and counts what a worker
//! would create for it ([`TreeStats`]). Both are pure functions of their
//! arguments, so a fuzz target can call them on decoded bytes.

use std::collections::HashMap;
use std::fmt;

use buildkube_proto::reapi::Directory;

use crate::{Digest, DigestError};

/// Limits on an input tree beyond what each directory must satisfy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeLimits {
    /// Levels of directories below the root (the root's subdirectories are
    /// level 1). Default [`TreeLimits::DEFAULT_MAX_DEPTH`].
    pub max_depth: usize,
    /// Bytes of one entry name; Linux filesystems hold at most 255.
    pub max_name_bytes: usize,
    /// Bytes of an entry's path below the root (`a/b/c`), leaving room
    /// within Linux's 4096-byte PATH_MAX for the worker's own directory.
    pub max_path_bytes: usize,
}

impl TreeLimits {
    /// Default of [`TreeLimits::max_depth`].
    pub const DEFAULT_MAX_DEPTH: usize = 256;
    /// Default of [`TreeLimits::max_name_bytes`].
    pub const DEFAULT_MAX_NAME_BYTES: usize = 255;
    /// Default of [`TreeLimits::max_path_bytes`].
    pub const DEFAULT_MAX_PATH_BYTES: usize = 3072;
}

impl Default for TreeLimits {
    fn default() -> Self {
        TreeLimits {
            max_depth: Self::DEFAULT_MAX_DEPTH,
            max_name_bytes: Self::DEFAULT_MAX_NAME_BYTES,
            max_path_bytes: Self::DEFAULT_MAX_PATH_BYTES,
        }
    }
}

/// What a worker creates for a tree: every occurrence of a directory that
/// appears several times counts each time (saturating at `u64::MAX`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeStats {
    /// Directories below the root.
    pub directories: u64,
    /// Files (hardlinks).
    pub files: u64,
    /// Symlinks.
    pub symlinks: u64,
    /// Sum of the files' sizes.
    pub file_bytes: u64,
    /// Deepest level of a directory (0: the root has no subdirectories).
    pub depth: usize,
}

/// The kind of a directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A `FileNode`.
    File,
    /// A `DirectoryNode`.
    Directory,
    /// A `SymlinkNode`.
    Symlink,
}

impl fmt::Display for EntryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EntryKind::File => "file",
            EntryKind::Directory => "directory",
            EntryKind::Symlink => "symlink",
        })
    }
}

/// Where in a tree a problem is: the path of a directory below the root
/// (empty for the root), shown as `input root` or `input root/a/b`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreePath(String);

impl TreePath {
    /// The path as `a/b` (empty for the root).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn join(&self, name: &str) -> TreePath {
        if self.0.is_empty() {
            TreePath(name.to_string())
        } else {
            TreePath(format!("{}/{name}", self.0))
        }
    }
}

impl fmt::Display for TreePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("input root")?;
        if !self.0.is_empty() {
            write!(f, "/{}", Shown(&self.0))?;
        }
        Ok(())
    }
}

/// A client-chosen string in an error message: at most [`Shown::MAX`]
/// bytes of it, so that a huge name is not echoed back.
struct Shown<'a>(&'a str);

impl Shown<'_> {
    const MAX: usize = 200;
}

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.len() <= Self::MAX {
            return write!(f, "{:?}", self.0);
        }
        let mut end = Self::MAX;
        while !self.0.is_char_boundary(end) {
            end -= 1;
        }
        write!(f, "{:?}… ({} bytes)", &self.0[..end], self.0.len())
    }
}

/// Why a tree is not a valid input tree. Every variant names the directory
/// (its path from the root) and, where there is one, the entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    /// An entry name is not a single path segment, or too long.
    #[error("{at}: {kind} name {} {why}", Shown(.name))]
    BadName {
        /// The directory.
        at: TreePath,
        /// The entry's kind.
        kind: EntryKind,
        /// The name as given.
        name: String,
        /// What is wrong with it.
        why: String,
    },
    /// A list of entries is not sorted by name, or repeats a name.
    #[error("{at}: {kind} entries must be sorted by name without repeats, but {} comes after {}", Shown(.name), Shown(.previous))]
    Unsorted {
        /// The directory.
        at: TreePath,
        /// The list.
        kind: EntryKind,
        /// The entry out of order.
        name: String,
        /// The entry before it.
        previous: String,
    },
    /// Two entries of different kinds share a name.
    #[error("{at}: {} is both a {first} and a {second}", Shown(.name))]
    Duplicate {
        /// The directory.
        at: TreePath,
        /// The shared name.
        name: String,
        /// One kind.
        first: EntryKind,
        /// The other kind.
        second: EntryKind,
    },
    /// An entry's digest does not parse.
    #[error("{at}: {kind} {}: {source}", Shown(.name))]
    BadDigest {
        /// The directory.
        at: TreePath,
        /// The entry's kind.
        kind: EntryKind,
        /// The entry's name.
        name: String,
        /// Why the digest was rejected.
        source: DigestError,
    },
    /// A symlink target cannot be created.
    #[error("{at}: symlink {} has a target that {why}", Shown(.name))]
    BadSymlink {
        /// The directory.
        at: TreePath,
        /// The symlink's name.
        name: String,
        /// What is wrong with the target.
        why: &'static str,
    },
    /// The tree is deeper than [`TreeLimits::max_depth`].
    #[error("{at}: the input tree is more than {limit} directories deep")]
    TooDeep {
        /// A directory at the limit whose subdirectories go beyond it.
        at: TreePath,
        /// The limit.
        limit: usize,
    },
    /// An entry's path is longer than [`TreeLimits::max_path_bytes`].
    #[error("{at}: paths below it are longer than {limit} bytes")]
    PathTooLong {
        /// The directory under which the long path lies.
        at: TreePath,
        /// The limit.
        limit: usize,
    },
    /// A directory contains itself (only possible in a forged index whose
    /// keys are not the digests of their values).
    #[error("{at}: directory {digest} contains itself")]
    Cycle {
        /// Where the cycle closes.
        at: TreePath,
        /// The directory.
        digest: Digest,
    },
}

/// Checks one directory's entries (names, order, uniqueness, digests,
/// symlink targets) with the default limits; `at` is the root.
pub fn validate_directory(directory: &Directory) -> Result<(), TreeError> {
    check_directory(directory, &TreePath::default(), &TreeLimits::default()).map(|_| ())
}

/// A directory's subdirectories, parsed.
type Children = Vec<(String, Digest)>;

fn check_directory(
    directory: &Directory,
    at: &TreePath,
    limits: &TreeLimits,
) -> Result<Children, TreeError> {
    let bad_name = |kind: EntryKind, name: &str, why: String| TreeError::BadName {
        at: at.clone(),
        kind,
        name: name.to_string(),
        why,
    };
    let names = directory
        .files
        .iter()
        .map(|f| (EntryKind::File, f.name.as_str()))
        .chain(
            directory
                .directories
                .iter()
                .map(|d| (EntryKind::Directory, d.name.as_str())),
        )
        .chain(
            directory
                .symlinks
                .iter()
                .map(|s| (EntryKind::Symlink, s.name.as_str())),
        );
    let mut previous: Option<(EntryKind, &str)> = None;
    for (kind, name) in names.clone() {
        match name {
            "" => return Err(bad_name(kind, name, "is empty".into())),
            "." | ".." => return Err(bad_name(kind, name, "is not a file name".into())),
            _ if name.contains('/') => {
                return Err(bad_name(kind, name, "contains `/`".into()));
            }
            _ if name.contains('\0') => {
                return Err(bad_name(kind, name, "contains a NUL byte".into()));
            }
            _ if name.len() > limits.max_name_bytes => {
                return Err(bad_name(
                    kind,
                    name,
                    format!("is longer than {} bytes", limits.max_name_bytes),
                ));
            }
            _ => {}
        }
        if let Some((previous_kind, previous_name)) = previous {
            if previous_kind == kind && name <= previous_name {
                return Err(TreeError::Unsorted {
                    at: at.clone(),
                    kind,
                    name: name.to_string(),
                    previous: previous_name.to_string(),
                });
            }
        }
        previous = Some((kind, name));
    }
    // Each list is strictly sorted: a repeat can only be across lists.
    let mut all: Vec<(&str, EntryKind)> = names.map(|(kind, name)| (name, kind)).collect();
    all.sort_unstable_by(|a, b| a.0.cmp(b.0));
    if let Some(pair) = all.windows(2).find(|pair| pair[0].0 == pair[1].0) {
        return Err(TreeError::Duplicate {
            at: at.clone(),
            name: pair[0].0.to_string(),
            first: pair[0].1,
            second: pair[1].1,
        });
    }
    for file in &directory.files {
        Digest::from_field(file.digest.as_ref()).map_err(|source| TreeError::BadDigest {
            at: at.clone(),
            kind: EntryKind::File,
            name: file.name.clone(),
            source,
        })?;
    }
    for link in &directory.symlinks {
        let why = if link.target.is_empty() {
            "is empty"
        } else if link.target.contains('\0') {
            "contains a NUL byte"
        } else if link.target.len() > limits.max_path_bytes {
            "is too long"
        } else {
            continue;
        };
        return Err(TreeError::BadSymlink {
            at: at.clone(),
            name: link.name.clone(),
            why,
        });
    }
    directory
        .directories
        .iter()
        .map(|d| {
            let digest =
                Digest::from_field(d.digest.as_ref()).map_err(|source| TreeError::BadDigest {
                    at: at.clone(),
                    kind: EntryKind::Directory,
                    name: d.name.clone(),
                    source,
                })?;
            Ok((d.name.clone(), digest))
        })
        .collect()
}

/// What is known of a directory once all below it was checked.
#[derive(Debug, Clone, Copy)]
struct Summary {
    /// Levels of subdirectories below it.
    height: usize,
    /// Bytes of the longest entry path below it (`a/b/c`).
    longest_path: usize,
    /// What a worker creates below it.
    stats: TreeStats,
}

fn summary_of(directory: &Directory, children: &[Summary], names: &Children) -> Summary {
    let mut stats = TreeStats {
        directories: names.len() as u64,
        files: directory.files.len() as u64,
        symlinks: directory.symlinks.len() as u64,
        file_bytes: directory.files.iter().fold(0u64, |sum, f| {
            sum.saturating_add(f.digest.as_ref().map_or(0, |d| d.size_bytes.max(0) as u64))
        }),
        depth: 0,
    };
    let mut longest_path = directory
        .files
        .iter()
        .map(|f| f.name.len())
        .chain(directory.symlinks.iter().map(|s| s.name.len()))
        .chain(names.iter().map(|(name, _)| name.len()))
        .max()
        .unwrap_or(0);
    let mut height = 0;
    for (child, (name, _)) in children.iter().zip(names) {
        height = height.max(child.height + 1);
        if child.longest_path > 0 {
            longest_path = longest_path.max(name.len() + 1 + child.longest_path);
        }
        stats.directories = stats.directories.saturating_add(child.stats.directories);
        stats.files = stats.files.saturating_add(child.stats.files);
        stats.symlinks = stats.symlinks.saturating_add(child.stats.symlinks);
        stats.file_bytes = stats.file_bytes.saturating_add(child.stats.file_bytes);
    }
    stats.depth = height;
    Summary {
        height,
        longest_path,
        stats,
    }
}

/// One directory on the way down, with its children still to visit.
struct Frame<'a> {
    digest: Digest,
    directory: &'a Directory,
    at: TreePath,
    children: Children,
    done: Vec<Summary>,
}

/// Checks the tree under `root`, given its directories by digest: each
/// directory as [`validate_directory`], the depth and path lengths within
/// `limits`. Directories absent from `directories` count as empty (the
/// caller reports missing blobs its own way). Each distinct directory is
/// checked once, however often it appears; the limits hold for every
/// place it appears.
pub fn validate_tree(
    root: Digest,
    directories: &HashMap<Digest, Directory>,
    limits: &TreeLimits,
) -> Result<TreeStats, TreeError> {
    let empty = Directory::default();
    let lookup = |digest: &Digest| directories.get(digest).unwrap_or(&empty);
    let mut done: HashMap<Digest, Summary> = HashMap::new();
    let root_directory = lookup(&root);
    let mut stack = vec![Frame {
        digest: root,
        directory: root_directory,
        at: TreePath::default(),
        children: check_directory(root_directory, &TreePath::default(), limits)?,
        done: Vec::new(),
    }];
    loop {
        let depth = stack.len() - 1;
        let top = stack.last_mut().expect("the root stays until the end");
        let Some((name, digest)) = top.children.get(top.done.len()).cloned() else {
            let frame = stack.pop().expect("not empty");
            let summary = summary_of(frame.directory, &frame.done, &frame.children);
            let separator = usize::from(!frame.at.as_str().is_empty() && summary.longest_path > 0);
            if frame.at.as_str().len() + separator + summary.longest_path > limits.max_path_bytes {
                return Err(TreeError::PathTooLong {
                    at: frame.at,
                    limit: limits.max_path_bytes,
                });
            }
            done.insert(frame.digest, summary);
            match stack.last_mut() {
                Some(parent) => parent.done.push(summary),
                None => return Ok(summary.stats),
            }
            continue;
        };
        let at = top.at.join(&name);
        // The path of `at` from the root, in bytes.
        let prefix = at.as_str().len();
        let summary = match done.get(&digest) {
            Some(summary) => *summary,
            None => {
                if stack.iter().any(|frame| frame.digest == digest) {
                    return Err(TreeError::Cycle { at, digest });
                }
                if depth + 1 > limits.max_depth {
                    return Err(TreeError::TooDeep {
                        at: stack.last().expect("not empty").at.clone(),
                        limit: limits.max_depth,
                    });
                }
                if prefix > limits.max_path_bytes {
                    return Err(TreeError::PathTooLong {
                        at: stack.last().expect("not empty").at.clone(),
                        limit: limits.max_path_bytes,
                    });
                }
                let directory = lookup(&digest);
                let children = check_directory(directory, &at, limits)?;
                stack.push(Frame {
                    digest,
                    directory,
                    at,
                    children,
                    done: Vec::new(),
                });
                continue;
            }
        };
        // A directory seen before, now at this place: the limits must hold here too.
        if depth + 1 + summary.height > limits.max_depth {
            return Err(TreeError::TooDeep {
                at,
                limit: limits.max_depth,
            });
        }
        if summary.longest_path > 0 && prefix + 1 + summary.longest_path > limits.max_path_bytes {
            return Err(TreeError::PathTooLong {
                at,
                limit: limits.max_path_bytes,
            });
        }
        stack.last_mut().expect("not empty").done.push(summary);
    }
}

#[cfg(test)]
mod tests;
