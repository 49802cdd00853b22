//! End to end through the agent: `exoagent sandbox` with `[services.guacamole]` writes the web
//! side's configuration and passphrase file, runs `exoagent guacamole-web` under its shim, and
//! reports the service ready only once guacd has answered a `select`. Then the token API as
//! Exosphere calls it (raw spaces in the form), the login limit, and the WebSocket tunnel:
//! subprotocol required, tunnel UUID first, pings echoed, whole instructions per message, the
//! handshake done server-side with the connection's parameters, close reasons as status codes.
//!
//! Two guacds: the real guacd 1.3.0 (Debian 11's packages, the version Ubuntu instances get;
//! `common::RealGuacd`, as root) for what a real guacd must answer, and
//! `tests/guacamole/guacd_peer.py` (a test double speaking guacd's side of the protocol, from
//! the venv that `tests/guacamole/setup.sh` makes) for what 1.3.0 cannot show (guacd 1.5/1.6
//! behaviour) and for faults (a missing plugin). Each test says which it needs and why. Mostly
//! the SSH target is a closed port, so the session ends with guacd's upstream error; one test
//! logs in to a real sshd through the real guacd, and the VNC desktop and a browser are
//! exercised by `tests/browser/`.

mod common;

use std::time::Duration;

use common::{free_port, GuacdPeer, RealGuacd, Sandbox};
use exoagent::services::guacamole::protocol::{Decoder, Instruction};
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

/// A sandbox agent running Guacamole (the `shell` connection only) against the guacd at
/// `guacd_port` and the sshd at `ssh_port`, started and `complete`; with its final status.
fn shell_sandbox(guacd_port: u16, ssh_port: u16) -> (Sandbox, serde_json::Value) {
    let mut sandbox = Sandbox::new(&format!(
        "[services.guacamole]\nenabled = true\nport = @PORT@\nbind = \"127.0.0.1\"\n\
         guacd = \"external\"\nguacd_address = \"127.0.0.1:{guacd_port}\"\nssh_port = {ssh_port}\n"
    ))
    .with_start_args(&["--no-fixture-identity"]);
    sandbox.start_agent();
    let status = sandbox.wait_complete(120);
    (sandbox, status)
}

/// A WebSocket to the tunnel at `url`, with the `guacamole` subprotocol as the page asks.
async fn open_tunnel(
    url: String,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "guacamole".parse().unwrap());
    tokio_tungstenite::connect_async(request).await.unwrap().0
}

