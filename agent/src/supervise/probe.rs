//! Readiness and liveness probes: an HTTP/1.1 GET (hyper over a plain TCP stream, explicit Host
//! header, optionally requiring a JSON object key in the body), an RFB (VNC) handshake up to the
//! server's list of security types, or a bare TCP connect.
//!
//! RFB: RFC 6143 §7.1 (<https://www.rfc-editor.org/rfc/rfc6143#section-7.1>).

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The largest probe response body read.
const MAX_BODY: usize = 1 << 20;
/// The most of an RFB failure reason kept (the server states the length; a hostile or broken
/// one must not make the probe allocate gigabytes).
const MAX_RFB_REASON: u32 = 1024;

/// How to tell whether a service answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// `GET path` with `Host: host`; healthy iff the status is 200 and, when `expect_json_key`
    /// is set, the body is a JSON object holding that key.
    Http {
        /// Where to connect.
        addr: SocketAddr,
        /// The request target, starting with `/`.
        path: String,
        /// The Host header value.
        host: String,
        /// A key the JSON object body must contain.
        expect_json_key: Option<String>,
        /// The User-Agent to send (`None`: `exoagent-probe`); RStudio serves its sign-in page
        /// only to browsers.
        user_agent: Option<String>,
    },
    /// Healthy iff a TCP connection is accepted.
    Tcp {
        /// Where to connect.
        addr: SocketAddr,
    },
    /// The RFB handshake up to the security types: read the 12-byte `RFB 003.00x\n` banner
    /// (x = 3, 7 or 8), answer with the same version (3.8 for a 3.8 server), read the offered
    /// security types; healthy iff `security_type` is among them. The connection is then
    /// closed without choosing a type, so no authentication is attempted (and no failed attempt
    /// counts towards the server's blacklist).
    Rfb {
        /// Where to connect.
        addr: SocketAddr,
        /// The security type that must be offered: 1 = None, 2 = VNC authentication.
        security_type: u8,
    },
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The whole probe took longer than its timeout.
    #[error("probe of {addr} timed out after {timeout:?}")]
    Timeout {
        /// The probed address.
        addr: SocketAddr,
        /// The timeout.
        timeout: Duration,
    },
    /// No TCP connection.
    #[error("failed to connect to {addr}: {source}")]
    Connect {
        /// The probed address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The request could not be built from the configured path and host.
    #[error("invalid probe request 'GET {path}' (Host: {host}): {detail}")]
    Request {
        /// The request target.
        path: String,
        /// The Host header.
        host: String,
        /// What was wrong.
        detail: String,
    },
    /// The HTTP exchange failed.
    #[error("HTTP probe of {addr}{path} failed: {source}")]
    Http {
        /// The probed address.
        addr: SocketAddr,
        /// The request target.
        path: String,
        /// The hyper error.
        source: hyper::Error,
    },
    /// The service says it cannot become ready without a fix (a non-200 answer whose JSON
    /// object holds `"failed": {"reason": "<code>", "detail": "<text>"}`): no point waiting.
    #[error("HTTP probe of {addr}{path}: the service cannot become ready: {detail}")]
    Failed {
        /// The probed address.
        addr: SocketAddr,
        /// The request target.
        path: String,
        /// The service's stable reason (lowercase letters, digits and `-`, at most 64).
        reason: String,
        /// The service's explanation.
        detail: String,
    },
    /// The response status was not 200.
    #[error("HTTP probe of {addr}{path} answered status {status}")]
    Status {
        /// The probed address.
        addr: SocketAddr,
        /// The request target.
        path: String,
        /// The status code received.
        status: u16,
    },
    /// The body could not be read, was too large, or was not the expected JSON.
    #[error("HTTP probe of {addr}{path}: {detail}")]
    Body {
        /// The probed address.
        addr: SocketAddr,
        /// The request target.
        path: String,
        /// What was wrong.
        detail: String,
    },
    /// The RFB exchange broke off (the peer closed early, or a read or write failed).
    #[error("RFB probe of {addr} failed to {stage}: {source}")]
    RfbIo {
        /// The probed address.
        addr: SocketAddr,
        /// What was being done (`read the banner`, ...).
        stage: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The first 12 bytes were not an RFB 3.3, 3.7 or 3.8 banner.
    #[error("RFB probe of {addr}: not an RFB 3.3/3.7/3.8 banner: \"{banner}\"")]
    BadBanner {
        /// The probed address.
        addr: SocketAddr,
        /// The bytes received, escaped.
        banner: String,
    },
    /// The server offered no security type and said why (TigerVNC, for instance, refuses a
    /// blacklisted address with "Too many security failures").
    #[error("RFB probe of {addr}: the server refused the connection: {message}")]
    RfbRefused {
        /// The probed address.
        addr: SocketAddr,
        /// The server's reason, lossily decoded and truncated.
        message: String,
    },
    /// The server offered security types, but not the wanted one.
    #[error("RFB probe of {addr}: security type {wanted} not offered (offered: {offered:?})")]
    SecurityTypeMissing {
        /// The probed address.
        addr: SocketAddr,
        /// The type required.
        wanted: u8,
        /// The types the server offered.
        offered: Vec<u8>,
    },
}

impl ProbeError {
    /// A short stable code for this failure.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Timeout { .. } => "probe-timeout",
            Self::Connect { .. } => "probe-connect-failed",
            Self::Request { .. } => "probe-invalid",
            Self::Http { .. } => "probe-http-failed",
            Self::Failed { .. } => "probe-service-failed",
            Self::Status { .. } => "probe-bad-status",
            Self::Body { .. } => "probe-bad-body",
            Self::RfbIo { .. } => "probe-rfb-io-failed",
            Self::BadBanner { .. } => "probe-bad-banner",
            Self::RfbRefused { .. } => "probe-rfb-refused",
            Self::SecurityTypeMissing { .. } => "probe-security-type-missing",
        }
    }
}

