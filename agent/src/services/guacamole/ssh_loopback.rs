//! The address guacd reaches this machine's sshd at: a loopback address of its own whose route
//! turns delayed ACKs off, when sshd treats it exactly as `127.0.0.1`; `127.0.0.1` otherwise.
//!
//! Why: guacd creates the socket libssh2 uses and sets no `TCP_NODELAY` on it, and sshd sets it
//! only for interactive sessions, not the `sftp` subsystem; a small segment then waits under
//! Nagle for the other end's delayed ACK (≈ 40 ms), dozens of times a second, and downloads from
//! guacd 1.3.0 ran at ≈ 60 % of a 100 Mbit/s link at 50 ms (bench/results/file-transfer.md).
//! The route metric `quickack 1` on a /32 of its own (both ends of such a connection have that
//! address, so both sockets' routes carry it) removes the stalls for that connection only,
//! without touching guacd, sshd or any other loopback traffic.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

use crate::platform::exec::{self, Finished};

/// The address guacd connects to sshd at when it can: in 127.0.0.0/8, so local by the kernel's
/// own /8 route; away from the addresses distributions use (127.0.0.1, Debian's 127.0.1.1 for
/// the host name, systemd-resolved's 127.0.0.53/54).
pub const DEDICATED: Ipv4Addr = Ipv4Addr::new(127, 0, 22, 1);

/// The address otherwise.
pub const PLAIN: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// How long `sshd -T` or `ip route` may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the dedicated address is not used.
#[derive(Debug, thiserror::Error)]
pub enum LoopbackError {
    /// `sshd -T` could not say how sshd is configured.
    #[error("'{command}' did not show sshd's configuration: {detail}")]
    SshdUnreadable {
        /// The command, as run.
        command: String,
        /// What went wrong (exit status and stderr, or the OS error).
        detail: String,
    },
    /// sshd listens neither on every IPv4 address nor on the dedicated one at the port.
    #[error("sshd does not listen on {DEDICATED} port {port} (its listenaddress: {listening})")]
    SshdNotListening {
        /// The SSH port.
        port: u16,
        /// sshd's `listenaddress` values.
        listening: String,
    },
    /// A `Match` block (or anything else) makes sshd treat a connection from the dedicated
    /// address differently from one from 127.0.0.1.
    #[error("sshd's configuration for a connection from {DEDICATED} differs from 127.0.0.1's in '{setting}'")]
    SshdTreatsItDifferently {
        /// The first setting that differs.
        setting: String,
    },
    /// The route could not be added.
    #[error("'{command}' failed: {detail}")]
    RouteRefused {
        /// The command, as run.
        command: String,
        /// What went wrong.
        detail: String,
    },
}

impl LoopbackError {
    /// Short stable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::SshdUnreadable { .. } => "sshd_config_unreadable",
            Self::SshdNotListening { .. } => "sshd_not_listening",
            Self::SshdTreatsItDifferently { .. } => "sshd_config_differs",
            Self::RouteRefused { .. } => "route_refused",
        }
    }
}

/// Decides the address and sets up its route, with the `ip` and `sshd` commands given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshLoopback {
    ip: Vec<String>,
    sshd: Vec<String>,
}

impl SshLoopback {
    /// With `ip` (iproute2, e.g. `["ip"]` or `["ip", "-n", "<namespace>"]`) and `sshd` (e.g.
    /// `["sshd"]` or `["/usr/sbin/sshd", "-f", "<config>"]`) as argv prefixes.
    pub fn new(ip: Vec<String>, sshd: Vec<String>) -> Self {
        Self { ip, sshd }
    }

    /// This machine's `ip` and `sshd`.
    pub fn system() -> Self {
        Self::new(vec!["ip".into()], vec!["sshd".into()])
    }

    /// The address for `user`'s SSH connections to port `ssh_port`: the dedicated one, its
    /// route added (idempotent: `replace`), when sshd listens there and its configuration for
    /// a connection from there is the one for 127.0.0.1; nothing is changed when it is not.
    pub async fn choose(&self, user: &str, ssh_port: u16) -> Result<IpAddr, LoopbackError> {
        // Side by side: each is an sshd start (a noticeable part of a second at boot).
        let (plain, dedicated) = tokio::try_join!(
            self.sshd_view(user, ssh_port, PLAIN),
            self.sshd_view(user, ssh_port, IpAddr::V4(DEDICATED)),
        )?;
        if !listens_on_dedicated(&plain, ssh_port) {
            return Err(LoopbackError::SshdNotListening {
                port: ssh_port,
                listening: listen_addresses(&plain).join(", "),
            });
        }
        if let Some(setting) = first_difference(&plain, &dedicated) {
            return Err(LoopbackError::SshdTreatsItDifferently { setting });
        }
        let argv = self.route_argv();
        let detail = match run(&argv).await {
            Ok(done) if done.status.success() => return Ok(IpAddr::V4(DEDICATED)),
            Ok(done) => failure(&done),
            Err(e) => e,
        };
        Err(LoopbackError::RouteRefused {
            command: argv.join(" "),
            detail,
        })
    }

