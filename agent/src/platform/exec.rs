//! Running a system tool: argv only, optional stdin, output captured, a readable failure; and
//! at which CPU priority tools and the agent's own background work run.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{ExitStatus, Stdio};

use tokio::io::AsyncWriteExt;

use crate::text;

/// The executable `name` in a directory of `PATH`, if there is one (what a command would run).
pub(crate) fn find_on_path(name: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// What a finished command left behind.
#[derive(Debug)]
pub(crate) struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// The last `n` non-empty lines of stderr (then stdout, when stderr is empty), joined.
    pub fn tail(&self, n: usize) -> String {
        let source = if self.stderr.trim().is_empty() {
            &self.stdout
        } else {
            &self.stderr
        };
        text::last_lines(source, n).join("\n")
    }
}

/// `program args…` shown for errors (never used for anything secret-bearing).
pub(crate) fn shown<S: AsRef<OsStr>>(program: &Path, args: &[S]) -> String {
    let mut text = program.display().to_string();
    for arg in args {
        text.push(' ');
        text.push_str(&arg.as_ref().to_string_lossy());
    }
    text
}

/// How much of the CPU a tool may take from others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Priority {
    /// As much as the agent.
    Normal,
    /// Little while others want it (10 nicer than the agent): for a tool nothing waits for
    /// while services start, which at boot would take CPU time from them on a small instance.
    Background,
}

/// The niceness of [`Priority::Background`].
const BACKGROUND_NICE: libc::c_int = 10;

/// `work` on a thread of its own at [`Priority::Background`] (Linux gives each thread its own
/// niceness), returning what it returns: for CPU work in the agent itself that nothing waits
/// for at once (an argon2 hash), which would otherwise take the CPU from services starting.
/// An error means the thread could not be started and `work` did not run.
pub(crate) fn at_background_priority<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<T> {
    let thread = std::thread::Builder::new()
        .name("exoagent-background".into())
        .spawn(move || {
            lower_to_background();
            work()
        })?;
    match thread.join() {
        Ok(done) => Ok(done),
        // A panic in `work` is the caller's.
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Make the calling thread [`BACKGROUND_NICE`] nicer than it is (Linux: PRIO_PROCESS with a
/// thread id changes that thread alone). A failure leaves it as it was. Async-signal-safe (two
/// system calls), so a child may call it between fork and exec.
fn lower_to_background() {
    let tid = this_thread();
    // SAFETY: plain system calls on the calling thread.
    unsafe {
        let current = libc::getpriority(libc::PRIO_PROCESS, tid);
        libc::setpriority(libc::PRIO_PROCESS, tid, (current + BACKGROUND_NICE).min(19));
    }
}

/// The calling thread's id (the system call: glibc's wrapper is newer than the oldest glibc the
/// release binary supports).
fn this_thread() -> libc::id_t {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as libc::id_t }
}

/// Run `program` with `args`, extra environment `env`, and `stdin` written to its standard
/// input (then closed); stdin is `/dev/null` when `None`.
pub(crate) async fn run<S: AsRef<OsStr>>(
    program: &Path,
    args: &[S],
    env: &[(&str, &str)],
    stdin: Option<&[u8]>,
) -> std::io::Result<Finished> {
    run_at(Priority::Normal, program, args, env, stdin).await
}

/// [`run`] at `priority`.
pub(crate) async fn run_at<S: AsRef<OsStr>>(
    priority: Priority,
    program: &Path,
    args: &[S],
    env: &[(&str, &str)],
    stdin: Option<&[u8]>,
) -> std::io::Result<Finished> {
    let mut command = tokio::process::Command::new(program);
    if priority == Priority::Background {
        // SAFETY: `lower_to_background` makes async-signal-safe system calls only. A failure
        // is ignored: the tool then runs at the agent's priority.
        unsafe {
            command.pre_exec(|| {
                lower_to_background();
                Ok(())
            });
        }
    }
    command
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        // Not killed when the caller is dropped: interrupting apt, useradd or chpasswd midway
        // could leave dpkg or the account files half-changed.
        .kill_on_drop(false);
    let started = std::time::Instant::now();
    let mut child = command.spawn()?;
    if let (Some(bytes), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(bytes).await?;
        pipe.shutdown().await?;
        drop(pipe);
    }
    let output = child.wait_with_output().await?;
    // The program only: arguments may name what is not the journal's business.
    tracing::debug!(target: "exoagent::exec", program = %program.display(), status = %output.status, elapsed_ms = started.elapsed().as_millis() as u64, "command finished");
    Ok(Finished {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn background_work_runs_10_nicer_on_its_own_thread_and_returns_its_result() {
        // SAFETY: plain system calls.
        let ours = unsafe { libc::getpriority(libc::PRIO_PROCESS, super::this_thread()) };
        let caller = std::thread::current().id();
        let (nice, thread) = super::at_background_priority(|| {
            // SAFETY: as above.
            let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, super::this_thread()) };
            (nice, std::thread::current().id())
        })
        .unwrap();
        assert_eq!(nice, (ours + 10).min(19));
        assert_ne!(thread, caller);
        // The caller's own priority is untouched.
        let after = unsafe { libc::getpriority(libc::PRIO_PROCESS, super::this_thread()) };
        assert_eq!(after, ours);
    }

    #[test]
    #[should_panic(expected = "inside the background work")]
    fn a_panic_in_background_work_reaches_the_caller() {
        let _ = super::at_background_priority(|| -> () { panic!("inside the background work") });
    }

    /// coreutils' `nice` without arguments prints its own niceness.
    #[tokio::test]
    async fn a_background_tool_runs_10_nicer_and_a_normal_one_as_we_do() {
        // SAFETY: a plain system call.
        let ours = i64::from(unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) });
        let ask = |priority| async move {
            let nice: &[&str] = &[];
            let done = super::run_at(priority, std::path::Path::new("nice"), nice, &[], None)
                .await
                .unwrap();
            assert!(done.status.success(), "{done:?}");
            done.stdout.trim().parse::<i64>().unwrap()
        };
        assert_eq!(ask(super::Priority::Normal).await, ours);
        assert_eq!(ask(super::Priority::Background).await, (ours + 10).min(19));
    }
}
