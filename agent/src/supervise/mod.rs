//! Process lifecycle: spawn each service through a detached shim in its own process group,
//! capture capped logs, restart with capped backoff, detect crash loops, probe readiness, and
//! re-adopt running services after the agent restarts.
//!
//! Layout of a service's run directory (mode 0700):
//! - `run.json` ([`records::RunRecord`]): shim and service pids with their start ticks, the
//!   process group, the spec hash and the start time; written by the shim after the spawn.
//! - `exit.json` ([`records::ExitRecord`]): how the last run ended and its stderr tail; written
//!   by the shim after the service's process group is gone.
//!
//! A running service is adopted (not restarted) by a new agent when its shim is alive (pid and
//! start ticks match) and the recorded spec hash (FNV-1a 64 over the run spec's JSON, see
//! [`records::spec_hash`]) equals the current one.

pub mod logfile;
mod policy;
pub mod probe;
pub mod records;
pub mod shim;

pub use policy::SupervisePolicy;

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use probe::{Probe, ProbeError};

use crate::model::ServiceKind;
use crate::platform::{process_group, procfs};
use crate::state::{now_ms, Reason, ServiceState, ServiceUpdate, StateHub};
use records::{ExitRecord, RunRecord};
use shim::{ShimHello, ShimSpec};

/// How long the shim may take to report the service's pid.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// Timeout of one probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a service gets between SIGTERM and SIGKILL when the supervisor stops it.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long to wait for a shim to finish once its group was SIGKILLed.
const FINAL_WAIT: Duration = Duration::from_secs(8);
/// The longest stderr excerpt put in a reason.
const TAIL_CHARS: usize = 400;
/// The reason of a run that ended, or could not start, because the disk is full.
pub const DISK_FULL: &str = "disk-full";
/// The file written (and removed) to check whether the run directory has space again.
const SPACE_CHECK_FILE: &str = ".space-check";
/// Retries of a `failed` service stop doubling at this multiple of the first delay.
const RETRY_CAP_FACTOR: u32 = 20;

/// How to start the shim: the exoagent executable, run as `<exe> shim`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimCommand {
    /// The exoagent binary (`/proc/self/exe` in production; tests pass
    /// `env!("CARGO_BIN_EXE_exoagent")`).
    pub exe: PathBuf,
}

impl ShimCommand {
    /// `<exe> shim`, detached into its own session, with piped stdio and nothing inherited.
    fn command(&self) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(&self.exe);
        command
            .arg("shim")
            .env_clear()
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false);
        // SAFETY: setsid is async-signal-safe; it detaches the shim into its own session so it
        // outlives the agent and receives none of its terminal's or group's signals.
        unsafe {
            command.pre_exec(|| {
                nix::unistd::setsid()
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
        command
    }

    /// A shim started now, ahead of its spec: its process start (a fork of the agent and the
    /// executable's start, a noticeable part of a second on a small instance at boot) runs
    /// beside whatever the service still waits for (the account), and the supervisor's first
    /// launch hands it the spec. Dropped unused, it reads an empty stdin and exits.
    pub fn standby(&self) -> std::io::Result<StandbyShim> {
        self.command().spawn().map(|child| StandbyShim { child })
    }
}

/// A shim waiting on stdin for its spec ([`ShimCommand::standby`]).
#[derive(Debug)]
pub struct StandbyShim {
    child: tokio::process::Child,
}

impl StandbyShim {
    /// The shim's process id (`None` once it has been reaped).
    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }
}

/// Whether `run_dir` records a shim that is still alive (its service runs, or is ending): an
/// agent started again finds it and adopts or replaces the service, so no standby is needed.
pub fn has_live_shim(run_dir: &Path) -> bool {
    live_run(run_dir).is_some()
}

/// The run recorded in `run_dir` while its shim is alive.
fn live_run(run_dir: &Path) -> Option<RunRecord> {
    records::read_record::<RunRecord>(&records::run_file(run_dir))
        .ok()
        .flatten()
        .filter(|run| procfs::is_alive(run.shim_pid, run.shim_start_ticks))
}

/// What to run for a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSpec {
    /// Program and arguments; the program is looked up on the `PATH` of `env` when relative.
    pub argv: Vec<String>,
    /// The complete environment of the service (nothing is inherited).
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: PathBuf,
    /// The user and group to run as (needs root); `None` keeps the agent's.
    pub run_as: Option<RunAs>,
}

/// A numeric user and primary group; supplementary groups come from the group database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunAs {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

/// Where a service's supervision records and log live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePaths {
    /// Holds `run.json` and `exit.json`; created 0700.
    pub run_dir: PathBuf,
    /// The current log; rotated to `<log>.1`. Its parent is created 0750.
    pub log_file: PathBuf,
}

/// Errors of supervision bookkeeping (not of the service itself, whose failures become
/// [`Reason`]s in the state hub).
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    /// A filesystem operation failed.
    #[error("failed to {action} '{path}': {source}")]
    Io {
        /// What was attempted (`create`, `read`, `rename into`, ...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A record file could not be encoded or decoded.
    #[error("invalid supervision record '{path}': {source}")]
    Record {
        /// The record file.
        path: PathBuf,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// Signalling a recorded process group failed for another reason than it being gone.
    #[error("failed to send {signal} to process group {pgid}: {source}")]
    Signal {
        /// The process group.
        pgid: i32,
        /// The signal name.
        signal: &'static str,
        /// The errno.
        source: Errno,
    },
}

impl SuperviseError {
    /// A short stable code for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Io { source, .. } if crate::fsutil::is_disk_full(source) => "disk-full",
            Self::Io { .. } => "supervise-io-failed",
            Self::Record { .. } => "record-invalid",
            Self::Signal { .. } => "signal-failed",
        }
    }
}

