//! The Guacamole web side on port 49528 under `/guacamole/` (DESIGN §4.5): the token API
//! Exosphere calls, the client page, a health endpoint, and the WebSocket tunnel. No CORS
//! headers: the page and the API share an origin, behind the cloud's proxy too.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, Form, Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{delete, get, post};
use axum::serve::ListenerExt as _;
use axum::{Json, Router};
use serde_json::json;

use crate::httpserve::{self, Limits};

use super::assets;
use super::auth::{Authenticator, Credentials, LoginError};
use super::forwarded;
use super::handshake::{self, ClientInfo};
use super::rename;
use super::transfer;
use super::tunnel::{self, status};
use super::web_config::{Connection, WebConfig, DATA_SOURCE};

/// At most this many tunnels at once; more are refused with CLIENT_TOO_MANY.
pub const MAX_TUNNELS: usize = 32;
/// What each client may hold (`docs/contracts.md`): the defaults, but 256 connections, as the
/// port is open to the cloud's proxy and beyond. Tunnels count only until they are upgraded.
pub const LIMITS: Limits = Limits {
    max_connections: 256,
    streamed_bodies: Some(is_file_stream),
    ..Limits::DEFAULT
};

/// The file-stream endpoints' paths, whose bodies are files of any size (`transfer.rs`).
fn is_file_stream(path: &str) -> bool {
    path.starts_with("/guacamole/api/session/tunnels/") && path.contains("/streams/")
}
/// How soon the start-up check asks guacd again after it answered but not for every protocol
/// (a `select` costs guacd a child process).
const GUACD_RETRY: Duration = Duration::from_secs(2);
/// How soon it tries again while guacd is not listening yet (a refused connect costs nothing;
/// guacd is started beside the web side and listens a moment later), doubling up to
/// [`GUACD_RETRY`].
const GUACD_LISTEN_RETRY: Duration = Duration::from_millis(50);

/// Shared by every request.
pub struct WebState {
    config: WebConfig,
    auth: Arc<Authenticator>,
    guacd_answered: AtomicBool,
    /// Set when guacd lacks a configured protocol's plugin: (reason, detail) for the health
    /// endpoint, which then tells the supervisor not to wait.
    guacd_missing: OnceLock<(&'static str, String)>,
    tunnels: AtomicUsize,
    /// Open tunnels for the HTTP file-stream endpoints.
    registry: transfer::Registry,
}

impl WebState {
    /// State for `config` with the account's passphrase.
    pub fn new(config: WebConfig, password: String) -> Arc<Self> {
        let credentials = Credentials::new(config.username.clone(), password);
        let auth = Arc::new(Authenticator::new(credentials, config.session_timeout()));
        Arc::new(Self {
            config,
            auth,
            guacd_answered: AtomicBool::new(false),
            guacd_missing: OnceLock::new(),
            tunnels: AtomicUsize::new(0),
            registry: transfer::Registry::default(),
        })
    }

    /// Logins and tokens.
    pub(super) fn auth(&self) -> &Authenticator {
        &self.auth
    }

    /// The open tunnels, for the file-stream endpoints.
    pub(super) fn registry(&self) -> &transfer::Registry {
        &self.registry
    }

