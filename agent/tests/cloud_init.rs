//! The userdata `exoagent userdata` renders, checked by the real cloud-init (`cloud-init
//! schema`, from Debian's package); the committed examples in `cloud-init/examples/` are
//! exactly what the renderer prints (set `EXOAGENT_UPDATE_EXAMPLES=1` to rewrite them); and
//! the bootstrap refuses a download whose SHA-256 does not match, leaving nothing behind; and
//! with `--cloud-init-waits`, the runcmd script cloud-init itself writes and runs (its own
//! `shellify` and `runparts`) fails when setup ends in error, with the reason on stderr.
//!
//! After a good download the bootstrap runs the binary's `install` and asks systemd to start
//! the unit; here the served binary is a stand-in script and `systemctl` a recorder (systemd
//! is not PID 1 on this machine, and the host must not change). The real thing happens in the
//! VM test. The package bootstrap is run the same way, with `apt-get` a recorder too (the
//! packages themselves are inspected by `packages.rs`).

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
            "bootstrap-package-jupyterlab.yaml",
            owned(&[
                "--delivery",
                "bootstrap",
                "--package-url",
                "https://downloads.example.org/exoagent/0.1.0/exoagent_0.1.0-1_amd64.deb",
                "--package-sha256",
                SHA,
            ]),
        ),
        (
            "baked-jupyterlab-cloud-init-waits.yaml",
            owned(&["--cloud-init-waits", "--wait-timeout", "30m"]),
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
            vec![
                "--delivery",
                "bootstrap",
                "--package-url",
                "https://x/exoagent",
                "--package-sha256",
                SHA,
            ],
            "--package-format",
        ),
        (
            vec!["--package-url", "https://x/a.deb"],
            "only with --delivery bootstrap",
        ),
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

/// The SHA-256 of `file` as the bootstrap's own checker (`sha256sum`) computes it.
fn sha256sum(file: &Path) -> String {
    let out = Command::new("sha256sum").arg(file).output().unwrap();
    assert!(out.status.success(), "sha256sum {}", file.display());
    let listed = String::from_utf8(out.stdout).unwrap();
    listed.split_whitespace().next().unwrap().to_owned()
}

/// Python's `http.server` serving `dir` on 127.0.0.1, listening when this returns.
fn serve_directory(dir: &Path) -> (std::process::Child, u16) {
    let port = common::free_port();
    let server = Command::new("python3")
        .args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port.to_string(),
        ])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..50 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    (server, port)
}

/// The bootstrap script from the rendered userdata, run for real against a loopback HTTP
/// server: a wrong checksum installs nothing and leaves no temporary file; the right one
/// installs and enables without a daemon-reload; run again (runcmd after the early run from
/// bootcmd) it downloads nothing and only starts the unit.
#[test]
fn the_bootstrap_installs_only_a_binary_with_the_right_checksum() {
    let served = tempfile::tempdir().unwrap();
    fs::write(served.path().join("exoagent"), b"#!/bin/sh\necho pretend\n").unwrap();
    let (mut server, port) = serve_directory(served.path());
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
    // A lock on /run keeps the early and the late run apart.
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: the bootstrap locks a file in /run (root)");
        let _ = server.kill();
        return;
    }
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
    let right = sha256sum(&served.path().join("exoagent"));
    let out = bootstrap(&right);
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
        "start --no-block exoagent.service\n",
        "the unit enabled by `install --enable`, started without a daemon-reload"
    );
    let mode = fs::metadata(&target).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o755);
    let served_bytes = fs::read(served.path().join("exoagent")).unwrap();
    assert_eq!(fs::read(&target).unwrap(), served_bytes);

    // The late run, with the server gone: it finds the work done and only starts the unit.
    let _ = server.kill();
    let _ = server.wait();
    fs::remove_file(&calls).unwrap();
    let out = bootstrap(&right);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("pretend"),
        "nothing installed twice"
    );
    assert_eq!(
        fs::read_to_string(&calls).unwrap(),
        "is-enabled --quiet exoagent.service\nstart --no-block exoagent.service\n"
    );
}

