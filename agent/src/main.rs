//! The `exoagent` binary: parse the command line, set up logging, dispatch into the library.

use clap::Parser;
use exoagent::cli::{Cli, Command};
use exoagent::platform::startup;
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let entered = startup::since_boot();
    let cli = Cli::parse();
    let agent = matches!(cli.command, Command::Run(_));
    if agent {
        startup::prefetch_own_executable();
    }
    // The shim's stderr is a service's log; the login banner prints its block and nothing else.
    if !matches!(cli.command, Command::Shim | Command::Motd(_)) {
        init_tracing(&cli);
    }
    if agent {
        // Seconds since boot: the process's start (fork, in clock ticks), `main` entered (after
        // the exec and the loader); what follows this line is the agent's own work.
        let secs = |at: Option<f64>| at.map_or_else(|| "?".to_owned(), |at| format!("{at:.3}"));
        tracing::info!(target: "exoagent::agent", process_started = %secs(startup::process_started()), main_entered = %secs(entered), "agent starting");
    }
    exoagent::cli::dispatch(cli)
}

/// Logs go to stderr (stdout stays clean for `--json` and the sandbox's console lines). Under
/// systemd no wall-clock time (journald adds its own), but the seconds since boot when the line
/// was written: journald stamps a line when it reads it, late when it is busy at boot, and the
/// boot clock is what the journal's monotonic stamps and the kernel's lines use.
fn init_tracing(cli: &Cli) {
    let quiet_by_default = matches!(
        cli.command,
        Command::Status(_)
            | Command::Logs(_)
            | Command::Validate(_)
            | Command::Down(_)
            | Command::Userdata(_)
            | Command::Install(_)
            | Command::Generate(_)
    );
    let default = match (cli.verbose, quiet_by_default) {
        (0, true) => "warn",
        (0, false) => "info",
        (1, _) => "debug",
        _ => "trace",
    };
    let filter = std::env::var("EXOAGENT_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .and_then(|spec| EnvFilter::try_new(spec).ok())
        .unwrap_or_else(|| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal, never into journals or log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(true);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.with_timer(startup::SinceBoot).init();
    } else {
        builder.init();
    }
}