/// `exoagent logs guacamole` once it contains `text` (or after 10 s, for the assertion to
/// show what it holds).
fn web_side_log_once_it_holds(sandbox: &Sandbox, text: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = sandbox.cli(&["logs", "guacamole", "-n", "1000"]);
        let logs = String::from_utf8_lossy(&out.stdout).into_owned();
        if logs.contains(text) || std::time::Instant::now() > deadline {
            return logs;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_agent_runs_the_web_side_and_the_tunnel_relays_to_guacd() {
    let peer = GuacdPeer::start();
    let closed_ssh_port = free_port();
    let (sandbox, status) = shell_sandbox(peer.port, closed_ssh_port);
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



        // An unknown token: closed with 769 (CLIENT_UNAUTHORIZED) as the reason.
        let mut socket = open_tunnel(url.replace(&token, "nope")).await;
        let reason = loop {
            match socket.next().await {
                Some(Ok(Message::Close(Some(frame)))) => break frame.reason.to_string(),
                Some(Ok(_)) => continue,
                other => panic!("expected a close, got {other:?}"),
            }
        };
        assert_eq!(reason, "769");

        // A forged log line in the connection name: the refusal is logged on one line.
        let forged = format!("{ws_base}/guacamole/websocket-tunnel?token=nope&GUAC_ID=x%0AFORGED%20line&GUAC_TYPE=c&GUAC_DATA_SOURCE=default");
        let mut socket = open_tunnel(forged).await;
        while let Some(Ok(message)) = socket.next().await {
            if message.is_close() {
                break;
            }
        }

        // The real thing.
        let mut socket = open_tunnel(format!("{url}&GUAC_WIDTH=800&GUAC_HEIGHT=600&GUAC_DPI=96&GUAC_IMAGE=image%2Fpng&GUAC_TIMEZONE=UTC")).await;
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
        // A terminal follows the window: the page is told so.
        assert_eq!(messages.first().map(String::as_str), Some("8.exoagent,7.display,7.resizes;"), "{all}");
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
    // A client that reaches the port directly cannot pick a new address with X-Forwarded-For
    // (no trusted_proxies configured).
    for i in 0..3 {
        let status = reqwest::blocking::Client::new()
            .post(format!("{base}/guacamole/api/tokens"))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-forwarded-for", format!("198.51.100.{i}"))
            .body(format!("username={user}&password=wrong"))
            .send()
            .unwrap()
            .status()
            .as_u16();
        assert_eq!(status, 429, "a rotated X-Forwarded-For got a fresh limit");
    }

    // `exoagent logs guacamole` shows the forged name escaped, on the refusal's own line.
    let logs = web_side_log_once_it_holds(&sandbox, "FORGED");
    let lines: Vec<&str> = logs.lines().filter(|l| l.contains("FORGED")).collect();
    assert_eq!(lines.len(), 1, "{logs}");
    assert!(
        lines[0].contains("tunnel refused") && lines[0].contains(r"x\nFORGED line"),
        "{logs}"
    );
    // guacd's own `error` (the closed SSH port: 519, upstream not found) is in the web side's
    // log with its status, and the tunnel's end says guacd aborted it, not that the browser
    // left.
    let aborted: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("guacd ended the session with an error"))
        .collect();
    assert_eq!(aborted.len(), 1, "{logs}");
    assert!(aborted[0].contains("status=519"), "{logs}");
    assert!(
        logs.lines()
            .any(|l| l.contains("tunnel closed") && l.contains("ended=Aborted(519)")),
        "{logs}"
    );
}

/// Needs the real guacd 1.3.0 (the double's answers are only as good as its reading of
/// guacd's source): the agent's readiness waits for the real guacd's `args`, the web side's
/// handshake is accepted by it (protocol VERSION_1_3_0: no `name` instruction), the tunnel
/// carries its instructions whole, and its own abort (the SSH port closed: guacd 1.3.0 sends
/// `error` with 519, upstream not found) is logged with the status and ends the tunnel as
/// `Aborted(519)`, not as the browser's doing.
#[test]
fn the_agent_runs_the_web_side_against_the_real_guacd_1_3_0() {
    let guacd = RealGuacd::start();
    let closed_ssh_port = free_port();
    let started = std::time::Instant::now();
    let (sandbox, status) = shell_sandbox(guacd.port, closed_ssh_port);
    assert_eq!(status["services"][0]["state"], "ready", "{status}");
    eprintln!(
        "guacamole ready against guacd 1.3.0 after {:.2} s",
        started.elapsed().as_secs_f64()
    );

    let base = sandbox.base();
    let passphrase = sandbox.passphrase();
    let state = sandbox.root().join("var/lib/exoagent/services/guacamole");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("web.json")).unwrap()).unwrap();
    let user = config["username"].as_str().unwrap().to_owned();
    let (code, body) = post_form(&base, format!("username={user}&password={passphrase}"));
    assert_eq!(code, 200, "{body}");
    let token = body["authToken"].as_str().unwrap().to_owned();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ws_base = base.replace("http://", "ws://");
    let opened = std::time::Instant::now();
    let (messages, reason) = runtime.block_on(async {
        let url = format!("{ws_base}/guacamole/websocket-tunnel?token={token}&GUAC_ID=shell&GUAC_TYPE=c&GUAC_DATA_SOURCE=default&GUAC_WIDTH=800&GUAC_HEIGHT=600&GUAC_DPI=96&GUAC_IMAGE=image%2Fpng&GUAC_TIMEZONE=UTC");
        let mut socket = open_tunnel(url).await;
        let first = match socket.next().await {
            Some(Ok(Message::Text(text))) => text.to_string(),
            other => panic!("expected the tunnel UUID, got {other:?}"),
        };
        assert!(first.starts_with("0.,36.") && first.len() == 43, "{first}");
        let ping = "0.,4.ping,13.1700000000000;";
        socket.send(Message::Text(ping.into())).await.unwrap();
        let mut messages = Vec::new();
        let reason = loop {
            match tokio::time::timeout(Duration::from_secs(30), socket.next()).await {
                Ok(Some(Ok(Message::Text(text)))) => messages.push(text.to_string()),
                Ok(Some(Ok(Message::Close(frame)))) => {
                    break frame.map(|f| f.reason.to_string()).unwrap_or_default()
                }
                Ok(Some(Ok(_))) => {}
                other => {
                    let web = sandbox.cli(&["logs", "guacamole", "-n", "100"]).stdout;
                    panic!(
                        "tunnel ended without a close: {other:?}; messages {messages:?}\n\
                         guacd:\n{}\nweb side:\n{}",
                        guacd.log(),
                        String::from_utf8_lossy(&web)
                    )
                }
            }
        };
        (messages, reason)
    });
    // This client, unlike a browser, does not disconnect on `error`: guacd 1.3.0 would keep the
    // session until its 15 s "User is not responding" and then send a second error (776). The
    // web side ends the tunnel right after guacd's first `error`.
    let took = opened.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "the tunnel outlived guacd's error by {took:?}: {messages:?}"
    );
    assert!(
        messages.iter().any(|m| m == "0.,4.ping,13.1700000000000;"),
        "the ping was not echoed: {messages:?}"
    );
    for message in &messages {
        let mut decoder = Decoder::new();
        decoder.push(message.as_bytes());
        while let Some(frame) = decoder.next_frame() {
            frame.unwrap();
        }
        decoder
            .finish()
            .unwrap_or_else(|e| panic!("split instruction in {message:?}: {e}"));
    }
    let all = messages.join("");
    // guacd 1.3.0 names no `disable-display-resize` for ssh, and needs none: a terminal follows.
    assert!(all.contains("8.exoagent,7.display,7.resizes;"), "{all}");
    // guacd 1.3.0's own words: it could not reach the SSH server.
    assert!(all.contains("5.error,") && all.contains(",3.519;"), "{all}");
    assert_eq!(reason, "0", "{all}");
    let log = guacd.log();
    assert!(log.contains("version 1.3.0 started"), "{log}");
    assert!(
        !log.contains("Handshake failed"),
        "guacd 1.3.0 refused the web side's handshake:\n{log}"
    );

    let logs = web_side_log_once_it_holds(&sandbox, "tunnel closed");
    let errors: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("guacd ended the session with an error"))
        .collect();
    assert!(
        errors.len() == 1 && errors[0].contains("status=519"),
        "{logs}"
    );
    assert!(
        logs.lines()
            .any(|l| l.contains("tunnel closed") && l.contains("ended=Aborted(519)")),
        "{logs}"
    );
    assert!(!logs.contains(&passphrase), "passphrase in the log");
}

