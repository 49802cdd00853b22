//! File transfer over HTTP, as Apache's web application does it (docs/guacamole.md, "File
//! transfer over HTTP streams"): `GET`/`POST api/session/tunnels/<tunnel>/streams/<index>/<name>`
//! take over one file stream of a tunnel, so the file's bytes cross the browser's link as a
//! plain HTTP body while the blob/ack exchange, one blob per round trip, stays on loopback
//! between the web side and guacd. This module owns the tunnel registry, what the relay does
//! with a taken-over stream, and the two handlers.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
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
use super::web::WebState;

/// Transfers one token may run at once (more get 429).
pub const MAX_TRANSFERS_PER_TOKEN: usize = 4;
/// Bytes per upload blob, as guacamole-common-js and Apache's `InputStreamInterceptingFilter`.
pub const UPLOAD_BLOB_BYTES: usize = 6048;
/// Guacamole statuses the web side acks guacd with.
const SERVER_ERROR: u16 = 0x0200;

/// What an HTTP handler asks of the relay of its tunnel.
#[derive(Debug)]
pub enum Control {
    /// Take over guacd's stream `index` (a download): its blobs go to `chunks`, not the page.
    TakeDownload {
        /// The stream.
        index: u32,
        /// Where its bytes go.
        chunks: mpsc::Sender<Chunk>,
        /// The stream's type, or why it cannot be taken.
        reply: oneshot::Sender<Result<String, Refusal>>,
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
    /// guacd ended the stream: the file is complete.
    End,
}

/// The relay's side: which streams are open, which are taken over and by whom.
#[derive(Debug, Default)]
pub struct Transfers {
    streams: StreamTable,
    downloads: HashMap<u32, mpsc::Sender<Chunk>>,
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
                let data = frame
                    .arg(1)
                    .and_then(|d| base64::engine::general_purpose::STANDARD.decode(d).ok());
                let sent = data.map(|data| {
                    self.downloads[&index].try_send(Chunk::Data(Bytes::from(data)))
                });
                match sent {
                    Some(Ok(())) => Routing::default(),
                    // The reader went away, guacd sent more than one blob per ack, or the
                    // blob was not base64: end the stream at guacd, as Apache's filter does
                    // when it cannot write.
                    _ => {
                        self.downloads.remove(&index);
                        Routing {
                            forward: false,
                            to_guacd: Some(failed(index)),
                        }
                    }
                }
            }
            ("end", Some(index)) => {
                if let Some(chunks) = self.downloads.remove(&index) {
                    let _ = chunks.try_send(Chunk::End);
                }
                // The page learns the stream ended too, as with Apache's filter.
                Routing {
                    forward: true,
                    to_guacd: None,
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
            },
        };
        self.streams.from_guacd(frame);
        routing
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
            Control::TakeDownload {
                index,
                chunks,
                reply,
            } => {
                let answer = if self.downloads.contains_key(&index) {
                    Err(Refusal::Taken)
                } else if let Some(download) = self.streams.download(index) {
                    self.downloads.insert(index, chunks);
                    Ok(download.mimetype.clone())
                } else {
                    Err(Refusal::NotOpen)
                };
                let _ = reply.send(answer);
                None
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
        slot,
        index,
        ..
    } = match authorise(&state, &tunnel, &index, query.as_deref(), &headers) {
        Ok(ok) => ok,
        Err(refused) => return refused.into_response(),
    };
    // One blob in flight (guacd sends the next only after an ack).
    let (chunks_tx, mut chunks) = mpsc::channel(2);
    let taken = take(&control, |reply| Control::TakeDownload {
        index,
        chunks: chunks_tx,
        reply,
    })
    .await;
    let mimetype = match taken {
        Ok(mimetype) => mimetype,
        Err(refused) => return refused.into_response(),
    };
    tracing::info!(stream = index, "download taken over by HTTP");
    let (body_tx, body_rx) = mpsc::channel::<std::io::Result<Bytes>>(1);
    tokio::spawn(async move {
        let _slot = slot;
        let ack = Instruction::new("ack", [index.to_string().as_str(), "OK", "0"]).encode();
        loop {
            // Ask for the next blob only once the body has taken the last one (the channel
            // holds one): a slow browser slows guacd, and memory stays a few KiB.
            if control.send(Control::Send(ack.clone())).await.is_err() {
                let _ = body_tx.send(Err(cut("the session ended"))).await;
                return;
            }
            // A browser that goes away while guacd is slow to send frees the slot too.
            let chunk = tokio::select! {
                chunk = chunks.recv() => chunk,
                () = body_tx.closed() => {
                    let _ = control.send(Control::Send(failed(index))).await;
                    return;
                }
            };
            match chunk {
                Some(Chunk::Data(data)) => {
                    if body_tx.send(Ok(data)).await.is_err() {
                        // The browser went away: end the stream at guacd.
                        let _ = control.send(Control::Send(failed(index))).await;
                        return;
                    }
                }
                Some(Chunk::End) => return,
                None => {
                    let _ = body_tx.send(Err(cut("the stream ended without its end"))).await;
                    return;
                }
            }
        }
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
            tracing::warn!(stream = index, bytes, "upload done but not renamed: {why}");
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
    use super::*;
    use crate::services::guacamole::protocol::Decoder;

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
