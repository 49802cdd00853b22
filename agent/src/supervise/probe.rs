//! Readiness and liveness probes: an HTTP/1.1 GET (hyper over a plain TCP stream, explicit Host
//! header, optionally requiring a JSON object key in the body) or a bare TCP connect.

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The largest probe response body read.
const MAX_BODY: usize = 1 << 20;

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
    },
    /// Healthy iff a TCP connection is accepted.
    Tcp {
        /// Where to connect.
        addr: SocketAddr,
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
}

impl ProbeError {
    /// A short stable code for this failure.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Timeout { .. } => "probe-timeout",
            Self::Connect { .. } => "probe-connect-failed",
            Self::Request { .. } => "probe-invalid",
            Self::Http { .. } => "probe-http-failed",
            Self::Status { .. } => "probe-bad-status",
            Self::Body { .. } => "probe-bad-body",
        }
    }
}

impl Probe {
    /// The address probed.
    pub fn addr(&self) -> SocketAddr {
        match self {
            Self::Http { addr, .. } | Self::Tcp { addr } => *addr,
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
        let Self::Http {
            path,
            host,
            expect_json_key,
            ..
        } = self
        else {
            return Ok(());
        };
        let request = hyper::Request::get(path.as_str())
            .header(hyper::header::HOST, host.as_str())
            .header(hyper::header::USER_AGENT, "exoagent-probe")
            .body(Empty::<Bytes>::new())
            .map_err(|e| ProbeError::Request {
                path: path.clone(),
                host: host.clone(),
                detail: e.to_string(),
            })?;
        let http_err = |source| ProbeError::Http {
            addr,
            path: path.clone(),
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
            return Err(ProbeError::Status {
                addr,
                path: path.clone(),
                status,
            });
        }
        let Some(key) = expect_json_key else {
            return Ok(());
        };
        let body_err = |detail: String| ProbeError::Body {
            addr,
            path: path.clone(),
            detail,
        };
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| body_err(format!("failed to read the body: {e}")))?
            .to_bytes();
        let value: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| body_err(format!("body is not JSON: {e}")))?;
        match value.as_object() {
            Some(object) if object.contains_key(key) => Ok(()),
            Some(_) => Err(body_err(format!("JSON body has no key '{key}'"))),
            None => Err(body_err("JSON body is not an object".to_owned())),
        }
    }
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
}