/// Needs the real guacd 1.3.0 and real servers: `exoagent guacamole-web` (confined, as the
/// agent runs it) in front of guacd 1.3.0, whose SSH plugin logs in to a real sshd (the rig of
/// `tests/guacamole/rig.py`: user, passphrase with spaces, sshd with `ssh-rsa` for this guacd's
/// libssh2) and runs what the tunnel types: keys sent as a browser sends them reach a real
/// shell, whose output lands in a file. The double's own SSH client would prove nothing here.
#[test]
fn a_shell_through_the_real_guacd_1_3_0_runs_what_is_typed() {
    use std::io::BufRead;
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};
    let guacd = RealGuacd::start();
    let venv = std::env::var("EXOAGENT_GUAC_VENV")
        .unwrap_or_else(|_| "/var/tmp/exoagent-guac-venv".to_owned());
    // The rig tears itself down when its stdin closes (when `rig` is dropped).
    let mut rig = Command::new(format!("{venv}/bin/python"))
        .arg(common::repo_root().join("tests/guacamole/rig.py"))
        .args(["--no-peer", "--ssh-rsa"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(rig.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let info: serde_json::Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("rig.py did not start ({e}): {line:?}"));
    struct Rig(std::process::Child);
    impl Drop for Rig {
        fn drop(&mut self) {
            drop(self.0.stdin.take());
            let _ = self.0.wait();
        }
    }
    let _rig = Rig(rig);
    let user = info["user"].as_str().unwrap().to_owned();
    let home = std::path::PathBuf::from(info["home"].as_str().unwrap());

    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("passphrase");
    std::fs::write(
        &password,
        format!("{}\n", info["password"].as_str().unwrap()),
    )
    .unwrap();
    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o600)).unwrap();
    let web_port = free_port();
    let config = dir.path().join("web.json");
    std::fs::write(
        &config,
        serde_json::to_vec(&serde_json::json!({
            "listen": format!("127.0.0.1:{web_port}"),
            "guacd": format!("127.0.0.1:{}", guacd.port),
            "username": user,
            "password_file": password,
            "session_timeout_s": 3600,
            "connections": {"shell": {"protocol": "ssh", "parameters": {
                "hostname": "127.0.0.1",
                "port": info["ssh_port"].to_string(),
                "username": user,
                "password": "${GUAC_PASSWORD}",
            }}},
        }))
        .unwrap(),
    )
    .unwrap();
    let log = dir.path().join("web.log");
    struct Web(std::process::Child);
    impl Drop for Web {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _web = Web(Command::new(common::exe())
        .args(["guacamole-web", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap());
    let base = format!("http://127.0.0.1:{web_port}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !reqwest::blocking::get(format!("{base}/guacamole/api/exoagent/health"))
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the web side never found guacd 1.3.0:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, body) = post_form(
        &base,
        format!(
            "username={user}&password={}",
            info["password"].as_str().unwrap()
        ),
    );
    assert_eq!(code, 200, "{body}");
    let token = body["authToken"].as_str().unwrap().to_owned();

    // The rig removes files named "exo browser …" from the home at start and end.
    let name = format!("exo browser rust {}", free_port());
    let target = home.join(&name);
    let command = format!("echo hello-from-rust | tee '{name}'");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    let seen = runtime.block_on(async {
        let url = format!("ws://127.0.0.1:{web_port}/guacamole/websocket-tunnel?token={token}&GUAC_ID=shell&GUAC_TYPE=c&GUAC_DATA_SOURCE=default&GUAC_WIDTH=1024&GUAC_HEIGHT=768&GUAC_DPI=96&GUAC_IMAGE=image%2Fpng&GUAC_TIMEZONE=UTC");
        let mut socket = open_tunnel(url).await;
        let mut decoder = Decoder::new();
        let mut seen = Vec::new();
        let mut typed = false;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if std::fs::read_to_string(&target).is_ok_and(|t| t == "hello-from-rust\n") {
                break seen;
            }
            let message = match tokio::time::timeout_at(
                deadline.min(tokio::time::Instant::now() + Duration::from_millis(200)),
                socket.next(),
            )
            .await
            {
                Ok(Some(Ok(Message::Text(text)))) => text.to_string(),
                Ok(Some(Ok(_))) => continue,
                Ok(other) => {
                    panic!("the tunnel ended: {other:?}; {seen:?}\nguacd:\n{}", guacd.log())
                }
                Err(_) if tokio::time::Instant::now() < deadline => String::new(),
                Err(_) => panic!(
                    "{target:?} never held the shell's output; opcodes seen {seen:?}\nguacd:\n{}",
                    guacd.log()
                ),
            };
            decoder.push(message.as_bytes());
            let mut replies = String::new();
            while let Some(frame) = decoder.next_frame() {
                let frame = frame.unwrap();
                if !seen.iter().any(|o| o == frame.opcode()) {
                    seen.push(frame.opcode().to_owned());
                }
                match frame.opcode() {
                    // Acknowledge frames as a browser does (guacd 1.3.0 drops a silent user).
                    "sync" => replies.push_str(frame.as_str()),
                    "error" => panic!("guacd aborted: {}\nguacd:\n{}", frame.as_str(), guacd.log()),
                    _ => {}
                }
            }
            // guacd drops keys until its SSH session is up (seen: typed at its first frame,
            // they never reached the shell); it logs when it is, and keys typed before the
            // prompt then wait in the pty like any typeahead.
            if !typed && guacd.log().contains("SSH connection successful") {
                // Type as a browser does: a press and a release per key (keysym = code point
                // for ASCII).
                for c in command.chars() {
                    let keysym = c as u32;
                    replies.push_str(&format!("3.key,{}.{keysym},1.1;", keysym.to_string().len()));
                    replies.push_str(&format!("3.key,{}.{keysym},1.0;", keysym.to_string().len()));
                }
                // Return.
                replies.push_str("3.key,5.65293,1.1;3.key,5.65293,1.0;");
                typed = true;
            }
            if !replies.is_empty() {
                socket.send(Message::Text(replies.into())).await.unwrap();
            }
        }
    });
    eprintln!(
        "typed through guacd 1.3.0 to a real shell in {:.2} s (opcodes {seen:?})",
        started.elapsed().as_secs_f64()
    );
    let meta = std::fs::metadata(&target).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        meta.uid(),
        std::fs::metadata(&home).unwrap().uid(),
        "the file was not written by the user's shell"
    );
    let _ = std::fs::remove_file(&target);
    let web_log = std::fs::read_to_string(&log).unwrap();
    assert!(
        !web_log.contains(info["password"].as_str().unwrap()),
        "the passphrase is in the web side's log"
    );
}

/// guacd without the ssh plugin reads `select` and then says nothing and keeps the connection
/// open (the double's `--without-plugin ssh` does what guacd 1.6 does). The service must not
/// wait out its 120 s start timeout: `failed` within seconds, the reason naming the protocol.
#[test]
fn a_guacd_without_the_protocols_plugin_fails_the_service_within_seconds() {
    let peer = GuacdPeer::start_with(&["--without-plugin", "ssh"]);
    let mut sandbox = Sandbox::new(&format!(
        "[services.guacamole]\nenabled = true\nport = @PORT@\nbind = \"127.0.0.1\"\n\
         guacd = \"external\"\nguacd_address = \"127.0.0.1:{}\"\nssh_port = {}\n",
        peer.port,
        free_port()
    ))
    .with_start_args(&["--no-fixture-identity"]);
    let started = std::time::Instant::now();
    sandbox.start_agent();
    let status = sandbox.wait_for("guacamole failed", Duration::from_secs(60), |s| {
        s["services"][0]["state"] == "failed"
    });
    let took = started.elapsed();
    let service = &status["services"][0];
    assert_eq!(service["service"], "guacamole", "{status}");
    assert_eq!(
        service["reason"]["code"], "guacd-protocol-missing",
        "{status}"
    );
    let detail = service["reason"]["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("protocol 'ssh'") && detail.contains("libguac-client-ssh"),
        "{status}"
    );
    // 3 s waiting for `args`, plus start-up and probe intervals; far below the start timeout.
    assert!(took < Duration::from_secs(15), "failed only after {took:?}");
    let events = std::fs::read_to_string(&peer.events).unwrap();
    assert!(
        events.contains("Support for protocol \\\"ssh\\\" is not installed"),
        "{events}"
    );
}

