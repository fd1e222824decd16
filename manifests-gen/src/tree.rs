//! The generated tree in memory, and writing it to or checking it against
//! a directory. Only the owned top-level entries are rewritten and pruned.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use similar::TextDiff;
use walkdir::WalkDir;

/// One generated file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedFile {
    /// Its contents.
    pub contents: String,
    /// Whether it is a script (mode 0755 rather than 0644).
    pub executable: bool,
}

impl GeneratedFile {
    /// A plain file.
    pub fn text(contents: String) -> Self {
        GeneratedFile {
            contents,
            executable: false,
        }
    }

    /// A script.
    pub fn executable(contents: String) -> Self {
        GeneratedFile {
            contents,
            executable: true,
        }
    }
}

/// Generated files by `/`-separated path relative to the output directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tree {
    /// The files, in path order (which makes every output deterministic).
    pub files: BTreeMap<String, GeneratedFile>,
}

/// Errors writing or reading the tree, naming the path.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// A filesystem operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> TreeError + '_ {
    move |source| TreeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What `--check` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Staleness {
    /// Unified diffs of files whose contents differ, and notes on missing,
    /// extra and wrong-mode files.
    pub report: String,
    /// Paths that differ.
    pub paths: Vec<String>,
}

impl Staleness {
    /// True when the directory matches the tree.
    pub fn is_fresh(&self) -> bool {
        self.paths.is_empty()
    }
}

impl Tree {
    /// Adds a file; a path generated twice is a bug.
    pub fn insert(&mut self, path: &str, file: GeneratedFile) {
        let previous = self.files.insert(path.to_string(), file);
        assert!(previous.is_none(), "{path} generated twice");
    }

    /// Files under `prefix/` (with the prefix stripped), in order.
    pub fn under<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a GeneratedFile)> + 'a {
        self.files.iter().filter_map(move |(path, file)| {
            path.strip_prefix(prefix)
                .and_then(|rest| rest.strip_prefix('/'))
                .map(|rest| (rest, file))
        })
    }

    /// Files on disk under the owned roots of `dir`, by relative path.
    fn existing(dir: &Path, roots: &[String]) -> Result<BTreeMap<String, PathBuf>, TreeError> {
        let mut found = BTreeMap::new();
        for root in roots {
            let path = dir.join(root);
            if !path.exists() {
                continue;
            }
            for entry in WalkDir::new(&path).sort_by_file_name() {
                let entry = entry.map_err(|e| {
                    let path = e.path().unwrap_or(&path).to_path_buf();
                    TreeError::Io {
                        path,
                        source: e.into(),
                    }
                })?;
                if entry.file_type().is_file() || entry.file_type().is_symlink() {
                    let relative = entry.path().strip_prefix(dir).expect("under dir");
                    let key = relative
                        .components()
                        .map(|c| c.as_os_str().to_string_lossy())
                        .collect::<Vec<_>>()
                        .join("/");
                    found.insert(key, entry.path().to_path_buf());
                }
            }
        }
        Ok(found)
    }

    /// Compares `dir` with the tree without writing anything.
    pub fn check(&self, dir: &Path, roots: &[String]) -> Result<Staleness, TreeError> {
        let existing = Self::existing(dir, roots)?;
        let mut staleness = Staleness::default();
        for (path, file) in &self.files {
            let on_disk = dir.join(path);
            match fs::read(&on_disk) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let _ = writeln!(staleness.report, "missing: {path}");
                    staleness.paths.push(path.clone());
                }
                Err(source) => {
                    return Err(TreeError::Io {
                        path: on_disk,
                        source,
                    })
                }
                Ok(bytes) => {
                    let current = String::from_utf8_lossy(&bytes);
                    if current != file.contents {
                        let diff = TextDiff::from_lines(current.as_ref(), file.contents.as_str());
                        let _ = write!(
                            staleness.report,
                            "{}",
                            diff.unified_diff()
                                .context_radius(3)
                                .header(&format!("a/{path}"), &format!("b/{path}"))
                        );
                        staleness.paths.push(path.clone());
                    } else if is_executable(&on_disk)? != file.executable {
                        let _ = writeln!(
                            staleness.report,
                            "mode: {path} should {}be executable",
                            if file.executable { "" } else { "not " }
                        );
                        staleness.paths.push(path.clone());
                    }
                }
            }
        }
        for path in existing.keys() {
            if !self.files.contains_key(path) {
                let _ = writeln!(staleness.report, "no longer generated: {path}");
                staleness.paths.push(path.clone());
            }
        }
        Ok(staleness)
    }

    /// Writes the tree into `dir`: changed files are rewritten, files under
    /// the owned roots that are no longer generated are removed (and then
    /// empty directories). Returns the paths changed.
    pub fn write(&self, dir: &Path, roots: &[String]) -> Result<Vec<String>, TreeError> {
        let staleness = self.check(dir, roots)?;
        let existing = Self::existing(dir, roots)?;
        for path in &staleness.paths {
            let target = dir.join(path);
            match self.files.get(path) {
                Some(file) => {
                    if let Some(parent) = target.parent() {
                        fs::create_dir_all(parent).map_err(io_err(parent))?;
                    }
                    fs::write(&target, &file.contents).map_err(io_err(&target))?;
                    set_executable(&target, file.executable)?;
                }
                None => {
                    if existing.contains_key(path) {
                        fs::remove_file(&target).map_err(io_err(&target))?;
                    }
                }
            }
        }
        for root in roots {
            remove_empty_dirs(&dir.join(root))?;
        }
        Ok(staleness.paths)
    }
}

