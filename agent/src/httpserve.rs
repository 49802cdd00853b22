//! The one HTTP/1.1 serving loop behind every server exoagent runs (the status API on its Unix
//! socket, the Guacamole web side on TCP): header, body and idle timeouts, a connection cap and
//! a body size limit, so a slow or hostile client costs bounded time and memory (DESIGN §8).
//!
//! `axum::serve` gives hyper no timer, so hyper's header timeout never fires there; this loop
//! drives `hyper::server::conn::http1` itself with `TokioTimer`. Limits are in
//! `docs/contracts.md`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use axum::serve::Listener;
use axum::Router;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// The read buffer of one connection, which bounds a request head (hyper's default is ~400 KiB).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// What one server allows each client.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// From waiting for a request (a new connection, or the next request on a kept-alive one)
    /// to its whole head: slower clients are disconnected.
    pub header_read: Duration,
    /// From a request's head to the end of its body, when the handler reads it.
    pub body: Duration,
    /// A connection with no byte read or written for this long is closed (a stalled reader
    /// of a response, say). Not after a WebSocket upgrade: the tunnel keeps its own pings.
    pub idle: Duration,
    /// Open HTTP connections at most; more are closed at once, before a byte is read.
    pub max_connections: usize,
    /// Request bodies at most; a larger `Content-Length` is answered 413 without reading.
    pub max_body_bytes: u64,
    /// Paths whose request bodies are streamed files (the Guacamole stream endpoints, issue
    /// 20): no size limit, and `body` bounds the wait for the *next* byte rather than the
    /// whole body, so a slow but progressing upload is never cut while a stalled one is.
    pub streamed_bodies: Option<fn(&str) -> bool>,
}

impl Limits {
    /// 10 s headers, 30 s body, 60 s idle, 64 connections, 64 KiB bodies.
    pub const DEFAULT: Limits = Limits {
        header_read: Duration::from_secs(10),
        body: Duration::from_secs(30),
        idle: Duration::from_secs(60),
        max_connections: 64,
        max_body_bytes: 64 * 1024,
        streamed_bodies: None,
    };
}

/// Serve `router` on `listener` within `limits` until `shutdown` resolves, then stop accepting,
/// let requests in flight finish (idle connections close at once) and return. Handlers can
/// extract `ConnectInfo<L::Addr>`.
pub async fn serve<L>(
    mut listener: L,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) where
    L: Listener,
    L::Addr: Clone + Sync + 'static,
{
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    let stop = CancellationToken::new();
    tokio::pin!(shutdown);
    loop {
        let (io, addr) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        // Over the cap: close before reading anything, so a flood holds no buffers. Not
        // logged: a flood would flood the log.
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(io);
            continue;
        };
        connections.spawn(connection(
            io,
            addr,
            router.clone(),
            limits,
            stop.clone(),
            permit,
        ));
    }
    stop.cancel();
    connections.close();
    connections.wait().await;
}

async fn connection<I, A>(
    io: I,
    addr: A,
    router: Router,
    limits: Limits,
    stop: CancellationToken,
    _permit: OwnedSemaphorePermit,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    A: Clone + Send + Sync + 'static,
{
    let activity = Activity::new();
    let io = Watched {
        inner: io,
        activity: activity.clone(),
    };
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let router = router.clone();
        let addr = addr.clone();
        async move { Ok::<_, Infallible>(handle(router, request, addr, limits).await) }
    });
    let conn = http1_builder(limits.header_read)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    drive(conn, &activity, limits.idle, &stop).await;
}

/// The HTTP/1.1 server settings every server here shares: hyper's timer, the head timeout,
/// the head size bound, keep-alive.
pub fn http1_builder(header_read: Duration) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // hyper starts this timer whenever it waits for a request head, so it also closes a
        // kept-alive connection that sends no next request.
        .header_read_timeout(header_read)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    builder
}