/// The web side in-process on loopback with `connections` (as the agent writes them) against
/// the guacd on port `guacd`, trusting `trusted_proxies`; its address, the handle that stops
/// it and the directory it reads. Its passphrase is "right words".
async fn web_side_with(
    guacd: u16,
    connections: serde_json::Value,
    trusted_proxies: &[&str],
) -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tempfile::TempDir,
) {
    use exoagent::services::guacamole::web::{serve, WebState};
    use exoagent::services::guacamole::web_config::WebConfig;
    let dir = tempfile::tempdir().unwrap();
    let config: WebConfig = serde_json::from_value(serde_json::json!({
        "listen": "127.0.0.1:0",
        "guacd": format!("127.0.0.1:{guacd}"),
        "username": "exouser",
        "password_file": dir.path().join("passphrase"),
        "session_timeout_s": 3600,
        "connections": connections,
        "trusted_proxies": trusted_proxies,
    }))
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let state = WebState::new(config, "right words".to_owned());
    tokio::spawn(serve(listener, state, async move {
        let _ = stopped.await;
    }));
    (addr, stop, dir)
}

/// The web side in-process on loopback, no connections, with `trusted_proxies`.
async fn web_side(
    trusted_proxies: &[&str],
) -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tempfile::TempDir,
) {
    web_side_with(free_port(), serde_json::json!({}), trusted_proxies).await
}

/// An in-process web side's stop handle and directory: it runs while they live.
type WebSideGuard = (tokio::sync::oneshot::Sender<()>, tempfile::TempDir);

/// The in-process web side with `connections` against the guacd at `guacd`, and a token from
/// it; its address, the token and what keeps it running.
async fn logged_in_web_side(
    guacd: u16,
    connections: serde_json::Value,
) -> (std::net::SocketAddr, String, WebSideGuard) {
    let (addr, stop, dir) = web_side_with(guacd, connections, &[]).await;
    (addr, token_from(addr).await, (stop, dir))
}

/// One `shell` connection (SSH to 127.0.0.1), as the web side's configuration names it.
fn shell_connection() -> serde_json::Value {
    serde_json::json!({"shell": {"protocol": "ssh", "parameters": {"hostname": "127.0.0.1"}}})
}