    /// `ip route replace`: a local /32 for [`DEDICATED`], its own source (a connection to it
    /// then comes from it, so sshd's end has the same route), delayed ACKs off.
    pub fn route_argv(&self) -> Vec<String> {
        let dedicated = DEDICATED.to_string();
        let mut argv = self.ip.clone();
        argv.extend(
            [
                "-4", "route", "replace", "local", &dedicated, "dev", "lo", "table", "local",
                "proto", "static", "scope", "host", "src", &dedicated, "quickack", "1",
            ]
            .map(str::to_owned),
        );
        argv
    }

    /// `sshd -T -C ...`: sshd's effective configuration for `user` connecting from and to
    /// `addr` at `ssh_port` (Match blocks applied).
    async fn sshd_view(&self, user: &str, ssh_port: u16, addr: IpAddr) -> Result<String, LoopbackError> {
        let mut argv = self.sshd.clone();
        argv.push("-T".into());
        argv.push("-C".into());
        argv.push(format!(
            "user={user},host=localhost,addr={addr},laddr={addr},lport={ssh_port}"
        ));
        let detail = match run(&argv).await {
            Ok(done) if done.status.success() => return Ok(done.stdout),
            Ok(done) => failure(&done),
            Err(e) => e,
        };
        Err(LoopbackError::SshdUnreadable {
            command: argv.join(" "),
            detail,
        })
    }
}

/// The `listenaddress` values of an `sshd -T` output.
fn listen_addresses(view: &str) -> Vec<String> {
    view.lines()
        .filter_map(|l| l.strip_prefix("listenaddress "))
        .map(|v| v.trim().to_owned())
        .collect()
}

/// Whether one of sshd's listen addresses takes IPv4 connections to [`DEDICATED`] at `port`:
/// `0.0.0.0:<port>` or the address itself. (`[::]` does not: sshd sets `IPV6_V6ONLY`.)
fn listens_on_dedicated(view: &str, port: u16) -> bool {
    listen_addresses(view).iter().any(|a| {
        a.parse::<std::net::SocketAddr>().is_ok_and(|s| {
            s.port() == port
                && (s.ip() == IpAddr::V4(Ipv4Addr::UNSPECIFIED) || s.ip() == IpAddr::V4(DEDICATED))
        })
    })
}

/// The first setting whose lines differ between two `sshd -T` outputs, by name; `None` when
/// they are the same.
fn first_difference(a: &str, b: &str) -> Option<String> {
    let a: BTreeSet<&str> = a.lines().collect();
    let b: BTreeSet<&str> = b.lines().collect();
    let line = a.symmetric_difference(&b).next()?;
    Some(line.split_whitespace().next().unwrap_or_default().to_owned())
}

/// Run `argv` with [`exec::run`] (stdin closed), waiting at most [`COMMAND_TIMEOUT`] (a tool
/// that does not answer by then is left to finish on its own): what it left, or why nothing.
async fn run(argv: &[String]) -> Result<Finished, String> {
    let (program, args) = argv.split_first().ok_or("empty command")?;
    match tokio::time::timeout(COMMAND_TIMEOUT, exec::run(Path::new(program), args, &[], None)).await {
        Ok(Ok(done)) => Ok(done),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} s", COMMAND_TIMEOUT.as_secs())),
    }
}

/// A failed run for a message: its status and last lines of output, escaped.
fn failure(done: &Finished) -> String {
    format!("{}: {}", done.status, done.tail(3).escape_debug())
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIEW: &str = "port 22\nlistenaddress [::]:22\nlistenaddress 0.0.0.0:22\npasswordauthentication yes\n";

    #[test]
    fn a_wildcard_or_the_address_itself_takes_the_connection() {
        assert!(listens_on_dedicated(VIEW, 22));
        assert!(!listens_on_dedicated(VIEW, 2222), "another port");
        assert!(!listens_on_dedicated("listenaddress [::]:22\n", 22), "IPv6 only");
        assert!(!listens_on_dedicated("listenaddress 127.0.0.1:22\n", 22));
        assert!(listens_on_dedicated("listenaddress 127.0.22.1:22\n", 22));
        assert!(!listens_on_dedicated("", 22));
    }

    #[test]
    fn a_difference_is_named_by_its_setting() {
        assert_eq!(first_difference(VIEW, VIEW), None);
        let reordered = "listenaddress 0.0.0.0:22\nport 22\nlistenaddress [::]:22\npasswordauthentication yes\n";
        assert_eq!(first_difference(VIEW, reordered), None, "order does not matter");
        let no_password = VIEW.replace("passwordauthentication yes", "passwordauthentication no");
        assert_eq!(
            first_difference(VIEW, &no_password).as_deref(),
            Some("passwordauthentication")
        );
        let extra = format!("{VIEW}allowusers nobody\n");
        assert_eq!(first_difference(VIEW, &extra).as_deref(), Some("allowusers"));
    }

    #[test]
    fn the_route_is_a_local_slash_32_with_its_own_source_and_quick_acks() {
        let l = SshLoopback::new(vec!["ip".into(), "-n".into(), "x".into()], vec!["sshd".into()]);
        assert_eq!(
            l.route_argv().join(" "),
            "ip -n x -4 route replace local 127.0.22.1 dev lo table local proto static scope host \
             src 127.0.22.1 quickack 1"
        );
    }

    #[test]
    fn reasons_are_stable() {
        let e = LoopbackError::SshdNotListening {
            port: 22,
            listening: "127.0.0.1:22".into(),
        };
        assert_eq!(e.reason(), "sshd_not_listening");
        assert!(e.to_string().contains("127.0.0.1:22"), "{e}");
    }
}
