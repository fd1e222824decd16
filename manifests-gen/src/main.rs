//! `manifests-gen [--config FILE] [--out DIR] [--check]` writes (or checks)
//! `overlays/` and `images/`; `manifests-gen schema` prints the spec's JSON
//! Schema; `manifests-gen spec` prints the spec in effect.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use manifests_gen::{outputs, StackSpec, REGENERATE};

#[derive(Parser)]
#[command(
    name = "manifests-gen",
    about = "Generates buildkube's kustomize tree and image build from a typed stack spec"
)]
struct Cli {
    /// YAML stack spec; the built-in default stack when unset.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Directory receiving overlays/ and images/ (default: the workspace root).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write nothing; exit 1 with a diff if the output is stale.
    #[arg(long)]
    check: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print the JSON Schema of the stack spec.
    Schema,
    /// Print the stack spec in effect (the default, or --config) as YAML.
    Spec,
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(error) => {
            eprintln!("manifests-gen: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let spec = match &cli.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            StackSpec::from_yaml(&path.display().to_string(), &text)?
        }
        None => {
            let spec = StackSpec::default();
            spec.validate().context("the built-in stack spec")?;
            spec
        }
    };
    match cli.command {
        Some(Command::Schema) => {
            let schema = schemars::schema_for!(StackSpec);
            println!("{}", serde_json::to_string_pretty(&schema)?);
            return Ok(ExitCode::SUCCESS);
        }
        Some(Command::Spec) => {
            print!("{}", serde_yaml::to_string(&spec)?);
            return Ok(ExitCode::SUCCESS);
        }
        None => {}
    }
    let root = cli
        .out
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."));
    let mut stale = 0;
    for output in outputs(&spec) {
        let dir = root.join(output.dir);
        if cli.check {
            let staleness = output.tree.check(&dir, &output.roots)?;
            print!("{}", staleness.report);
            stale += staleness.paths.len();
        } else {
            let changed = output.tree.write(&dir, &output.roots)?;
            eprintln!(
                "manifests-gen: wrote {}/ ({} files, {} changed)",
                output.dir,
                output.tree.files.len(),
                changed.len()
            );
        }
    }
    if stale > 0 {
        eprintln!(
            "manifests-gen: {stale} generated files are stale; regenerate with `{REGENERATE}{}` and commit",
            cli.config.map(|c| format!(" -- --config {}", c.display())).unwrap_or_default()
        );
        return Ok(ExitCode::FAILURE);
    }
    if cli.check {
        eprintln!("manifests-gen: overlays/ and images/ are up to date");
    }
    Ok(ExitCode::SUCCESS)
}