    /// Ask guacd for every configured protocol's `args` until all answer (a `select` costs
    /// guacd a child process, so this runs once at start-up, then liveness is a TCP connect).
    pub async fn check_guacd_until_ready(self: Arc<Self>) {
        let mut protocols: Vec<&str> = self
            .config
            .connections
            .values()
            .map(|c| c.protocol.as_str())
            .collect();
        protocols.sort_unstable();
        protocols.dedup();
        let mut listen_retry = GUACD_LISTEN_RETRY;
        loop {
            // Side by side: each `select` waits for guacd to load that protocol's plugin.
            let mut asked = tokio::task::JoinSet::new();
            for protocol in &protocols {
                let (guacd, protocol) = (self.config.guacd, (*protocol).to_owned());
                asked.spawn(async move {
                    let answer = handshake::check_protocol(guacd, &protocol).await;
                    (protocol, answer)
                });
            }
            let mut all = true;
            let mut listening = true;
            while let Some(joined) = asked.join_next().await {
                let (protocol, answer) = match joined {
                    Ok(done) => done,
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    Err(_) => return,
                };
                let protocol = protocol.as_str();
                match answer {
                    Ok(_) => {}
                    // Asking again cannot help: the plugin must be installed (and guacd
                    // restarted), which the supervisor's retry schedule will notice.
                    Err(e @ handshake::HandshakeError::ProtocolMissing { .. }) => {
                        tracing::error!(protocol, reason = e.reason(), "{}", shown(&e.to_string()));
                        let _ = self.guacd_missing.set((e.reason(), e.to_string()));
                        return;
                    }
                    Err(e @ handshake::HandshakeError::Unreachable { .. }) => {
                        tracing::debug!(protocol, reason = e.reason(), "guacd not listening yet: {}", shown(&e.to_string()));
                        all = false;
                        listening = false;
                    }
                    Err(e) => {
                        tracing::info!(protocol, reason = e.reason(), "guacd not ready: {}", shown(&e.to_string()));
                        all = false;
                    }
                }
            }
            if all {
                tracing::info!(guacd = %self.config.guacd, "guacd answers for {protocols:?}");
                self.guacd_answered.store(true, Ordering::SeqCst);
                return;
            }
            if listening {
                tokio::time::sleep(GUACD_RETRY).await;
            } else {
                tokio::time::sleep(listen_retry).await;
                listen_retry = (listen_retry * 2).min(GUACD_RETRY);
            }
        }
    }
}

/// The routes.
pub fn router(state: Arc<WebState>) -> Router {
    Router::new()
        .route(
            "/guacamole",
            get(|| async { Redirect::permanent("/guacamole/") }),
        )
        .route("/guacamole/", get(index))
        .route("/guacamole/assets/{file}", get(asset))
        .route("/guacamole/api/tokens", post(login))
        .route("/guacamole/api/tokens/{token}", delete(logout))
        .route("/guacamole/api/session", delete(logout_query))
        .route("/guacamole/api/languages", get(languages))
        .route(
            "/guacamole/api/session/data/{source}/connections",
            get(connections),
        )
        .route("/guacamole/api/exoagent/health", get(health))
        .route("/guacamole/api/exoagent/notice", get(notice))
        .route("/guacamole/websocket-tunnel", get(websocket))
        .route(
            "/guacamole/api/session/tunnels/{tunnel}/streams/{index}/{filename}",
            get(transfer::download).post(transfer::upload),
        )
        .with_state(state)
}

/// Serve until `shutdown` resolves. guacd, when the web side runs it, is kept by a process of
/// its own (`cli.rs`): this one is confined and cannot start programs.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<WebState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    tokio::spawn(state.clone().check_guacd_until_ready());
    httpserve::serve(without_nagle(listener), router(state), LIMITS, shutdown).await;
    Ok(())
}

/// `listener`, its accepted sockets with `TCP_NODELAY`. The page moves files as blobs that
/// each wait for an `ack`: with Nagle's algorithm a frame's tail waits for the browser's
/// delayed ACK, about one round trip plus 40 ms per blob (issue 20). `axum::serve` and hyper
/// leave the option off.
fn without_nagle(
    listener: tokio::net::TcpListener,
) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = SocketAddr> {
    listener.tap_io(|stream| {
        if let Err(e) = stream.set_nodelay(true) {
            // Still served: only slower.
            tracing::warn!("could not set TCP_NODELAY on a browser connection: {e}");
        }
    })
}

