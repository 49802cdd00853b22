//! The API server: routes over the state hub and the service logs, served on a Unix socket
//! (mode 0660, group = the instance user's) so only root and the instance owner can ask.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use crate::api::tail::{line_count, tail_lines};
use crate::api::ApiError;
use crate::httpserve::{self, Limits};
use crate::model::ServiceKind;
use crate::paths::Paths;
use crate::state::{Snapshot, StateHub};
use crate::supervise::logfile::RotatingLog;

/// Lines of log returned when the request does not say.
pub const DEFAULT_LOG_LINES: usize = 100;
/// The most lines one request may ask for.
pub const MAX_LOG_LINES: usize = 10_000;
/// The most bytes of log one response carries.
pub const MAX_LOG_BYTES: u64 = 4 * 1024 * 1024;
/// What each client of the socket may hold (`docs/contracts.md`): the defaults, 64 connections.
pub const LIMITS: Limits = Limits::DEFAULT;

/// What the handlers read.
#[derive(Debug, Clone)]
pub struct ApiState {
    /// The state hub (read only here).
    pub hub: StateHub,
    /// Where the logs are.
    pub paths: Paths,
    /// Where `POST /v1/reload` asks go (`None`: reloads are not offered).
    pub reloads: Option<tokio::sync::mpsc::Sender<crate::api::ReloadAsk>>,
}

/// The router (testable without a socket).
pub fn app(state: ApiState) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/services/{name}/logs", get(logs))
        .route("/v1/reload", post(reload))
        .with_state(state)
}

async fn status(State(state): State<ApiState>) -> Json<Snapshot> {
    Json(state.hub.snapshot())
}

/// How long `POST /v1/reload` waits for the decision (the agent waits for a setup under way).
const RELOAD_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Read the configuration again: 200 with the outcome (`applied` ends this run of the agent
/// just after the answer), 202 when a setup under way holds it back.
async fn reload(
    State(state): State<ApiState>,
) -> Result<Json<crate::state::ReloadStatus>, ApiError> {
    let Some(reloads) = &state.reloads else {
        return Err(ApiError::ReloadUnavailable);
    };
    let (reply, decided) = tokio::sync::oneshot::channel();
    reloads
        .try_send((crate::state::ReloadTrigger::Command, reply))
        .map_err(|_| ApiError::ReloadBusy)?;
    match tokio::time::timeout(RELOAD_WAIT, decided).await {
        Ok(Ok(status)) => Ok(Json(status)),
        Ok(Err(_)) => Err(ApiError::ReloadBusy),
        Err(_) => Err(ApiError::ReloadPending),
    }
}

async fn logs(
    State(state): State<ApiState>,
    UrlPath(name): UrlPath<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let kind: ServiceKind = name
        .parse()
        .map_err(|_| ApiError::UnknownService(name.clone()))?;
    if !state
        .hub
        .snapshot()
        .services
        .iter()
        .any(|s| s.service == kind)
    {
        return Err(ApiError::NotConfigured(name));
    }
    let lines = match query.get("lines") {
        None => DEFAULT_LOG_LINES,
        Some(raw) => match raw.parse::<usize>() {
            Ok(n) if (1..=MAX_LOG_LINES).contains(&n) => n,
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "lines must be a whole number from 1 to {MAX_LOG_LINES}, not '{raw}'"
                )))
            }
        },
    };
    let path = state.paths.service_log(kind);
    let text = tokio::task::spawn_blocking(move || read_log_tail(&path, lines))
        .await
        .map_err(|e| ApiError::LogUnreadable {
            path: PathBuf::from(kind.as_str()),
            source: std::io::Error::other(e.to_string()),
        })??;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        String::from_utf8_lossy(&text).into_owned(),
    )
        .into_response())
}

/// The last `lines` lines of the log, reaching into the rotated copy when the current file
/// holds fewer.
fn read_log_tail(path: &Path, lines: usize) -> Result<Vec<u8>, ApiError> {
    let unreadable = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ApiError::LogUnreadable { path, source }
    };
    let current = tail_lines(path, lines, MAX_LOG_BYTES)
        .map_err(unreadable(path))?
        .unwrap_or_default();
    let have = line_count(&current);
    if have >= lines {
        return Ok(current);
    }
    let rotated_path = RotatingLog::rotated_path(path);
    let mut older = tail_lines(
        &rotated_path,
        lines - have,
        MAX_LOG_BYTES.saturating_sub(current.len() as u64),
    )
    .map_err(unreadable(&rotated_path))?
    .unwrap_or_default();
    if !older.is_empty() && older.last() != Some(&b'\n') {
        older.push(b'\n');
    }
    older.extend_from_slice(&current);
    Ok(older)
}

/// Bind the socket (replacing a stale one), restrict it to 0660 and, when given, the group
/// `group`, then serve until `cancel` fires. Returns once the socket accepts connections.
pub async fn bind_and_serve(
    state: ApiState,
    socket: &Path,
    group: Option<u32>,
    cancel: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, ApiError> {
    let bind_error = |source| ApiError::Bind {
        path: socket.to_path_buf(),
        source,
    };
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(bind_error)?;
    }
    if tokio::net::UnixStream::connect(socket).await.is_ok() {
        return Err(ApiError::InUse {
            path: socket.to_path_buf(),
        });
    }
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_error(e)),
    }
    let listener = tokio::net::UnixListener::bind(socket).map_err(bind_error)?;
    let permissions = |source| ApiError::Permissions {
        path: socket.to_path_buf(),
        source,
    };
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660))
        .map_err(permissions)?;
    if let Some(gid) = group {
        nix::unistd::chown(socket, None, Some(nix::unistd::Gid::from_raw(gid)))
            .map_err(|errno| permissions(std::io::Error::from(errno)))?;
    }
    let router = app(state);
    Ok(tokio::spawn(httpserve::serve(
        listener,
        router,
        LIMITS,
        cancel.cancelled_owned(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotated_lines_come_first() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("svc.log");
        std::fs::write(RotatingLog::rotated_path(&log), "old1\nold2\nold3\n").unwrap();
        std::fs::write(&log, "new1\nnew2\n").unwrap();
        assert_eq!(read_log_tail(&log, 3).unwrap(), b"old3\nnew1\nnew2\n");
        assert_eq!(read_log_tail(&log, 2).unwrap(), b"new1\nnew2\n");
        assert_eq!(
            read_log_tail(&log, 100).unwrap(),
            b"old1\nold2\nold3\nnew1\nnew2\n"
        );
    }

    #[test]
    fn no_log_yet_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_log_tail(&dir.path().join("svc.log"), 5)
            .unwrap()
            .is_empty());
    }
}
