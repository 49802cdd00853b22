//! The command line: one file per subcommand, each a thin call into the library.

pub mod bake;
pub mod down;
pub mod generate;
pub mod install;
pub mod logs;
pub mod motd;
pub mod reload;
pub mod rotate_token;
pub mod run;
pub mod sandbox;
pub mod shim;
pub mod status;
pub mod userdata;
pub mod validate;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::model::ServiceKind;
use crate::paths::Paths;

/// exoagent: installs, supervises and reports a research instance's services.
#[derive(Debug, Parser)]
#[command(name = "exoagent", version, about, long_about = None)]
pub struct Cli {
    /// More log output on stderr (-v debug, -vv trace); EXOAGENT_LOG or RUST_LOG override.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Operate on the sandbox in this directory instead of the system layout.
    #[arg(long, global = true, env = "EXOAGENT_SANDBOX", value_name = "DIR")]
    pub sandbox_dir: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: validate, provision, supervise and report (the systemd unit's job).
    Run(run::RunArgs),
    /// Run the agent in a sandbox directory: no root, no cloud, services on loopback.
    Sandbox(sandbox::SandboxArgs),
    /// Check the configuration and print the plan, or every error; changes nothing.
    Validate(validate::ValidateArgs),
    /// Show setup and service status.
    Status(status::StatusArgs),
    /// Show a service's log.
    Logs(logs::LogsArgs),
    /// Print the login banner: setup state, services, what failed (run by the login hooks).
    Motd(motd::MotdArgs),
    /// Stop every service the agent started (they otherwise outlive the agent).
    Down(down::DownArgs),
    /// Check the configuration and have the running agent apply it (after editing
    /// /etc/exoagent): added services start, removed ones stop, changed ones restart.
    Reload(reload::ReloadArgs),
    /// Turn a service on (written to a drop-in of its own) and have the agent apply it.
    Enable(reload::EnableArgs),
    /// Turn a service off (written to a drop-in of its own) and have the agent apply it.
    Disable(reload::EnableArgs),
    /// Replace the token of Exosphere's notebook link to JupyterLab (restarts JupyterLab).
    RotateToken(rotate_token::RotateTokenArgs),
    /// Print cloud-init userdata that delivers and configures exoagent.
    Userdata(userdata::UserdataArgs),
    /// Install the systemd unit and directories into / or an image root.
    Install(install::InstallArgs),
    /// Pre-install service payloads into an image (no secrets, no instance state).
    Bake(bake::BakeArgs),
    /// Internal: the VNC server and desktop session pair (run by the desktop service).
    #[command(hide = true)]
    DesktopSession(crate::services::desktop::cli::DesktopSessionArgs),
    /// Internal: the Guacamole web side (run by the guacamole service).
    #[command(hide = true)]
    GuacamoleWeb(crate::services::guacamole::cli::GuacamoleWebArgs),
    /// Internal: the upstream TLS front of one service (run by the agent; see docs/uap.md).
    #[command(hide = true)]
    Front(crate::front::cli::FrontArgs),
    /// Internal: the per-service process shim.
    #[command(hide = true)]
    Shim,
    /// Internal: man pages and shell completions from these definitions (for packaging).
    #[command(hide = true)]
    Generate(generate::GenerateArgs),
}

/// Service names as arguments: parsed by `ServiceKind`'s own `FromStr` (whose error names the
/// known services) and offered as possible values, so `--help` and the shell completions list
/// them.
#[derive(Debug, Clone, Copy)]
pub struct ServiceParser;

/// A service name passed on as written (the agent judges it: `exoagent logs` exits 1 for an
/// unknown one, per docs/contracts.md), with the known names offered like [`ServiceParser`].
#[derive(Debug, Clone, Copy)]
pub struct ServiceNameParser;

impl clap::builder::TypedValueParser for ServiceNameParser {
    type Value = String;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<String, clap::Error> {
        clap::builder::StringValueParser::new().parse_ref(cmd, arg, value)
    }

    fn possible_values(
        &self,
    ) -> Option<Box<dyn Iterator<Item = clap::builder::PossibleValue> + '_>> {
        ServiceParser.possible_values()
    }
}

impl clap::builder::TypedValueParser for ServiceParser {
    type Value = ServiceKind;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<ServiceKind, clap::Error> {
        let text = value.to_string_lossy();
        text.parse().map_err(|e: crate::model::UnknownService| {
            clap::Error::raw(clap::error::ErrorKind::InvalidValue, format!("{e}\n")).with_cmd(cmd)
        })
    }

    fn possible_values(
        &self,
    ) -> Option<Box<dyn Iterator<Item = clap::builder::PossibleValue> + '_>> {
        Some(Box::new(ServiceKind::ALL.into_iter().map(|kind| {
            clap::builder::PossibleValue::new(kind.as_str())
        })))
    }
}

