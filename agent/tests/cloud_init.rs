//! The userdata `exoagent userdata` renders, checked by the real cloud-init (`cloud-init
//! schema`, from Debian's package); the committed examples in `cloud-init/examples/` are
//! exactly what the renderer prints (set `EXOAGENT_UPDATE_EXAMPLES=1` to rewrite them); and
//! the bootstrap refuses a download whose SHA-256 does not match, leaving nothing behind.
//!
//! After a good download the bootstrap runs the binary's `install` and asks systemd to start
//! the unit; here the served binary is a stand-in script and `systemctl` a recorder (systemd
//! is not PID 1 on this machine, and the host must not change). The real thing happens in the
//! VM test.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{exe, repo_root, run_ok};

const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn userdata(args: &[&str]) -> String {
    let what = format!("userdata {args:?}");
    let out = run_ok(Command::new(exe()).arg("userdata").args(args), &what);
    String::from_utf8(out.stdout).unwrap()
}

fn schema(path: &Path) -> std::process::Output {
    Command::new("cloud-init")
        .args(["schema", "--config-file"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .expect("cloud-init is installed by installer/dev/prereqs.sh")
}

/// The examples and the commands that make them.
fn examples(clouds_yaml: &str) -> Vec<(&'static str, Vec<String>)> {
    let owned = |args: &[&str]| args.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    vec![
        ("baked-jupyterlab.yaml", owned(&[])),
        (
            "baked-with-nova-reporting.yaml",
            owned(&[
                "--clouds-yaml",
                clouds_yaml,
                "--cloud-name",
                "openstack",
                "--ssh-public-key",
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleExampleExampleExampleExampleExample researcher@laptop",
                "--no-os-updates",
            ]),
        ),
        (
            "bootstrap-jupyterlab.yaml",
            owned(&[
                "--delivery",
                "bootstrap",
                "--binary-url",
                "https://downloads.example.org/exoagent/0.1.0/exoagent-x86_64-linux",
                "--binary-sha256",
                SHA,
            ]),
        ),
    ]
}

#[test]
fn every_example_is_current_and_valid_for_cloud_init() {
    let examples_dir = repo_root().join("cloud-init/examples");
    let clouds = examples_dir.join("clouds.yaml.example");
    let clouds_arg = clouds.to_str().unwrap().to_owned();
    let update = std::env::var("EXOAGENT_UPDATE_EXAMPLES").as_deref() == Ok("1");
    for (name, args) in examples(&clouds_arg) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let rendered = userdata(&args);
        let path = examples_dir.join(name);
        if update {
            fs::write(&path, &rendered).unwrap();
        }
        let committed = fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(
            committed, rendered,
            "cloud-init/examples/{name} is stale; rerun with EXOAGENT_UPDATE_EXAMPLES=1"
        );
        let out = schema(&path);
        assert!(
            out.status.success(),
            "{name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_schema_check_rejects_a_broken_document() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.yaml");
    let good = userdata(&[]);
    fs::write(
        &broken,
        good.replace(
            "  permissions: '0644'\n",
            "  permissions: '0644'\n  colour: blue\n",
        ),
    )
    .unwrap();
    let out = schema(&broken);
    assert!(!out.status.success(), "cloud-init accepted an unknown key");
    assert!(String::from_utf8_lossy(&out.stderr).contains("colour"));
}

#[test]
fn bad_choices_exit_2_naming_the_option() {
    for (args, option) in [
        (vec!["--delivery", "bootstrap"], "--binary-url"),
        (
            vec![
                "--delivery",
                "bootstrap",
                "--binary-url",
                "https://x/y",
                "--binary-sha256",
                "12",
            ],
            "--binary-sha256",
        ),
        (vec!["--service", "notaservice"], "unknown service"),
        (
            vec!["--clouds-yaml", "/nonexistent/clouds.yaml"],
            "--clouds-yaml",
        ),
    ] {
        let out = Command::new(exe())
            .arg("userdata")
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(option), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "nothing printed on error");
    }
}

/// The bootstrap script from the rendered userdata, run for real against a loopback HTTP
/// server: a wrong checksum installs nothing and leaves no temporary file.
#[test]
fn the_bootstrap_installs_only_a_binary_with_the_right_checksum() {
    let served = tempfile::tempdir().unwrap();
    fs::write(served.path().join("exoagent"), b"#!/bin/sh\necho pretend\n").unwrap();
    let port = common::free_port();
    let mut server = Command::new("python3")
        .args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port.to_string(),
        ])
        .current_dir(served.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/exoagent");
    let rendered = userdata(&[
        "--delivery",
        "bootstrap",
        "--binary-url",
        &url,
        "--binary-sha256",
        SHA,
    ]);
    let doc: serde_norway::Value = serde_norway::from_str(&rendered).unwrap();
    let script = doc["runcmd"][0][2].as_str().unwrap().to_owned();
    let target_dir = tempfile::tempdir().unwrap();
    let target = target_dir.path().join("exoagent");
    // Wait for the server.
    for _ in 0..50 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // systemd is not PID 1 here (and must not be touched on a developer's machine): a
    // `systemctl` stand-in records what the bootstrap asks of it.
    let bin = tempfile::tempdir().unwrap();
    let calls = bin.path().join("systemctl.calls");
    let stub = bin.path().join("systemctl");
    fs::write(
        &stub,
        format!("#!/bin/sh\necho \"$*\" >> '{}'\n", calls.display()),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&stub, fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap()
    );
    let bootstrap = |sum: &str| {
        Command::new("sh")
            .args(["-c", &script, "exoagent-bootstrap", &url, sum])
            .arg(&target)
            .env("no_proxy", "127.0.0.1")
            .env("PATH", &path)
            .output()
            .unwrap()
    };
    let out = bootstrap(SHA);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("did NOT match"),
        "refused for the checksum: {stderr}"
    );
    assert!(!target.exists(), "an unverified binary was installed");
    assert_eq!(
        fs::read_dir(target_dir.path()).unwrap().count(),
        0,
        "temporary download left behind"
    );

    // The right checksum: the binary is installed, executable, byte for byte. (The stand-in
    // binary's `install` only echoes; starting the unit is the VM test's business.)
    let listed = Command::new("sha256sum")
        .arg(served.path().join("exoagent"))
        .output()
        .unwrap()
        .stdout;
    let real_sum = String::from_utf8(listed).unwrap();
    let real_sum = real_sum.split_whitespace().next().unwrap();
    let out = bootstrap(real_sum);
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("pretend"),
        "the verified binary was run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        fs::read_to_string(&calls).unwrap(),
        "daemon-reload\nenable --now exoagent.service\n"
    );
    let mode = fs::metadata(&target).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o755);
    let served_bytes = fs::read(served.path().join("exoagent")).unwrap();
    assert_eq!(fs::read(&target).unwrap(), served_bytes);
}
