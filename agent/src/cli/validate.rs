//! `exoagent validate`: load and check everything, print the plan or every error; change nothing.

use std::process::ExitCode;

use clap::Args;

use crate::agent::{self, AgentError, Mode};
use crate::paths::Paths;

/// Arguments of `exoagent validate`.
#[derive(Debug, Args)]
pub struct ValidateArgs {}

/// Print the plan (exit 0) or every error and an example configuration (exit 1).
pub async fn run(_args: ValidateArgs, mode: Mode, paths: Paths) -> anyhow::Result<ExitCode> {
    match agent::plan(mode, paths) {
        Ok(plan) => {
            print!("{plan}");
            Ok(ExitCode::SUCCESS)
        }
        Err(AgentError::Config(errors)) => {
            print_invalid(&errors);
            eprintln!("\nA complete example configuration with every key at its default:\n");
            eprintln!("{}", crate::config::EXAMPLE_CONFIG);
            Ok(ExitCode::FAILURE)
        }
        Err(other) => {
            eprintln!("exoagent: {other}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Every configuration error on stderr, one a line, under what it means.
pub(crate) fn print_invalid(errors: &crate::config::ConfigErrors) {
    eprintln!("exoagent: the configuration is invalid; nothing was changed:");
    for error in &errors.errors {
        eprintln!("  {error}");
    }
    if let Some(line) = errors.omitted_line() {
        eprintln!("  {line}");
    }
}
