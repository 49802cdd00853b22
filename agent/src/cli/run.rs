//! `exoagent run`: the agent's main job, until SIGTERM or SIGINT.

use std::process::ExitCode;

use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::agent::{self, AgentOptions, Mode};
use crate::api::ApiError;
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
    // Signals first: everything after, configuration reading included, must be stoppable.
    let cancel = stop_on_signal()?;
    run_agent_until(mode, paths, cancel).await
}

/// A token cancelled on SIGTERM or SIGINT; set up before any other work so `systemctl stop`
/// and `timeout` are answered at every moment.
pub fn stop_on_signal() -> std::io::Result<CancellationToken> {
    let cancel = CancellationToken::new();
    spawn_signal_handler(cancel.clone())?;
    Ok(cancel)
}

/// Run the agent until `cancel` fires; map its error to an exit code and last words.
pub async fn run_agent_until(
    mode: Mode,
    paths: crate::paths::Paths,
    cancel: CancellationToken,
) -> anyhow::Result<ExitCode> {
    let shim = ShimCommand {
        exe: std::env::current_exe()?,
    };
    let sink = sink(&mode);
    let hangup = reload_on_hangup()?;
    match agent::run(
        AgentOptions {
            mode,
            paths,
            shim,
            hangup,
        },
        cancel,
    )
    .await
    {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => Ok(fail(&sink, &e)),
    }
}

/// Where the last words go before the configuration (and its console devices) is known.
pub(crate) fn sink(mode: &Mode) -> ConsoleSink {
    match mode {
        Mode::System => ConsoleSink::Devices(ConsoleSettings::default().devices),
        Mode::Sandbox => ConsoleSink::Stdout,
    }
}

/// Report a failure that ends the agent and give its exit status.
pub(crate) fn fail(sink: &ConsoleSink, error: &agent::AgentError) -> ExitCode {
    eprintln!("exoagent: {error}");
    // A second agent beside a running one must stay off the console: Exosphere takes the last
    // status line, so its error would hide the running agent's state until the next re-emit.
    if !matches!(error, agent::AgentError::Api(ApiError::InUse { .. })) {
        report_startup_failure(sink, error);
    }
    ExitCode::from(error.exit_code())
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

/// Notified on each SIGHUP (whose default action would end the agent): read the
/// configuration again.
fn reload_on_hangup() -> std::io::Result<std::sync::Arc<tokio::sync::Notify>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = signal(SignalKind::hangup())?;
    let notify = std::sync::Arc::new(tokio::sync::Notify::new());
    let notified = notify.clone();
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            notified.notify_one();
        }
    });
    Ok(notify)
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
