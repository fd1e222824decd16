//! Declared outputs: path validation before the command runs, and afterwards
//! collection into an `ActionResult` (files, directories as `Tree`s,
//! symlinks) plus the blobs to upload.

// The legacy output fields are still what Bazel 4 sends and reads.
#![allow(deprecated)]

use std::collections::HashSet;
use std::io::Read as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use buildkube_proto::reapi::{
    self, ActionResult, Command, DirectoryNode, FileNode, OutputDirectory, OutputFile,
    OutputSymlink, SymlinkNode,
};
use buildkube_reapi::{CasClient, CasClientError, CommandPathField, Digest, Hasher};
use bytes::Bytes;
use futures::StreamExt as _;
use prost::Message as _;
use tonic::Code;

use crate::action_error::ActionError;
use crate::metrics::WorkerMetrics;

/// How a declared output was declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OutputKind {
    /// `Command.output_paths` (REAPI ≥ 2.1): a file, directory or symlink.
    Path,
    /// `Command.output_files` (legacy).
    File,
    /// `Command.output_directories` (legacy).
    Directory,
}

/// One declared output, relative to the working directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeclaredOutput {
    pub(crate) path: String,
    pub(crate) relative: PathBuf,
    pub(crate) kind: OutputKind,
}

/// The command's working directory (relative to the input root) and its
/// declared outputs: `output_paths` when set, else the legacy
/// `output_files` and `output_directories`. The rules are those the server
/// applied at Execute ([`buildkube_reapi::command_outputs`]).
pub(crate) fn command_paths(
    command: &Command,
) -> Result<(PathBuf, Vec<DeclaredOutput>), ActionError> {
    let outputs = buildkube_reapi::command_outputs(command)
        .map_err(|e| ActionError::invalid(e.to_string()))?;
    let working_dir = buildkube_reapi::relative_path(&command.working_directory)
        .expect("checked by command_outputs");
    let outputs = outputs
        .into_iter()
        .map(|output| DeclaredOutput {
            kind: match output.field {
                CommandPathField::OutputFiles => OutputKind::File,
                CommandPathField::OutputDirectories => OutputKind::Directory,
                CommandPathField::OutputPaths | CommandPathField::WorkingDirectory => {
                    OutputKind::Path
                }
            },
            path: output.path,
            relative: output.relative,
        })
        .collect();
    Ok((working_dir, outputs))
}

/// The command's declared outputs (see [`command_paths`]).
#[cfg(test)]
pub(crate) fn declared_outputs(command: &Command) -> Result<Vec<DeclaredOutput>, ActionError> {
    command_paths(command).map(|(_, outputs)| outputs)
}

/// Fails if a proper ancestor of `relative` below `base` is a symlink (the
/// output would land outside the working directory) or not a directory.
/// With `create`, missing ancestors are created.
pub(crate) fn check_ancestors(
    base: &Path,
    relative: &Path,
    output: &str,
    create: bool,
) -> Result<(), ActionError> {
    let mut current = base.to_path_buf();
    let parts: Vec<_> = relative.components().collect();
    for part in parts.iter().take(parts.len().saturating_sub(1)) {
        current.push(part);
        match std::fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(ActionError::invalid(format!(
                    "output path `{output}` goes through the symlink `{}`, which could escape the working directory",
                    current.strip_prefix(base).unwrap_or(&current).display()
                )));
            }
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(ActionError::invalid(format!(
                    "output path `{output}`: `{}` is not a directory",
                    current.strip_prefix(base).unwrap_or(&current).display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                std::fs::create_dir(&current)
                    .map_err(|e| ActionError::io("creating", &current, &e))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(ActionError::io("inspecting", &current, &e)),
        }
    }
    Ok(())
}

/// Creates the parent directories of every declared output (not the outputs
/// themselves), refusing to go through symlinks.
pub(crate) fn create_output_parents(
    exec_root: &Path,
    outputs: &[DeclaredOutput],
) -> Result<(), ActionError> {
    for output in outputs {
        check_ancestors(exec_root, &output.relative, &output.path, true)?;
    }
    Ok(())
}

/// Where the bytes of a blob to upload are.
#[derive(Debug, Clone)]
pub(crate) enum BlobSource {
    File(PathBuf),
    Bytes(Bytes),
}

/// The outputs found after a run.
#[derive(Debug, Default)]
pub(crate) struct CollectedOutputs {
    /// Only the output fields are set.
    pub(crate) result: ActionResult,
    pub(crate) blobs: Vec<(Digest, BlobSource)>,
    /// Bytes of output files counted so far, against the limit.
    pub(crate) total_bytes: u64,
}

/// Hashes a file.
pub(crate) fn hash_file(path: &Path) -> std::io::Result<Digest> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Hasher::new();
    let mut buffer = vec![0u8; 256 << 10];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            return Ok(hasher.finish());
        }
        hasher.update(&buffer[..n]);
    }
}

