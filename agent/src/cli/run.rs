//! `exoagent run`: the agent's main job, until SIGTERM or SIGINT.

use std::process::ExitCode;

use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::agent::{self, AgentOptions, Mode};
use crate::config::settings::ConsoleSettings;
use crate::report::console::{self, ConsoleSink};
use crate::state::{now_ms, Reason, SetupState, SetupStatus};
use crate::supervise::ShimCommand;

pub use crate::agent::{EXIT_CONFIG, EXIT_NOPERM};

/// Arguments of `exoagent run`.
#[derive(Debug, Args)]
pub struct RunArgs {}

/// Run until a signal; map errors to exit codes.
pub async fn run(
    _args: RunArgs,
    mode: Mode,
    paths: crate::paths::Paths,
) -> anyhow::Result<ExitCode> {
    run_agent(mode, paths).await
}

/// Run the agent with the given layout until SIGTERM/SIGINT.
pub async fn run_agent(mode: Mode, paths: crate::paths::Paths) -> anyhow::Result<ExitCode> {
    let shim = ShimCommand {
        exe: std::env::current_exe()?,
    };
    let cancel = CancellationToken::new();
    spawn_signal_handler(cancel.clone())?;
    let sink = match mode {
        Mode::System => ConsoleSink::Devices(ConsoleSettings::default().devices),
        Mode::Sandbox => ConsoleSink::Stdout,
    };
    match agent::run(AgentOptions { mode, paths, shim }, cancel).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("exoagent: {e}");
            report_startup_failure(&sink, &e);
            Ok(ExitCode::from(e.exit_code()))
        }
    }
}

/// Tell Exosphere through the console that setup cannot even start, so the instance shows Error
/// with the reason instead of waiting for a timeout.
fn report_startup_failure(sink: &ConsoleSink, error: &agent::AgentError) {
    let setup = SetupStatus {
        state: SetupState::Error,
        since_ms: now_ms(),
        step: Some(error.failed_step().as_str().to_owned()),
        reason: Some(Reason::new(error.reason(), error.to_string())),
    };
    console::write_now(sink, &console::status_line(&setup, setup.since_ms));
}

fn spawn_signal_handler(cancel: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        cancel.cancel();
    });
    Ok(())
}
