//! The client side of guacd's handshake (`select` → `args` → `size`/`audio`/`video`/`image`/
//! `timezone`/`name` → `connect` → `ready`), done by the web side so the browser never sees
//! connection parameters, and the readiness check that asks guacd for a protocol's `args`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::protocol::{DecodeError, Decoder, Instruction};

/// The newest protocol version this side speaks.
pub const NEWEST_VERSION: &str = "VERSION_1_5_0";
/// Versions this side knows, oldest first (`VERSION_1_0_0` is implied by an `args` without one).
const KNOWN_VERSIONS: [&str; 4] = [
    "VERSION_1_0_0",
    "VERSION_1_1_0",
    "VERSION_1_3_0",
    "VERSION_1_5_0",
];
/// guacd gives up on a client after 15 s; this side gives up on guacd sooner.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `args` may take after `select`. guacd answers in milliseconds (13 ms measured for
/// ssh); one that lacks the protocol's plugin logs `Support for protocol "x" is not installed`
/// and neither answers nor closes for at least 10 s, so silence this long means the plugin is
/// missing, not that guacd is slow.
pub const ARGS_WAIT: Duration = Duration::from_secs(3);

/// What the browser says about itself (the tunnel's `GUAC_*` query parameters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// Display width in pixels.
    pub width: u32,
    /// Display height in pixels.
    pub height: u32,
    /// Display resolution.
    pub dpi: u32,
    /// Audio mimetypes the browser plays.
    pub audio: Vec<String>,
    /// Video mimetypes.
    pub video: Vec<String>,
    /// Image mimetypes.
    pub image: Vec<String>,
    /// IANA time zone, e.g. `Europe/Berlin`.
    pub timezone: Option<String>,
    /// A name for the user in the session (protocol 1.5).
    pub name: Option<String>,
}

impl Default for ClientInfo {
    fn default() -> Self {
        Self {
            width: 1024,
            height: 768,
            dpi: 96,
            audio: Vec::new(),
            video: Vec::new(),
            image: vec!["image/png".into(), "image/jpeg".into()],
            timezone: None,
            name: None,
        }
    }
}

/// Why the handshake failed. Each maps to the Guacamole status the tunnel closes with.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// guacd is not listening.
    #[error("guacd at {addr} is not reachable: {source}")]
    Unreachable {
        /// guacd's address.
        addr: SocketAddr,
        /// The connect error.
        source: std::io::Error,
    },
    /// Reading or writing failed midway.
    #[error("guacd connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// guacd did not finish in time.
    #[error("guacd did not complete the handshake within {0:?}")]
    Timeout(Duration),
    /// guacd closed the connection (e.g. no support for the protocol).
    #[error("guacd closed the connection during the handshake (is protocol '{0}' installed?)")]
    Closed(String),
    /// guacd accepted `select` but sent no `args` in time: what a guacd without the protocol's
    /// plugin does.
    #[error(
        "guacd sent no 'args' for protocol '{protocol}' within {waited:?}: \
         its plugin is not installed (libguac-client-{protocol})"
    )]
    ProtocolMissing {
        /// The protocol selected.
        protocol: String,
        /// How long this side waited.
        waited: Duration,
    },
    /// guacd sent something that is not the protocol.
    #[error("guacd sent malformed data: {0}")]
    Malformed(#[from] DecodeError),
    /// guacd answered with an unexpected instruction.
    #[error("guacd sent '{got}' where '{expected}' was expected")]
    Unexpected {
        /// The expected opcode.
        expected: &'static str,
        /// The opcode received.
        got: String,
    },
    /// guacd refused with an `error` instruction.
    #[error("guacd refused: {message} (status {status})")]
    Refused {
        /// guacd's message.
        message: String,
        /// The Guacamole status code.
        status: u16,
    },
}

impl HandshakeError {
    /// Short stable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unreachable { .. } => "guacd-unreachable",
            Self::Io(_) => "guacd-io",
            Self::Timeout(_) => "guacd-timeout",
            Self::Closed(_) => "guacd-closed",
            Self::ProtocolMissing { .. } => "guacd-protocol-missing",
            Self::Malformed(_) => "guacd-malformed",
            Self::Unexpected { .. } => "guacd-unexpected",
            Self::Refused { .. } => "guacd-refused",
        }
    }

    /// The Guacamole status code for the browser (WebSocket close reason).
    pub fn status(&self) -> u16 {
        match self {
            Self::Unreachable { .. } => 0x0207, // UPSTREAM_NOT_FOUND
            Self::Timeout(_) => 0x0202,         // UPSTREAM_TIMEOUT
            Self::Refused { status, .. } => *status,
            Self::Closed(_) | Self::ProtocolMissing { .. } => 0x0208, // UPSTREAM_UNAVAILABLE
            Self::Io(_) | Self::Malformed(_) | Self::Unexpected { .. } => 0x0203, // UPSTREAM_ERROR
        }
    }
}

