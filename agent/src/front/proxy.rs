//! The front's serving loop: one public port, TLS or plain HTTP decided from the first byte,
//! each request forwarded over one backend connection per client connection, WebSocket
//! upgrades spliced through, and every client bounded in time and memory (DESIGN §8).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::tls::TlsSetup;
use crate::httpserve::{drive, http1_builder, Activity, Watched, MAX_HEAD_BYTES};
use crate::model::Cidr;

/// The first byte of a TLS record carrying a handshake (a ClientHello starts with it).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// What the front allows each client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrontLimits {
    /// From accepting a connection to its first byte and, for TLS, a finished handshake.
    pub handshake: Duration,
    /// From waiting for a request (new or kept-alive connection) to its whole head.
    pub header_read: Duration,
    /// An HTTP connection that moves no byte for this long (mid-request) is closed.
    pub idle: Duration,
    /// An upgraded connection (a WebSocket) that moves no byte for this long is closed.
    pub tunnel_idle: Duration,
    /// How long to wait for the backend to accept a connection.
    pub backend_connect: Duration,
    /// Open client connections at most (upgraded ones included); more are closed at once.
    pub max_connections: usize,
}

impl FrontLimits {
    /// 10 s to the handshake and to each request head, 5 min idle mid-request, 1 h idle
    /// tunnels, 5 s backend connect, 1024 connections.
    pub const DEFAULT: FrontLimits = FrontLimits {
        handshake: Duration::from_secs(10),
        header_read: Duration::from_secs(10),
        idle: Duration::from_secs(300),
        tunnel_idle: Duration::from_secs(3600),
        backend_connect: Duration::from_secs(5),
        max_connections: 1024,
    };
}

/// One front: where it listens, where it forwards, and how.
#[derive(Debug, Clone)]
pub struct Front {
    /// The backend (a service on loopback).
    pub backend: SocketAddr,
    /// TLS, when configured; a front without it passes plain HTTP only.
    pub tls: Option<TlsSetup>,
    /// Refuse plain HTTP with a clear answer.
    pub require_tls: bool,
    /// Peers whose `X-Forwarded-For` is kept (extended) rather than replaced.
    pub trusted_proxies: Vec<Cidr>,
    /// Client bounds.
    pub limits: FrontLimits,
}

/// Serve `front` on `listener` until `shutdown` resolves; then stop accepting, let requests in
/// flight finish and return.
pub async fn serve(
    listener: TcpListener,
    front: Front,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let front = Arc::new(front);
    let permits = Arc::new(Semaphore::new(front.limits.max_connections));
    let connections = TaskTracker::new();
    let stop = CancellationToken::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(target: "exoagent::front", "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Over the cap: close before reading anything (not logged: a flood would flood it).
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        connections.spawn(connection(
            stream,
            peer,
            front.clone(),
            stop.clone(),
            permit,
        ));
    }
    stop.cancel();
    connections.close();
    connections.wait().await;
}

/// How the client reached the front on this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// TLS, terminated by the front.
    Tls,
    /// Plain HTTP.
    Plain,
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    front: Arc<Front>,
    stop: CancellationToken,
    permit: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let start = Instant::now();
    let mut first = [0u8; 1];
    let hop = match tokio::time::timeout(front.limits.handshake, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == TLS_HANDSHAKE_RECORD && front.tls.is_some() => Hop::Tls,
        Ok(Ok(1)) => Hop::Plain,
        // Closed, failed or silent: nothing to answer.
        _ => return,
    };
    let activity = Activity::new();
    let conn = Arc::new(ClientConnection {
        peer,
        hop,
        front: front.clone(),
        backend: Mutex::new(None),
        activity: activity.clone(),
        _permit: permit,
    });
    let watched = Watched::new(stream, activity.clone());
    match (hop, &front.tls) {
        (Hop::Tls, Some(tls)) => {
            let left = front.limits.handshake.saturating_sub(start.elapsed());
            match tokio::time::timeout(left, tls.acceptor.accept(watched)).await {
                Ok(Ok(stream)) => serve_http(stream, conn, stop).await,
                Ok(Err(e)) => tls.log.refused(peer, &e),
                Err(_) => {}
            }
        }
        _ => serve_http(watched, conn, stop).await,
    }
}

