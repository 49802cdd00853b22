//! The WebSocket tunnel between a browser and guacd, after the handshake: whole instructions
//! per WebSocket message (guacamole-common-js 1.5 cannot parse a message that ends mid-way),
//! the tunnel UUID first, the browser's internal instructions filtered and its pings echoed,
//! and a close whose reason is the Guacamole status code.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::auth::Authenticator;
use super::handshake::{Connected, HandshakeError};
use super::transfer::{Control, Transfers};
use super::protocol::{has_astral, Decoder, Frame, Instruction, LengthUnit, Limits};

/// How the browser's library counts lengths: guacamole-common-js 1.5 (the page's) counts UTF-16
/// units, guacd code points. They differ only for characters outside the Basic Multilingual
/// Plane (emoji, say in a file name); such instructions are re-encoded on the way through.
pub const BROWSER_LENGTHS: LengthUnit = LengthUnit::Utf16;

/// An instruction from the browser, as guacd reads it.
fn for_guacd<'a>(frame: &Frame<'a>) -> std::borrow::Cow<'a, str> {
    if BROWSER_LENGTHS != LengthUnit::CodePoints && has_astral(frame.as_str()) {
        frame.to_instruction().encode().into()
    } else {
        frame.as_str().into()
    }
}

/// An instruction from guacd, as the browser reads it.
fn for_browser<'a>(frame: &Frame<'a>) -> std::borrow::Cow<'a, str> {
    if BROWSER_LENGTHS != LengthUnit::CodePoints && has_astral(frame.as_str()) {
        frame
            .to_instruction()
            .encode_counting(BROWSER_LENGTHS)
            .into()
    } else {
        frame.as_str().into()
    }
}

/// Messages to the browser carry whole instructions up to about this size (the Java endpoint
/// uses 8 KiB); one larger instruction goes alone.
pub const MESSAGE_TARGET_BYTES: usize = 8192;
/// How often tunnel traffic renews the token (activity keeps a session alive).
const TOUCH_EVERY: Duration = Duration::from_secs(30);

/// Guacamole status codes the tunnel closes with.
pub mod status {
    /// The session ended normally.
    pub const SUCCESS: u16 = 0x0000;
    /// guacd sent something that is not the protocol.
    pub const UPSTREAM_ERROR: u16 = 0x0203;
    /// The browser sent something that is not the protocol.
    pub const CLIENT_BAD_REQUEST: u16 = 0x0300;
    /// The token is unknown or expired.
    pub const CLIENT_UNAUTHORIZED: u16 = 0x0301;
    /// No such connection.
    pub const RESOURCE_NOT_FOUND: u16 = 0x0204;
}

/// A random UUID (version 4), as the tunnel's id.
pub fn new_uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Close the browser's WebSocket with a Guacamole status code as the reason.
pub async fn close(socket: &mut WebSocket, status: u16) {
    // 1000 for a normal end, 1011 (server error) otherwise; the client reads the reason.
    let code = if status == status::SUCCESS {
        1000
    } else {
        1011
    };
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from(status.to_string()),
    };
    let _ = socket.send(Message::Close(Some(frame))).await;
}

/// How a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// guacd closed the session.
    ByGuacd,
    /// The browser closed the WebSocket.
    ByBrowser,
    /// One side broke the protocol or the connection failed; the status sent.
    Failed(u16),
    /// guacd aborted the session with an `error` instruction carrying this status (logged when
    /// it arrived), whichever side then closed first. The page got the instruction itself, so
    /// the WebSocket closes as Apache Guacamole's tunnel does after it: normally.
    Aborted(u16),
}

/// The web side's own instruction to its page (opcode [`NOTICE_OPCODE`]): what this session can
/// do, beside guacd's instructions. guacamole-common-js's client ignores opcodes it has no
/// handler for, so a stock client is unaffected; exoagent's page reads it.
pub const NOTICE_OPCODE: &str = "exoagent";

/// What the page is told about a session. Besides these, `transfer.rs` tells it, just before
/// guacd's `end` of a download the web side cut, `exoagent,download,<index>,failed,<reason>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Whether the remote display follows the window (from guacd's `args`).
    Display {
        /// `true`: `size` resizes the remote display; `false`: it keeps its own size.
        resizes: bool,
    },
    /// The web side serves this tunnel's file streams over HTTP (`transfer.rs`).
    FileStreams,
    /// File transfer is off for this session: guacd could not open SFTP (its status and
    /// message), and the session was reopened without it.
    FilesUnavailable {
        /// guacd's status code.
        status: u16,
        /// guacd's message.
        message: String,
    },
}