/// What the guacd at the other end can do for one session, read from its `args`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Whether the remote display follows the browser's `size`. Terminals (ssh, telnet, k8s)
    /// and RDP always do; VNC only where guacd's VNC plugin takes `disable-display-resize`
    /// (guacd 1.6.0 and later); guacd 1.3.0–1.5.x keep the VNC server's own screen size.
    pub display_resizes: bool,
}

impl Capabilities {
    /// The capabilities of a `protocol` session whose `args` named `names`.
    pub fn from_args(protocol: &str, names: &[String]) -> Self {
        let display_resizes = match protocol {
            "vnc" => names.iter().any(|n| n == "disable-display-resize"),
            _ => true,
        };
        Self { display_resizes }
    }
}

/// A guacd connection after `ready`: the stream, the decoder holding whatever guacd already
/// sent after `ready`, and guacd's id for the connection.
pub struct Connected {
    /// The TCP stream to guacd.
    pub stream: TcpStream,
    /// Decoder state (may already hold drawing instructions).
    pub decoder: Decoder,
    /// guacd's connection id (`$<uuid>`).
    pub connection_id: String,
    /// The protocol version agreed.
    pub version: String,
    /// What this guacd can do for the session.
    pub capabilities: Capabilities,
}

/// Read the next whole instruction from guacd.
async fn next_instruction(
    stream: &mut TcpStream,
    decoder: &mut Decoder,
    protocol: &str,
) -> Result<Instruction, HandshakeError> {
    let mut buffer = [0u8; 8192];
    loop {
        if let Some(result) = decoder.next_instruction() {
            return Ok(result?);
        }
        let n = match stream.read(&mut buffer).await {
            // guacd hanging up on unread input shows as a reset, not an end of stream.
            Ok(0) => return Err(HandshakeError::Closed(protocol.to_owned())),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Err(HandshakeError::Closed(protocol.to_owned()))
            }
            Ok(n) => n,
            Err(e) => return Err(e.into()),
        };
        decoder.push(&buffer[..n]);
    }
}

fn refused(instruction: &Instruction) -> HandshakeError {
    HandshakeError::Refused {
        message: instruction.args.first().cloned().unwrap_or_default(),
        status: instruction
            .args
            .get(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x0203),
    }
}

/// Send `select` and read `args`: (version, parameter names).
async fn select(
    stream: &mut TcpStream,
    decoder: &mut Decoder,
    protocol: &str,
) -> Result<(String, Vec<String>), HandshakeError> {
    stream
        .write_all(Instruction::new("select", [protocol]).encode().as_bytes())
        .await?;
    let args = tokio::time::timeout(ARGS_WAIT, next_instruction(stream, decoder, protocol))
        .await
        .map_err(|_| HandshakeError::ProtocolMissing {
            protocol: protocol.to_owned(),
            waited: ARGS_WAIT,
        })??;
    match args.opcode.as_str() {
        "args" => {}
        "error" => return Err(refused(&args)),
        other => {
            return Err(HandshakeError::Unexpected {
                expected: "args",
                got: other.to_owned(),
            })
        }
    }
    let mut names = args.args;
    let version = match names.first() {
        Some(first) if first.starts_with("VERSION_") => names.remove(0),
        _ => "VERSION_1_0_0".to_owned(),
    };
    Ok((version, names))
}

/// The version to answer with: guacd's when this side knows it, else the newest this side
/// speaks (guacd accepts any version up to its own).
fn agreed_version(offered: &str) -> &str {
    KNOWN_VERSIONS
        .iter()
        .find(|v| **v == offered)
        .copied()
        .unwrap_or(NEWEST_VERSION)
}

fn at_least(version: &str, minimum: &str) -> bool {
    let rank = |v: &str| KNOWN_VERSIONS.iter().position(|k| *k == v);
    match (rank(version), rank(minimum)) {
        (Some(v), Some(m)) => v >= m,
        // A version newer than any this side knows supports everything known.
        (None, _) => version.starts_with("VERSION_"),
        _ => false,
    }
}

/// Connect to guacd and open a `protocol` session with `parameters`, answering guacd's `args`
/// in order (unknown names get empty values).
pub async fn connect(
    guacd: SocketAddr,
    protocol: &str,
    parameters: &BTreeMap<String, String>,
    client: &ClientInfo,
) -> Result<Connected, HandshakeError> {
    tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        connect_unbounded(guacd, protocol, parameters, client),
    )
    .await
    .map_err(|_| HandshakeError::Timeout(HANDSHAKE_TIMEOUT))?
}