fn is_executable(meta: &std::fs::Metadata) -> bool {
    meta.permissions().mode() & 0o111 != 0
}

impl CollectedOutputs {
    fn add_file_bytes(&mut self, size: u64, path: &str, limit: u64) -> Result<(), ActionError> {
        self.total_bytes += size;
        if self.total_bytes > limit {
            return Err(ActionError::new(
                Code::ResourceExhausted,
                format!(
                    "outputs exceed the worker's limit of {limit} bytes (--max-output-size) at `{path}` ({size} bytes)"
                ),
            ));
        }
        Ok(())
    }

    fn hash_output_file(
        &mut self,
        path: &Path,
        shown: &str,
        limit: u64,
    ) -> Result<Digest, ActionError> {
        let meta = std::fs::metadata(path).map_err(|e| ActionError::io("inspecting", path, &e))?;
        self.add_file_bytes(meta.len(), shown, limit)?;
        let digest = hash_file(path).map_err(|e| ActionError::io("reading output", path, &e))?;
        self.blobs
            .push((digest, BlobSource::File(path.to_path_buf())));
        Ok(digest)
    }

    /// Builds the `Directory` for `path`; appends every distinct
    /// subdirectory to `children` after its own subdirectories (post-order).
    fn build_directory(
        &mut self,
        path: &Path,
        shown: &str,
        limit: u64,
        children: &mut Vec<reapi::Directory>,
        seen: &mut HashSet<Digest>,
    ) -> Result<reapi::Directory, ActionError> {
        let mut entries: Vec<(String, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(path).map_err(|e| ActionError::io("listing", path, &e))? {
            let entry = entry.map_err(|e| ActionError::io("listing", path, &e))?;
            let name = entry.file_name().into_string().map_err(|name| {
                ActionError::invalid(format!(
                    "output `{shown}` contains a file name that is not UTF-8: {name:?}"
                ))
            })?;
            entries.push((name, entry.path()));
        }
        entries.sort();
        let mut directory = reapi::Directory::default();
        for (name, child) in entries {
            let shown_child = format!("{shown}/{name}");
            let meta = std::fs::symlink_metadata(&child)
                .map_err(|e| ActionError::io("inspecting", &child, &e))?;
            let kind = meta.file_type();
            if kind.is_symlink() {
                let target = std::fs::read_link(&child)
                    .map_err(|e| ActionError::io("reading link", &child, &e))?;
                directory.symlinks.push(SymlinkNode {
                    name,
                    target: target.to_string_lossy().into_owned(),
                    ..Default::default()
                });
            } else if kind.is_dir() {
                let sub = self.build_directory(&child, &shown_child, limit, children, seen)?;
                let digest = Digest::of_message(&sub);
                if seen.insert(digest) {
                    children.push(sub);
                }
                directory.directories.push(DirectoryNode {
                    name,
                    digest: Some(digest.to_proto()),
                });
            } else if kind.is_file() {
                let digest = self.hash_output_file(&child, &shown_child, limit)?;
                directory.files.push(FileNode {
                    name,
                    digest: Some(digest.to_proto()),
                    is_executable: is_executable(&meta),
                    ..Default::default()
                });
            } else {
                return Err(ActionError::invalid(format!(
                    "output `{shown_child}` is neither a file, a directory nor a symlink"
                )));
            }
        }
        Ok(directory)
    }

    /// Collects one output directory as a `Tree`.
    fn add_directory(
        &mut self,
        path: &Path,
        shown: &str,
        limit: u64,
    ) -> Result<OutputDirectory, ActionError> {
        let mut children = Vec::new();
        let mut seen = HashSet::new();
        let root = self.build_directory(path, shown, limit, &mut children, &mut seen)?;
        // Reversed post-order: every directory comes before its subdirectories.
        children.reverse();
        let root_digest = Digest::of_message(&root);
        for directory in std::iter::once(&root).chain(children.iter()) {
            let bytes = Bytes::from(directory.encode_to_vec());
            self.blobs
                .push((Digest::of_bytes(&bytes), BlobSource::Bytes(bytes)));
        }
        let tree = reapi::Tree {
            root: Some(root),
            children,
        };
        let bytes = Bytes::from(tree.encode_to_vec());
        let tree_digest = Digest::of_bytes(&bytes);
        self.blobs.push((tree_digest, BlobSource::Bytes(bytes)));
        Ok(OutputDirectory {
            path: shown.to_string(),
            tree_digest: Some(tree_digest.to_proto()),
            is_topologically_sorted: true,
            root_directory_digest: Some(root_digest.to_proto()),
        })
    }
}

/// Collects the declared outputs under `exec_root` (the working directory).
/// Outputs that were not produced are left out (the client decides whether
/// that is an error). Blocking: call from `spawn_blocking`.
pub(crate) fn collect_outputs(
    exec_root: &Path,
    outputs: &[DeclaredOutput],
    limit: u64,
) -> Result<CollectedOutputs, ActionError> {
    let mut collected = CollectedOutputs::default();
    for output in outputs {
        check_ancestors(exec_root, &output.relative, &output.path, false)?;
        let path = exec_root.join(&output.relative);
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(ActionError::io("inspecting output", &path, &e)),
        };
        let kind = meta.file_type();
        if kind.is_symlink() {
            let target = std::fs::read_link(&path)
                .map_err(|e| ActionError::io("reading link", &path, &e))?;
            let symlink = OutputSymlink {
                path: output.path.clone(),
                target: target.to_string_lossy().into_owned(),
                ..Default::default()
            };
            match output.kind {
                OutputKind::Path => {}
                OutputKind::File => collected.result.output_file_symlinks.push(symlink.clone()),
                OutputKind::Directory => collected
                    .result
                    .output_directory_symlinks
                    .push(symlink.clone()),
            }
            collected.result.output_symlinks.push(symlink);
        } else if kind.is_dir() {
            if output.kind == OutputKind::File {
                return Err(ActionError::new(
                    Code::FailedPrecondition,
                    format!("output file `{}` is a directory", output.path),
                ));
            }
            let directory = collected.add_directory(&path, &output.path, limit)?;
            collected.result.output_directories.push(directory);
        } else if kind.is_file() {
            if output.kind == OutputKind::Directory {
                return Err(ActionError::new(
                    Code::FailedPrecondition,
                    format!("output directory `{}` is a regular file", output.path),
                ));
            }
            let digest = collected.hash_output_file(&path, &output.path, limit)?;
            collected.result.output_files.push(OutputFile {
                path: output.path.clone(),
                digest: Some(digest.to_proto()),
                is_executable: is_executable(&meta),
                ..Default::default()
            });
        } else {
            return Err(ActionError::invalid(format!(
                "output `{}` is neither a file, a directory nor a symlink",
                output.path
            )));
        }
    }
    Ok(collected)
}