impl Notice {
    /// The instruction carrying it.
    pub fn instruction(&self) -> Instruction {
        match self {
            Self::Display { resizes } => Instruction::new(
                NOTICE_OPCODE,
                ["display", if *resizes { "resizes" } else { "fixed" }],
            ),
            Self::FileStreams => Instruction::new(NOTICE_OPCODE, ["files", "streams"]),
            Self::FilesUnavailable { status, message } => Instruction::new(
                NOTICE_OPCODE,
                [
                    "files",
                    "unavailable",
                    status.to_string().as_str(),
                    message.as_str(),
                ],
            ),
        }
    }
}

/// guacd's message when the VNC server itself cannot be reached (every version from 1.0.0
/// on sends it with UPSTREAM_NOT_FOUND; 1.3.0 sends "Aborted. See logs." for everything).
const VNC_UNREACHABLE: &str = "Unable to connect to VNC server.";

/// Why the relay loop stopped.
enum Stop {
    /// The tunnel is over.
    Ended(Ended),
    /// guacd aborted the session before drawing anything while SFTP was on: every guacd
    /// (1.3.0 to 1.6.0, `guac_vnc_client_thread`) connects SFTP after the VNC server and before
    /// the display exists, and aborts the whole session when SFTP fails.
    EarlyAbort {
        /// guacd's status code.
        status: u16,
        /// guacd's message.
        message: String,
    },
}

/// One guacd connection being relayed.
struct Upstream {
    read: tokio::net::tcp::OwnedReadHalf,
    write: tokio::net::tcp::OwnedWriteHalf,
    decoder: Decoder,
    /// Until guacd draws something, an abort may be SFTP's (see [`Stop::EarlyAbort`]).
    before_first_drawing: bool,
}

impl Upstream {
    fn new(connected: Connected, watch_early_abort: bool) -> Self {
        let (read, write) = connected.stream.into_split();
        Self {
            read,
            write,
            decoder: connected.decoder,
            before_first_drawing: watch_early_abort,
        }
    }
}

/// Reopens a session without SFTP after guacd aborted it because SFTP failed.
pub type ReopenWithoutSftp =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Connected, HandshakeError>> + Send>>;

/// One tunnel: the page's WebSocket, its UUID, the token that opened it and the channel on
/// which the HTTP file-stream handlers reach its relay.
pub struct Tunnel {
    /// The page's WebSocket.
    pub socket: WebSocket,
    /// The tunnel's UUID (sent first; names it in the stream endpoints).
    pub uuid: String,
    /// The token, renewed while traffic flows.
    pub token: String,
    /// Requests of the HTTP file-stream handlers.
    pub control: tokio::sync::mpsc::Receiver<Control>,
}

/// Relay until either side ends. With `without_sftp`, a session guacd aborts before drawing
/// anything (SFTP failed) is reopened by that future once, and the page told that file
/// transfer is off.
pub async fn relay(
    tunnel: Tunnel,
    guacd: Connected,
    auth: Arc<Authenticator>,
    without_sftp: Option<ReopenWithoutSftp>,
) -> Ended {
    let Tunnel {
        mut socket,
        uuid,
        token,
        control,
    } = tunnel;
    let display = Notice::Display {
        resizes: guacd.capabilities.display_resizes,
    };
    let mut upstream = Upstream::new(guacd, without_sftp.is_some());
    let mut session = Session {
        from_browser: Decoder::with_limits(Limits::FROM_BROWSER).counting(BROWSER_LENGTHS),
        last_touch: Instant::now(),
        aborted: None,
        auth,
        token,
        transfers: Transfers::default(),
        control: Some(control),
    };
    // The tunnel's UUID alone first, as Apache's tunnel sends it; then what the page may know.
    for opening in [
        Instruction::tunnel_uuid(uuid).encode(),
        display.instruction().encode(),
        Notice::FileStreams.instruction().encode(),
    ] {
        if socket.send(Message::Text(opening.into())).await.is_err() {
            return Ended::ByBrowser;
        }
    }
    let ended = match session.run(&mut socket, &mut upstream).await {
        Stop::Ended(ended) => ended,
        Stop::EarlyAbort { status, message } => {
            let _ = upstream.write.write_all(b"10.disconnect;").await;
            drop(upstream);
            match without_sftp {
                Some(reopen) => {
                    session
                        .reopen_without_sftp(&mut socket, reopen, status, message)
                        .await
                }
                // Not watched without a way to reopen: run() never stops this way then.
                None => Ended::Aborted(status),
            }
        }
    };
    finish(socket, ended, session.aborted).await
}