fn no_store(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

async fn index() -> Response {
    asset_response("index.html")
}

async fn asset(Path(file): Path<String>) -> Response {
    asset_response(&format!("assets/{file}"))
}

fn asset_response(name: &str) -> Response {
    match assets::find(name) {
        Some((content_type, body)) => {
            let mut response = (
                [
                    (header::CONTENT_TYPE, content_type),
                    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                    (header::REFERRER_POLICY, "no-referrer"),
                ],
                body,
            )
                .into_response();
            if name == "index.html" {
                // The token travels in the fragment; keep the page out of caches anyway.
                response
                    .headers_mut()
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            }
            response
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// A value from outside as one log line may carry it: at most 64 characters, control
/// characters (a newline would forge a line), quotes and backslashes escaped.
pub fn shown(text: &str) -> String {
    crate::model::truncate_chars(text, 64)
        .escape_debug()
        .to_string()
}

fn api_error(status: StatusCode, kind: &str, message: &str) -> Response {
    no_store(
        (
            status,
            Json(json!({
                "message": message,
                "translatableMessage": {"key": "APP.TEXT_UNTRANSLATED", "variables": {"MESSAGE": message}},
                "statusCode": null,
                "expected": null,
                "type": kind,
            })),
        )
            .into_response(),
    )
}

/// `POST /guacamole/api/tokens` with form fields `username` and `password`, as Exosphere sends.
async fn login(
    State(state): State<Arc<WebState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<BTreeMap<String, String>>,
) -> Response {
    let username = form.get("username").map(String::as_str).unwrap_or("");
    let password = form.get("password").map(String::as_str).unwrap_or("");
    let from = forwarded::client_address(peer.ip(), &headers, &state.config.trusted_proxies);
    match state.auth.login(from, username, password) {
        Ok(token) => {
            tracing::info!(%from, "guacamole login");
            no_store(
                Json(json!({
                    "authToken": token,
                    "username": state.auth.credentials().username(),
                    "dataSource": DATA_SOURCE,
                    "availableDataSources": [DATA_SOURCE],
                }))
                .into_response(),
            )
        }
        Err(e @ LoginError::InvalidCredentials) => {
            tracing::warn!(%from, reason = e.reason(), "guacamole login refused");
            api_error(
                StatusCode::FORBIDDEN,
                "INVALID_CREDENTIALS",
                "Invalid login.",
            )
        }
        Err(e @ LoginError::TooMany { retry_after_s }) => {
            tracing::warn!(%from, reason = e.reason(), "guacamole login refused");
            let mut response = api_error(
                StatusCode::TOO_MANY_REQUESTS,
                "TOO_MANY_REQUESTS",
                "Too many failed logins; try again later.",
            );
            if let Ok(value) = HeaderValue::from_str(&retry_after_s.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
            response
        }
    }
}

async fn logout(State(state): State<Arc<WebState>>, Path(token): Path<String>) -> Response {
    if state.auth.revoke(&token) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        api_error(StatusCode::NOT_FOUND, "NOT_FOUND", "No such token.")
    }
}

async fn logout_query(State(state): State<Arc<WebState>>, RawQuery(query): RawQuery) -> Response {
    let token = query_token(query.as_deref());
    logout(State(state), Path(token)).await
}

/// The stock app's cheap liveness call.
async fn languages() -> Response {
    no_store(Json(json!({"en": "English"})).into_response())
}

/// The stock listing, for clients that look connections up.
async fn connections(
    State(state): State<Arc<WebState>>,
    Path(source): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let token = query_token(query.as_deref());
    if state.auth.touch(&token).is_none() {
        return api_error(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            "Permission denied.",
        );
    }
    if source != DATA_SOURCE {
        return api_error(StatusCode::NOT_FOUND, "NOT_FOUND", "No such data source.");
    }
    let listing: serde_json::Map<String, serde_json::Value> = state
        .config
        .connections
        .iter()
        .map(|(name, c)| {
            (
                name.clone(),
                json!({"identifier": name, "name": name, "protocol": c.protocol,
                       "parentIdentifier": "ROOT", "attributes": {}, "activeConnections": 0}),
            )
        })
        .collect();
    no_store(Json(listing).into_response())
}

/// 200 once guacd has answered for every configured protocol and still accepts connections.
/// The agent's idleness notice for the page: 200 with `{"state","idle_since_ms",
/// "action_at_ms"}` (only those fields, numbers and a known word), 204 when there is none,
/// 403 without a live token (looking does not keep the token alive: a page left open must not
/// hold its session for ever).
async fn notice(State(state): State<Arc<WebState>>, RawQuery(query): RawQuery) -> Response {
    let token = query_token(query.as_deref());
    if !state.auth.is_live(&token) {
        return api_error(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            "Permission denied.",
        );
    }
    let Some(path) = state.config.idle_notice.clone() else {
        return no_store(StatusCode::NO_CONTENT.into_response());
    };
    let read = tokio::task::spawn_blocking(move || {
        crate::input::read_capped(&path, NOTICE_MAX_BYTES).ok()
    })
    .await
    .ok()
    .flatten();
    let Some(notice) = read.and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
    else {
        return no_store(StatusCode::NO_CONTENT.into_response());
    };
    let known = ["active", "idle", "shelve-pending", "shelving"];
    let Some(word) = notice["state"].as_str().filter(|w| known.contains(w)) else {
        return no_store(StatusCode::NO_CONTENT.into_response());
    };
    let mut out = json!({ "state": word });
    for key in ["idle_since_ms", "action_at_ms"] {
        if let Some(ms) = notice[key].as_u64() {
            out[key] = ms.into();
        }
    }
    no_store(Json(out).into_response())
}

/// The largest notice file read.
const NOTICE_MAX_BYTES: u64 = 4096;

async fn health(State(state): State<Arc<WebState>>) -> Response {
    if let Some((reason, detail)) = state.guacd_missing.get() {
        return no_store(
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({
                    "error": detail,
                    "failed": {"reason": reason, "detail": detail},
                })),
            )
                .into_response(),
        );
    }
    if !state.guacd_answered.load(Ordering::SeqCst) {
        return no_store(
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error": "guacd has not answered yet"})),
            )
                .into_response(),
        );
    }
    let reachable = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(state.config.guacd),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    if reachable {
        no_store(Json(json!({"guacd": "ok"})).into_response())
    } else {
        no_store(
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error": "guacd is not accepting connections"})),
            )
                .into_response(),
        )
    }
}

