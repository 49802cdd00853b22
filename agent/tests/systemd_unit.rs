//! The shipped systemd unit is valid for systemd (`systemd-analyze verify`, the real tool; PID 1
//! here is not systemd, so the unit is checked, not started) and keeps the properties the agent
//! relies on; the agent's `READY=1` and `STATUS=` reach a real datagram socket named by
//! `NOTIFY_SOCKET`, as a path and as an abstract name.

mod common;

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::time::{Duration, Instant};

fn unit_text() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../installer/systemd/exoagent.service");
    std::fs::read_to_string(path).unwrap()
}

#[test]
fn the_unit_keeps_services_alive_and_uses_notify() {
    let text = unit_text();
    for line in [
        "Type=notify",
        "NotifyAccess=main",
        "KillMode=process",
        "RestartPreventExitStatus=77 78",
        "ExecStart=/usr/bin/exoagent run",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(text.lines().any(|l| l == line), "missing '{line}'");
    }
}

#[test]
fn systemd_analyze_accepts_the_unit() {
    let Ok(found) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    };
    assert!(found.status.success());
    let dir = tempfile::tempdir().unwrap();
    // The agent's unit and the warm-up unit it wants, side by side (verify finds a unit's
    // dependencies in its directory), pointing at the binary under test: verify checks that
    // ExecStart's program exists.
    let warm = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../installer/systemd/exoagent-warm.service"),
    )
    .unwrap();
    let mut units = Vec::new();
    for (name, text) in [
        ("exoagent.service", unit_text()),
        ("exoagent-warm.service", warm),
    ] {
        let unit = dir.path().join(name);
        let text = text.replace("/usr/bin/exoagent", env!("CARGO_BIN_EXE_exoagent"));
        std::fs::write(&unit, text).unwrap();
        units.push(unit);
    }
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("exoagent.service") || l.contains("exoagent-warm.service"))
        .collect();
    assert!(complaints.is_empty(), "{stderr}");
}

/// The datagrams `server` receives until one is `READY=1` and a later `STATUS=` says setup is
/// complete (an agent with nothing enabled gets there at once).
fn notifications_until_complete(server: &UnixDatagram) -> Vec<String> {
    server
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen: Vec<String> = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = server.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        let ready = seen.iter().position(|m| m == "READY=1\n");
        if ready.is_some_and(|r| {
            seen[r..]
                .iter()
                .any(|m| m.starts_with("STATUS=setup complete"))
        }) {
            return seen;
        }
    }
    panic!("no READY=1 then STATUS=setup complete within 60 s: {seen:?}");
}

#[test]
fn the_agent_notifies_a_path_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let server = UnixDatagram::bind(&path).unwrap();
    let mut sandbox = common::Sandbox::new("# nothing enabled\n")
        .with_env("NOTIFY_SOCKET", path.to_str().unwrap());
    sandbox.start_agent();
    let seen = notifications_until_complete(&server);
    assert!(
        seen.iter()
            .all(|m| m == "READY=1\n" || m.starts_with("STATUS=setup ")),
        "{seen:?}"
    );
}

#[test]
fn the_agent_notifies_an_abstract_socket() {
    let name = format!("exoagent-notify-test-{}", std::process::id());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let server = UnixDatagram::bind_addr(&addr).unwrap();
    let mut sandbox =
        common::Sandbox::new("# nothing enabled\n").with_env("NOTIFY_SOCKET", &format!("@{name}"));
    sandbox.start_agent();
    notifications_until_complete(&server);
}
