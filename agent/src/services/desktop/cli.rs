//! `exoagent desktop-session`: run the VNC server and the desktop session as one process, as
//! the user this process runs as (the shim has already dropped privileges). Stops both on
//! SIGTERM or SIGINT and exits 0; exits non-zero, naming which one ended, when either ends on
//! its own (logging out of the desktop ends it), so the shim restarts the pair.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use super::session::{self, DesktopEnvironment, DesktopUser, Geometry, SessionSpec, VncServer};
use super::vnc;

/// Exit code for a command line that cannot describe a desktop (EX_USAGE).
const EXIT_USAGE: u8 = 64;

/// Arguments of `exoagent desktop-session`.
#[derive(Debug, Args)]
pub struct DesktopSessionArgs {
    /// The X display number N (`:N`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(0..=999))]
    pub display: u16,
    /// The RFB (VNC) port, on loopback only [default: 5900 + display].
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub rfb_port: Option<u16>,
    /// The virtual screen size, WIDTHxHEIGHT.
    #[arg(long, default_value = "1280x800")]
    pub geometry: Geometry,
    /// Bits per pixel of the virtual screen.
    #[arg(long, default_value_t = 24, value_parser = parse_depth)]
    pub depth: u8,
    /// The VNC password file written by `vncpasswd -f` [default: ~/.vnc/passwd]. A path only:
    /// the secret itself never appears on the command line.
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// The desktop environment.
    #[arg(long, value_enum, default_value_t = DesktopEnvironment::Xfce)]
    pub environment: DesktopEnvironment,
    /// The VNC server.
    #[arg(long, value_enum, default_value_t = ServerArg::Tigervnc)]
    pub server: ServerArg,
    /// Run the session under VirtualGL (`vglrun -d egl`); needs `--server turbovnc`.
    #[arg(long)]
    pub virtualgl: bool,
    /// The desktop name VNC viewers show [default: the host name].
    #[arg(long, value_name = "NAME")]
    pub desktop_name: Option<String>,
    /// Seconds the server gets to accept connections on the RFB port.
    #[arg(long, value_name = "SECONDS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub ready_timeout: u64,
}

/// `--server`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ServerArg {
    /// TigerVNC (`Xtigervnc`, distribution package).
    Tigervnc,
    /// TurboVNC (`/opt/TurboVNC/bin/Xvnc`, vendor package).
    Turbovnc,
}

fn parse_depth(text: &str) -> Result<u8, String> {
    match text {
        "16" => Ok(16),
        "24" => Ok(24),
        "32" => Ok(32),
        _ => Err(format!("'{text}' is not a supported depth (16, 24 or 32)")),
    }
}

impl DesktopSessionArgs {
    /// The session these arguments describe, for `user`; an error message when they describe
    /// none.
    pub fn spec(&self, user: DesktopUser) -> Result<SessionSpec, String> {
        let server = match (self.server, self.virtualgl) {
            (ServerArg::Tigervnc, false) => VncServer::TigerVnc,
            (ServerArg::Tigervnc, true) => {
                return Err("--virtualgl needs --server turbovnc".to_owned());
            }
            (ServerArg::Turbovnc, virtualgl) => VncServer::TurboVnc { virtualgl },
        };
        let mut spec = SessionSpec::new(user, self.display);
        if let Some(port) = self.rfb_port {
            spec.rfb_port = port;
        }
        spec.geometry = self.geometry;
        spec.depth = self.depth;
        if let Some(file) = &self.password_file {
            spec.password_file = crate::paths::absolute(file);
        }
        spec.environment = self.environment;
        spec.server = server;
        if let Some(name) = &self.desktop_name {
            spec.desktop_name = name.clone();
        }
        spec.ready_timeout = Duration::from_secs(self.ready_timeout);
        Ok(spec)
    }
}

/// Run the desktop until SIGTERM/SIGINT (exit 0) or until the server or the session ends (a
/// message with the stable reason on stderr, exit 1).
pub async fn run(args: DesktopSessionArgs) -> anyhow::Result<ExitCode> {
    let user = match DesktopUser::current() {
        Ok(user) => user,
        Err(e) => return Ok(fail(&e)),
    };
    let spec = match args.spec(user) {
        Ok(spec) => spec,
        Err(message) => {
            eprintln!("exoagent desktop-session: {message}");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    let shutdown = CancellationToken::new();
    let mut terminate = signal(SignalKind::terminate())
        .map_err(|e| anyhow::anyhow!("failed to install the SIGTERM handler: {e}"))?;
    let mut interrupt = signal(SignalKind::interrupt())
        .map_err(|e| anyhow::anyhow!("failed to install the SIGINT handler: {e}"))?;
    let on_signal = shutdown.clone();
    let watcher = tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        on_signal.cancel();
    });
    let result = session::run(&spec, shutdown).await;
    watcher.abort();
    Ok(match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    })
}