/// The package bootstrap from the rendered userdata, run for real against a loopback HTTP
/// server with `apt-get` and `systemctl` recorders: a wrong checksum runs no package tool and
/// leaves no download behind; the right one hands apt-get the file byte for byte, then starts
/// the unit.
#[test]
fn the_package_bootstrap_installs_only_a_package_with_the_right_checksum() {
    use std::os::unix::fs::PermissionsExt;
    let served = tempfile::tempdir().unwrap();
    let package_bytes = b"!<arch>\nnot really a deb, apt-get is a recorder here\n";
    fs::write(
        served.path().join("exoagent_0.1.0-1_amd64.deb"),
        package_bytes,
    )
    .unwrap();
    let (mut server, port) = serve_directory(served.path());
    let url = format!("http://127.0.0.1:{port}/exoagent_0.1.0-1_amd64.deb");
    let rendered = userdata(&[
        "--delivery",
        "bootstrap",
        "--package-url",
        &url,
        "--package-sha256",
        SHA,
    ]);
    let doc: serde_norway::Value = serde_norway::from_str(&rendered).unwrap();
    let argv: Vec<String> = doc["runcmd"][0]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(argv[6], "deb", "the format comes from the URL");
    // Recorders for the package tool and systemd; apt-get keeps a copy of what it was given.
    let bin = tempfile::tempdir().unwrap();
    let calls = bin.path().join("calls");
    let got = bin.path().join("got.deb");
    for tool in ["apt-get", "dnf", "rpm", "systemctl"] {
        let stub = bin.path().join(tool);
        fs::write(
            &stub,
            format!(
                "#!/bin/sh\necho \"{tool} $*\" >> '{calls}'\n\
                 if [ {tool} = apt-get ]; then for last; do :; done; cp \"$last\" '{got}'; fi\n",
                calls = calls.display(),
                got = got.display()
            ),
        )
        .unwrap();
        fs::set_permissions(&stub, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap()
    );
    let work = tempfile::tempdir().unwrap();
    let bootstrap = |sum: &str| {
        // The rendered argv with the checksum and the work directory replaced.
        let mut args = argv[1..].to_vec();
        args[4] = sum.to_owned();
        args[6] = work.path().to_str().unwrap().to_owned();
        Command::new(&argv[0])
            .args(&args)
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
    assert!(
        !calls.exists(),
        "a package tool or systemctl ran on an unverified download"
    );
    assert_eq!(
        fs::read_dir(work.path()).unwrap().count(),
        0,
        "download left behind"
    );

    let out = bootstrap(&sha256sum(
        &served.path().join("exoagent_0.1.0-1_amd64.deb"),
    ));
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recorded = fs::read_to_string(&calls).unwrap();
    let lines: Vec<&str> = recorded.lines().collect();
    assert_eq!(lines.len(), 2, "{recorded}");
    assert!(
        lines[0].starts_with(
            "apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends /"
        ),
        "{recorded}"
    );
    assert!(
        lines[0].ends_with("/exoagent.deb"),
        "an absolute path to a .deb: {recorded}"
    );
    assert_eq!(
        lines[1..],
        ["systemctl start exoagent.service"],
        "the package reloaded systemd and enabled the unit: only a start"
    );
    assert_eq!(
        fs::read(&got).unwrap(),
        package_bytes,
        "apt-get got the verified bytes"
    );
    assert_eq!(
        fs::read_dir(work.path()).unwrap().count(),
        0,
        "the download is removed after the install"
    );
}

/// The userdata's runcmd, turned into the script and run the way cloud-init's `cc_runcmd` and
/// `scripts_user` do (the installed cloud-init's own `util.shellify` and `subp.runparts`), with
/// `exoagent` on `PATH` asking the sandbox in `sandbox_dir` and `systemctl` a stand-in. Returns
/// what cloud-init records for the module (`str((module, exception))` is how its `main` stores
/// a failed module in `status.json`, which `cloud-init status --long` prints under `detail:`),
/// or "ok", and the script's stderr (which cloud-init's output setting appends to
/// /var/log/cloud-init-output.log).
fn run_runcmd_like_cloud_init(args: &[&str], sandbox_dir: &Path) -> (String, String) {
    let doc: serde_norway::Value = serde_norway::from_str(&userdata(args)).unwrap();
    let runcmd = serde_json::to_string(&doc["runcmd"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(exe(), bin.join("exoagent")).unwrap();
    fs::write(bin.join("systemctl"), "#!/bin/sh\nexit 0\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(bin.join("systemctl"), fs::Permissions::from_mode(0o755)).unwrap();
    let harness = r#"
import json, os, sys
from cloudinit import subp, util
scripts = os.path.join(sys.argv[2], "scripts")
util.write_file(os.path.join(scripts, "runcmd"), util.shellify(json.loads(sys.argv[1])), 0o700)
try:
    subp.runparts(scripts)
    print("ok")
except RuntimeError as e:
    print(str(("scripts-user", e)))
"#;
    let out = Command::new("/usr/bin/python3")
        .args(["-c", harness, &runcmd])
        .arg(dir.path())
        .env(
            "PATH",
            format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
        )
        .env("EXOAGENT_SANDBOX", sandbox_dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        // The script's own stdout (the status table) comes first.
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_setup_error_fails_cloud_inits_runcmd_with_the_reason_on_stderr() {
    let mut sandbox = common::Sandbox::new(
        "[services.jupyterlab]\nenabled = true\nbind = \"127.0.0.1\"\nport = @PORT@\npython = \"/bin/false\"\n",
    );
    sandbox.start_agent();
    let (recorded, stderr) = run_runcmd_like_cloud_init(
        &["--cloud-init-waits", "--wait-timeout", "60s"],
        sandbox.root(),
    );
    assert_eq!(
        recorded,
        "('scripts-user', RuntimeError('Runparts: 1 failures (runcmd) in 1 attempted commands'))",
        "{stderr}"
    );
    let reason = stderr
        .lines()
        .find(|l| l.starts_with("exoagent: setup error: "))
        .unwrap_or_else(|| panic!("no reason line: {stderr}"));
    assert!(
        reason.starts_with("exoagent: setup error: jupyterlab: service-install-failed: "),
        "{reason}"
    );
    // Never mistaken for a status line by Exosphere (it reaches the console through cloud-final).
    assert!(!reason.contains('{'), "{reason}");
}

#[test]
fn no_agent_fails_cloud_inits_runcmd_at_the_timeout() {
    let nothing = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let (recorded, stderr) = run_runcmd_like_cloud_init(
        &["--cloud-init-waits", "--wait-timeout", "2s"],
        nothing.path(),
    );
    assert!(
        recorded.contains("Runparts: 1 failures (runcmd)"),
        "{recorded}"
    );
    assert!(
        stderr.contains("exoagent: cannot reach exoagent"),
        "{stderr}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
}
