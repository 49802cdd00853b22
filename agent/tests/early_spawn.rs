//! The order of a baked start (issue 18): a service whose payload is in place is spawned as
//! soon as its own inputs exist (the account and its venv: the argon2 hash and the server
//! configuration follow, JupyterLab's loader waits for them), not after
//! the passphrase's publication; what is reported keeps DESIGN §4.4's order (`running` only
//! once the publication is done). The metadata service is a real HTTP server on loopback that
//! holds the publication's POST until the test lets it answer; the agent is the real binary in
//! sandbox mode, JupyterLab's venv a stand-in whose `jupyter-lab` only records that it ran.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::{repo_root, Sandbox};

/// What the metadata service saw, and whether it may answer the publication yet.
#[derive(Default)]
struct Held {
    /// Bodies of the password POSTs received.
    posts: Vec<String>,
    /// POSTs answered.
    answered: usize,
    released: bool,
    /// Whether `meta_data.json` (the identity) is held too, until [`MetadataService::release_identity`].
    identity_held: bool,
}

/// A metadata service on loopback: `meta_data.json` (the sandbox fixture's identity) at once,
/// the password POST only after [`MetadataService::release`].
struct MetadataService {
    port: u16,
    held: Arc<(Mutex<Held>, Condvar)>,
}

impl MetadataService {
    fn start() -> Self {
        Self::start_holding_identity(false)
    }

    /// As [`Self::start`], `meta_data.json` held as well when `identity_held`.
    fn start_holding_identity(identity_held: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let held: Arc<(Mutex<Held>, Condvar)> = Arc::new((
            Mutex::new(Held {
                identity_held,
                ..Held::default()
            }),
            Condvar::new(),
        ));
        let meta_data =
            fs::read_to_string(repo_root().join("agent/src/cli/sandbox_meta_data.json")).unwrap();
        let shared = held.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (held, meta_data) = (shared.clone(), meta_data.clone());
                std::thread::spawn(move || answer(stream, &held, &meta_data));
            }
        });
        Self { port, held }
    }

    fn release(&self) {
        let (lock, wake) = &*self.held;
        lock.lock().unwrap().released = true;
        wake.notify_all();
    }

    fn release_identity(&self) {
        let (lock, wake) = &*self.held;
        lock.lock().unwrap().identity_held = false;
        wake.notify_all();
    }

    fn posts(&self) -> (Vec<String>, usize) {
        let held = self.held.0.lock().unwrap();
        (held.posts.clone(), held.answered)
    }
}

/// One HTTP/1.1 request on `stream`, answered as the metadata service would (or held).
fn answer(mut stream: TcpStream, held: &(Mutex<Held>, Condvar), meta_data: &str) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let (status, text) = match request_line.split_whitespace().take(2).collect::<Vec<_>>()[..] {
        ["GET", "/openstack/latest/meta_data.json"] => {
            let (lock, wake) = held;
            let mut state = lock.lock().unwrap();
            while state.identity_held {
                state = wake.wait(state).unwrap();
            }
            ("200 OK", meta_data.to_owned())
        }
        ["POST", "/openstack/latest/password"] => {
            let (lock, wake) = held;
            let mut state = lock.lock().unwrap();
            state
                .posts
                .push(String::from_utf8_lossy(&body).into_owned());
            while !state.released {
                state = wake.wait(state).unwrap();
            }
            state.answered += 1;
            ("200 OK", String::new())
        }
        _ => ("404 Not Found", String::new()),
    };
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
}

/// FNV-1a of the lock, as the agent marks a venv installed from it (`jupyterlab::install`).
fn lock_fingerprint() -> String {
    let lock =
        fs::read(repo_root().join("agent/src/services/jupyterlab/requirements.txt")).unwrap();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in lock {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("fnv1a64:{hash:016x}")
}

/// A baked JupyterLab: the venv marked up to date, and a `jupyter-lab` that records its start
/// (pid and arguments) in `spawned` and then idles (it never answers, so the service stays `starting`).
fn bake_stand_in(root: &Path) -> std::path::PathBuf {
    let venv = root.join("opt/exoagent/jupyterlab/venv");
    fs::create_dir_all(venv.join("bin")).unwrap();
    fs::write(venv.join(".exoagent-requirements"), lock_fingerprint()).unwrap();
    let spawned = root.join("spawned");
    let script = venv.join("bin/jupyter-lab");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$$ $*\" > '{}.tmp' && mv '{0}.tmp' '{0}'\nexec sleep 600\n",
            spawned.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    spawned
}

/// The `status` values of the console lines printed so far.
fn console_statuses(sandbox: &Sandbox) -> Vec<String> {
    sandbox
        .agent_output()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["status"].as_str().map(str::to_owned))
        .collect()
}

