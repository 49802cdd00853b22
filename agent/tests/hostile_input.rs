//! Configuration that used to hang or explode the real binary, a sandbox that must not touch an
//! existing `config.toml`, a second agent, and credentials in a refused value. Every run of the
//! binary has a generous bound that only turns a hang into a failure; no test measures time.

mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::exe;

/// Far beyond what any of these runs needs; only a hang reaches it.
const HANG: Duration = Duration::from_secs(120);

/// Run `command` to completion, or kill it and fail if it is still running after [`HANG`].
fn run_bounded(command: &mut Command, what: &str) -> Output {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    // Output is collected while the child runs, so a full pipe cannot stall it.
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(child.wait_with_output().unwrap()));
    match result.recv_timeout(HANG) {
        Ok(out) => out,
        Err(_) => {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let out = result.recv().unwrap();
            panic!(
                "{what}: still running after {HANG:?}; killed\nstderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

fn validate(root: &Path) -> Output {
    run_bounded(
        Command::new(exe())
            .arg("--sandbox-dir")
            .arg(root)
            .arg("validate"),
        "exoagent validate",
    )
}

fn sandbox(root: &Path) -> Output {
    run_bounded(
        Command::new(exe()).arg("sandbox").arg(root),
        "exoagent sandbox",
    )
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A sandbox root with `etc/exoagent/config.d` created.
fn root_with_dropins() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let dropins = dir.path().join("etc/exoagent/config.d");
    fs::create_dir_all(&dropins).unwrap();
    (dir, dropins)
}

fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
}

#[test]
fn a_fifo_in_config_d_is_refused_by_validate_and_the_agent() {
    let (dir, dropins) = root_with_dropins();
    let fifo = dropins.join("50-fifo.toml");
    mkfifo(&fifo);
    // Nobody ever writes to it: reading it would wait forever.
    let out = validate(dir.path());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains(&format!("{}: ", fifo.display())), "{err}");
    assert!(err.contains("not a regular file"), "{err}");

    let out = sandbox(dir.path());
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not a regular file"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_fifo_as_exospheres_choices_is_refused() {
    let (dir, _) = root_with_dropins();
    let choices = exoagent::paths::Paths::sandbox(dir.path()).exosphere_choices_file;
    mkfifo(&choices);
    let out = validate(dir.path());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains(&format!("{}: ", choices.display())), "{err}");
    assert!(err.contains("not a regular file"), "{err}");
}

#[test]
fn a_huge_config_file_is_refused_by_size() {
    // 400,000 unknown tables (6.7 MB) once ran for more than ten minutes.
    let (dir, dropins) = root_with_dropins();
    let file = dropins.join("50-huge.toml");
    let text: String = (0..400_000).map(|i| format!("[tbl{i:09}]\n")).collect();
    fs::write(&file, text).unwrap();
    let out = validate(dir.path());
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains(&file.display().to_string()), "{err}");
    assert!(
        err.contains("larger than the limit of 1048576 bytes"),
        "{err}"
    );
}

#[test]
fn a_file_just_under_the_cap_full_of_errors_is_reported_capped() {
    // About 100,000 unknown tables in under 1 MiB: the first 1000 are listed, the rest counted.
    let (dir, dropins) = root_with_dropins();
    let file = dropins.join("50-many.toml");
    let text: String = (0..100_000).map(|i| format!("[t{i:05}]\n")).collect();
    assert!(text.len() < 1024 * 1024);
    fs::write(&file, text).unwrap();
    let out = validate(dir.path());
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let listed = err.lines().filter(|l| l.contains("unknown key")).count();
    assert_eq!(listed, 1000, "{}", &err[..err.len().min(2000)]);
    assert!(
        err.contains("... and 99000 more errors not listed"),
        "{}",
        &err[err.len().saturating_sub(2000)..]
    );
    // The last listed error has its right line: lines are still found exactly.
    assert!(
        err.contains(&format!("{}:1000: t00999: ", file.display())),
        "{}",
        &err[..err.len().min(2000)]
    );
}

#[test]
fn sandbox_leaves_a_symlinked_config_alone_and_writes_nothing_when_it_is_invalid() {
    for target in ["config.toml", "missing.toml", "other.toml"] {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc/exoagent");
        fs::create_dir_all(&etc).unwrap();
        let config = etc.join("config.toml");
        // A looping, a dangling, and a symlink to a file with an unknown key.
        fs::write(etc.join("other.toml"), "bogus = 1\n").unwrap();
        symlink(target, &config).unwrap();
        let out = sandbox(dir.path());
        assert_eq!(out.status.code(), Some(78), "{target}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&config.display().to_string()),
            "{}",
            stderr(&out)
        );
        assert_eq!(
            fs::read_link(&config).unwrap(),
            Path::new(target),
            "{target}: the symlink was replaced"
        );
        assert_eq!(
            fs::read_to_string(etc.join("other.toml")).unwrap(),
            "bogus = 1\n"
        );
        // Validation failed before anything was written.
        assert!(!dir.path().join("config-drive").exists(), "{target}");
        assert!(!dir.path().join("var").exists(), "{target}");
    }
}

#[test]
fn credentials_in_metadata_url_are_not_echoed() {
    let (dir, dropins) = root_with_dropins();
    fs::write(
        dropins.join("10-cloud.toml"),
        "[cloud]\nmetadata_url = \"http://nova:s3cr3t-pw@169.254.169.254/\"\n",
    )
    .unwrap();
    let out = validate(dir.path());
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("cloud.metadata_url"), "{err}");
    assert!(!err.contains("s3cr3t-pw"), "{err}");
    assert!(err.contains("http://***@169.254.169.254/"), "{err}");
}

#[test]
fn a_second_agent_writes_no_status_line() {
    let mut first = common::Sandbox::new("# nothing enabled\n");
    first.start_agent();
    first.wait_for("the first agent's status API", HANG, |s| {
        s.get("setup").is_some()
    });
    let out = sandbox(first.root());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("already"), "{err}");
    // In the sandbox, stdout is the console: not one status line from the refused agent.
    assert!(
        !stdout.lines().any(|l| l.contains("\"status\"")),
        "stdout: {stdout}"
    );
    first.kill_agent(libc::SIGTERM);
}
