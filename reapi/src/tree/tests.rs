use buildkube_proto::reapi::{self, DirectoryNode, FileNode, SymlinkNode};

use super::*;

fn file(name: &str, data: &[u8]) -> FileNode {
    FileNode {
        name: name.into(),
        digest: Some(Digest::of_bytes(data).into()),
        ..Default::default()
    }
}

fn dir(name: &str, digest: Digest) -> DirectoryNode {
    DirectoryNode {
        name: name.into(),
        digest: Some(digest.into()),
    }
}

/// A tree being built: directories by digest.
#[derive(Default)]
struct Index(HashMap<Digest, Directory>);

impl Index {
    fn add(&mut self, directory: Directory) -> Digest {
        let digest = Digest::of_message(&directory);
        self.0.insert(digest, directory);
        digest
    }

    fn check(&self, root: Digest) -> Result<TreeStats, TreeError> {
        validate_tree(root, &self.0, &TreeLimits::default())
    }
}

/// A chain of `levels` directories named `d`, with one file at the bottom.
fn chain(index: &mut Index, levels: usize) -> Digest {
    let mut digest = index.add(Directory {
        files: vec![file("f", b"x")],
        ..Default::default()
    });
    for _ in 0..levels {
        digest = index.add(Directory {
            directories: vec![dir("d", digest)],
            ..Default::default()
        });
    }
    digest
}

#[test]
fn a_canonical_tree_is_valid_and_counted_per_occurrence() {
    let mut index = Index::default();
    let leaf = index.add(Directory {
        files: vec![file("a", b"aaa"), file("b", b"bb")],
        symlinks: vec![SymlinkNode {
            name: "link".into(),
            target: "a".into(),
            ..Default::default()
        }],
        ..Default::default()
    });
    let root = index.add(Directory {
        files: vec![file("top", b"t")],
        directories: vec![dir("x", leaf), dir("y", leaf)],
        ..Default::default()
    });
    let stats = index.check(root).unwrap();
    assert_eq!(
        stats,
        TreeStats {
            directories: 2,
            files: 5,
            symlinks: 2,
            file_bytes: 1 + 2 * 5,
            depth: 1,
        }
    );
    assert!(validate_directory(&index.0[&root]).is_ok());
}

/// Issue 8, finding 11: these answered INTERNAL (the worker failed to
/// create the second entry); each is the client's mistake.
#[test]
fn duplicate_names_are_rejected_naming_the_entry() {
    let twice = Directory {
        files: vec![file("a", b"1"), file("a", b"2")],
        ..Default::default()
    };
    let error = validate_directory(&twice).unwrap_err();
    assert!(
        matches!(&error, TreeError::Unsorted { name, .. } if name == "a"),
        "{error:?}"
    );
    let mut index = Index::default();
    let sub = index.add(Directory::default());
    let both = Directory {
        files: vec![file("out", b"1")],
        directories: vec![dir("out", sub)],
        ..Default::default()
    };
    let error = validate_directory(&both).unwrap_err();
    assert_eq!(
        error,
        TreeError::Duplicate {
            at: TreePath::default(),
            name: "out".into(),
            first: EntryKind::File,
            second: EntryKind::Directory,
        }
    );
    assert_eq!(
        error.to_string(),
        "input root: \"out\" is both a file and a directory"
    );
}

#[test]
fn unsorted_entries_are_rejected() {
    let unsorted = Directory {
        files: vec![file("b", b"1"), file("a", b"2")],
        ..Default::default()
    };
    assert_eq!(
        validate_directory(&unsorted).unwrap_err().to_string(),
        "input root: file entries must be sorted by name without repeats, but \"a\" comes after \"b\""
    );
    // By bytes: "B" < "a".
    let sorted = Directory {
        files: vec![file("B", b"1"), file("a", b"2")],
        ..Default::default()
    };
    assert!(validate_directory(&sorted).is_ok());
}

