//! File transfer over HTTP, as Apache's web application does it (docs/guacamole.md, "File
//! transfer over HTTP streams"): `GET`/`POST api/session/tunnels/<tunnel>/streams/<index>/<name>`
//! take over one file stream of a tunnel, so the file's bytes cross the browser's link as a
//! plain HTTP body while the blob/ack exchange, one blob per round trip, stays on loopback
//! between the web side and guacd. A download's blobs are acked as soon as they are queued in
//! a small per-download buffer ([`DOWNLOAD_BUFFER_BLOBS`]), not when the browser has taken
//! them, as Apache's `OutputStreamInterceptingFilter` acks once the blob is written into the
//! servlet's (buffered) output stream; a full buffer withholds the ack until the body takes a
//! blob, so a slow browser slows guacd and memory stays bounded. This module owns the tunnel
//! registry, what the relay does with a taken-over stream, and the two handlers.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::BodyExt as _;
use serde_json::json;
use subtle::ConstantTimeEq as _;
use tokio::sync::{mpsc, oneshot};

use super::auth::lock;
use super::protocol::{Frame, Instruction};
use super::rename::{self, Opened, RenameError, SftpPlace};
use super::streams::{self, StreamTable};
use super::tunnel::NOTICE_OPCODE;
use super::web::WebState;

/// Transfers one token may run at once (more get 429).
pub const MAX_TRANSFERS_PER_TOKEN: usize = 4;
/// Bytes per upload blob, as guacamole-common-js and Apache's `InputStreamInterceptingFilter`.
pub const UPLOAD_BLOB_BYTES: usize = 6048;
/// Blobs of a download the web side queues for its HTTP body, acked to guacd as they are
/// queued (4,096 bytes each from guacd's SFTP code: 64 KiB). Besides these, the body's writer
/// holds at most two (one taken from the queue, one handed to the body): a download holds at
/// most `DOWNLOAD_BUFFER_BLOBS + 2` blobs however slow its browser.
pub const DOWNLOAD_BUFFER_BLOBS: usize = 16;
/// Guacamole statuses the web side acks guacd with.
const SERVER_ERROR: u16 = 0x0200;

/// What an HTTP handler asks of the relay of its tunnel.
#[derive(Debug)]
pub enum Control {
    /// How guacd's stream `index` (a download) was announced, without taking it over (the
    /// handler `stat`s the file it reads before [`Control::TakeDownload`]).
    Announced {
        /// The stream.
        index: u32,
        /// The stream as announced, or why it cannot be taken.
        reply: oneshot::Sender<Result<streams::Download, Refusal>>,
    },
    /// Take over guacd's stream `index` (a download): its blobs go to `chunks`, not the page;
    /// the relay acks guacd while `chunks` has room, else sets `withheld` and waits for
    /// [`Control::Drained`].
    TakeDownload {
        /// The stream.
        index: u32,
        /// Where its bytes go (a channel of [`DOWNLOAD_BUFFER_BLOBS`]).
        chunks: mpsc::Sender<Chunk>,
        /// Set by the relay when it withheld an ack because `chunks` was full.
        withheld: Arc<AtomicBool>,
        /// The size of the file the stream reads, when the web side could `stat` it, and the
        /// path it was found for (used only while the stream still names that path).
        expected: Option<Expected>,
        /// The stream as announced (its type, the path a `get` asked for), or why it cannot
        /// be taken.
        reply: oneshot::Sender<Result<streams::Download, Refusal>>,
    },
    /// Take over the page's stream `index` (an upload guacd accepted): guacd's acks on it go
    /// to `acks` instead of the page, until released.
    TakeUpload {
        /// The stream.
        index: u32,
        /// guacd's acks: (status, message).
        acks: mpsc::Sender<(u16, String)>,
        /// How the page opened it, or why it cannot be taken.
        reply: oneshot::Sender<Result<Opened, Refusal>>,
    },
    /// An instruction for guacd (an ack), written between whole instructions.
    Send(String),
    /// A blob for upload `index`, sent only while the handler still holds it.
    UploadBlob {
        /// The stream.
        index: u32,
        /// The `blob` instruction.
        blob: String,
    },
    /// Ends upload `index` at guacd (its `end`; guacd closes the file and acks). The page's
    /// own `end` for it, before or after, is then not passed on: guacd sees one.
    EndUpload(u32),
    /// The handler is done with upload `index`.
    ReleaseUpload(u32),
    /// Download `index`'s body took a blob out of a full buffer: ack guacd if it was withheld.
    Drained(u32),
    /// Download `index`'s browser went away: end the stream at guacd (an error ack).
    AbortDownload(u32),
}

/// Why a stream cannot be taken over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No such stream open in that direction (or, for an upload, not accepted by guacd yet).
    #[error("no such stream")]
    NotOpen,
    /// Another request has it.
    #[error("the stream is already being transferred")]
    Taken,
}

/// guacd's stream `index` ended from this side, as Apache's filter ends one it cannot write:
/// an error `ack`.
fn failed(index: u32) -> String {
    Instruction::new(
        "ack",
        [
            index.to_string().as_str(),
            "FAIL",
            SERVER_ERROR.to_string().as_str(),
        ],
    )
    .encode()
}

/// Why a stream request is refused before any byte moves.
#[derive(Debug, thiserror::Error)]
pub enum StreamRequestError {
    /// No live token, or the tunnel is not one of this token's (the answer does not say
    /// whether it exists elsewhere).
    #[error("Permission denied.")]
    Forbidden,
    /// The token runs [`MAX_TRANSFERS_PER_TOKEN`] transfers already.
    #[error("Too many file transfers at once.")]
    TooMany,
    /// The index is not a number.
    #[error("No such stream.")]
    NoSuchStream,
    /// The relay would not hand the stream over.
    #[error(transparent)]
    Refused(#[from] Refusal),
}

impl StreamRequestError {
    /// Short stable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Forbidden => "stream-forbidden",
            Self::TooMany => "stream-too-many",
            Self::NoSuchStream | Self::Refused(Refusal::NotOpen) => "stream-not-open",
            Self::Refused(Refusal::Taken) => "stream-taken",
        }
    }
}

impl IntoResponse for StreamRequestError {
    fn into_response(self) -> Response {
        let (status, kind) = match &self {
            Self::Forbidden => (StatusCode::FORBIDDEN, "PERMISSION_DENIED"),
            Self::TooMany => (StatusCode::TOO_MANY_REQUESTS, "TOO_MANY_REQUESTS"),
            Self::NoSuchStream | Self::Refused(Refusal::NotOpen) => {
                (StatusCode::NOT_FOUND, "NOT_FOUND")
            }
            Self::Refused(Refusal::Taken) => (StatusCode::CONFLICT, "STREAM_ERROR"),
        };
        tracing::info!(reason = self.reason(), "file stream request refused");
        api_error(status, kind, &self.to_string(), None)
    }
}

