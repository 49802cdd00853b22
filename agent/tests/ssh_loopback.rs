//! guacd's address for this machine's sshd (`services::guacamole::ssh_loopback`), against the
//! real `sshd -T` (OpenSSH's own reading of a config file written here) and the real `ip` in a
//! network namespace each test creates: the dedicated address and its quick-ACK route when
//! sshd treats that address as 127.0.0.1, nothing changed and the reason otherwise.
//! Needs root (network namespaces, `sshd -T`); under `CI=true` a missing root fails the test.

use std::net::IpAddr;
use std::path::Path;
use std::process::Command;

use exoagent::services::guacamole::ssh_loopback::{LoopbackError, SshLoopback, DEDICATED};

/// Whether the test can run: root. Outside CI a non-root run says so and skips.
fn can_run(name: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{name}: needs root (network namespaces, sshd -T), and CI runs as root"
    );
    eprintln!("skipped {name}: needs root (network namespaces, sshd -T)");
    false
}

/// A network namespace of the test's own, deleted when dropped.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("exo-sshlo-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Self(name)
    }

    fn loopback(&self, sshd_config: &Path) -> SshLoopback {
        SshLoopback::new(
            vec!["ip".into(), "-n".into(), self.0.clone()],
            vec![
                "/usr/sbin/sshd".into(),
                "-f".into(),
                sshd_config.to_string_lossy().into_owned(),
            ],
        )
    }

    /// What `choose` makes of `sshd_config` for exouser on port 22.
    fn choose(&self, sshd_config: &Path) -> Result<IpAddr, LoopbackError> {
        runtime().block_on(self.loopback(sshd_config).choose("exouser", 22))
    }

    /// The local table's route for the dedicated address, if any.
    fn dedicated_route(&self) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.0, "-4", "route", "show", "table", "local"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with(&format!("local {DEDICATED} ")))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(argv: &[&str]) {
    let status = Command::new(argv[0]).args(&argv[1..]).status().unwrap();
    assert!(status.success(), "{argv:?}: {status}");
}

/// An sshd config file (with a host key of its own) ending in `extra`.
fn sshd_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let key = dir.join("host_ed25519");
    if !key.exists() {
        run(&[
            "ssh-keygen",
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-f",
            key.to_str().unwrap(),
        ]);
    }
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "HostKey {}\nPidFile none\nUsePAM no\n{extra}",
            key.display()
        ),
    )
    .unwrap();
    config
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn sshd_that_treats_it_as_localhost_gets_the_dedicated_address_and_its_route() {
    if !can_run("dedicated") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::new("ok");
    let config = sshd_config(dir.path(), "PasswordAuthentication yes\n");
    let chosen = ns.choose(&config).unwrap();
    assert_eq!(chosen, IpAddr::V4(DEDICATED));
    let route = ns.dedicated_route();
    assert!(route.contains("quickack 1"), "route: {route:?}");
    assert!(
        route.contains(&format!("src {DEDICATED}")),
        "route: {route:?}"
    );
    // Again: `replace`, so a second start neither fails nor adds a second route.
    ns.choose(&config).unwrap();
    assert_eq!(ns.dedicated_route().lines().count(), 1);

    // A connection to the address comes from it: sshd's end has the same route (quick ACKs
    // on both sockets). Checked with a listener and a client inside the namespace.
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, "python3", "-c"])
        .arg(format!(
            "import socket\nl=socket.socket(); l.bind(('{DEDICATED}',0)); l.listen(1)\n\
             c=socket.create_connection(l.getsockname()); s,peer=l.accept()\n\
             print(c.getsockname()[0], peer[0])"
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{DEDICATED} {DEDICATED}")
    );
}

#[test]
fn a_match_block_for_127_0_0_1_keeps_127_0_0_1_and_adds_no_route() {
    if !can_run("match") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::new("match");
    // Passwords from 127.0.0.1 only: guacd's login would fail from the dedicated address.
    let config = sshd_config(
        dir.path(),
        "PasswordAuthentication no\nMatch Address 127.0.0.1\n    PasswordAuthentication yes\n",
    );
    let err = ns.choose(&config).unwrap_err();
    assert!(
        matches!(&err, LoopbackError::SshdTreatsItDifferently { setting } if setting == "passwordauthentication"),
        "{err:?}"
    );
    assert_eq!(err.reason(), "sshd_config_differs");
    assert_eq!(ns.dedicated_route(), "", "nothing changed");
}

#[test]
fn sshd_listening_on_127_0_0_1_only_keeps_127_0_0_1() {
    if !can_run("listen") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::new("listen");
    let config = sshd_config(dir.path(), "ListenAddress 127.0.0.1\n");
    let err = ns.choose(&config).unwrap_err();
    assert_eq!(err.reason(), "sshd_not_listening", "{err}");
    assert!(err.to_string().contains("127.0.0.1:22"), "{err}");
    // Listening there on another port than the SSH port is no better.
    let config = sshd_config(dir.path(), "ListenAddress 0.0.0.0:2222\n");
    let err = ns.choose(&config).unwrap_err();
    assert_eq!(err.reason(), "sshd_not_listening", "{err}");
    assert_eq!(ns.dedicated_route(), "");
}

#[test]
fn an_unreadable_sshd_config_or_a_refused_route_keeps_127_0_0_1() {
    if !can_run("unreadable") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::new("bad");
    let missing = dir.path().join("no-such-config");
    let err = ns.choose(&missing).unwrap_err();
    assert_eq!(err.reason(), "sshd_config_unreadable", "{err}");
    assert!(err.to_string().contains("no-such-config"), "{err}");

    // A namespace that does not exist: `ip` refuses, after both checks passed.
    let config = sshd_config(dir.path(), "");
    let gone = SshLoopback::new(
        vec!["ip".into(), "-n".into(), "exo-sshlo-no-such-netns".into()],
        vec![
            "/usr/sbin/sshd".into(),
            "-f".into(),
            config.to_string_lossy().into_owned(),
        ],
    );
    let err = runtime().block_on(gone.choose("exouser", 22)).unwrap_err();
    assert_eq!(err.reason(), "route_refused", "{err}");
}
