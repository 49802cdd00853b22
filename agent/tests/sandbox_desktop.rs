//! The desktop and Guacamole services together under the agent (sandbox mode): the agent
//! writes the VNC password file from the passphrase, runs `exoagent desktop-session` (real
//! TigerVNC and a real Xfce session) until the RFB probe sees VNC authentication offered, and
//! gives Guacamole a `desktop` connection to it. A tunnel to `desktop` then carries frames drawn
//! from that real desktop.
//!
//! guacd is `tests/guacamole/guacd_peer.py` (the test double), which draws from the VNC server
//! with its own RFB client: the agent's wiring is the point here. The real guacd 1.3.0 drawing
//! the real desktop is `tests/browser/` with `EXOAGENT_GUACD=bullseye` (CI runs both).
//! Needs `bash tests/guacamole/setup.sh`.
//!
//! Idle detection rides along: with nothing open the instance goes idle; the open tunnel (the
//! web side's connection to guacd, the double's to the real VNC server) keeps it active past
//! the idle time; once the tunnel is closed it goes idle again. (The double stands in for guacd
//! only as the other end of the connection counted; the VNC side is the real Xvnc.)

mod common;

use std::path::Path;
use std::time::Duration;

use common::{free_display, free_port, GuacdPeer, Sandbox};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

#[test]
fn the_agent_runs_the_desktop_and_guacamole_reaches_it() {
    let peer = GuacdPeer::start();
    let display = free_display();
    let mut sandbox = Sandbox::new(&format!(
        "[services.desktop]\nenabled = true\nport = {}\ngeometry = \"1024x768\"\n\
         [services.guacamole]\nenabled = true\nport = @PORT@\nbind = \"127.0.0.1\"\n\
         guacd = \"external\"\nguacd_address = \"127.0.0.1:{}\"\nssh_port = {}\n\
         [idle]\nafter_s = 3\ninterval_s = 1\ncpu_percent = 100\n\
         disk_kib_per_s = 1073741824\nnetwork_kib_per_s = 1073741824\n",
        5900 + display,
        peer.port,
        free_port()
    ))
    .with_start_args(&["--no-fixture-identity"]);
    sandbox.start_agent();
    let status = sandbox.wait_complete(120);
    let services: Vec<_> = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["service"].as_str().unwrap().to_owned(),
                s["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        services,
        [
            ("desktop".to_owned(), "ready".to_owned()),
            ("guacamole".to_owned(), "ready".to_owned())
        ],
        "{status}"
    );
    let vncpasswd = sandbox
        .root()
        .join("var/lib/exoagent/services/desktop/vncpasswd");
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&vncpasswd).unwrap();
    assert_eq!(
        (meta.mode() & 0o777, meta.len()),
        (0o600, 8),
        "VNC password file"
    );

    let passphrase = sandbox.passphrase();
    let base = sandbox.base();
    let web: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            sandbox
                .root()
                .join("var/lib/exoagent/services/guacamole/web.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        web["connections"]["desktop"]["parameters"]["port"],
        (5900 + display).to_string()
    );
    let user = web["username"].as_str().unwrap().to_owned();
    let response = reqwest::blocking::Client::new()
        .post(format!("{base}/guacamole/api/tokens"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("username={user}&password={passphrase}"))
        .send()
        .unwrap();
    let token = response.json::<serde_json::Value>().unwrap()["authToken"]
        .as_str()
        .unwrap()
        .to_owned();

    // Nothing open: idle (the host-load thresholds are out of reach: this shared machine's own
    // load must not decide; the detector's unit tests cover them).
    let idle = sandbox.wait_for("idle before the tunnel", Duration::from_secs(60), |s| {
        s["idle"]["state"] == "idle"
    });
    // The page's notice, through the confined web side (it may read only the notice's
    // directory): the agent's idleness, and nothing without a live token.
    let notice = |token: &str| {
        let reply = reqwest::blocking::Client::new()
            .get(format!(
                "{base}/guacamole/api/exoagent/notice?token={token}"
            ))
            .send()
            .unwrap();
        let status = reply.status().as_u16();
        (
            status,
            reply.json::<serde_json::Value>().unwrap_or_default(),
        )
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (code, body) = loop {
        let (code, body) = notice(&token);
        if body["state"] == "idle" || std::time::Instant::now() > deadline {
            break (code, body);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body,
        serde_json::json!({"state": "idle", "idle_since_ms": idle["idle"]["last_activity_ms"]})
    );
    assert_eq!(notice("nope").0, 403);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let drawn = runtime.block_on(async {
        let url = format!(
            "{}/guacamole/websocket-tunnel?token={token}&GUAC_ID=desktop&GUAC_TYPE=c&\
             GUAC_DATA_SOURCE=default&GUAC_WIDTH=1024&GUAC_HEIGHT=768&GUAC_IMAGE=image%2Fpng",
            base.replace("http://", "ws://")
        );
        let mut request = url.into_client_request().unwrap();
        request
            .headers_mut()
            .insert("sec-websocket-protocol", "guacamole".parse().unwrap());
        let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        let mut text = String::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        // Frames drawn from the real desktop: PNG images streamed as blobs, then a sync.
        while !(text.contains("3.img,") && text.contains("4.blob,") && text.contains("4.sync,")) {
            match tokio::time::timeout_at(deadline, socket.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    // Acknowledge frames as a browser does, so the desktop keeps drawing.
                    if t.contains("4.sync,") {
                        let _ = socket.send(Message::Text("4.sync,1.0;".into())).await;
                    }
                    text.push_str(t.as_str());
                }
                Ok(Some(Ok(_))) => {}
                other => panic!(
                    "no frames from the desktop: {other:?}; got {}",
                    &text[..text.len().min(2000)]
                ),
            }
        }
        // The tunnel open well past the idle time: active, the desktop seen.
        let open_until = tokio::time::Instant::now() + Duration::from_secs(7);
        while tokio::time::Instant::now() < open_until {
            let _ = tokio::time::timeout(Duration::from_millis(500), async {
                while let Some(Ok(message)) = socket.next().await {
                    if let Message::Text(t) = message {
                        if t.contains("4.sync,") {
                            let _ = socket.send(Message::Text("4.sync,1.0;".into())).await;
                        }
                    }
                }
            })
            .await;
            let status = sandbox.status();
            if status["idle"]["state"] == "active" {
                assert!(
                    status["idle"]["activity"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|k| k == "desktop")),
                    "{status}"
                );
            } else {
                // The first sample after the tunnel opened may not have come yet.
                assert!(
                    open_until - tokio::time::Instant::now() > Duration::from_secs(5),
                    "idle with the tunnel open: {status}"
                );
            }
        }
        let _ = socket.close(None).await;
        text.len()
    });
    assert!(drawn > 1000, "only {drawn} bytes of drawing");
    sandbox.wait_for("idle after the tunnel", Duration::from_secs(30), |s| {
        s["idle"]["state"] == "idle"
    });
    assert_eq!(notice(&token).1["state"], "idle");
    assert!(
        !sandbox.agent_output().contains(&passphrase),
        "passphrase in a log"
    );
    // Stopping the agent leaves services running (by design); `down` stops the pair.
    sandbox.kill_agent(libc::SIGTERM);
    let down = sandbox.cli(&["down"]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    let lock = format!("/tmp/.X{display}-lock");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while Path::new(&lock).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{lock} still there after down"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