/// A piece of a download for its HTTP body.
#[derive(Debug)]
pub enum Chunk {
    /// File bytes.
    Data(Bytes),
    /// guacd ended the stream with every byte of the file (or of a file of unknown size).
    End,
    /// guacd ended the stream short of the file's size: guacd 1.3.0 sends the same `end` when
    /// reading the file failed as at its end. The body is cut ([`feed_body`]).
    Short {
        /// Bytes guacd sent.
        bytes: u64,
        /// The file's size.
        expected: u64,
    },
}

/// The size a download should reach: the file's size when the web side took it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// The path the stream named when the file was `stat`ed.
    pub path: String,
    /// The file's size then.
    pub bytes: u64,
}

/// A download taken over by HTTP, as the relay keeps it.
#[derive(Debug)]
struct Download {
    /// The buffer its body reads.
    chunks: mpsc::Sender<Chunk>,
    /// An ack is out at guacd: one blob (or its `end`) may come, no more.
    awaiting: bool,
    /// The buffer was full when the last blob came; its ack waits for [`Control::Drained`].
    owed: bool,
    /// Tells the body's writer that an ack is owed (it then sends [`Control::Drained`]).
    withheld: Arc<AtomicBool>,
    /// The file's size, when known.
    expected: Option<u64>,
    /// Bytes queued for the body so far.
    queued: u64,
}

/// An `ack` of stream `index` that asks guacd for its next blob.
fn next_please(index: u32) -> String {
    Instruction::new("ack", [index.to_string().as_str(), "OK", "0"]).encode()
}

impl Download {
    /// guacd ended download `index`: tells the body how it ended; what the page is told first
    /// when the body is cut. guacd ends a download in answer to an ack, so the buffer has room
    /// for the end; one that finds it full (or a body gone) cuts the body instead.
    fn end(self, index: u32) -> Option<Instruction> {
        let (chunk, reason) = match self.expected {
            Some(expected) if self.queued < expected => {
                tracing::warn!(
                    stream = index,
                    bytes = self.queued,
                    expected,
                    "guacd ended a download short of the file's size (a failed read); the body is cut"
                );
                (
                    Chunk::Short {
                        bytes: self.queued,
                        expected,
                    },
                    Some(format!(
                        "the server stopped after {} of {expected} bytes (a read error on the remote side); the browser's download is incomplete",
                        self.queued
                    )),
                )
            }
            _ => (Chunk::End, None),
        };
        match (self.chunks.try_send(chunk), reason) {
            (Ok(()), None) => None,
            (Ok(()), Some(reason)) => Some(download_failed(index, &reason)),
            (Err(_), _) => Some(download_failed(
                index,
                "the web side could not finish the download; the browser's download is incomplete",
            )),
        }
    }
}

/// The relay's side: which streams are open, which are taken over and by whom.
#[derive(Debug, Default)]
pub struct Transfers {
    streams: StreamTable,
    downloads: HashMap<u32, Download>,
    uploads: HashMap<u32, mpsc::Sender<(u16, String)>>,
    /// Uploads held by a handler whose `end` the page sent already (dropped).
    page_ended: HashSet<u32>,
    /// Uploads the web side ended whose `end` the page has yet to send (to be dropped).
    web_ended: HashSet<u32>,
}

/// What the relay does with one instruction.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Routing {
    /// Pass it on to the other side.
    pub forward: bool,
    /// Send guacd this (an error ack for a download whose reader went away).
    pub to_guacd: Option<String>,
    /// Send the page this first (the web side's notice that a download failed, before
    /// guacd's `end` of it).
    pub to_page: Option<Instruction>,
}

/// What the page is told, before guacd's `end`, about a download the web side cut (opcode
/// [`NOTICE_OPCODE`]): `exoagent,download,<index>,failed,<reason>`.
fn download_failed(index: u32, reason: &str) -> Instruction {
    Instruction::new(
        NOTICE_OPCODE,
        ["download", index.to_string().as_str(), "failed", reason],
    )
}

impl Transfers {
    /// An instruction from guacd, on its way to the page.
    pub fn from_guacd(&mut self, frame: &Frame<'_>) -> Routing {
        // Only stream instructions name an index; drawing ones (most of the traffic) are not
        // parsed.
        let index = match frame.opcode() {
            "blob" | "end" | "ack" => streams::index(frame.arg(0)),
            _ => None,
        };
        let routing = match (frame.opcode(), index) {
            ("blob", Some(index)) if self.downloads.contains_key(&index) => {
                self.download_blob(index, frame.arg(1))
            }
            ("end", Some(index)) => {
                // The page learns the stream ended too, as with Apache's filter; when the web
                // side cuts the body it is told first (the browser's download manager shows
                // the failure, the page cannot see it otherwise).
                Routing {
                    forward: true,
                    to_guacd: None,
                    to_page: self
                        .downloads
                        .remove(&index)
                        .and_then(|download| download.end(index)),
                }
            }
            // guacd's acks of the blobs the web side sends go to it alone (Apache passes them
            // on too, but then the page cannot tell them from the ack of its own `end`).
            ("ack", Some(index)) if self.uploads.contains_key(&index) => {
                let status = frame
                    .arg(2)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(SERVER_ERROR);
                let message = frame.arg(1).unwrap_or("").to_owned();
                let _ = self.uploads[&index].try_send((status, message));
                Routing::default()
            }
            _ => Routing {
                forward: true,
                to_guacd: None,
                to_page: None,
            },
        };
        self.streams.from_guacd(frame);
        routing
    }

    /// Blob `data` of download `index`: queued for the body, and guacd acked if the buffer has
    /// room left.
    fn download_blob(&mut self, index: u32, data: Option<&str>) -> Routing {
        let Some(download) = self.downloads.get_mut(&index) else {
            return Routing::default();
        };
        let data = data.and_then(|d| base64::engine::general_purpose::STANDARD.decode(d).ok());
        // More blobs than acks (guacd sends one per ack), a blob that is not base64, or a
        // reader that went away: end the stream at guacd, as Apache's filter does when it
        // cannot write.
        let queued = match data {
            Some(data) if download.awaiting => {
                let len = data.len() as u64;
                let queued = download.chunks.try_send(Chunk::Data(Bytes::from(data))).is_ok();
                download.queued += len;
                queued
            }
            _ => false,
        };
        if !queued {
            self.downloads.remove(&index);
            return Routing {
                forward: false,
                to_guacd: Some(failed(index)),
                to_page: None,
            };
        }
        download.awaiting = false;
        if download.chunks.capacity() > 0 {
            download.awaiting = true;
            Routing {
                forward: false,
                to_guacd: Some(next_please(index)),
                to_page: None,
            }
        } else {
            download.owed = true;
            download.withheld.store(true, Ordering::SeqCst);
            Routing::default()
        }
    }

