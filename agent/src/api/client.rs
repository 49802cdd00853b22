//! A small HTTP/1.1 client for the status API over its Unix socket (what the CLI uses).

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;

use crate::api::ErrorBody;
use crate::state::Snapshot;

/// How long one request may take before the agent counts as unresponsive.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a reload may take to be decided (the server waits up to 20 s).
const RELOAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers on the socket (the agent is not running, or not yet).
    #[error("cannot reach exoagent at '{socket}': {source}{hint}")]
    Unreachable {
        /// The socket path.
        socket: PathBuf,
        /// The OS error.
        source: std::io::Error,
        /// Advice, such as using sudo when permission was denied.
        hint: &'static str,
    },
    /// The agent answered something that is not the API.
    #[error("unexpected answer from '{socket}': {message}")]
    Protocol {
        /// The socket path.
        socket: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// The API answered with an error.
    #[error("{message} ({reason}, HTTP {status})")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The stable reason.
        reason: String,
        /// The message.
        message: String,
    },
}

impl ClientError {
    /// Short stable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unreachable { .. } => "agent-unreachable",
            Self::Protocol { .. } => "api-protocol",
            Self::Api { .. } => "api-error",
        }
    }
}

/// The client; the socket path is injected.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
}

impl ApiClient {
    /// A client for the API at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> Result<Snapshot, ClientError> {
        let body = self.get("/v1/status").await?;
        serde_json::from_slice(&body).map_err(|e| self.protocol(format!("bad status JSON: {e}")))
    }

    /// `POST /v1/reload`: the agent reads its configuration again; what it did.
    pub async fn reload(&self) -> Result<crate::state::ReloadStatus, ClientError> {
        let asked = self.request(hyper::Method::POST, "/v1/reload");
        let body = match tokio::time::timeout(RELOAD_TIMEOUT, asked).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(ClientError::Unreachable {
                    socket: self.socket.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in 30 s"),
                    hint: "",
                })
            }
        };
        serde_json::from_slice(&body).map_err(|e| self.protocol(format!("bad reload JSON: {e}")))
    }

    /// `GET /v1/services/{service}/logs?lines=N`.
    pub async fn logs(&self, service: &str, lines: usize) -> Result<String, ClientError> {
        if !service
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(ClientError::Api {
                status: 404,
                reason: "unknown-service".into(),
                message: format!("unknown service '{service}'"),
            });
        }
        let body = self
            .get(&format!("/v1/services/{service}/logs?lines={lines}"))
            .await?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    fn protocol(&self, message: String) -> ClientError {
        ClientError::Protocol {
            socket: self.socket.clone(),
            message,
        }
    }

    async fn get(&self, path_and_query: &str) -> Result<Bytes, ClientError> {
        match tokio::time::timeout(REQUEST_TIMEOUT, self.get_inner(path_and_query)).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Unreachable {
                socket: self.socket.clone(),
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in 10 s"),
                hint: "",
            }),
        }
    }

    async fn get_inner(&self, path_and_query: &str) -> Result<Bytes, ClientError> {
        self.request(hyper::Method::GET, path_and_query).await
    }

    async fn request(
        &self,
        method: hyper::Method,
        path_and_query: &str,
    ) -> Result<Bytes, ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Unreachable {
                socket: self.socket.clone(),
                hint: if source.kind() == std::io::ErrorKind::PermissionDenied {
                    " (run as root, e.g. with sudo, or as the instance user)"
                } else {
                    ""
                },
                source,
            })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.protocol(e.to_string()))?;
        let driver = tokio::spawn(connection);
        let request = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(hyper::header::HOST, "exoagent")
            .body(Empty::<Bytes>::new())
            .map_err(|e| self.protocol(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| self.protocol(e.to_string()))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| self.protocol(e.to_string()))?
            .to_bytes();
        driver.abort();
        if status == StatusCode::OK {
            return Ok(body);
        }
        match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(error) => Err(ClientError::Api {
                status: status.as_u16(),
                reason: error.error,
                message: error.message,
            }),
            Err(_) => Err(self.protocol(format!("HTTP {status} without an error body"))),
        }
    }
}
