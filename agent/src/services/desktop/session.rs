//! One desktop as one supervised process: start the VNC server (an X server whose screen is
//! served over RFB on loopback), wait until its RFB port accepts connections, start the desktop
//! session on its display, and keep the two together: when either ends the other is stopped and
//! [`run`] returns an error naming which one ended, so the per-service shim restarts the pair
//! (logging out of the desktop ends the session, and therefore the pair). On shutdown the
//! session is stopped first, then the server.
//!
//! Each of the two runs in its own process group (so a stop reaches the session's helpers too)
//! with a clean environment, and gets SIGTERM if this process dies without stopping it (the
//! parent-death signal; it is tied to the thread that spawned the child, which for the CLI is
//! the main thread, alive until the process ends).
//!
//! TigerVNC is exercised for real by `agent/tests/desktop.rs`; the TurboVNC, VirtualGL and GNOME
//! command lines are unit-tested only (no vendor repositories and no GPU in the test
//! environment).

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::vnc::DesktopError;
use crate::platform::privileges::{DropTo, PrivilegeError};
use crate::platform::process_group;
use crate::platform::procfs;

/// How long the server gets to accept connections on its RFB port (TigerVNC takes 0.3–0.5 s).
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a stopped server or session gets between SIGTERM and SIGKILL.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(5);
/// How long to wait for a SIGKILLed leader to be reaped.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// The polling interval for the RFB port and for process groups emptying.
const POLL: Duration = Duration::from_millis(50);
/// Where every X server keeps its lock file and socket directory.
const X_TMP_DIR: &str = "/tmp";
/// The session's `PATH`: the usual Debian/Ubuntu/EL user path (the agent's own, possibly
/// minimal, `PATH` is not passed on).
const SESSION_PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/local/games:/usr/games";
/// TurboVNC's X server (vendor packages install under `/opt/TurboVNC`).
const TURBOVNC_XVNC: &str = "/opt/TurboVNC/bin/Xvnc";
/// VirtualGL's launcher.
const VGLRUN: &str = "/opt/VirtualGL/bin/vglrun";

/// The desktop environment started in the session (also `--environment` and the
/// `environment` key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DesktopEnvironment {
    /// Xfce (`startxfce4`): light, starts in about 2 s.
    #[default]
    Xfce,
    /// GNOME (`gnome-session`), as Exosphere installs it. Not exercised in tests.
    Gnome,
}

/// The VNC server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VncServer {
    /// TigerVNC's `Xtigervnc` from the distribution.
    #[default]
    TigerVnc,
    /// TurboVNC's `/opt/TurboVNC/bin/Xvnc` from the vendor repository; with `virtualgl`, the
    /// session runs under `vglrun -d egl` (VirtualGL's EGL back end, for headless GPU VMs with
    /// no 3D X server). Only the command lines are tested: neither TurboVNC, VirtualGL nor a
    /// GPU is available in the test environment.
    TurboVnc {
        /// Run the session under VirtualGL.
        virtualgl: bool,
    },
}

/// Which half of the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The VNC server.
    Server,
    /// The desktop session.
    Session,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Server => "VNC server",
            Self::Session => "desktop session",
        })
    }
}

/// The size of the virtual screen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Width in pixels.
    pub width: u16,
    /// Height in pixels.
    pub height: u16,
}

impl Default for Geometry {
    fn default() -> Self {
        Self {
            width: 1280,
            height: 800,
        }
    }
}

impl fmt::Display for Geometry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

/// A geometry that is not `WIDTHxHEIGHT` with both between 64 and 8192.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid geometry '{0}': expected WIDTHxHEIGHT, each 64..=8192, such as 1280x800")]
pub struct GeometryError(pub String);

impl FromStr for Geometry {
    type Err = GeometryError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || GeometryError(text.to_owned());
        let (width, height) = text.split_once(['x', 'X']).ok_or_else(invalid)?;
        let side = |s: &str| {
            s.parse::<u16>()
                .ok()
                .filter(|n| (64..=8192).contains(n))
                .ok_or_else(invalid)
        };
        Ok(Self {
            width: side(width)?,
            height: side(height)?,
        })
    }
}

/// The account the desktop belongs to, with the login shell a session needs: the user
/// database entry of [`crate::platform::users`] (name for `USER`/`LOGNAME`, home for `HOME` and
/// the working directory, shell for `SHELL`).
pub type DesktopUser = crate::platform::users::UserEntry;

impl DesktopUser {
    /// The account this process runs as (its effective uid), from the user database.
    pub fn current() -> Result<Self, DesktopError> {
        let uid = nix::unistd::geteuid();
        match nix::unistd::User::from_uid(uid) {
            Ok(Some(user)) => Ok(Self::from(user)),
            Ok(None) => Err(DesktopError::UserLookup {
                user: format!("uid {uid}"),
                detail: "not in the user database".to_owned(),
            }),
            Err(e) => Err(DesktopError::UserLookup {
                user: format!("uid {uid}"),
                detail: e.to_string(),
            }),
        }
    }

