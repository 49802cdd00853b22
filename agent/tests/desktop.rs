//! The desktop pair with a real TigerVNC server and a real Xfce session, driven through
//! `exoagent::services::desktop::session::run` in-process: the RFB probe (banner + VncAuth offered), the window
//! manager seen by an X client, the pair ending together when the session is killed, and an
//! orderly stop on shutdown. As root, the pair runs as `nobody` with a temporary home.
//!
//! Prerequisites (Debian 12, as root): `bash tests/guacamole/setup.sh` (TigerVNC, vncpasswd,
//! Xfce, dbus-x11) and `apt-get install x11-utils` (xprop). A missing tool fails the test with
//! a message naming what installs it.
//!
//! Not exercised here: TurboVNC, VirtualGL (vendor repositories, GPU) and GNOME; their command
//! lines are unit-tested in `services::desktop::session`.

use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use exoagent::platform::procfs;
use exoagent::services::desktop::session::{self, DesktopUser, SessionSpec};
use exoagent::services::desktop::vnc::{self, DesktopError};
use exoagent::supervise::Probe;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// An upper bound for anything to happen, so a broken desktop fails instead of hanging. Never a
/// speed assertion.
const PATIENCE: Duration = Duration::from_secs(60);
/// The readiness bound the desktop service is held to.
const READY_WITHIN: Duration = Duration::from_secs(20);
/// The passphrase of the test desktops (only its first 8 characters matter to VNC).
const PASSPHRASE: &str = "exoagent-desktop-test";

/// One real desktop at a time: two Xfce sessions on two cores would skew the timings and
/// could starve each other.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false)
}

fn require_tools() {
    let setup = "run `bash tests/guacamole/setup.sh` as root (Debian 12)";
    for (tool, installer) in [
        ("Xtigervnc", setup),
        ("vncpasswd", setup),
        ("startxfce4", setup),
        ("dbus-launch", setup),
        ("xprop", "run `apt-get install x11-utils` as root"),
    ] {
        assert!(
            on_path(tool),
            "'{tool}' is not installed; {installer} before running the desktop tests"
        );
    }
}

/// A display in 50..99 with neither a lock file nor a socket.
fn free_display() -> u16 {
    (50..100)
        .find(|n| {
            !Path::new(&format!("/tmp/.X{n}-lock")).exists()
                && !Path::new(&format!("/tmp/.X11-unix/X{n}")).exists()
        })
        .expect("no free X display in 50..99")
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// The account the pair runs as: `nobody` when the tests run as root (the pair is then started
/// with its uid, gid and groups), otherwise the current user.
fn desktop_user() -> DesktopUser {
    if nix::unistd::geteuid().is_root() {
        DesktopUser::by_name("nobody").expect("no 'nobody' account")
    } else {
        DesktopUser::current().unwrap()
    }
}

/// Whether a live (non-zombie) process runs with `DISPLAY=:<display>` in its environment: the
/// server's clients, the session and whatever it started.
fn processes_on_display(display: u16) -> Vec<u32> {
    let wanted = format!("DISPLAY=:{display}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            procfs::read_stat(*pid).is_some_and(|s| !matches!(s.state, 'Z' | 'X' | 'x'))
                && std::fs::read(format!("/proc/{pid}/environ"))
                    .map(|env| env.split(|b| *b == 0).any(|var| var == wanted.as_bytes()))
                    .unwrap_or(false)
        })
        .collect()
}