/// The `token` query parameter, or "" (which no token equals).
fn query_token(query: Option<&str>) -> String {
    query_pairs(query)
        .into_iter()
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v)
        .unwrap_or_default()
}

fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// The tunnel's query: the token, the connection and what the browser supports.
#[derive(Debug, Default)]
struct TunnelRequest {
    token: String,
    id: String,
    kind: String,
    data_source: String,
    client: ClientInfo,
}

fn tunnel_request(query: Option<&str>) -> TunnelRequest {
    let mut request = TunnelRequest {
        client: ClientInfo {
            image: Vec::new(),
            ..ClientInfo::default()
        },
        ..TunnelRequest::default()
    };
    let number =
        |v: &str, default: u32, max: u32| v.parse().map_or(default, |n: u32| n.clamp(1, max));
    for (key, value) in query_pairs(query) {
        match key.as_str() {
            "token" => request.token = value,
            "GUAC_ID" => request.id = value,
            "GUAC_TYPE" => request.kind = value,
            "GUAC_DATA_SOURCE" => request.data_source = value,
            "GUAC_WIDTH" => request.client.width = number(&value, 1024, 8192),
            "GUAC_HEIGHT" => request.client.height = number(&value, 768, 8192),
            "GUAC_DPI" => request.client.dpi = number(&value, 96, 1000),
            "GUAC_AUDIO" => request.client.audio.push(value),
            "GUAC_VIDEO" => request.client.video.push(value),
            "GUAC_IMAGE" => request.client.image.push(value),
            "GUAC_TIMEZONE" if !value.is_empty() => request.client.timezone = Some(value),
            _ => {}
        }
    }
    if request.client.image.is_empty() {
        request.client.image = ClientInfo::default().image;
    }
    request
}

/// `GET /guacamole/websocket-tunnel?token=…&GUAC_ID=…`, subprotocol `guacamole`.
async fn websocket(
    State(state): State<Arc<WebState>>,
    RawQuery(query): RawQuery,
    upgrade: WebSocketUpgrade,
) -> Response {
    let upgrade = upgrade.protocols(["guacamole"]);
    if upgrade.selected_protocol().is_none() {
        return (
            StatusCode::BAD_REQUEST,
            "the WebSocket subprotocol 'guacamole' is required",
        )
            .into_response();
    }
    let request = tunnel_request(query.as_deref());
    upgrade.on_upgrade(move |mut socket| async move {
        let Some(user) = state.auth.touch(&request.token) else {
            tracing::info!(connection = %shown(&request.id), "tunnel refused: unknown or expired token (769)");
            tunnel::close(&mut socket, status::CLIENT_UNAUTHORIZED).await;
            return;
        };
        let connection = (request.kind == "c" && request.data_source == DATA_SOURCE)
            .then(|| state.config.connections.get(&request.id))
            .flatten();
        let Some(connection) = connection else {
            tracing::info!(connection = %shown(&request.id), "tunnel refused: no such connection (516)");
            tunnel::close(&mut socket, status::RESOURCE_NOT_FOUND).await;
            return;
        };
        let open = state.tunnels.fetch_add(1, Ordering::SeqCst);
        let _slot = TunnelSlot(&state.tunnels);
        if open >= MAX_TUNNELS {
            tracing::warn!(open, "tunnel refused: too many tunnels (797)");
            tunnel::close(&mut socket, 0x031D).await; // CLIENT_TOO_MANY
            return;
        }
        let mut client = request.client.clone();
        client.name = Some(user);
        let parameters = connection.resolved(state.auth.credentials().password());
        let started = std::time::Instant::now();
        match handshake::connect(state.config.guacd, &connection.protocol, &parameters, &client).await
        {
            Ok(connected) => {
                tracing::info!(connection = %shown(&request.id), guacd_id = %shown(&connected.connection_id), "tunnel open");
                let without_sftp = connection.has_side_sftp().then(|| {
                    let guacd = state.config.guacd;
                    let protocol = connection.protocol.clone();
                    let parameters = Connection::without_sftp(&parameters);
                    let client = client.clone();
                    let reopen: tunnel::ReopenWithoutSftp = Box::pin(async move {
                        handshake::connect(guacd, &protocol, &parameters, &client).await
                    });
                    reopen
                });
                let uuid = tunnel::new_uuid();
                let (control, requests) = tokio::sync::mpsc::channel(16);
                // Where its uploads land on this machine, for the rename after an HTTP upload.
                let place = rename::OwnUser::current()
                    .ok_or(rename::RenameError::NotLocal)
                    .and_then(|own| {
                        rename::SftpPlace::for_connection(&connection.protocol, &connection.parameters, &own)
                    });
                let _registered = state.registry.register(&uuid, &request.token, control, place);
                let tunnel = tunnel::Tunnel { socket, uuid, token: request.token.clone(), control: requests };
                let ended = tunnel::relay(tunnel, connected, state.auth.clone(), without_sftp).await;
                tracing::info!(connection = %shown(&request.id), ?ended, seconds = started.elapsed().as_secs(), "tunnel closed");
            }
            Err(e) => {
                tracing::warn!(connection = %shown(&request.id), reason = e.reason(), "tunnel handshake failed: {}", shown(&e.to_string()));
                tunnel::close(&mut socket, e.status()).await;
            }
        }
    })
}

