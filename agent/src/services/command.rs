//! Running install commands for a service: argv only, output captured, failures carrying the
//! command and the tail of its stderr.

use std::process::Stdio;

use super::{ServiceError, ServiceKind};
use crate::text;

/// How many stderr lines an install failure keeps.
const TAIL_LINES: usize = 10;

/// Run `argv` to completion with stdin closed; on failure return the command, its status and
/// the last lines of its stderr. Never used with secrets in `argv`.
pub async fn run_logged(service: ServiceKind, argv: &[&str]) -> Result<(), ServiceError> {
    run_logged_with_env(service, argv, &[]).await
}

/// [`run_logged`] with `env` added to the inherited environment (a package manager's
/// non-interactive settings, say).
pub async fn run_logged_with_env(
    service: ServiceKind,
    argv: &[&str],
    env: &[(&str, &str)],
) -> Result<(), ServiceError> {
    let shown = argv.join(" ");
    let (program, args) = argv.split_first().ok_or_else(|| ServiceError::Install {
        service,
        detail: "empty command".into(),
    })?;
    tracing::info!(target: "exoagent::services", service = service.as_str(), command = %shown, "running");
    let output = tokio::process::Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| ServiceError::Install {
            service,
            detail: format!("failed to run '{shown}': {e}"),
        })?;
    if output.status.success() {
        return Ok(());
    }
    Err(ServiceError::Install {
        service,
        detail: format!(
            "'{shown}' failed ({}): {}",
            output.status,
            text::last_lines(&String::from_utf8_lossy(&output.stderr), TAIL_LINES).join(" | ")
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failure_carries_command_and_stderr_tail() {
        let err = run_logged(
            ServiceKind::JupyterLab,
            &["sh", "-c", "echo one >&2; echo two >&2; exit 4"],
        )
        .await
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("exit status: 4"), "{text}");
        assert!(text.contains("one | two"), "{text}");
        assert_eq!(err.reason(), "service-install-failed");
    }

    #[tokio::test]
    async fn missing_program_is_an_error_not_a_panic() {
        let err = run_logged(ServiceKind::JupyterLab, &["/nonexistent/prog"])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/prog"));
    }
}
