//! What a network-facing process (the Guacamole web side, the TLS front) gives up once it has
//! read its files and bound its port: new privileges (`sudo`), the whole filesystem, running
//! programs, TCP other than to its one backend port, binding, and signals or abstract sockets
//! reaching outside itself. Landlock and `no_new_privs` bind the calling thread and what it
//! starts afterwards, so this runs while the process is still single-threaded.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;

use landlock::{
    Access, AccessFs, AccessNet, LandlockStatus, NetPort, PathBeneath, PathFd, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

/// The Landlock ABI whose restrictions are asked for: filesystem (with truncate and device
/// ioctls), TCP bind/connect (v4) and signal and abstract-socket scoping (v6). Older kernels
/// enforce what they know (best effort) and the log says so.
const WANTED_ABI: ABI = ABI::V6;

/// How much of the confinement the running kernel enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforcement {
    /// Everything asked for.
    Full,
    /// Some of it (an older kernel: e.g. no network rules before Linux 6.7).
    Partial,
    /// No Landlock (Linux before 5.13, or not enabled); `no_new_privs` still holds.
    NoLandlock,
}

impl Enforcement {
    /// For the log line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Partial => "partial",
            Self::NoLandlock => "no-landlock",
        }
    }
}

/// The little a confined process keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowed {
    /// Files beneath these directories may be read (the front re-reads its renewed certificate,
    /// which arrives as a new file renamed into place).
    pub read_beneath: Vec<PathBuf>,
    /// Directories beneath which files may be renamed (removing and making a regular file
    /// name, within one directory; no reading or writing of content): the Guacamole web side
    /// renames a completed upload into place (services/guacamole/rename.rs).
    pub rename_beneath: Vec<PathBuf>,
    /// TCP ports it may connect to (its backend; guacd).
    pub connect_ports: Vec<u16>,
}

/// What [`confine`] achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confined {
    /// The Landlock part.
    pub enforcement: Enforcement,
    /// The kernel's Landlock ABI, when it has Landlock.
    pub kernel_abi: Option<i32>,
    /// `PR_SET_NO_NEW_PRIVS` is set: set-user-ID programs (`sudo`) cannot raise privileges.
    pub no_new_privs: bool,
}

/// Why the process could not be confined.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// Threads started before the confinement would stay outside it.
    #[error(
        "the process already runs {threads} threads; it must confine itself before starting any"
    )]
    Threaded {
        /// How many.
        threads: usize,
    },
    /// A directory to keep readable cannot be opened.
    #[error("cannot open '{path}' to keep it readable: {source}")]
    Path {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: landlock::PathFdError,
    },
    /// The kernel refused the ruleset.
    #[error("Landlock: {0}")]
    Landlock(#[from] landlock::RulesetError),
}

impl ConfineError {
    /// Short stable reason for reports.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Threaded { .. } => "confine-threaded",
            Self::Path { .. } => "confine-path",
            Self::Landlock(_) => "confine-refused",
        }
    }
}

