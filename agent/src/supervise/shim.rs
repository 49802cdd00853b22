//! The shim (`exoagent shim`): a tiny plain-std process, detached from the agent in its own
//! session, that spawns one service in its own process group, records it in `run.json`, pumps its
//! output into the capped log, waits for it, cleans up its process group and records `exit.json`.
//! Because services are the shim's children and not the agent's, restarting or upgrading the
//! agent does not interrupt them.
//!
//! Protocol: the agent writes one JSON [`ShimSpec`] to the shim's stdin and closes it; the shim
//! answers one line on stdout, [`ShimHello`], then stops using stdout and stderr. A shim may be
//! started before its spec is known (a standby); closed with nothing written, it exits at once.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{Gid, Pid, Uid};
use serde::{Deserialize, Serialize};

use super::logfile::{RotatingLog, StderrTail};
use super::records::{self, ExitRecord, RunRecord};
use super::RunSpec;
use crate::platform::privileges::{DropTo, PrivilegeError};
use crate::platform::process_group;
use crate::platform::procfs;
use crate::state::now_ms;

/// How long the shim waits for the rest of the process group after SIGTERM before SIGKILL.
pub const GROUP_TERM_GRACE: Duration = Duration::from_secs(3);
/// How long the shim waits for the output pumps to drain once the group is gone.
const PUMP_DRAIN: Duration = Duration::from_secs(1);
/// The shim's exit status when the service ended but `exit.json` could not be written because
/// the disk is full (ENOSPC is 28): the supervisor reports `disk-full`, not a lost shim.
pub const EXIT_DISK_FULL: i32 = 28;
/// The shim's exit status when `exit.json` could not be written for another reason.
pub const EXIT_NO_RECORD: i32 = 70;

/// What the agent sends the shim on stdin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimSpec {
    /// What to run, how and as whom.
    pub run: RunSpec,
    /// Where `run.json` and `exit.json` go (must exist).
    pub run_dir: PathBuf,
    /// The service log (its directory must exist).
    pub log_file: PathBuf,
    /// Rotate the log when it would pass this size.
    pub log_max_bytes: u64,
    /// The hash recorded in `run.json` (see [`records::spec_hash`]).
    pub spec_hash: String,
    /// Groups the account is being added to while the service starts (their ids), given to the
    /// service beside those the group database lists: a process's groups are fixed when it
    /// starts, and the join (`usermod`) need not finish first. Not part of `spec_hash`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub joining_groups: Vec<u32>,
}

/// The one line the shim prints on stdout: the service's pid, or why it could not start it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimHello {
    /// The service's main process, when it was spawned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_pid: Option<u32>,
    /// Why it was not, otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The stable reason code of `error` (`disk-full`, `spawn-failed`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Why the shim could not start the service: a stable reason code and a message.
#[derive(Debug)]
struct ShimFailure {
    reason: &'static str,
    message: String,
}

impl ShimFailure {
    fn new(reason: &'static str, message: String) -> Self {
        Self { reason, message }
    }
}

/// Entry point of `exoagent shim`: read the spec from stdin and supervise one service run.
/// Call it before any async runtime or extra thread exists: the shim reaps children with
/// `waitpid(-1)` and must be the only one doing so in its process.
pub fn main_from_stdin() -> ExitCode {
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin()
        .lock()
        .take(1 << 20)
        .read_to_end(&mut input)
    {
        return hello_and_fail(&ShimFailure::new(
            "spawn-failed",
            format!("failed to read the shim spec from stdin: {e}"),
        ));
    }
    // A standby shim the agent did not need (ShimCommand::standby): nothing to start or say.
    if input.is_empty() {
        return ExitCode::SUCCESS;
    }
    let spec: ShimSpec = match serde_json::from_slice(&input) {
        Ok(spec) => spec,
        Err(e) => {
            return hello_and_fail(&ShimFailure::new(
                "spawn-failed",
                format!("invalid shim spec on stdin: {e}"),
            ))
        }
    };
    redirect_to_null(&[0]);
    match run(&spec) {
        Ok(Recorded::Yes) => ExitCode::SUCCESS,
        // stdout and stderr are /dev/null by now: the exit status is the only way to tell.
        Ok(Recorded::NoSpace) => ExitCode::from(EXIT_DISK_FULL as u8),
        Ok(Recorded::No) => ExitCode::from(EXIT_NO_RECORD as u8),
        Err(failure) => {
            // Only reached before the hello line was printed; the agent reads this.
            hello_and_fail(&failure)
        }
    }
}

/// Whether the end of the run made it into `exit.json`.
enum Recorded {
    Yes,
    NoSpace,
    No,
}

fn hello_and_fail(failure: &ShimFailure) -> ExitCode {
    print_hello(&ShimHello {
        service_pid: None,
        error: Some(failure.message.clone()),
        reason: Some(failure.reason.to_owned()),
    });
    ExitCode::FAILURE
}