/// Drive one server connection until it ends (done, failed, timed out, or upgraded: hyper then
/// hands the socket on), closing it when no byte moved for `idle` and shutting it down
/// gracefully once `stop` fires.
pub async fn drive<I, S, B>(
    conn: hyper::server::conn::http1::UpgradeableConnection<I, S>,
    activity: &Activity,
    idle: Duration,
    stop: &CancellationToken,
) where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: HttpBody + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        let deadline = activity.last() + idle;
        tokio::select! {
            _ = conn.as_mut() => break,
            () = stop.cancelled(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            () = tokio::time::sleep_until(deadline) => {
                if activity.last() + idle <= Instant::now() {
                    break;
                }
            }
        }
    }
}

async fn handle<A>(
    router: Router,
    request: Request<Incoming>,
    addr: A,
    limits: Limits,
) -> Response<Body>
where
    A: Clone + Send + Sync + 'static,
{
    let streamed = limits
        .streamed_bodies
        .is_some_and(|is_streamed| is_streamed(request.uri().path()));
    let max = if streamed {
        u64::MAX
    } else {
        limits.max_body_bytes
    };
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > max) {
        // Unread, the body cannot be skipped: answer and close.
        let mut response = Response::new(Body::from("request body too large\n"));
        *response.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return response;
    }
    let (mut parts, body) = request.into_parts();
    parts.extensions.insert(ConnectInfo(addr));
    let body = Body::new(LimitedBody {
        inner: body,
        deadline: Box::pin(tokio::time::sleep(limits.body)),
        limit: limits.body,
        read: 0,
        max,
        per_read: streamed,
    });
    match router.oneshot(Request::from_parts(parts, body)).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// Why a request body was cut off.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The body did not arrive within the limit (for a streamed body: no byte of it did).
    #[error("the request body did not arrive within {0:?}")]
    TimedOut(Duration),
    /// The body is larger than the limit (sent chunked, or longer than announced).
    #[error("the request body is larger than {0} bytes")]
    TooLarge(u64),
    /// The connection failed while reading it.
    #[error("failed to read the request body: {0}")]
    Read(#[from] hyper::Error),
}

impl BodyError {
    /// Short stable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TimedOut(_) => "http-body-timeout",
            Self::TooLarge(_) => "http-body-too-large",
            Self::Read(_) => "http-body-read-failed",
        }
    }
}

/// A request body with a deadline and a size limit.
struct LimitedBody {
    inner: Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
    read: u64,
    max: u64,
    /// The deadline moves on with every piece of data (a streamed body).
    per_read: bool,
}

impl HttpBody for LimitedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.read = this.read.saturating_add(data.len() as u64);
                    if this.read > this.max {
                        return Poll::Ready(Some(Err(BodyError::TooLarge(this.max))));
                    }
                    if this.per_read && !data.is_empty() {
                        this.deadline.as_mut().reset(Instant::now() + this.limit);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(BodyError::TimedOut(this.limit)))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// When a connection last moved a byte, shared between its IO and its idle timer.
#[derive(Debug, Clone)]
pub struct Activity {
    start: Instant,
    since_start_ms: Arc<AtomicU64>,
}

impl Activity {
    /// Activity starting now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            since_start_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.since_start_ms.store(ms, Ordering::Relaxed);
    }

    /// When a byte last moved.
    pub fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.since_start_ms.load(Ordering::Relaxed))
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// A connection's IO that records activity.
pub struct Watched<I> {
    inner: I,
    activity: Activity,
}