    /// The account named `name`, from the user database.
    pub fn by_name(name: &str) -> Result<Self, DesktopError> {
        match nix::unistd::User::from_name(name) {
            Ok(Some(user)) => Ok(Self::from(user)),
            Ok(None) => Err(DesktopError::UserLookup {
                user: format!("'{name}'"),
                detail: "not in the user database".to_owned(),
            }),
            Err(e) => Err(DesktopError::UserLookup {
                user: format!("'{name}'"),
                detail: e.to_string(),
            }),
        }
    }
}

/// Everything [`run`] needs to know about one desktop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSpec {
    /// The X display number `N` (`:N`).
    pub display: u16,
    /// The RFB port, on loopback only.
    pub rfb_port: u16,
    /// The virtual screen size.
    pub geometry: Geometry,
    /// Bits per pixel of the virtual screen (24 for guacd).
    pub depth: u8,
    /// The VNC password file (see [`super::vnc::write_vnc_password`]).
    pub password_file: PathBuf,
    /// The desktop name VNC viewers show.
    pub desktop_name: String,
    /// The desktop environment.
    pub environment: DesktopEnvironment,
    /// The VNC server.
    pub server: VncServer,
    /// The account the pair runs as. When this process runs as another user, it must be root
    /// and the pair is started with this user's uid, gid and groups; the shim normally starts
    /// this process as the user already.
    pub user: DesktopUser,
    /// `LANG` of the session.
    pub lang: String,
    /// `XDG_RUNTIME_DIR` of the session, when the user has one (`/run/user/<uid>`, created by
    /// logind for logged-in users and lingering ones).
    pub runtime_dir: Option<PathBuf>,
    /// How long the server gets to accept connections on the RFB port.
    pub ready_timeout: Duration,
    /// How long a stopped server or session gets between SIGTERM and SIGKILL.
    pub stop_grace: Duration,
}

impl SessionSpec {
    /// A TigerVNC + Xfce desktop for `user` on display `display` and RFB port `5900 + display`,
    /// 1280x800x24, the password file `~/.vnc/passwd`, named after the host, `LANG` from this
    /// process (else `C.UTF-8`), `XDG_RUNTIME_DIR` when `/run/user/<uid>` exists.
    pub fn new(user: DesktopUser, display: u16) -> Self {
        let runtime_dir = PathBuf::from(format!("/run/user/{}", user.uid));
        let desktop_name = nix::unistd::gethostname()
            .ok()
            .and_then(|name| name.into_string().ok())
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "desktop".to_owned());
        Self {
            display,
            rfb_port: 5900u16.saturating_add(display),
            geometry: Geometry::default(),
            depth: 24,
            password_file: user.home.join(".vnc/passwd"),
            desktop_name,
            environment: DesktopEnvironment::default(),
            server: VncServer::default(),
            lang: std::env::var("LANG")
                .ok()
                .filter(|lang| !lang.is_empty())
                .unwrap_or_else(|| "C.UTF-8".to_owned()),
            runtime_dir: runtime_dir.is_dir().then_some(runtime_dir),
            user,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            stop_grace: DEFAULT_STOP_GRACE,
        }
    }

    /// Where the server listens: loopback only (guacd connects there).
    pub fn rfb_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.rfb_port))
    }

    /// The server's command line.
    ///
    /// Both servers listen on loopback only and require VNC authentication with the password
    /// file. Every connection is treated as shared (`-AlwaysShared`): guacd opens one connection
    /// per browser session, and a second tab, a reconnect racing the old connection, or a
    /// native viewer asking for exclusive access must not disconnect the others (TigerVNC's
    /// default, `DisconnectClients=1`, drops existing clients for a non-shared connection).
    ///
    /// TigerVNC also runs with `-UseBlacklist=0`: it counts every connection closed before
    /// authentication (a TCP or RFB readiness probe, a browser tab closed mid-handshake) as a
    /// failure and, after 5, refuses the address for 10 s and longer. Every legitimate client
    /// (guacd, the agent's probes) comes from 127.0.0.1, so the blacklist would only ever lock
    /// out the desktop's own users; the server is reachable from loopback only.
    /// The TurboVNC flags follow its `Xvnc.man`; they are not exercised in tests.
    pub fn server_argv(&self) -> Vec<String> {
        let display = format!(":{}", self.display);
        let port = self.rfb_port.to_string();
        let password_file = self.password_file.to_string_lossy().into_owned();
        let geometry = self.geometry.to_string();
        let depth = self.depth.to_string();
        let name = self.desktop_name.clone();
        let argv: Vec<&str> = match self.server {
            VncServer::TigerVnc => vec![
                "Xtigervnc",
                &display,
                "-rfbport",
                &port,
                "-localhost",
                "-SecurityTypes",
                "VncAuth",
                "-PasswordFile",
                &password_file,
                "-geometry",
                &geometry,
                "-depth",
                &depth,
                "-desktop",
                &name,
                "-AlwaysShared",
                "-UseBlacklist=0",
            ],
            VncServer::TurboVnc { .. } => vec![
                TURBOVNC_XVNC,
                &display,
                "-rfbport",
                &port,
                "-localhost",
                "-securitytypes",
                "VNC",
                "-rfbauth",
                &password_file,
                "-geometry",
                &geometry,
                "-depth",
                &depth,
                "-desktop",
                &name,
                "-alwaysshared",
            ],
        };
        argv.into_iter().map(str::to_owned).collect()
    }

    /// The session's command line: the desktop environment under `dbus-launch
    /// --exit-with-session` (so the session bus ends with the session instead of outliving
    /// it), and with VirtualGL under `vglrun -d egl` (innermost, so only the desktop's
    /// processes load VirtualGL's interposer, not the bus daemon).
    pub fn session_argv(&self) -> Vec<String> {
        let mut argv = vec!["dbus-launch", "--exit-with-session"];
        if let VncServer::TurboVnc { virtualgl: true } = self.server {
            argv.extend([VGLRUN, "-d", "egl"]);
        }
        argv.push(match self.environment {
            DesktopEnvironment::Xfce => "startxfce4",
            DesktopEnvironment::Gnome => "gnome-session",
        });
        argv.into_iter().map(str::to_owned).collect()
    }

    /// The server's complete environment: the user's basics and nothing inherited.
    pub fn server_env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            (
                "HOME".to_owned(),
                self.user.home.to_string_lossy().into_owned(),
            ),
            ("USER".to_owned(), self.user.name.clone()),
            ("LOGNAME".to_owned(), self.user.name.clone()),
            (
                "SHELL".to_owned(),
                self.user.shell.to_string_lossy().into_owned(),
            ),
            ("PATH".to_owned(), SESSION_PATH.to_owned()),
            ("LANG".to_owned(), self.lang.clone()),
        ];
        if let Some(dir) = &self.runtime_dir {
            env.push((
                "XDG_RUNTIME_DIR".to_owned(),
                dir.to_string_lossy().into_owned(),
            ));
        }
        env
    }

    /// The session's complete environment: the server's plus `DISPLAY` and
    /// `XDG_SESSION_TYPE=x11` (without it GNOME may try Wayland).
    pub fn session_env(&self) -> Vec<(String, String)> {
        let mut env = self.server_env();
        env.push(("DISPLAY".to_owned(), format!(":{}", self.display)));
        env.push(("XDG_SESSION_TYPE".to_owned(), "x11".to_owned()));
        env
    }

    /// The home directory when it exists, else `/` (a missing home must not stop the desktop).
    fn working_dir(&self) -> PathBuf {
        if self.user.home.is_dir() {
            self.user.home.clone()
        } else {
            PathBuf::from("/")
        }
    }
}