impl Cli {
    /// System or sandbox, as `--sandbox-dir` says.
    pub fn mode(&self) -> crate::agent::Mode {
        match self.sandbox_dir {
            Some(_) => crate::agent::Mode::Sandbox,
            None => crate::agent::Mode::System,
        }
    }

    /// The layout the command operates on.
    pub fn paths(&self) -> Paths {
        match &self.sandbox_dir {
            Some(dir) => Paths::sandbox(&crate::paths::absolute(dir)),
            None => Paths::system(),
        }
    }
}

/// Dispatch a parsed command line.
pub fn dispatch(cli: Cli) -> ExitCode {
    // These confine themselves before any thread starts, so they build their own runtime.
    let cli = match cli.command {
        Command::Shim => return shim::run(),
        Command::GuacamoleWeb(args) => return crate::services::guacamole::cli::run(args),
        Command::Front(args) => return crate::front::cli::run(args),
        _ => cli,
    };
    let mut builder = match cli.command {
        // The login banner asks once: no worker threads to start on a login's clock.
        Command::Motd(_) => tokio::runtime::Builder::new_current_thread(),
        _ => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(2);
            b
        }
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("exoagent: failed to start the async runtime: {e}");
            return ExitCode::from(70);
        }
    };
    let paths = cli.paths();
    let mode = cli.mode();
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => run::run(args, mode, paths).await,
            Command::Sandbox(args) => sandbox::run(args).await,
            Command::Validate(args) => validate::run(args, mode, paths).await,
            Command::Status(args) => {
                // On an instance, a waiter that cannot reach the agent also asks systemd.
                let systemd = mode == crate::agent::Mode::System
                    && std::path::Path::new("/run/systemd/system").is_dir();
                let systemctl = systemd.then(|| std::path::Path::new("systemctl"));
                status::run_with(args, &paths.api_socket(), systemctl).await
            }
            Command::Logs(args) => logs::run(args, &paths.api_socket()).await,
            Command::Motd(args) => motd::run(args, &paths.api_socket()).await,
            Command::RotateToken(args) => {
                rotate_token::run(args, &paths, mode == crate::agent::Mode::System).await
            }
            Command::Down(args) => down::run(args, &paths).await,
            Command::Reload(args) => reload::reload(args, &paths).await,
            Command::Enable(args) => reload::enable(args, &paths, true).await,
            Command::Disable(args) => reload::enable(args, &paths, false).await,
            Command::Userdata(args) => userdata::run(args).await,
            Command::Install(args) => install::run(args).await,
            Command::Bake(args) => bake::run(args, mode, paths).await,
            Command::DesktopSession(args) => crate::services::desktop::cli::run(args).await,
            Command::Generate(args) => generate::run(args).await,
            // Dispatched above.
            Command::Shim | Command::GuacamoleWeb(_) | Command::Front(_) => Ok(ExitCode::SUCCESS),
        }
    });
    // Abandon, rather than wait for, a blocking read still stuck (a hung mount) after the
    // command has finished, e.g. because SIGTERM stopped the agent during it.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("exoagent: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn parser_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn service_arguments_offer_the_service_names() {
        let names: Vec<&str> = ServiceKind::ALL.iter().map(|k| k.as_str()).collect();
        let cmd = Cli::command();
        let logs = cmd.find_subcommand("logs").unwrap();
        let service = logs
            .get_arguments()
            .find(|a| a.get_id() == "service")
            .unwrap();
        let offered: Vec<String> = service
            .get_possible_values()
            .iter()
            .map(|v| v.get_name().to_owned())
            .collect();
        assert_eq!(offered, names);
        // `logs` leaves an unknown name to the agent (exit 1 per docs/contracts.md) ...
        let cli = Cli::try_parse_from(["exoagent", "logs", "nope"]).unwrap();
        assert!(matches!(cli.command, Command::Logs(args) if args.service == "nope"));
        // ... `--service` refuses it as a usage error naming the known ones.
        let err = Cli::try_parse_from(["exoagent", "bake", "--service", "nope"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("unknown service 'nope'"), "{err}");
        let cli = Cli::try_parse_from(["exoagent", "bake", "--service", "rstudio"]).unwrap();
        assert!(
            matches!(cli.command, Command::Bake(args) if args.services == [ServiceKind::RStudio])
        );
    }

    #[test]
    fn no_flag_can_carry_a_secret() {
        let mut names = Vec::new();
        let cmd = Cli::command();
        for sub in cmd.get_subcommands().chain(std::iter::once(&cmd)) {
            for arg in sub.get_arguments() {
                names.push(arg.get_id().to_string());
            }
        }
        // Public keys are not secrets.
        // Paths to 0600 files, never the secret itself.
        let public = ["ssh_public_keys", "password_file", "key_file"];
        for name in names.into_iter().filter(|n| !public.contains(&n.as_str())) {
            for secret in ["pass", "secret", "token", "key"] {
                assert!(
                    !name.contains(secret),
                    "flag '{name}' looks like it carries a secret"
                );
            }
        }
    }
}
