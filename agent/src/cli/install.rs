//! `exoagent install`: the systemd unit, tmpfiles entry and configuration directory, into `/`
//! or an image root.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::delivery::install::install;

/// Arguments of `exoagent install`.
#[derive(Debug, Args)]
pub struct InstallArgs {
    /// The root to install into (an image's root when baking).
    #[arg(long, default_value = "/")]
    pub root: PathBuf,
    /// The binary's path as seen from inside that root (default: this binary).
    #[arg(long, value_name = "PATH")]
    pub exec: Option<PathBuf>,
    /// Also enable the unit (a link in multi-user.target.wants; no running systemd needed).
    #[arg(long)]
    pub enable: bool,
}

/// Install and list what was written.
pub async fn run(args: InstallArgs) -> anyhow::Result<ExitCode> {
    let exec = match args.exec {
        Some(path) => path,
        None => std::env::current_exe()?.canonicalize()?,
    };
    match install(&args.root, &exec, args.enable) {
        Ok(written) => {
            for path in written {
                println!("{}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("exoagent install: {e}");
            Ok(ExitCode::from(e.exit_code()))
        }
    }
}
