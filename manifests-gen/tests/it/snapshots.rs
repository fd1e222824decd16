//! One snapshot per top-level entry of the generated tree, cargo-dist style:
//! every file under a `==== path ====` header, so one review shows a whole
//! overlay's change.

use manifests_gen::{generate, owned_roots, StackSpec};

use crate::insta_settings;

/// Joins the files under `root` (or the file `root`) with headers.
pub(crate) fn joined(tree: &manifests_gen::tree::Tree, root: &str) -> String {
    let mut out = String::new();
    for (path, file) in &tree.files {
        if path == root || path.starts_with(&format!("{root}/")) {
            let mode = if file.executable { " (executable)" } else { "" };
            out.push_str(&format!("==== {path}{mode} ====\n"));
            out.push_str(&file.contents);
            if !file.contents.ends_with('\n') {
                out.push('\n');
            }
        }
    }
    out
}

#[test]
fn every_generated_file_of_every_overlay() {
    let spec = StackSpec::default();
    let tree = generate(&spec);
    let roots = owned_roots(&spec);
    let mut covered = 0;
    insta_settings().bind(|| {
        for root in &roots {
            let text = joined(&tree, root);
            covered += text.matches("\n==== ").count() + 1;
            let name = format!("overlay-{}", root.replace('.', "-"));
            insta::assert_snapshot!(name, text);
        }
    });
    assert_eq!(
        covered,
        tree.files.len(),
        "every generated file is in a snapshot"
    );
    let images = manifests_gen::generate_images(&spec);
    let text = images
        .files
        .keys()
        .map(|p| joined(&images, p))
        .collect::<String>();
    insta_settings().bind(|| insta::assert_snapshot!("images", text));
}

/// Changing one default shows up as a diff of exactly the files it feeds.
#[test]
fn changing_a_default_changes_the_files_that_use_it() {
    let before = StackSpec::default();
    let mut after = before.clone();
    after.worker_pools[0].concurrency = 8;
    let (old, new) = (generate(&before), generate(&after));
    let changed: Vec<&str> = new
        .files
        .iter()
        .filter(|(path, file)| old.files.get(*path) != Some(file))
        .map(|(path, _)| path.as_str())
        .collect();
    insta_settings().bind(|| insta::assert_yaml_snapshot!("concurrency-change-files", changed));
}