/// The browser's side of a tunnel, kept across a reopened guacd session.
struct Session {
    from_browser: Decoder,
    last_touch: Instant,
    aborted: Option<u16>,
    auth: Arc<Authenticator>,
    token: String,
    /// File streams of the current guacd session, some taken over by HTTP handlers.
    transfers: Transfers,
    /// The HTTP handlers' requests (`None` once every sender is gone).
    control: Option<tokio::sync::mpsc::Receiver<Control>>,
}

impl Session {
    /// After an early abort: log guacd's error, reopen without SFTP, tell the page, relay on.
    async fn reopen_without_sftp(
        &mut self,
        socket: &mut WebSocket,
        reopen: ReopenWithoutSftp,
        status: u16,
        message: String,
    ) -> Ended {
        tracing::warn!(
            status,
            detail = %super::web::shown(&message),
            "guacd aborted the session before drawing (its SFTP connection failed); reopening it without file transfer"
        );
        let connected = match reopen.await {
            Ok(connected) => connected,
            Err(e) => {
                tracing::warn!(reason = e.reason(), "reopening without SFTP failed: {}", super::web::shown(&e.to_string()));
                return Ended::Failed(e.status());
            }
        };
        tracing::info!(guacd_id = %super::web::shown(&connected.connection_id), "session reopened without SFTP: file transfer is off for it");
        let notice = Notice::FilesUnavailable { status, message }.instruction();
        let text = notice.encode_counting(BROWSER_LENGTHS);
        if socket.send(Message::Text(text.into())).await.is_err() {
            return Ended::ByBrowser;
        }
        let mut upstream = Upstream::new(connected, false);
        // A new guacd session: none of the old one's streams exist any more.
        self.transfers = Transfers::default();
        match self.run(socket, &mut upstream).await {
            Stop::Ended(ended) => ended,
            // Not watched the second time.
            Stop::EarlyAbort { status, .. } => Ended::Aborted(status),
        }
    }

    /// Passes on what guacd sent (less what HTTP transfers take) and answers guacd for them.
    async fn pass_on_from_guacd(&mut self, upstream: &mut Upstream, socket: &mut WebSocket) -> Result<(), Stop> {
        let mut to_guacd = String::new();
        let result =
            forward_to_browser(upstream, socket, &mut self.aborted, &mut self.transfers, &mut to_guacd)
                .await;
        if !to_guacd.is_empty() && upstream.write.write_all(to_guacd.as_bytes()).await.is_err() {
            return Err(Stop::Ended(Ended::ByGuacd));
        }
        result
    }