/// A token from the in-process web side at `addr`, logged in as Exosphere does.
async fn token_from(addr: std::net::SocketAddr) -> String {
    let token: serde_json::Value = reqwest::Client::new()
        .post(format!("http://{addr}/guacamole/api/tokens"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("username=exouser&password=right words")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    token["authToken"].as_str().unwrap().to_owned()
}

async fn login_status(addr: std::net::SocketAddr, forwarded: &str, password: &str) -> u16 {
    reqwest::Client::new()
        .post(format!("http://{addr}/guacamole/api/tokens"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-forwarded-for", forwarded)
        .body(format!("username=exouser&password={password}"))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_addresses_count_only_from_a_trusted_proxy() {
    // Untrusted peer: rotating the header does not reset the limit.
    let (addr, _stop, _dir) = web_side(&[]).await;
    let mut statuses = Vec::new();
    for i in 0..8 {
        statuses.push(login_status(addr, &format!("198.51.100.{i}"), "wrong").await);
    }
    assert_eq!(statuses, [403, 403, 403, 403, 403, 429, 429, 429]);

    // Trusted peer (127.0.0.1 stands for the UAP): each forwarded client has its own limit.
    let (addr, _stop, _dir) = web_side(&["127.0.0.0/8"]).await;
    for _ in 0..5 {
        assert_eq!(login_status(addr, "203.0.113.1", "wrong").await, 403);
    }
    assert_eq!(login_status(addr, "203.0.113.1", "right words").await, 429);
    assert_eq!(login_status(addr, "203.0.113.2", "right words").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_idle_and_oversized_clients_are_cut_off_and_connections_capped() {
    use common::hostile::{
        huge_content_length, idle_until_closed, response_head, trickle_until_closed,
    };
    use exoagent::services::guacamole::web::LIMITS;
    use tokio::net::TcpStream;

    let (addr, stop, _dir) = web_side(&[]).await;
    let slack = Duration::from_secs(5);
    let bound = LIMITS.header_read + slack;
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..40 {
        let stream = TcpStream::connect(addr).await.unwrap();
        if i % 2 == 0 {
            clients.spawn(trickle_until_closed(stream, bound));
        } else {
            clients.spawn(idle_until_closed(stream, b"", bound));
        }
    }
    while let Some(closed) = clients.join_next().await {
        assert!(
            closed.unwrap().is_some(),
            "a slow or idle client was still connected after {bound:?}"
        );
    }

    let stream = TcpStream::connect(addr).await.unwrap();
    let head = response_head(stream, &huge_content_length("/guacamole/api/tokens"), slack)
        .await
        .expect("no answer to a huge Content-Length");
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");

    let mut held = Vec::new();
    for _ in 0..LIMITS.max_connections {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let extra = TcpStream::connect(addr).await.unwrap();
    assert!(
        idle_until_closed(extra, b"", Duration::from_secs(3))
            .await
            .is_some(),
        "a connection over the cap of {} was kept",
        LIMITS.max_connections
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        login_status(addr, "", "wrong").await,
        403,
        "the server recovers below the cap"
    );
    let _ = stop.send(());
}

/// A guacd stand-in on a free loopback port for tests of the web side's own decisions: each
/// whole instruction the web side sends on connection `n` (counted from 0) goes to
/// `answer(n, instruction)`, whose reply, if any, is written back; a connection stays open until
/// the web side closes it. Returns the port.
async fn scripted_guacd<F>(answer: F) -> u16
where
    F: Fn(usize, &Instruction) -> Option<String> + Send + Sync + 'static,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let answer = std::sync::Arc::new(answer);
    tokio::spawn(async move {
        let mut connections = 0..;
        while let Ok((mut stream, _)) = listener.accept().await {
            let connection = connections.next().unwrap();
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut decoder = Decoder::new();
                let mut buffer = [0u8; 4096];
                while let Ok(n @ 1..) = stream.read(&mut buffer).await {
                    decoder.push(&buffer[..n]);
                    while let Some(Ok(instruction)) = decoder.next_instruction() {
                        if let Some(reply) = answer(connection, &instruction) {
                            if stream.write_all(reply.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    port
}

/// guacd's `ready` with a fixed connection id.
const READY: &str = "5.ready,37.$aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee;";

/// A guacd stand-in for sessions that never end on their own: answers `select` with `args`,
/// `connect` with `ready`, then stays silent (so whatever ends the tunnel is the browser side).
/// Returns its port.
async fn silent_guacd() -> u16 {
    scripted_guacd(|_, instruction| match instruction.opcode.as_str() {
        "select" => Some("4.args,13.VERSION_1_5_0,8.hostname;".to_owned()),
        "connect" => Some(READY.to_owned()),
        _ => None,
    })
    .await
}

/// What a scripted guacd saw of one session: the `connect` arguments by `args` name, and
/// whether the tunnel sent `disconnect`.
#[derive(Debug, Default, Clone)]
struct ScriptedSession {
    connect: std::collections::BTreeMap<String, String>,
    disconnected: bool,
}

/// A guacd stand-in that plays guacd 1.3.0's VNC plugin for the desktop's SFTP: `args` as
/// 1.3.0 names them (no `disable-display-resize`), `ready`, then — when `enable-sftp` is
/// `true` — `error,Aborted. See logs.,<abort_status>` and the connection kept open (as 1.3.0
/// does until the client disconnects), else the first drawing (`size`) and the session held.
/// `abort_message` replaces 1.3.0's generic message (1.5+ send guacd's own words). Returns its
/// port and what it saw, connection by connection.
async fn sftp_aborting_guacd(
    abort_message: &'static str,
    abort_status: u16,
) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<ScriptedSession>>>) {
    const NAMES: [&str; 8] = [
        "hostname",
        "port",
        "read-only",
        "password",
        "enable-sftp",
        "sftp-hostname",
        "sftp-port",
        "sftp-password",
    ];
    let sessions = std::sync::Arc::new(std::sync::Mutex::new(Vec::<ScriptedSession>::new()));
    let seen = sessions.clone();
    let port = scripted_guacd(move |connection, instruction| {
        let mut sessions = seen.lock().unwrap();
        if sessions.len() <= connection {
            sessions.resize(connection + 1, ScriptedSession::default());
        }
        let session = &mut sessions[connection];
        match instruction.opcode.as_str() {
            "select" => Some(
                Instruction::new("args", std::iter::once("VERSION_1_3_0").chain(NAMES)).encode(),
            ),
            "connect" => {
                session.connect = NAMES
                    .iter()
                    .map(|n| (*n).to_owned())
                    .zip(instruction.args.iter().skip(1).cloned())
                    .collect();
                let mut out = format!("{READY}3.nop;");
                if session.connect.get("enable-sftp").map(String::as_str) == Some("true") {
                    let status = abort_status.to_string();
                    out.push_str(
                        &Instruction::new("error", [abort_message, status.as_str()]).encode(),
                    );
                } else {
                    out.push_str("4.size,1.0,4.1280,3.800;");
                }
                Some(out)
            }
            "disconnect" => {
                session.disconnected = true;
                None
            }
            _ => None,
        }
    })
    .await;
    (port, sessions)
}

/// The sessions a scripted guacd opened (`connect`), leaving out the web side's readiness
/// checks (`select`, then hang up).
fn opened(sessions: &std::sync::Mutex<Vec<ScriptedSession>>) -> Vec<ScriptedSession> {
    let sessions = sessions.lock().unwrap();
    sessions
        .iter()
        .filter(|s| !s.connect.is_empty())
        .cloned()
        .collect()
}

/// One `desktop` connection (VNC with SFTP beside it), as the agent writes it.
fn desktop_connection() -> serde_json::Value {
    serde_json::json!({"desktop": {"protocol": "vnc", "parameters": {
        "hostname": "127.0.0.1", "port": "5901", "password": "${GUAC_PASSWORD}",
        "enable-sftp": "true", "sftp-hostname": "127.0.0.1", "sftp-port": "22",
        "sftp-username": "exouser", "sftp-password": "${GUAC_PASSWORD}"}}})
}

/// Every text message of a desktop tunnel until `until` is among them, the tunnel closes, or
/// 10 s pass; with the close reason if it closed.
async fn desktop_messages(
    addr: std::net::SocketAddr,
    token: &str,
    until: &str,
) -> (Vec<String>, Option<String>) {
    let mut socket = open_tunnel(format!(
        "ws://{addr}/guacamole/websocket-tunnel?token={token}&GUAC_ID=desktop&GUAC_TYPE=c&GUAC_DATA_SOURCE=default&GUAC_WIDTH=800&GUAC_HEIGHT=600"
    ))
    .await;
    let mut messages = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), socket.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                let done = text.contains(until);
                messages.push(text.to_string());
                if done {
                    return (messages, None);
                }
            }
            Ok(Some(Ok(Message::Close(frame)))) => {
                return (
                    messages,
                    Some(frame.map(|f| f.reason.to_string()).unwrap_or_default()),
                )
            }
            Ok(Some(Ok(_))) => {}
            _ => return (messages, None),
        }
    }
}

/// guacd (every version from 1.3.0 to 1.6.0) aborts a whole VNC session when the SFTP beside it
/// fails, before drawing anything. The web side then reopens the session once without SFTP
/// and tells the page that file transfer is off; the page never sees the abort. Scripted
/// guacd (the sequence of 1.3.0's VNC plugin), because the decision is the web side's: the
/// same happens against the real guacd 1.3.0 in `tests/browser/guacamole.test.mjs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_desktop_whose_sftp_fails_is_reopened_without_file_transfer() {
    let (guacd, sessions) = sftp_aborting_guacd("Aborted. See logs.", 515).await;
    let (addr, token, _dir) = logged_in_web_side(guacd, desktop_connection()).await;
    let (messages, closed) = desktop_messages(addr, &token, "4.size,").await;
    let all = messages.join("");
    assert_eq!(closed, None, "the tunnel closed: {all}");
    assert!(messages[0].starts_with("0.,36."), "{all}");
    // guacd 1.3.0's VNC plugin cannot resize the remote screen: the page is told.
    assert_eq!(messages[1], "8.exoagent,7.display,5.fixed;", "{all}");
    assert!(
        all.contains("8.exoagent,5.files,11.unavailable,3.515,18.Aborted. See logs.;"),
        "{all}"
    );
    assert!(!all.contains("5.error,"), "the page saw the abort: {all}");
    assert!(all.ends_with("4.size,1.0,4.1280,3.800;"), "{all}");
    // The aborted connection's `disconnect` is read by its own handler, which may come after
    // the second connection has drawn: waited for, within a bound.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !opened(&sessions).first().is_some_and(|s| s.disconnected)
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sessions = opened(&sessions);
    assert_eq!(sessions.len(), 2, "{sessions:?}");
    assert_eq!(sessions[0].connect["enable-sftp"], "true");
    assert_eq!(sessions[0].connect["sftp-password"], "right words");
    assert!(
        sessions[0].disconnected,
        "the aborted session was not disconnected: {sessions:?}"
    );
    assert_eq!(sessions[1].connect["enable-sftp"], "false");
    assert_eq!(
        sessions[1].connect["sftp-password"], "",
        "SFTP settings dropped"
    );
    assert_eq!(sessions[1].connect["password"], "right words");
}

/// The VNC server itself unreachable (guacd's own "Unable to connect to VNC server.") is not
/// SFTP's fault: no second attempt, the page gets guacd's error. And a session that fails the
/// second time too ends with that second error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_abort_before_drawing_that_may_be_sftp_is_retried_and_only_once() {
    let (guacd, sessions) = sftp_aborting_guacd("Unable to connect to VNC server.", 519).await;
    let (addr, token, _dir) = logged_in_web_side(guacd, desktop_connection()).await;
    let (messages, closed) = desktop_messages(addr, &token, "4.size,").await;
    let all = messages.join("");
    assert_eq!(closed.as_deref(), Some("0"), "{all}");
    assert!(
        all.contains("5.error,32.Unable to connect to VNC server.,3.519;"),
        "{all}"
    );
    assert!(!all.contains("11.unavailable"), "{all}");
    assert_eq!(opened(&sessions).len(), 1);
}

/// A text frame that is not UTF-8 ends the tunnel with a WebSocket close carrying
/// CLIENT_BAD_REQUEST (768), like other bad input, not with a dropped TCP connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_frame_that_is_not_utf8_is_refused_with_a_close_code() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;

    let guacd = silent_guacd().await;
    let (addr, token, _web) = logged_in_web_side(guacd, shell_connection()).await;
    let mut socket = open_tunnel(format!(
        "ws://{addr}/guacamole/websocket-tunnel?token={token}&GUAC_ID=shell&GUAC_TYPE=c&GUAC_DATA_SOURCE=default"
    ))
    .await;
    match tokio::time::timeout(Duration::from_secs(10), socket.next()).await {
        Ok(Some(Ok(Message::Text(text)))) => assert!(text.starts_with("0.,36."), "{text}"),
        other => panic!("expected the tunnel UUID, got {other:?}"),
    }
    let not_utf8 = Frame::message(
        vec![b'4', b'.', 0xff, 0xfe, b';'],
        OpCode::Data(Data::Text),
        true,
    );
    socket.send(Message::Frame(not_utf8)).await.unwrap();
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(10), socket.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => break frame,
            Ok(Some(Ok(_))) => continue,
            other => panic!("the tunnel ended without a close frame: {other:?}"),
        }
    };
    let close = close.expect("a close frame with a status");
    assert_eq!(close.reason.as_str(), "768");
}

/// Unmounts a tmpfs on drop (declared before the sandbox, so the sandbox's own cleanup runs
/// first).
struct Unmount(Option<std::path::PathBuf>);

impl Drop for Unmount {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::process::Command::new("umount").arg(path).status();
        }
    }
}

/// A running, healthy web side is adopted by a restarted agent even when the disk is full
/// (it was once marked `failed` and left running unsupervised): configuration that did not
/// change is not rewritten, and a service whose configure step fails while its shim runs the
/// same spec is adopted anyway. The test fails only when both are missing.
#[test]
fn a_restarted_agent_adopts_the_running_web_side_on_a_full_disk() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let mut unmount = Unmount(None);
    let peer = GuacdPeer::start();
    let mut sandbox = Sandbox::new(&format!(
        "[services.guacamole]\nenabled = true\nport = @PORT@\nbind = \"127.0.0.1\"\n\
         guacd = \"external\"\nguacd_address = \"127.0.0.1:{}\"\nssh_port = {}\n",
        peer.port,
        free_port()
    ))
    .with_start_args(&["--no-fixture-identity"]);
    // The services' state (where configure writes) on a small filesystem of its own.
    let services = sandbox.root().join("var/lib/exoagent/services");
    std::fs::create_dir_all(&services).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=512k,mode=0755", "tmpfs"])
        .arg(&services)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount tmpfs failed");
    unmount.0 = Some(services.clone());

    sandbox.start_agent();
    let status = sandbox.wait_complete(120);
    assert_eq!(status["services"][0]["state"], "ready", "{status}");
    let pid = status["services"][0]["pid"].clone();
    assert!(pid.is_number(), "{status}");

    // The agent stops (services keep running), the disk fills up, the agent comes back.
    sandbox.kill_agent(libc::SIGINT);
    let filler = services.join("filler");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 4096];
        loop {
            match file.write_all(&block) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
    }
    sandbox.start_agent();
    let status = sandbox.wait_complete(60);
    let guacamole = &status["services"][0];
    assert_eq!(guacamole["state"], "ready", "{status}");
    assert_eq!(
        guacamole["pid"], pid,
        "the running web side was adopted: {status}"
    );
    std::fs::remove_file(&filler).unwrap();
}

