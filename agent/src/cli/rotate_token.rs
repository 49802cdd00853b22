//! `exoagent rotate-token`: replace the token of Exosphere's notebook link to JupyterLab. The
//! agent applies it when it starts: JupyterLab is restarted with the new token (its spec names
//! the token's digest) and the console gets the new `exoWorkflowToken` line, which Exosphere
//! prefers over the old one (the last line wins).

use std::path::Path;
use std::process::ExitCode;

use clap::Args;

use crate::paths::Paths;
use crate::platform::exec;
use crate::services::jupyterlab::link::LinkToken;

/// Arguments of `exoagent rotate-token`.
#[derive(Debug, Args)]
pub struct RotateTokenArgs {
    /// Only store the new token; apply it at the agent's next start.
    #[arg(long)]
    pub no_restart: bool,
}

/// Store a new token, then restart the agent's systemd unit (system mode) so it takes effect.
pub async fn run(args: RotateTokenArgs, paths: &Paths, system: bool) -> anyhow::Result<ExitCode> {
    let path = paths.jupyterlab_link_token();
    match LinkToken::load(&path) {
        Ok(Some(_)) => {}
        Ok(None) => {
            eprintln!(
                "exoagent: Exosphere's notebook link is off (no token at '{}'): it needs \
                 services.jupyterlab enabled on port 8888 with exosphere_link left on, and the \
                 agent started once",
                path.display()
            );
            return Ok(ExitCode::FAILURE);
        }
        // A damaged or unsafe file is replaced: that is what rotating is for.
        Err(e) => eprintln!("exoagent: replacing the current token file: {e}"),
    }
    LinkToken::rotate(&path)?;
    println!("a new token is stored in '{}'", path.display());
    let systemd = system && Path::new("/run/systemd/system").is_dir();
    if args.no_restart || !systemd {
        println!(
            "it takes effect when the agent next starts (JupyterLab then restarts with it; \
             running kernels stop)"
        );
        return Ok(ExitCode::SUCCESS);
    }
    let systemctl = Path::new("systemctl");
    let argv = ["try-restart", "exoagent.service"];
    let finished = exec::run(systemctl, &argv, &[], None).await?;
    if !finished.status.success() {
        eprintln!(
            "exoagent: '{}' failed ({}): {}; the token applies at the agent's next start",
            exec::shown(systemctl, &argv),
            finished.status,
            finished.tail(3)
        );
        return Ok(ExitCode::FAILURE);
    }
    println!(
        "the agent was restarted: JupyterLab restarts with the new token (running kernels \
         stop) and the console gets the new exoWorkflowToken line"
    );
    Ok(ExitCode::SUCCESS)
}
