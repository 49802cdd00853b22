//! Signalling a process group: never "every process" or init's group, a group that is already
//! gone counts as done, and stopping escalates from SIGTERM to SIGKILL after a grace period.

use std::future::Future;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// A signal could not be delivered to a group for another reason than the group being gone.
#[derive(Debug, thiserror::Error)]
#[error("failed to send {} to process group {pgid}: {source}", signal.as_str())]
pub struct SignalError {
    /// The process group.
    pub pgid: Pid,
    /// The signal.
    pub signal: Signal,
    /// The errno.
    pub source: Errno,
}

/// How [`terminate`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// `gone` completed within the grace period after SIGTERM.
    Terminated,
    /// It did not; the group was sent SIGKILL (the caller decides how long to wait after it).
    Killed,
}

/// Send `signal` to group `pgid`. Groups 0 and 1 are refused silently (whatever a record
/// says), and ESRCH (nobody left) is success.
pub fn signal(pgid: Pid, signal: Signal) -> Result<(), SignalError> {
    if pgid.as_raw() <= 1 {
        return Ok(());
    }
    match killpg(pgid, signal) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(source) => Err(SignalError {
            pgid,
            signal,
            source,
        }),
    }
}

/// Whether any process, zombies included, is left in group `pgid`.
pub fn exists(pgid: Pid) -> bool {
    !matches!(killpg(pgid, None), Err(Errno::ESRCH))
}

/// SIGTERM the group, wait up to `grace` for `gone`, then SIGKILL the group.
pub async fn terminate(
    pgid: Pid,
    grace: Duration,
    gone: impl Future,
) -> Result<Stopped, SignalError> {
    signal(pgid, Signal::SIGTERM)?;
    if tokio::time::timeout(grace, gone).await.is_ok() {
        return Ok(Stopped::Terminated);
    }
    signal(pgid, Signal::SIGKILL)?;
    Ok(Stopped::Killed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    fn spawn_group(script: &str) -> std::process::Child {
        let mut command = Command::new("sh");
        command.args(["-c", script]).process_group(0);
        command.spawn().unwrap()
    }

    fn pgid_of(child: &std::process::Child) -> Pid {
        Pid::from_raw(child.id() as i32)
    }

    #[test]
    fn init_and_every_process_are_never_signalled() {
        // Would be fatal to the test run if it were sent.
        signal(Pid::from_raw(0), Signal::SIGKILL).unwrap();
        signal(Pid::from_raw(1), Signal::SIGKILL).unwrap();
        signal(Pid::from_raw(-1), Signal::SIGKILL).unwrap();
    }

    #[test]
    fn a_gone_group_is_success_and_does_not_exist() {
        let mut child = spawn_group("exit 0");
        let pgid = pgid_of(&child);
        child.wait().unwrap();
        assert!(!exists(pgid));
        signal(pgid, Signal::SIGTERM).unwrap();
    }

    #[tokio::test]
    async fn a_group_that_obeys_sigterm_is_terminated() {
        let mut child = spawn_group("sleep 30");
        let pgid = pgid_of(&child);
        assert!(exists(pgid));
        let gone = async {
            while child.try_wait().unwrap().is_none() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let stopped = terminate(pgid, Duration::from_secs(10), gone).await;
        assert_eq!(stopped.unwrap(), Stopped::Terminated);
    }

    #[tokio::test]
    async fn a_group_that_ignores_sigterm_is_killed_after_the_grace() {
        let mut child = Command::new("sh")
            .args(["-c", "trap '' TERM; echo ready; while :; do sleep 1; done"])
            .process_group(0)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pgid = pgid_of(&child);
        // Once the shell says so, the trap is set.
        let mut ready = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut ready,
        )
        .unwrap();
        assert_eq!(ready, "ready\n");
        let started = std::time::Instant::now();
        let stopped = terminate(
            pgid,
            Duration::from_millis(300),
            std::future::pending::<()>(),
        )
        .await
        .unwrap();
        assert_eq!(stopped, Stopped::Killed);
        assert!(started.elapsed() >= Duration::from_millis(300));
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }
}