    /// An instruction from the page, on its way to guacd: whether to pass it on. The page's
    /// own acks for a download the web side has taken over are dropped (two acks would put
    /// two blobs in flight).
    pub fn from_browser(&mut self, frame: &Frame<'_>) -> bool {
        let forward = match frame.opcode() {
            "ack" => !streams::index(frame.arg(0)).is_some_and(|i| self.downloads.contains_key(&i)),
            "end" => match streams::index(frame.arg(0)) {
                // A handler holds it: it sends the one `end` when the body is in (or cut).
                Some(index) if self.uploads.contains_key(&index) => {
                    self.page_ended.insert(index);
                    false
                }
                Some(index) => !self.web_ended.remove(&index),
                None => true,
            },
            "file" | "put" => {
                // A new stream at an index the web side ended: the page has freed it.
                let at = if frame.opcode() == "file" { 0 } else { 1 };
                if let Some(index) = streams::index(frame.arg(at)) {
                    self.web_ended.remove(&index);
                }
                true
            }
            _ => true,
        };
        self.streams.from_browser(frame);
        forward
    }

    /// A handler's request; returns what to send guacd, if anything.
    pub fn control(&mut self, control: Control) -> Option<String> {
        match control {
            Control::Announced { index, reply } => {
                let answer = if self.downloads.contains_key(&index) {
                    Err(Refusal::Taken)
                } else {
                    self.streams.download(index).cloned().ok_or(Refusal::NotOpen)
                };
                let _ = reply.send(answer);
                None
            }
            Control::TakeDownload {
                index,
                chunks,
                withheld,
                expected,
                reply,
            } => {
                let answer = if self.downloads.contains_key(&index) {
                    Err(Refusal::Taken)
                } else if let Some(download) = self.streams.download(index) {
                    Ok(download.clone())
                } else {
                    Err(Refusal::NotOpen)
                };
                // The size counts only for the file it was found for (the stream may have ended
                // and another opened at the same index since).
                let expected = match (&answer, expected) {
                    (Ok(announced), Some(e)) if announced.path.as_deref() == Some(&*e.path) => {
                        Some(e.bytes)
                    }
                    _ => None,
                };
                let taken = answer.is_ok();
                if reply.send(answer).is_err() || !taken {
                    return None;
                }
                self.downloads.insert(
                    index,
                    Download {
                        chunks,
                        awaiting: true,
                        owed: false,
                        withheld,
                        expected,
                        queued: 0,
                    },
                );
                // The stream is ready for its blobs (Apache's filter acks on interception).
                Some(next_please(index))
            }
            Control::TakeUpload { index, acks, reply } => {
                let answer = if self.uploads.contains_key(&index) {
                    Err(Refusal::Taken)
                } else {
                    match self.streams.upload(index) {
                        Some(upload) if upload.accepted => {
                            self.uploads.insert(index, acks);
                            Ok(upload.opened.clone())
                        }
                        _ => Err(Refusal::NotOpen),
                    }
                };
                let _ = reply.send(answer);
                None
            }
            Control::Send(instruction) => Some(instruction),
            Control::UploadBlob { index, blob } => self.uploads.contains_key(&index).then_some(blob),
            Control::EndUpload(index) => {
                if !self.uploads.contains_key(&index) {
                    return None;
                }
                // Bounded: guacd takes stream indexes below 64 only.
                if !self.page_ended.remove(&index) && self.web_ended.len() < streams::MAX_TRACKED {
                    self.web_ended.insert(index);
                }
                self.streams.end_upload(index);
                Some(Instruction::new("end", [index.to_string()]).encode())
            }
            Control::ReleaseUpload(index) => {
                self.uploads.remove(&index);
                // The page's `end` was held back and the handler did not end it: pass it on.
                self.page_ended
                    .remove(&index)
                    .then(|| Instruction::new("end", [index.to_string()]).encode())
            }
            Control::Drained(index) => {
                let download = self.downloads.get_mut(&index)?;
                if !download.owed {
                    return None;
                }
                if download.chunks.capacity() == 0 {
                    // Not drained after all: ask again after the next blob the body takes.
                    download.withheld.store(true, Ordering::SeqCst);
                    return None;
                }
                download.owed = false;
                download.awaiting = true;
                Some(next_please(index))
            }
            Control::AbortDownload(index) => {
                self.downloads.remove(&index).map(|_| failed(index))
            }
        }
    }
}

/// A tunnel open for HTTP transfers: the token that opened it and its relay's control channel.
struct Registered {
    token: String,
    control: mpsc::Sender<Control>,
    place: Arc<Result<SftpPlace, RenameError>>,
}

/// The open tunnels by UUID, and the transfers running per token.
#[derive(Default)]
pub struct Registry {
    tunnels: Mutex<HashMap<String, Registered>>,
    running: Mutex<HashMap<String, Arc<AtomicUsize>>>,
}

/// Removes a tunnel from the registry when its relay ends.
pub struct Registration<'a> {
    registry: &'a Registry,
    uuid: String,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        lock(&self.registry.tunnels).remove(&self.uuid);
    }
}


impl Registry {
    /// Registers tunnel `uuid`, opened with `token`, whose relay reads `control`; `place` is
    /// where its uploads land on this machine (or why the web side cannot rename them).
    pub fn register(
        &self,
        uuid: &str,
        token: &str,
        control: mpsc::Sender<Control>,
        place: Result<SftpPlace, RenameError>,
    ) -> Registration<'_> {
        lock(&self.tunnels).insert(
            uuid.to_owned(),
            Registered {
                token: token.to_owned(),
                control,
                place: Arc::new(place),
            },
        );
        Registration {
            registry: self,
            uuid: uuid.to_owned(),
        }
    }

    /// The control channel of tunnel `uuid` and where its uploads land, if `token` opened it.
    #[allow(clippy::type_complexity)]
    fn control(
        &self,
        uuid: &str,
        token: &str,
    ) -> Option<(mpsc::Sender<Control>, Arc<Result<SftpPlace, RenameError>>)> {
        let tunnels = lock(&self.tunnels);
        let registered = tunnels.get(uuid)?;
        let same: bool = registered.token.as_bytes().ct_eq(token.as_bytes()).into();
        same.then(|| (registered.control.clone(), registered.place.clone()))
    }

    /// A transfer slot for `token`, or `None` when it runs [`MAX_TRANSFERS_PER_TOKEN`].
    fn slot(&self, token: &str) -> Option<Slot> {
        let counter = {
            let mut running = lock(&self.running);
            // Tokens with no transfer left hold no entry (the map stays as small as the
            // transfers running).
            running.retain(|_, counter| Arc::strong_count(counter) > 1);
            running.entry(token.to_owned()).or_default().clone()
        };
        let before = counter.fetch_add(1, Ordering::SeqCst);
        let slot = Slot(counter);
        (before < MAX_TRANSFERS_PER_TOKEN).then_some(slot)
    }
}

/// One running transfer; gives its place back when dropped.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An error as Apache's REST API writes it.
fn api_error(status: StatusCode, kind: &str, message: &str, code: Option<u16>) -> Response {
    let mut body = json!({"message": message, "translatableMessage": {"key": message, "variables": null}, "type": kind});
    if let Some(code) = code {
        body["statusCode"] = json!(code);
    }
    (status, axum::Json(body)).into_response()
}

