//! The `exoagent` binary: parse the command line, set up logging, dispatch into the library.

use clap::Parser;
use exoagent::cli::{Cli, Command};
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The shim's stderr is a service's log; the login banner prints its block and nothing else.
    if !matches!(cli.command, Command::Shim | Command::Motd(_)) {
        init_tracing(&cli);
    }
    exoagent::cli::dispatch(cli)
}

/// Logs go to stderr (stdout stays clean for `--json` and the sandbox's console lines); no
/// timestamps under systemd, where journald adds its own.
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
        builder.without_time().init();
    } else {
        builder.init();
    }
}