/// The web side as the agent runs it (`exoagent guacamole-web`, guacd from `guacd_command`):
/// guacd (the test double: what is checked is the keeper's job, not guacd's) runs under a
/// keeper process outside the web side's confinement, is restarted when it dies, and dies with
/// the web side; the web side itself has no new privileges and logs what its confinement holds.
#[test]
fn the_web_side_runs_guacd_outside_its_confinement_and_takes_it_down_with_it() {
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let venv = std::env::var("EXOAGENT_GUAC_VENV")
        .unwrap_or_else(|_| "/var/tmp/exoagent-guac-venv".to_owned());
    let guacd_port = free_port();
    let web_port = free_port();
    let password = dir.path().join("passphrase");
    std::fs::write(&password, "right words\n").unwrap();
    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = dir.path().join("web.json");
    std::fs::write(
        &config,
        serde_json::to_vec(&serde_json::json!({
            "listen": format!("127.0.0.1:{web_port}"),
            "guacd": format!("127.0.0.1:{guacd_port}"),
            "guacd_command": [
                format!("{venv}/bin/python"),
                common::repo_root().join("tests/guacamole/guacd_peer.py").display().to_string(),
                "--listen", format!("127.0.0.1:{guacd_port}"),
            ],
            "username": "exouser",
            "password_file": password,
            "session_timeout_s": 3600,
            "connections": {},
        }))
        .unwrap(),
    )
    .unwrap();
    let log = dir.path().join("web.log");
    let mut web = Command::new(common::exe())
        .args(["guacamole-web", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let web_pid = web.id();
    let children = |pid: u32| -> Vec<u32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .ok()
                    .and_then(|s| {
                        s.rsplit_once(") ")
                            .and_then(|(_, rest)| rest.split(' ').nth(1)?.parse::<u32>().ok())
                    })
                    == Some(pid)
            })
            .collect()
    };
    let no_new_privs = |pid: u32| -> String {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("NoNewPrivs:").map(|v| v.trim().to_owned()))
            .unwrap()
    };
    let healthy = || {
        reqwest::blocking::Client::new()
            .get(format!(
                "http://127.0.0.1:{web_port}/guacamole/api/exoagent/health"
            ))
            .send()
            .is_ok_and(|r| r.status().is_success())
    };
    let wait = |what: &str, check: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !check() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}; web side log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait("the web side to find guacd", &healthy);
    let keeper = children(web_pid);
    assert_eq!(keeper.len(), 1, "one keeper: {keeper:?}");
    let keeper = keeper[0];
    let guacd = children(keeper);
    assert_eq!(guacd.len(), 1, "guacd under the keeper: {guacd:?}");
    // The web side's listening socket stays the web side's: the keeper (forked after the bind)
    // holds no copy that would keep the port taken once the web side ends.
    let listening_inode = std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local = format!("0100007F:{web_port:04X}");
            (fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"0A"))
                .then(|| fields[9].to_owned())
        })
        .expect("the web side's listener in /proc/net/tcp");
    let socket = format!("socket:[{listening_inode}]");
    let holders = |pid: u32| -> bool {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .any(|target| target.to_string_lossy() == socket)
    };
    assert!(holders(web_pid), "the web side holds {socket}");
    assert!(!holders(keeper), "the keeper holds the web side's {socket}");
    assert_eq!(
        no_new_privs(web_pid),
        "1",
        "the web side takes no new privileges"
    );
    assert_eq!(
        no_new_privs(guacd[0]),
        "0",
        "guacd runs outside the web side's confinement"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("confined (full, Landlock ABI")
            // Renaming beneath its user's home (completed uploads), nothing else on files.
            && text.contains("no new privileges, no files, renaming beneath ")
            && text.contains(&format!(
                "no programs, TCP connect only to port {guacd_port}, no bind"
            )),
        "{text}"
    );

    // guacd dies: the keeper starts another.
    unsafe { libc::kill(guacd[0] as i32, libc::SIGKILL) };
    wait("guacd to be restarted", &|| {
        let now = children(keeper);
        now.len() == 1 && now[0] != guacd[0] && healthy()
    });
    let guacd = children(keeper)[0];

    // The web side dies: the keeper and guacd go with it.
    web.kill().unwrap();
    web.wait().unwrap();
    let gone = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
            .unwrap_or(true)
    };
    wait("the keeper and guacd to end with the web side", &|| {
        gone(keeper) && gone(guacd)
    });
}

