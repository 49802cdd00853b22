//! End to end through the agent: `exoagent sandbox` with `[services.guacamole]` writes the web
//! side's configuration and passphrase file, runs `exoagent guacamole-web` under its shim, and
//! reports the service ready only once guacd has answered a `select`. Then the token API as
//! Exosphere calls it (raw spaces in the form), the login limit, and the WebSocket tunnel:
//! subprotocol required, tunnel UUID first, pings echoed, whole instructions per message, the
//! handshake done server-side with the connection's parameters, close reasons as status codes.
//!
//! guacd cannot be installed here: `tests/guacamole/guacd_peer.py` (a test double speaking
//! guacd's side of the protocol) stands in, started by this test from the venv that
//! `tests/guacamole/setup.sh` makes. The SSH target is a closed port, so the session ends
//! with the peer's upstream error; the real sshd, VNC desktop and a browser are exercised by
//! `tests/browser/`.

mod common;

use std::time::Duration;

use common::{free_port, GuacdPeer, Sandbox};
use exoagent::services::guacamole::protocol::Decoder;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

fn post_form(base: &str, body: String) -> (u16, serde_json::Value) {
    let response = reqwest::blocking::Client::new()
        .post(format!("{base}/guacamole/api/tokens"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().unwrap_or(serde_json::Value::Null))
}

#[test]
fn the_agent_runs_the_web_side_and_the_tunnel_relays_to_guacd() {
    let peer = GuacdPeer::start();
    let closed_ssh_port = free_port();
    let mut sandbox = Sandbox::new(&format!(
        "[services.guacamole]\nenabled = true\nport = @PORT@\nbind = \"127.0.0.1\"\n\
         guacd = \"external\"\nguacd_address = \"127.0.0.1:{}\"\nssh_port = {closed_ssh_port}\n",
        peer.port
    ))
    .with_start_args(&["--no-fixture-identity"]);
    sandbox.start_agent();
    let status = sandbox.wait_complete(120);
    assert_eq!(status["services"][0]["service"], "guacamole", "{status}");
    assert_eq!(status["services"][0]["state"], "ready", "{status}");

    // The agent's files: configuration and a 0600 passphrase file for the web side.
    let state = sandbox.root().join("var/lib/exoagent/services/guacamole");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("web.json")).unwrap()).unwrap();
    assert_eq!(config["guacd"], format!("127.0.0.1:{}", peer.port));
    assert!(
        config["connections"]["desktop"].is_null(),
        "no desktop service, no desktop connection"
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(state.join("passphrase")).unwrap().mode() & 0o777,
        0o600
    );

    // Exosphere's call: a form body with the passphrase's spaces left raw.
    let base = sandbox.base();
    let passphrase = sandbox.passphrase();
    let user = config["username"].as_str().unwrap().to_owned();
    let (code, body) = post_form(&base, format!("username={user}&password={passphrase}"));
    assert_eq!(code, 200, "{body}");
    let token = body["authToken"].as_str().unwrap().to_owned();
    assert_eq!(token.len(), 64);
    assert_eq!(body["dataSource"], "default");
    assert_eq!(body["availableDataSources"][0], "default");
    assert!(
        !sandbox.agent_output().contains(&passphrase),
        "passphrase in a log"
    );

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ws_base = base.replace("http://", "ws://");
    runtime.block_on(async {
        // No subprotocol: refused before the upgrade.
        let url = format!("{ws_base}/guacamole/websocket-tunnel?token={token}&GUAC_ID=shell&GUAC_TYPE=c&GUAC_DATA_SOURCE=default");
        let plain = tokio_tungstenite::connect_async(url.clone()).await;
        assert!(plain.is_err(), "a tunnel without the guacamole subprotocol was accepted");

        let open = |url: String| async move {
            let mut request = url.into_client_request().unwrap();
            request
                .headers_mut()
                .insert("sec-websocket-protocol", "guacamole".parse().unwrap());
            tokio_tungstenite::connect_async(request).await.unwrap().0
        };

        // An unknown token: closed with 769 (CLIENT_UNAUTHORIZED) as the reason.
        let mut socket = open(url.replace(&token, "nope")).await;
        let reason = loop {
            match socket.next().await {
                Some(Ok(Message::Close(Some(frame)))) => break frame.reason.to_string(),
                Some(Ok(_)) => continue,
                other => panic!("expected a close, got {other:?}"),
            }
        };
        assert_eq!(reason, "769");

        // The real thing.
        let mut socket = open(format!("{url}&GUAC_WIDTH=800&GUAC_HEIGHT=600&GUAC_DPI=96&GUAC_IMAGE=image%2Fpng&GUAC_TIMEZONE=UTC")).await;
        let first = match socket.next().await {
            Some(Ok(Message::Text(text))) => text.to_string(),
            other => panic!("expected the tunnel UUID, got {other:?}"),
        };
        assert!(first.starts_with("0.,36.") && first.ends_with(';') && first.len() == 43, "{first}");
        let ping = "0.,4.ping,13.1700000000000;";
        socket.send(Message::Text(ping.into())).await.unwrap();
        let mut echoed = false;
        let mut messages = Vec::new();
        let reason = loop {
            match tokio::time::timeout(Duration::from_secs(30), socket.next()).await {
                Ok(Some(Ok(Message::Text(text)))) => {
                    if text.as_str() == ping {
                        echoed = true;
                    }
                    messages.push(text.to_string());
                }
                Ok(Some(Ok(Message::Close(frame)))) => {
                    break frame.map(|f| f.reason.to_string()).unwrap_or_default()
                }
                Ok(Some(Ok(_))) => {}
                other => panic!("tunnel ended without a close: {other:?}"),
            }
        };
        assert!(echoed, "the ping was not echoed: {messages:?}");
        // Every message holds whole instructions only.
        for message in &messages {
            let mut decoder = Decoder::new();
            decoder.push(message.as_bytes());
            while let Some(frame) = decoder.next_frame() {
                frame.unwrap();
            }
            decoder.finish().unwrap_or_else(|e| panic!("split instruction in {message:?}: {e}"));
        }
        // The SSH target is closed: guacd (the peer) reports an upstream error, then the
        // tunnel ends normally.
        let all = messages.join("");
        assert!(all.contains("5.error,"), "{all}");
        assert_eq!(reason, "0", "{all}");
    });

    // The handshake was done server-side with the connection's parameters.
    let events = std::fs::read_to_string(&peer.events).unwrap();
    let handshake: serde_json::Value = events
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["event"] == "handshake")
        .unwrap_or_else(|| panic!("no handshake event: {events}"));
    assert_eq!(handshake["protocol"], "ssh", "{handshake}");
    assert_eq!(handshake["args"]["hostname"], "127.0.0.1", "{handshake}");
    assert_eq!(
        handshake["args"]["port"],
        closed_ssh_port.to_string(),
        "{handshake}"
    );
    assert_eq!(handshake["args"]["username"], user, "{handshake}");
    assert_eq!(handshake["args"]["enable-sftp"], "true", "{handshake}");
    assert!(
        !events.contains(&passphrase),
        "the peer logged the passphrase"
    );

    // Failed logins are limited per source.
    for _ in 0..5 {
        assert_eq!(
            post_form(&base, format!("username={user}&password=wrong")).0,
            403
        );
    }
    assert_eq!(
        post_form(&base, format!("username={user}&password={passphrase}")).0,
        429
    );
}
