//! `exoagent generate` (hidden): the man pages and shell completions, generated from this
//! command line's own clap definitions so they cannot drift from it. The packages ship them
//! (installer/package/build.sh); no build.rs, so a plain `cargo build` stays as it is.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, CommandFactory, Subcommand};
use clap_complete::Shell;

use crate::cli::Cli;
use crate::fsutil;

/// The name the pages and completions are for.
const BIN: &str = "exoagent";

/// Arguments of `exoagent generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// What to generate.
    #[command(subcommand)]
    pub what: Generate,
}

/// What `exoagent generate` makes.
#[derive(Debug, Subcommand)]
pub enum Generate {
    /// Man pages: exoagent.1 and exoagent-<subcommand>.1 for every visible subcommand.
    Man {
        /// Write the pages into this directory (created if missing); default: exoagent.1 on
        /// stdout.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// A shell's completion script.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: Shell,
        /// Write the script into this directory under the name the shell looks for (bash
        /// `exoagent`, zsh `_exoagent`, fish `exoagent.fish`); default: stdout.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

/// Why generating failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// Writing a file, a directory or stdout failed.
    #[error("failed to write '{path}': {source}")]
    Write {
        /// The path (`-` for stdout).
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

impl GenerateError {
    /// Short stable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Write { .. } => "generate-write-failed",
        }
    }
}

/// The file name a shell's completion loader looks for: clap_complete's own, except bash's
/// (bash-completion loads a command's completion from a file named like the command, not
/// `exoagent.bash`).
pub fn completion_file_name(shell: Shell) -> String {
    match shell {
        Shell::Bash => BIN.to_owned(),
        _ => clap_complete::Generator::file_name(&shell, BIN),
    }
}

/// The command line without its internal subcommands: clap_complete offers hidden subcommands
/// too, and `exoagent shim` or `front` typed by hand would only wait for a spec on stdin.
fn without_internal_subcommands(cmd: clap::Command) -> clap::Command {
    // Static strings: clap is built without its `string` feature.
    let mut visible = clap::Command::new(BIN).version(env!("CARGO_PKG_VERSION"));
    if let Some(about) = cmd.get_about() {
        visible = visible.about(about.clone());
    }
    for arg in cmd.get_arguments() {
        visible = visible.arg(arg.clone());
    }
    visible.subcommands(cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned())
}

/// The completion script for `shell`.
pub fn completions(shell: Shell) -> Vec<u8> {
    let mut cmd = without_internal_subcommands(Cli::command());
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, BIN, &mut script);
    script
}

/// Every man page, as (file name, roff text): the top command's and each visible
/// subcommand's, named as `man exoagent-logs` finds them.
pub fn man_pages() -> Result<Vec<(String, Vec<u8>)>, GenerateError> {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    // Building names each subcommand `exoagent-<sub>` (its display name), as the pages need.
    cmd.build();
    let mut pages = Vec::new();
    let mut render = |cmd: clap::Command| -> Result<(), GenerateError> {
        let man = clap_mangen::Man::new(cmd);
        let name = man.get_filename();
        let mut text = Vec::new();
        man.render(&mut text)
            .map_err(|source| GenerateError::Write {
                path: PathBuf::from(&name),
                source,
            })?;
        pages.push((name, text));
        Ok(())
    };
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        render(sub.clone())?;
    }
    render(cmd)?;
    pages.sort();
    Ok(pages)
}

fn write_into(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf, GenerateError> {
    let wrote = |path: &Path| {
        let path = path.to_path_buf();
        move |source| GenerateError::Write { path, source }
    };
    // Not `fsutil::ensure_dir`: an existing directory such as `--out .` keeps its mode.
    std::fs::create_dir_all(dir).map_err(wrote(dir))?;
    let path = dir.join(name);
    fsutil::write_atomic(&path, bytes, 0o644, None).map_err(wrote(&path))?;
    Ok(path)
}

fn to_stdout(bytes: &[u8]) -> Result<(), GenerateError> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|source| GenerateError::Write {
            path: PathBuf::from("-"),
            source,
        })
}

/// Generate and write; with `--out`, list the files written.
pub fn generate(what: Generate) -> Result<Vec<PathBuf>, GenerateError> {
    match what {
        Generate::Man { out: None } => {
            let pages = man_pages()?;
            let top = format!("{BIN}.1");
            let (_, text) = pages
                .iter()
                .find(|(name, _)| *name == top)
                .expect("the top page is always rendered");
            to_stdout(text)?;
            Ok(Vec::new())
        }
        Generate::Man { out: Some(dir) } => man_pages()?
            .into_iter()
            .map(|(name, text)| write_into(&dir, &name, &text))
            .collect(),
        Generate::Completions { shell, out: None } => {
            to_stdout(&completions(shell))?;
            Ok(Vec::new())
        }
        Generate::Completions {
            shell,
            out: Some(dir),
        } => Ok(vec![write_into(
            &dir,
            &completion_file_name(shell),
            &completions(shell),
        )?]),
    }
}

/// Run `exoagent generate`: 0, or 1 naming what could not be written.
pub async fn run(args: GenerateArgs) -> anyhow::Result<ExitCode> {
    match generate(args.what) {
        Ok(written) => {
            for path in written {
                println!("{}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("exoagent generate: {e} ({})", e.reason());
            Ok(ExitCode::FAILURE)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_for_the_command_and_each_visible_subcommand_only() {
        let pages = man_pages().unwrap();
        let names: Vec<String> = pages.iter().map(|(n, _)| n.clone()).collect();
        for name in ["exoagent.1", "exoagent-run.1", "exoagent-logs.1"] {
            assert!(names.contains(&name.to_owned()), "{names:?}");
        }
        for hidden in [
            "shim",
            "front",
            "generate",
            "guacamole-web",
            "desktop-session",
        ] {
            assert!(
                !names.contains(&format!("exoagent-{hidden}.1")),
                "internal subcommand '{hidden}' has no page: {names:?}"
            );
        }
        let (_, text) = pages.iter().find(|(n, _)| n == "exoagent.1").unwrap();
        let text = String::from_utf8_lossy(text);
        assert!(text.contains("exoagent\\-logs(1)"), "{text}");
    }

    #[test]
    fn completions_are_written_under_the_names_shells_look_for() {
        let dir = tempfile::tempdir().unwrap();
        for (shell, name) in [
            (Shell::Bash, "exoagent"),
            (Shell::Zsh, "_exoagent"),
            (Shell::Fish, "exoagent.fish"),
        ] {
            let written = generate(Generate::Completions {
                shell,
                out: Some(dir.path().to_path_buf()),
            })
            .unwrap();
            assert_eq!(written, vec![dir.path().join(name)]);
            let text = std::fs::read_to_string(&written[0]).unwrap();
            assert!(text.contains("jupyterlab"), "{shell}: services offered");
            for internal in ["shim", "desktop-session", "guacamole-web", "generate"] {
                assert!(!text.contains(internal), "{shell} offers '{internal}'");
            }
        }
    }
}
