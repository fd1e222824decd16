//! The one definition of the paths a `Command` may name: its working
//! directory and its outputs. The server checks them before it queues an
//! action and the worker before it runs one, with the same rules:
//!
//! - relative (no leading `/`), no NUL byte;
//! - no `..` component, so no path can leave the working directory, even
//!   one that would come back (`sub/../x`) or only climb within the input
//!   root (`pkg` + `../other/a.o`): the REAPI asks for paths relative to
//!   the working directory, and what a worker does with `..` (through a
//!   symlink, say) is not what the client meant;
//! - no empty component (`a//b`, a trailing `/`); `.` components are
//!   ignored;
//! - an output file names a file, so not the working directory itself; an
//!   output directory or `output_paths` entry may be empty (the whole
//!   working directory).

use std::fmt;
use std::path::PathBuf;

use buildkube_proto::reapi::Command;

/// Why a path was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// It starts with `/`.
    #[error("is absolute; it must be relative to the working directory")]
    Absolute,
    /// It contains a NUL byte.
    #[error("contains a NUL byte")]
    Nul,
    /// It has an empty component.
    #[error("has an empty component (`//` or a trailing `/`)")]
    EmptyComponent,
    /// It has a `..` component.
    #[error("contains `..`; paths must stay below the working directory")]
    Parent,
    /// It names the working directory itself where a file is wanted.
    #[error("names the working directory itself, not a file")]
    NotAFile,
}

/// A `Command` field holding a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandPathField {
    /// `working_directory`.
    WorkingDirectory,
    /// `output_files`.
    OutputFiles,
    /// `output_directories`.
    OutputDirectories,
    /// `output_paths`.
    OutputPaths,
}

impl fmt::Display for CommandPathField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CommandPathField::WorkingDirectory => "command.working_directory",
            CommandPathField::OutputFiles => "command.output_files",
            CommandPathField::OutputDirectories => "command.output_directories",
            CommandPathField::OutputPaths => "command.output_paths",
        })
    }
}

/// A rejected path of a `Command`, naming the field and the path (at most
/// 200 bytes of it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {}: {error}", shown(.path))]
pub struct CommandPathError {
    /// The field.
    pub field: CommandPathField,
    /// The path as given.
    pub path: String,
    /// What is wrong with it.
    pub error: PathError,
}

fn shown(path: &str) -> String {
    const MAX: usize = 200;
    if path.len() <= MAX {
        return format!("{path:?}");
    }
    let mut end = MAX;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &path[..end], path.len())
}

/// Parses a path relative to the working directory (or, for the working
/// directory, to the input root) into its components, `.` dropped; empty
/// for the directory itself.
pub fn relative_path(path: &str) -> Result<PathBuf, PathError> {
    if path.starts_with('/') {
        return Err(PathError::Absolute);
    }
    if path.contains('\0') {
        return Err(PathError::Nul);
    }
    let mut relative = PathBuf::new();
    if path.is_empty() {
        return Ok(relative);
    }
    for part in path.split('/') {
        match part {
            "" => return Err(PathError::EmptyComponent),
            "." => {}
            ".." => return Err(PathError::Parent),
            part => relative.push(part),
        }
    }
    Ok(relative)
}

/// One path of a command, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandPath {
    /// The field it came from.
    pub field: CommandPathField,
    /// The path as given.
    pub path: String,
    /// Its components (see [`relative_path`]).
    pub relative: PathBuf,
}