/// Waits (bounded only against a hang) until `done` holds.
fn wait_until(what: &str, sandbox: &Sandbox, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; agent:\n{}",
            sandbox.agent_output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// JupyterLab enabled, the identity from the metadata service on `port` (no config drive), so
/// the publication's budget is the long `metadata_timeout_s`.
fn jupyterlab_with_metadata_at(port: u16) -> String {
    format!(
        "[services.jupyterlab]\nenabled = true\nbind = \"127.0.0.1\"\nport = @PORT@\n\n[cloud]\nmetadata_url = \"http://127.0.0.1:{port}\"\n\
         metadata_timeout_s = 600\n"
    )
}

#[test]
fn a_baked_service_is_spawned_while_the_publication_is_still_held() {
    let metadata = MetadataService::start();
    let config = jupyterlab_with_metadata_at(metadata.port);
    // The identity comes from the metadata service, as on a cloud without a config drive: the
    // publication's budget is then the long `metadata_timeout_s`, not the config drive's 15 s.
    let mut sandbox = Sandbox::new(&config).with_start_args(&["--no-fixture-identity"]);
    let spawned = bake_stand_in(sandbox.root());
    sandbox.start_agent();

    wait_until("JupyterLab's spawn", &sandbox, || spawned.exists());
    // Started with the server config's path, as before the loader existed (so an upgraded
    // agent adopts a running JupyterLab); the loader beside it, which traitlets runs first,
    // waits for that file, which the agent writes once the passphrase's hash is ready: it
    // follows, 0600, with the hash.
    let state = sandbox.root().join("var/lib/exoagent/services/jupyterlab");
    let args = fs::read_to_string(&spawned).unwrap();
    assert!(
        args.trim_end().ends_with(&format!(
            "--config={}",
            state.join("jupyter_server_config.json").display()
        )),
        "{args}"
    );
    assert!(
        state.join("jupyter_server_config.py").exists(),
        "no loader beside the config"
    );
    let server_config = state.join("jupyter_server_config.json");
    wait_until("the server config", &sandbox, || server_config.exists());
    assert_eq!(
        fs::metadata(&server_config).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let written: serde_json::Value =
        serde_json::from_slice(&fs::read(&server_config).unwrap()).unwrap();
    assert!(
        written["PasswordIdentityProvider"]["hashed_password"]
            .as_str()
            .is_some_and(|h| h.starts_with("argon2:$argon2id$")),
        "no hash in the server config"
    );
    let (posts, answered) = metadata.posts();
    assert_eq!(answered, 0, "the publication was answered before the spawn");
    assert!(
        posts.len() <= 1,
        "the publication was retried meanwhile: {posts:?}"
    );
    // Reported: still `starting`, on the console and in the status API.
    let statuses = console_statuses(&sandbox);
    assert!(
        !statuses.iter().any(|s| s == "running" || s == "complete"),
        "reported past `starting` before the publication: {statuses:?}"
    );
    let status = sandbox.status();
    assert_eq!(status["setup"]["state"], "starting", "{status}");
    assert_eq!(status["services"][0]["state"], "starting", "{status}");

    // The publication gets through: `running` follows, with the passphrase published once.
    wait_until("the publication's POST", &sandbox, || {
        !metadata.posts().0.is_empty()
    });
    metadata.release();
    wait_until("`running` on the console", &sandbox, || {
        console_statuses(&sandbox).iter().any(|s| s == "running")
    });
    let (posts, answered) = metadata.posts();
    assert_eq!(answered, 1, "{posts:?}");
    assert_eq!(posts, [sandbox.passphrase()]);
    let status = sandbox.status();
    assert_eq!(status["setup"]["state"], "running", "{status}");
}

/// The services' side runs while the identity is looked up. With state of another instance
/// on disk (its instance marker: an image made from a used instance) the configuration and the
/// spawn wait for the passphrase, made once the instance is known (that instance's state is
/// forgotten first); on a fresh image nothing could be forgotten, so the passphrase made at the
/// start is stored and handed over at once, and the service is spawned before the identity is
/// known.
#[test]
fn the_services_side_runs_while_the_identity_is_looked_up() {
    for fresh in [false, true] {
        let metadata = MetadataService::start_holding_identity(true);
        let config = jupyterlab_with_metadata_at(metadata.port);
        let mut sandbox = Sandbox::new(&config).with_start_args(&["--no-fixture-identity"]);
        let spawned = bake_stand_in(sandbox.root());
        let state_dir = sandbox.root().join("var/lib/exoagent");
        if !fresh {
            fs::create_dir_all(&state_dir).unwrap();
            fs::write(state_dir.join("instance-id"), "another-instance").unwrap();
        }
        sandbox.start_agent();

        // The account is there and the venv checked while `meta_data.json` is unanswered.
        wait_until("the venv checked", &sandbox, || {
            sandbox
                .agent_output()
                .lines()
                .any(|l| l.contains("installed") && l.contains("jupyterlab"))
        });
        let passphrase = state_dir.join("secrets/passphrase");
        if fresh {
            wait_until("JupyterLab's spawn", &sandbox, || spawned.exists());
            assert!(passphrase.exists(), "spawned without a stored passphrase");
            assert!(
                !state_dir.join("instance-id").exists(),
                "the identity was known"
            );
        } else {
            std::thread::sleep(Duration::from_millis(300));
            assert!(!spawned.exists(), "spawned before the identity was known");
            assert!(!passphrase.exists());
            assert_eq!(sandbox.status()["services"][0]["state"], "installing");
        }

        metadata.release_identity();
        wait_until("JupyterLab's spawn", &sandbox, || spawned.exists());
        metadata.release();
        wait_until("`running` on the console", &sandbox, || {
            console_statuses(&sandbox).iter().any(|s| s == "running")
        });
        let (posts, _) = metadata.posts();
        assert_eq!(posts, [sandbox.passphrase()], "fresh: {fresh}");
    }
}