/// Gives a tunnel slot back however the tunnel ends.
struct TunnelSlot<'a>(&'a AtomicUsize);

impl Drop for TunnelSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    #[tokio::test]
    async fn the_embedded_page_is_served_uncached() {
        // Whichever page build.rs embedded: the client, or the one saying how to build it.
        let response = index().await;
        assert_eq!(response.status(), StatusCode::OK);
        let headers = response.headers();
        assert!(headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html"));
        assert_eq!(headers[header::CACHE_CONTROL], "no-store");
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        assert_eq!(&body[..], assets::find("index.html").unwrap().1);
    }

    #[test]
    fn tunnel_query_is_read_like_the_stock_app_sends_it() {
        let r = tunnel_request(Some(
            "token=AB&GUAC_DATA_SOURCE=default&GUAC_ID=shell&GUAC_TYPE=c&GUAC_WIDTH=1000&\
             GUAC_HEIGHT=700&GUAC_DPI=192&GUAC_TIMEZONE=Europe%2FBerlin&GUAC_AUDIO=audio%2FL8&\
             GUAC_AUDIO=audio%2FL16&GUAC_IMAGE=image%2Fpng&GUAC_IMAGE=image%2Fwebp",
        ));
        assert_eq!(
            (r.token.as_str(), r.id.as_str(), r.kind.as_str()),
            ("AB", "shell", "c")
        );
        assert_eq!(
            (r.client.width, r.client.height, r.client.dpi),
            (1000, 700, 192)
        );
        assert_eq!(r.client.audio, ["audio/L8", "audio/L16"]);
        assert_eq!(r.client.image, ["image/png", "image/webp"]);
        assert_eq!(r.client.timezone.as_deref(), Some("Europe/Berlin"));
        let r = tunnel_request(Some("GUAC_WIDTH=999999&GUAC_HEIGHT=x"));
        assert_eq!((r.client.width, r.client.height), (8192, 768));
        assert_eq!(r.client.image, ["image/png", "image/jpeg"]);
    }

    #[test]
    fn the_source_is_the_proxy_added_address() {
        // Only from a configured proxy; see forwarded.rs for the untrusted cases.
        let trusted: Vec<forwarded::Cidr> = vec!["10.0.0.0/24".parse().unwrap()];
        let peer: SocketAddr = "10.0.0.5:5555".parse().unwrap();
        let mut headers = HeaderMap::new();
        assert_eq!(
            forwarded::client_address(peer.ip(), &headers, &trusted),
            peer.ip()
        );
        headers.insert(
            "x-forwarded-for",
            "203.0.113.9, 198.51.100.7".parse().unwrap(),
        );
        assert_eq!(
            forwarded::client_address(peer.ip(), &headers, &trusted),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            forwarded::client_address(peer.ip(), &headers, &[]),
            peer.ip()
        );
    }

    #[tokio::test]
    async fn browser_sockets_have_nagle_off() {
        use axum::serve::Listener as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut listener = without_nagle(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await;
        assert!(accepted.nodelay().unwrap());
    }

    #[test]
    fn outside_values_stay_on_one_log_line() {
        assert_eq!(shown("x\nforged line"), "x\\nforged line");
        assert_eq!(shown("\u{1b}[31m\r"), "\\u{1b}[31m\\r");
        assert!(shown(&"a".repeat(10_000)).chars().count() <= 64);
    }
}
