//! The `exoagent` binary: parse the command line, set up logging, dispatch into the library.

use clap::Parser;
use exoagent::cli::{Cli, Command};
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let entered = since_boot();
    let cli = Cli::parse();
    let agent = matches!(cli.command, Command::Run(_));
    if agent {
        prefetch_own_executable();
    }
    // The shim's stderr is a service's log; the login banner prints its block and nothing else.
    if !matches!(cli.command, Command::Shim | Command::Motd(_)) {
        init_tracing(&cli);
    }
    if agent {
        // Seconds since boot: the process's start (fork, in clock ticks), `main` entered (after
        // the exec and the loader); what follows this line is the agent's own work.
        let secs = |at: Option<f64>| at.map_or_else(|| "?".to_owned(), |at| format!("{at:.3}"));
        tracing::info!(target: "exoagent::agent", process_started = %secs(process_started()), main_entered = %secs(entered), "agent starting");
    }
    exoagent::cli::dispatch(cli)
}

/// Seconds since boot (`CLOCK_MONOTONIC`, the clock of the journal's monotonic stamps and of
/// the kernel's lines); `None` if the clock cannot be read.
fn since_boot() -> Option<f64> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into `now`, a valid timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) } != 0 {
        return None;
    }
    Some(now.tv_sec as f64 + now.tv_nsec as f64 / 1e9)
}

/// When this process began, in seconds since boot (`/proc/self/stat`'s start time, in clock
/// ticks); `None` when procfs cannot tell.
fn process_started() -> Option<f64> {
    use exoagent::supervise::procfs;
    procfs::ticks_as_seconds(procfs::start_ticks(std::process::id())?)
}

/// Logs go to stderr (stdout stays clean for `--json` and the sandbox's console lines). Under
/// systemd no wall-clock time (journald adds its own), but the seconds since boot when the line
/// was written: journald stamps a line when it reads it, late when it is busy at boot, and the
/// boot clock is what the journal's monotonic stamps and the kernel's lines use.
fn init_tracing(cli: &Cli) {
    let quiet_by_default = matches!(
        cli.command,
        Command::Status(_)
            | Command::Logs(_)
            | Command::Validate(_)
            | Command::Down(_)
            | Command::Userdata(_)
            | Command::Install(_)
            | Command::Generate(_)
    );
    let default = match (cli.verbose, quiet_by_default) {
        (0, true) => "warn",
        (0, false) => "info",
        (1, _) => "debug",
        _ => "trace",
    };
    let filter = std::env::var("EXOAGENT_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .and_then(|spec| EnvFilter::try_new(spec).ok())
        .unwrap_or_else(|| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal, never into journals or log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(true);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.with_timer(SinceBoot).init();
    } else {
        builder.init();
    }
}

/// The time as seconds since boot (`CLOCK_MONOTONIC`), to the millisecond: `31.482`.
struct SinceBoot;

impl tracing_subscriber::fmt::time::FormatTime for SinceBoot {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        match since_boot() {
            Some(at) => write!(w, "{at:.3}"),
            None => Ok(()),
        }
    }
}

/// Ask the kernel to read this executable into the page cache now, in the background. At boot
/// none of it is cached, and its code is otherwise read a fault at a time as it first runs,
/// scattered over the agent's start (each read a noticeable wait on a small instance or under
/// emulation); one readahead of the whole file is a sequential read the disk does meanwhile.
/// Advice only, on a thread of its own (queuing the reads takes a moment): nothing fails or
/// waits when it cannot be given.
fn prefetch_own_executable() {
    use std::os::fd::AsRawFd;
    let _ = std::thread::Builder::new()
        .name("prefetch".into())
        .spawn(|| {
            if let Ok(exe) = std::fs::File::open("/proc/self/exe") {
                // SAFETY: posix_fadvise only reads the descriptor, valid while `exe` lives.
                unsafe {
                    libc::posix_fadvise(exe.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED);
                }
            }
        });
}