impl<I> Watched<I> {
    /// `inner`, recording into `activity`.
    pub fn new(inner: I, activity: Activity) -> Self {
        Self { inner, activity }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::post;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The bytes of a request body, or the error that cut it.
    async fn count(body: Body) -> String {
        let mut body = body;
        let mut n = 0;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => n += frame.data_ref().map_or(0, |d| d.len()),
                Err(e) => return format!("error: {e}"),
            }
        }
        n.to_string()
    }

    /// A server with a 1 s body limit and 1 KiB bodies, except under `/stream/`.
    async fn server() -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new()
            .route("/stream/{name}", post(count))
            .route("/small", post(count));
        let limits = Limits {
            body: Duration::from_secs(1),
            max_body_bytes: 1024,
            streamed_bodies: Some(|path| path.starts_with("/stream/")),
            ..Limits::DEFAULT
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, router, limits, async move {
            let _ = stopped.await;
        }));
        (addr, stop)
    }

    /// POSTs `chunks` (chunked encoding), waiting `gap` before each after the first; returns
    /// the response body, or what went wrong. Write errors are ignored: the server may answer
    /// and close before the body is done.
    async fn post_chunks(
        addr: std::net::SocketAddr,
        path: &str,
        chunks: &[Vec<u8>],
        gap: Duration,
    ) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!("POST {path} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
        let _ = stream.write_all(head.as_bytes()).await;
        for (i, chunk) in chunks.iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(gap).await;
            }
            let mut piece = format!("{:x}\r\n", chunk.len()).into_bytes();
            piece.extend_from_slice(chunk);
            piece.extend_from_slice(b"\r\n");
            if stream.write_all(&piece).await.is_err() {
                break;
            }
        }
        let _ = stream.write_all(b"0\r\n\r\n").await;
        let mut response = Vec::new();
        if let Err(e) = stream.read_to_end(&mut response).await {
            return format!("read failed: {e}");
        }
        let text = String::from_utf8_lossy(&response).into_owned();
        text.split_once("\r\n\r\n")
            .map_or(text.clone(), |(_, body)| body.to_owned())
    }

    #[tokio::test]
    async fn a_streamed_body_has_no_size_limit() {
        let (addr, _stop) = server().await;
        let chunks = vec![vec![7u8; 8192]; 8];
        assert_eq!(
            post_chunks(addr, "/stream/a", &chunks, Duration::ZERO).await,
            "65536"
        );
    }

    /// POSTs a head announcing `length` bytes, then `sent` of them, and half-closes: the
    /// response, or what went wrong.
    async fn post_announced(
        addr: std::net::SocketAddr,
        path: &str,
        length: u64,
        sent: usize,
    ) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
        );
        let _ = stream.write_all(head.as_bytes()).await;
        let _ = stream.write_all(&vec![3u8; sent]).await;
        let _ = stream.shutdown().await;
        let mut response = Vec::new();
        if let Err(e) = stream.read_to_end(&mut response).await {
            return format!("read failed: {e}");
        }
        String::from_utf8_lossy(&response).into_owned()
    }

    /// A file past 4 GiB (issue 20): a streamed body announced as 5 GiB, or as more than a
    /// 32-bit length holds, reaches the handler (which here sees it end early: its bytes
    /// counted, then the read error), not a 413; on a plain route it is refused unread.
    #[tokio::test]
    async fn a_streamed_body_announced_past_4_gib_reaches_the_handler() {
        let (addr, _stop) = server().await;
        for length in [5u64 << 30, u64::from(u32::MAX) + 2] {
            let answer = post_announced(addr, "/stream/big", length, 70_000).await;
            assert!(answer.starts_with("HTTP/1.1 200"), "{length}: {answer}");
            assert!(
                answer.contains("error: failed to read the request body"),
                "{length}: {answer}"
            );
            let plain = post_announced(addr, "/small", length, 10).await;
            assert!(plain.starts_with("HTTP/1.1 413"), "{length}: {plain}");
        }
    }

    #[tokio::test]
    async fn a_slow_but_progressing_streamed_body_is_not_cut_and_a_plain_one_is() {
        let (addr, _stop) = server().await;
        // 5 pieces 400 ms apart: 1.6 s in all, beyond the 1 s body limit, never 1 s idle.
        let chunks = vec![vec![1u8; 10]; 5];
        let gap = Duration::from_millis(400);
        let (streamed, plain) = tokio::join!(
            post_chunks(addr, "/stream/a", &chunks, gap),
            post_chunks(addr, "/small", &chunks, gap),
        );
        assert_eq!(streamed, "50");
        assert_ne!(
            plain, "50",
            "the plain route must cut a body slower than its limit"
        );
    }

    #[tokio::test]
    async fn a_stalled_streamed_body_is_cut() {
        let (addr, _stop) = server().await;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"POST /stream/a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n")
            .await
            .unwrap();
        // Nothing more is sent: the server answers once no byte came for its 1 s limit.
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        let text = String::from_utf8_lossy(&response);
        assert!(text.contains("did not arrive within"), "{text}");
    }
}