/// Confine the calling process: no new privileges; no filesystem access (reading, writing,
/// executing) except reading files beneath `allowed.read_beneath`; TCP `connect` only to
/// `allowed.connect_ports`, no `bind` (the listening socket is already bound); no signals and
/// no abstract UNIX sockets outside its own domain. Descriptors already open (the listener,
/// stdout/stderr, the shim's pipes) keep working.
pub fn confine(allowed: &Allowed) -> Result<Confined, ConfineError> {
    let threads = thread_count();
    if threads > 1 {
        return Err(ConfineError::Threaded { threads });
    }
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(WANTED_ABI))?
        .handle_access(AccessNet::from_all(WANTED_ABI))?
        .scope(Scope::from_all(WANTED_ABI))?
        .create()?;
    for dir in &allowed.read_beneath {
        let fd = PathFd::new(dir).map_err(|source| ConfineError::Path {
            path: dir.clone(),
            source,
        })?;
        ruleset = ruleset.add_rule(PathBeneath::new(fd, AccessFs::ReadFile))?;
    }
    for dir in &allowed.rename_beneath {
        let fd = PathFd::new(dir).map_err(|source| ConfineError::Path {
            path: dir.clone(),
            source,
        })?;
        ruleset = ruleset.add_rule(PathBeneath::new(
            fd,
            AccessFs::RemoveFile | AccessFs::MakeReg,
        ))?;
    }
    for port in &allowed.connect_ports {
        ruleset = ruleset.add_rule(NetPort::new(*port, AccessNet::ConnectTcp))?;
    }
    let status = ruleset.restrict_self()?;
    let enforcement = match status.ruleset {
        RulesetStatus::FullyEnforced => Enforcement::Full,
        RulesetStatus::PartiallyEnforced => Enforcement::Partial,
        _ => Enforcement::NoLandlock,
    };
    let kernel_abi = match status.landlock {
        LandlockStatus::Available {
            effective_abi,
            kernel_abi,
            ..
        } => Some(kernel_abi.unwrap_or(effective_abi as i32)),
        _ => None,
    };
    Ok(Confined {
        enforcement,
        kernel_abi,
        no_new_privs: status.no_new_privs,
    })
}

/// Confine the process (exit 71 if that fails), then run `job` on a new multi-threaded runtime
/// with `workers` worker threads (exit 70 without one): the order the network-facing
/// subcommands need, their files read and their port bound beforehand. `program` names them in
/// messages.
pub fn confine_then_run<F, Fut>(
    program: &str,
    allowed: &Allowed,
    workers: usize,
    job: F,
) -> std::process::ExitCode
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<()>>,
{
    use std::process::ExitCode;
    match confine(allowed) {
        Ok(confined) => {
            tracing::info!(target: "exoagent::confine", program, "{}", describe(&confined, allowed))
        }
        Err(e) => {
            eprintln!("exoagent {program}: {e} [{}]", e.reason());
            return ExitCode::from(71);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("exoagent {program}: failed to start the async runtime: {e}");
            return ExitCode::from(70);
        }
    };
    let result = runtime.block_on(job());
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("exoagent {program}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Threads of this process (1 when `/proc` cannot tell: the count is a guard, not a need).
fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|dir| dir.count())
        .unwrap_or(1)
}

/// Bind `addr` for listening as tokio would (`SO_REUSEADDR`, so a restart does not wait out
/// `TIME_WAIT`; non-blocking), before any runtime or thread exists.
pub fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Directories for the log, each quoted (escaped).
fn quoted(dirs: &[PathBuf]) -> String {
    let dirs: Vec<String> = dirs
        .iter()
        .map(|d| format!("{:?}", d.display().to_string()))
        .collect();
    dirs.join(", ")
}

/// One line for the log: what holds.
pub fn describe(confined: &Confined, allowed: &Allowed) -> String {
    let ports: Vec<String> = allowed.connect_ports.iter().map(u16::to_string).collect();
    let readable = if allowed.read_beneath.is_empty() {
        "no files".to_owned()
    } else {
        format!(
            "no files but reading beneath {}",
            quoted(&allowed.read_beneath)
        )
    };
    let readable = if allowed.rename_beneath.is_empty() {
        readable
    } else {
        format!(
            "{readable}, renaming beneath {}",
            quoted(&allowed.rename_beneath)
        )
    };
    match confined.enforcement {
        Enforcement::NoLandlock => format!(
            "confined: no new privileges{}; this kernel has no Landlock, so files, programs and ports stay reachable",
            if confined.no_new_privs { "" } else { " NOT set" }
        ),
        enforcement => format!(
            "confined ({}, Landlock ABI {}): no new privileges, {readable}, no programs, TCP connect only to port {}, no bind, no signals or abstract sockets outside",
            enforcement.as_str(),
            confined.kernel_abi.unwrap_or(0),
            ports.join(",")
        ),
    }
}