fn print_hello(hello: &ShimHello) {
    let mut line = serde_json::to_string(hello).unwrap_or_else(|_| "{}".to_owned());
    line.push('\n');
    let mut out = std::io::stdout().lock();
    // The agent may be gone; the service runs on regardless.
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}

/// Point the given descriptors at /dev/null.
fn redirect_to_null(fds: &[i32]) {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for &fd in fds {
            // SAFETY: dup2 onto a standard descriptor we own; the source fd is valid.
            unsafe {
                libc::dup2(null.as_raw_fd(), fd);
            }
        }
    }
}

/// The identity to switch the service to, if any (`None` when the shim already runs as it).
fn identity(spec: &RunSpec, joining_groups: &[u32]) -> Result<Option<DropTo>, String> {
    let Some(run_as) = spec.run_as else {
        return Ok(None);
    };
    if !Uid::effective().is_root() {
        if Uid::effective().as_raw() == run_as.uid && Gid::effective().as_raw() == run_as.gid {
            return Ok(None);
        }
        return Err(format!(
            "cannot run as uid {} gid {}: the shim is not running as root",
            run_as.uid, run_as.gid
        ));
    }
    let identity = match nix::unistd::User::from_uid(Uid::from_raw(run_as.uid)) {
        Ok(Some(user)) => {
            DropTo::with_groups_of(&user.name, run_as.uid, run_as.gid).map_err(|e| match e {
                PrivilegeError::NulInName { .. } => {
                    format!("user name of uid {} contains NUL", run_as.uid)
                }
                PrivilegeError::Groups { name, source } => {
                    format!("failed to list the groups of '{name}': {source}")
                }
            })
        }
        Ok(None) => Ok(DropTo::without_supplementary_groups(run_as.uid, run_as.gid)),
        Err(e) => Err(format!("failed to look up uid {}: {e}", run_as.uid)),
    }?;
    Ok(Some(identity.joining(joining_groups)))
}

