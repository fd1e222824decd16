//! A step's artifacts: files of the checkout matching its globs, uploaded
//! to the CAS. Globs are relative to the checkout and cannot leave it; a
//! symlink is followed only to a file inside the checkout; `.git` is never
//! searched.

use std::path::{Component, Path, PathBuf};

use globset::{GlobBuilder, GlobSetBuilder};

/// Artifacts one step may upload.
pub(crate) const MAX_ARTIFACTS: usize = 1000;

/// A file to upload: its path relative to the checkout, and where to read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Artifact {
    pub(crate) relative: String,
    pub(crate) file: PathBuf,
}

/// What matching found: the files, and notes for the log.
#[derive(Debug, Default)]
pub(crate) struct Matched {
    pub(crate) files: Vec<Artifact>,
    pub(crate) notes: Vec<String>,
}

/// Checks one glob: relative, no `..`, not empty.
fn check_glob(glob: &str) -> Result<(), String> {
    if glob.trim().is_empty() {
        return Err("artifact glob is empty".into());
    }
    let path = Path::new(glob);
    if path.is_absolute() {
        return Err(format!(
            "artifact glob {glob:?} is absolute; globs are relative to the checkout"
        ));
    }
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!(
            "artifact glob {glob:?} contains `..`; artifacts must be inside the checkout"
        ));
    }
    Ok(())
}

/// Finds the files of `checkout` matching `globs` (blocking: run it off
/// the runtime).
pub(crate) fn find(checkout: &Path, globs: &[String]) -> Result<Matched, String> {
    let mut builder = GlobSetBuilder::new();
    for glob in globs {
        check_glob(glob)?;
        let glob = glob.strip_prefix("./").unwrap_or(glob);
        builder.add(
            GlobBuilder::new(glob)
                .literal_separator(true)
                .build()
                .map_err(|e| format!("artifact glob {glob:?}: {e}"))?,
        );
    }
    let set = builder.build().map_err(|e| e.to_string())?;
    let mut matched = Matched::default();
    if globs.is_empty() {
        return Ok(matched);
    }
    let root = checkout
        .canonicalize()
        .map_err(|e| format!("checkout {}: {e}", checkout.display()))?;
    let walk = walkdir::WalkDir::new(&root)
        .follow_links(false)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| !(e.depth() == 1 && e.file_name() == ".git"));
    for entry in walk {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                matched
                    .notes
                    .push(format!("skipped while searching for artifacts: {e}"));
                continue;
            }
        };
        let Ok(relative) = entry.path().strip_prefix(&root) else {
            continue;
        };
        let Some(relative_str) = relative.to_str() else {
            continue;
        };
        if relative_str.is_empty() || !set.is_match(relative) {
            continue;
        }
        let file_type = entry.file_type();
        let file = if file_type.is_file() {
            entry.path().to_path_buf()
        } else if file_type.is_symlink() {
            match entry.path().canonicalize() {
                Ok(target) if target.starts_with(&root) && target.is_file() => target,
                _ => {
                    matched.notes.push(format!(
                        "artifact {relative_str}: a symlink to outside the checkout (or to no file); not uploaded"
                    ));
                    continue;
                }
            }
        } else {
            continue;
        };
        if matched.files.len() == MAX_ARTIFACTS {
            matched.notes.push(format!(
                "more than {MAX_ARTIFACTS} files match the artifact globs; the rest are not uploaded"
            ));
            break;
        }
        matched.files.push(Artifact {
            relative: relative_str.to_string(),
            file,
        });
    }
    Ok(matched)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_step_artifacts_stay_inside_the_checkout() {
        let dir = tempfile::tempdir().unwrap();
        let checkout = dir.path().join("checkout");
        std::fs::create_dir_all(checkout.join("out/sub")).unwrap();
        std::fs::create_dir_all(checkout.join(".git")).unwrap();
        std::fs::write(checkout.join("out/a.txt"), "a").unwrap();
        std::fs::write(checkout.join("out/sub/b.txt"), "b").unwrap();
        std::fs::write(checkout.join(".git/c.txt"), "c").unwrap();
        std::fs::write(dir.path().join("secret.txt"), "s").unwrap();
        std::os::unix::fs::symlink(
            dir.path().join("secret.txt"),
            checkout.join("out/escape.txt"),
        )
        .unwrap();
        std::os::unix::fs::symlink("a.txt", checkout.join("out/inside.txt")).unwrap();

        let found = find(&checkout, &["out/*.txt".into()]).unwrap();
        let names: Vec<&str> = found.files.iter().map(|a| a.relative.as_str()).collect();
        assert_eq!(names, ["out/a.txt", "out/inside.txt"]);
        assert!(
            found.notes[0].contains("out/escape.txt"),
            "{:?}",
            found.notes
        );
        let found = find(&checkout, &["**/*.txt".into()]).unwrap();
        let names: Vec<&str> = found.files.iter().map(|a| a.relative.as_str()).collect();
        assert_eq!(names, ["out/a.txt", "out/inside.txt", "out/sub/b.txt"]);

        for bad in ["../secret.txt", "/etc/passwd", "out/../../x", " "] {
            assert!(find(&checkout, &[bad.into()]).is_err(), "{bad}");
        }
    }
}
