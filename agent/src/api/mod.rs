//! The local status API: axum on a Unix socket, and the client the CLI uses.
//!
//! Routes (documented in `docs/status-api.md`): `GET /v1/status` (the state snapshot) and
//! `GET /v1/services/{name}/logs?lines=N` (the tail of a service's log).

pub mod client;
pub mod server;
mod tail;

use std::path::PathBuf;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// Why the API could not start or a request failed. Each variant has a stable reason, which is
/// also the `error` field of the JSON error body.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket could not be created.
    #[error("failed to bind the status socket '{path}': {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Another agent already answers on the socket.
    #[error("another exoagent is already serving '{path}'")]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// The socket's mode or group could not be set.
    #[error("failed to set the permissions of '{path}': {source}")]
    Permissions {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The request names a service exoagent does not know.
    #[error("unknown service '{0}'")]
    UnknownService(String),
    /// The service exists but is not configured on this instance.
    #[error("service '{0}' is not configured on this instance")]
    NotConfigured(String),
    /// A malformed request.
    #[error("{0}")]
    BadRequest(String),
    /// No reload can be taken now (one is waiting already, or the agent is starting over).
    #[error("a reload is already waiting; try again in a moment")]
    ReloadBusy,
    /// The reload was taken but not decided in time (the setup is still under way).
    #[error("the reload was taken; it is applied once the setup under way is done (see exoagent status)")]
    ReloadPending,
    /// This server takes no reloads.
    #[error("this agent takes no reloads")]
    ReloadUnavailable,
    /// A log file exists but could not be read.
    #[error("failed to read '{path}': {source}")]
    LogUnreadable {
        /// The log path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

impl ApiError {
    /// Short stable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Bind { .. } => "api-bind-failed",
            Self::InUse { .. } => "api-in-use",
            Self::Permissions { .. } => "api-socket-permissions",
            Self::UnknownService(_) => "unknown-service",
            Self::NotConfigured(_) => "not-configured",
            Self::BadRequest(_) => "bad-request",
            Self::LogUnreadable { .. } => "log-unreadable",
            Self::ReloadBusy => "reload-busy",
            Self::ReloadPending => "reload-pending",
            Self::ReloadUnavailable => "reload-unavailable",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::UnknownService(_) | Self::NotConfigured(_) => StatusCode::NOT_FOUND,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::ReloadBusy | Self::ReloadUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::ReloadPending => StatusCode::ACCEPTED,
            Self::Bind { .. }
            | Self::InUse { .. }
            | Self::Permissions { .. }
            | Self::LogUnreadable { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A reload asked for through `POST /v1/reload`, and where its outcome goes.
pub type ReloadAsk = (
    crate::state::ReloadTrigger,
    tokio::sync::oneshot::Sender<crate::state::ReloadStatus>,
);

/// The JSON body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ErrorBody {
    /// The stable reason.
    pub error: String,
    /// A sentence for people.
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.reason().to_owned(),
            message: self.to_string(),
        };
        (self.status(), Json(body)).into_response()
    }
}
