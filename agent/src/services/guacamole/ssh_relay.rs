//! The web side's loopback relay between guacd and this machine's sshd: guacd's SSH and SFTP
//! connections to a loopback sshd go through it, and it answers every segment at once.
//!
//! Why: neither end of guacd's SSH connection sets `TCP_NODELAY` (guacamole-server 1.3.0's
//! `guac_common_ssh_create_session` makes libssh2's socket itself; OpenSSH sets it for
//! interactive sessions only, not the `sftp` subsystem), so a small segment waits under
//! Nagle's algorithm for the other end's delayed ACK: SFTP downloads through guacd stalled
//! ≈ 40 ms at a time, at 5–7 MiB/s on any link (bench/results/file-transfer.md). The relay's
//! sockets send at once (`TCP_NODELAY`) and acknowledge at once (`TCP_QUICKACK`, re-armed after
//! every read because the kernel drops it on its own), so neither end's Nagle waits on anything.
//! It changes nothing on the machine (routes, sysctls) and nothing in guacd.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::web_config::Connection;
use crate::platform::confine;

/// Relayed connections at once per relay (guacd opens one SSH connection per shell tunnel and
/// one per desktop tunnel's SFTP); more are closed at once.
pub const MAX_RELAYED: usize = 64;
/// How long the relay waits for sshd to accept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes read at a time per direction (an SFTP read's answer is a few KiB).
const BUFFER_BYTES: usize = 64 * 1024;

/// One relay: its listening socket (bound before the web side confines itself, which forbids
/// binding) and the sshd it leads to.
#[derive(Debug)]
pub struct SshRelay {
    listener: std::net::TcpListener,
    target: SocketAddr,
}

impl SshRelay {
    /// Listen on an ephemeral loopback port for connections to `target`.
    pub fn bind(target: SocketAddr) -> io::Result<Self> {
        let listener = confine::bind_listener(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0))?;
        Ok(Self { listener, target })
    }

    /// Where guacd is sent instead of `target`.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The sshd it leads to.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Relay every accepted connection to the target, at most `limit` at once, until the
    /// process ends. Runs inside a tokio runtime.
    pub async fn serve(self, limit: usize) -> io::Result<()> {
        let listener = TcpListener::from_std(self.listener)?;
        let slots = Arc::new(Semaphore::new(limit));
        let target = self.target;
        loop {
            let (inbound, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                // A failed accept (out of descriptors, say) must not end the relay.
                Err(e) => {
                    tracing::warn!(%target, "ssh relay: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(%target, limit, "ssh relay: too many connections; one closed");
                continue;
            };
            tokio::spawn(async move {
                if let Err(e) = relay(inbound, target).await {
                    tracing::debug!(%target, "ssh relay: connection ended: {e}");
                }
                drop(slot);
            });
        }
    }
}

/// Send each connection's loopback SSH server (ssh's `hostname`/`port`; vnc's
/// `sftp-hostname`/`sftp-port` when SFTP is on) through a relay: the parameters are rewritten
/// to the relay's address, one relay per distinct server. Non-loopback servers and parameters
/// that do not parse are left as they are.
pub fn relay_loopback_ssh(
    connections: &mut BTreeMap<String, Connection>,
) -> io::Result<Vec<SshRelay>> {
    let mut relays: Vec<SshRelay> = Vec::new();
    for connection in connections.values_mut() {
        let (host_key, port_key, default_host) = match connection.protocol.as_str() {
            "ssh" => ("hostname", "port", None),
            "vnc" if connection.parameters.get("enable-sftp").map(String::as_str) == Some("true") => {
                ("sftp-hostname", "sftp-port", connection.parameters.get("hostname").cloned())
            }
            _ => continue,
        };
        let params = &mut connection.parameters;
        let host = params.get(host_key).cloned().or(default_host);
        let port = params.get(port_key).map_or(Some(22), |p| p.parse::<u16>().ok());
        let (Some(ip), Some(port)) = (host.as_deref().and_then(loopback_ip), port) else {
            continue;
        };
        let target = SocketAddr::new(ip, port);
        let relay_addr = match relays.iter().find(|r| r.target == target) {
            Some(relay) => relay.local_addr()?,
            None => {
                let relay = SshRelay::bind(target)?;
                let addr = relay.local_addr()?;
                relays.push(relay);
                addr
            }
        };
        params.insert(host_key.to_owned(), relay_addr.ip().to_string());
        params.insert(port_key.to_owned(), relay_addr.port().to_string());
    }
    Ok(relays)
}

/// `host` as a loopback address (`localhost` is 127.0.0.1, as guacd's resolver gives first).
fn loopback_ip(host: &str) -> Option<IpAddr> {
    if host == "localhost" {
        return Some(Ipv4Addr::LOCALHOST.into());
    }
    host.parse::<IpAddr>().ok().filter(IpAddr::is_loopback)
}

/// `TCP_NODELAY` and `TCP_QUICKACK` on `stream`.
fn send_and_ack_at_once(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    socket2::SockRef::from(stream).set_tcp_quickack(true)
}

/// One connection: to the target, then both directions until both have ended (a half-close
/// is passed on) or either fails.
async fn relay(inbound: TcpStream, target: SocketAddr) -> io::Result<()> {
    let outbound = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "sshd did not accept in time"))??;
    send_and_ack_at_once(&inbound)?;
    send_and_ack_at_once(&outbound)?;
    let (from_guacd, to_guacd) = inbound.into_split();
    let (from_sshd, to_sshd) = outbound.into_split();
    // On an error both directions are dropped, which closes both sockets.
    tokio::try_join!(pump(from_guacd, to_sshd), pump(from_sshd, to_guacd))?;
    Ok(())
}

