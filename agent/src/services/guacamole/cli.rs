//! `exoagent guacamole-web`: the Guacamole web side as its own supervised process (run by the
//! guacamole service as the instance user): token API, client page and tunnel to guacd.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::web::{serve, WebState};
use super::web_config::WebConfig;

/// Arguments of `exoagent guacamole-web`.
#[derive(Debug, Args)]
pub struct GuacamoleWebArgs {
    /// The web side's configuration (JSON, written by the agent).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

/// Serve until SIGTERM or SIGINT. Exit 78 on a bad configuration (restarting cannot help).
pub async fn run(args: GuacamoleWebArgs) -> anyhow::Result<ExitCode> {
    let loaded = WebConfig::load(&args.config).and_then(|c| c.password().map(|p| (c, p)));
    let (config, password) = match loaded {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("exoagent guacamole-web: {e} [{}]", e.reason());
            return Ok(ExitCode::from(78));
        }
    };
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!(
                "exoagent guacamole-web: failed to listen on {}: {e}",
                config.listen
            );
            return Ok(ExitCode::from(71));
        }
    };
    tracing::info!(listen = %config.listen, guacd = %config.guacd, "guacamole web side serving");
    let shutdown = crate::platform::signals::stop_requested()?;
    serve(listener, WebState::new(config, password), shutdown).await?;
    Ok(ExitCode::SUCCESS)
}
