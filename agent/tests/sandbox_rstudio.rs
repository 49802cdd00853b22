//! RStudio Server under the agent (sandbox mode): the agent writes `rserver.conf` and
//! `rsession.conf` under the sandbox's `etc/rstudio`, runs the configured `rserver` through the
//! shim until `GET /auth-sign-in` answers 200 to a browser, reports it ready with its URL, and
//! restarts it after kill -9.
//!
//! `rserver` is `tests/rstudio/rserver_peer.py`, a test double (RStudio Server cannot be
//! installed here); see docs/rstudio.md for what is and is not exercised for real.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{repo_root, Sandbox};

fn pid_alive(pid: i64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn rstudio_with_a_stand_in_rserver_becomes_ready_and_is_restarted() {
    let peer = repo_root().join("tests/rstudio/rserver_peer.py");
    let mut sb = Sandbox::new(&format!(
        "[services.rstudio]\nenabled = true\nport = @PORT@\nbind = \"127.0.0.1\"\n\
         rserver = \"{}\"\n",
        peer.display()
    ))
    .with_start_args(&["--no-fixture-identity"]);
    sb.start_agent();
    let status = sb.wait_complete(120);
    let rstudio = &status["services"][0];
    assert_eq!(rstudio["service"], "rstudio", "{status}");
    assert_eq!(rstudio["state"], "ready", "{status}");
    let conf = std::fs::read_to_string(sb.root().join("etc/rstudio/rserver.conf")).unwrap();
    assert!(conf.contains(&format!("www-port={}\n", sb.port)), "{conf}");
    assert!(conf.contains("www-address=127.0.0.1\n"), "{conf}");
    assert!(sb.root().join("etc/rstudio/rsession.conf").is_file());
    let shown = sb.cli(&["status"]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains(&format!("http://127.0.0.1:{}/", sb.port)),
        "status shows the URL: {shown}"
    );

    let first = rstudio["pid"].as_i64().expect("a pid");
    assert!(pid_alive(first));
    unsafe { libc::kill(first as i32, libc::SIGKILL) };
    let status = sb.wait_for("a restart after kill -9", Duration::from_secs(120), |s| {
        let r = &s["services"][0];
        r["state"] == "ready" && r["pid"].as_i64().is_some_and(|p| p != first)
    });
    assert!(pid_alive(status["services"][0]["pid"].as_i64().unwrap()));
    sb.kill_agent(libc::SIGTERM);
}

/// Idle detection's RStudio sign: RStudio Server runs one `rsession` process per open session
/// (it exits when the session is suspended). The double starts no session, so the test starts
/// the process a session would be: a program named `rsession` (a copy of `sleep`). While it
/// runs the instance is active with `rstudio` seen; once it ends the instance goes idle. What
/// is shown is the detector's reading of `/proc`, not RStudio's own session handling.
#[test]
fn an_rsession_process_keeps_the_instance_active() {
    let peer = repo_root().join("tests/rstudio/rserver_peer.py");
    let mut sb = Sandbox::new(&format!(
        "[services.rstudio]\nenabled = true\nport = @PORT@\nbind = \"127.0.0.1\"\n\
         rserver = \"{}\"\n\
         [idle]\nafter_s = 3\ninterval_s = 1\ncpu_percent = 100\n\
         disk_kib_per_s = 1073741824\nnetwork_kib_per_s = 1073741824\n",
        peer.display()
    ))
    .with_start_args(&["--no-fixture-identity"]);
    sb.start_agent();
    sb.wait_complete(120);
    sb.wait_for("idle", Duration::from_secs(60), |s| {
        s["idle"]["state"] == "idle"
    });
    let bin = tempfile::tempdir().unwrap();
    let rsession = bin.path().join("rsession");
    std::fs::copy("/bin/sleep", &rsession).unwrap();
    let mut session = std::process::Command::new(&rsession)
        .arg("8")
        .spawn()
        .unwrap();
    let status = sb.wait_for("active", Duration::from_secs(10), |s| {
        s["idle"]["state"] == "active"
    });
    assert_eq!(status["idle"]["activity"][0], "rstudio", "{status}");
    // Past the idle time with the session running: still active.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(sb.status()["idle"]["state"], "active");
    session.wait().unwrap();
    sb.wait_for("idle after the session", Duration::from_secs(30), |s| {
        s["idle"]["state"] == "idle"
    });
}