    /// Relay between the browser and one guacd connection until either side ends.
    async fn run(&mut self, socket: &mut WebSocket, upstream: &mut Upstream) -> Stop {
        let mut read_buffer = vec![0u8; 16 * 1024];
        // Instructions guacd sent right after `ready` are already in the decoder.
        if let Err(stop) = self.pass_on_from_guacd(upstream, socket).await {
            return stop;
        }
        if self.aborted.is_some() {
            let _ = upstream.write.write_all(b"10.disconnect;").await;
            return Stop::Ended(Ended::ByGuacd);
        }
        loop {
            tokio::select! {
                read = upstream.read.read(&mut read_buffer) => match read {
                    Ok(0) | Err(_) => return Stop::Ended(Ended::ByGuacd),
                    Ok(n) => {
                        upstream.decoder.push(&read_buffer[..n]);
                        if let Err(stop) = self.pass_on_from_guacd(upstream, socket).await {
                            return stop;
                        }
                        // guacd's `error` means the session is over. guacd 1.3.0 still keeps the
                        // connection (sending `nop`s) until the client disconnects or its 15 s
                        // "User is not responding" timeout, then sends a second error (776): end
                        // it now, as the stock client does on `error`.
                        if self.aborted.is_some() {
                            let _ = upstream.write.write_all(b"10.disconnect;").await;
                            return Stop::Ended(Ended::ByGuacd);
                        }
                    }
                },
                control = next_control(&mut self.control) => {
                    let Some(instruction) = self.transfers.control(control) else {
                        continue;
                    };
                    if upstream.write.write_all(instruction.as_bytes()).await.is_err() {
                        return Stop::Ended(Ended::ByGuacd);
                    }
                }
                message = socket.recv() => {
                    let text = match message {
                        None | Some(Ok(Message::Close(_))) => return Stop::Ended(Ended::ByBrowser),
                        // A frame the library refused (a text frame that is not UTF-8, say): a
                        // close with the status, like other bad input; on a dead connection the
                        // close just fails.
                        Some(Err(_)) => return Stop::Ended(Ended::Failed(status::CLIENT_BAD_REQUEST)),
                        Some(Ok(Message::Text(text))) => text,
                        // Guacamole speaks text; WebSocket pings are answered by the library.
                        Some(Ok(Message::Binary(_))) => {
                            return Stop::Ended(Ended::Failed(status::CLIENT_BAD_REQUEST))
                        }
                        Some(Ok(_)) => continue,
                    };
                    if self.last_touch.elapsed() >= TOUCH_EVERY {
                        if self.auth.touch(&self.token).is_none() {
                            return Stop::Ended(Ended::Failed(status::CLIENT_UNAUTHORIZED));
                        }
                        self.last_touch = Instant::now();
                    }
                    self.from_browser.push(text.as_bytes());
                    let mut to_guacd = String::new();
                    let mut echoes = Vec::new();
                    let mut bad = false;
                    while let Some(frame) = self.from_browser.next_frame() {
                        match frame {
                            Ok(frame) if frame.is_ping() => echoes.push(frame.as_str().to_owned()),
                            // Other internal instructions are for the tunnel, never for guacd.
                            Ok(frame) if frame.is_internal() => {}
                            Ok(frame) => {
                                if self.transfers.from_browser(&frame) {
                                    to_guacd.push_str(&for_guacd(&frame));
                                }
                            }
                            Err(_) => {
                                bad = true;
                                break;
                            }
                        }
                    }
                    if bad {
                        return Stop::Ended(Ended::Failed(status::CLIENT_BAD_REQUEST));
                    }
                    for echo in echoes {
                        if socket.send(Message::Text(echo.into())).await.is_err() {
                            break;
                        }
                    }
                    if !to_guacd.is_empty()
                        && upstream.write.write_all(to_guacd.as_bytes()).await.is_err()
                    {
                        return Stop::Ended(Ended::ByGuacd);
                    }
                }
            }
        }
    }
}

/// The next request of an HTTP handler; pends forever once none can come.
async fn next_control(control: &mut Option<tokio::sync::mpsc::Receiver<Control>>) -> Control {
    if let Some(receiver) = control {
        if let Some(request) = receiver.recv().await {
            return request;
        }
        *control = None;
    }
    std::future::pending().await
}

async fn finish(mut socket: WebSocket, ended: Ended, aborted: Option<u16>) -> Ended {
    let ended = match (ended, aborted) {
        (Ended::ByGuacd | Ended::ByBrowser, Some(code)) => Ended::Aborted(code),
        (ended, _) => ended,
    };
    match ended {
        Ended::ByGuacd | Ended::Aborted(_) => close(&mut socket, status::SUCCESS).await,
        Ended::Failed(code) => close(&mut socket, code).await,
        Ended::ByBrowser => {}
    }
    ended
}

/// guacd's `error` instruction (`error,<message>,<status>`): its message and status.
fn guacd_error(frame: &Frame<'_>) -> (String, u16) {
    let message = frame.arg(0).unwrap_or("").to_owned();
    let code = frame
        .arg(1)
        .and_then(|c| c.parse::<u16>().ok())
        .unwrap_or(status::UPSTREAM_ERROR);
    (message, code)
}

/// guacd's `error`: logged as it passes, the message escaped and shortened, and remembered
/// for the tunnel's end.
fn note_guacd_error(message: &str, code: u16, aborted: &mut Option<u16>) {
    tracing::warn!(
        status = code,
        detail = %super::web::shown(message),
        "guacd ended the session with an error"
    );
    aborted.get_or_insert(code);
}