/// Copy `from` to `to` until `from` ends, acknowledging each read at once.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf) -> io::Result<()> {
    let mut buffer = vec![0u8; BUFFER_BYTES];
    loop {
        let n = from.read(&mut buffer).await?;
        if n == 0 {
            // Passed on: the other side may still answer.
            return to.shutdown().await;
        }
        // The kernel leaves quick-ack mode by itself; setting it again also sends an ACK
        // still pending for what was just read.
        socket2::SockRef::from(from.as_ref()).set_tcp_quickack(true)?;
        to.write_all(&buffer[..n]).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection(protocol: &str, pairs: &[(&str, &str)]) -> Connection {
        Connection {
            protocol: protocol.into(),
            parameters: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn loopback_ssh_servers_are_sent_through_one_relay_each() {
        let mut connections = BTreeMap::from([
            ("shell".to_owned(), connection("ssh", &[("hostname", "127.0.0.1"), ("port", "22"), ("username", "u")])),
            (
                "desktop".to_owned(),
                connection(
                    "vnc",
                    &[("hostname", "127.0.0.1"), ("port", "5901"), ("enable-sftp", "true"), ("sftp-hostname", "localhost"), ("sftp-port", "22")],
                ),
            ),
            ("other".to_owned(), connection("ssh", &[("hostname", "127.0.0.1"), ("port", "2222")])),
            ("remote".to_owned(), connection("ssh", &[("hostname", "10.0.0.5"), ("port", "22")])),
            ("novnc-sftp".to_owned(), connection("vnc", &[("hostname", "127.0.0.1"), ("port", "5902")])),
            ("bad-port".to_owned(), connection("ssh", &[("hostname", "127.0.0.1"), ("port", "x")])),
        ]);
        let relays = relay_loopback_ssh(&mut connections).unwrap();
        let targets: Vec<SocketAddr> = relays.iter().map(SshRelay::target).collect();
        assert_eq!(targets, vec!["127.0.0.1:22".parse().unwrap(), "127.0.0.1:2222".parse().unwrap()]);
        let relay_22 = relays[0].local_addr().unwrap();
        let shell = &connections["shell"].parameters;
        assert_eq!(shell["hostname"], "127.0.0.1");
        assert_eq!(shell["port"], relay_22.port().to_string());
        assert_eq!(shell["username"], "u");
        let desktop = &connections["desktop"].parameters;
        assert_eq!(desktop["sftp-port"], relay_22.port().to_string());
        assert_eq!(desktop["port"], "5901", "the VNC server itself is not relayed");
        assert_eq!(connections["other"].parameters["port"], relays[1].local_addr().unwrap().port().to_string());
        assert_eq!(connections["remote"].parameters["port"], "22");
        assert_eq!(connections["novnc-sftp"].parameters.get("sftp-port"), None);
        assert_eq!(connections["bad-port"].parameters["port"], "x");
    }

    /// A server that answers each line it reads with the line reversed, then closes its
    /// sending side when the client has closed its own.
    async fn reversing_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut all = Vec::new();
            stream.read_to_end(&mut all).await.unwrap();
            all.reverse();
            stream.write_all(&all).await.unwrap();
        });
        addr
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_and_a_half_close_is_passed_on() {
        let target = reversing_server().await;
        let relay = SshRelay::bind(target).unwrap();
        let addr = relay.local_addr().unwrap();
        tokio::spawn(relay.serve(MAX_RELAYED));
        let mut client = TcpStream::connect(addr).await.unwrap();
        let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        client.write_all(&sent).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        let mut want = sent;
        want.reverse();
        assert_eq!(got, want);
    }

    /// `stream` is closed by the relay soon, not left hanging.
    async fn assert_closed(stream: &mut TcpStream) {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte))
            .await
            .expect("closed, not left hanging");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }

    #[tokio::test]
    async fn connections_past_the_limit_are_closed_at_once() {
        let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay = SshRelay::bind(target.local_addr().unwrap()).unwrap();
        let addr = relay.local_addr().unwrap();
        tokio::spawn(relay.serve(1));
        let _first = TcpStream::connect(addr).await.unwrap();
        let (_held, _) = target.accept().await.unwrap();
        let mut second = TcpStream::connect(addr).await.unwrap();
        assert_closed(&mut second).await;
    }

    #[tokio::test]
    async fn a_target_that_is_not_listening_closes_the_connection() {
        let unused = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let relay = SshRelay::bind(unused).unwrap();
        let addr = relay.local_addr().unwrap();
        tokio::spawn(relay.serve(MAX_RELAYED));
        let mut client = TcpStream::connect(addr).await.unwrap();
        assert_closed(&mut client).await;
    }

    #[tokio::test]
    async fn relayed_sockets_send_and_acknowledge_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        assert!(!client.nodelay().unwrap());
        send_and_ack_at_once(&client).unwrap();
        assert!(client.nodelay().unwrap());
        assert!(socket2::SockRef::from(&client).tcp_quickack().unwrap());
    }
}
