//! `manifests-gen [--config FILE] [--out DIR] [--check]` writes (or checks)
//! the kustomize tree; `manifests-gen schema` prints the spec's JSON Schema.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use manifests_gen::{generate, owned_roots, StackSpec, REGENERATE};

#[derive(Parser)]
#[command(name = "manifests-gen", about = "Generates buildkube's kustomize tree from a typed stack spec")]
struct Cli {
    /// YAML stack spec; the built-in default stack when unset.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Output directory (default: overlays/ at the workspace root).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write nothing; exit 1 with a diff if the output directory is stale.
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
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
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
    let out = cli
        .out
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../overlays"));
    let tree = generate(&spec);
    let roots = owned_roots(&spec);
    if cli.check {
        let staleness = tree.check(&out, &roots)?;
        if staleness.is_fresh() {
            eprintln!("manifests-gen: {} is up to date ({} files)", out.display(), tree.files.len());
            return Ok(ExitCode::SUCCESS);
        }
        print!("{}", staleness.report);
        eprintln!(
            "manifests-gen: {} is stale ({} files differ); regenerate with `{REGENERATE}`{}",
            out.display(),
            staleness.paths.len(),
            cli.config.map(|c| format!(" -- --config {}", c.display())).unwrap_or_default()
        );
        return Ok(ExitCode::FAILURE);
    }
    let changed = tree.write(&out, &roots)?;
    eprintln!("manifests-gen: wrote {} ({} files, {} changed)", out.display(), tree.files.len(), changed.len());
    Ok(ExitCode::SUCCESS)
}