#[test]
fn names_must_be_single_segments() {
    for (name, why) in [
        ("", "is empty"),
        (".", "is not a file name"),
        ("..", "is not a file name"),
        ("a/b", "contains `/`"),
        ("a\0b", "contains a NUL byte"),
    ] {
        let directory = Directory {
            symlinks: vec![SymlinkNode {
                name: name.into(),
                target: "t".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        match validate_directory(&directory).unwrap_err() {
            TreeError::BadName {
                kind: EntryKind::Symlink,
                why: got,
                ..
            } => assert_eq!(got, why, "{name:?}"),
            other => panic!("{name:?}: {other:?}"),
        }
    }
    let empty_target = Directory {
        symlinks: vec![SymlinkNode {
            name: "l".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    assert!(matches!(
        validate_directory(&empty_target),
        Err(TreeError::BadSymlink { .. })
    ));
    let no_digest = Directory {
        files: vec![FileNode {
            name: "f".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    assert!(matches!(
        validate_directory(&no_digest),
        Err(TreeError::BadDigest { .. })
    ));
}

/// A 16 KiB name is rejected, and not echoed back in full.
#[test]
fn huge_names_are_rejected_and_not_echoed() {
    let name = "n".repeat(16 << 10);
    let error = validate_directory(&Directory {
        files: vec![file(&name, b"x")],
        ..Default::default()
    })
    .unwrap_err();
    let message = error.to_string();
    assert!(message.contains("longer than 255 bytes"), "{message}");
    assert!(message.len() < 400, "{}", message.len());
}

#[test]
fn too_deep_trees_are_rejected_where_they_get_too_deep() {
    let mut index = Index::default();
    let ok = chain(&mut index, TreeLimits::DEFAULT_MAX_DEPTH);
    assert_eq!(
        index.check(ok).unwrap().depth,
        TreeLimits::DEFAULT_MAX_DEPTH
    );
    let deep = chain(&mut index, TreeLimits::DEFAULT_MAX_DEPTH + 1);
    let error = index.check(deep).unwrap_err();
    let TreeError::TooDeep { at, limit } = &error else {
        panic!("{error:?}");
    };
    assert_eq!(*limit, TreeLimits::DEFAULT_MAX_DEPTH);
    assert_eq!(
        at.as_str().split('/').count(),
        TreeLimits::DEFAULT_MAX_DEPTH
    );
}

/// A shallow occurrence is checked first; the same directory deeper down
/// must still count its full depth.
#[test]
fn a_shared_subtree_is_checked_at_its_deepest_place() {
    let mut index = Index::default();
    let limits = TreeLimits {
        max_depth: 5,
        ..Default::default()
    };
    let shared = chain(&mut index, 3); // 3 levels below it
    let mut deep = shared;
    for _ in 0..2 {
        deep = index.add(Directory {
            directories: vec![dir("d", deep)],
            ..Default::default()
        });
    }
    // root/a = shared (depth 1 + 3), root/b/d/d = shared (depth 3 + 3 = 6).
    let root = index.add(Directory {
        directories: vec![dir("a", shared), dir("b", deep)],
        ..Default::default()
    });
    let error = validate_tree(root, &index.0, &limits).unwrap_err();
    assert!(
        matches!(&error, TreeError::TooDeep { at, limit: 5 } if at.as_str() == "b/d/d"),
        "{error:?}"
    );
    let root = index.add(Directory {
        directories: vec![dir("a", shared)],
        ..Default::default()
    });
    assert_eq!(validate_tree(root, &index.0, &limits).unwrap().depth, 4);
}

#[test]
fn long_paths_are_rejected() {
    let limits = TreeLimits {
        max_path_bytes: 10,
        ..Default::default()
    };
    let mut index = Index::default();
    let leaf = index.add(Directory {
        files: vec![file("12345", b"x")],
        ..Default::default()
    });
    let fits = index.add(Directory {
        directories: vec![dir("1234", leaf)],
        ..Default::default()
    });
    assert!(validate_tree(fits, &index.0, &limits).is_ok()); // "1234/12345"
    let over = index.add(Directory {
        directories: vec![dir("12345", leaf), dir("a", fits)],
        ..Default::default()
    });
    assert!(matches!(
        validate_tree(over, &index.0, &limits),
        Err(TreeError::PathTooLong { .. })
    ));
}

/// An index whose keys are not the digests of their values can make a
/// cycle; it is an error, not a hang.
#[test]
fn a_forged_cycle_is_an_error() {
    let key = Digest::of_bytes(b"forged");
    let mut directories = HashMap::new();
    directories.insert(
        key,
        Directory {
            directories: vec![dir("again", key)],
            ..Default::default()
        },
    );
    assert!(matches!(
        validate_tree(key, &directories, &TreeLimits::default()),
        Err(TreeError::Cycle { .. })
    ));
    let _unused: Option<reapi::Tree> = None;
}
