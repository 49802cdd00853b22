//! `exoagent reload`, `exoagent enable <service>` and `exoagent disable <service>`: change the
//! running instance from the instance. The configuration (with the change, for enable and
//! disable) is checked here first; only a valid one is written and handed to the agent, which
//! checks it again and applies it (services added, removed, changed; unchanged ones untouched).

use std::path::Path;
use std::process::ExitCode;

use clap::Args;

use super::validate::print_invalid;
use crate::api::client::{ApiClient, ClientError};
use crate::config::{self, request::REQUEST_KEY, Pending};
use crate::fsutil;
use crate::model::ServiceKind;
use crate::paths::Paths;
use crate::state::{ReloadOutcome, ReloadStatus};

/// Arguments of `exoagent reload`.
#[derive(Debug, Args)]
pub struct ReloadArgs {}

/// Arguments of `exoagent enable` and `exoagent disable`.
#[derive(Debug, Args)]
pub struct EnableArgs {
    /// The service.
    #[arg(value_name = "SERVICE", value_parser = crate::cli::ServiceParser)]
    pub service: ServiceKind,
}

/// Check the configuration, then have the agent read it again.
pub async fn reload(_args: ReloadArgs, paths: &Paths) -> anyhow::Result<ExitCode> {
    if let Err(errors) = config::load(paths) {
        print_invalid(&errors);
        return Ok(ExitCode::FAILURE);
    }
    Ok(ask_agent(paths).await)
}

/// Turn `service` on (`on`) or off in [`Paths::enable_dropin`], checked first, then reload.
pub async fn enable(args: EnableArgs, paths: &Paths, on: bool) -> anyhow::Result<ExitCode> {
    let dropin = paths.enable_dropin();
    let current = match std::fs::read_to_string(&dropin) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            eprintln!("exoagent: cannot read '{}': {e}", dropin.display());
            return Ok(ExitCode::FAILURE);
        }
    };
    let text = match with_service(current.as_deref(), args.service, on) {
        Ok(text) => text,
        Err(problem) => {
            eprintln!(
                "exoagent: '{}' is not one exoagent wrote ({problem}); fix or remove it first",
                dropin.display()
            );
            return Ok(ExitCode::FAILURE);
        }
    };
    let loaded = config::load_with(
        paths,
        &Pending {
            dropin: Some((&dropin, &text)),
            ..Pending::default()
        },
    );
    let loaded = match loaded {
        Ok(loaded) => loaded,
        Err(errors) => {
            print_invalid(&errors);
            return Ok(ExitCode::FAILURE);
        }
    };
    let now_on = loaded
        .settings
        .services
        .iter()
        .any(|s| s.kind() == args.service);
    if now_on != on {
        // The request is the one layer after this drop-in: it decides.
        eprintln!(
            "exoagent: the cloud's request ({REQUEST_KEY} in the instance metadata) sets \
             services.{}.enabled = {now_on}; it wins over '{}', so nothing changes until it is \
             changed",
            args.service,
            dropin.display()
        );
    }
    if let Err(e) = write_dropin(&dropin, &text) {
        let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
            " (run as root, e.g. with sudo)"
        } else {
            ""
        };
        eprintln!("exoagent: cannot write '{}': {e}{hint}", dropin.display());
        return Ok(ExitCode::FAILURE);
    }
    println!(
        "{}: {} in {}",
        args.service,
        if on { "enabled" } else { "disabled" },
        dropin.display()
    );
    Ok(ask_agent(paths).await)
}

/// The drop-in's text with `[services.<service>] enabled = on` (other services as they were).
fn with_service(current: Option<&str>, service: ServiceKind, on: bool) -> Result<String, String> {
    let mut choices = std::collections::BTreeMap::new();
    if let Some(text) = current {
        let table: toml::Table = text.parse().map_err(|e| format!("not TOML: {e}"))?;
        let services = match table.get("services") {
            None => None,
            Some(toml::Value::Table(services)) => Some(services),
            Some(_) => return Err("services is not a table".into()),
        };
        for (name, value) in services.into_iter().flatten() {
            let kind: ServiceKind = name
                .parse()
                .map_err(|_| format!("unknown service {name}"))?;
            let enabled = value
                .get("enabled")
                .and_then(toml::Value::as_bool)
                .ok_or_else(|| format!("services.{name} has no enabled = true|false"))?;
            choices.insert(kind, enabled);
        }
    }
    choices.insert(service, on);
    let mut text = String::from(
        "# Written by `exoagent enable` and `exoagent disable`; read after the other drop-ins.\n",
    );
    for (kind, enabled) in choices {
        text.push_str(&format!("\n[services.{kind}]\nenabled = {enabled}\n"));
    }
    Ok(text)
}

fn write_dropin(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        fsutil::ensure_dir(dir, 0o755)?;
    }
    fsutil::write_atomic(path, text.as_bytes(), 0o644, None)
}

/// Have the running agent read the configuration again and say what it did.
async fn ask_agent(paths: &Paths) -> ExitCode {
    let client = ApiClient::new(paths.api_socket());
    match client.reload().await {
        Ok(status) => {
            print_outcome(&status);
            if status.outcome == ReloadOutcome::Rejected {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(ClientError::Api {
            reason, message, ..
        }) if reason == "reload-pending" => {
            println!("{message}");
            ExitCode::SUCCESS
        }
        Err(ClientError::Unreachable { .. }) => {
            println!("the agent is not running; the configuration applies when it starts");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("exoagent: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_outcome(status: &ReloadStatus) {
    match status.outcome {
        ReloadOutcome::Applied => {
            println!(
                "applied: {}; the agent starts over with it (follow it with exoagent status --wait)",
                status.changes.join(", ")
            );
        }
        ReloadOutcome::Unchanged => println!("unchanged: the running configuration is the same"),
        ReloadOutcome::Rejected => {
            eprintln!("exoagent: the agent refused the configuration; nothing was changed:");
            if let Some(reason) = &status.reason {
                eprintln!("{}", crate::text::clean(&reason.detail, 4000));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dropin_keeps_other_services_and_refuses_foreign_content() {
        let first = with_service(None, ServiceKind::Desktop, true).unwrap();
        assert!(
            first.contains("[services.desktop]\nenabled = true\n"),
            "{first}"
        );
        let second = with_service(Some(&first), ServiceKind::RStudio, false).unwrap();
        assert!(
            second.contains("[services.desktop]\nenabled = true\n"),
            "{second}"
        );
        assert!(
            second.contains("[services.rstudio]\nenabled = false\n"),
            "{second}"
        );
        let third = with_service(Some(&second), ServiceKind::Desktop, false).unwrap();
        assert!(
            third.contains("[services.desktop]\nenabled = false\n"),
            "{third}"
        );
        assert!(with_service(Some("not = [toml"), ServiceKind::Desktop, true).is_err());
        assert!(with_service(
            Some("[services.nope]\nenabled = true\n"),
            ServiceKind::Desktop,
            true
        )
        .is_err());
        assert!(with_service(
            Some("[services.desktop]\nport = 5901\n"),
            ServiceKind::Desktop,
            true
        )
        .is_err());
    }
}
