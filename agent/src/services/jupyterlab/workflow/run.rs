//! Running one build command: an argv vector (never a shell string), as the instance user when
//! the agent is someone else, with a clean environment, in its own process group, bounded in
//! time, its stdout and stderr kept together so a failure carries the last lines it printed.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::platform::privileges::DropTo;
use crate::platform::process_group;

/// How many output lines a failure keeps, and how long each may be.
const TAIL_LINES: usize = 12;
const LINE_CHARS: usize = 240;
/// How much output is kept while reading (the end of it).
const KEEP_BYTES: usize = 64 * 1024;

/// Who runs a command, where, with what environment.
#[derive(Debug, Clone)]
pub struct RunAs {
    /// The account to switch to; `None` runs as the agent.
    pub drop_to: Option<DropTo>,
    /// The whole environment.
    pub env: Vec<(String, String)>,
    /// The working directory.
    pub cwd: PathBuf,
}

/// How a command ended.
#[derive(Debug)]
pub struct Ran {
    /// Whether it exited 0.
    pub success: bool,
    /// Its exit status, or the timeout, in words.
    pub status: String,
    /// Its stdout and stderr, interleaved (the last 64 KiB).
    pub output: String,
}

impl Ran {
    /// `'<command>' <status>: <last lines>`, bounded, for an error message.
    pub fn failure(&self, shown: &str) -> String {
        let lines: Vec<String> = crate::text::last_lines(&self.output, TAIL_LINES)
            .into_iter()
            .map(|l| {
                if l.chars().count() > LINE_CHARS {
                    format!("{}...", l.chars().take(LINE_CHARS).collect::<String>())
                } else {
                    l.to_owned()
                }
            })
            .collect();
        let shown: String = shown.chars().take(300).collect();
        if lines.is_empty() {
            format!("'{shown}' {}", self.status)
        } else {
            format!("'{shown}' {}: {}", self.status, lines.join(" | "))
        }
    }
}

/// The pipe a command's stdout and stderr go to, both ends close-on-exec: the agent starts
/// other processes from other threads meanwhile (a shim, a tool), and one that inherited the
/// write end would hold the reader's end of the output open for its whole life (the output
/// then lost to the read's timeout). The command's own copies (its stdout and stderr) are
/// made by `dup2`, which does not carry the flag.
fn output_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)
}

/// Run `argv` as `who` for at most `limit`; an error only when it could not be started.
pub async fn run(argv: &[String], who: &RunAs, limit: Duration) -> std::io::Result<Ran> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"))?;
    tracing::info!(target: "exoagent::services", service = "jupyterlab", command = %super::mask(&argv.join(" ")), "workflow step");
    let (read, write) = output_pipe()?;
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .env_clear()
        .envs(who.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(&who.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::from(write.try_clone()?))
        .stderr(Stdio::from(write))
        .process_group(0)
        .kill_on_drop(true);
    if let Some(drop_to) = who.drop_to.clone() {
        // SAFETY: `apply` only makes async-signal-safe calls on memory prepared before fork.
        unsafe {
            command.pre_exec(move || drop_to.apply());
        }
    }
    let spawned = command.spawn();
    // The parent's copies of the pipe's write end go with the command, so the reader sees
    // the end of the output once the group is gone.
    drop(command);
    let mut child = spawned?;
    let pgid = child.id().map(|id| Pid::from_raw(id as i32));
    let reader = tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::from(read);
        let mut kept: Vec<u8> = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match file.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    kept.extend_from_slice(&buf[..n]);
                    if kept.len() > 2 * KEEP_BYTES {
                        kept.drain(..kept.len() - KEEP_BYTES);
                    }
                }
            }
        }
        let start = kept.len().saturating_sub(KEEP_BYTES);
        String::from_utf8_lossy(&kept[start..]).into_owned()
    });
    let status = match tokio::time::timeout(limit, child.wait()).await {
        Ok(status) => Some(status?),
        Err(_) => None,
    };
    // Whatever it left behind in its group goes too (a daemon started by postBuild would
    // otherwise hold the output pipe open).
    if let Some(pgid) = pgid {
        let _ = process_group::signal(pgid, Signal::SIGKILL);
    }
    if status.is_none() {
        let _ = child.wait().await;
    }
    let output = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    Ok(match status {
        Some(status) => Ran {
            success: status.success(),
            status: format!("failed ({status})"),
            output,
        },
        None => Ran {
            success: false,
            status: format!("timed out after {} s", limit.as_secs()),
            output,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_output_pipe_is_not_inherited_by_other_processes() {
        use std::os::fd::AsRawFd;
        let (read, write) = output_pipe().unwrap();
        for fd in [read.as_raw_fd(), write.as_raw_fd()] {
            let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
            assert!(
                nix::fcntl::FdFlag::from_bits_truncate(flags).contains(nix::fcntl::FdFlag::FD_CLOEXEC),
                "fd {fd} is inherited across exec"
            );
        }
    }

    fn here() -> RunAs {
        RunAs {
            drop_to: None,
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            cwd: std::env::temp_dir(),
        }
    }

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn output_of_both_streams_and_the_status_are_kept() {
        let ran = run(
            &argv(&["sh", "-c", "echo out; echo err >&2; exit 3"]),
            &here(),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert!(!ran.success);
        let failure = ran.failure("sh -c ...");
        assert!(failure.contains("exit status: 3"), "{failure}");
        assert!(failure.contains("out | err"), "{failure}");
    }

    #[tokio::test]
    async fn a_failure_keeps_a_bounded_tail() {
        let ran = run(
            &argv(&[
                "python3",
                "-c",
                "import sys\nfor i in range(20000): print(str(i) * 400)\nprint('the end')\nsys.exit(1)",
            ]),
            &here(),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
        assert!(ran.output.len() <= KEEP_BYTES, "{}", ran.output.len());
        let failure = ran.failure("python3 -c ...");
        assert!(failure.ends_with("the end"), "{failure}");
        assert!(failure.len() < TAIL_LINES * (LINE_CHARS + 10) + 400, "{}", failure.len());
    }

    #[tokio::test]
    async fn a_command_over_its_time_is_stopped_with_its_group() {
        let started = std::time::Instant::now();
        let ran = run(
            &argv(&["sh", "-c", "sleep 30 & echo started; sleep 30"]),
            &here(),
            Duration::from_millis(500),
        )
        .await
        .unwrap();
        assert!(!ran.success);
        assert!(ran.status.contains("timed out"), "{}", ran.status);
        assert!(ran.output.contains("started"), "{}", ran.output);
        assert!(started.elapsed() < Duration::from_secs(15));
    }

    #[tokio::test]
    async fn commands_run_as_the_account_they_are_given() {
        let mut who = here();
        who.drop_to = Some(DropTo::without_supplementary_groups(65534, 65534));
        let ran = run(&argv(&["id", "-u"]), &who, Duration::from_secs(10)).await;
        if nix::unistd::geteuid().is_root() {
            let ran = ran.unwrap();
            assert!(ran.success, "{ran:?}");
            assert_eq!(ran.output.trim(), "65534");
        } else {
            // Without root the switch fails and the command never runs.
            assert!(ran.is_err());
        }
    }

    #[tokio::test]
    async fn the_environment_is_only_what_is_given() {
        std::env::set_var("EXOAGENT_TEST_LEAK", "leaked");
        let ran = run(&argv(&["env"]), &here(), Duration::from_secs(10))
            .await
            .unwrap();
        assert!(ran.success);
        assert!(!ran.output.contains("leaked"), "{}", ran.output);
    }
}
