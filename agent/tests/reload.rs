//! Changing a running sandbox from the instance: a drop-in edited and `exoagent reload`,
//! SIGHUP, `exoagent enable` and `exoagent disable`. A bad configuration is refused (by the
//! command before the agent is asked; by the agent on SIGHUP) and changes nothing; a good one
//! adds, changes and removes services while the unchanged JupyterLab keeps its process.
//!
//! RStudio is the added service: its `rserver` is `tests/rstudio/rserver_peer.py`, the test
//! double (RStudio Server cannot be installed here; docs/rstudio.md).

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::{free_port, repo_root, Sandbox};
use serde_json::Value;

/// The service's entry; none also while the agent starts over (its socket is away for that
/// moment, and the status read then is empty).
fn service<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["services"]
        .as_array()?
        .iter()
        .find(|s| s["service"] == name)
}

fn pid_of(status: &Value, name: &str) -> i64 {
    service(status, name)
        .and_then(|s| s["pid"].as_i64())
        .unwrap_or_else(|| panic!("no pid for {name}: {status}"))
}

fn alive(pid: i64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

fn output(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn reload_enable_and_disable_change_the_running_sandbox_and_leave_the_rest_alone() {
    let mut sb = Sandbox::new(
        "[services.jupyterlab]\nenabled = true\nbind = \"127.0.0.1\"\nport = @PORT@\n",
    )
    .with_start_args(&["--no-fixture-identity"]);
    sb.start_agent();
    let status = sb.wait_complete(300);
    let jupyterlab = pid_of(&status, "jupyterlab");
    let dropins = sb.root().join("etc/exoagent/config.d");
    fs::create_dir_all(&dropins).unwrap();
    let rstudio_port = free_port();
    let rstudio = format!(
        "[services.rstudio]\nenabled = false\nport = {rstudio_port}\nbind = \"127.0.0.1\"\n\
         rserver = \"{}\"\n",
        repo_root().join("tests/rstudio/rserver_peer.py").display()
    );

    // 1. A bad drop-in: `exoagent reload` refuses it itself, naming file and key; the agent is
    //    not asked.
    fs::write(
        dropins.join("50-rstudio.toml"),
        rstudio.replace("enabled = false", "enabled = 7"),
    )
    .unwrap();
    let out = sb.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", output(&out));
    assert!(
        output(&out).contains("50-rstudio.toml")
            && output(&out).contains("services.rstudio.enabled"),
        "{}",
        output(&out)
    );
    assert!(sb.status()["reload"].is_null(), "the agent was asked");

    // 2. The same on SIGHUP: the agent refuses it and changes nothing.
    sb.signal_agent(libc::SIGHUP);
    let status = sb.wait_for("the refusal", Duration::from_secs(20), |s| {
        s["reload"]["outcome"] == "rejected"
    });
    assert_eq!(status["reload"]["trigger"], "signal");
    assert_eq!(status["reload"]["reason"]["code"], "invalid-config");
    assert!(
        status["reload"]["reason"]["detail"]
            .as_str()
            .unwrap()
            .contains("services.rstudio.enabled"),
        "{status}"
    );
    assert_eq!(status["setup"]["state"], "complete");
    assert_eq!(pid_of(&status, "jupyterlab"), jupyterlab);
    let banner = String::from_utf8_lossy(&sb.cli(&["motd"]).stdout).into_owned();
    assert!(
        banner.contains("  reload refused: invalid-config"),
        "{banner}"
    );

    // 3. Fixed but still off: valid and the same as running.
    fs::write(dropins.join("50-rstudio.toml"), &rstudio).unwrap();
    let out = sb.cli(&["reload"]);
    assert!(out.status.success(), "{}", output(&out));
    assert!(output(&out).contains("unchanged"), "{}", output(&out));

    // 4. `exoagent enable rstudio`: added and started; JupyterLab keeps its process.
    let out = sb.cli(&["enable", "rstudio"]);
    assert!(out.status.success(), "{}", output(&out));
    assert!(output(&out).contains("rstudio: added"), "{}", output(&out));
    let status = sb.wait_for("RStudio ready", Duration::from_secs(120), |s| {
        service(s, "rstudio").is_some_and(|r| r["state"] == "ready")
            && s["setup"]["state"] == "complete"
    });
    assert_eq!(
        pid_of(&status, "jupyterlab"),
        jupyterlab,
        "JupyterLab was restarted"
    );
    assert_eq!(status["reload"]["outcome"], "applied");
    assert_eq!(status["reload"]["trigger"], "command");
    assert_eq!(status["reload"]["changes"][0], "rstudio: added");
    let rserver = pid_of(&status, "rstudio");
    let dropin = fs::read_to_string(dropins.join("zz-exoagent-enable.toml")).unwrap();
    assert!(
        dropin.contains("[services.rstudio]\nenabled = true"),
        "{dropin}"
    );

    // 5. A changed setting restarts only that service.
    fs::write(
        dropins.join("50-rstudio.toml"),
        rstudio.replace(
            "bind = \"127.0.0.1\"\n",
            "bind = \"127.0.0.1\"\nstart_timeout_s = 99\n",
        ),
    )
    .unwrap();
    sb.signal_agent(libc::SIGHUP);
    let status = sb.wait_for("RStudio changed", Duration::from_secs(120), |s| {
        s["reload"]["changes"][0] == "rstudio: changed"
            && s["setup"]["state"] == "complete"
            && service(s, "rstudio").is_some_and(|r| r["state"] == "ready")
    });
    assert_eq!(
        pid_of(&status, "jupyterlab"),
        jupyterlab,
        "JupyterLab was restarted"
    );
    assert_ne!(
        pid_of(&status, "rstudio"),
        rserver,
        "the changed service was not restarted"
    );
    assert!(!alive(rserver), "the old rserver still runs");

    // 6. `exoagent disable rstudio`: stopped and gone from the status; JupyterLab untouched.
    let rserver = pid_of(&status, "rstudio");
    let out = sb.cli(&["disable", "rstudio"]);
    assert!(out.status.success(), "{}", output(&out));
    let status = sb.wait_for("RStudio gone", Duration::from_secs(60), |s| {
        service(s, "rstudio").is_none() && s["setup"]["state"] == "complete"
    });
    assert_eq!(
        pid_of(&status, "jupyterlab"),
        jupyterlab,
        "JupyterLab was restarted"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while alive(rserver) {
        assert!(
            std::time::Instant::now() < deadline,
            "rserver {rserver} still runs"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(alive(jupyterlab));
    // The console said each reload.
    let console = fs::read_to_string(sb.root().join("agent-1.stdout")).unwrap();
    assert!(
        console
            .contains(r#"{"changes":["rstudio: removed"],"reload":"applied","trigger":"command"}"#),
        "{console}"
    );
}