/// Checks every path of `command`: the working directory and all three
/// output fields (including the legacy ones a v2.1 client may send
/// alongside `output_paths`). Returns the output paths the worker
/// collects: `output_paths` when set, else `output_files` then
/// `output_directories`.
pub fn command_outputs(command: &Command) -> Result<Vec<CommandPath>, CommandPathError> {
    let check = |field: CommandPathField, path: &String| {
        let error = |error| CommandPathError {
            field,
            path: path.clone(),
            error,
        };
        let relative = relative_path(path).map_err(error)?;
        if field == CommandPathField::OutputFiles && relative.as_os_str().is_empty() {
            return Err(error(PathError::NotAFile));
        }
        Ok(CommandPath {
            field,
            path: path.clone(),
            relative,
        })
    };
    check(
        CommandPathField::WorkingDirectory,
        &command.working_directory,
    )?;
    #[allow(deprecated)]
    let (files, directories) = (&command.output_files, &command.output_directories);
    let files = files
        .iter()
        .map(|p| check(CommandPathField::OutputFiles, p))
        .collect::<Result<Vec<_>, _>>()?;
    let directories = directories
        .iter()
        .map(|p| check(CommandPathField::OutputDirectories, p))
        .collect::<Result<Vec<_>, _>>()?;
    let paths = command
        .output_paths
        .iter()
        .map(|p| check(CommandPathField::OutputPaths, p))
        .collect::<Result<Vec<_>, _>>()?;
    if !paths.is_empty() {
        return Ok(paths);
    }
    Ok(files.into_iter().chain(directories).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(working_directory: &str, output_paths: &[&str]) -> Command {
        Command {
            arguments: vec!["true".into()],
            working_directory: working_directory.into(),
            output_paths: output_paths.iter().map(|p| p.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn relative_paths_stay_below_their_directory() {
        assert_eq!(relative_path("out/a.o"), Ok(PathBuf::from("out/a.o")));
        assert_eq!(relative_path("./out/./a.o"), Ok(PathBuf::from("out/a.o")));
        assert_eq!(relative_path(""), Ok(PathBuf::new()));
        assert_eq!(relative_path("."), Ok(PathBuf::new()));
        assert_eq!(relative_path("/etc/passwd"), Err(PathError::Absolute));
        assert_eq!(relative_path("../other/a.o"), Err(PathError::Parent));
        assert_eq!(relative_path("sub/../x"), Err(PathError::Parent));
        assert_eq!(relative_path("a//b"), Err(PathError::EmptyComponent));
        assert_eq!(relative_path("a/"), Err(PathError::EmptyComponent));
        assert_eq!(relative_path("a\0b"), Err(PathError::Nul));
    }

    /// Issue 8, finding 11: the server accepted `pkg` + `../other/a.o` and
    /// `sub/../x`, which the worker rejected after the action was queued.
    #[test]
    fn outputs_that_climb_are_rejected_naming_the_field() {
        let error = command_outputs(&command("pkg", &["../other/a.o"])).unwrap_err();
        assert_eq!(error.field, CommandPathField::OutputPaths);
        assert_eq!(error.error, PathError::Parent);
        assert_eq!(
            error.to_string(),
            "command.output_paths \"../other/a.o\": contains `..`; paths must stay below the working directory"
        );
        let error = command_outputs(&command("", &["sub/../x"])).unwrap_err();
        assert_eq!(error.error, PathError::Parent);
        let error = command_outputs(&command("../up", &["x"])).unwrap_err();
        assert_eq!(error.field, CommandPathField::WorkingDirectory);
    }

    #[test]
    #[allow(deprecated)]
    fn legacy_fields_are_checked_and_used_without_output_paths() {
        let mut legacy = command("pkg", &[]);
        legacy.output_files = vec!["a.o".into()];
        legacy.output_directories = vec!["".into(), "gen".into()];
        let outputs = command_outputs(&legacy).unwrap();
        let fields: Vec<_> = outputs.iter().map(|o| (o.field, o.path.as_str())).collect();
        assert_eq!(
            fields,
            [
                (CommandPathField::OutputFiles, "a.o"),
                (CommandPathField::OutputDirectories, ""),
                (CommandPathField::OutputDirectories, "gen"),
            ]
        );
        legacy.output_files = vec![".".into()];
        let error = command_outputs(&legacy).unwrap_err();
        assert_eq!(error.error, PathError::NotAFile);
        // Checked even when output_paths wins.
        let mut both = command("", &["x"]);
        both.output_files = vec!["/abs".into()];
        assert_eq!(
            command_outputs(&both).unwrap_err().field,
            CommandPathField::OutputFiles
        );
    }

    #[test]
    fn long_paths_are_not_echoed_in_full() {
        let long = format!("../{}", "a".repeat(16 << 10));
        let message = command_outputs(&command("", &[&long]))
            .unwrap_err()
            .to_string();
        assert!(message.len() < 400, "{}", message.len());
        assert!(message.contains("16387 bytes"), "{message}");
    }
}