/// Pure backoff: the delay before restart number `n` (1-based) is
/// `min(initial * 2^(n-1), max)`; `n = 0` is treated as 1.
pub fn backoff_delay(policy: &SupervisePolicy, n: u32) -> Duration {
    let exponent = n.saturating_sub(1).min(31);
    policy
        .backoff_initial
        .checked_mul(1u32 << exponent)
        .map_or(policy.backoff_max, |d| d.min(policy.backoff_max))
}

/// The delay before retry number `n` (1-based) of a `failed` service, before jitter: the first
/// retry after `backoff_max` (30 s by default), doubling up to `20 × backoff_max` (10 min).
/// Slower than restarts: whatever failed it (a full disk, a crash loop) needs a fix first.
pub fn retry_delay(policy: &SupervisePolicy, n: u32) -> Duration {
    let first = policy.backoff_max.max(Duration::from_millis(1));
    let cap = first.saturating_mul(RETRY_CAP_FACTOR);
    let exponent = n.saturating_sub(1).min(31);
    first
        .checked_mul(1u32 << exponent)
        .map_or(cap, |d| d.min(cap))
}

/// `delay` plus 0–10 % jitter, so failed services do not all retry at once.
pub fn jittered(delay: Duration) -> Duration {
    let max_jitter = (delay.as_millis() / 10) as u64;
    if max_jitter == 0 {
        return delay;
    }
    delay + Duration::from_millis(rand::thread_rng().gen_range(0..=max_jitter))
}

/// Whether `dir`'s filesystem is out of space (or quota): a small file is written there and
/// removed. `Some(detail)` naming the path when it is; `None` when the write works or fails for
/// another reason.
pub fn out_of_space(dir: &Path) -> Option<String> {
    let probe = dir.join(SPACE_CHECK_FILE);
    match crate::fsutil::write_atomic(&probe, b"ok\n", 0o600, None) {
        Ok(()) => {
            let _ = std::fs::remove_file(&probe);
            None
        }
        Err(e) if crate::fsutil::is_disk_full(&e) => {
            Some(format!("failed to write in '{}': {e}", dir.display()))
        }
        Err(_) => None,
    }
}

/// How a [`Supervisor::run`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// Cancelled; the service (if running) keeps running under its shim.
    Cancelled,
    /// The service was given up on; the reason is also in the hub.
    Failed(Reason),
}

/// What one [`Supervisor::run`] did, for callers and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunReport {
    /// Shims this run launched.
    pub spawned: u32,
    /// Whether a service already running under a shim was adopted.
    pub adopted: bool,
    /// The delay before each scheduled restart, in order.
    pub restart_delays: Vec<Duration>,
    /// How it ended.
    pub outcome: RunOutcome,
}

/// Watches a shim until it exits: the tokio child for shims spawned by this process (so it is
/// reaped), a pidfd for adopted ones, `/proc` polling when pidfds are unavailable.
#[derive(Debug)]
enum ShimHandle {
    Child(tokio::process::Child),
    Pidfd {
        fd: AsyncFd<OwnedFd>,
        pid: u32,
        ticks: u64,
    },
    Poll {
        pid: u32,
        ticks: u64,
    },
}

impl ShimHandle {
    /// Watch a process that is not our child. Returns a handle whose `wait` ends at once when
    /// the process is already gone.
    fn watch(pid: u32, ticks: u64) -> Self {
        let Ok(raw_pid) = libc::pid_t::try_from(pid) else {
            return Self::Poll { pid, ticks };
        };
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw_pid, 0) };
        if fd < 0 {
            return Self::Poll { pid, ticks };
        }
        // SAFETY: the kernel just returned this descriptor to us; nobody else owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // The pid may have been reused between the liveness check and pidfd_open; if the
        // process behind the pidfd is not the recorded one, fall back to polling, which sees
        // the recorded process as gone.
        if !procfs::is_alive(pid, ticks) {
            return Self::Poll { pid, ticks };
        }
        // SAFETY: `OwnedFd` holds a valid open descriptor and keeps it, unchanged, for as long
        // as the `AsyncFd` owns it.
        let registered =
            unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) };
        match registered {
            Ok(fd) => Self::Pidfd { fd, pid, ticks },
            Err(_) => Self::Poll { pid, ticks },
        }
    }

    /// Wait until the process has exited. Idempotent and cancel-safe.
    async fn wait(&mut self) {
        match self {
            Self::Child(child) => {
                let _ = child.wait().await;
            }
            Self::Pidfd { fd, pid, ticks } => {
                if fd.readable().await.is_err() {
                    poll_until_dead(*pid, *ticks).await;
                }
            }
            Self::Poll { pid, ticks } => poll_until_dead(*pid, *ticks).await,
        }
    }

    /// The shim's exit status once it has ended, when it is known (only for our own child).
    fn exit_code(&mut self) -> Option<i32> {
        match self {
            Self::Child(child) => child.try_wait().ok().flatten().and_then(|s| s.code()),
            Self::Pidfd { .. } | Self::Poll { .. } => None,
        }
    }

    /// Force the shim itself down (only when it is stuck).
    fn kill(&mut self) {
        match self {
            Self::Child(child) => {
                let _ = child.start_kill();
            }
            Self::Pidfd { pid, ticks, .. } | Self::Poll { pid, ticks } => {
                if procfs::is_alive(*pid, *ticks) {
                    let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
                }
            }
        }
    }
}

