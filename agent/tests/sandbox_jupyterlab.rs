//! End to end, with real components: the `exoagent` binary in sandbox mode installs a real
//! JupyterLab from PyPI (hash-pinned lock), supervises it through the shim, reports it ready on
//! the console and the local API; the passphrase logs in; kill -9 restarts it; an agent restart
//! (even SIGKILL) leaves the server and its kernels running and re-adopts them; invalid
//! configuration changes nothing.
//!
//! Needs python3 (>= 3.9, with venv) and network access to PyPI (or a warm uv/pip cache);
//! `.ci/run` provides both. `EXOAGENT_TEST_JUPYTERLAB_PYTHON=/path/to/python3.9` makes the agent
//! use that interpreter (`services.jupyterlab.python`), to run the same test on Debian 11's
//! Python (the lock's JupyterLab 4.5 pins) on a machine whose python3 is newer.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::Sandbox;
use serde_json::Value;

fn service(status: &Value) -> &Value {
    &status["services"][0]
}

fn pid_alive(pid: i64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// Exosphere's console parser (`src/Helpers/ExoSetupStatus.elm`): per line, the text from the
/// first `{` to the last `}`; needs a top-level string `status` (or `exoSetup`); last one wins.
fn exosphere_status(log: &str) -> Option<(String, Value)> {
    let mut last = None;
    for line in log.lines() {
        let (Some(start), Some(end)) = (line.find('{'), line.rfind('}')) else {
            continue;
        };
        if end < start {
            continue;
        }
        let Ok(value) = serde_json::from_str::<Value>(&line[start..=end]) else {
            continue;
        };
        let status = value
            .get("status")
            .or_else(|| value.get("exoSetup"))
            .and_then(Value::as_str);
        if let Some(status) = status {
            let known = ["waiting", "starting", "running", "complete", "error"];
            let status = if known.contains(&status) {
                status
            } else {
                "unknown"
            };
            last = Some((status.to_owned(), value.clone()));
        }
    }
    last
}

struct Session {
    client: reqwest::blocking::Client,
    xsrf: String,
}

fn cookie_value(resp: &reqwest::blocking::Response, name: &str) -> Option<String> {
    resp.headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| {
            let first = c.split(';').next()?;
            let (k, v) = first.split_once('=')?;
            (k.trim() == name).then(|| v.trim().trim_matches('"').to_owned())
        })
}

/// Log in through Jupyter's real login form.
fn login(base: &str, password: &str) -> (reqwest::StatusCode, Session) {
    let client = reqwest::blocking::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let page = client.get(format!("{base}/login")).send().unwrap();
    assert_eq!(page.status(), 200, "GET /login");
    let xsrf = cookie_value(&page, "_xsrf").expect("the login page sets an _xsrf cookie");
    let resp = client
        .post(format!("{base}/login"))
        .form(&[("_xsrf", xsrf.as_str()), ("password", password)])
        .send()
        .unwrap();
    (resp.status(), Session { client, xsrf })
}

fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut hits = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        for file in ["cmdline", "environ"] {
            if let Ok(bytes) = fs::read(entry.path().join(file)) {
                if String::from_utf8_lossy(&bytes).contains(needle) {
                    hits.push(format!("/proc/{name}/{file}"));
                }
            }
        }
    }
    hits
}

fn files_containing(root: &Path, needle: &str, skip: &Path) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                // The venv is third-party code and large; nothing of ours is written there.
                if !path.ends_with("venv") {
                    stack.push(path);
                }
            } else if meta.is_file() && path != skip && meta.len() < 64 * 1024 * 1024 {
                if let Ok(bytes) = fs::read(&path) {
                    if String::from_utf8_lossy(&bytes).contains(needle) {
                        hits.push(path);
                    }
                }
            }
        }
    }
    hits
}

fn world_readable_secrets(root: &Path) -> Vec<PathBuf> {
    let mut bad = Vec::new();
    for path in [
        root.join("var/lib/exoagent/secrets/passphrase"),
        root.join("var/lib/exoagent/services/jupyterlab/jupyter_server_config.json"),
    ] {
        let mode = fs::metadata(&path).unwrap().mode() & 0o777;
        if mode & 0o077 != 0 {
            bad.push(path);
        }
    }
    bad
}

const CONFIG: &str = r#"
[services.jupyterlab]
enabled = true
bind = "127.0.0.1"
port = @PORT@
start_timeout_s = 300

[supervise]
backoff_initial_ms = 200
backoff_max_ms = 2000

[console]
status_interval_s = 1
load_interval_s = 2
"#;

