//! Helpers shared by the end-to-end tests: the real `exoagent` binary in sandbox mode in a
//! throw-away directory, and the CLI against it.
#![allow(dead_code)] // each test crate uses a different part

pub mod hostile;
pub mod shipped;

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The repository's root.
pub fn repo_root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Run `command` with stdin closed; panic with its output unless it succeeds.
pub fn run_ok(command: &mut Command, what: &str) -> Output {
    let out = command.stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_exoagent")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A sandbox directory with its configuration, and the agent running in it (at most one at a
/// time); the agent is killed and the services stopped on drop.
pub struct Sandbox {
    dir: tempfile::TempDir,
    /// The free port `@PORT@` in the configuration was replaced with.
    pub port: u16,
    agent: Option<Child>,
    runs: u32,
    start_args: Vec<String>,
    start_env: Vec<(String, String)>,
}

impl Sandbox {
    /// A sandbox whose `config.toml` is `config` with `@PORT@` replaced by a free port.
    pub fn new(config: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("exoagent-e2e-")
            .tempdir()
            .unwrap();
        let port = free_port();
        let etc = dir.path().join("etc/exoagent");
        fs::create_dir_all(&etc).unwrap();
        fs::write(
            etc.join("config.toml"),
            config.replace("@PORT@", &port.to_string()),
        )
        .unwrap();
        Self {
            dir,
            port,
            agent: None,
            runs: 0,
            start_args: Vec::new(),
            start_env: Vec::new(),
        }
    }

    /// Like [`Sandbox::new`], with a port that can sit behind the TLS front: `@PORT@` and
    /// `@PORT@ + 10000` (where the service then listens) are both free.
    pub fn new_fronted(config: &str) -> Self {
        let mut sandbox = Self::new(config);
        let port = loop {
            let port = free_port();
            if port <= 55_535 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
                break port;
            }
        };
        fs::write(
            sandbox.root().join("etc/exoagent/config.toml"),
            config.replace("@PORT@", &port.to_string()),
        )
        .unwrap();
        sandbox.port = port;
        sandbox
    }

    /// Replace the configuration (`@PORT@` is the sandbox's port) for the next agent start.
    pub fn rewrite_config(&self, config: &str) {
        fs::write(
            self.root().join("etc/exoagent/config.toml"),
            config.replace("@PORT@", &self.port.to_string()),
        )
        .unwrap();
    }

    /// Extra arguments for `exoagent sandbox` (e.g. `--no-fixture-identity`).
    pub fn with_start_args(mut self, args: &[&str]) -> Self {
        self.start_args = args.iter().map(|a| a.to_string()).collect();
        self
    }

    /// An extra environment variable for the agent (e.g. `NOTIFY_SOCKET`).
    pub fn with_env(mut self, name: &str, value: &str) -> Self {
        self.start_env.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(exe())
            .arg("--sandbox-dir")
            .arg(self.root())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    pub fn start_agent(&mut self) {
        self.runs += 1;
        let stdout =
            fs::File::create(self.root().join(format!("agent-{}.stdout", self.runs))).unwrap();
        let stderr =
            fs::File::create(self.root().join(format!("agent-{}.stderr", self.runs))).unwrap();
        let child = Command::new(exe())
            .arg("sandbox")
            .args(&self.start_args)
            .arg(self.root())
            .envs(self.start_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap();
        self.agent = Some(child);
    }

    pub fn agent_output(&self) -> String {
        let mut all = String::new();
        for run in 1..=self.runs {
            for stream in ["stdout", "stderr"] {
                all += &fs::read_to_string(self.root().join(format!("agent-{run}.{stream}")))
                    .unwrap_or_default();
            }
        }
        all
    }

    pub fn status(&self) -> Value {
        let out = self.cli(&["status", "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    pub fn wait_complete(&self, timeout_s: u64) -> Value {
        let out = self.cli(&[
            "status",
            "--wait",
            "--timeout",
            &format!("{timeout_s}s"),
            "--json",
        ]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "status --wait did not report complete.\nstdout: {}\nstderr: {}\nagent:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.agent_output()
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Poll `status --json` until `pred` holds.
    pub fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status();
            if pred(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last status: {status}\nagent:\n{}",
                self.agent_output()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Wait for the agent to exit on its own.
    pub fn wait_agent_exit(&mut self) -> std::process::ExitStatus {
        self.agent
            .take()
            .expect("an agent was started")
            .wait()
            .unwrap()
    }

    /// Send `signal` to the running agent and leave it running (SIGHUP: read the
    /// configuration again).
    pub fn signal_agent(&self, signal: i32) {
        let child = self.agent.as_ref().expect("an agent was started");
        unsafe { libc::kill(child.id() as i32, signal) };
    }

    pub fn kill_agent(&mut self, signal: i32) {
        if let Some(mut child) = self.agent.take() {
            unsafe { libc::kill(child.id() as i32, signal) };
            let _ = child.wait();
        }
    }

    pub fn passphrase(&self) -> String {
        let path = self.root().join("var/lib/exoagent/secrets/passphrase");
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600, "passphrase file mode");
        fs::read_to_string(path).unwrap().trim().to_owned()
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.kill_agent(libc::SIGKILL);
        let _ = self.cli(&["down", "--grace", "5"]);
    }
}

/// `tests/guacamole/guacd_peer.py`, the guacd test double (for guacd 1.5/1.6 behaviour and
/// faults; [`RealGuacd`] is the real guacd 1.3.0), on a free loopback port; killed on drop.
/// Needs the venv `tests/guacamole/setup.sh` makes.
pub struct GuacdPeer {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its events log (JSON lines).
    pub events: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl GuacdPeer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Started with extra arguments (e.g. `--without-plugin vnc`).
    pub fn start_with(extra: &[&str]) -> Self {
        use std::io::BufRead;
        let venv = std::env::var("EXOAGENT_GUAC_VENV")
            .unwrap_or_else(|_| "/var/tmp/exoagent-guac-venv".to_owned());
        let python = Path::new(&venv).join("bin/python");
        assert!(
            python.exists(),
            "{} is missing: run `bash tests/guacamole/setup.sh` (the guacd test double's venv)",
            python.display()
        );
        let dir = tempfile::tempdir().unwrap();
        let events = dir.path().join("events.jsonl");
        let mut child = Command::new(python)
            .arg(repo_root().join("tests/guacamole/guacd_peer.py"))
            .args(["--listen", "127.0.0.1:0", "--events"])
            .arg(&events)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the guacd test double did not start: {line:?}"));
        Self {
            child,
            port,
            events,
            _dir: dir,
        }
    }
}

impl Drop for GuacdPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real guacd 1.3.0 (Debian 11's packages, the version Ubuntu 22.04/24.04 instances get) on a
/// free loopback port, run by `tests/guacamole/guacd-bullseye.sh` from its cached bullseye root
/// (built on first use, ~40 s; as root) in its own PID and mount namespaces. Killed on drop,
/// with every per-connection process it forked (the namespace ends with it).
pub struct RealGuacd {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl RealGuacd {
    /// Starts it and waits until it answers `select,ssh` with `args` (at most 3 minutes, for a
    /// first build of the root); panics with its log otherwise.
    pub fn start() -> Self {
        use std::io::{Read, Write};
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("guacd.log");
        let port = free_port();
        let child = Command::new("bash")
            .arg(repo_root().join("tests/guacamole/guacd-bullseye.sh"))
            .arg("run")
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log).unwrap())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut guacd = Self {
            child,
            port,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if let Ok(Some(status)) = guacd.child.try_wait() {
                panic!("guacd-bullseye.sh exited {status}:\n{}", guacd.log());
            }
            let answer = std::net::TcpStream::connect(("127.0.0.1", port)).and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                s.write_all(b"6.select,3.ssh;")?;
                // "4.args,13.VERSION_1_3_0," is 24 bytes.
                let mut buf = [0u8; 24];
                s.read_exact(&mut buf)?;
                Ok(String::from_utf8_lossy(&buf).into_owned())
            });
            match answer {
                Ok(args) if args == "4.args,13.VERSION_1_3_0," => return guacd,
                Ok(other) => panic!("expected guacd 1.3.0's args, saw {other:?}"),
                Err(_) => {}
            }
            assert!(
                Instant::now() < deadline,
                "guacd 1.3.0 did not answer on 127.0.0.1:{port}:\n{}",
                guacd.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What guacd logged so far (it logs to stderr).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for RealGuacd {
    fn drop(&mut self) {
        // SIGKILL to the script: setpriv's parent-death signal ends unshare, whose
        // --kill-child ends guacd's PID namespace.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An X display number whose lock, socket and RFB port (5900 + n) are free.
pub fn free_display() -> u16 {
    (40..99)
        .find(|n| {
            !Path::new(&format!("/tmp/.X{n}-lock")).exists()
                && !Path::new(&format!("/tmp/.X11-unix/X{n}")).exists()
                && TcpListener::bind(("127.0.0.1", 5900 + n)).is_ok()
        })
        .expect("a free X display")
}
