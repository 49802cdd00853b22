//! `exoagent motd`: the login banner (run by `/etc/update-motd.d/60-exoagent` on Debian and
//! Ubuntu, `/etc/profile.d/exoagent.sh` on EL). Asks the status API once within a hard
//! deadline, prints the block `report::banner` renders, and always exits 0: a login must never
//! wait for, or fail because of, the agent.

use std::io::{ErrorKind, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use crate::api::client::{ApiClient, ClientError};
use crate::report::banner::{render, Seen};
use crate::state::now_ms;

/// How long the banner waits for the agent, connection included. A login allows 100 ms in
/// all: the rest is for the process's own start and exit, which take 2-4 ms on an idle machine
/// and tens of milliseconds at the tail when the cores are busy (bench/results/login-banner.md).
/// An idle agent answers in 1-2 ms, so only a hung or starved one meets the deadline.
pub const DEADLINE: Duration = Duration::from_millis(60);

/// Arguments of `exoagent motd` (none: it is run by login hooks).
#[derive(Debug, Args)]
pub struct MotdArgs {}

/// Ask, print, exit 0 whatever happened.
pub async fn run(_args: MotdArgs, socket: &Path) -> anyhow::Result<ExitCode> {
    let seen = look(socket, DEADLINE).await;
    let text = render(&seen, now_ms());
    // A closed stdout (the login went away) is nothing to report.
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
    Ok(ExitCode::SUCCESS)
}

/// What the agent at `socket` says within `deadline`.
pub async fn look(socket: &Path, deadline: Duration) -> Seen {
    match tokio::time::timeout(deadline, ApiClient::new(socket).status()).await {
        Ok(Ok(snapshot)) => Seen::Status(Box::new(snapshot)),
        Ok(Err(ClientError::Unreachable { source, .. })) => match source.kind() {
            ErrorKind::NotFound | ErrorKind::ConnectionRefused => Seen::NotRunning,
            ErrorKind::PermissionDenied => Seen::NoPermission,
            _ => Seen::NoAnswer,
        },
        Ok(Err(ClientError::Protocol { .. } | ClientError::Api { .. })) | Err(_) => Seen::NoAnswer,
    }
}