/// The token of a stream request: the `token` query parameter, else `Guacamole-Token`.
fn request_token(query: Option<&str>, headers: &HeaderMap) -> Option<String> {
    query
        .and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "token")
                .map(|(_, v)| v.into_owned())
        })
        .or_else(|| {
            headers
                .get("guacamole-token")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
}

/// An authorised stream request.
struct Authorised {
    control: mpsc::Sender<Control>,
    place: Arc<Result<SftpPlace, RenameError>>,
    slot: Slot,
    index: u32,
}

/// Authorises a stream request: a live token, a tunnel of that token's, a free slot, a
/// stream index.
fn authorise(
    state: &WebState,
    tunnel: &str,
    index: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Authorised, StreamRequestError> {
    let token = request_token(query, headers).ok_or(StreamRequestError::Forbidden)?;
    state
        .auth()
        .touch(&token)
        .ok_or(StreamRequestError::Forbidden)?;
    let (control, place) = state
        .registry()
        .control(tunnel, &token)
        .ok_or(StreamRequestError::Forbidden)?;
    let slot = state
        .registry()
        .slot(&token)
        .ok_or(StreamRequestError::TooMany)?;
    let index = streams::index(Some(index)).ok_or(StreamRequestError::NoSuchStream)?;
    Ok(Authorised {
        control,
        place,
        slot,
        index,
    })
}

/// Asks the relay behind `control` to hand a stream over (`request` is given the reply
/// channel); what it answers.
async fn take<T>(
    control: &mpsc::Sender<Control>,
    request: impl FnOnce(oneshot::Sender<Result<T, Refusal>>) -> Control,
) -> Result<T, StreamRequestError> {
    let (reply, answer) = oneshot::channel();
    control
        .send(request(reply))
        .await
        .map_err(|_| Refusal::NotOpen)?;
    // A relay that ended meanwhile has no such stream any more.
    Ok(answer.await.map_err(|_| Refusal::NotOpen)??)
}

/// An HTTP body fed by a channel; an `Err` item cuts the response (the browser sees a failed
/// download, not a short file).
struct ChannelBody(mpsc::Receiver<std::io::Result<Bytes>>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|item| item.map(|r| r.map(http_body::Frame::data)))
    }
}

/// `GET …/tunnels/<tunnel>/streams/<index>/<filename>`: the file guacd sends on `index`.
pub async fn download(
    State(state): State<Arc<WebState>>,
    Path((tunnel, index, filename)): Path<(String, String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let Authorised {
        control,
        place,
        slot,
        index,
    } = match authorise(&state, &tunnel, &index, query.as_deref(), &headers) {
        Ok(ok) => ok,
        Err(refused) => return refused.into_response(),
    };
    let announced = match take(&control, |reply| Control::Announced { index, reply }).await {
        Ok(announced) => announced,
        Err(refused) => return refused.into_response(),
    };
    // guacd has the file open already; its size now is what a complete download reaches. The
    // relay learns it before the first blob, so it knows at guacd's `end` whether to tell the
    // page the download failed.
    let expected = match (expected_size(&place, announced.path.as_deref()).await, announced.path) {
        (Some(bytes), Some(path)) => Some(Expected { path, bytes }),
        _ => None,
    };
    let (chunks_tx, chunks) = mpsc::channel(DOWNLOAD_BUFFER_BLOBS);
    let withheld = Arc::new(AtomicBool::new(false));
    let taken = take(&control, |reply| Control::TakeDownload {
        index,
        chunks: chunks_tx,
        withheld: withheld.clone(),
        expected: expected.clone(),
        reply,
    })
    .await;
    let announced = match taken {
        Ok(announced) => announced,
        Err(refused) => return refused.into_response(),
    };
    let expected = expected.map(|e| e.bytes);
    tracing::info!(stream = index, expected, "download taken over by HTTP");
    let mimetype = announced.mimetype;
    let (body_tx, body_rx) = mpsc::channel::<std::io::Result<Bytes>>(1);
    tokio::spawn(async move {
        let _slot = slot;
        feed_body(index, chunks, &withheld, &control, &body_tx).await;
    });
    let mut response = Response::new(Body::new(ChannelBody(body_rx)));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&mimetype)
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::CONTENT_DISPOSITION, attachment(&filename));
    response
}

/// The size of the file a download reads, when the web side can see it: the download answers
/// a `get` (it has a path), the connection's SFTP is this machine as this user ([`SftpPlace`]),
/// and the path is a regular file (after symlinks, as guacd's SFTP opens it). `None` otherwise.
/// Only `stat`: the confinement (`platform/confine.rs`) does not govern it, the file is not
/// opened.
async fn expected_size(place: &Result<SftpPlace, RenameError>, name: Option<&str>) -> Option<u64> {
    let path = place.as_ref().ok()?.download_path(name?)?;
    let meta = tokio::fs::metadata(&path).await.ok()?;
    meta.is_file().then_some(meta.len())
}

/// Moves download `index`'s queued blobs into its HTTP body until guacd ends the stream;
/// tells the relay when it took a blob out of a full buffer (`withheld`), so guacd gets the
/// ack it was owed. A browser that goes away, even while guacd is silent, ends the stream at
/// guacd. guacd's `end` short of the file's size (the relay compares, [`Chunk::Short`]) cuts
/// the body: guacd 1.3.0 ends a stream whose read failed as if the file had ended, and a clean
/// end would let the browser keep a short file as complete.
async fn feed_body(
    index: u32,
    mut chunks: mpsc::Receiver<Chunk>,
    withheld: &AtomicBool,
    control: &mpsc::Sender<Control>,
    body: &mpsc::Sender<std::io::Result<Bytes>>,
) {
    let mut sent = 0u64;
    loop {
        let chunk = tokio::select! {
            chunk = chunks.recv() => chunk,
            () = body.closed() => {
                let _ = control.send(Control::AbortDownload(index)).await;
                return;
            }
        };
        if withheld.swap(false, Ordering::SeqCst)
            && control.send(Control::Drained(index)).await.is_err()
        {
            let _ = body.send(Err(cut("the session ended"))).await;
            return;
        }
        match chunk {
            Some(Chunk::Data(data)) => {
                sent += data.len() as u64;
                if body.send(Ok(data)).await.is_err() {
                    let _ = control.send(Control::AbortDownload(index)).await;
                    return;
                }
            }
            Some(Chunk::End) => return,
            Some(Chunk::Short { bytes, expected }) => {
                debug_assert_eq!(bytes, sent);
                let _ = body
                    .send(Err(cut(&format!(
                        "guacd ended the download at {bytes} of {expected} bytes"
                    ))))
                    .await;
                return;
            }
            // The relay dropped the buffer: the session ended, or the stream failed.
            None => {
                let _ = body.send(Err(cut("the stream ended without its end"))).await;
                return;
            }
        }
    }
}

fn cut(why: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, why.to_owned())
}

/// `Content-Disposition: attachment` naming `filename` (RFC 6266 `filename*`, UTF-8).
fn attachment(filename: &str) -> HeaderValue {
    let encoded: String = filename
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    HeaderValue::from_str(&format!("attachment; filename*=UTF-8''{encoded}"))
        .unwrap_or(HeaderValue::from_static("attachment"))
}

