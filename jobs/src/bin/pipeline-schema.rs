//! `pipeline-schema [--check]`: writes `jobs/pipeline.schema.json` from the
//! pipeline types (or, with `--check`, fails if the committed file differs).
//! Run from anywhere in the source tree: `cargo run --bin pipeline-schema`.

use std::path::Path;
use std::process::ExitCode;

use buildkube_jobs::schema::{check_schema_file, write_schema_file, PIPELINE_SCHEMA_PATH};

fn main() -> ExitCode {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let check = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--check") => true,
        Some(other) => {
            eprintln!(
                "pipeline-schema: unknown argument {other:?}; usage: pipeline-schema [--check]"
            );
            return ExitCode::from(2);
        }
    };
    let result = if check {
        check_schema_file(&root).map(|()| format!("{PIPELINE_SCHEMA_PATH} is up to date"))
    } else {
        write_schema_file(&root).map(|changed| {
            if changed {
                format!("wrote {PIPELINE_SCHEMA_PATH}")
            } else {
                format!("{PIPELINE_SCHEMA_PATH} was already up to date")
            }
        })
    };
    match result {
        Ok(message) => {
            eprintln!("{message}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pipeline-schema: {e}");
            ExitCode::FAILURE
        }
    }
}