/// One client connection: its peer, how it came, and its backend connection (made on the
/// first request, remade when the backend closed it).
struct ClientConnection {
    peer: SocketAddr,
    hop: Hop,
    front: Arc<Front>,
    backend: Mutex<Option<SendRequest<Incoming>>>,
    activity: Activity,
    /// Held until the connection and any tunnel made from it are gone.
    _permit: OwnedSemaphorePermit,
}

type FrontBody = Either<Incoming, Full<Bytes>>;

async fn serve_http<I>(io: I, conn: Arc<ClientConnection>, stop: CancellationToken)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = conn.front.limits;
    let activity = conn.activity.clone();
    let handler = conn.clone();
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let conn = handler.clone();
        async move { Ok::<_, Infallible>(conn.handle(request).await) }
    });
    // Upgraded connections leave it: the tunnel task owns the socket then.
    let http = http1_builder(limits.header_read)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    drive(http, &activity, limits.idle, &stop).await;
}

impl ClientConnection {
    async fn handle(self: Arc<Self>, mut request: Request<Incoming>) -> Response<FrontBody> {
        if self.hop == Hop::Plain && self.front.require_tls {
            return refusal(
                StatusCode::BAD_REQUEST,
                "This port requires TLS: connect with https:// (plain HTTP is refused).\n",
            );
        }
        let upgrade = is_upgrade(request.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
        let mut backend = self.backend.lock().await;
        let mut outgoing = self.backend_request(request, upgrade);
        let mut retried = false;
        let mut response = loop {
            let sender = match self.ready_sender(&mut backend).await {
                Ok(sender) => sender,
                Err(detail) => {
                    tracing::warn!(target: "exoagent::front", backend = %self.front.backend, "{detail}");
                    return refusal(
                        StatusCode::BAD_GATEWAY,
                        "The service behind this port is not answering yet; try again shortly.\n",
                    );
                }
            };
            match sender.try_send_request(outgoing).await {
                Ok(response) => break response,
                Err(mut e) => {
                    *backend = None;
                    match e.take_message() {
                        // Never written: the backend closed the kept-alive connection just
                        // before; the same request once more on a new connection.
                        Some(unsent) if !retried => {
                            retried = true;
                            outgoing = unsent;
                        }
                        _ => {
                            tracing::warn!(target: "exoagent::front", backend = %self.front.backend, "backend request failed: {}", e.into_error());
                            return refusal(
                                StatusCode::BAD_GATEWAY,
                                "The service behind this port closed the connection.\n",
                            );
                        }
                    }
                }
            }
        };
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            // The backend connection becomes the tunnel; the next request needs a new one.
            *backend = None;
            drop(backend);
            if let Some(client_upgrade) = client_upgrade {
                let backend_upgrade = hyper::upgrade::on(&mut response);
                tokio::spawn(tunnel(self.clone(), client_upgrade, backend_upgrade));
            }
        } else {
            strip_hop_by_hop(response.headers_mut(), false);
        }
        // The client's connection is HTTP/1.1 whatever the backend spoke (an HTTP/1.0 answer
        // would make hyper close a connection the client wants to keep).
        *response.version_mut() = hyper::Version::HTTP_11;
        response.map(Either::Left)
    }