fn spawn_service(spec: &RunSpec, joining_groups: &[u32]) -> Result<Child, String> {
    let Some((program, args)) = spec.argv.split_first() else {
        return Err("empty argv".to_owned());
    };
    let identity = identity(spec, joining_groups)?;
    let mut command = Command::new(program);
    command
        .args(args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure only makes async-signal-safe system calls (setpgid, signal,
    // setgroups, setgid, setuid) on data prepared before the fork.
    unsafe {
        command.pre_exec(move || {
            if libc::setpgid(0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Dispositions the shim ignores must not leak into the service.
            libc::signal(libc::SIGHUP, libc::SIG_DFL);
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            match &identity {
                Some(identity) => identity.apply(),
                None => Ok(()),
            }
        });
    }
    command
        .spawn()
        .map_err(|e| format!("failed to spawn '{program}': {e}"))
}

/// Copy one pipe into the log line by line (chunks of at most the buffer size when a line is
/// longer), feeding the stderr tail when given.
fn pump(
    source: impl Read,
    log: Arc<Mutex<Option<RotatingLog>>>,
    tail: Option<Arc<Mutex<StderrTail>>>,
) {
    let mut reader = BufReader::with_capacity(8192, source);
    loop {
        let (chunk_len, line) = match reader.fill_buf() {
            Ok([]) => return,
            Ok(buf) => {
                let len = buf
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(buf.len(), |i| i + 1);
                (len, buf[..len].to_vec())
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        reader.consume(chunk_len);
        if let Some(tail) = &tail {
            lock(tail).feed(&line);
        }
        let mut guard = lock(&log);
        if let Some(writer) = guard.as_mut() {
            if writer.write_chunk(&line, now_ms()).is_err() {
                // Disk full or the directory vanished: keep draining the pipe so the service
                // never blocks on a full pipe, but stop writing.
                *guard = None;
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Reap every child that has already ended; `Some(status)` for `main` when it was among them.
fn reap_ready(main: Pid) -> Option<WaitStatus> {
    let mut found = None;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return found,
            Ok(status) => {
                if status.pid() == Some(main) {
                    found = Some(status);
                }
            }
        }
    }
}

/// Block until `main` ends, reaping any adopted orphans along the way.
fn wait_main(main: Pid) -> Result<WaitStatus, Errno> {
    loop {
        match waitpid(None, None) {
            Ok(status) if status.pid() == Some(main) => {
                if matches!(status, WaitStatus::Exited(..) | WaitStatus::Signaled(..)) {
                    return Ok(status);
                }
            }
            Ok(_) => {}
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
}

/// SIGTERM the group, wait up to [`GROUP_TERM_GRACE`] for it to empty (reaping), then SIGKILL.
fn clean_up_group(pgid: Pid, main: Pid) {
    let _ = process_group::signal(pgid, Signal::SIGTERM);
    let deadline = Instant::now() + GROUP_TERM_GRACE;
    let mut killed = false;
    let kill_deadline = deadline + Duration::from_secs(2);
    loop {
        reap_ready(main);
        if !process_group::exists(pgid) {
            return;
        }
        let now = Instant::now();
        if !killed && now >= deadline {
            let _ = process_group::signal(pgid, Signal::SIGKILL);
            killed = true;
        }
        if killed && now >= kill_deadline {
            // Members we cannot reap (zombies of an unreaping parent outside our tree).
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run(spec: &ShimSpec) -> Result<Recorded, ShimFailure> {
    // SAFETY: plain calls with constant arguments.
    unsafe {
        // Orphaned grandchildren are re-parented to us so we can reap them.
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
    let log = RotatingLog::open(&spec.log_file, spec.log_max_bytes).map_err(|e| {
        let reason = if crate::fsutil::is_disk_full(&e) {
            "disk-full"
        } else {
            "spawn-failed"
        };
        let message = format!("failed to open the log '{}': {e}", spec.log_file.display());
        ShimFailure::new(reason, message)
    })?;
    let exit_path = records::exit_file(&spec.run_dir);
    let run_path = records::run_file(&spec.run_dir);
    let mut child = match spawn_service(&spec.run, &spec.joining_groups) {
        Ok(child) => child,
        Err(message) => {
            let record = ExitRecord {
                code: None,
                signal: None,
                ended_ms: now_ms(),
                stderr_tail: Vec::new(),
                service_pid: 0,
                error: Some(message.clone()),
            };
            let _ = records::write_record(&exit_path, &record);
            return Err(ShimFailure::new("spawn-failed", message));
        }
    };
    let started_ms = now_ms();
    let service_pid = child.id();
    let main = Pid::from_raw(service_pid as i32);
    let record = RunRecord {
        shim_pid: std::process::id(),
        shim_start_ticks: procfs::start_ticks(std::process::id()).unwrap_or(0),
        service_pid,
        service_start_ticks: procfs::start_ticks(service_pid).unwrap_or(0),
        pgid: service_pid as i32,
        spec_hash: spec.spec_hash.clone(),
        started_ms,
    };
    if let Err(e) = records::write_record(&run_path, &record) {
        let _ = process_group::signal(main, Signal::SIGKILL);
        let _ = wait_main(main);
        return Err(ShimFailure::new(e.reason(), e.to_string()));
    }

    let log = Arc::new(Mutex::new(Some(log)));
    let tail = Arc::new(Mutex::new(StderrTail::default()));
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let mut pumps = 0;
    if let Some(stdout) = child.stdout.take() {
        let (log, done) = (log.clone(), done_tx.clone());
        if std::thread::Builder::new()
            .name("stdout".into())
            .spawn(move || {
                pump(stdout, log, None);
                let _ = done.send(());
            })
            .is_ok()
        {
            pumps += 1;
        }
    }
    if let Some(stderr) = child.stderr.take() {
        let (log, tail, done) = (log.clone(), tail.clone(), done_tx.clone());
        if std::thread::Builder::new()
            .name("stderr".into())
            .spawn(move || {
                pump(stderr, log, Some(tail));
                let _ = done.send(());
            })
            .is_ok()
        {
            pumps += 1;
        }
    }
    drop(done_tx);

    print_hello(&ShimHello {
        service_pid: Some(service_pid),
        error: None,
        reason: None,
    });
    redirect_to_null(&[1, 2]);
    // From here the shim only waits, pumps output and records the end: the code that started
    // the service need not stay in its resident set (platform::resident).
    let _ = crate::platform::resident::release_executable_pages();

    let status = wait_main(main);
    let ended_ms = now_ms();
    clean_up_group(main, main);
    // The group is gone, so the pipes normally reach EOF at once; a process that left the group
    // may still hold them, so do not wait for it.
    let deadline = Instant::now() + PUMP_DRAIN;
    for _ in 0..pumps {
        let left = deadline.saturating_duration_since(Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            break;
        }
    }
    let (code, signal) = match status {
        Ok(WaitStatus::Exited(_, code)) => (Some(code), None),
        Ok(WaitStatus::Signaled(_, signal, _)) => (None, Some(signal as i32)),
        _ => (None, None),
    };
    let record = ExitRecord {
        code,
        signal,
        ended_ms,
        stderr_tail: lock(&tail).lines(),
        service_pid,
        error: None,
    };
    // Only the exit status can tell the agent why this failed: stdout and stderr are
    // /dev/null by now.
    match records::write_record(&exit_path, &record) {
        Ok(()) => Ok(Recorded::Yes),
        Err(e) if e.reason() == "disk-full" => Ok(Recorded::NoSpace),
        Err(_) => Ok(Recorded::No),
    }
}
