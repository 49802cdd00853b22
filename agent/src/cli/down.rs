//! `exoagent down`: stop every service the agent started. Services deliberately outlive the
//! agent (so restarts and upgrades never interrupt a session); this is the explicit stop.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use crate::api::client::ApiClient;
use crate::model::ServiceKind;
use crate::paths::Paths;
use crate::supervise::stop_recorded;

/// Arguments of `exoagent down`.
#[derive(Debug, Args)]
pub struct DownArgs {
    /// Seconds to wait after SIGTERM before SIGKILL.
    #[arg(long, default_value_t = 10)]
    pub grace: u64,
}

/// Stop each recorded service; report what was stopped. Refused while the agent runs, because
/// its supervisor would start the services again at once.
pub async fn run(args: DownArgs, paths: &Paths) -> anyhow::Result<ExitCode> {
    let socket = paths.api_socket();
    if ApiClient::new(&socket).status().await.is_ok() {
        eprintln!(
            "exoagent: the agent is running (it answers on '{}') and would restart the services; \
             stop it first (systemctl stop exoagent, or Ctrl-C the sandbox), then run 'exoagent down'",
            socket.display()
        );
        return Ok(ExitCode::FAILURE);
    }
    let mut failed = false;
    // Each service, then the TLS front before it (when one ran).
    let units = ServiceKind::ALL.into_iter().flat_map(|kind| {
        [
            (kind.to_string(), paths.service_run_dir(kind)),
            (format!("{kind}/tls"), paths.front_run_dir(kind)),
        ]
    });
    for (name, run_dir) in units {
        match stop_recorded(&run_dir, Duration::from_secs(args.grace)).await {
            Ok(true) => println!("{name}: stopped"),
            Ok(false) => {}
            Err(e) => {
                eprintln!("{name}: {e}");
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
