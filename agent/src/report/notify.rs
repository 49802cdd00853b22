//! systemd's notify protocol (`READY=1`, `STATUS=...`) over `NOTIFY_SOCKET`, without a crate.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::state::{SetupState, Snapshot};

/// Where notifications go: a socket path or a Linux abstract socket name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyAddr {
    /// A filesystem socket.
    Path(PathBuf),
    /// An abstract socket (written `@name` in `NOTIFY_SOCKET`).
    Abstract(Vec<u8>),
}

impl NotifyAddr {
    /// Parse `NOTIFY_SOCKET`'s value.
    pub fn parse(value: &str) -> Option<Self> {
        if let Some(name) = value.strip_prefix('@') {
            Some(Self::Abstract(name.as_bytes().to_vec()))
        } else if value.starts_with('/') {
            Some(Self::Path(PathBuf::from(value)))
        } else {
            None
        }
    }
}

/// A handle for sending notifications to the service manager.
#[derive(Debug, Clone)]
pub struct SdNotify {
    addr: NotifyAddr,
}

impl SdNotify {
    /// The service manager from `NOTIFY_SOCKET`, when there is one.
    pub fn from_env() -> Option<Self> {
        let value = std::env::var("NOTIFY_SOCKET").ok()?;
        NotifyAddr::parse(&value).map(Self::new)
    }

    /// Notifications to `addr`.
    pub fn new(addr: NotifyAddr) -> Self {
        Self { addr }
    }

    /// Send one notification datagram, e.g. `READY=1`.
    pub fn notify(&self, message: &str) -> io::Result<()> {
        let socket = UnixDatagram::unbound()?;
        let sent = match &self.addr {
            NotifyAddr::Path(path) => socket.send_to(message.as_bytes(), path)?,
            NotifyAddr::Abstract(name) => {
                let addr = SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(message.as_bytes(), &addr)?
            }
        };
        if sent != message.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short write to NOTIFY_SOCKET",
            ));
        }
        Ok(())
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
    mut rx: watch::Receiver<Snapshot>,
    cancel: CancellationToken,
) {
    let mut last = String::new();
    loop {
        let text = status_text(&rx.borrow_and_update());
        if text != last {
            if let Err(e) = notify.notify(&format!("STATUS={text}")) {
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

    #[test]
    fn notify_socket_values_parse() {
        assert_eq!(
            NotifyAddr::parse("/run/systemd/notify"),
            Some(NotifyAddr::Path("/run/systemd/notify".into()))
        );
        assert_eq!(
            NotifyAddr::parse("@sd-notify"),
            Some(NotifyAddr::Abstract(b"sd-notify".to_vec()))
        );
        assert_eq!(NotifyAddr::parse("relative"), None);
    }

    #[test]
    fn ready_reaches_a_real_datagram_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        SdNotify::new(NotifyAddr::Path(path))
            .notify("READY=1")
            .unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn abstract_sockets_work() {
        let name = format!("exoagent-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        SdNotify::new(NotifyAddr::Abstract(name.into_bytes()))
            .notify("STATUS=x")
            .unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STATUS=x");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn status_changes_are_sent() {
        use crate::model::ServiceKind;
        use crate::state::{ServiceState, ServiceUpdate, SetupPhase, StateHub};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        server
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let hub = StateHub::new([(ServiceKind::JupyterLab, 8888, "http://x/".to_owned())]);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run_status_notifier(
            SdNotify::new(NotifyAddr::Path(path)),
            hub.subscribe(),
            cancel.clone(),
        ));
        let mut buf = [0u8; 256];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            "STATUS=setup starting — jupyterlab pending"
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
            let n = server.recv(&mut buf).unwrap();
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        cancel.cancel();
        task.await.unwrap();
    }
}
