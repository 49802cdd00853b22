//! `exoagent bake` in a sandbox, with a real JupyterLab install: the payload lands where the
//! agent looks for it, nothing per-instance is created (no passphrase, no instance marker, no
//! runtime state), and the first run afterwards only configures and starts (the venv is found
//! up to date instead of being installed). RStudio's package is fetched and verified before
//! anything is installed: a wrong checksum stops the whole bake with the image unchanged.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use common::{exe, Sandbox};

const CONFIG: &str = "[services.jupyterlab]\nenabled = true\nbind = \"127.0.0.1\"\nport = @PORT@\n";

fn bake(root: &Path, args: &[&str]) -> std::process::Output {
    Command::new(exe())
        .arg("--sandbox-dir")
        .arg(root)
        .arg("bake")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                found.extend(files_under(&path));
            } else {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

#[test]
fn a_baked_payload_is_used_and_no_instance_state_is_baked() {
    let mut sb = Sandbox::new(CONFIG);
    let out = bake(sb.root(), &[]);
    assert!(
        out.status.success(),
        "bake: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "baked: jupyterlab"
    );
    let venv_python = sb.root().join("opt/exoagent/jupyterlab/venv/bin/python");
    assert!(venv_python.exists(), "{} missing", venv_python.display());
    let state = files_under(&sb.root().join("var/lib/exoagent"));
    assert!(state.is_empty(), "per-instance state was baked: {state:?}");
    for dir in ["run", "var/log", "config-drive", "home"] {
        let found = files_under(&sb.root().join(dir));
        assert!(found.is_empty(), "{dir}: {found:?}");
    }

    sb.start_agent();
    sb.wait_complete(300);
    let output = sb.agent_output();
    assert!(
        output.contains("venv up to date"),
        "the baked venv was not used:\n{output}"
    );
}

#[test]
fn bake_refuses_what_it_cannot_bake() {
    let sb = Sandbox::new("[services.jupyterlab]\nenabled = false\n");
    let out = bake(sb.root(), &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bake-nothing"));
    let out = bake(sb.root(), &["--service", "notaservice"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown service"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An HTTP server on loopback answering every request with `body`.
fn serve_every_request(body: &'static [u8]) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(body);
        }
    });
    addr
}

#[test]
fn a_wrong_rstudio_checksum_stops_the_bake_before_anything_is_installed() {
    let addr = serve_every_request(b"not Posit's package");
    let sb = Sandbox::new(&format!(
        "{CONFIG}[services.rstudio]\nenabled = true\nbind = \"127.0.0.1\"\n\
         package_url = \"http://{addr}/rstudio-server.deb\"\n"
    ));
    let out = bake(sb.root(), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("rstudio-checksum-mismatch"), "{stderr}");
    assert!(stderr.contains("nothing was installed"), "{stderr}");
    // JupyterLab comes first in the configuration, yet its venv was never made: every fetch
    // runs before any install.
    let opt = files_under(&sb.root().join("opt/exoagent"));
    assert!(opt.is_empty(), "installed despite the refusal: {opt:?}");
    let state = files_under(&sb.root().join("var/lib/exoagent"));
    assert!(state.is_empty(), "per-instance state was baked: {state:?}");
}