/// [`CONFIG`], with the interpreter `EXOAGENT_TEST_JUPYTERLAB_PYTHON` names, if any.
fn config() -> String {
    match std::env::var("EXOAGENT_TEST_JUPYTERLAB_PYTHON") {
        Ok(python) if !python.is_empty() => CONFIG.replacen(
            "[services.jupyterlab]\n",
            &format!("[services.jupyterlab]\npython = {}\n", Value::from(python)),
            1,
        ),
        _ => CONFIG.to_owned(),
    }
}

#[test]
fn sandbox_brings_up_jupyterlab_supervises_and_survives_agent_restarts() {
    let mut sb = Sandbox::new(&config());
    sb.start_agent();

    // 1. Ready on the local API.
    let status = sb.wait_complete(600);
    assert_eq!(status["setup"]["state"], "complete");
    let jl = service(&status);
    assert_eq!(jl["service"], "jupyterlab");
    assert_eq!(jl["state"], "ready");
    assert_eq!(jl["port"], sb.port);
    let first_pid = jl["pid"].as_i64().expect("a pid");
    assert!(pid_alive(first_pid));
    if let Ok(python) = std::env::var("EXOAGENT_TEST_JUPYTERLAB_PYTHON") {
        // The venv runs the interpreter asked for, not the machine's python3.
        let version = |exe: &Path| {
            let out = std::process::Command::new(exe)
                .arg("--version")
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        };
        let venv = sb.root().join("opt/exoagent/jupyterlab/venv");
        let wanted = version(Path::new(&python));
        assert!(
            wanted.starts_with("Python 3."),
            "{python} --version: {wanted:?}"
        );
        assert_eq!(version(&venv.join("bin/python")), wanted);
        eprintln!(
            "JupyterLab {} on {wanted}",
            version(&venv.join("bin/jupyter-lab"))
        );
    }

    // 2. The human table says the same.
    let table = sb.cli(&["status"]);
    assert_eq!(table.status.code(), Some(0));
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(
        table.contains("jupyterlab") && table.contains("ready"),
        "{table}"
    );
    let logs = sb.cli(&["logs", "jupyterlab", "-n", "500"]);
    assert_eq!(logs.status.code(), Some(0));
    let logs = String::from_utf8_lossy(&logs.stdout).into_owned();
    assert!(
        logs.contains("ServerApp"),
        "JupyterLab's own output is captured:\n{logs}"
    );
    assert_eq!(
        sb.cli(&["logs", "desktop"]).status.code(),
        Some(1),
        "not configured"
    );

    // 3. The passphrase logs in; a wrong one does not.
    let passphrase = sb.passphrase();
    assert_eq!(passphrase.split(' ').count(), 11);
    let (code, _) = login(&sb.base(), "WRONG PASS PHRASE");
    assert_eq!(code, 401, "wrong passphrase must be refused");
    let (code, session) = login(&sb.base(), &passphrase);
    assert_eq!(code, 302, "login with the passphrase");
    let api_status = session
        .client
        .get(format!("{}/api/status", sb.base()))
        .send()
        .unwrap();
    assert_eq!(
        api_status.status(),
        200,
        "/api/status with the login cookie"
    );
    let anonymous = reqwest::blocking::get(format!("{}/api/status", sb.base())).unwrap();
    assert_eq!(anonymous.status(), 403, "/api/status without the cookie");

    // 4. Exosphere's parser sees `complete` on the console (sandbox: stdout).
    let (state, _) =
        exosphere_status(&fs::read_to_string(sb.root().join("agent-1.stdout")).unwrap())
            .expect("a status line on the console");
    assert_eq!(state, "complete");

    // 5. kill -9 the server: restarted and ready again with a new pid.
    unsafe { libc::kill(first_pid as i32, libc::SIGKILL) };
    let status = sb.wait_for("a restart after kill -9", Duration::from_secs(180), |s| {
        let jl = service(s);
        jl["state"] == "ready"
            && jl["restarts"].as_u64() >= Some(1)
            && jl["pid"].as_i64() != Some(first_pid)
    });
    let second_pid = service(&status)["pid"].as_i64().unwrap();

    // 6. A kernel is running; the agent is killed (SIGKILL: no chance to clean up) and restarted.
    let (code, session) = login(&sb.base(), &passphrase);
    assert_eq!(code, 302);
    let kernel: Value = session
        .client
        .post(format!("{}/api/kernels", sb.base()))
        .header("X-XSRFToken", &session.xsrf)
        .json(&serde_json::json!({}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let kernel_id = kernel["id"].as_str().expect("kernel id").to_owned();
    sb.kill_agent(libc::SIGKILL);
    assert!(pid_alive(second_pid), "JupyterLab must outlive the agent");
    assert_eq!(
        reqwest::blocking::get(format!("{}/api", sb.base()))
            .unwrap()
            .status(),
        200,
        "JupyterLab answers while the agent is down"
    );
    sb.start_agent();
    let status = sb.wait_complete(300);
    assert_eq!(
        service(&status)["pid"].as_i64(),
        Some(second_pid),
        "the restarted agent adopts the running server instead of starting another"
    );
    let kernels: Value = session
        .client
        .get(format!("{}/api/kernels", sb.base()))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let ids: BTreeSet<&str> = kernels
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|k| k["id"].as_str())
        .collect();
    assert!(
        ids.contains(kernel_id.as_str()),
        "kernel {kernel_id} survived: {kernels}"
    );

    // 7. A graceful agent stop (SIGTERM) also leaves it running.
    sb.kill_agent(libc::SIGTERM);
    assert!(pid_alive(second_pid));
    sb.start_agent();
    let status = sb.wait_complete(300);
    assert_eq!(service(&status)["pid"].as_i64(), Some(second_pid));

    // 8. The passphrase is nowhere it must not be.
    let status_text = sb.cli(&["status", "--json"]);
    assert!(!String::from_utf8_lossy(&status_text.stdout).contains(&passphrase));
    assert!(!sb.agent_output().contains(&passphrase), "agent output");
    let secret_file = sb.root().join("var/lib/exoagent/secrets/passphrase");
    assert_eq!(
        files_containing(sb.root(), &passphrase, &secret_file),
        Vec::<PathBuf>::new()
    );
    assert_eq!(processes_mentioning(&passphrase), Vec::<String>::new());
    assert_eq!(world_readable_secrets(sb.root()), Vec::<PathBuf>::new());

    // 9. Fail closed: the loader beside the server config (traitlets runs it before the JSON
    // named by `--config`; it waits for the agent's JSON on a first boot) makes the real
    // JupyterLab exit when the JSON holds no password hash, instead of starting with a token
    // nobody knows.
    let loader_dir = tempfile::tempdir().unwrap();
    fs::copy(
        sb.root()
            .join("var/lib/exoagent/services/jupyterlab/jupyter_server_config.py"),
        loader_dir.path().join("jupyter_server_config.py"),
    )
    .expect("the agent wrote the loader beside the server config");
    let free_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    fs::write(
        loader_dir.path().join("jupyter_server_config.json"),
        serde_json::json!({"ServerApp": {"port": free_port, "ip": "127.0.0.1", "allow_root": true}})
            .to_string(),
    )
    .unwrap();
    let refused = std::process::Command::new(
        sb.root()
            .join("opt/exoagent/jupyterlab/venv/bin/jupyter-lab"),
    )
    .arg(format!(
        "--config={}",
        loader_dir
            .path()
            .join("jupyter_server_config.json")
            .display()
    ))
    .env("HOME", loader_dir.path())
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("holds no PasswordIdentityProvider.hashed_password"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("Jupyter Server") && !stderr.contains("token="),
        "{stderr}"
    );

    // 10. `down` is refused while the agent would restart the service; once the agent is
    // stopped, it stops the service for real.
    let refused = sb.cli(&["down", "--grace", "10"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("stop it first"));
    assert!(pid_alive(second_pid));
    sb.kill_agent(libc::SIGTERM);
    let down = sb.cli(&["down", "--grace", "10"]);
    assert_eq!(down.status.code(), Some(0));
    let deadline = Instant::now() + Duration::from_secs(20);
    while pid_alive(second_pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!pid_alive(second_pid), "down stops the server");
}

#[test]
fn invalid_configuration_changes_nothing() {
    let mut sb = Sandbox::new(
        r#"
[services.jupyterlab]
enabled = true
port = 70000
colour = "blue"
"#,
    );
    sb.start_agent();
    let status = sb.wait_agent_exit();
    assert_eq!(status.code(), Some(78), "EX_CONFIG");
    let err = fs::read_to_string(sb.root().join("agent-1.stderr")).unwrap();
    assert!(err.contains("services.jupyterlab.port"), "{err}");
    assert!(err.contains("colour"), "{err}");
    assert!(err.contains("config.toml"), "{err}");
    // The console still tells Exosphere, so the badge turns to Error instead of timing out.
    let console = fs::read_to_string(sb.root().join("agent-1.stdout")).unwrap();
    let (status, line) = exosphere_status(&console).expect("a status line on the console");
    assert_eq!(status, "error", "{console}");
    assert_eq!(line["reason"], "config-invalid", "{console}");
    for created in ["var", "opt", "run", "home"] {
        assert!(
            !sb.root().join(created).exists(),
            "{created}/ must not exist after a refused configuration"
        );
    }
    let validate = sb.cli(&["validate"]);
    assert_eq!(validate.status.code(), Some(1));
    let text = String::from_utf8_lossy(&validate.stderr);
    assert!(
        text.contains("services.jupyterlab.port") && text.contains("colour"),
        "{text}"
    );
}