impl Probe {
    /// The address probed.
    pub fn addr(&self) -> SocketAddr {
        match self {
            Self::Http { addr, .. } | Self::Tcp { addr } | Self::Rfb { addr, .. } => *addr,
        }
    }

    /// Run the probe once, bounded by `timeout` as a whole.
    pub async fn check(&self, timeout: Duration) -> Result<(), ProbeError> {
        let addr = self.addr();
        match tokio::time::timeout(timeout, self.check_unbounded()).await {
            Ok(result) => result,
            Err(_) => Err(ProbeError::Timeout { addr, timeout }),
        }
    }

    async fn check_unbounded(&self) -> Result<(), ProbeError> {
        let addr = self.addr();
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| ProbeError::Connect { addr, source })?;
        match self {
            Self::Tcp { .. } => Ok(()),
            Self::Http {
                path,
                host,
                expect_json_key,
                user_agent,
                ..
            } => {
                let agent = user_agent.as_deref().unwrap_or("exoagent-probe");
                check_http(addr, stream, path, host, agent, expect_json_key.as_deref()).await
            }
            Self::Rfb { security_type, .. } => check_rfb(addr, stream, *security_type).await,
        }
    }
}

async fn check_http(
    addr: SocketAddr,
    stream: TcpStream,
    path: &str,
    host: &str,
    user_agent: &str,
    expect_json_key: Option<&str>,
) -> Result<(), ProbeError> {
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::USER_AGENT, user_agent)
        .body(Empty::<Bytes>::new())
        .map_err(|e| ProbeError::Request {
            path: path.to_owned(),
            host: host.to_owned(),
            detail: e.to_string(),
        })?;
    let http_err = |source| ProbeError::Http {
        addr,
        path: path.to_owned(),
        source,
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http_err)?;
    // The connection future ends when `sender` is dropped (end of this function) or the
    // peer closes; the task then finishes on its own.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let response = sender.send_request(request).await.map_err(http_err)?;
    let status = response.status().as_u16();
    if status != 200 {
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        if let Some((reason, detail)) = declared_failure(&body) {
            return Err(ProbeError::Failed {
                addr,
                path: path.to_owned(),
                reason,
                detail,
            });
        }
        return Err(ProbeError::Status {
            addr,
            path: path.to_owned(),
            status,
        });
    }
    let Some(key) = expect_json_key else {
        return Ok(());
    };
    let body_err = |detail: String| ProbeError::Body {
        addr,
        path: path.to_owned(),
        detail,
    };
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| body_err(format!("failed to read the body: {e}")))?
        .to_bytes();
    let value: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| body_err(format!("body is not JSON: {e}")))?;
    match value.as_object() {
        Some(object) if object.contains_key(key) => Ok(()),
        Some(_) => Err(body_err(format!("JSON body has no key '{key}'"))),
        None => Err(body_err("JSON body is not an object".to_owned())),
    }
}

