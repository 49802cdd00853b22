//! The agent process's own start: seconds since boot for its log lines and its timing of
//! itself, and the early read of its executable.

/// Seconds since boot (`CLOCK_MONOTONIC`, the clock of the journal's monotonic stamps and of
/// the kernel's lines); `None` if the clock cannot be read.
pub fn since_boot() -> Option<f64> {
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
pub fn process_started() -> Option<f64> {
    use crate::platform::procfs;
    procfs::ticks_as_seconds(procfs::start_ticks(std::process::id())?)
}

/// The time as seconds since boot (`CLOCK_MONOTONIC`), to the millisecond: `31.482`.
#[derive(Debug, Clone, Copy)]
pub struct SinceBoot;

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
pub fn prefetch_own_executable() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_started_before_now_on_the_boot_clock() {
        let now = since_boot().expect("CLOCK_MONOTONIC");
        let started = process_started().expect("/proc/self/stat");
        // Clock ticks are 10 ms: the start is rounded down to one.
        assert!(started <= now + 0.01, "started {started} after now {now}");
        assert!(since_boot().unwrap() >= now);
    }
}
