//! The login banner (`exoagent motd`), the real binary: against a sandbox agent whose service
//! failed (the state, the reason, the command to see more), against no agent, a stale socket
//! and an agent that accepts but never answers (one line each, in time), always exit 0 and
//! nothing on stderr; and the Debian hook as written, run by `run-parts` as pam_motd runs it. How long it takes is measured by `bench/login-banner.sh`, not here.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{exe, Sandbox};
use exoagent::host::login_hook;
use exoagent::platform::os::Family;

/// A service that fails at once in the sandbox: no usable Python.
const FAILING: &str = r#"
[services.jupyterlab]
enabled = true
bind = "127.0.0.1"
port = @PORT@
python = "/bin/false"
"#;

fn motd(sandbox_dir: &std::path::Path) -> (Output, Duration) {
    let started = Instant::now();
    let out = Command::new(exe())
        .arg("--sandbox-dir")
        .arg(sandbox_dir)
        .arg("motd")
        // A user's own log settings must not leak log lines into the banner.
        .env("EXOAGENT_LOG", "trace")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (out, started.elapsed())
}

fn assert_clean(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        out.stderr.is_empty(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    assert!(
        !text.chars().any(|c| c.is_control() && c != '\n'),
        "{text:?}"
    );
    text
}

#[test]
fn a_running_agent_shows_the_state_the_failure_and_the_command() {
    let mut sandbox = Sandbox::new(FAILING);
    sandbox.start_agent();
    let out = sandbox.cli(&["status", "--wait", "--timeout", "60s"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "setup did not end in error: {}{}",
        String::from_utf8_lossy(&out.stdout),
        sandbox.agent_output()
    );
    let (out, _) = motd(sandbox.root());
    let text = assert_clean(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("exoagent setup: error (since "),
        "{text}"
    );
    assert_eq!(lines[1], "  failed step: jupyterlab", "{text}");
    assert_eq!(
        lines[2],
        format!(
            "  jupyterlab  failed      http://127.0.0.1:{}/",
            sandbox.port
        ),
        "{text}"
    );
    assert!(
        lines[3]
            .trim_start()
            .starts_with("service-install-failed: "),
        "{text}"
    );
    assert_eq!(lines[4], "  more: exoagent status", "{text}");
    assert_eq!(lines.len(), 5, "{text}");
    // No secret: the passphrase is nowhere in it.
    assert!(!text.contains(&sandbox.passphrase()), "{text}");

    // The Debian hook exactly as the agent writes it, run the way pam_motd runs
    // /etc/update-motd.d (run-parts --lsbsysinit), prints the same block.
    let motd_d = tempfile::tempdir().unwrap();
    let (name, contents, mode) = login_hook(Family::Debian, Path::new(exe())).unwrap();
    let hook = motd_d.path().join(Path::new(name).file_name().unwrap());
    std::fs::write(&hook, contents).unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(mode)).unwrap();
    let out = Command::new("run-parts")
        .arg("--lsbsysinit")
        .arg(motd_d.path())
        .env("EXOAGENT_SANDBOX", sandbox.root())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let through_hook = assert_clean(&out);
    assert_eq!(
        through_hook.lines().skip(1).collect::<Vec<_>>(),
        lines[1..],
        "{through_hook}"
    );
}

#[test]
fn no_agent_is_one_line_and_no_error() {
    let dir = tempfile::tempdir().unwrap();
    let (out, _) = motd(dir.path());
    assert_eq!(
        assert_clean(&out),
        "exoagent is not running (sudo systemctl status exoagent)\n"
    );

    // A socket left behind by an agent that died (/run/exoagent is preserved across restarts).
    let run = dir.path().join("run/exoagent");
    std::fs::create_dir_all(&run).unwrap();
    drop(UnixListener::bind(run.join("exoagent.sock")).unwrap());
    assert!(run.join("exoagent.sock").exists());
    let (out, _) = motd(dir.path());
    assert_eq!(
        assert_clean(&out),
        "exoagent is not running (sudo systemctl status exoagent)\n"
    );
}

#[test]
fn an_agent_that_never_answers_does_not_hold_the_login() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run/exoagent");
    std::fs::create_dir_all(&run).unwrap();
    // Accepts (the kernel does, into the backlog) and never answers.
    let _listener = UnixListener::bind(run.join("exoagent.sock")).unwrap();
    let (out, took) = motd(dir.path());
    assert_eq!(
        assert_clean(&out),
        "exoagent did not answer in time (exoagent status shows the setup state)\n"
    );
    // Not a timing benchmark: only that the deadline, not the API client's 10 s, applies.
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

/// With `[cloud] uap_hostname` and a floating address from the metadata service (here Python's
/// http.server serving `latest/meta-data/public-ipv4`), the banner and `exoagent status` show
/// the URL a browser uses through the UAP, in Exosphere's form.
#[test]
fn the_uap_url_is_shown_when_the_proxy_and_the_floating_address_are_known() {
    let served = tempfile::tempdir().unwrap();
    let meta = served.path().join("latest/meta-data");
    std::fs::create_dir_all(&meta).unwrap();
    std::fs::write(meta.join("public-ipv4"), "203.0.113.7\n").unwrap();
    let http_port = common::free_port();
    let mut server = Command::new("python3")
        .args(["-m", "http.server", "--bind", "127.0.0.1"])
        .arg(http_port.to_string())
        .current_dir(served.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Serving before the agent asks (it asks again only a minute later).
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", http_port)).is_err() {
        assert!(Instant::now() < deadline, "http.server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let config = format!(
        "{FAILING}\n[cloud]\nmetadata_url = \"http://127.0.0.1:{http_port}\"\n\
         publish_password = false\nuap_hostname = \"uap.example.org\"\n"
    );
    let mut sandbox = Sandbox::new(&config);
    sandbox.start_agent();
    let expected = format!("https://http-203-0-113-7-{}.uap.example.org/", sandbox.port);
    let status = sandbox.wait_for("the UAP URL", Duration::from_secs(60), |s| {
        s["services"][0]["uap_url"].as_str() == Some(expected.as_str())
    });
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(
        status["services"][0]["url"],
        format!("http://127.0.0.1:{}/", sandbox.port)
    );
    let (out, _) = motd(sandbox.root());
    let text = assert_clean(&out);
    assert!(
        text.contains(&format!("  jupyterlab  failed      {expected}\n")),
        "{text}"
    );
}