async fn connect_unbounded(
    guacd: SocketAddr,
    protocol: &str,
    parameters: &BTreeMap<String, String>,
    client: &ClientInfo,
) -> Result<Connected, HandshakeError> {
    let mut stream = open(guacd).await?;
    stream.set_nodelay(true)?;
    let mut decoder = Decoder::new();
    let (offered, names) = select(&mut stream, &mut decoder, protocol).await?;
    let version = agreed_version(&offered).to_owned();
    let capabilities = Capabilities::from_args(protocol, &names);
    let mut out = String::new();
    Instruction::new(
        "size",
        [
            client.width.to_string(),
            client.height.to_string(),
            client.dpi.to_string(),
        ],
    )
    .encode_into(&mut out);
    Instruction::new("audio", client.audio.clone()).encode_into(&mut out);
    Instruction::new("video", client.video.clone()).encode_into(&mut out);
    Instruction::new("image", client.image.clone()).encode_into(&mut out);
    if at_least(&version, "VERSION_1_1_0") {
        if let Some(timezone) = &client.timezone {
            Instruction::new("timezone", [timezone.as_str()]).encode_into(&mut out);
        }
    }
    if at_least(&version, "VERSION_1_5_0") {
        if let Some(name) = &client.name {
            Instruction::new("name", [name.as_str()]).encode_into(&mut out);
        }
    }
    let mut values = Vec::with_capacity(names.len() + 1);
    if offered.starts_with("VERSION_") && offered != "VERSION_1_0_0" {
        values.push(version.clone());
    }
    for name in &names {
        values.push(parameters.get(name).cloned().unwrap_or_default());
    }
    Instruction::new("connect", values).encode_into(&mut out);
    stream.write_all(out.as_bytes()).await?;
    let ready = next_instruction(&mut stream, &mut decoder, protocol).await?;
    match ready.opcode.as_str() {
        "ready" => Ok(Connected {
            stream,
            decoder,
            connection_id: ready.args.into_iter().next().unwrap_or_default(),
            version,
            capabilities,
        }),
        "error" => Err(refused(&ready)),
        other => Err(HandshakeError::Unexpected {
            expected: "ready",
            got: other.to_owned(),
        }),
    }
}

/// A TCP connection to guacd.
async fn open(guacd: SocketAddr) -> Result<TcpStream, HandshakeError> {
    TcpStream::connect(guacd)
        .await
        .map_err(|source| HandshakeError::Unreachable {
            addr: guacd,
            source,
        })
}