/// A guacd stand-in for file streams, as guacd's SFTP code paces them: a `get` is answered by
/// `body` on stream 7 naming what was asked for, as guacd's get handler does, and then one
/// blob per `ack` from the client (`content` in 4096-byte blobs, then `end`, whatever the file
/// holds: guacd 1.3.0 ends a stream whose read failed so); a `file` from the client is
/// accepted with an ack, each `blob` on it is
/// acked, and `end` acked. What was uploaded is kept, connection by connection.
async fn file_streams_guacd(content: Vec<u8>) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    use base64::Engine as _;
    let uploaded = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = uploaded.clone();
    let sent = std::sync::Arc::new(std::sync::Mutex::new(0usize));
    let port = scripted_guacd(move |_, instruction| {
        let args: Vec<&str> = instruction.args.iter().map(String::as_str).collect();
        match (instruction.opcode.as_str(), args.as_slice()) {
            ("select", _) => Some("4.args,13.VERSION_1_5_0,8.hostname;".to_owned()),
            ("connect", _) => Some(format!("{READY}4.size,1.0,3.800,3.600;")),
            ("get", [_, name]) => {
                *sent.lock().unwrap() = 0;
                Some(
                    Instruction::new("body", ["0", "7", "application/octet-stream", *name])
                        .encode(),
                )
            }
            ("ack", ["7", _, "0"]) => {
                let mut at = sent.lock().unwrap();
                if *at >= content.len() {
                    return Some("3.end,1.7;".to_owned());
                }
                let end = (*at + 4096).min(content.len());
                let blob = base64::engine::general_purpose::STANDARD.encode(&content[*at..end]);
                *at = end;
                Some(Instruction::new("blob", ["7", blob.as_str()]).encode())
            }
            ("file", [index, ..]) => {
                Some(Instruction::new("ack", [*index, "SFTP: File opened", "0"]).encode())
            }
            ("blob", [index, data]) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(data)
                    .unwrap();
                kept.lock().unwrap().extend_from_slice(&bytes);
                Some(Instruction::new("ack", [*index, "SFTP: OK", "0"]).encode())
            }
            ("end", [index]) => Some(Instruction::new("ack", [*index, "SFTP: OK", "0"]).encode()),
            _ => None,
        }
    })
    .await;
    (port, uploaded)
}

/// The `shell` connection's tunnel for `token`, once the web side has said it serves file
/// streams over HTTP and guacd has sized the display; with the tunnel's UUID (the first
/// message, Apache's `0.,36.<uuid>;`), which the stream endpoints' paths carry.
async fn open_shell_tunnel_with_streams(
    addr: std::net::SocketAddr,
    token: &str,
) -> (
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    String,
) {
    let mut socket = open_tunnel(format!(
        "ws://{addr}/guacamole/websocket-tunnel?token={token}&GUAC_ID=shell&GUAC_TYPE=c&GUAC_DATA_SOURCE=default"
    ))
    .await;
    let first = message_with(&mut socket, "0.,36.").await;
    let uuid = first["0.,36.".len()..first.len() - 1].to_owned();
    message_with(&mut socket, "8.exoagent,5.files,7.streams;").await;
    message_with(&mut socket, "4.size,").await;
    (socket, uuid)
}

