//! `exoagent logs <service>`: the tail of a service's log, through the status API.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use clap::Args;

use crate::api::client::{ApiClient, ClientError};
use crate::cli::status::{EXIT_ERROR, EXIT_UNREACHABLE};

/// Arguments of `exoagent logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The service, e.g. jupyterlab.
    #[arg(value_parser = crate::cli::ServiceNameParser)]
    pub service: String,
    /// How many lines from the end (1 to 10000).
    #[arg(short = 'n', long, default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub lines: u64,
}

/// Print the log tail; 0 on success, 1 when the API refuses, 4 when the agent is unreachable.
pub async fn run(args: LogsArgs, socket: &Path) -> anyhow::Result<ExitCode> {
    match ApiClient::new(socket)
        .logs(&args.service, args.lines as usize)
        .await
    {
        Ok(text) => {
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())?;
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
        Err(e @ ClientError::Unreachable { .. }) => {
            eprintln!("exoagent: {e}");
            Ok(ExitCode::from(EXIT_UNREACHABLE))
        }
        Err(e) => {
            eprintln!("exoagent: {e}");
            Ok(ExitCode::from(EXIT_ERROR))
        }
    }
}