    /// The backend connection, connected (again) when there is none or it closed.
    async fn ready_sender<'a>(
        &self,
        slot: &'a mut Option<SendRequest<Incoming>>,
    ) -> Result<&'a mut SendRequest<Incoming>, String> {
        if let Some(sender) = slot.as_mut() {
            if sender.ready().await.is_err() {
                *slot = None;
            }
        }
        if slot.is_none() {
            let backend = self.front.backend;
            let stream = match tokio::time::timeout(
                self.front.limits.backend_connect,
                TcpStream::connect(backend),
            )
            .await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return Err(format!("backend connect failed: {e}")),
                Err(_) => return Err("backend connect timed out".into()),
            };
            let _ = stream.set_nodelay(true);
            let (mut sender, link) = hyper::client::conn::http1::Builder::new()
                // hyper's default lets each backend connection's read buffer grow to ~400 KiB
                // while a large body streams through: ~0.8 MiB of RSS per busy connection
                // (bench/results/tls-front.md). 64 KiB reads stream as fast; a response head
                // is then capped like a request head.
                .max_buf_size(MAX_HEAD_BYTES)
                .handshake(TokioIo::new(stream))
                .await
                .map_err(|e| format!("backend handshake failed: {e}"))?;
            // Its own task: driving it in the client connection's task (one task per client)
            // cost more CPU per request, not less (bench/results/tls-front.md).
            tokio::spawn(async move {
                let _ = link.with_upgrades().await;
            });
            sender
                .ready()
                .await
                .map_err(|e| format!("backend connection closed: {e}"))?;
            *slot = Some(sender);
        }
        Ok(slot.as_mut().expect("set above"))
    }

    /// The client's request as the backend gets it: origin-form target, hop-by-hop headers
    /// dropped (the upgrade pair kept for an upgrade), forwarded headers set for this hop.
    fn backend_request(&self, request: Request<Incoming>, upgrade: bool) -> Request<Incoming> {
        let (mut parts, body) = request.into_parts();
        // An absolute-form target (`GET http://host/x`) becomes origin-form; the usual
        // origin-form one is passed as it is.
        if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
            let target = parts
                .uri
                .path_and_query()
                .map(|pq| pq.as_str())
                .unwrap_or("/");
            if let Ok(uri) = target.parse::<Uri>() {
                parts.uri = uri;
            }
        }
        strip_hop_by_hop(&mut parts.headers, upgrade);
        forwarded_headers(
            &mut parts.headers,
            self.peer.ip(),
            self.hop,
            &self.front.trusted_proxies,
        );
        Request::from_parts(parts, body)
    }
}

/// Splice an upgraded client connection to the upgraded backend connection until either side
/// closes or nothing moves for the tunnel idle limit.
async fn tunnel(
    conn: Arc<ClientConnection>,
    client: hyper::upgrade::OnUpgrade,
    backend: hyper::upgrade::OnUpgrade,
) {
    let (Ok(client), Ok(backend)) = tokio::join!(client, backend) else {
        return;
    };
    let mut client = TokioIo::new(client);
    let mut backend = TokioIo::new(backend);
    let idle = conn.front.limits.tunnel_idle;
    let copy = tokio::io::copy_bidirectional(&mut client, &mut backend);
    tokio::pin!(copy);
    loop {
        let deadline = conn.activity.last() + idle;
        tokio::select! {
            _ = copy.as_mut() => break,
            () = tokio::time::sleep_until(deadline) => {
                if conn.activity.last() + idle <= Instant::now() {
                    break;
                }
            }
        }
    }
}

/// Whether the request asks to switch protocols (`Connection: upgrade` with `Upgrade`).
fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

// Header names used on every request, made once (a name given as text is parsed and hashed
// at each use).
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// What an untrusted peer may not say: the client's address, host or path prefix, from which a
/// service would build URLs or decide who is asking.
const UNTRUSTED_FORWARDED: [HeaderName; 7] = [
    header::FORWARDED,
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-rstudio-request"),
    HeaderName::from_static("x-rstudio-root-path"),
];