/// Run the desktop until one half ends or `shutdown` is cancelled (the CLI cancels it on
/// SIGTERM and SIGINT).
///
/// 1. Remove `/tmp/.X<N>-lock` and `/tmp/.X11-unix/X<N>` if no live process holds the lock
///    (a crashed server leaves them, and the next server would refuse the display); a live
///    holder is [`DesktopError::DisplayInUse`].
/// 2. Refuse a taken RFB port, start the server, and wait (up to `ready_timeout`) until its
///    RFB port accepts a connection.
/// 3. Start the session, then wait: when either ends, stop the other (SIGTERM to its group,
///    SIGKILL after `stop_grace`) and return which one ended with its exit status. On
///    `shutdown`, stop the session first (so it can save state while its display still
///    exists), then the server, and return `Ok`.
pub async fn run(spec: &SessionSpec, shutdown: CancellationToken) -> Result<(), DesktopError> {
    clear_stale_x_files(Path::new(X_TMP_DIR), spec.display)?;
    // Without it TigerVNC starts anyway and refuses every login; say so up front.
    if !spec.password_file.is_file() {
        return Err(DesktopError::PasswordMissing {
            path: spec.password_file.clone(),
        });
    }
    let addr = spec.rfb_addr();
    if accepts_connection(addr).await {
        return Err(DesktopError::PortInUse { addr });
    }
    let identity = identity_for(&spec.user)?;
    let cwd = spec.working_dir();
    let pair = Pair {
        server: Launch {
            role: Role::Server,
            argv: spec.server_argv(),
            env: spec.server_env(),
            cwd: cwd.clone(),
        },
        session: Launch {
            role: Role::Session,
            argv: spec.session_argv(),
            env: spec.session_env(),
            cwd,
        },
        rfb_addr: addr,
        ready_timeout: spec.ready_timeout,
        stop_grace: spec.stop_grace,
        identity,
    };
    tracing::info!(
        target: "exoagent::desktop",
        display = spec.display,
        rfb = %addr,
        user = %spec.user.name,
        "starting the desktop"
    );
    pair.run(shutdown).await
}

/// Remove the lock file and socket of display `display` under `tmp` unless a live X server
/// holds the lock. An unreadable or garbled lock counts as stale (X servers write the pid as
/// ten right-aligned digits and a newline), and so does one whose pid now belongs to a process
/// that is not an X server (a lock kept in a persistent `/tmp` across a reboot).
fn clear_stale_x_files(tmp: &Path, display: u16) -> Result<(), DesktopError> {
    let lock = tmp.join(format!(".X{display}-lock"));
    let socket = tmp.join(format!(".X11-unix/X{display}"));
    if let Ok(text) = std::fs::read_to_string(&lock) {
        if let Some(pid) = text.trim().parse::<i32>().ok().filter(|pid| *pid > 0) {
            if is_live_x_server(pid) {
                return Err(DesktopError::DisplayInUse { display, pid, lock });
            }
        }
    }
    for path in [lock, socket] {
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::info!(
                target: "exoagent::desktop",
                path = %path.display(),
                "removed a stale X file"
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(DesktopError::StaleXFile { path, source }),
        }
    }
    Ok(())
}

