//! The size of an input tree as a worker would create it. Directories are
//! shared by digest, so a few kilobytes of Directory messages can describe
//! a tree of millions of entries; the size is computed once per distinct
//! directory (bottom up), never by expanding the tree.

use std::collections::HashMap;

use buildkube_config::InputTreeSize;
use buildkube_proto::reapi;
use buildkube_reapi::Digest;

/// The materialized size of the tree under `root`, given its distinct
/// directories by digest. A directory absent from `directories` (missing
/// from the CAS, reported separately) counts as empty.
pub(crate) fn measure(
    root: Digest,
    directories: &HashMap<Digest, &reapi::Directory>,
) -> InputTreeSize {
    let mut sizes: HashMap<Digest, InputTreeSize> = HashMap::new();
    // Iterative post-order: a deep tree must not overflow the stack.
    let mut stack = vec![(root, false)];
    while let Some((digest, children_done)) = stack.pop() {
        if sizes.contains_key(&digest) {
            continue;
        }
        let Some(directory) = directories.get(&digest) else {
            sizes.insert(
                digest,
                InputTreeSize {
                    directories: 1,
                    depth: 1,
                    ..Default::default()
                },
            );
            continue;
        };
        let children: Vec<Digest> = directory
            .directories
            .iter()
            .filter_map(|child| Digest::from_field(child.digest.as_ref()).ok())
            .collect();
        if !children_done {
            stack.push((digest, true));
            stack.extend(
                children
                    .iter()
                    .filter(|child| !sizes.contains_key(child))
                    .map(|child| (*child, false)),
            );
            continue;
        }
        let mut size = InputTreeSize {
            files: directory.files.len() as u64,
            directories: 1,
            bytes: directory
                .files
                .iter()
                .filter_map(|f| Digest::from_field(f.digest.as_ref()).ok())
                .fold(0u64, |total, d| total.saturating_add(d.size())),
            depth: 1,
        };
        for child in &children {
            // Content addressing rules out cycles; were there one, the
            // child would still be unmeasured here and count as nothing.
            let Some(child) = sizes.get(child) else {
                continue;
            };
            size.files = size.files.saturating_add(child.files);
            size.directories = size.directories.saturating_add(child.directories);
            size.bytes = size.bytes.saturating_add(child.bytes);
            size.depth = size.depth.max(child.depth.saturating_add(1));
        }
        sizes.insert(digest, size);
    }
    sizes.get(&root).copied().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    fn file(name: &str, content: &[u8]) -> reapi::FileNode {
        reapi::FileNode {
            name: name.into(),
            digest: Some(Digest::of_bytes(content).to_proto()),
            ..Default::default()
        }
    }

    #[test]
    fn shared_directories_count_every_time_they_appear() {
        // 12 levels, each directory holding its child twice: 6 KB of messages
        // describe 2^12 - 1 directories at the bottom level alone.
        let mut all = Vec::new();
        let leaf = reapi::Directory {
            files: vec![file("a", b"1234"), file("b", b"")],
            ..Default::default()
        };
        let mut current = leaf.clone();
        all.push(leaf);
        for _ in 0..11 {
            let digest = Digest::of_message(&current);
            let parent = reapi::Directory {
                directories: ["x", "y"]
                    .iter()
                    .map(|name| reapi::DirectoryNode {
                        name: name.to_string(),
                        digest: Some(digest.to_proto()),
                    })
                    .collect(),
                ..Default::default()
            };
            all.push(parent.clone());
            current = parent;
        }
        let root = Digest::of_message(&current);
        let encoded: usize = all.iter().map(|d| d.encoded_len()).sum();
        assert!(encoded < 6_000, "{encoded}");
        let by_digest: HashMap<Digest, &reapi::Directory> =
            all.iter().map(|d| (Digest::of_message(d), d)).collect();
        let size = measure(root, &by_digest);
        assert_eq!(size.directories, (1 << 12) - 1);
        assert_eq!(size.files, 2 * (1 << 11));
        assert_eq!(size.bytes, 4 * (1 << 11));
        assert_eq!(size.depth, 12);
    }
}