/// Where an instruction from guacd leaves a session still watched for an early abort.
enum Early {
    /// Not an abort, nothing drawn yet: still watching.
    Waiting,
    /// The session has begun drawing (or the abort is the VNC server's own): stop watching.
    Drawing,
    /// guacd aborted before drawing.
    Abort(String, u16),
}

fn early(frame: &Frame<'_>) -> Early {
    match frame.opcode() {
        // guacd's keep-alive while it connects, and the desktop's name (sent before the display
        // by some versions): nothing drawn yet.
        "nop" | "name" => Early::Waiting,
        "error" => {
            let (message, code) = guacd_error(frame);
            if message == VNC_UNREACHABLE {
                Early::Drawing
            } else {
                Early::Abort(message, code)
            }
        }
        _ => Early::Drawing,
    }
}

/// Send every whole instruction the decoder holds, batched into messages of about
/// [`MESSAGE_TARGET_BYTES`].
async fn forward_to_browser(
    upstream: &mut Upstream,
    socket: &mut WebSocket,
    aborted: &mut Option<u16>,
    transfers: &mut Transfers,
    to_guacd: &mut String,
) -> Result<(), Stop> {
    let mut batch = String::new();
    let mut stop = None;
    loop {
        match upstream.decoder.next_frame() {
            None => break,
            Some(Err(_)) => {
                stop = Some(Stop::Ended(Ended::Failed(status::UPSTREAM_ERROR)));
                break;
            }
            Some(Ok(frame)) => {
                if upstream.before_first_drawing {
                    match early(&frame) {
                        Early::Waiting => {}
                        Early::Drawing => upstream.before_first_drawing = false,
                        Early::Abort(message, status) => {
                            stop = Some(Stop::EarlyAbort { status, message });
                            break;
                        }
                    }
                }
                if frame.opcode() == "error" {
                    let (message, code) = guacd_error(&frame);
                    note_guacd_error(&message, code, aborted);
                }
                let routing = transfers.from_guacd(&frame);
                if let Some(answer) = routing.to_guacd {
                    to_guacd.push_str(&answer);
                }
                if !routing.forward {
                    continue;
                }
                let text = match routing.to_page {
                    Some(first) => {
                        let mut text = first.encode_counting(BROWSER_LENGTHS);
                        text.push_str(&for_browser(&frame));
                        std::borrow::Cow::Owned(text)
                    }
                    None => for_browser(&frame),
                };
                if !batch.is_empty() && batch.len() + text.len() > MESSAGE_TARGET_BYTES {
                    let full = std::mem::take(&mut batch);
                    socket
                        .send(Message::Text(full.into()))
                        .await
                        .map_err(|_| Stop::Ended(Ended::ByBrowser))?;
                }
                batch.push_str(&text);
            }
        }
    }
    if !batch.is_empty() {
        let sent = socket.send(Message::Text(batch.into())).await;
        if sent.is_err() && stop.is_none() {
            return Err(Stop::Ended(Ended::ByBrowser));
        }
    }
    stop.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_frame(input: &str, unit: LengthUnit) -> (String, String) {
        let mut decoder = Decoder::new().counting(unit);
        decoder.push(input.as_bytes());
        let frame = decoder.next_frame().unwrap().unwrap();
        (
            for_guacd(&frame).into_owned(),
            for_browser(&frame).into_owned(),
        )
    }

    #[test]
    fn emoji_lengths_are_translated_between_utf16_and_code_points() {
        // From the page (guacamole-common-js 1.5): "😀.txt" is 6 UTF-16 units, 5 code points.
        let (to_guacd, _) = one_frame("4.file,1.3,10.text/plain,6.😀.txt;", LengthUnit::Utf16);
        assert_eq!(to_guacd, "4.file,1.3,10.text/plain,5.😀.txt;");
        // From guacd: the other way.
        let (_, to_browser) =
            one_frame("4.file,1.3,10.text/plain,5.😀.txt;", LengthUnit::CodePoints);
        assert_eq!(to_browser, "4.file,1.3,10.text/plain,6.😀.txt;");
        // Everything else passes unchanged (the common case costs nothing).
        let plain = "4.file,1.3,10.text/plain,6.é.txtx;";
        assert_eq!(
            one_frame(plain, LengthUnit::Utf16),
            (plain.to_owned(), plain.to_owned())
        );
    }

    #[test]
    fn uuids_are_version_4() {
        let u = new_uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"));
        assert_ne!(u, new_uuid());
    }
}