/// `POST …/tunnels/<tunnel>/streams/<index>/<filename>`: the body goes to guacd on `index`,
/// 6,048 bytes per blob, each after guacd acked the previous one; then the web side ends the
/// stream and, when the page opened it as `<filename>.incomplete-upload`, renames the file to
/// `<filename>` (module [`rename`]). A body cut short (the page cancelled) ends the stream
/// without renaming: the partial file keeps its temporary name.
pub async fn upload(
    State(state): State<Arc<WebState>>,
    Path((tunnel, index, filename)): Path<(String, String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Authorised {
        control,
        place,
        slot: _slot,
        index,
    } = match authorise(&state, &tunnel, &index, query.as_deref(), &headers) {
        Ok(ok) => ok,
        Err(refused) => return refused.into_response(),
    };
    let (acks_tx, mut acks) = mpsc::channel(2);
    let taken = take(&control, |reply| Control::TakeUpload {
        index,
        acks: acks_tx,
        reply,
    })
    .await;
    let opened = match taken {
        Ok(opened) => opened,
        Err(refused) => return refused.into_response(),
    };
    tracing::info!(stream = index, "upload taken over by HTTP");
    // In a task of its own, so that a request dropped with its connection (a cancelled
    // upload) still ends the stream at guacd and gives it back.
    let finished = tokio::spawn(async move {
        let _slot = _slot;
        finish_upload(index, body, &control, &mut acks, &place, &opened, &filename).await
    });
    finished.await.unwrap_or_else(|_| {
        api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "STREAM_ERROR",
            "The upload failed inside the web side.",
            Some(SERVER_ERROR),
        )
    })
}

/// Sends the body, ends the stream, renames; the answer for the page.
async fn finish_upload(
    index: u32,
    body: Body,
    control: &mpsc::Sender<Control>,
    acks: &mut mpsc::Receiver<(u16, String)>,
    place: &Result<SftpPlace, RenameError>,
    opened: &Opened,
    filename: &str,
) -> Response {
    let result = pump_upload(index, body, control, acks).await;
    let result = match result {
        // guacd has every byte; its ack of the end says the file is closed.
        Ok(bytes) => end_upload(index, control, acks).await.map(|()| bytes),
        Err(UploadFailure::Body) => {
            let _ = end_upload(index, control, acks).await;
            Err(UploadFailure::Body)
        }
        Err(other) => Err(other),
    };
    let _ = control.send(Control::ReleaseUpload(index)).await;
    let bytes = match result {
        Ok(bytes) => bytes,
        Err(failure) => return upload_failed(index, opened, failure),
    };
    // Only a stream opened under the URL's name with the suffix is renamed; one opened under
    // its final name (a page that does not use the temporary name) is already in place.
    let renamed = match opened {
        Opened::File(name) | Opened::Put(name) if !name.ends_with(rename::SUFFIX) => Ok(None),
        _ => place
            .as_ref()
            .map_err(|e| e.to_string())
            .and_then(|place| place.paths(opened, filename).map_err(|e| e.to_string()))
            .and_then(|(temporary, target)| {
                rename::complete(&temporary, &target, bytes)
                    .map(|()| Some(target))
                    .map_err(|e| e.to_string())
            }),
    };
    match renamed {
        Ok(target) => {
            tracing::info!(stream = index, bytes, renamed = target.is_some(), "upload done");
            StatusCode::OK.into_response()
        }
        Err(why) => {
            // `why` names the file from the URL: as a Debug field its control characters are escaped.
            tracing::warn!(stream = index, bytes, why = ?why, "upload done but not renamed");
            api_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "STREAM_ERROR",
                &format!(
                    "The file was uploaded but keeps its temporary name {:?}: {why}",
                    temporary_name(opened)
                ),
                Some(SERVER_ERROR),
            )
        }
    }
}

/// The file name part of the name a stream was opened with.
fn temporary_name(opened: &Opened) -> &str {
    let (Opened::File(name) | Opened::Put(name)) = opened;
    name.rsplit(['/', '\\']).next().unwrap_or(name)
}

/// The answer for an upload that did not complete.
fn upload_failed(index: u32, opened: &Opened, failure: UploadFailure) -> Response {
    match failure {
        UploadFailure::Guacd(status, message) => {
            api_error(StatusCode::INTERNAL_SERVER_ERROR, "STREAM_ERROR", &message, Some(status))
        }
        UploadFailure::Body => {
            tracing::info!(stream = index, "upload cut short (cancelled); the partial file keeps its name");
            api_error(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                &format!(
                    "The upload's body was cut short; what arrived is in {:?}.",
                    temporary_name(opened)
                ),
                None,
            )
        }
        UploadFailure::Closed => api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "STREAM_ERROR",
            "The session ended during the upload.",
            Some(SERVER_ERROR),
        ),
    }
}

/// How long the web side waits for guacd to ack the end of an upload (close the file).
const END_ACK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Ends upload `index` at guacd and waits for its ack (the file written and closed).
async fn end_upload(
    index: u32,
    control: &mpsc::Sender<Control>,
    acks: &mut mpsc::Receiver<(u16, String)>,
) -> Result<(), UploadFailure> {
    control
        .send(Control::EndUpload(index))
        .await
        .map_err(|_| UploadFailure::Closed)?;
    match tokio::time::timeout(END_ACK_WAIT, acks.recv()).await {
        Ok(Some((0, _))) => Ok(()),
        Ok(Some((status, message))) => Err(UploadFailure::Guacd(status, message)),
        Ok(None) | Err(_) => Err(UploadFailure::Closed),
    }
}

enum UploadFailure {
    Guacd(u16, String),
    Body,
    Closed,
}

