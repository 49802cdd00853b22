//! The shipped systemd unit is valid for systemd (`systemd-analyze verify`, the real tool; PID 1
//! here is not systemd, so the unit is checked, not started) and keeps the properties the agent
//! relies on.

use std::path::Path;

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
    let unit = dir.path().join("exoagent.service");
    // Point ExecStart at the binary under test: verify checks that it exists.
    let text = unit_text().replace("/usr/bin/exoagent", env!("CARGO_BIN_EXE_exoagent"));
    std::fs::write(&unit, text).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("exoagent.service"))
        .collect();
    assert!(complaints.is_empty(), "{stderr}");
}