/// The pid in the display's lock file (the X server), if any.
fn server_pid(display: u16) -> Option<i32> {
    std::fs::read_to_string(format!("/tmp/.X{display}-lock"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn is_live(pid: i32) -> bool {
    u32::try_from(pid)
        .ok()
        .and_then(procfs::read_stat)
        .is_some_and(|s| !matches!(s.state, 'Z' | 'X' | 'x'))
}

fn uid_of(pid: u32) -> Option<u32> {
    std::fs::metadata(format!("/proc/{pid}"))
        .ok()
        .map(|m| m.uid())
}

/// A running desktop under test. Dropping it (also when a test fails) cancels the run, aborts
/// its task (whose children are SIGKILLed when dropped) and kills anything still on its display.
struct Desktop {
    spec: SessionSpec,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), DesktopError>>>,
    started: Instant,
    _home: tempfile::TempDir,
}

impl Desktop {
    async fn start() -> Self {
        require_tools();
        // The runner's events (starts, stops, timings) in the test output; EXOAGENT_LOG
        // overrides the level.
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(
                std::env::var("EXOAGENT_LOG").unwrap_or_else(|_| "exoagent=debug".to_owned()),
            )
            .try_init();
        let mut user = desktop_user();
        let home = tempfile::Builder::new()
            .prefix("exoagent-desktop-")
            .tempdir()
            .unwrap();
        std::os::unix::fs::chown(home.path(), Some(user.uid), Some(user.gid)).unwrap();
        user.home = home.path().to_path_buf();
        let display = free_display();
        let mut spec = SessionSpec::new(user, display);
        spec.rfb_port = free_port();
        spec.desktop_name = format!("exoagent test :{display}");
        // Written by the agent's own encoding; the real Xvnc below reads it.
        vnc::write_vnc_password(
            PASSPHRASE,
            &spec.password_file,
            spec.user.uid,
            spec.user.gid,
        )
        .unwrap();
        let file = std::fs::metadata(&spec.password_file).unwrap();
        assert_eq!(file.len(), 8, "vncpasswd -f writes 8 bytes");
        assert_eq!(file.permissions().mode() & 0o777, 0o600);
        assert_eq!((file.uid(), file.gid()), (spec.user.uid, spec.user.gid));

        let shutdown = CancellationToken::new();
        let started = Instant::now();
        let task = tokio::spawn({
            let spec = spec.clone();
            let shutdown = shutdown.clone();
            async move { session::run(&spec, shutdown).await }
        });
        Self {
            spec,
            shutdown,
            task: Some(task),
            started,
            _home: home,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.spec.rfb_addr()
    }

    /// Probe until the server offers VNC authentication; the time since the start.
    async fn wait_for_rfb(&self) -> Duration {
        let probe = Probe::Rfb {
            addr: self.addr(),
            security_type: 2,
        };
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            match probe.check(Duration::from_secs(2)).await {
                Ok(()) => return self.started.elapsed(),
                Err(e) if Instant::now() >= deadline => {
                    panic!("no RFB handshake within {READY_WITHIN:?}: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// One RFB probe that must pass.
    async fn probe_once(&self) {
        Probe::Rfb {
            addr: self.addr(),
            security_type: 2,
        }
        .check(Duration::from_secs(5))
        .await
        .unwrap();
    }

    /// Ask the X server for the window manager's check window until there is one; the time
    /// since the start.
    async fn wait_for_window_manager(&self) -> Duration {
        let deadline = Instant::now() + PATIENCE;
        let mut last = String::new();
        while Instant::now() < deadline {
            let output = tokio::process::Command::new("xprop")
                .args(["-display", &format!(":{}", self.spec.display)])
                .args(["-root", "_NET_SUPPORTING_WM_CHECK"])
                .env_remove("XAUTHORITY")
                .output()
                .await
                .expect("failed to run xprop");
            let stdout = String::from_utf8_lossy(&output.stdout);
            if output.status.success() && stdout.contains("window id #") {
                return self.started.elapsed();
            }
            last = format!("{stdout}{}", String::from_utf8_lossy(&output.stderr));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no window manager within {PATIENCE:?}; xprop said: {last}");
    }

    /// The session's leader: our child that leads its own process group and has the
    /// desktop's `DISPLAY` (the server is started without one).
    fn session_leader(&self) -> Option<i32> {
        let me = nix::unistd::getpid().as_raw();
        processes_on_display(self.spec.display)
            .into_iter()
            .filter_map(|pid| i32::try_from(pid).ok())
            .find(|&pid| {
                let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                    return false;
                };
                // Fields after the command name: state, ppid, pgrp.
                let fields: Vec<&str> = stat
                    .rsplit_once(')')
                    .map(|(_, rest)| rest.split_whitespace().collect())
                    .unwrap_or_default();
                fields.get(1).and_then(|p| p.parse::<i32>().ok()) == Some(me)
                    && fields.get(2).and_then(|g| g.parse::<i32>().ok()) == Some(pid)
            })
    }

    /// Wait for `run` to return.
    async fn finished(&mut self) -> Result<(), DesktopError> {
        let task = self.task.take().expect("already finished");
        tokio::time::timeout(PATIENCE, task)
            .await
            .expect("run did not return")
            .expect("the run task panicked")
    }

    /// Assert that the X server is gone, its port closed and its lock file removed.
    fn assert_server_gone(&self, server: i32) {
        assert!(!is_live(server), "the X server {server} is still running");
        assert!(
            std::net::TcpStream::connect(self.addr()).is_err(),
            "the RFB port still accepts connections"
        );
        assert!(
            !Path::new(&format!("/tmp/.X{}-lock", self.spec.display)).exists(),
            "the X lock file is left behind"
        );
    }

    /// The processes still on the display once those that are going have gone (the session
    /// bus is stopped by dbus-launch's babysitter when it sees the X server go or gets SIGTERM,
    /// which takes it up to ~3 s), as `(pid, name)`.
    async fn leftovers(&self, allowed: &[&str]) -> Vec<(u32, String)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left: Vec<(u32, String)> = processes_on_display(self.spec.display)
                .into_iter()
                .map(|pid| {
                    let comm =
                        std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                    (pid, comm.trim().to_owned())
                })
                .collect();
            if left
                .iter()
                .all(|(_, name)| allowed.contains(&name.as_str()))
                || Instant::now() >= deadline
            {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The session's leader once it has become `xfce4-session` (dbus-launch execs startxfce4,
    /// which execs the xinitrc, which execs xfce4-session).
    async fn xfce4_session(&self) -> i32 {
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if let Some(pid) = self.session_leader() {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if comm.trim() == "xfce4-session" {
                    return pid;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the session never became xfce4-session");
    }
}

impl Drop for Desktop {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
        for pid in processes_on_display(self.spec.display) {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        if let Some(pid) = server_pid(self.spec.display) {
            if is_live(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                let deadline = Instant::now() + Duration::from_secs(2);
                while is_live(pid) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            // A SIGKILLed server leaves its lock and socket; they would only narrow the
            // displays later runs can use.
            if !is_live(pid) {
                let display = self.spec.display;
                let _ = std::fs::remove_file(format!("/tmp/.X{display}-lock"));
                let _ = std::fs::remove_file(format!("/tmp/.X11-unix/X{display}"));
            }
        }
    }
}

/// ssh-agent and gpg-agent are started by xfce4-session in their own sessions and killed by it
/// only on a real logout; when the session is stopped with SIGTERM they outlive it.
const AGENTS: [&str; 2] = ["ssh-agent", "gpg-agent"];

#[tokio::test]
async fn real_desktop_serves_vnc_auth_shows_a_window_manager_and_stops_on_shutdown() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut desktop = Desktop::start().await;
    let to_rfb = desktop.wait_for_rfb().await;
    let to_wm = desktop.wait_for_window_manager().await;
    eprintln!(
        "desktop :{} ready: RFB handshake (VncAuth offered) after {to_rfb:?}, window manager \
         after {to_wm:?}",
        desktop.spec.display
    );

    // Both halves run as the desktop user.
    let server = server_pid(desktop.spec.display).expect("no X lock file");
    assert_eq!(
        uid_of(server as u32),
        Some(desktop.spec.user.uid),
        "server uid"
    );
    let session = desktop.session_leader().expect("no session leader");
    assert_eq!(
        uid_of(session as u32),
        Some(desktop.spec.user.uid),
        "session uid"
    );

    // Probing over and over neither authenticates nor gets loopback blacklisted (by default
    // TigerVNC refuses an address after 5 connections closed before authentication).
    let probe = Probe::Rfb {
        addr: desktop.addr(),
        security_type: 2,
    };
    for _ in 0..12 {
        probe.check(Duration::from_secs(5)).await.unwrap();
    }
    // Only VNC authentication is offered: no unauthenticated access.
    let none = Probe::Rfb {
        addr: desktop.addr(),
        security_type: 1,
    };
    let err = none.check(Duration::from_secs(5)).await.unwrap_err();
    assert_eq!(err.reason(), "probe-security-type-missing", "{err}");
    assert!(err.to_string().contains("[2]"), "{err}");

    let asked = Instant::now();
    desktop.shutdown.cancel();
    desktop.finished().await.expect("shutdown is not an error");
    eprintln!("desktop stopped {:?} after shutdown", asked.elapsed());
    desktop.assert_server_gone(server);
    let left = desktop.leftovers(&AGENTS).await;
    assert!(
        left.iter().all(|(_, name)| AGENTS.contains(&name.as_str())),
        "left on the display after shutdown: {left:?}"
    );
    if !left.is_empty() {
        eprintln!("outlived the shutdown (xfce4-session's agents): {left:?}");
    }
}

#[tokio::test]
async fn logging_out_ends_the_pair_and_leaves_nothing_behind() {
    let _turn = ONE_AT_A_TIME.lock().await;
    assert!(
        on_path("xfce4-session-logout"),
        "'xfce4-session-logout' is not installed; run `bash tests/guacamole/setup.sh` as root"
    );
    let mut desktop = Desktop::start().await;
    desktop.wait_for_rfb().await;
    desktop.wait_for_window_manager().await;
    let server = server_pid(desktop.spec.display).expect("no X lock file");
    let session = desktop.xfce4_session().await;
    // Let the session finish starting its clients, as a person would before logging out.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // What the "Log Out" button does, over the session's own bus, as the desktop user.
    let environ = std::fs::read(format!("/proc/{session}/environ")).unwrap();
    let bus = environ
        .split(|b| *b == 0)
        .filter_map(|var| std::str::from_utf8(var).ok())
        .find_map(|var| var.strip_prefix("DBUS_SESSION_BUS_ADDRESS="))
        .expect("the session has no bus address")
        .to_owned();
    let logged_out = Instant::now();
    let status = tokio::process::Command::new("xfce4-session-logout")
        .args(["--logout", "--fast"])
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", &desktop.spec.user.home)
        .env("DISPLAY", format!(":{}", desktop.spec.display))
        .env("DBUS_SESSION_BUS_ADDRESS", bus)
        .uid(desktop.spec.user.uid)
        .gid(desktop.spec.user.gid)
        .status()
        .await
        .unwrap();
    assert!(status.success(), "xfce4-session-logout: {status}");

    let err = desktop.finished().await.unwrap_err();
    eprintln!(
        "pair ended {:?} after logging out: {err}",
        logged_out.elapsed()
    );
    assert_eq!(err.reason(), "desktop-session-exited", "{err}");
    assert!(err.to_string().contains("exit status: 0"), "{err}");
    desktop.assert_server_gone(server);
    let left = desktop.leftovers(&[]).await;
    assert!(
        left.is_empty(),
        "left on the display after logout: {left:?}"
    );
}

#[tokio::test]
async fn killing_the_session_group_ends_the_pair_with_session_exited() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut desktop = Desktop::start().await;
    desktop.wait_for_rfb().await;
    desktop.wait_for_window_manager().await;
    let server = server_pid(desktop.spec.display).expect("no X lock file");
    let session = desktop.session_leader().expect("no session leader");

    let killed = Instant::now();
    killpg(Pid::from_raw(session), Signal::SIGKILL).unwrap();
    let err = desktop.finished().await.unwrap_err();
    eprintln!(
        "pair ended {:?} after the session's group was SIGKILLed: {err}",
        killed.elapsed()
    );
    assert_eq!(err.reason(), "desktop-session-exited", "{err}");
    assert!(err.to_string().contains("startxfce4"), "{err}");
    assert!(err.to_string().contains("SIGKILL"), "{err}");
    desktop.assert_server_gone(server);
    // SIGKILL gives dbus-launch's babysitter (in the session's group) no chance to stop the
    // session bus, so the bus and its activated services outlive the pair; the fixture kills
    // them. Shown, not asserted.
    let left = desktop.leftovers(&[]).await;
    eprintln!("outlived the SIGKILL: {left:?}");
}

#[tokio::test]
async fn a_taken_display_or_port_is_refused_without_touching_the_running_desktop() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut desktop = Desktop::start().await;
    desktop.wait_for_rfb().await;
    let server = server_pid(desktop.spec.display).expect("no X lock file");

    // A second desktop on the same display (another port) must not steal the lock.
    let mut second = desktop.spec.clone();
    second.rfb_port = free_port();
    let err = session::run(&second, CancellationToken::new())
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "desktop-display-in-use", "{err}");
    // And one on the same port (another display) must not start a second server.
    let mut third = desktop.spec.clone();
    third.display = free_display();
    let err = session::run(&third, CancellationToken::new())
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "desktop-port-in-use", "{err}");
    assert!(is_live(server));
    desktop.probe_once().await;

    desktop.shutdown.cancel();
    desktop.finished().await.unwrap();
    desktop.assert_server_gone(server);
}
