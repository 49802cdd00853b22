//! The WebSocket tunnel between a browser and guacd, after the handshake: whole instructions
//! per WebSocket message (guacamole-common-js 1.5 cannot parse a message that ends mid-way),
//! the tunnel UUID first, the browser's internal instructions filtered and its pings echoed,
//! and a close whose reason is the Guacamole status code.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::auth::Authenticator;
use super::handshake::Connected;
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

/// Relay until either side ends. `token` is renewed while traffic flows.
pub async fn relay(
    mut socket: WebSocket,
    guacd: Connected,
    auth: Arc<Authenticator>,
    token: String,
) -> Ended {
    let Connected {
        stream,
        decoder: mut from_guacd,
        ..
    } = guacd;
    let (mut guacd_read, mut guacd_write) = stream.into_split();
    let mut from_browser = Decoder::with_limits(Limits::FROM_BROWSER).counting(BROWSER_LENGTHS);
    let mut read_buffer = vec![0u8; 16 * 1024];
    let mut last_touch = Instant::now();
    let mut aborted = None;

    if socket
        .send(Message::Text(
            Instruction::tunnel_uuid(new_uuid()).encode().into(),
        ))
        .await
        .is_err()
    {
        return Ended::ByBrowser;
    }
    // Instructions guacd sent right after `ready` are already in the decoder.
    if let Err(ended) = forward_to_browser(&mut from_guacd, &mut socket, &mut aborted).await {
        return finish(socket, ended, aborted).await;
    }
    if aborted.is_some() {
        let _ = guacd_write.write_all(b"10.disconnect;").await;
        return finish(socket, Ended::ByGuacd, aborted).await;
    }

    let ended = loop {
        tokio::select! {
            read = guacd_read.read(&mut read_buffer) => match read {
                Ok(0) | Err(_) => break Ended::ByGuacd,
                Ok(n) => {
                    from_guacd.push(&read_buffer[..n]);
                    if let Err(ended) =
                        forward_to_browser(&mut from_guacd, &mut socket, &mut aborted).await
                    {
                        break ended;
                    }
                    // guacd's `error` means the session is over. guacd 1.3.0 still keeps the
                    // connection (sending `nop`s) until the client disconnects or its 15 s
                    // "User is not responding" timeout, then sends a second error (776): end
                    // it now, as the stock client does on `error`.
                    if aborted.is_some() {
                        let _ = guacd_write.write_all(b"10.disconnect;").await;
                        break Ended::ByGuacd;
                    }
                }
            },
            message = socket.recv() => {
                let text = match message {
                    None | Some(Ok(Message::Close(_))) => break Ended::ByBrowser,
                    // A frame the library refused (a text frame that is not UTF-8, say): a
                    // close with the status, like other bad input; on a dead connection the
                    // close just fails.
                    Some(Err(_)) => break Ended::Failed(status::CLIENT_BAD_REQUEST),
                    Some(Ok(Message::Text(text))) => text,
                    // Guacamole speaks text; WebSocket pings are answered by the library.
                    Some(Ok(Message::Binary(_))) => break Ended::Failed(status::CLIENT_BAD_REQUEST),
                    Some(Ok(_)) => continue,
                };
                if last_touch.elapsed() >= TOUCH_EVERY {
                    if auth.touch(&token).is_none() {
                        break Ended::Failed(status::CLIENT_UNAUTHORIZED);
                    }
                    last_touch = Instant::now();
                }
                from_browser.push(text.as_bytes());
                let mut to_guacd = String::new();
                let mut echoes = Vec::new();
                let mut bad = false;
                while let Some(frame) = from_browser.next_frame() {
                    match frame {
                        Ok(frame) if frame.is_ping() => echoes.push(frame.as_str().to_owned()),
                        // Other internal instructions are for the tunnel, never for guacd.
                        Ok(frame) if frame.is_internal() => {}
                        Ok(frame) => to_guacd.push_str(&for_guacd(&frame)),
                        Err(_) => {
                            bad = true;
                            break;
                        }
                    }
                }
                if bad {
                    break Ended::Failed(status::CLIENT_BAD_REQUEST);
                }
                for echo in echoes {
                    if socket.send(Message::Text(echo.into())).await.is_err() {
                        break;
                    }
                }
                if !to_guacd.is_empty() && guacd_write.write_all(to_guacd.as_bytes()).await.is_err() {
                    break Ended::ByGuacd;
                }
            }
        }
    };
    finish(socket, ended, aborted).await
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

/// guacd's `error` instruction (`error,<message>,<status>`): logged as it passes, the message
/// escaped and shortened, and remembered for the tunnel's end.
fn note_guacd_error(frame: &Frame<'_>, aborted: &mut Option<u16>) {
    let message = frame.arg(0).unwrap_or("");
    let code = frame.arg(1).and_then(|c| c.parse::<u16>().ok());
    tracing::warn!(
        status = code,
        detail = %super::web::shown(message),
        "guacd ended the session with an error"
    );
    aborted.get_or_insert(code.unwrap_or(status::UPSTREAM_ERROR));
}

/// Send every whole instruction the decoder holds, batched into messages of about
/// [`MESSAGE_TARGET_BYTES`].
async fn forward_to_browser(
    decoder: &mut Decoder,
    socket: &mut WebSocket,
    aborted: &mut Option<u16>,
) -> Result<(), Ended> {
    let mut batch = String::new();
    loop {
        match decoder.next_frame() {
            None => break,
            Some(Err(_)) => {
                if !batch.is_empty() {
                    let _ = socket.send(Message::Text(batch.into())).await;
                }
                return Err(Ended::Failed(status::UPSTREAM_ERROR));
            }
            Some(Ok(frame)) => {
                if frame.opcode() == "error" {
                    note_guacd_error(&frame, aborted);
                }
                let text = for_browser(&frame);
                if !batch.is_empty() && batch.len() + text.len() > MESSAGE_TARGET_BYTES {
                    let full = std::mem::take(&mut batch);
                    socket
                        .send(Message::Text(full.into()))
                        .await
                        .map_err(|_| Ended::ByBrowser)?;
                }
                batch.push_str(&text);
            }
        }
    }
    if !batch.is_empty() {
        socket
            .send(Message::Text(batch.into()))
            .await
            .map_err(|_| Ended::ByBrowser)?;
    }
    Ok(())
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