/// Uploads the blobs the CAS lacks; returns the bytes sent.
pub(crate) async fn upload_blobs(
    cas: &CasClient,
    blobs: &[(Digest, BlobSource)],
    metrics: &WorkerMetrics,
) -> Result<u64, CasClientError> {
    let mut unique: Vec<(Digest, BlobSource)> = Vec::new();
    let mut seen = HashSet::new();
    for (digest, source) in blobs {
        if seen.insert(*digest) {
            unique.push((*digest, source.clone()));
        }
    }
    let digests: Vec<Digest> = unique.iter().map(|(d, _)| *d).collect();
    let missing: HashSet<Digest> = cas.find_missing(&digests).await?.into_iter().collect();
    let mut in_memory = Vec::new();
    let mut files = Vec::new();
    for (digest, source) in unique {
        if !missing.contains(&digest) {
            continue;
        }
        match source {
            BlobSource::Bytes(bytes) => in_memory.push((digest, bytes)),
            BlobSource::File(path) => files.push((digest, path)),
        }
    }
    let mut sent: u64 = in_memory.iter().map(|(d, _)| d.size()).sum();
    if !in_memory.is_empty() {
        cas.upload_blobs(in_memory).await?;
    }
    let results: Vec<Result<u64, CasClientError>> = futures::stream::iter(files)
        .map(|(digest, path)| async move {
            cas.upload_file(digest, &path).await.map(|()| digest.size())
        })
        .buffer_unordered(4)
        .collect()
        .await;
    for result in results {
        sent += result?;
    }
    metrics.bytes_uploaded.fetch_add(sent, Ordering::Relaxed);
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    #[test]
    fn output_paths_must_stay_inside() {
        let command = |path: &str| Command {
            output_paths: vec![path.into()],
            ..Default::default()
        };
        let (_, outputs) = command_paths(&command("./a/./b")).unwrap();
        assert_eq!(outputs[0].relative, PathBuf::from("a/b"));
        for bad in [
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a/..",
            "a//b",
            "a/",
            "a\0b",
        ] {
            let e = command_paths(&command(bad)).unwrap_err();
            assert_eq!(e.code, Code::InvalidArgument, "{bad}");
            assert!(e.message.contains("output_paths"), "{bad}: {}", e.message);
        }
        let e = command_paths(&Command {
            working_directory: "../up".into(),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.message.contains("working_directory"), "{}", e.message);
    }

    #[test]
    fn declared_outputs_prefer_output_paths() {
        let mut command = Command {
            output_files: vec!["f".into()],
            output_directories: vec!["d".into()],
            ..Default::default()
        };
        let legacy = declared_outputs(&command).unwrap();
        assert_eq!(
            legacy.iter().map(|o| o.kind).collect::<Vec<_>>(),
            [OutputKind::File, OutputKind::Directory]
        );
        command.output_paths = vec!["p".into()];
        let outputs = declared_outputs(&command).unwrap();
        assert_eq!(outputs.len(), 1);
        assert_eq!(outputs[0].kind, OutputKind::Path);
        command.output_paths = vec!["../escape".into()];
        let e = declared_outputs(&command).unwrap_err();
        assert!(e.message.contains("../escape"), "{}", e.message);
    }

    #[test]
    fn parents_are_created_but_never_through_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let outputs = declared_outputs(&Command {
            output_files: vec!["a/b/c.o".into()],
            output_directories: vec!["d/e".into()],
            ..Default::default()
        })
        .unwrap();
        create_output_parents(&root, &outputs).unwrap();
        assert!(root.join("a/b").is_dir());
        assert!(!root.join("a/b/c.o").exists());
        assert!(root.join("d").is_dir());
        assert!(
            !root.join("d/e").exists(),
            "the output directory itself is not created"
        );

        symlink(dir.path(), root.join("link")).unwrap();
        let outputs = declared_outputs(&Command {
            output_paths: vec!["link/escaped".into()],
            ..Default::default()
        })
        .unwrap();
        let e = create_output_parents(&root, &outputs).unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument);
        assert!(
            e.message.contains("link/escaped") && e.message.contains("symlink"),
            "{}",
            e.message
        );
    }

    #[test]
    fn collection_rejects_symlinked_parents_created_by_the_action() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(dir.path().join("outside")).unwrap();
        std::fs::write(dir.path().join("outside/secret"), b"s").unwrap();
        std::fs::create_dir(&root).unwrap();
        symlink(dir.path().join("outside"), root.join("out")).unwrap();
        let outputs = declared_outputs(&Command {
            output_files: vec!["out/secret".into()],
            ..Default::default()
        })
        .unwrap();
        let e = collect_outputs(&root, &outputs, u64::MAX).unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument);
        assert!(e.message.contains("out/secret"), "{}", e.message);
    }

    fn write(path: &Path, data: &[u8], mode: u32) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn directories_become_deduplicated_sorted_trees() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(&root.join("out/b/same/x"), b"x", 0o644);
        write(&root.join("out/a/same/x"), b"x", 0o644);
        write(&root.join("out/tool"), b"#!/bin/sh", 0o755);
        std::fs::create_dir_all(root.join("out/empty")).unwrap();
        symlink("tool", root.join("out/alias")).unwrap();
        write(&root.join("file.o"), b"obj", 0o644);
        symlink("file.o", root.join("link.o")).unwrap();
        let outputs = declared_outputs(&Command {
            output_files: vec!["file.o".into(), "link.o".into(), "missing.o".into()],
            output_directories: vec!["out".into()],
            ..Default::default()
        })
        .unwrap();
        let collected = collect_outputs(root, &outputs, u64::MAX).unwrap();
        let result = &collected.result;
        assert_eq!(result.output_files.len(), 1);
        assert_eq!(
            result.output_files[0].digest,
            Some(Digest::of_bytes(b"obj").to_proto())
        );
        assert_eq!(result.output_file_symlinks.len(), 1);
        assert_eq!(result.output_symlinks.len(), 1);
        assert_eq!(result.output_symlinks[0].target, "file.o");
        assert_eq!(result.output_directories.len(), 1);

        let out = &result.output_directories[0];
        let tree_digest = Digest::from_field(out.tree_digest.as_ref()).unwrap();
        let tree_bytes = collected
            .blobs
            .iter()
            .find_map(|(d, s)| match s {
                BlobSource::Bytes(b) if *d == tree_digest => Some(b.clone()),
                _ => None,
            })
            .expect("tree blob is uploaded");
        let tree = reapi::Tree::decode(tree_bytes).unwrap();
        let root_dir = tree.root.clone().unwrap();
        assert_eq!(
            Digest::of_message(&root_dir).to_proto(),
            out.root_directory_digest.clone().unwrap()
        );
        let names = |d: &reapi::Directory| {
            d.directories
                .iter()
                .map(|n| n.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&root_dir), ["a", "b", "empty"]);
        assert_eq!(root_dir.files.len(), 1);
        assert!(root_dir.files[0].is_executable);
        assert_eq!(root_dir.symlinks[0].name, "alias");
        // a, b (identical: one child), same, empty.
        assert_eq!(tree.children.len(), 3, "{:#?}", tree.children);
        // Topological: every referenced directory appears after its parent.
        let position = |digest: &reapi::Digest| {
            tree.children
                .iter()
                .position(|c| Digest::of_message(c).to_proto() == *digest)
                .unwrap()
        };
        for (i, child) in tree.children.iter().enumerate() {
            for sub in &child.directories {
                assert!(position(sub.digest.as_ref().unwrap()) > i);
            }
        }
        assert_eq!(collected.total_bytes, 1 + 1 + 9 + 3);
    }

    #[test]
    fn output_size_limit_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("big"), &[0u8; 100], 0o644);
        let outputs = declared_outputs(&Command {
            output_paths: vec!["big".into()],
            ..Default::default()
        })
        .unwrap();
        let e = collect_outputs(dir.path(), &outputs, 99).unwrap_err();
        assert_eq!(e.code, Code::ResourceExhausted);
        assert!(
            e.message.contains("big") && e.message.contains("99"),
            "{}",
            e.message
        );
    }

    #[test]
    fn wrong_kind_is_failed_precondition() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        let outputs = declared_outputs(&Command {
            output_files: vec!["d".into()],
            ..Default::default()
        })
        .unwrap();
        let e = collect_outputs(dir.path(), &outputs, u64::MAX).unwrap_err();
        assert_eq!(e.code, Code::FailedPrecondition);
    }
}
