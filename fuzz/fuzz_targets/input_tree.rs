//! Input-tree validation (`buildkube-reapi`'s `validate_tree`, which the
//! server runs at Execute and the worker before it creates anything): on
//! any set of directories, keyed by digests that may repeat, point back up
//! (a cycle) or be missing, it never panics, and it accepts a tree exactly
//! when a naive recursive walk finds every directory valid, no cycle, no
//! level deeper than the limit and no entry path or symlink target longer
//! than the limit — and then reports the same counts as that walk.
#![no_main]

use std::collections::HashMap;

use buildkube_proto::reapi::{
    Digest as WireDigest, Directory, DirectoryNode, FileNode, SymlinkNode,
};
use buildkube_reapi::{validate_directory, validate_tree, Digest, TreeLimits, TreeStats};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

/// Small limits, so the fuzzer reaches them with small inputs.
const LIMITS: TreeLimits = TreeLimits {
    max_depth: 3,
    max_name_bytes: TreeLimits::DEFAULT_MAX_NAME_BYTES,
    max_path_bytes: 40,
};

/// Directories the naive walk visits before it gives up comparing (a DAG
/// that reuses a directory at every level is exponential to walk naively).
const WALK_BUDGET: usize = 20_000;

#[derive(Debug, Arbitrary)]
struct Input {
    dirs: Vec<FuzzDir>,
    /// Directories missing from the map (they count as empty).
    missing: Vec<u8>,
}

#[derive(Debug, Arbitrary)]
struct FuzzDir {
    files: Vec<(Name, u16)>,
    /// A subdirectory: its name and which directory (by index) it names.
    dirs: Vec<(Name, u8)>,
    symlinks: Vec<(Name, Name)>,
    /// Most trees are sorted; unsorted ones must be refused.
    sort: bool,
}

/// Names from a small alphabet with the edge cases, or anything.
#[derive(Debug, Arbitrary)]
enum Name {
    Letter(u8),
    Long(u8),
    Dot,
    DotDot,
    Empty,
    Slash,
    Nul,
    Any(String),
}

impl Name {
    fn text(&self) -> String {
        match self {
            Name::Letter(i) => ((b'a' + i % 6) as char).to_string(),
            Name::Long(n) => "n".repeat(usize::from(*n) + 1),
            Name::Dot => ".".into(),
            Name::DotDot => "..".into(),
            Name::Empty => String::new(),
            Name::Slash => "a/b".into(),
            Name::Nul => "a\0".into(),
            Name::Any(s) => s.clone(),
        }
    }
}

/// Directory `i` is stored under a digest of its index, not of its content,
/// so directories can name each other in any shape, cycles included.
fn key(i: u8) -> Digest {
    Digest::of_bytes(&[i])
}

fn wire(digest: Digest) -> Option<WireDigest> {
    Some(digest.into())
}

fn build(dir: &FuzzDir, count: usize) -> Directory {
    let mut files: Vec<FileNode> = dir
        .files
        .iter()
        .map(|(name, size)| FileNode {
            name: name.text(),
            digest: wire(Digest::new([7; 32], u64::from(*size))),
            ..Default::default()
        })
        .collect();
    let mut directories: Vec<DirectoryNode> = dir
        .dirs
        .iter()
        .map(|(name, target)| DirectoryNode {
            name: name.text(),
            digest: wire(key(*target % (count as u8).max(1))),
        })
        .collect();
    let mut symlinks: Vec<SymlinkNode> = dir
        .symlinks
        .iter()
        .map(|(name, target)| SymlinkNode {
            name: name.text(),
            target: target.text(),
            ..Default::default()
        })
        .collect();
    if dir.sort {
        files.sort_by(|a, b| a.name.cmp(&b.name));
        directories.sort_by(|a, b| a.name.cmp(&b.name));
        symlinks.sort_by(|a, b| a.name.cmp(&b.name));
    }
    Directory {
        files,
        directories,
        symlinks,
        ..Default::default()
    }
}

