//! The local status API, on the router and over a real Unix socket, and the `status`/`logs`
//! commands' exit codes against it.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::ExitCode;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use exoagent::api::client::{ApiClient, ClientError};
use exoagent::api::server::{app, bind_and_serve, ApiState, LIMITS};
use exoagent::cli::status::{self, StatusArgs};
use exoagent::model::ServiceKind;
use exoagent::paths::Paths;
use exoagent::state::{Reason, ServiceState, ServiceUpdate, SetupPhase, StateHub};
use http_body_util::BodyExt;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

struct Fixture {
    _dir: tempfile::TempDir,
    paths: Paths,
    hub: StateHub,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let paths = Paths::sandbox(dir.path());
    let hub = StateHub::new([(
        ServiceKind::JupyterLab,
        8888,
        "http://127.0.0.1:8888/".to_owned(),
    )]);
    Fixture {
        _dir: dir,
        paths,
        hub,
    }
}

impl Fixture {
    fn state(&self) -> ApiState {
        ApiState {
            reloads: None,
            hub: self.hub.clone(),
            paths: self.paths.clone(),
        }
    }

    fn write_log(&self, text: &str) {
        let log = self.paths.service_log(ServiceKind::JupyterLab);
        std::fs::create_dir_all(log.parent().unwrap()).unwrap();
        std::fs::write(log, text).unwrap();
    }

    fn complete(&self) {
        self.hub.set_phase(SetupPhase::Provisioning);
        for next in [
            ServiceState::Installing,
            ServiceState::Starting,
            ServiceState::Ready,
        ] {
            self.hub
                .transition(ServiceKind::JupyterLab, next, ServiceUpdate::default())
                .unwrap();
        }
        self.hub.set_phase(SetupPhase::Supervising);
    }
}

async fn get(state: ApiState, uri: &str) -> (StatusCode, Vec<u8>) {
    let response = app(state)
        .oneshot(Request::get(uri).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, body.to_vec())
}