/// Whether `pid` is a running process (not a zombie). Uses `/proc`, which answers for any
/// user's process, unlike `kill(pid, 0)` without privileges.
fn process_is_live(pid: i32) -> bool {
    u32::try_from(pid)
        .ok()
        .and_then(procfs::read_stat)
        .is_some_and(|stat| !matches!(stat.state, 'Z' | 'X' | 'x'))
}

/// Whether `pid` is a running X server: every X server's command name starts with `X`
/// (`Xtigervnc`, `Xvnc`, `Xorg`, `Xvfb`, `Xwayland`).
fn is_live_x_server(pid: i32) -> bool {
    process_is_live(pid)
        && std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|comm| comm.starts_with('X'))
}

/// Whether something accepts a TCP connection on `addr` within a second.
async fn accepts_connection(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

/// The identity to switch the pair to: `None` when this process already runs as `user`;
/// otherwise it must be root.
fn identity_for(user: &DesktopUser) -> Result<Option<DropTo>, DesktopError> {
    let euid = nix::unistd::geteuid();
    if euid.as_raw() == user.uid {
        return Ok(None);
    }
    let switch_err = |detail: String| DesktopError::SwitchUser {
        user: user.name.clone(),
        uid: user.uid,
        detail,
    };
    if !euid.is_root() {
        return Err(switch_err(format!(
            "this process runs as uid {euid}, not as the user nor as root"
        )));
    }
    let identity = DropTo::with_groups_of(&user.name, user.uid, user.gid).map_err(|e| match e {
        PrivilegeError::NulInName { .. } => switch_err("the user name contains NUL".to_owned()),
        PrivilegeError::Groups { source, .. } => {
            switch_err(format!("failed to list the user's groups: {source}"))
        }
    })?;
    Ok(Some(identity))
}

/// One half of the pair, before it is started.
#[derive(Debug, Clone)]
struct Launch {
    role: Role,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: PathBuf,
}

impl Launch {
    /// The command line as shown in errors (no secret is ever on it).
    fn shown(&self) -> String {
        self.argv.join(" ")
    }

    /// Start it in its own process group with exactly `env`, stdin from /dev/null and the
    /// output inherited (the shim logs it).
    fn spawn(&self, identity: Option<&DropTo>) -> Result<Member, DesktopError> {
        let spawn_err = |source| DesktopError::Spawn {
            role: self.role,
            program: self.shown(),
            source,
        };
        let Some((program, args)) = self.argv.split_first() else {
            return Err(spawn_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "empty command line",
            )));
        };
        let mut command = tokio::process::Command::new(program);
        command
            .args(args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.cwd)
            .stdin(Stdio::null())
            .kill_on_drop(false);
        let identity = identity.cloned();
        let parent = nix::unistd::getpid().as_raw();
        // SAFETY: the closure only makes async-signal-safe system calls (setpgid, signal,
        // setgroups, setgid, setuid, prctl, getppid) on data prepared before the fork.
        unsafe {
            command.pre_exec(move || {
                if libc::setpgid(0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // Dispositions ignored by whoever started us must not leak into the desktop.
                for signal in [libc::SIGHUP, libc::SIGINT, libc::SIGQUIT, libc::SIGTERM] {
                    libc::signal(signal, libc::SIG_DFL);
                }
                if let Some(identity) = &identity {
                    identity.apply()?;
                }
                // After the credential change, which clears the parent-death signal: if this
                // process is SIGKILLed, the pair still goes down instead of holding the display
                // and the port against the restarted runner.
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGTERM as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    // The parent died before the signal was armed.
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(spawn_err)?;
        let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) else {
            return Err(spawn_err(io::Error::other("the child has no pid")));
        };
        tracing::info!(
            target: "exoagent::desktop",
            role = %self.role,
            pid,
            command = %self.shown(),
            "started"
        );
        Ok(Member {
            role: self.role,
            child,
            pgid: Pid::from_raw(pid),
            stopped: false,
        })
    }
}

/// A started half: its leader (our child) and its process group.
#[derive(Debug)]
struct Member {
    role: Role,
    child: tokio::process::Child,
    pgid: Pid,
    stopped: bool,
}

impl Member {
    /// Stop the group: SIGTERM, then wait until the leader has ended and no live process is
    /// left in the group; SIGKILL the group after `grace`. Also sweeps the group of a leader
    /// that already ended (the session's helpers outlive `startxfce4`).
    async fn stop(&mut self, grace: Duration) {
        if self.stopped {
            return;
        }
        let asked = Instant::now();
        let (child, pgid) = (&mut self.child, self.pgid);
        let gone = async {
            loop {
                let leader_done = !matches!(child.try_wait(), Ok(None));
                if leader_done && !group_has_live_members(pgid) {
                    return;
                }
                tokio::time::sleep(POLL).await;
            }
        };
        match process_group::terminate(pgid, grace, gone).await {
            Ok(process_group::Stopped::Terminated) => {
                tracing::debug!(
                    target: "exoagent::desktop",
                    role = %self.role,
                    elapsed_ms = asked.elapsed().as_millis() as u64,
                    "stopped"
                );
            }
            Ok(process_group::Stopped::Killed) => {
                tracing::warn!(
                    target: "exoagent::desktop",
                    role = %self.role,
                    pgid = self.pgid.as_raw(),
                    "still running after SIGTERM; sending SIGKILL"
                );
                let _ = tokio::time::timeout(KILL_WAIT, self.child.wait()).await;
            }
            // ESRCH (the group is gone) is success already; EPERM cannot happen for our own
            // children.
            Err(_) => {}
        }
        self.stopped = true;
    }
}

impl Drop for Member {
    /// A `run` future dropped midway (a test's runtime ending, a panic) must not leave an X
    /// server or a desktop behind.
    fn drop(&mut self) {
        if !self.stopped {
            // ESRCH (the group is gone) is the goal; EPERM cannot happen for our own children.
            let _ = process_group::signal(self.pgid, Signal::SIGKILL);
        }
    }
}

/// Whether any process of group `pgid` is still running. Zombies do not count: the session's
/// orphans are reaped by the shim (a subreaper) or init, not by us, and may linger unreaped.
fn group_has_live_members(pgid: Pid) -> bool {
    if !process_group::exists(pgid) {
        return false;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        // Without /proc, trust kill(): the group has members.
        return true;
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(procfs::read_stat)
        .any(|stat| stat.pgrp == pgid.as_raw() && !matches!(stat.state, 'Z' | 'X' | 'x'))
}

/// Both halves, ready to run.
#[derive(Debug)]
struct Pair {
    server: Launch,
    session: Launch,
    rfb_addr: SocketAddr,
    ready_timeout: Duration,
    stop_grace: Duration,
    identity: Option<DropTo>,
}

impl Pair {
    async fn run(self, shutdown: CancellationToken) -> Result<(), DesktopError> {
        let grace = self.stop_grace;
        let launched = Instant::now();
        let mut server = self.server.spawn(self.identity.as_ref())?;

        enum Start {
            Ready,
            TimedOut,
            Exited(io::Result<ExitStatus>),
            Shutdown,
        }
        let start = tokio::select! {
            status = server.child.wait() => Start::Exited(status),
            ready = wait_until_accepting(self.rfb_addr, self.ready_timeout) => {
                if ready { Start::Ready } else { Start::TimedOut }
            }
            () = shutdown.cancelled() => Start::Shutdown,
        };
        match start {
            Start::Ready => {}
            Start::TimedOut => {
                server.stop(grace).await;
                return Err(DesktopError::ServerTimeout {
                    addr: self.rfb_addr,
                    timeout: self.ready_timeout,
                });
            }
            Start::Exited(status) => {
                server.stop(grace).await;
                return Err(ended(&self.server, status));
            }
            Start::Shutdown => {
                server.stop(grace).await;
                return Ok(());
            }
        }
        tracing::info!(
            target: "exoagent::desktop",
            rfb = %self.rfb_addr,
            elapsed_ms = launched.elapsed().as_millis() as u64,
            "the VNC server accepts connections"
        );

        let mut session = match self.session.spawn(self.identity.as_ref()) {
            Ok(session) => session,
            Err(e) => {
                server.stop(grace).await;
                return Err(e);
            }
        };
        enum End {
            Server(io::Result<ExitStatus>),
            Session(io::Result<ExitStatus>),
            Shutdown,
        }
        let end = tokio::select! {
            status = server.child.wait() => End::Server(status),
            status = session.child.wait() => End::Session(status),
            () = shutdown.cancelled() => End::Shutdown,
        };
        // In every case the session goes first: it may still want its display to save state.
        session.stop(grace).await;
        server.stop(grace).await;
        match end {
            End::Shutdown => {
                tracing::info!(target: "exoagent::desktop", "desktop stopped on request");
                Ok(())
            }
            End::Server(status) => Err(ended(&self.server, status)),
            End::Session(status) => Err(ended(&self.session, status)),
        }
    }
}

/// The error for `launch` having ended with `status`.
fn ended(launch: &Launch, status: io::Result<ExitStatus>) -> DesktopError {
    match (launch.role, status) {
        (Role::Server, Ok(status)) => DesktopError::ServerExited {
            program: launch.shown(),
            status,
        },
        (Role::Session, Ok(status)) => DesktopError::SessionExited {
            program: launch.shown(),
            status,
        },
        (role, Err(source)) => DesktopError::Wait { role, source },
    }
}

/// Poll `addr` until it accepts a connection (true) or `timeout` passes (false).
async fn wait_until_accepting(addr: SocketAddr, timeout: Duration) -> bool {
    let poll = async {
        loop {
            if let Ok(Ok(_)) = tokio::time::timeout(POLL * 10, TcpStream::connect(addr)).await {
                return;
            }
            tokio::time::sleep(POLL).await;
        }
    };
    tokio::time::timeout(timeout, poll).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn user() -> DesktopUser {
        DesktopUser {
            name: "ada".into(),
            uid: 1001,
            gid: 1001,
            home: PathBuf::from("/home/ada"),
            shell: PathBuf::from("/bin/bash"),
        }
    }

    fn spec(server: VncServer, environment: DesktopEnvironment) -> SessionSpec {
        SessionSpec {
            display: 3,
            rfb_port: 5913,
            geometry: Geometry {
                width: 1600,
                height: 900,
            },
            depth: 24,
            password_file: PathBuf::from("/home/ada/.vnc/passwd"),
            desktop_name: "ada's desktop".into(),
            environment,
            server,
            user: user(),
            lang: "en_US.UTF-8".into(),
            runtime_dir: Some(PathBuf::from("/run/user/1001")),
            ready_timeout: DEFAULT_READY_TIMEOUT,
            stop_grace: DEFAULT_STOP_GRACE,
        }
    }

    fn strings(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn tigervnc_xfce_command_lines() {
        let spec = spec(VncServer::TigerVnc, DesktopEnvironment::Xfce);
        assert_eq!(
            spec.server_argv(),
            strings(&[
                "Xtigervnc",
                ":3",
                "-rfbport",
                "5913",
                "-localhost",
                "-SecurityTypes",
                "VncAuth",
                "-PasswordFile",
                "/home/ada/.vnc/passwd",
                "-geometry",
                "1600x900",
                "-depth",
                "24",
                "-desktop",
                "ada's desktop",
                "-AlwaysShared",
                "-UseBlacklist=0",
            ])
        );
        assert_eq!(
            spec.session_argv(),
            strings(&["dbus-launch", "--exit-with-session", "startxfce4"])
        );
        assert_eq!(spec.rfb_addr().to_string(), "127.0.0.1:5913");
    }

    /// Not exercised for real: TurboVNC and VirtualGL come from vendor repositories that the
    /// test environment cannot reach, and there is no GPU.
    #[test]
    fn turbovnc_and_virtualgl_command_lines() {
        let plain = spec(
            VncServer::TurboVnc { virtualgl: false },
            DesktopEnvironment::Xfce,
        );
        assert_eq!(
            plain.server_argv(),
            strings(&[
                "/opt/TurboVNC/bin/Xvnc",
                ":3",
                "-rfbport",
                "5913",
                "-localhost",
                "-securitytypes",
                "VNC",
                "-rfbauth",
                "/home/ada/.vnc/passwd",
                "-geometry",
                "1600x900",
                "-depth",
                "24",
                "-desktop",
                "ada's desktop",
                "-alwaysshared",
            ])
        );
        assert_eq!(
            plain.session_argv(),
            strings(&["dbus-launch", "--exit-with-session", "startxfce4"])
        );
        let gpu = spec(
            VncServer::TurboVnc { virtualgl: true },
            DesktopEnvironment::Xfce,
        );
        assert_eq!(gpu.server_argv(), plain.server_argv());
        assert_eq!(
            gpu.session_argv(),
            strings(&[
                "dbus-launch",
                "--exit-with-session",
                "/opt/VirtualGL/bin/vglrun",
                "-d",
                "egl",
                "startxfce4",
            ])
        );
    }

    /// Not exercised for real (GNOME is not installed in the test environment).
    #[test]
    fn gnome_session_command_line() {
        let spec = spec(VncServer::TigerVnc, DesktopEnvironment::Gnome);
        assert_eq!(
            spec.session_argv(),
            strings(&["dbus-launch", "--exit-with-session", "gnome-session"])
        );
    }

    #[test]
    fn environments_are_clean_and_complete() {
        let mut spec = spec(VncServer::TigerVnc, DesktopEnvironment::Xfce);
        let session = spec.session_env();
        let get = |key: &str| {
            session
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("DISPLAY"), Some(":3"));
        assert_eq!(get("HOME"), Some("/home/ada"));
        assert_eq!(get("USER"), Some("ada"));
        assert_eq!(get("LOGNAME"), Some("ada"));
        assert_eq!(get("SHELL"), Some("/bin/bash"));
        assert_eq!(get("LANG"), Some("en_US.UTF-8"));
        assert_eq!(get("XDG_RUNTIME_DIR"), Some("/run/user/1001"));
        assert_eq!(get("XDG_SESSION_TYPE"), Some("x11"));
        assert!(get("PATH").is_some_and(|p| p.contains("/usr/bin")));
        let keys: Vec<&str> = session.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys.len(), 9, "{keys:?}");

        let server = spec.server_env();
        assert!(server.iter().all(|(k, _)| k != "DISPLAY"), "{server:?}");

        spec.runtime_dir = None;
        assert!(spec
            .session_env()
            .iter()
            .all(|(k, _)| k != "XDG_RUNTIME_DIR"));
    }

    #[test]
    fn defaults_follow_the_display_and_user() {
        let spec = SessionSpec::new(user(), 7);
        assert_eq!(spec.rfb_port, 5907);
        assert_eq!(spec.password_file, PathBuf::from("/home/ada/.vnc/passwd"));
        assert_eq!(spec.geometry.to_string(), "1280x800");
        assert_eq!(spec.depth, 24);
        assert_eq!(spec.server, VncServer::TigerVnc);
        assert_eq!(spec.environment, DesktopEnvironment::Xfce);
        assert!(!spec.desktop_name.is_empty());
        assert_eq!(SessionSpec::new(user(), u16::MAX).rfb_port, u16::MAX);
    }

    #[test]
    fn geometry_parses_and_rejects() {
        assert_eq!(
            "1920x1080".parse::<Geometry>().unwrap(),
            Geometry {
                width: 1920,
                height: 1080
            }
        );
        assert_eq!(
            "800X600".parse::<Geometry>().unwrap().to_string(),
            "800x600"
        );
        for bad in [
            "",
            "1280",
            "1280x",
            "x800",
            "0x0",
            "1280x800x24",
            "99999x1",
            "-1x5",
        ] {
            let err = bad.parse::<Geometry>().unwrap_err();
            assert!(err.to_string().contains("WIDTHxHEIGHT"), "{bad}: {err}");
        }
    }

    /// A pid that surely is not running: a child that was started and reaped.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    #[test]
    fn stale_x_files_are_removed_and_live_ones_kept() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join(".X11-unix")).unwrap();
        let lock = tmp.path().join(".X5-lock");
        let socket = tmp.path().join(".X11-unix/X5");

        // Nothing there: nothing to do.
        clear_stale_x_files(tmp.path(), 5).unwrap();

        // A dead server's lock and socket.
        std::fs::write(&lock, format!("{:>10}\n", dead_pid())).unwrap();
        std::fs::write(&socket, "").unwrap();
        clear_stale_x_files(tmp.path(), 5).unwrap();
        assert!(!lock.exists() && !socket.exists());

        // Garbage in the lock counts as stale.
        std::fs::write(&lock, "not a pid\n").unwrap();
        clear_stale_x_files(tmp.path(), 5).unwrap();
        assert!(!lock.exists());

        // A socket without a lock has no owner.
        std::fs::write(&socket, "").unwrap();
        clear_stale_x_files(tmp.path(), 5).unwrap();
        assert!(!socket.exists());

        // A live process that is not an X server (the pid was reused): stale.
        std::fs::write(&lock, format!("{:>10}\n", std::process::id())).unwrap();
        clear_stale_x_files(tmp.path(), 5).unwrap();
        assert!(!lock.exists());

        // A live X server (by its command name) keeps both.
        // Copied by a `cp` child: a write descriptor of this process could leak into children
        // other test threads fork, and executing the file would fail with ETXTBSY.
        let fake_x = tmp.path().join("Xfake");
        let copied = std::process::Command::new("cp")
            .args([Path::new("/bin/sleep"), &fake_x])
            .status()
            .unwrap();
        assert!(copied.success());
        let mut server = std::process::Command::new(&fake_x)
            .arg("30")
            .spawn()
            .unwrap();
        std::fs::write(&lock, format!("{:>10}\n", server.id())).unwrap();
        std::fs::write(&socket, "").unwrap();
        let result = clear_stale_x_files(tmp.path(), 5);
        let _ = server.kill();
        let _ = server.wait();
        let err = result.unwrap_err();
        assert_eq!(err.reason(), "desktop-display-in-use");
        assert!(err.to_string().contains(":5"), "{err}");
        assert!(lock.exists() && socket.exists());
        // Other displays are not touched.
        clear_stale_x_files(tmp.path(), 6).unwrap();
        assert!(lock.exists());
    }

    // The pairing logic with stand-in processes: the "server" is any process, its RFB port a
    // listener owned by the test, so every ordering can be forced.

    fn launch(role: Role, script: &str, dir: &Path) -> Launch {
        Launch {
            role,
            argv: strings(&["sh", "-c", script]),
            env: vec![("PATH".into(), SESSION_PATH.into())],
            cwd: dir.to_path_buf(),
        }
    }

    fn pair(server: Launch, session: Launch, addr: SocketAddr) -> Pair {
        Pair {
            server,
            session,
            rfb_addr: addr,
            ready_timeout: Duration::from_secs(10),
            stop_grace: Duration::from_secs(5),
            identity: None,
        }
    }

    async fn listener() -> (tokio::net::TcpListener, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (listener, addr)
    }

    /// A loopback port that starts accepting once `marker` exists: the stand-in server writes
    /// it when it is set up, as a real server opens its port only once it is.
    async fn listen_when(marker: PathBuf) -> SocketAddr {
        let (listener, addr) = listener().await;
        drop(listener);
        tokio::spawn(async move {
            wait_for_file(&marker).await;
            let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(listener);
        });
        addr
    }

    fn pid_in(path: &Path) -> i32 {
        std::fs::read_to_string(path)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    async fn wait_for_file(path: &Path) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while !path.exists() {
                tokio::time::sleep(POLL).await;
            }
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn server_ending_before_ready_is_reported_with_its_status() {
        let dir = tempfile::tempdir().unwrap();
        let (_listener, addr) = listener().await;
        let mut pair = pair(
            launch(Role::Server, "exit 7", dir.path()),
            launch(
                Role::Session,
                "echo started > session; sleep 60",
                dir.path(),
            ),
            addr,
        );
        // Not ready before it exits: nothing listens on this port.
        pair.rfb_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 9));
        let err = pair.run(CancellationToken::new()).await.unwrap_err();
        assert_eq!(err.reason(), "desktop-server-exited");
        assert!(err.to_string().contains("exit status: 7"), "{err}");
        assert!(
            !dir.path().join("session").exists(),
            "session never started"
        );
    }

    #[tokio::test]
    async fn server_that_never_listens_times_out_and_is_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let closed = {
            let (l, addr) = listener().await;
            drop(l);
            addr
        };
        let mut pair = pair(
            launch(Role::Server, "echo $$ > server; exec sleep 60", dir.path()),
            launch(Role::Session, "sleep 60", dir.path()),
            closed,
        );
        pair.ready_timeout = Duration::from_millis(500);
        let err = pair.run(CancellationToken::new()).await.unwrap_err();
        assert_eq!(err.reason(), "desktop-server-timeout");
        assert!(!process_is_live(pid_in(&dir.path().join("server"))));
    }

    #[tokio::test]
    async fn session_ending_stops_the_server_and_its_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        // The server has a helper in its group, like a real server's children.
        let server = "sleep 60 & echo $! > helper; echo $$ > server; wait";
        let addr = listen_when(dir.path().join("server")).await;
        let pair = pair(
            launch(Role::Server, server, dir.path()),
            launch(Role::Session, "exit 0", dir.path()),
            addr,
        );
        let err = pair.run(CancellationToken::new()).await.unwrap_err();
        assert_eq!(err.reason(), "desktop-session-exited");
        assert!(err.to_string().contains("exit status: 0"), "{err}");
        assert!(err.to_string().contains("sh -c exit 0"), "{err}");
        assert!(!process_is_live(pid_in(&dir.path().join("server"))));
        assert!(!process_is_live(pid_in(&dir.path().join("helper"))));
    }

    #[tokio::test]
    async fn server_ending_stops_the_session() {
        let dir = tempfile::tempdir().unwrap();
        let session_pid = dir.path().join("session");
        let server_pid = dir.path().join("server");
        let addr = listen_when(server_pid.clone()).await;
        let pair = pair(
            launch(Role::Server, "echo $$ > server; exec sleep 60", dir.path()),
            launch(
                Role::Session,
                "echo $$ > session; exec sleep 60",
                dir.path(),
            ),
            addr,
        );
        let task = tokio::spawn(pair.run(CancellationToken::new()));
        wait_for_file(&session_pid).await;
        wait_for_file(&server_pid).await;
        nix::sys::signal::kill(Pid::from_raw(pid_in(&server_pid)), Signal::SIGKILL).unwrap();
        let err = task.await.unwrap().unwrap_err();
        assert_eq!(err.reason(), "desktop-server-exited");
        let DesktopError::ServerExited { status, .. } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(!process_is_live(pid_in(&session_pid)));
    }

    #[tokio::test]
    async fn shutdown_stops_the_session_then_the_server_and_is_ok() {
        let dir = tempfile::tempdir().unwrap();
        let addr = listen_when(dir.path().join("server")).await;
        // Each records its SIGTERM in a shared file; the order shows who was stopped first.
        let trap = |name: &str| {
            format!(
                "trap 'echo {name} >> order; exit 0' TERM; echo $$ > {name}; \
                 sleep 60 & wait"
            )
        };
        let pair = pair(
            launch(Role::Server, &trap("server"), dir.path()),
            launch(Role::Session, &trap("session"), dir.path()),
            addr,
        );
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(pair.run(shutdown.clone()));
        wait_for_file(&dir.path().join("session")).await;
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("order")).unwrap(),
            "session\nserver\n"
        );
    }

    #[tokio::test]
    async fn a_session_ignoring_sigterm_is_killed_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let (_listener, addr) = listener().await;
        let mut pair = pair(
            launch(Role::Server, "exec sleep 60", dir.path()),
            launch(
                Role::Session,
                "trap '' TERM; echo $$ > session; while :; do sleep 0.1; done",
                dir.path(),
            ),
            addr,
        );
        pair.stop_grace = Duration::from_millis(300);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(pair.run(shutdown.clone()));
        wait_for_file(&dir.path().join("session")).await;
        let asked = Instant::now();
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(
            asked.elapsed() < Duration::from_secs(5),
            "{:?}",
            asked.elapsed()
        );
        assert!(!process_is_live(pid_in(&dir.path().join("session"))));
    }

    #[tokio::test]
    async fn unstartable_session_stops_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let addr = listen_when(dir.path().join("server")).await;
        let mut session = launch(Role::Session, "", dir.path());
        session.argv = strings(&["/nonexistent/startxfce4"]);
        let pair = pair(
            launch(Role::Server, "echo $$ > server; exec sleep 60", dir.path()),
            session,
            addr,
        );
        let err = pair.run(CancellationToken::new()).await.unwrap_err();
        assert_eq!(err.reason(), "desktop-spawn-failed");
        assert!(err.to_string().contains("desktop session"), "{err}");
        assert!(!process_is_live(pid_in(&dir.path().join("server"))));
    }
}