/// Outcome of the naive walk.
enum Naive {
    Valid(TreeStats),
    Invalid,
    TooBig,
}

struct Walk<'a> {
    map: &'a HashMap<Digest, Directory>,
    visited: usize,
    stack: Vec<Digest>,
}

impl Walk<'_> {
    /// Walks the directory `digest` at `level` whose path is `path` bytes
    /// long; returns its stats with `depth` as its height.
    fn walk(&mut self, digest: Digest, level: usize, path: usize) -> Result<TreeStats, Naive> {
        self.visited += 1;
        if self.visited > WALK_BUDGET {
            return Err(Naive::TooBig);
        }
        let empty = Directory::default();
        let dir = self.map.get(&digest).unwrap_or(&empty);
        if validate_directory(dir).is_err() {
            return Err(Naive::Invalid);
        }
        let entry_path = |name: &str| path + usize::from(path > 0) + name.len();
        let names = dir
            .files
            .iter()
            .map(|f| &f.name)
            .chain(dir.directories.iter().map(|d| &d.name))
            .chain(dir.symlinks.iter().map(|s| &s.name));
        for name in names {
            if entry_path(name) > LIMITS.max_path_bytes {
                return Err(Naive::Invalid);
            }
        }
        if dir
            .symlinks
            .iter()
            .any(|s| s.target.len() > LIMITS.max_path_bytes)
        {
            return Err(Naive::Invalid);
        }
        let mut stats = TreeStats {
            directories: dir.directories.len() as u64,
            files: dir.files.len() as u64,
            symlinks: dir.symlinks.len() as u64,
            file_bytes: dir.files.iter().fold(0u64, |sum, f| {
                sum.saturating_add(f.digest.as_ref().map_or(0, |d| d.size_bytes.max(0) as u64))
            }),
            depth: 0,
        };
        self.stack.push(digest);
        for child in &dir.directories {
            let child_digest = Digest::try_from(child.digest.as_ref().expect("built with one"))
                .expect("built valid");
            if self.stack.contains(&child_digest) || level + 1 > LIMITS.max_depth {
                return Err(Naive::Invalid);
            }
            let below = self.walk(child_digest, level + 1, entry_path(&child.name))?;
            stats.directories = stats.directories.saturating_add(below.directories);
            stats.files = stats.files.saturating_add(below.files);
            stats.symlinks = stats.symlinks.saturating_add(below.symlinks);
            stats.file_bytes = stats.file_bytes.saturating_add(below.file_bytes);
            stats.depth = stats.depth.max(below.depth + 1);
        }
        self.stack.pop();
        Ok(stats)
    }
}

fuzz_target!(|input: Input| {
    if input.dirs.is_empty() || input.dirs.len() > 64 {
        return;
    }
    let count = input.dirs.len();
    let mut map = HashMap::new();
    for (i, dir) in input.dirs.iter().enumerate() {
        if !input.missing.contains(&(i as u8)) {
            map.insert(key(i as u8), build(dir, count));
        }
    }
    let result = validate_tree(key(0), &map, &LIMITS);
    let mut walk = Walk {
        map: &map,
        visited: 0,
        stack: Vec::new(),
    };
    let naive = match walk.walk(key(0), 0, 0) {
        Ok(stats) => Naive::Valid(stats),
        Err(outcome) => outcome,
    };
    match (naive, result) {
        (Naive::TooBig, _) => {}
        (Naive::Valid(expected), Ok(stats)) => assert_eq!(stats, expected, "{map:?}"),
        (Naive::Valid(expected), Err(e)) => {
            panic!("refused a valid tree ({expected:?}): {e}\n{map:?}")
        }
        (Naive::Invalid, Ok(stats)) => panic!("accepted an invalid tree as {stats:?}\n{map:?}"),
        (Naive::Invalid, Err(_)) => {}
    }
});