fn error_of(body: &[u8]) -> String {
    let value: Value = serde_json::from_slice(body).expect("error bodies are JSON");
    assert!(value["message"].as_str().is_some_and(|m| !m.is_empty()));
    value["error"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn status_is_the_snapshot() {
    let f = fixture();
    let (code, body) = get(f.state(), "/v1/status").await;
    assert_eq!(code, StatusCode::OK);
    let value: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(value["setup"]["state"], "starting");
    assert_eq!(value["services"][0]["service"], "jupyterlab");
    assert_eq!(value["services"][0]["state"], "pending");
    assert_eq!(value["services"][0]["port"], 8888);
    f.complete();
    let (_, body) = get(f.state(), "/v1/status").await;
    let value: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(value["setup"]["state"], "complete");
    assert!(value.get("volumes").is_none(), "{value}");
    f.hub.set_volumes(vec![exoagent::state::VolumeStatus {
        device: "/dev/vdb".into(),
        volume_id: None,
        name: Some("vdb".into()),
        state: exoagent::state::VolumeState::LeftAlone,
        mount_point: None,
        reason: Some("signature".into()),
        detail: "TYPE=swap".into(),
    }]);
    let (_, body) = get(f.state(), "/v1/status").await;
    let value: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(value["volumes"][0]["state"], "left-alone");
    assert_eq!(value["volumes"][0]["reason"], "signature");
    // Volumes never change the setup state.
    assert_eq!(value["setup"]["state"], "complete");
}

#[tokio::test]
async fn logs_tail_and_errors() {
    let f = fixture();
    let (code, body) = get(f.state(), "/v1/services/jupyterlab/logs").await;
    assert_eq!(
        (code, body.as_slice()),
        (StatusCode::OK, &b""[..]),
        "no log yet"
    );

    let text: String = (1..=300).map(|i| format!("line {i}\n")).collect();
    f.write_log(&text);
    let (code, body) = get(f.state(), "/v1/services/jupyterlab/logs?lines=2").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body, b"line 299\nline 300\n");
    let (_, body) = get(f.state(), "/v1/services/jupyterlab/logs").await;
    assert_eq!(String::from_utf8(body).unwrap().lines().count(), 100);

    let (code, body) = get(f.state(), "/v1/services/nosuch/logs").await;
    assert_eq!(
        (code, error_of(&body).as_str()),
        (StatusCode::NOT_FOUND, "unknown-service")
    );
    let (code, body) = get(f.state(), "/v1/services/desktop/logs").await;
    assert_eq!(
        (code, error_of(&body).as_str()),
        (StatusCode::NOT_FOUND, "not-configured")
    );
    for bad in ["0", "-1", "ten", "10001"] {
        let (code, body) = get(
            f.state(),
            &format!("/v1/services/jupyterlab/logs?lines={bad}"),
        )
        .await;
        assert_eq!(
            (code, error_of(&body).as_str()),
            (StatusCode::BAD_REQUEST, "bad-request"),
            "{bad}"
        );
    }
}

#[tokio::test]
async fn logs_reach_into_the_rotated_copy() {
    let f = fixture();
    f.write_log("new 1\nnew 2\n");
    let log = f.paths.service_log(ServiceKind::JupyterLab);
    let mut rotated = log.into_os_string();
    rotated.push(".1");
    std::fs::write(rotated, "old 1\nold 2\n").unwrap();
    let (_, body) = get(f.state(), "/v1/services/jupyterlab/logs?lines=3").await;
    assert_eq!(body, b"old 2\nnew 1\nnew 2\n");
}

fn args(json: bool, wait: bool, timeout: Option<Duration>) -> StatusArgs {
    StatusArgs {
        json,
        wait,
        timeout,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_a_real_socket_with_stable_exit_codes() {
    let f = fixture();
    let socket = f.paths.api_socket();
    let cancel = CancellationToken::new();

    // Nothing listening yet: unreachable.
    let code = status::run(args(true, false, None), &socket).await.unwrap();
    assert_eq!(code, ExitCode::from(status::EXIT_UNREACHABLE));
    assert!(matches!(
        ApiClient::new(&socket).status().await,
        Err(ClientError::Unreachable { .. })
    ));

    let server = bind_and_serve(f.state(), &socket, None, cancel.clone())
        .await
        .unwrap();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "socket mode");
    let again = bind_and_serve(f.state(), &socket, None, cancel.clone()).await;
    assert_eq!(
        again.err().map(|e| e.reason()),
        Some("api-in-use"),
        "a second agent must not steal the socket"
    );

    let client = ApiClient::new(&socket);
    assert_eq!(client.status().await.unwrap(), f.hub.snapshot());

    // In progress: 3 at once, and 3 when --wait times out.
    let code = status::run(args(false, false, None), &socket)
        .await
        .unwrap();
    assert_eq!(code, ExitCode::from(status::EXIT_IN_PROGRESS));
    let code = status::run(args(true, true, Some(Duration::from_millis(600))), &socket)
        .await
        .unwrap();
    assert_eq!(code, ExitCode::from(status::EXIT_IN_PROGRESS));

    // --wait returns 0 once setup completes while it waits.
    let waiter = tokio::spawn({
        let socket = socket.clone();
        async move { status::run(args(true, true, Some(Duration::from_secs(20))), &socket).await }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        !waiter.is_finished(),
        "--wait must keep waiting while in progress"
    );
    f.complete();
    assert_eq!(
        waiter.await.unwrap().unwrap(),
        ExitCode::from(status::EXIT_COMPLETE)
    );

    // Logs through the client; unknown service is an API error.
    f.write_log("hello\n");
    assert_eq!(client.logs("jupyterlab", 5).await.unwrap(), "hello\n");
    match client.logs("nosuch", 5).await {
        Err(ClientError::Api { status, reason, .. }) => {
            assert_eq!((status, reason.as_str()), (404, "unknown-service"))
        }
        other => panic!("expected an API error, got {other:?}"),
    }

    // A failure: exit 1.
    f.hub
        .transition(
            ServiceKind::JupyterLab,
            ServiceState::Failed,
            ServiceUpdate {
                reason: Some(Reason::new("crash-loop", "exit status 1")),
                ..Default::default()
            },
        )
        .unwrap();
    let code = status::run(args(false, true, None), &socket).await.unwrap();
    assert_eq!(code, ExitCode::from(status::EXIT_ERROR));

    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server stops on cancel")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_covers_an_agent_that_is_still_starting() {
    let f = fixture();
    let socket = f.paths.api_socket();
    let cancel = CancellationToken::new();
    let waiter = tokio::spawn({
        let socket = socket.clone();
        async move { status::run(args(true, true, Some(Duration::from_secs(20))), &socket).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    f.complete();
    let _server = bind_and_serve(f.state(), &socket, None, cancel.clone())
        .await
        .unwrap();
    assert_eq!(
        waiter.await.unwrap().unwrap(),
        ExitCode::from(status::EXIT_COMPLETE)
    );
    cancel.cancel();

    // Never reachable within the timeout: 4.
    let other = tempfile::tempdir().unwrap();
    let code = status::run(
        args(false, true, Some(Duration::from_millis(300))),
        &other.path().join("api.sock"),
    )
    .await
    .unwrap();
    assert_eq!(code, ExitCode::from(status::EXIT_UNREACHABLE));
}

/// Slack over a limit for a loaded test machine.
const SLACK: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_idle_and_oversized_clients_are_cut_off_and_connections_capped() {
    use common::hostile::{
        huge_content_length, idle_until_closed, response_head, trickle_until_closed,
    };
    use tokio::net::UnixStream;

    let f = fixture();
    let socket = f.paths.api_socket();
    let cancel = CancellationToken::new();
    let server = bind_and_serve(f.state(), &socket, None, cancel.clone())
        .await
        .unwrap();
    let bound = LIMITS.header_read + SLACK;

    // 20 clients trickling a header and 20 sending nothing: all closed by the header timeout.
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..40 {
        let stream = UnixStream::connect(&socket).await.unwrap();
        if i % 2 == 0 {
            clients.spawn(trickle_until_closed(stream, bound));
        } else {
            clients.spawn(idle_until_closed(stream, b"", bound));
        }
    }
    // A kept-alive connection that sends no second request is closed too.
    let stream = UnixStream::connect(&socket).await.unwrap();
    clients.spawn(idle_until_closed(
        stream,
        b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n",
        bound,
    ));
    while let Some(closed) = clients.join_next().await {
        assert!(
            closed.unwrap().is_some(),
            "a slow or idle client was still connected after {bound:?}"
        );
    }

    // 100 GB announced, five bytes sent: answered at once, not waited for.
    let stream = UnixStream::connect(&socket).await.unwrap();
    let head = response_head(stream, &huge_content_length("/v1/status"), SLACK).await;
    let head = head.expect("no answer to a huge Content-Length");
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");

    // The cap: with every slot held, one more connection is closed before it sends anything.
    let mut held = Vec::new();
    for _ in 0..LIMITS.max_connections {
        held.push(UnixStream::connect(&socket).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let extra = UnixStream::connect(&socket).await.unwrap();
    assert!(
        idle_until_closed(extra, b"", Duration::from_secs(3))
            .await
            .is_some(),
        "connection {} was kept over the cap of {}",
        LIMITS.max_connections + 1,
        LIMITS.max_connections
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = ApiClient::new(&socket);
    assert!(
        client.status().await.is_ok(),
        "the server recovers below the cap"
    );

    cancel.cancel();
    tokio::time::timeout(SLACK, server)
        .await
        .expect("the server stops on cancel")
        .unwrap();
}

/// A `--wait` whose agent never answers gives up once systemd (here a stand-in `systemctl`
/// that answers like `systemctl show` does) says the unit failed for good or does not exist,
/// long before its timeout; while the unit is merely starting it keeps waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_stops_when_the_unit_has_failed_or_is_missing() {
    let f = fixture();
    let socket = f.paths.api_socket();
    let bin = tempfile::tempdir().unwrap();
    for (answer, expected) in [
        (
            "LoadState=loaded\nActiveState=failed\n",
            Some(status::EXIT_UNREACHABLE),
        ),
        (
            "LoadState=not-found\nActiveState=inactive\n",
            Some(status::EXIT_UNREACHABLE),
        ),
        ("LoadState=loaded\nActiveState=activating\n", None),
    ] {
        let systemctl = bin.path().join("systemctl");
        std::fs::write(&systemctl, format!("#!/bin/sh\nprintf '{answer}'\n")).unwrap();
        std::fs::set_permissions(&systemctl, std::fs::Permissions::from_mode(0o755)).unwrap();
        let started = std::time::Instant::now();
        let code = status::run_with(
            args(false, true, Some(Duration::from_secs(6))),
            &socket,
            Some(&systemctl),
        )
        .await
        .unwrap();
        let took = started.elapsed();
        match expected {
            Some(code_expected) => {
                assert_eq!(code, ExitCode::from(code_expected), "{answer}");
                assert!(took < Duration::from_secs(5), "{answer}: {took:?}");
            }
            // Waited to the timeout: unreachable then.
            None => {
                assert_eq!(code, ExitCode::from(status::EXIT_UNREACHABLE));
                assert!(took >= Duration::from_secs(6), "{took:?}");
            }
        }
    }
}