/// The next message of `socket` that holds `text`, within 10 s.
async fn message_with(
    socket: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    text: &str,
) -> String {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), socket.next()).await {
            Ok(Some(Ok(Message::Text(message)))) if message.contains(text) => {
                return message.to_string()
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("no message with {text:?}: {other:?}"),
        }
    }
}

/// guacd 1.3.0 sends the same `end` after a failed SFTP read as at the end of the file: a
/// download over HTTP whose `end` comes before the file's size (the web side `stat`s the file
/// the `get` named, the connection's SFTP being this machine as this user) is cut, so the
/// browser sees a failed download rather than a short file, and the page is told before guacd's
/// `end`; one that reaches it ends cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_guacd_ends_short_of_the_file_s_size_fails_over_http() {
    let content: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let files = tempfile::tempdir().unwrap();
    let whole = files.path().join("whole.bin");
    let bigger = files.path().join("bigger.bin");
    std::fs::write(&whole, &content).unwrap();
    std::fs::write(&bigger, vec![0u8; content.len() + 1]).unwrap();
    let (guacd, _uploaded) = file_streams_guacd(content.clone()).await;
    let me = exoagent::services::guacamole::rename::OwnUser::current().unwrap();
    let connection = serde_json::json!({"shell": {"protocol": "ssh", "parameters": {
        "hostname": "127.0.0.1", "username": me.name, "enable-sftp": "true"}}});
    let (addr, token, _web) = logged_in_web_side(guacd, connection).await;
    let (mut socket, uuid) = open_shell_tunnel_with_streams(addr, &token).await;
    let url =
        format!("http://{addr}/guacamole/api/session/tunnels/{uuid}/streams/7/f.bin?token={token}");
    let http = reqwest::Client::new();
    for (path, complete) in [(&bigger, false), (&whole, true)] {
        let name = path.to_str().unwrap();
        let get = Instruction::new("get", ["0", name]).encode();
        socket.send(Message::Text(get.into())).await.unwrap();
        message_with(&mut socket, "4.body,1.0,1.7,").await;
        let response = http.get(&url).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let body = response.bytes().await;
        if complete {
            assert!(
                body.unwrap()[..] == content[..],
                "{name}: the downloaded bytes differ"
            );
        } else {
            assert!(
                body.is_err(),
                "{name}: a download ended short looked complete"
            );
        }
        // The page gets guacd's `end` either way; when the body was cut it is told so first
        // (it cannot see the browser's download fail).
        let ended = message_with(&mut socket, "3.end,1.7;").await;
        let notice = ended.find("8.exoagent,8.download,1.7,6.failed,");
        if complete {
            assert_eq!(
                notice, None,
                "{name}: a complete download was said to fail: {ended}"
            );
        } else {
            let notice = notice.unwrap_or_else(|| panic!("{name}: the page was not told: {ended}"));
            assert!(notice < ended.find("3.end,1.7;").unwrap(), "{ended}");
            assert!(
                ended.contains(&format!("of {} bytes", content.len() + 1)),
                "{ended}"
            );
        }
    }
}

/// Files cross as HTTP bodies through Apache's stream endpoints: a download's blobs are taken
/// from the tunnel (the page never sees them) and acked by the web side as it queues them; an
/// upload's body reaches guacd as blobs, each after guacd acked the one before. Only the token
/// that opened a tunnel may use its streams (403 for another, also for none), a stream not
/// open is 404. Scripted guacd (the pacing of guacd's `sftp.c`): the page and real guacds are
/// covered by `tests/browser/guacamole.test.mjs`, whose file tests go through these endpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_cross_as_http_bodies_only_for_the_token_that_opened_the_tunnel() {
    let content: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let (guacd, uploaded) = file_streams_guacd(content.clone()).await;
    let (addr, token, _web) = logged_in_web_side(guacd, shell_connection()).await;
    let other = token_from(addr).await;
    let (mut socket, uuid) = open_shell_tunnel_with_streams(addr, &token).await;

    let http = reqwest::Client::new();
    let url = |index: u32, token: &str| {
        format!("http://{addr}/guacamole/api/session/tunnels/{uuid}/streams/{index}/x.bin?token={token}")
    };
    // guacd announces stream 7 for a `get`.
    socket
        .send(Message::Text("3.get,1.0,6./x.bin;".into()))
        .await
        .unwrap();
    message_with(&mut socket, "4.body,1.0,1.7,").await;
    assert_eq!(http.get(url(7, &other)).send().await.unwrap().status(), 403);
    let no_token = format!("http://{addr}/guacamole/api/session/tunnels/{uuid}/streams/7/x.bin");
    assert_eq!(http.get(no_token).send().await.unwrap().status(), 403);
    let elsewhere = url(7, &token).replace(&uuid, "00000000-0000-4000-8000-000000000000");
    assert_eq!(http.get(elsewhere).send().await.unwrap().status(), 403);
    assert_eq!(http.get(url(8, &token)).send().await.unwrap().status(), 404);
    let response = http.get(url(7, &token)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-disposition"],
        "attachment; filename*=UTF-8''x.bin"
    );
    let body = response.bytes().await.unwrap();
    assert_eq!(body.len(), content.len());
    assert!(body[..] == content[..], "the downloaded bytes differ");
    // The page saw the stream end, never its blobs.
    let mut seen = String::new();
    while !seen.contains("3.end,1.7;") {
        match tokio::time::timeout(Duration::from_secs(10), socket.next()).await {
            Ok(Some(Ok(Message::Text(message)))) => seen.push_str(&message),
            other => panic!("no end of stream 7 after {seen:?}: {other:?}"),
        }
    }
    assert!(!seen.contains("4.blob,1.7,"), "{seen}");

    // An upload: the page opens stream 3 and guacd accepts it; then the body goes over HTTP.
    socket
        .send(Message::Text(
            "4.file,1.3,24.application/octet-stream,5.y.bin;".into(),
        ))
        .await
        .unwrap();
    message_with(&mut socket, "3.ack,1.3,").await;
    let upload: Vec<u8> = (0..15_000u32).map(|i| (i % 253) as u8).collect();
    assert_eq!(
        http.post(url(3, &other))
            .body(upload.clone())
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
    let response = http
        .post(url(3, &token))
        .body(upload.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    assert!(
        uploaded.lock().unwrap()[..] == upload[..],
        "guacd got other bytes"
    );
    // Taken over once only: a second POST on the same stream finds it released, not open.
    socket
        .send(Message::Text("3.end,1.3;".into()))
        .await
        .unwrap();
    assert_eq!(
        http.post(url(3, &token))
            .body("x")
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
}