#[cfg(unix)]
fn is_executable(path: &Path) -> Result<bool, TreeError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::metadata(path).map_err(io_err(path))?;
    Ok(meta.permissions().mode() & 0o111 != 0)
}

#[cfg(not(unix))]
fn is_executable(_path: &Path) -> Result<bool, TreeError> {
    Ok(false)
}

#[cfg(unix)]
fn set_executable(path: &Path, executable: bool) -> Result<(), TreeError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = if executable { 0o755 } else { 0o644 };
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err(path))
}

#[cfg(not(unix))]
fn set_executable(_path: &Path, _executable: bool) -> Result<(), TreeError> {
    Ok(())
}

fn remove_empty_dirs(dir: &Path) -> Result<(), TreeError> {
    if !dir.is_dir() {
        return Ok(());
    }
    // Deepest first, so a directory emptied by its children goes too.
    for entry in WalkDir::new(dir).contents_first(true) {
        let entry = entry.map_err(|e| TreeError::Io {
            path: dir.to_path_buf(),
            source: e.into(),
        })?;
        if entry.file_type().is_dir()
            && fs::read_dir(entry.path())
                .map_err(io_err(entry.path()))?
                .next()
                .is_none()
        {
            fs::remove_dir(entry.path()).map_err(io_err(entry.path()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> Tree {
        let mut tree = Tree::default();
        for (path, contents) in files {
            tree.insert(path, GeneratedFile::text(contents.to_string()));
        }
        tree
    }

    #[test]
    fn write_then_check_is_fresh_and_prunes_only_owned_roots() {
        let dir = tempfile::tempdir().unwrap();
        let roots = vec!["base".to_string()];
        fs::create_dir_all(dir.path().join("base/old")).unwrap();
        fs::write(dir.path().join("base/old/stale.yaml"), "x").unwrap();
        fs::create_dir_all(dir.path().join("my-stack")).unwrap();
        fs::write(dir.path().join("my-stack/kustomization.yaml"), "mine").unwrap();

        let t = tree(&[("base/a.yaml", "a\n")]);
        let changed = t.write(dir.path(), &roots).unwrap();
        assert_eq!(changed, vec!["base/a.yaml", "base/old/stale.yaml"]);
        assert!(
            !dir.path().join("base/old").exists(),
            "emptied directory removed"
        );
        assert!(
            dir.path().join("my-stack/kustomization.yaml").exists(),
            "user overlay kept"
        );
        assert!(t.check(dir.path(), &roots).unwrap().is_fresh());
    }

    #[test]
    fn check_reports_a_readable_diff() {
        let dir = tempfile::tempdir().unwrap();
        let roots = vec!["base".to_string()];
        tree(&[("base/a.yaml", "replicas: 1\n")])
            .write(dir.path(), &roots)
            .unwrap();
        let staleness = tree(&[("base/a.yaml", "replicas: 2\n")])
            .check(dir.path(), &roots)
            .unwrap();
        assert_eq!(staleness.paths, vec!["base/a.yaml"]);
        assert!(
            staleness.report.contains("-replicas: 1\n+replicas: 2"),
            "{}",
            staleness.report
        );
    }
}
