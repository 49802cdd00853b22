//! Running a system tool: argv only, optional stdin, output captured, a readable failure.

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

/// Run `program` with `args`, extra environment `env`, and `stdin` written to its standard
/// input (then closed); stdin is `/dev/null` when `None`.
pub(crate) async fn run<S: AsRef<OsStr>>(
    program: &Path,
    args: &[S],
    env: &[(&str, &str)],
    stdin: Option<&[u8]>,
) -> std::io::Result<Finished> {
    let mut command = tokio::process::Command::new(program);
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
    let mut child = command.spawn()?;
    if let (Some(bytes), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(bytes).await?;
        pipe.shutdown().await?;
        drop(pipe);
    }
    let output = child.wait_with_output().await?;
    Ok(Finished {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}