/// `"failed": {"reason", "detail"}` from a JSON object body, when the reason is a stable code
/// (1 to 64 of `a-z`, `0-9`, `-`); anything else is an ordinary bad status.
fn declared_failure(body: &[u8]) -> Option<(String, String)> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let failed = value.get("failed")?.as_object()?;
    let reason = failed.get("reason")?.as_str()?;
    let valid = (1..=64).contains(&reason.len())
        && reason
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !valid {
        return None;
    }
    let detail = failed
        .get("detail")
        .and_then(|d| d.as_str())
        .unwrap_or_default()
        .chars()
        .take(1024)
        .collect();
    Some((reason.to_owned(), detail))
}

/// The minor version of an RFB 3.x banner the probe speaks (3, 7 or 8), `None` otherwise.
fn rfb_minor_version(banner: &[u8; 12]) -> Option<u8> {
    match banner {
        [b'R', b'F', b'B', b' ', b'0', b'0', b'3', b'.', b'0', b'0', minor @ (b'3' | b'7' | b'8'), b'\n'] => {
            Some(minor - b'0')
        }
        _ => None,
    }
}

async fn check_rfb(addr: SocketAddr, mut stream: TcpStream, wanted: u8) -> Result<(), ProbeError> {
    let io_err = |stage: &'static str| {
        move |source| ProbeError::RfbIo {
            addr,
            stage,
            source,
        }
    };
    let mut banner = [0u8; 12];
    stream
        .read_exact(&mut banner)
        .await
        .map_err(io_err("read the banner"))?;
    let minor = rfb_minor_version(&banner).ok_or_else(|| ProbeError::BadBanner {
        addr,
        banner: String::from_utf8_lossy(&banner).escape_debug().to_string(),
    })?;
    // RFC 6143 7.1.1: the client answers with a version no higher than the server's. Every
    // accepted banner is at most 3.8, so echoing the server's version is right (3.8 for the
    // TigerVNC and TurboVNC servers).
    stream
        .write_all(format!("RFB 003.00{minor}\n").as_bytes())
        .await
        .map_err(io_err("send the version"))?;
    let offered = if minor == 3 {
        // 3.3: the server picks one type and sends it as a u32; 0 means failure + reason.
        let chosen = stream
            .read_u32()
            .await
            .map_err(io_err("read the security type"))?;
        if chosen == 0 {
            return Err(rfb_refused(addr, &mut stream).await);
        }
        u8::try_from(chosen).map(|t| vec![t]).unwrap_or_default()
    } else {
        let count = stream
            .read_u8()
            .await
            .map_err(io_err("read the security type count"))?;
        if count == 0 {
            return Err(rfb_refused(addr, &mut stream).await);
        }
        let mut types = vec![0u8; usize::from(count)];
        stream
            .read_exact(&mut types)
            .await
            .map_err(io_err("read the security types"))?;
        types
    };
    if offered.contains(&wanted) {
        Ok(())
    } else {
        Err(ProbeError::SecurityTypeMissing {
            addr,
            wanted,
            offered,
        })
    }
}