/// Whether guacd can open `protocol` sessions: `select` answered by `args` (then hang up).
/// Each call costs guacd a child process that waits 15 s, so call it rarely.
pub async fn check_protocol(guacd: SocketAddr, protocol: &str) -> Result<String, HandshakeError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let mut stream = open(guacd).await?;
        let mut decoder = Decoder::new();
        let (version, _) = select(&mut stream, &mut decoder, protocol).await?;
        Ok(version)
    })
    .await
    .map_err(|_| HandshakeError::Timeout(HANDSHAKE_TIMEOUT))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A scripted guacd: reads until it has seen `expect_through` opcodes, answering as told.
    async fn scripted(
        replies: Vec<(&'static str, &'static str)>,
    ) -> (SocketAddr, tokio::task::JoinHandle<Vec<Instruction>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut decoder = Decoder::new();
            let mut seen = Vec::new();
            let mut buffer = [0u8; 4096];
            let mut replies = replies.into_iter().peekable();
            while let Some((after, reply)) = replies.peek().copied() {
                while !seen.iter().any(|i: &Instruction| i.opcode == after) {
                    if let Some(Ok(i)) = decoder.next_instruction() {
                        seen.push(i);
                        continue;
                    }
                    let n = socket.read(&mut buffer).await.unwrap();
                    if n == 0 {
                        return seen;
                    }
                    decoder.push(&buffer[..n]);
                }
                socket.write_all(reply.as_bytes()).await.unwrap();
                replies.next();
            }
            while let Some(Ok(i)) = decoder.next_instruction() {
                seen.push(i);
            }
            seen
        });
        (addr, task)
    }

    #[tokio::test]
    async fn answers_args_in_order_with_the_version_and_keeps_early_drawing() {
        let (addr, guacd) = scripted(vec![
            (
                "select",
                "4.args,13.VERSION_1_5_0,8.hostname,4.port,8.password,6.unused;",
            ),
            (
                "connect",
                "5.ready,37.$aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee;4.sync,1.1;",
            ),
        ])
        .await;
        let params = BTreeMap::from([
            ("hostname".to_owned(), "127.0.0.1".to_owned()),
            ("port".to_owned(), "22".to_owned()),
            ("password".to_owned(), "a b".to_owned()),
        ]);
        let client = ClientInfo {
            timezone: Some("Europe/Berlin".into()),
            name: Some("exouser".into()),
            ..ClientInfo::default()
        };
        let mut connected = connect(addr, "ssh", &params, &client).await.unwrap();
        assert_eq!(
            connected.connection_id,
            "$aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
        );
        assert_eq!(connected.version, "VERSION_1_5_0");
        assert!(connected.capabilities.display_resizes, "a terminal follows the size");
        let early = connected.decoder.next_instruction().unwrap().unwrap();
        assert_eq!(early, Instruction::new("sync", ["1"]));
        drop(connected);
        let seen = guacd.await.unwrap();
        let opcodes: Vec<_> = seen.iter().map(|i| i.opcode.as_str()).collect();
        assert_eq!(
            opcodes,
            ["select", "size", "audio", "video", "image", "timezone", "name", "connect"]
        );
        assert_eq!(
            seen.last().unwrap().args,
            ["VERSION_1_5_0", "127.0.0.1", "22", "a b", ""]
        );
    }

    #[tokio::test]
    async fn an_old_guacd_gets_no_version_and_no_timezone() {
        let (addr, guacd) = scripted(vec![
            ("select", "4.args,8.hostname;"),
            ("connect", "5.ready,2.$x;"),
        ])
        .await;
        let client = ClientInfo {
            timezone: Some("UTC".into()),
            ..ClientInfo::default()
        };
        let connected = connect(addr, "vnc", &BTreeMap::new(), &client)
            .await
            .unwrap();
        assert!(!connected.capabilities.display_resizes);
        let seen = guacd.await.unwrap();
        assert!(!seen.iter().any(|i| i.opcode == "timezone"));
        assert_eq!(seen.last().unwrap().args, [""]);
    }

    #[tokio::test]
    async fn refusals_and_closes_map_to_guacamole_statuses() {
        let (addr, _) = scripted(vec![("select", "5.error,13.no such thing,3.769;")]).await;
        let e = connect(addr, "ssh", &BTreeMap::new(), &ClientInfo::default())
            .await
            .err()
            .unwrap();
        assert_eq!((e.reason(), e.status()), ("guacd-refused", 769));

        let (addr, _) = scripted(vec![]).await; // accepts, then closes without answering
        let e = check_protocol(addr, "rdp").await.unwrap_err();
        assert_eq!(e.reason(), "guacd-closed");

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed = listener.local_addr().unwrap();
        drop(listener);
        let e = check_protocol(closed, "ssh").await.unwrap_err();
        assert_eq!((e.reason(), e.status()), ("guacd-unreachable", 0x0207));
    }

    #[tokio::test]
    async fn a_guacd_silent_after_select_lacks_the_plugin() {
        // What guacd 1.6 does without the protocol's plugin: reads `select`, says nothing, and
        // keeps the connection open (for at least 10 s; here until the test ends).
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let silent = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buffer = [0u8; 256];
            while socket.read(&mut buffer).await.is_ok_and(|n| n > 0) {}
        });
        let started = std::time::Instant::now();
        let e = check_protocol(addr, "rdp").await.unwrap_err();
        let took = started.elapsed();
        assert_eq!((e.reason(), e.status()), ("guacd-protocol-missing", 0x0208));
        assert!(e.to_string().contains("protocol 'rdp'"), "{e}");
        assert!(e.to_string().contains("libguac-client-rdp"), "{e}");
        assert!(took >= ARGS_WAIT && took < ARGS_WAIT + Duration::from_secs(2), "{took:?}");
        silent.abort();
    }

    #[test]
    fn a_vnc_display_resizes_only_where_guacd_takes_disable_display_resize() {
        let names = |list: &str| list.split(',').map(str::to_owned).collect::<Vec<_>>();
        // The head of guacd 1.3.0's GUAC_VNC_CLIENT_ARGS (src/protocols/vnc/settings.c) and of
        // 1.6.0's, which added display resizing for VNC.
        let v1_3 = names("hostname,port,read-only,encodings,password,swap-red-blue,color-depth");
        let v1_6 = names("hostname,port,read-only,disable-display-resize,encodings,username");
        assert!(!Capabilities::from_args("vnc", &v1_3).display_resizes);
        assert!(Capabilities::from_args("vnc", &v1_6).display_resizes);
        assert!(Capabilities::from_args("ssh", &v1_3).display_resizes);
        assert!(Capabilities::from_args("rdp", &[]).display_resizes);
    }

    #[test]
    fn versions() {
        assert_eq!(agreed_version("VERSION_1_3_0"), "VERSION_1_3_0");
        assert_eq!(agreed_version("VERSION_9_9_9"), NEWEST_VERSION);
        assert!(at_least("VERSION_1_5_0", "VERSION_1_1_0"));
        assert!(!at_least("VERSION_1_0_0", "VERSION_1_1_0"));
        assert!(at_least("VERSION_2_0_0", "VERSION_1_5_0"));
    }
}