async fn poll_until_dead(pid: u32, ticks: u64) {
    while procfs::is_alive(pid, ticks) {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn signal_group(pgid: i32, signal: Signal) -> Result<(), SuperviseError> {
    process_group::signal(Pid::from_raw(pgid), signal).map_err(SuperviseError::from)
}

impl From<process_group::SignalError> for SuperviseError {
    fn from(e: process_group::SignalError) -> Self {
        Self::Signal {
            pgid: e.pgid.as_raw(),
            signal: e.signal.as_str(),
            source: e.source,
        }
    }
}

/// SIGTERM the group, wait up to `grace` for the watched process, SIGKILL the group, wait again,
/// and as a last resort kill the watched shim itself.
async fn terminate(
    pgid: i32,
    handle: &mut ShimHandle,
    grace: Duration,
) -> Result<(), SuperviseError> {
    let stopped = process_group::terminate(Pid::from_raw(pgid), grace, handle.wait()).await?;
    if stopped == process_group::Stopped::Terminated {
        return Ok(());
    }
    if tokio::time::timeout(FINAL_WAIT, handle.wait())
        .await
        .is_ok()
    {
        return Ok(());
    }
    handle.kill();
    let _ = tokio::time::timeout(FINAL_WAIT, handle.wait()).await;
    Ok(())
}

/// Stop a service recorded in `run_dir` (SIGTERM to its group, then SIGKILL after `grace`),
/// used by `exoagent down` and tests. `Ok(false)` if nothing was running. Stop the service's
/// supervisor first: a running supervisor restarts what this stops.
pub async fn stop_recorded(run_dir: &Path, grace: Duration) -> Result<bool, SuperviseError> {
    let run_path = records::run_file(run_dir);
    let Some(run) = records::read_record::<RunRecord>(&run_path)? else {
        return Ok(false);
    };
    let shim_alive = procfs::is_alive(run.shim_pid, run.shim_start_ticks);
    let service_alive = procfs::is_alive(run.service_pid, run.service_start_ticks);
    if !shim_alive && !service_alive {
        return Ok(false);
    }
    let mut handle = if shim_alive {
        ShimHandle::watch(run.shim_pid, run.shim_start_ticks)
    } else {
        ShimHandle::watch(run.service_pid, run.service_start_ticks)
    };
    terminate(run.pgid, &mut handle, grace).await?;
    if !shim_alive {
        // Without a shim nobody cleans up the rest of the group.
        signal_group(run.pgid, Signal::SIGKILL)?;
    }
    records::remove_if_exists(&run_path)?;
    tracing::info!(
        target: "exoagent::supervise",
        run_dir = %run_dir.display(),
        pid = run.service_pid,
        "stopped recorded service"
    );
    Ok(true)
}

/// One run of the service under a shim.
#[derive(Debug)]
struct Running {
    handle: ShimHandle,
    service_pid: u32,
    service_ticks: u64,
    pgid: i32,
    started: Instant,
    started_ms: u64,
}

/// One run that ended, however it ended.
#[derive(Debug)]
struct Ended {
    /// Stable code: `exited`, `start-timeout`, `spawn-failed`, `shim-lost`, `disk-full`.
    code: &'static str,
    /// `exited with status 3`, `killed by signal 9`, ...
    status: String,
    /// The stderr tail, already joined and cut.
    tail: String,
    lasted: Duration,
}

impl Ended {
    fn spawn_failed(code: &'static str, status: String) -> Self {
        Self {
            code,
            status,
            tail: String::new(),
            lasted: Duration::ZERO,
        }
    }

    fn with_tail(&self, status: &str) -> String {
        if self.tail.is_empty() {
            status.to_owned()
        } else {
            format!("{status}; last stderr: {}", self.tail)
        }
    }

    fn detail(&self) -> String {
        self.with_tail(&self.status)
    }

    /// The shim could not record how the run ended because the disk is full.
    fn disk_full(detail: String, lasted: Duration) -> Self {
        Self {
            code: DISK_FULL,
            status: format!("the run ended but its exit record could not be written: {detail}"),
            tail: String::new(),
            lasted,
        }
    }
}

enum Adopt {
    Running(Running),
    Ended(Ended),
    Fresh,
}

enum Watch {
    Cancelled,
    Ended(Ended),
    /// Before ready, the service declared through its probe that it cannot become ready
    /// without a fix (`ProbeError::Failed`); it has been stopped.
    Failed(Reason),
}

/// Supervises one service: spawn (or adopt), probe, restart, give up; drives the service's state
/// in the hub from `Starting` on.
#[derive(Debug)]
pub struct Supervisor {
    kind: ServiceKind,
    spec: RunSpec,
    spec_hash: String,
    probe: Probe,
    start_timeout: Duration,
    policy: SupervisePolicy,
    paths: ServicePaths,
    shim: ShimCommand,
    hub: StateHub,
    /// A problem to report while (re)starting, such as a configuration that could not be
    /// rewritten for a service that is adopted anyway.
    note: Option<Reason>,
    /// Whether this supervises the service or the TLS front before it.
    part: Part,
    /// Groups the account is being added to as the service starts ([`ShimSpec::joining_groups`]).
    joining_groups: Vec<u32>,
    /// A shim started ahead, for the first launch ([`ShimCommand::standby`]).
    standby: std::sync::Mutex<Option<StandbyShim>>,
}

/// What a supervisor runs for its service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The service itself.
    Service,
    /// The TLS front on the service's public port (its state is the service's `front`).
    Front,
}

impl Supervisor {
    /// A supervisor for `kind`; nothing happens until [`Supervisor::run`].
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kind: ServiceKind,
        spec: RunSpec,
        probe: Probe,
        start_timeout: Duration,
        policy: SupervisePolicy,
        paths: ServicePaths,
        shim: ShimCommand,
        hub: StateHub,
    ) -> Self {
        let spec_hash = records::spec_hash(&spec);
        Self {
            kind,
            spec,
            spec_hash,
            probe,
            start_timeout,
            policy,
            paths,
            shim,
            hub,
            note: None,
            part: Part::Service,
            joining_groups: Vec::new(),
            standby: std::sync::Mutex::new(None),
        }
    }

    /// Launch the service the first time through `standby` instead of a new shim.
    pub fn with_standby(self, standby: StandbyShim) -> Self {
        *self
            .standby
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(standby);
        self
    }

    /// Supervise the TLS front before the service instead of the service: states go to the
    /// service's `front` in the hub.
    pub fn for_front(mut self) -> Self {
        self.part = Part::Front;
        self
    }

    /// Start the service also in `groups` (ids), which the account is being added to and the
    /// group database may not list yet. They are not part of the spec: a service started with
    /// them is adopted by an agent that no longer needs to give them.
    pub fn with_joining_groups(mut self, groups: Vec<u32>) -> Self {
        self.joining_groups = groups;
        self
    }

    /// Report `reason` while the service (re)starts instead of no reason.
    pub fn with_note(mut self, reason: Reason) -> Self {
        self.note = Some(reason);
        self
    }

    /// Whether a live shim runs this very spec: the service will be adopted, not restarted.
    pub fn finds_running_service(&self) -> bool {
        live_run(&self.paths.run_dir).is_some_and(|run| run.spec_hash == self.spec_hash)
    }

    /// Like [`Supervisor::run`], but a `failed` service is retried on [`retry_delay`]'s
    /// jittered schedule until `cancel` fires: whatever failed it (a full disk, a crash loop)
    /// may be fixed without anyone restarting the agent. While the disk is still full, a retry
    /// only checks for space and the service stays `failed`.
    pub async fn run_retrying(self, cancel: CancellationToken) -> RunReport {
        let mut total = RunReport {
            spawned: 0,
            adopted: false,
            restart_delays: Vec::new(),
            outcome: RunOutcome::Cancelled,
        };
        let mut retries = 0u32;
        loop {
            let started = tokio::time::Instant::now();
            let report = self.run_once(&cancel).await;
            // A service that ran well for a while before failing again starts the schedule
            // afresh, not at the cap its failures days ago reached.
            if started.elapsed() >= self.policy.stable_after {
                retries = 0;
            }
            total.spawned += report.spawned;
            total.adopted |= report.adopted;
            total.restart_delays.extend(report.restart_delays);
            let RunOutcome::Failed(reason) = report.outcome else {
                return total;
            };
            loop {
                retries += 1;
                let delay = jittered(retry_delay(&self.policy, retries));
                tracing::info!(
                    target: "exoagent::supervise",
                    service = %self.kind,
                    retry = retries,
                    delay_ms = delay.as_millis() as u64,
                    "retry of the failed service scheduled"
                );
                tokio::select! {
                    _ = cancel.cancelled() => return total,
                    _ = tokio::time::sleep(delay) => {}
                }
                if reason.code != DISK_FULL {
                    break;
                }
                match out_of_space(&self.paths.run_dir) {
                    None => break,
                    Some(detail) => tracing::info!(
                        target: "exoagent::supervise",
                        service = %self.kind,
                        "still no space: {detail}"
                    ),
                }
            }
        }
    }

    /// Runs until `cancel` fires (then returns WITHOUT stopping the service: it keeps running
    /// under its shim) or until the service is `failed`.
    pub async fn run(self, cancel: CancellationToken) -> RunReport {
        self.run_once(&cancel).await
    }

    async fn run_once(&self, cancel: &CancellationToken) -> RunReport {
        let mut report = RunReport {
            spawned: 0,
            adopted: false,
            restart_delays: Vec::new(),
            outcome: RunOutcome::Cancelled,
        };
        self.set(
            ServiceState::Starting,
            ServiceUpdate {
                pid: Some(None),
                restarts: Some(0),
                reason: self.note.clone(),
            },
        );
        if let Err(e) = self.prepare_dirs() {
            let reason = Reason::new(e.reason(), e.to_string());
            self.fail(reason.clone());
            report.outcome = RunOutcome::Failed(reason);
            return report;
        }

        let mut restarts = 0u32;
        let mut consecutive = 0u32;
        let (mut next_run, mut pending_end) = match self.adopt().await {
            Adopt::Running(running) => {
                report.adopted = true;
                (Some(running), None)
            }
            Adopt::Ended(ended) => (None, Some(ended)),
            Adopt::Fresh => (None, None),
        };
        loop {
            let ended = match pending_end.take() {
                Some(ended) => ended,
                None => {
                    let launched = match next_run.take() {
                        Some(running) => Ok(running),
                        None => {
                            report.spawned += 1;
                            self.launch().await
                        }
                    };
                    match launched {
                        Ok(running) => match self.watch(running, cancel).await {
                            Watch::Cancelled => return report,
                            Watch::Ended(ended) => ended,
                            Watch::Failed(reason) => {
                                // Restarting cannot help; the retry schedule tries again later.
                                let _ = records::remove_if_exists(&records::exit_file(
                                    &self.paths.run_dir,
                                ));
                                self.fail(reason.clone());
                                report.outcome = RunOutcome::Failed(reason);
                                return report;
                            }
                        },
                        Err(ended) => ended,
                    }
                }
            };
            tracing::info!(
                target: "exoagent::supervise",
                service = %self.kind,
                status = %ended.status,
                lasted_ms = ended.lasted.as_millis() as u64,
                "service run ended"
            );
            if ended.code == DISK_FULL {
                if let Some(detail) = out_of_space(&self.paths.run_dir) {
                    // Relaunching into a full disk only fails again: give up now and let the
                    // retry schedule check for space.
                    tracing::warn!(target: "exoagent::supervise", service = %self.kind, "{detail}");
                    let reason = Reason::new(DISK_FULL, ended.detail());
                    self.fail(reason.clone());
                    report.outcome = RunOutcome::Failed(reason);
                    return report;
                }
            }
            if ended.lasted >= self.policy.stable_after {
                consecutive = 0;
            } else {
                consecutive += 1;
            }
            if consecutive >= self.policy.crash_loop_restarts.max(1) {
                let code = if ended.code == "start-timeout" {
                    "start-timeout"
                } else {
                    "crash-loop"
                };
                let status = format!("{} ({consecutive} times in a row)", ended.status);
                let reason = Reason::new(code, ended.with_tail(&status));
                // This end is seen and reported: without its exit record, the next agent starts
                // the service afresh instead of counting a restart (`restarts: 1` once it ran).
                let _ = records::remove_if_exists(&records::exit_file(&self.paths.run_dir));
                self.fail(reason.clone());
                report.outcome = RunOutcome::Failed(reason);
                return report;
            }
            restarts += 1;
            let delay = backoff_delay(&self.policy, consecutive.max(1));
            report.restart_delays.push(delay);
            tracing::info!(
                target: "exoagent::supervise",
                service = %self.kind,
                restart = restarts,
                delay_ms = delay.as_millis() as u64,
                "restart scheduled"
            );
            self.set(
                ServiceState::Starting,
                ServiceUpdate {
                    pid: Some(None),
                    restarts: Some(restarts),
                    reason: Some(Reason::new(ended.code, ended.detail())),
                },
            );
            tokio::select! {
                _ = cancel.cancelled() => return report,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    fn set(&self, state: ServiceState, update: ServiceUpdate) {
        let result = match self.part {
            Part::Service => self.hub.transition(self.kind, state, update),
            Part::Front => self.hub.front_transition(self.kind, state, update),
        };
        if let Err(refused) = result {
            tracing::warn!(
                target: "exoagent::supervise",
                service = %self.kind,
                from = refused.from,
                to = refused.to,
                "{refused}"
            );
        }
    }

    fn fail(&self, reason: Reason) {
        tracing::warn!(
            target: "exoagent::supervise",
            service = %self.kind,
            code = %reason.code,
            detail = %reason.detail,
            "service failed"
        );
        self.set(
            ServiceState::Failed,
            ServiceUpdate {
                pid: Some(None),
                restarts: None,
                reason: Some(reason),
            },
        );
    }

    fn prepare_dirs(&self) -> Result<(), SuperviseError> {
        let run_dir = &self.paths.run_dir;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(run_dir)
            .map_err(|source| SuperviseError::Io {
                action: "create directory",
                path: run_dir.clone(),
                source,
            })?;
        std::fs::set_permissions(run_dir, std::fs::Permissions::from_mode(0o700)).map_err(
            |source| SuperviseError::Io {
                action: "set mode 0700 on",
                path: run_dir.clone(),
                source,
            },
        )?;
        if let Some(parent) = self.paths.log_file.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(parent)
                .map_err(|source| SuperviseError::Io {
                    action: "create directory",
                    path: parent.to_path_buf(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Look at the records a previous agent left: adopt a live shim running the same spec, stop
    /// one running another spec, count a run that ended while nobody watched.
    async fn adopt(&self) -> Adopt {
        let run_dir = &self.paths.run_dir;
        let run = match records::read_record::<RunRecord>(&records::run_file(run_dir)) {
            Ok(Some(run)) => run,
            Ok(None) => return Adopt::Fresh,
            Err(e) => {
                tracing::warn!(target: "exoagent::supervise", service = %self.kind, "ignoring {e}");
                return Adopt::Fresh;
            }
        };
        if procfs::is_alive(run.shim_pid, run.shim_start_ticks) {
            if run.spec_hash != self.spec_hash {
                tracing::info!(
                    target: "exoagent::supervise",
                    service = %self.kind,
                    pid = run.service_pid,
                    "run spec changed; stopping the running service"
                );
                if let Err(e) = stop_recorded(run_dir, STOP_GRACE).await {
                    tracing::warn!(target: "exoagent::supervise", service = %self.kind, "{e}");
                }
                return Adopt::Fresh;
            }
            let handle = ShimHandle::watch(run.shim_pid, run.shim_start_ticks);
            if !matches!(handle, ShimHandle::Poll { .. })
                || procfs::is_alive(run.shim_pid, run.shim_start_ticks)
            {
                tracing::info!(
                    target: "exoagent::supervise",
                    service = %self.kind,
                    pid = run.service_pid,
                    shim_pid = run.shim_pid,
                    "adopting running service"
                );
                let age = Duration::from_millis(now_ms().saturating_sub(run.started_ms));
                let now = Instant::now();
                return Adopt::Running(Running {
                    handle,
                    service_pid: run.service_pid,
                    service_ticks: run.service_start_ticks,
                    pgid: run.pgid,
                    started: now.checked_sub(age).unwrap_or(now),
                    started_ms: run.started_ms,
                });
            }
        }
        // The shim is gone: did it record how the service ended?
        match records::read_record::<ExitRecord>(&records::exit_file(run_dir)) {
            Ok(Some(exit))
                if exit.service_pid == run.service_pid && exit.ended_ms >= run.started_ms =>
            {
                Adopt::Ended(Ended {
                    code: "exited",
                    status: exit.status_text(),
                    tail: exit.tail_text(TAIL_CHARS),
                    lasted: Duration::from_millis(exit.ended_ms - run.started_ms),
                })
            }
            _ => {
                // The shim died without a record (killed): its service may be orphaned.
                if procfs::is_alive(run.service_pid, run.service_start_ticks) {
                    let _ = signal_group(run.pgid, Signal::SIGKILL);
                }
                // A full disk is the likely reason there is no record; say so.
                if let Some(detail) = out_of_space(run_dir) {
                    let lasted = Duration::from_millis(now_ms().saturating_sub(run.started_ms));
                    return Adopt::Ended(Ended::disk_full(detail, lasted));
                }
                Adopt::Fresh
            }
        }
    }

    /// Start a shim and wait for its hello.
    async fn launch(&self) -> Result<Running, Ended> {
        let run_dir = &self.paths.run_dir;
        for path in [records::run_file(run_dir), records::exit_file(run_dir)] {
            if let Err(e) = records::remove_if_exists(&path) {
                return Err(Ended::spawn_failed("spawn-failed", e.to_string()));
            }
        }
        let spec = ShimSpec {
            run: self.spec.clone(),
            run_dir: run_dir.clone(),
            log_file: self.paths.log_file.clone(),
            log_max_bytes: self.policy.log_max_bytes,
            spec_hash: self.spec_hash.clone(),
            joining_groups: self.joining_groups.clone(),
        };
        let input = serde_json::to_vec(&spec).map_err(|e| {
            Ended::spawn_failed(
                "spawn-failed",
                format!("failed to encode the shim spec: {e}"),
            )
        })?;
        let exe = self.shim.exe.display().to_string();
        let mut child = match self.take_standby() {
            Some(standby) => standby.child,
            None => self.shim.command().spawn().map_err(|e| {
                Ended::spawn_failed(
                    "spawn-failed",
                    format!("failed to start the shim '{exe} shim': {e}"),
                )
            })?,
        };
        let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut child, &input)).await;
        let hello = match hello {
            Ok(Ok(hello)) => hello,
            Ok(Err(problem)) => {
                let stderr = read_stderr(&mut child).await;
                let _ = child.wait().await;
                let detail = if stderr.is_empty() {
                    problem
                } else {
                    format!("{problem}: {stderr}")
                };
                return Err(Ended::spawn_failed("spawn-failed", detail));
            }
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(Ended::spawn_failed(
                    "spawn-failed",
                    format!("the shim '{exe} shim' did not report within {HANDSHAKE_TIMEOUT:?}"),
                ));
            }
        };
        let service_pid = match (hello.service_pid, hello.error) {
            (Some(pid), _) => pid,
            (None, error) => {
                let _ = child.wait().await;
                let detail = error.unwrap_or_else(|| "the shim reported no pid".to_owned());
                let code = if hello.reason.as_deref() == Some(DISK_FULL) {
                    DISK_FULL
                } else {
                    "spawn-failed"
                };
                return Err(Ended::spawn_failed(code, detail));
            }
        };
        // The pipes are not used after the hello.
        drop(child.stdout.take());
        drop(child.stderr.take());
        let record = records::read_record::<RunRecord>(&records::run_file(run_dir))
            .ok()
            .flatten()
            .filter(|r| r.service_pid == service_pid);
        let (service_ticks, started_ms) = match record {
            Some(r) => (r.service_start_ticks, r.started_ms),
            None => (procfs::start_ticks(service_pid).unwrap_or(0), now_ms()),
        };
        // When the service's process began, in seconds since boot: the shim reports after it
        // has recorded the run, a moment later.
        let started_at = procfs::ticks_as_seconds(service_ticks)
            .filter(|_| service_ticks > 0)
            .map_or_else(|| "?".to_owned(), |at| format!("{at:.2}"));
        tracing::info!(
            target: "exoagent::supervise",
            service = %self.kind,
            pid = service_pid,
            started_at = %started_at,
            "service spawned"
        );
        self.set(
            ServiceState::Starting,
            ServiceUpdate {
                pid: Some(Some(service_pid)),
                ..Default::default()
            },
        );
        Ok(Running {
            handle: ShimHandle::Child(child),
            service_pid,
            service_ticks,
            pgid: service_pid as i32,
            started: Instant::now(),
            started_ms,
        })
    }

    /// The standby shim, unless there is none or it has already ended (then a new one starts).
    fn take_standby(&self) -> Option<StandbyShim> {
        let mut standby = self
            .standby
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()?;
        match standby.child.try_wait() {
            Ok(None) => Some(standby),
            Ok(Some(status)) => {
                tracing::warn!(target: "exoagent::supervise", service = %self.kind, %status, "the standby shim had ended; starting another");
                None
            }
            Err(e) => {
                tracing::warn!(target: "exoagent::supervise", service = %self.kind, error = %e, "the standby shim could not be checked; starting another");
                None
            }
        }
    }

    /// Probe and wait until the run ends (or `cancel` fires).
    async fn watch(&self, mut running: Running, cancel: &CancellationToken) -> Watch {
        let start_deadline = Instant::now() + self.start_timeout;
        let mut ready = false;
        let mut degraded = false;
        let mut failures = 0u32;
        let mut last_error: Option<ProbeError> = None;
        let mut next_probe = Instant::now();
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Watch::Cancelled,
                _ = running.handle.wait() => return Watch::Ended(self.collect_exit(&mut running)),
                _ = tokio::time::sleep_until(start_deadline), if !ready => {
                    if let Err(e) = terminate(running.pgid, &mut running.handle, STOP_GRACE).await {
                        tracing::warn!(target: "exoagent::supervise", service = %self.kind, "{e}");
                    }
                    let exit = self.collect_exit(&mut running);
                    let mut status = format!("not ready within {:?}", self.start_timeout);
                    if let Some(e) = &last_error {
                        status.push_str(&format!(" (last probe: {e})"));
                    }
                    return Watch::Ended(Ended { code: "start-timeout", status, ..exit });
                }
                result = async {
                    tokio::time::sleep_until(next_probe).await;
                    self.probe.check(PROBE_TIMEOUT).await
                } => {
                    match result {
                        Ok(()) => {
                            failures = 0;
                            last_error = None;
                            if !ready || degraded {
                                if !ready {
                                    tracing::info!(
                                        target: "exoagent::supervise",
                                        service = %self.kind,
                                        pid = running.service_pid,
                                        "service ready"
                                    );
                                }
                                ready = true;
                                degraded = false;
                                self.set(
                                    ServiceState::Ready,
                                    ServiceUpdate {
                                        pid: Some(Some(running.service_pid)),
                                        ..Default::default()
                                    },
                                );
                            }
                        }
                        Err(e) if ready => {
                            failures += 1;
                            if failures >= self.policy.liveness_failures.max(1) && !degraded {
                                degraded = true;
                                tracing::warn!(
                                    target: "exoagent::supervise",
                                    service = %self.kind,
                                    failures,
                                    "liveness probe failing: {e}"
                                );
                                self.set(
                                    ServiceState::Degraded,
                                    ServiceUpdate {
                                        reason: Some(Reason::new(
                                            "probe-failed",
                                            format!("{e} ({failures} times in a row)"),
                                        )),
                                        ..Default::default()
                                    },
                                );
                            }
                        }
                        Err(ProbeError::Failed { reason, detail, .. }) => {
                            tracing::warn!(
                                target: "exoagent::supervise",
                                service = %self.kind,
                                reason = %reason,
                                "the service cannot become ready: {detail}"
                            );
                            if let Err(e) =
                                terminate(running.pgid, &mut running.handle, STOP_GRACE).await
                            {
                                tracing::warn!(target: "exoagent::supervise", service = %self.kind, "{e}");
                            }
                            let _ = self.collect_exit(&mut running);
                            return Watch::Failed(Reason::new(&reason, detail));
                        }
                        Err(e) => last_error = Some(e),
                    }
                    next_probe = Instant::now()
                        + if ready {
                            self.liveness_delay()
                        } else {
                            self.policy.readiness_interval
                        };
                }
            }
        }
    }

    /// The liveness interval plus 0–10 % jitter.
    fn liveness_delay(&self) -> Duration {
        let base = self.policy.liveness_interval;
        let max_jitter = (base.as_millis() / 10) as u64;
        let jitter = if max_jitter == 0 {
            0
        } else {
            rand::thread_rng().gen_range(0..=max_jitter)
        };
        base + Duration::from_millis(jitter)
    }

    /// After the shim exited: how did the service end?
    fn collect_exit(&self, running: &mut Running) -> Ended {
        let lasted = running.started.elapsed();
        let path = records::exit_file(&self.paths.run_dir);
        match records::read_record::<ExitRecord>(&path) {
            Ok(Some(exit))
                if exit.service_pid == running.service_pid
                    && exit.ended_ms >= running.started_ms =>
            {
                Ended {
                    code: "exited",
                    status: exit.status_text(),
                    tail: exit.tail_text(TAIL_CHARS),
                    lasted,
                }
            }
            other => {
                if let Err(e) = other {
                    tracing::warn!(target: "exoagent::supervise", service = %self.kind, "{e}");
                }
                // The shim was killed before it could record the end; do not leave its
                // service running unsupervised.
                if procfs::is_alive(running.service_pid, running.service_ticks) {
                    let _ = signal_group(running.pgid, Signal::SIGKILL);
                }
                // A shim that could not write the record says why in its exit status; an
                // adopted one cannot, so look at the disk.
                let run_dir = &self.paths.run_dir;
                let no_space = match running.handle.exit_code() {
                    Some(shim::EXIT_DISK_FULL) => Some(
                        out_of_space(run_dir)
                            .unwrap_or_else(|| format!("no space left in '{}'", run_dir.display())),
                    ),
                    _ => out_of_space(run_dir),
                };
                if let Some(detail) = no_space {
                    return Ended::disk_full(detail, lasted);
                }
                Ended {
                    code: "shim-lost",
                    status: "the supervision shim ended without an exit record".to_owned(),
                    tail: String::new(),
                    lasted,
                }
            }
        }
    }
}

/// Send the spec, read the hello line.
async fn handshake(child: &mut tokio::process::Child, input: &[u8]) -> Result<ShimHello, String> {
    let Some(mut stdin) = child.stdin.take() else {
        return Err("the shim has no stdin".to_owned());
    };
    stdin
        .write_all(input)
        .await
        .map_err(|e| format!("failed to send the spec to the shim: {e}"))?;
    drop(stdin);
    let Some(stdout) = child.stdout.as_mut() else {
        return Err("the shim has no stdout".to_owned());
    };
    let mut line = String::new();
    let mut reader = BufReader::new(stdout.take(64 * 1024));
    reader
        .read_line(&mut line)
        .await
        .map_err(|e| format!("failed to read the shim's reply: {e}"))?;
    if line.trim().is_empty() {
        return Err("the shim exited without a reply".to_owned());
    }
    serde_json::from_str(line.trim()).map_err(|e| format!("invalid reply from the shim: {e}"))
}

async fn read_stderr(child: &mut tokio::process::Child) -> String {
    let Some(stderr) = child.stderr.as_mut() else {
        return String::new();
    };
    let mut text = String::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        stderr.take(4096).read_to_string(&mut text),
    )
    .await;
    text.trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(initial_ms: u64, max_ms: u64) -> SupervisePolicy {
        SupervisePolicy {
            backoff_initial: Duration::from_millis(initial_ms),
            backoff_max: Duration::from_millis(max_ms),
            ..SupervisePolicy::default()
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = policy(50, 200);
        let delays: Vec<u64> = (1..=6)
            .map(|n| backoff_delay(&p, n).as_millis() as u64)
            .collect();
        assert_eq!(delays, [50, 100, 200, 200, 200, 200]);
        assert_eq!(backoff_delay(&p, 0), Duration::from_millis(50));
        let p = policy(1000, 30_000);
        assert_eq!(backoff_delay(&p, 5), Duration::from_secs(16));
        assert_eq!(backoff_delay(&p, 6), Duration::from_secs(30));
        // No overflow for huge restart numbers.
        assert_eq!(backoff_delay(&p, u32::MAX), Duration::from_secs(30));
        // An initial delay above the cap is capped.
        assert_eq!(
            backoff_delay(&policy(500, 100), 1),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn failed_services_are_retried_from_backoff_max_doubling_to_twenty_times_it() {
        let p = SupervisePolicy::default();
        let delays: Vec<u64> = (1..=7).map(|n| retry_delay(&p, n).as_secs()).collect();
        assert_eq!(delays, [30, 60, 120, 240, 480, 600, 600]);
        assert_eq!(retry_delay(&p, u32::MAX), Duration::from_secs(600));
        for _ in 0..50 {
            let d = jittered(Duration::from_secs(30));
            assert!(
                d >= Duration::from_secs(30) && d <= Duration::from_secs(33),
                "{d:?}"
            );
        }
    }

    #[test]
    fn a_full_disk_is_named_with_its_path() {
        let error = SuperviseError::Io {
            action: "write",
            path: "/run/x/exit.json".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        };
        assert_eq!(error.reason(), DISK_FULL);
        assert!(error.to_string().contains("/run/x/exit.json"), "{error}");
        let other = SuperviseError::Io {
            action: "write",
            path: "/x".into(),
            source: std::io::Error::from_raw_os_error(libc::EACCES),
        };
        assert_eq!(other.reason(), "supervise-io-failed");
        // Another failure of the probe write is no false alarm.
        assert_eq!(out_of_space(Path::new("/nonexistent/dir")), None);
    }

    #[test]
    fn out_of_space_sees_a_full_tmpfs_and_cleans_up() {
        let Some(fs) = crate::fsutil::tests::TinyFs::mount(64) else {
            return;
        };
        assert_eq!(out_of_space(fs.path()), None);
        let filler = fs.fill();
        let detail = out_of_space(fs.path()).expect("full");
        assert!(
            detail.contains(&fs.path().display().to_string()),
            "{detail}"
        );
        std::fs::remove_file(filler).unwrap();
        assert_eq!(out_of_space(fs.path()), None);
        assert_eq!(
            std::fs::read_dir(fs.path()).unwrap().count(),
            0,
            "no files left"
        );
    }

    #[test]
    fn ended_detail_joins_status_and_tail() {
        let ended = Ended {
            code: "exited",
            status: "exited with status 3".into(),
            tail: "boom | bang".into(),
            lasted: Duration::ZERO,
        };
        assert_eq!(
            ended.detail(),
            "exited with status 3; last stderr: boom | bang"
        );
        let quiet = Ended::spawn_failed("spawn-failed", "failed to spawn 'x'".into());
        assert_eq!(quiet.detail(), "failed to spawn 'x'");
    }

    #[test]
    fn run_spec_hash_ignores_nothing_that_matters() {
        let spec = RunSpec {
            argv: vec!["python3".into()],
            env: vec![("A".into(), "1".into())],
            cwd: "/".into(),
            run_as: None,
        };
        let mut other = spec.clone();
        other.env[0].1 = "2".into();
        assert_ne!(records::spec_hash(&spec), records::spec_hash(&other));
        let mut other = spec.clone();
        other.run_as = Some(RunAs { uid: 1, gid: 1 });
        assert_ne!(records::spec_hash(&spec), records::spec_hash(&other));
        assert_eq!(records::spec_hash(&spec), records::spec_hash(&spec.clone()));
    }

    #[tokio::test]
    async fn stop_recorded_without_records_is_false() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!stop_recorded(dir.path(), Duration::from_secs(1))
            .await
            .unwrap());
        // A record of processes long gone is also "nothing running".
        let record = RunRecord {
            shim_pid: std::process::id(),
            shim_start_ticks: 1,
            service_pid: std::process::id(),
            service_start_ticks: 1,
            pgid: 999_999,
            spec_hash: String::new(),
            started_ms: 0,
        };
        records::write_record(&records::run_file(dir.path()), &record).unwrap();
        assert!(!stop_recorded(dir.path(), Duration::from_secs(1))
            .await
            .unwrap());
    }
}