/// Sends `body` to guacd as blobs, one in flight; the bytes sent.
async fn pump_upload(
    index: u32,
    mut body: Body,
    control: &mpsc::Sender<Control>,
    acks: &mut mpsc::Receiver<(u16, String)>,
) -> Result<u64, UploadFailure> {
    let mut pending = bytes::BytesMut::new();
    let mut sent = 0u64;
    let mut ended = false;
    loop {
        while !ended && pending.len() < UPLOAD_BLOB_BYTES {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        pending.extend_from_slice(&data);
                    }
                }
                Some(Err(_)) => return Err(UploadFailure::Body),
                None => ended = true,
            }
        }
        if pending.is_empty() {
            return Ok(sent);
        }
        let piece = pending.split_to(pending.len().min(UPLOAD_BLOB_BYTES));
        let blob = Instruction::new(
            "blob",
            [
                index.to_string(),
                base64::engine::general_purpose::STANDARD.encode(&piece),
            ],
        )
        .encode();
        control
            .send(Control::UploadBlob { index, blob })
            .await
            .map_err(|_| UploadFailure::Closed)?;
        match acks.recv().await {
            Some((0, _)) => sent += piece.len() as u64,
            Some((status, message)) => return Err(UploadFailure::Guacd(status, message)),
            None => return Err(UploadFailure::Closed),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::services::guacamole::protocol::Decoder;

    /// What the relay does with `wire` (instructions guacd sent): the routings.
    fn from_guacd(transfers: &mut Transfers, wire: &str) -> Vec<Routing> {
        let mut decoder = Decoder::new();
        decoder.push(wire.as_bytes());
        let mut routings = Vec::new();
        while let Some(frame) = decoder.next_frame() {
            routings.push(transfers.from_guacd(&frame.unwrap()));
        }
        routings
    }

    fn blob(index: u32, data: &[u8]) -> String {
        let data = base64::engine::general_purpose::STANDARD.encode(data);
        Instruction::new("blob", [index.to_string(), data]).encode()
    }

    /// A relay with download 5 announced by guacd and taken over: the relay, the buffer's
    /// reading end, the flag and the relay's first instruction to guacd.
    fn taken_download() -> (Transfers, mpsc::Receiver<Chunk>, Arc<AtomicBool>, Option<String>) {
        taken_download_of(None)
    }

    /// As [`taken_download`], the web side having found `/a.bin` to be `expected` bytes.
    fn taken_download_of(
        expected: Option<u64>,
    ) -> (Transfers, mpsc::Receiver<Chunk>, Arc<AtomicBool>, Option<String>) {
        let mut transfers = Transfers::default();
        from_guacd(
            &mut transfers,
            "4.body,1.0,1.5,24.application/octet-stream,6./a.bin;",
        );
        let (chunks_tx, chunks) = mpsc::channel(DOWNLOAD_BUFFER_BLOBS);
        let withheld = Arc::new(AtomicBool::new(false));
        let (reply, mut answer) = oneshot::channel();
        let first = transfers.control(Control::TakeDownload {
            index: 5,
            chunks: chunks_tx,
            withheld: withheld.clone(),
            expected: expected.map(|bytes| Expected {
                path: "/a.bin".into(),
                bytes,
            }),
            reply,
        });
        let announced = answer.try_recv().unwrap().unwrap();
        assert_eq!(announced.mimetype, "application/octet-stream");
        assert_eq!(announced.path.as_deref(), Some("/a.bin"));
        (transfers, chunks, withheld, first)
    }

    const ACK: &str = "3.ack,1.5,2.OK,1.0;";
    const FAIL: &str = "3.ack,1.5,4.FAIL,3.512;";

    #[test]
    fn download_blobs_are_acked_as_queued_until_the_buffer_is_full() {
        let (mut transfers, mut chunks, withheld, first) = taken_download();
        // Taking the stream over asks guacd for its first blob.
        assert_eq!(first.as_deref(), Some(ACK));
        // Nobody reads: every blob but the one that fills the buffer is acked at once.
        for n in 1..=DOWNLOAD_BUFFER_BLOBS {
            let routing = from_guacd(&mut transfers, &blob(5, &[n as u8; 4096])).remove(0);
            assert!(!routing.forward, "blob {n} reached the page");
            if n < DOWNLOAD_BUFFER_BLOBS {
                assert_eq!(routing.to_guacd.as_deref(), Some(ACK), "blob {n}");
            } else {
                assert_eq!(routing.to_guacd, None, "blob {n} acked with a full buffer");
            }
        }
        assert!(withheld.load(Ordering::SeqCst));
        // A drain signal without a drained buffer asks nothing of guacd.
        assert_eq!(transfers.control(Control::Drained(5)), None);
        // The body takes one: the withheld ack goes out, once.
        assert!(matches!(chunks.try_recv(), Ok(Chunk::Data(d)) if d[..] == [1u8; 4096][..]));
        assert_eq!(transfers.control(Control::Drained(5)).as_deref(), Some(ACK));
        assert_eq!(transfers.control(Control::Drained(5)), None);
        // guacd's answer refills the buffer: no ack again.
        let routing = from_guacd(&mut transfers, &blob(5, b"x")).remove(0);
        assert_eq!(routing.to_guacd, None);
    }

    #[test]
    fn a_blob_guacd_was_not_asked_for_fails_the_stream() {
        let (mut transfers, _chunks, _withheld, _) = taken_download();
        for _ in 0..DOWNLOAD_BUFFER_BLOBS {
            from_guacd(&mut transfers, &blob(5, b"abc"));
        }
        // The buffer is full and no ack is out: one more blob is more than guacd was asked.
        let routing = from_guacd(&mut transfers, &blob(5, b"abc")).remove(0);
        assert_eq!(routing.to_guacd.as_deref(), Some(FAIL));
        assert!(!routing.forward);
        // The stream is no longer taken over: the page's own acks pass again.
        let mut decoder = Decoder::new();
        decoder.push(ACK.as_bytes());
        assert!(transfers.from_browser(&decoder.next_frame().unwrap().unwrap()));
    }

    #[test]
    fn a_blob_that_is_not_base64_fails_the_stream() {
        let (mut transfers, _chunks, _withheld, _) = taken_download();
        let routing = from_guacd(&mut transfers, "4.blob,1.5,2.!!;").remove(0);
        assert_eq!(routing.to_guacd.as_deref(), Some(FAIL));
        assert!(!routing.forward);
    }

    #[test]
    fn guacd_s_end_reaches_the_body_and_the_page() {
        let (mut transfers, mut chunks, _withheld, _) = taken_download();
        from_guacd(&mut transfers, &blob(5, b"last"));
        let routing = from_guacd(&mut transfers, "3.end,1.5;").remove(0);
        assert!(routing.forward);
        assert!(matches!(chunks.try_recv(), Ok(Chunk::Data(_))));
        assert!(matches!(chunks.try_recv(), Ok(Chunk::End)));
        // The buffer's sender is gone with the stream.
        assert!(matches!(
            chunks.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
    }

    /// The notice the page gets with guacd's `end` of download 5 after `blobs` blobs of 4096
    /// bytes, the file being `expected` bytes; and what the body got last.
    fn page_told_at_end(blobs: usize, expected: Option<u64>) -> (Option<String>, Option<Chunk>) {
        let (mut transfers, mut chunks, _withheld, _) = taken_download_of(expected);
        for n in 0..blobs {
            from_guacd(&mut transfers, &blob(5, &[n as u8; 4096]));
        }
        let routing = from_guacd(&mut transfers, "3.end,1.5;").remove(0);
        assert!(routing.forward, "guacd's end did not reach the page");
        let mut last = None;
        while let Ok(chunk) = chunks.try_recv() {
            last = Some(chunk);
        }
        (routing.to_page.map(|i| i.encode()), last)
    }

    #[test]
    fn the_page_is_told_before_guacd_s_end_when_the_body_is_cut() {
        // guacd 1.3.0's failed read: `end` after 3 blobs of a file of 5.
        let (told, last) = page_told_at_end(3, Some(5 * 4096));
        let told = told.expect("the page was not told");
        assert!(
            told.starts_with("8.exoagent,8.download,1.5,6.failed,"),
            "{told}"
        );
        assert!(told.contains("after 12288 of 20480 bytes"), "{told}");
        assert!(matches!(
            last,
            Some(Chunk::Short {
                bytes: 12288,
                expected: 20480
            })
        ));
        // A complete file, more (it grew), an empty file, an unknown size: nothing to tell.
        for (blobs, expected) in [(5, Some(5 * 4096)), (5, Some(4 * 4096)), (0, Some(0)), (3, None)] {
            let (told, last) = page_told_at_end(blobs, expected);
            assert_eq!(told, None, "{blobs} blobs, expected {expected:?}");
            assert!(matches!(last, Some(Chunk::End)), "{blobs} blobs, expected {expected:?}");
        }
    }

    #[test]
    fn a_size_found_for_another_path_is_not_used() {
        let mut transfers = Transfers::default();
        from_guacd(
            &mut transfers,
            "4.body,1.0,1.5,24.application/octet-stream,6./b.bin;",
        );
        // The handler looks first: the stream as announced, not taken yet.
        let (reply, mut answer) = oneshot::channel();
        assert_eq!(transfers.control(Control::Announced { index: 5, reply }), None);
        assert_eq!(answer.try_recv().unwrap().unwrap().path.as_deref(), Some("/b.bin"));
        let (chunks_tx, mut chunks) = mpsc::channel(DOWNLOAD_BUFFER_BLOBS);
        let (reply, _answer) = oneshot::channel();
        transfers.control(Control::TakeDownload {
            index: 5,
            chunks: chunks_tx,
            withheld: Arc::new(AtomicBool::new(false)),
            expected: Some(Expected {
                path: "/a.bin".into(),
                bytes: 4096,
            }),
            reply,
        });
        let routing = from_guacd(&mut transfers, "3.end,1.5;").remove(0);
        assert_eq!(routing.to_page.map(|i| i.encode()), None);
        assert!(matches!(chunks.try_recv(), Ok(Chunk::End)));
        // Taken, it is no longer offered; unknown, it never was.
        let (reply, mut answer) = oneshot::channel();
        transfers.control(Control::Announced { index: 7, reply });
        assert_eq!(answer.try_recv().unwrap().unwrap_err(), Refusal::NotOpen);
    }

    /// A relay and a guacd that answers each ack with one 4096-byte blob of `blobs`, then
    /// `end`; the number of acks guacd got, as it changes.
    fn relay_with_guacd(
        mut transfers: Transfers,
        first: Option<String>,
        mut control: mpsc::Receiver<Control>,
        blobs: usize,
    ) -> (tokio::sync::watch::Receiver<usize>, tokio::sync::watch::Receiver<Vec<String>>) {
        let (acks_tx, acks) = tokio::sync::watch::channel(0usize);
        let (other_tx, other) = tokio::sync::watch::channel(Vec::new());
        tokio::spawn(async move {
            let mut to_guacd: std::collections::VecDeque<String> = first.into_iter().collect();
            let mut sent = 0usize;
            loop {
                while let Some(instruction) = to_guacd.pop_front() {
                    if instruction != ACK {
                        other_tx.send_modify(|o| o.push(instruction));
                        continue;
                    }
                    acks_tx.send_modify(|n| *n += 1);
                    let wire = if sent < blobs {
                        sent += 1;
                        blob(5, &[sent as u8; 4096])
                    } else {
                        "3.end,1.5;".to_owned()
                    };
                    for routing in from_guacd(&mut transfers, &wire) {
                        to_guacd.extend(routing.to_guacd);
                    }
                }
                let Some(request) = control.recv().await else { return };
                to_guacd.extend(transfers.control(request));
            }
        });
        (acks, other)
    }

    #[tokio::test]
    async fn a_body_that_is_not_read_holds_the_download_at_a_bounded_number_of_blobs() {
        let (transfers, chunks, withheld, first) = taken_download();
        let (control_tx, control_rx) = mpsc::channel(8);
        let blobs = 100;
        let (mut acks, _other) = relay_with_guacd(transfers, first, control_rx, blobs);
        let (body_tx, mut body) = mpsc::channel(1);
        let feeder = tokio::spawn(async move {
            feed_body(5, chunks, &withheld, &control_tx, &body_tx).await;
        });
        // Nobody reads the body: guacd is asked for the buffer, plus the blob the feeder
        // holds and the one in the body's slot, and then for nothing more.
        let held = DOWNLOAD_BUFFER_BLOBS + 2;
        acks.wait_for(|n| *n >= held).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(*acks.borrow(), held, "guacd was asked for more than the buffer holds");
        // The body reads: the rest follows, in order, and the body ends after guacd's end.
        let mut got = Vec::new();
        while let Some(item) = body.recv().await {
            got.push(item.unwrap());
        }
        feeder.await.unwrap();
        assert_eq!(got.len(), blobs);
        assert!(got.iter().enumerate().all(|(i, d)| d[..] == [(i + 1) as u8; 4096][..]));
        // One ack per blob and one that got the end.
        assert_eq!(*acks.borrow(), blobs + 1);
    }

    #[tokio::test]
    async fn a_browser_that_goes_away_ends_the_stream_at_guacd() {
        let (transfers, chunks, withheld, first) = taken_download();
        let (control_tx, control_rx) = mpsc::channel(8);
        let (mut acks, mut other) = relay_with_guacd(transfers, first, control_rx, 1000);
        let (body_tx, mut body) = mpsc::channel(1);
        let feeder = tokio::spawn(async move {
            feed_body(5, chunks, &withheld, &control_tx, &body_tx).await;
        });
        assert!(body.recv().await.unwrap().is_ok());
        acks.wait_for(|n| *n >= DOWNLOAD_BUFFER_BLOBS + 2).await.unwrap();
        drop(body);
        feeder.await.unwrap();
        other.wait_for(|o| !o.is_empty()).await.unwrap();
        assert_eq!(*other.borrow(), [FAIL.to_owned()]);
    }

    #[tokio::test]
    async fn a_session_that_ends_cuts_the_body() {
        let (transfers, chunks, withheld, _first) = taken_download();
        let (control_tx, _control_rx) = mpsc::channel(8);
        let (body_tx, mut body) = mpsc::channel(1);
        let feeder = tokio::spawn(async move {
            feed_body(5, chunks, &withheld, &control_tx, &body_tx).await;
        });
        // The relay ends: the buffer's sender goes with it.
        drop(transfers);
        assert!(body.recv().await.unwrap().is_err(), "a cut body looked complete");
        feeder.await.unwrap();
    }

    /// Download 5 through a relay whose guacd sends `blobs` blobs of 4096 bytes then `end`,
    /// its body fed with `expected` as the file's size: the body's items, read to the end.
    async fn download_through(blobs: usize, expected: Option<u64>) -> Vec<std::io::Result<Bytes>> {
        let (transfers, chunks, withheld, first) = taken_download_of(expected);
        let (control_tx, control_rx) = mpsc::channel(8);
        let (_acks, _other) = relay_with_guacd(transfers, first, control_rx, blobs);
        let (body_tx, mut body) = mpsc::channel(1);
        let feeder = tokio::spawn(async move {
            feed_body(5, chunks, &withheld, &control_tx, &body_tx).await;
        });
        let mut items = Vec::new();
        while let Some(item) = body.recv().await {
            items.push(item);
        }
        feeder.await.unwrap();
        items
    }

    #[tokio::test]
    async fn an_end_short_of_the_file_s_size_cuts_the_body() {
        // guacd 1.3.0's failed read: `end` after 3 blobs of a file of 5.
        let items = download_through(3, Some(5 * 4096)).await;
        assert_eq!(items.len(), 4);
        assert!(items[..3].iter().all(|i| i.as_ref().is_ok_and(|d| d.len() == 4096)));
        let err = items[3].as_ref().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        // One byte short is short too.
        let items = download_through(3, Some(3 * 4096 + 1)).await;
        assert!(items.last().unwrap().is_err(), "a download one byte short looked complete");
    }

    #[tokio::test]
    async fn an_end_at_or_past_the_file_s_size_or_of_unknown_size_ends_cleanly() {
        // Exactly the size; more (the file grew while it was read); an empty file; unknown.
        for (blobs, expected) in [(5, Some(5 * 4096)), (5, Some(4 * 4096)), (0, Some(0)), (3, None)] {
            let items = download_through(blobs, expected).await;
            assert_eq!(items.len(), blobs, "{blobs} blobs, expected {expected:?}");
            assert!(items.iter().all(Result::is_ok), "{blobs} blobs, expected {expected:?} was cut");
        }
    }

    #[tokio::test]
    async fn the_size_is_known_only_for_a_regular_file_the_web_side_sees() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f.bin");
        std::fs::write(&file, [7u8; 1234]).unwrap();
        std::os::unix::fs::symlink(&file, dir.path().join("link")).unwrap();
        let own = rename::OwnUser {
            name: "exouser".into(),
            home: dir.path().to_owned(),
        };
        let params: std::collections::BTreeMap<String, String> = [
            ("hostname", "127.0.0.1"),
            ("username", "exouser"),
            ("enable-sftp", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let place = SftpPlace::for_connection("ssh", &params, &own);
        let name = |leaf: &str| dir.path().join(leaf).to_str().unwrap().to_owned();
        assert_eq!(expected_size(&place, Some(&name("f.bin"))).await, Some(1234));
        // A symlink is followed, as guacd's SFTP open follows it.
        assert_eq!(expected_size(&place, Some(&name("link"))).await, Some(1234));
        // Not a regular file, missing, no path (`file`), a name guacd refuses: unknown.
        assert_eq!(expected_size(&place, Some(dir.path().to_str().unwrap())).await, None);
        assert_eq!(expected_size(&place, Some(&name("missing"))).await, None);
        assert_eq!(expected_size(&place, None).await, None);
        assert_eq!(expected_size(&place, Some("f.bin")).await, None);
        // A connection whose SFTP is not this machine as this user: unknown.
        let elsewhere = Err(RenameError::NotLocal);
        assert_eq!(expected_size(&elsewhere, Some(&name("f.bin"))).await, None);
    }

    /// Feeds one instruction to `t` from guacd or the browser; whether it is passed on.
    fn feed(t: &mut Transfers, from_guacd: bool, wire: &str) -> bool {
        let mut decoder = Decoder::new();
        decoder.push(wire.as_bytes());
        let frame = decoder.next_frame().unwrap().unwrap();
        if from_guacd {
            t.from_guacd(&frame).forward
        } else {
            t.from_browser(&frame)
        }
    }

    /// Takes upload `index` over; how the page opened it.
    fn take_upload(t: &mut Transfers, index: u32) -> (Opened, mpsc::Receiver<(u16, String)>) {
        let (acks, acks_rx) = mpsc::channel(2);
        let (reply, mut answer) = oneshot::channel();
        assert_eq!(t.control(Control::TakeUpload { index, acks, reply }), None);
        (answer.try_recv().unwrap().unwrap(), acks_rx)
    }

    #[test]
    fn guacd_sees_one_end_whether_the_page_sends_its_own_before_or_after_the_web_side() {
        let mut t = Transfers::default();
        assert!(feed(&mut t, false, "4.file,1.2,24.application/octet-stream,23.a.bin.incomplete-upload;"));
        assert!(feed(&mut t, true, "3.ack,1.2,17.SFTP: File opened,1.0;"));
        let (opened, mut acks) = take_upload(&mut t, 2);
        assert_eq!(opened, Opened::File("a.bin.incomplete-upload".into()));
        // Blobs go while the handler holds the stream; guacd's acks go to it, not the page.
        let blob = t.control(Control::UploadBlob { index: 2, blob: "4.blob,1.2,4.AAAA;".into() });
        assert_eq!(blob.as_deref(), Some("4.blob,1.2,4.AAAA;"));
        assert!(!feed(&mut t, true, "3.ack,1.2,8.SFTP: OK,1.0;"));
        assert_eq!(acks.try_recv().unwrap(), (0, "SFTP: OK".into()));
        // The web side ends it; the page's later `end` is not passed on.
        assert_eq!(t.control(Control::EndUpload(2)).as_deref(), Some("3.end,1.2;"));
        assert!(!feed(&mut t, true, "3.ack,1.2,8.SFTP: OK,1.0;"));
        assert_eq!(t.control(Control::ReleaseUpload(2)), None);
        assert!(!feed(&mut t, false, "3.end,1.2;"));
        // Released and ended: no second POST, and a new stream at the index is the page's.
        assert!(t.streams.upload(2).is_none());
        assert!(feed(&mut t, false, "4.file,1.2,24.application/octet-stream,5.b.bin;"));
        assert!(feed(&mut t, false, "3.end,1.2;"));

        // The page ends first (it cancelled) while the handler holds the stream: its `end` is
        // held back, the handler's is the one guacd gets, and no blob follows it.
        assert!(feed(&mut t, false, "4.file,1.3,24.application/octet-stream,5.c.bin;"));
        assert!(feed(&mut t, true, "3.ack,1.3,17.SFTP: File opened,1.0;"));
        let (_, _acks) = take_upload(&mut t, 3);
        assert!(!feed(&mut t, false, "3.end,1.3;"));
        assert_eq!(t.control(Control::EndUpload(3)).as_deref(), Some("3.end,1.3;"));
        assert_eq!(t.control(Control::ReleaseUpload(3)), None);
        let late = t.control(Control::UploadBlob { index: 3, blob: "4.blob,1.3,4.AAAA;".into() });
        assert_eq!(late, None);
        assert!(t.web_ended.is_empty());

        // The handler gives up without ending (guacd refused a blob): the held `end` goes then.
        assert!(feed(&mut t, false, "4.file,1.4,24.application/octet-stream,5.d.bin;"));
        assert!(feed(&mut t, true, "3.ack,1.4,17.SFTP: File opened,1.0;"));
        let (_, _acks) = take_upload(&mut t, 4);
        assert!(!feed(&mut t, false, "3.end,1.4;"));
        assert_eq!(t.control(Control::ReleaseUpload(4)).as_deref(), Some("3.end,1.4;"));
    }
}