/// Headers meaningful only on one hop (RFC 9110 §7.6.1), and any the `Connection` header
/// names. For an upgrade, `Connection: upgrade` and `Upgrade` stay so the backend sees it.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = connection_tokens(headers)
            .filter(|t| !(keep_upgrade && t.eq_ignore_ascii_case("upgrade")))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in [
        KEEP_ALIVE,
        PROXY_CONNECTION,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
    ] {
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

/// Set what the backend learns about the client (docs/uap.md, "Forwarded headers"):
/// - `X-Forwarded-For`: from a trusted proxy, its list with the peer appended; from anyone
///   else, only the peer (what they wrote could be anything). `Forwarded`, `X-Real-IP`,
///   `X-Forwarded-Host`/`-Port`/`-Prefix` and RStudio's `X-RStudio-Request`/`-Root-Path` from
///   untrusted peers are dropped for the same reason (a service would build URLs from them).
/// - `X-Forwarded-Proto`: `https` after a TLS hop unless a trusted proxy says otherwise; after a
///   plain hop, the client's `http`/`https` is kept (the UAP's `http-` upstreams arrive plain
///   from browsers that used https; a scheme names no one, so it is not an identity to spoof),
///   anything else becomes `http`.
pub fn forwarded_headers(
    headers: &mut HeaderMap,
    peer: std::net::IpAddr,
    hop: Hop,
    trusted: &[Cidr],
) {
    let peer = peer.to_canonical();
    let is_trusted = trusted.iter().any(|c| c.contains(peer));
    let claimed_proto = headers
        .get(X_FORWARDED_PROTO)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase())
        .filter(|v| v == "http" || v == "https");
    let proto = match (hop, is_trusted, claimed_proto) {
        (Hop::Tls, true, Some(claimed)) => claimed,
        (Hop::Tls, _, _) => "https".to_owned(),
        (Hop::Plain, _, Some(claimed)) => claimed,
        (Hop::Plain, _, None) => "http".to_owned(),
    };
    let mut chain = String::new();
    if is_trusted {
        for value in headers.get_all(X_FORWARDED_FOR).iter() {
            if let Ok(text) = value.to_str() {
                if !chain.is_empty() {
                    chain.push_str(", ");
                }
                chain.push_str(text.trim());
            }
        }
    } else {
        for name in UNTRUSTED_FORWARDED {
            headers.remove(name);
        }
    }
    if !chain.is_empty() {
        chain.push_str(", ");
    }
    chain.push_str(&peer.to_string());
    headers.remove(X_FORWARDED_FOR);
    if let Ok(value) = HeaderValue::from_str(&chain) {
        headers.insert(X_FORWARDED_FOR, value);
    }
    headers.insert(
        X_FORWARDED_PROTO,
        HeaderValue::from_str(&proto).unwrap_or(HeaderValue::from_static("http")),
    );
}

/// A short plain-text answer from the front itself; the connection closes after it.
fn refusal(status: StatusCode, text: &'static str) -> Response<FrontBody> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from_static(
        text.as_bytes(),
    ))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn ip(text: &str) -> std::net::IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn untrusted_peers_cannot_choose_the_client_address() {
        let mut h = headers(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-real-ip", "1.2.3.4"),
            ("forwarded", "for=1.2.3.4"),
            ("x-forwarded-host", "evil.example"),
            ("x-rstudio-request", "https://evil.example/"),
            ("host", "http-10-0-0-1-8787.uap.test"),
        ]);
        forwarded_headers(&mut h, ip("10.0.0.9"), Hop::Tls, &[]);
        assert_eq!(h["x-forwarded-for"], "10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["host"], "http-10-0-0-1-8787.uap.test");
        assert_eq!(h.len(), 3, "{h:?}");
    }

    #[test]
    fn a_trusted_proxy_list_is_extended() {
        let trusted = vec!["10.0.0.0/24".parse().unwrap()];
        let mut h = headers(&[
            ("x-forwarded-for", "198.51.100.7"),
            ("x-forwarded-for", "203.0.113.1"),
            ("x-forwarded-proto", "https"),
        ]);
        forwarded_headers(&mut h, ip("::ffff:10.0.0.9"), Hop::Plain, &trusted);
        assert_eq!(h["x-forwarded-for"], "198.51.100.7, 203.0.113.1, 10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "https");
    }

    #[test]
    fn the_scheme_follows_the_hop_unless_a_plain_client_names_one() {
        let mut tls = headers(&[("x-forwarded-proto", "http")]);
        forwarded_headers(&mut tls, ip("10.0.0.9"), Hop::Tls, &[]);
        assert_eq!(tls["x-forwarded-proto"], "https");
        let mut uap = headers(&[("x-forwarded-proto", "HTTPS")]);
        forwarded_headers(&mut uap, ip("10.0.0.9"), Hop::Plain, &[]);
        assert_eq!(uap["x-forwarded-proto"], "https");
        let mut junk = headers(&[("x-forwarded-proto", "gopher")]);
        forwarded_headers(&mut junk, ip("10.0.0.9"), Hop::Plain, &[]);
        assert_eq!(junk["x-forwarded-proto"], "http");
    }

    #[test]
    fn hop_by_hop_headers_go_and_the_upgrade_pair_stays_for_upgrades() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("host", "a"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        let mut ws = headers(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(is_upgrade(&ws));
        strip_hop_by_hop(&mut ws, true);
        assert_eq!(ws["connection"], "upgrade");
        assert_eq!(ws["upgrade"], "websocket");
    }
}