/// Print the error with its stable reason (the shim's stderr tail carries it into the
/// service's status) and pick the exit code.
fn fail(error: &vnc::DesktopError) -> ExitCode {
    eprintln!("exoagent desktop-session: {error} [{}]", error.reason());
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// A stand-alone parser around the arguments, as `exoagent desktop-session` would parse
    /// them.
    #[derive(Debug, Parser)]
    struct Harness {
        #[command(flatten)]
        args: DesktopSessionArgs,
    }

    fn parse(argv: &[&str]) -> Result<DesktopSessionArgs, clap::Error> {
        Harness::try_parse_from(std::iter::once("desktop-session").chain(argv.iter().copied()))
            .map(|h| h.args)
    }

    fn user() -> DesktopUser {
        DesktopUser {
            name: "ada".into(),
            uid: 1001,
            gid: 1001,
            home: PathBuf::from("/home/ada"),
            shell: PathBuf::from("/bin/bash"),
        }
    }

    #[test]
    fn parser_is_consistent() {
        use clap::CommandFactory;
        Harness::command().debug_assert();
    }

    #[test]
    fn defaults_are_tigervnc_xfce_on_display_1() {
        let spec = parse(&[]).unwrap().spec(user()).unwrap();
        assert_eq!(spec.display, 1);
        assert_eq!(spec.rfb_port, 5901);
        assert_eq!(spec.geometry.to_string(), "1280x800");
        assert_eq!(spec.depth, 24);
        assert_eq!(spec.password_file, PathBuf::from("/home/ada/.vnc/passwd"));
        assert_eq!(spec.server, VncServer::TigerVnc);
        assert_eq!(spec.environment, DesktopEnvironment::Xfce);
        assert_eq!(spec.ready_timeout, Duration::from_secs(20));
    }

    #[test]
    fn every_flag_reaches_the_spec() {
        let args = parse(&[
            "--display",
            "7",
            "--rfb-port",
            "15907",
            "--geometry",
            "1920x1080",
            "--depth",
            "16",
            "--password-file",
            "/etc/exoagent/vnc/passwd",
            "--environment",
            "gnome",
            "--server",
            "turbovnc",
            "--virtualgl",
            "--desktop-name",
            "lab desktop",
            "--ready-timeout",
            "30",
        ])
        .unwrap();
        let spec = args.spec(user()).unwrap();
        assert_eq!(spec.display, 7);
        assert_eq!(spec.rfb_port, 15907);
        assert_eq!(spec.geometry.to_string(), "1920x1080");
        assert_eq!(spec.depth, 16);
        assert_eq!(
            spec.password_file,
            PathBuf::from("/etc/exoagent/vnc/passwd")
        );
        assert_eq!(spec.environment, DesktopEnvironment::Gnome);
        assert_eq!(spec.server, VncServer::TurboVnc { virtualgl: true });
        assert_eq!(spec.desktop_name, "lab desktop");
        assert_eq!(spec.ready_timeout, Duration::from_secs(30));
        assert_eq!(
            parse(&["--display", "4"])
                .unwrap()
                .spec(user())
                .unwrap()
                .rfb_port,
            5904
        );
    }

    #[test]
    fn invalid_values_are_refused() {
        for argv in [
            &["--geometry", "wide"][..],
            &["--depth", "8"],
            &["--display", "1000"],
            &["--rfb-port", "0"],
            &["--environment", "kde"],
            &["--server", "realvnc"],
            &["--ready-timeout", "0"],
        ] {
            assert!(parse(argv).is_err(), "{argv:?} was accepted");
        }
        let err = parse(&["--virtualgl"]).unwrap().spec(user()).unwrap_err();
        assert!(err.contains("--server turbovnc"), "{err}");
    }

    #[test]
    fn no_flag_looks_like_it_carries_a_secret() {
        use clap::CommandFactory;
        // The same rule as the top-level parser test; `password_file` is a path to a 0600 file
        // (the point of it is that the secret stays off the command line).
        let paths = ["password_file"];
        for arg in Harness::command().get_arguments() {
            let name = arg.get_id().to_string();
            if paths.contains(&name.as_str()) {
                continue;
            }
            for secret in ["pass", "secret", "token", "key"] {
                assert!(!name.contains(secret), "flag '{name}' looks like a secret");
            }
        }
    }
}