/// Read the reason that follows a refusal (u32 length + text) into a [`ProbeError::RfbRefused`];
/// a reason that cannot be read still yields the refusal.
async fn rfb_refused(addr: SocketAddr, stream: &mut TcpStream) -> ProbeError {
    let message = match stream.read_u32().await {
        Ok(length) => {
            let mut text = Vec::new();
            let kept = u64::from(length.min(MAX_RFB_REASON));
            match (&mut *stream).take(kept).read_to_end(&mut text).await {
                Ok(_) => String::from_utf8_lossy(&text).into_owned(),
                Err(e) => format!("(reason unreadable: {e})"),
            }
        }
        Err(e) => format!("(reason unreadable: {e})"),
    };
    ProbeError::RfbRefused { addr, message }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A real HTTP/1.1 peer on loopback that answers every request with `response` and hands
    /// back the request heads it saw.
    async fn serve(response: &'static str) -> (SocketAddr, tokio::sync::mpsc::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = tx.send(String::from_utf8_lossy(&head).into_owned()).await;
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        (addr, rx)
    }

    fn http(addr: SocketAddr, key: Option<&str>) -> Probe {
        Probe::Http {
            addr,
            path: "/api?x=1".into(),
            host: "svc.example:8888".into(),
            expect_json_key: key.map(str::to_owned),
            user_agent: None,
        }
    }

    const T: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn http_ok_with_json_key_and_host_header() {
        let (addr, mut seen) = serve(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 19\r\n\r\n{\"version\":\"4.2.0\"}",
        )
        .await;
        http(addr, Some("version")).check(T).await.unwrap();
        let head = seen.recv().await.unwrap();
        assert!(head.starts_with("GET /api?x=1 HTTP/1.1\r\n"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("host: svc.example:8888\r\n"),
            "{head}"
        );
        http(addr, None).check(T).await.unwrap();
        let err = http(addr, Some("missing")).check(T).await.unwrap_err();
        assert_eq!(err.reason(), "probe-bad-body");
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[tokio::test]
    async fn a_declared_failure_is_its_own_error_with_the_services_reason() {
        let body =
            r#"{"error":"x","failed":{"reason":"guacd-protocol-missing","detail":"no rdp"}}"#;
        let response = format!(
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let (addr, _seen) = serve(Box::leak(response.into_boxed_str())).await;
        match http(addr, Some("guacd")).check(T).await.unwrap_err() {
            ProbeError::Failed { reason, detail, .. } => {
                assert_eq!(
                    (reason.as_str(), detail.as_str()),
                    ("guacd-protocol-missing", "no rdp")
                );
            }
            other => panic!("expected Failed, saw {other:?}"),
        }
        // A reason that is not a stable code is ignored: an ordinary bad status.
        assert_eq!(
            declared_failure(br#"{"failed":{"reason":"Bad Reason!"}}"#),
            None
        );
        assert_eq!(declared_failure(br#"{"failed":"x"}"#), None);
        assert_eq!(declared_failure(b"not json"), None);
    }

    #[tokio::test]
    async fn http_non_200_and_non_json_fail() {
        let (addr, _seen) =
            serve("HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n").await;
        let err = http(addr, None).check(T).await.unwrap_err();
        assert_eq!(err.reason(), "probe-bad-status");
        assert!(err.to_string().contains("503"), "{err}");

        let (addr, _seen) = serve("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello").await;
        let err = http(addr, Some("k")).check(T).await.unwrap_err();
        assert_eq!(err.reason(), "probe-bad-body");

        let (addr, _seen) = serve("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]").await;
        let err = http(addr, Some("k")).check(T).await.unwrap_err();
        assert!(err.to_string().contains("not an object"), "{err}");
    }

    #[tokio::test]
    async fn connect_refused_and_silent_peer_time_out() {
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let err = Probe::Tcp { addr: closed }.check(T).await.unwrap_err();
        assert_eq!(err.reason(), "probe-connect-failed");

        // A listener that accepts but never answers.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        Probe::Tcp { addr }.check(T).await.unwrap();
        let err = http(addr, None)
            .check(Duration::from_millis(200))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "probe-timeout");
        drop(silent);
    }

    /// A fake RFB server on loopback: for every connection, sends `banner`, reads the client's
    /// 12-byte version (handed back) and sends `after`, then closes.
    async fn rfb_server(
        banner: &'static [u8],
        after: &'static [u8],
    ) -> (SocketAddr, tokio::sync::mpsc::Receiver<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    if stream.write_all(banner).await.is_err() {
                        return;
                    }
                    let mut version = [0u8; 12];
                    if stream.read_exact(&mut version).await.is_err() {
                        return;
                    }
                    let _ = tx.send(version.to_vec()).await;
                    let _ = stream.write_all(after).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        (addr, rx)
    }

    fn rfb(addr: SocketAddr, security_type: u8) -> Probe {
        Probe::Rfb {
            addr,
            security_type,
        }
    }

    #[tokio::test]
    async fn rfb_3_8_offered_type_passes_and_missing_type_fails() {
        let (addr, mut seen) = rfb_server(b"RFB 003.008\n", &[2, 1, 2]).await;
        rfb(addr, 2).check(T).await.unwrap();
        assert_eq!(seen.recv().await.unwrap(), b"RFB 003.008\n");
        rfb(addr, 1).check(T).await.unwrap();
        let err = rfb(addr, 19).check(T).await.unwrap_err();
        assert_eq!(err.reason(), "probe-security-type-missing");
        assert!(err.to_string().contains("[1, 2]"), "{err}");
        assert!(
            err.to_string().contains("wanted 19") || err.to_string().contains("type 19"),
            "{err}"
        );
        assert_eq!(rfb(addr, 2).addr(), addr);
    }

    #[tokio::test]
    async fn rfb_count_zero_is_a_refusal_with_the_server_reason() {
        let (addr, _seen) = rfb_server(
            b"RFB 003.008\n",
            b"\x00\x00\x00\x00\x1aToo many security failures",
        )
        .await;
        let err = rfb(addr, 2).check(T).await.unwrap_err();
        assert_eq!(err.reason(), "probe-rfb-refused");
        assert!(
            err.to_string().contains("Too many security failures"),
            "{err}"
        );

        // The same refusal in RFB 3.3 form: a u32 type of 0, then the reason.
        let (addr, mut seen) =
            rfb_server(b"RFB 003.003\n", b"\x00\x00\x00\x00\x00\x00\x00\x04busy").await;
        let err = rfb(addr, 2).check(T).await.unwrap_err();
        assert_eq!(err.reason(), "probe-rfb-refused");
        assert!(err.to_string().ends_with("busy"), "{err}");
        // A 3.3 server is answered in 3.3, never with a higher version.
        assert_eq!(seen.recv().await.unwrap(), b"RFB 003.003\n");
    }

    #[tokio::test]
    async fn rfb_3_3_server_chosen_type_is_checked() {
        let (addr, _seen) = rfb_server(b"RFB 003.003\n", &[0, 0, 0, 2]).await;
        rfb(addr, 2).check(T).await.unwrap();
        let err = rfb(addr, 1).check(T).await.unwrap_err();
        assert_eq!(err.reason(), "probe-security-type-missing");
    }

    #[tokio::test]
    async fn rfb_bad_banners_and_early_close_fail() {
        for banner in [
            &b"HTTP/1.1 400"[..],
            b"RFB 003.889\n",
            b"RFB 004.001\n",
            b"RFB 003.008\r",
        ] {
            let (addr, _seen) = rfb_server(banner, &[1, 2]).await;
            let err = rfb(addr, 2).check(T).await.unwrap_err();
            assert_eq!(err.reason(), "probe-bad-banner", "{banner:?}");
            assert!(err.to_string().contains("not an RFB"), "{err}");
        }

        // Fewer than 12 bytes, then the server closes.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            if let Ok((mut stream, _)) = listener.accept().await {
                let _ = stream.write_all(b"RFB 003").await;
            }
        });
        let err = rfb(addr, 2).check(T).await.unwrap_err();
        assert_eq!(err.reason(), "probe-rfb-io-failed");
        assert!(err.to_string().contains("read the banner"), "{err}");

        // A banner, then the server closes before offering any type.
        let (addr, _seen) = rfb_server(b"RFB 003.008\n", &[]).await;
        let err = rfb(addr, 2).check(T).await.unwrap_err();
        assert_eq!(err.reason(), "probe-rfb-io-failed");
        assert!(err.to_string().contains("security type count"), "{err}");
    }

    #[tokio::test]
    async fn rfb_silent_server_times_out() {
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let err = rfb(addr, 2)
            .check(Duration::from_millis(200))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "probe-timeout");
        drop(silent);
    }
}
