//! systemd's notify protocol (`READY=1`, `STATUS=...`, sd_notify(3)) through `libsystemd`,
//! which reads `NOTIFY_SOCKET` (a path or an `@abstract` name) itself.

use libsystemd::daemon::{self, NotifyState};
use libsystemd::errors::SdError;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::state::{SetupState, Snapshot};

/// A handle for sending notifications to the service manager; exists only when there is one.
#[derive(Debug, Clone)]
pub struct SdNotify(());

impl SdNotify {
    /// The service manager from `NOTIFY_SOCKET`, when there is one.
    pub fn from_env() -> Option<Self> {
        std::env::var_os("NOTIFY_SOCKET").map(|_| Self(()))
    }

    /// `READY=1`: startup is finished.
    pub fn ready(&self) -> Result<(), SdError> {
        // `false`: leave `NOTIFY_SOCKET` set (removing it races other threads' getenv).
        daemon::notify(false, &[NotifyState::Ready]).map(drop)
    }

    /// `STATUS=text`: what `systemctl status` shows.
    pub fn status(&self, text: &str) -> Result<(), SdError> {
        daemon::notify(false, &[NotifyState::Status(text.to_owned())]).map(drop)
    }
}

/// The one-line `STATUS=` text `systemctl status` shows.
pub fn status_text(snapshot: &Snapshot) -> String {
    let mut text = format!("setup {}", snapshot.setup.state.as_str());
    if snapshot.setup.state == SetupState::Error {
        if let (Some(step), Some(reason)) = (&snapshot.setup.step, &snapshot.setup.reason) {
            text.push_str(&format!(": {step} {}", reason.code));
        }
    }
    let services: Vec<String> = snapshot
        .services
        .iter()
        .map(|s| format!("{} {}", s.service.as_str(), s.state.as_str()))
        .collect();
    if !services.is_empty() {
        text.push_str(" — ");
        text.push_str(&services.join(", "));
    }
    text
}

/// Send `STATUS=` on every change that alters the text, until `cancel` fires.
pub async fn run_status_notifier(
    notify: SdNotify,
    rx: watch::Receiver<Snapshot>,
    cancel: CancellationToken,
) {
    send_status_changes(|text| notify.status(text), rx, cancel).await;
}

/// The notifier's loop, with the sender passed in so its change detection is testable
/// without a process-wide `NOTIFY_SOCKET` (the real socket is covered by `systemd_unit.rs`).
async fn send_status_changes<E: std::fmt::Display>(
    mut send: impl FnMut(&str) -> Result<(), E>,
    mut rx: watch::Receiver<Snapshot>,
    cancel: CancellationToken,
) {
    let mut last = String::new();
    loop {
        let text = status_text(&rx.borrow_and_update());
        if text != last {
            if let Err(e) = send(&text) {
                tracing::debug!(target: "exoagent::report", error = %e, "sd_notify STATUS failed");
            }
            last = text;
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            changed = rx.changed() => if changed.is_err() { break },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn status_changes_are_sent() {
        use crate::model::ServiceKind;
        use crate::state::{ServiceState, ServiceUpdate, SetupPhase, StateHub};
        let (tx, mut sent) = tokio::sync::mpsc::unbounded_channel::<String>();
        let hub = StateHub::new([(ServiceKind::JupyterLab, 8888, "http://x/".to_owned())]);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(send_status_changes(
            move |text| {
                tx.send(text.to_owned()).unwrap();
                Ok::<_, SdError>(())
            },
            hub.subscribe(),
            cancel.clone(),
        ));
        assert_eq!(
            sent.recv().await.unwrap(),
            "setup starting — jupyterlab pending"
        );
        hub.set_phase(SetupPhase::Provisioning);
        hub.transition(
            ServiceKind::JupyterLab,
            ServiceState::Installing,
            ServiceUpdate::default(),
        )
        .unwrap();
        let mut seen = Vec::new();
        while !seen
            .iter()
            .any(|s: &String| s.contains("jupyterlab installing"))
        {
            // Bounded: a status that never comes fails the test instead of hanging it.
            let next = tokio::time::timeout(std::time::Duration::from_secs(10), sent.recv())
                .await
                .unwrap_or_else(|_| panic!("no \"jupyterlab installing\" status; saw {seen:?}"));
            seen.push(next.unwrap());
        }
        cancel.cancel();
        task.await.unwrap();
    }
}
