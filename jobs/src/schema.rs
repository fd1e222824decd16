//! The JSON schema of `.buildkube/pipeline.yaml`, generated from the Rust
//! types so the two cannot drift, committed as `jobs/pipeline.schema.json`
//! for editors (YAML language servers read JSON schema draft 7).
//!
//! Regenerate after changing the pipeline types:
//! `cargo run --bin pipeline-schema` (`-- --check` only compares); the test
//! `schema::tests::pipeline_schema_file_is_up_to_date` fails while the
//! committed file is stale.

use std::path::{Path, PathBuf};

use schemars::generate::SchemaSettings;

use crate::pipeline::Pipeline;

/// The committed schema, relative to the workspace root.
pub const PIPELINE_SCHEMA_PATH: &str = "jobs/pipeline.schema.json";

/// The command that rewrites [`PIPELINE_SCHEMA_PATH`].
pub const REGENERATE_COMMAND: &str = "cargo run --bin pipeline-schema";

/// The schema of a pipeline file as pretty JSON, ending in a newline.
pub fn pipeline_schema_json() -> String {
    let schema = SchemaSettings::draft07()
        .into_generator()
        .into_root_schema_for::<Pipeline>();
    let mut json = serde_json::to_string_pretty(&schema).expect("a schema serializes");
    json.push('\n');
    json
}

/// Why the committed schema could not be checked or written.
#[derive(Debug, thiserror::Error)]
pub enum SchemaFileError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The schema file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The file differs from what the types generate.
    #[error("{path} is stale: run `{REGENERATE_COMMAND}`\n{diff}")]
    Stale {
        /// The schema file.
        path: PathBuf,
        /// A unified diff from the file to the generated schema.
        diff: String,
    },
}

/// The schema file under `workspace_root`.
pub fn schema_file(workspace_root: &Path) -> PathBuf {
    workspace_root.join(PIPELINE_SCHEMA_PATH)
}

/// Compares the committed schema with the generated one.
pub fn check_schema_file(workspace_root: &Path) -> Result<(), SchemaFileError> {
    let path = schema_file(workspace_root);
    let generated = pipeline_schema_json();
    let committed = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => return Err(SchemaFileError::Io { path, source }),
    };
    if committed == generated {
        return Ok(());
    }
    let diff = similar::TextDiff::from_lines(&committed, &generated)
        .unified_diff()
        .header(PIPELINE_SCHEMA_PATH, "generated")
        .to_string();
    Err(SchemaFileError::Stale { path, diff })
}

/// Writes the generated schema; returns whether the file changed.
pub fn write_schema_file(workspace_root: &Path) -> Result<bool, SchemaFileError> {
    let path = schema_file(workspace_root);
    let generated = pipeline_schema_json();
    if std::fs::read_to_string(&path).is_ok_and(|text| text == generated) {
        return Ok(false);
    }
    std::fs::write(&path, generated).map_err(|source| SchemaFileError::Io { path, source })?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workspace_root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    #[test]
    fn pipeline_schema_file_is_up_to_date() {
        if let Err(e) = check_schema_file(&workspace_root()) {
            panic!("{e}");
        }
    }

    #[test]
    fn pipeline_schema_check_fails_on_a_stale_file_and_write_fixes_it() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("jobs")).unwrap();
        let error = check_schema_file(root.path()).unwrap_err();
        assert!(error.to_string().contains(REGENERATE_COMMAND), "{error}");
        assert!(write_schema_file(root.path()).unwrap());
        assert!(!write_schema_file(root.path()).unwrap());
        check_schema_file(root.path()).unwrap();
        let path = schema_file(root.path());
        let edited = std::fs::read_to_string(&path)
            .unwrap()
            .replace("\"maxItems\": 100", "\"maxItems\": 99");
        std::fs::write(&path, edited).unwrap();
        let SchemaFileError::Stale { diff, .. } = check_schema_file(root.path()).unwrap_err()
        else {
            panic!("not stale")
        };
        assert!(
            diff.contains("-      \"maxItems\": 99") && diff.contains("+      \"maxItems\": 100"),
            "{diff}"
        );
    }

    /// The schema states what the parser enforces, so an editor flags the
    /// same mistakes: required fields, closed objects, the bounds.
    #[test]
    fn pipeline_schema_states_required_fields_and_bounds() {
        let schema: serde_json::Value = serde_json::from_str(&pipeline_schema_json()).unwrap();
        assert_eq!(schema["$schema"], "http://json-schema.org/draft-07/schema#");
        assert_eq!(schema["additionalProperties"], false);
        assert_eq!(schema["required"], serde_json::json!(["steps"]));
        assert_eq!(schema["properties"]["steps"]["maxItems"], 100);
        assert_eq!(schema["properties"]["steps"]["minItems"], 1);
        let step = &schema["definitions"]["Step"];
        assert_eq!(step["additionalProperties"], false);
        assert_eq!(step["required"], serde_json::json!(["key", "commands"]));
        assert_eq!(step["properties"]["timeout_secs"]["maximum"], 86400);
        assert_eq!(step["properties"]["timeout_secs"]["minimum"], 1);
        assert_eq!(step["properties"]["timeout_secs"]["default"], 3600);
        assert_eq!(step["properties"]["commands"]["maxItems"], 64);
        assert_eq!(step["properties"]["env"]["maxProperties"], 64);
        let key = &schema["definitions"]["StepKey"];
        assert_eq!(key["maxLength"], 64);
        let exit_codes = &schema["definitions"]["ExitCodeRetry"];
        assert_eq!(
            exit_codes["required"],
            serde_json::json!(["codes", "limit"])
        );
        assert_eq!(schema["definitions"]["ExitCode"]["minimum"], 1);
        assert_eq!(schema["definitions"]["ExitCode"]["maximum"], 255);
    }
}
