//! The VNC side of the desktop: the errors of the server + session pair and the VNC password
//! file.
//!
//! Facts relied on: TigerVNC `Xvnc(1)` and `vncpasswd(1)`; TurboVNC `Xvnc.man`; VirtualGL
//! `doc/unixconfig.txt` (EGL back end).

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};

use tokio::io::AsyncWriteExt;

use crate::fsutil;

use super::session::{Role, VncServer};

/// Why the desktop could not be set up or kept running.
#[derive(Debug, thiserror::Error)]
pub enum DesktopError {
    /// The desktop user is not in the user database, or could not be looked up.
    #[error("failed to look up the desktop user {user}: {detail}")]
    UserLookup {
        /// The name or uid looked up.
        user: String,
        /// What went wrong.
        detail: String,
    },
    /// The pair must run as another user and this process cannot switch to it.
    #[error("cannot run the desktop as '{user}' (uid {uid}): {detail}")]
    SwitchUser {
        /// The desktop user.
        user: String,
        /// Its uid.
        uid: u32,
        /// Why not.
        detail: String,
    },
    /// A live X server holds the display's lock file.
    #[error("display :{display} is in use by process {pid} (lock file '{lock}')")]
    DisplayInUse {
        /// The display number.
        display: u16,
        /// The pid in the lock file.
        pid: i32,
        /// The lock file.
        lock: PathBuf,
    },
    /// A stale lock file or socket of a dead X server could not be removed.
    #[error("failed to remove the stale X file '{path}': {source}")]
    StaleXFile {
        /// The lock file or socket.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// Something already accepts connections on the RFB port before the server starts.
    #[error("the RFB port {addr} is already in use")]
    PortInUse {
        /// The loopback address of the port.
        addr: std::net::SocketAddr,
    },
    /// The server or the session could not be started.
    #[error("failed to start the {role} '{program}': {source}")]
    Spawn {
        /// Which one.
        role: Role,
        /// The program.
        program: String,
        /// The I/O error.
        source: io::Error,
    },
    /// Waiting for the server or the session failed.
    #[error("failed to wait for the {role}: {source}")]
    Wait {
        /// Which one.
        role: Role,
        /// The I/O error.
        source: io::Error,
    },
    /// The VNC server did not accept a connection on its RFB port in time (it was stopped).
    #[error("the VNC server did not accept connections on {addr} within {timeout:?}")]
    ServerTimeout {
        /// The RFB address.
        addr: std::net::SocketAddr,
        /// How long it was given.
        timeout: std::time::Duration,
    },
    /// The VNC server ended (the session, if started, was stopped with it).
    #[error("the VNC server '{program}' ended ({status})")]
    ServerExited {
        /// The server program.
        program: String,
        /// How it ended.
        status: ExitStatus,
    },
    /// The desktop session ended, for instance because the user logged out (the server was
    /// stopped with it).
    #[error(
        "the desktop session '{program}' ended ({status}); the VNC server was stopped with it"
    )]
    SessionExited {
        /// The session program.
        program: String,
        /// How it ended.
        status: ExitStatus,
    },
    /// The VNC password file the server is to read does not exist.
    #[error("the VNC password file '{path}' does not exist (write it with `vncpasswd -f`)")]
    PasswordMissing {
        /// The file.
        path: PathBuf,
    },
    /// The passphrase cannot be turned into a VNC password.
    #[error("invalid VNC passphrase: {detail}")]
    PasswordInvalid {
        /// What is wrong (never the passphrase itself).
        detail: &'static str,
    },
    /// `vncpasswd -f` failed or printed something that is not a password file.
    #[error("'{program} -f' failed: {detail}")]
    PasswordTool {
        /// The vncpasswd program.
        program: PathBuf,
        /// Its exit status and stderr, or what was wrong with its output.
        detail: String,
    },
    /// The password file (or its directory) could not be written.
    #[error("failed to write the VNC password file '{path}': {source}")]
    PasswordWrite {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
}

impl DesktopError {
    /// A short stable code for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UserLookup { .. } => "desktop-user-unknown",
            Self::SwitchUser { .. } => "desktop-user-switch-failed",
            Self::DisplayInUse { .. } => "desktop-display-in-use",
            Self::StaleXFile { .. } => "desktop-stale-lock",
            Self::PortInUse { .. } => "desktop-port-in-use",
            Self::Spawn { .. } => "desktop-spawn-failed",
            Self::Wait { .. } => "desktop-wait-failed",
            Self::ServerTimeout { .. } => "desktop-server-timeout",
            Self::ServerExited { .. } => "desktop-server-exited",
            Self::SessionExited { .. } => "desktop-session-exited",
            Self::PasswordMissing { .. } => "desktop-password-missing",
            Self::PasswordInvalid { .. } => "desktop-password-invalid",
            Self::PasswordTool { .. } => "desktop-vncpasswd-failed",
            Self::PasswordWrite { .. } => "desktop-password-write-failed",
        }
    }
}

/// Write the VNC password file for `passphrase` to `path` with [`default_vncpasswd`]; see
/// [`write_vnc_password_with`].
///
/// VNC authentication (RFB security type 2) uses **only the first 8 characters** of the
/// passphrase: keep the server on loopback and let the agent's login guard the real secret.
pub async fn write_vnc_password(
    passphrase: &str,
    path: &Path,
    uid: u32,
    gid: u32,
) -> Result<(), DesktopError> {
    write_vnc_password_with(&default_vncpasswd(), passphrase, path, uid, gid).await
}

/// The `vncpasswd` to use: the one on `PATH` (TigerVNC's, Debian/Ubuntu package
/// `tigervnc-tools`), else TurboVNC's `/opt/TurboVNC/bin/vncpasswd`. Both write the same
/// 8-byte format, which both servers read.
pub fn default_vncpasswd() -> PathBuf {
    crate::platform::exec::find_on_path("vncpasswd")
        .or_else(|| {
            let turbo = VncServer::TurboVnc { virtualgl: false }.vncpasswd_program();
            turbo.is_file().then(|| turbo.to_path_buf())
        })
        .unwrap_or_else(|| PathBuf::from("vncpasswd"))
}

/// Write the VNC password file for `passphrase` to `path`: runs `<vncpasswd> -f` with the
/// passphrase on its standard input (never in argv, where any local user could read it), checks
/// the output is a password file, and writes it atomically (temporary file + rename) with mode
/// 0600, owned by `uid`:`gid`, so the VNC server running as that user can read it. A missing
/// parent directory (typically `~/.vnc`) is created 0700 and owned likewise.
///
/// `vncpasswd` is, for instance, [`VncServer::vncpasswd_program`]. VNC authentication uses
/// **only the first 8 characters** of the passphrase.
pub async fn write_vnc_password_with(
    vncpasswd: &Path,
    passphrase: &str,
    path: &Path,
    uid: u32,
    gid: u32,
) -> Result<(), DesktopError> {
    if passphrase.is_empty() {
        return Err(DesktopError::PasswordInvalid { detail: "empty" });
    }
    // vncpasswd -f reads one line; a line break would silently cut the passphrase.
    if passphrase.contains(['\n', '\r', '\0']) {
        return Err(DesktopError::PasswordInvalid {
            detail: "contains a line break or NUL",
        });
    }
    let encoded = run_vncpasswd(vncpasswd, passphrase).await?;
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DesktopError::PasswordWrite { path, source }
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .map_err(write_err(dir))?;
            std::os::unix::fs::chown(dir, Some(uid), Some(gid)).map_err(write_err(dir))?;
        }
    }
    // The encoding is deterministic: an unchanged password file is left alone.
    fsutil::write_if_changed(path, &encoded, 0o600, Some((uid, gid)))
        .map(drop)
        .map_err(write_err(path))
}

/// Run `<vncpasswd> -f` with `passphrase` on stdin; its stdout (binary) on success.
async fn run_vncpasswd(vncpasswd: &Path, passphrase: &str) -> Result<Vec<u8>, DesktopError> {
    let tool_err = |detail: String| DesktopError::PasswordTool {
        program: vncpasswd.to_path_buf(),
        detail,
    };
    let mut child = tokio::process::Command::new(vncpasswd)
        .arg("-f")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| tool_err(format!("failed to start: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        let mut line = Vec::with_capacity(passphrase.len() + 1);
        line.extend_from_slice(passphrase.as_bytes());
        line.push(b'\n');
        match stdin.write_all(&line).await {
            Ok(()) => {}
            // It ended without reading: its exit status and stderr below say why.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
            Err(e) => return Err(tool_err(format!("failed to write its stdin: {e}"))),
        }
        // Closing stdin is what tells it the input is complete.
        drop(stdin);
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(|e| tool_err(format!("failed to wait for it: {e}")))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(tool_err(format!("{}: {}", output.status, stderr.trim())));
    }
    // The file is the DES-obfuscated password: 8 bytes (TurboVNC appends 8 more for a
    // view-only password when one is given).
    if output.stdout.len() < 8 {
        return Err(tool_err(format!(
            "printed {} bytes, not a password file: {}",
            output.stdout.len(),
            stderr.trim()
        )));
    }
    Ok(output.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// A stand-in for vncpasswd: a shell script at `dir/name`. The executable is written by a
    /// `cp` child, never through a descriptor of this process: a descriptor open for writing
    /// leaks into children that other test threads fork meanwhile, and executing the file then
    /// fails with ETXTBSY.
    fn fake_tool(dir: &Path, name: &str, script: &str) -> PathBuf {
        let source = dir.join(format!("{name}.txt"));
        fs::write(&source, format!("#!/bin/sh\n{script}\n")).unwrap();
        let path = dir.join(name);
        let copied = std::process::Command::new("cp")
            .arg(&source)
            .arg(&path)
            .status()
            .unwrap();
        assert!(copied.success());
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn me() -> (u32, u32) {
        (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        )
    }

    #[tokio::test]
    async fn password_goes_through_stdin_into_a_private_file() {
        let dir = tempfile::tempdir().unwrap();
        // Echoes its argv and stdin, so the test sees where the passphrase travelled.
        let tool = fake_tool(dir.path(), "vncpasswd", r#"printf 'args=%s;' "$*"; cat"#);
        let target = dir.path().join("home/.vnc/passwd");
        fs::create_dir(dir.path().join("home")).unwrap();
        let (uid, gid) = me();
        write_vnc_password_with(&tool, "correct horse", &target, uid, gid)
            .await
            .unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"args=-f;correct horse\n");
        let file = fs::metadata(&target).unwrap();
        assert_eq!(file.mode() & 0o777, 0o600);
        assert_eq!((file.uid(), file.gid()), (uid, gid));
        let vnc_dir = fs::metadata(dir.path().join("home/.vnc")).unwrap();
        assert_eq!(vnc_dir.mode() & 0o777, 0o700);
        // No temporary file is left next to it.
        let names: Vec<_> = fs::read_dir(dir.path().join("home/.vnc"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("passwd")]);
    }

    #[tokio::test]
    async fn failing_or_silent_tool_and_bad_passphrases_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("passwd");
        let (uid, gid) = me();

        let failing = fake_tool(dir.path(), "failing", "echo 'no way' >&2; exit 3");
        let err = write_vnc_password_with(&failing, "secret-ish", &target, uid, gid)
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "desktop-vncpasswd-failed");
        assert!(err.to_string().contains("no way"), "{err}");
        assert!(!err.to_string().contains("secret-ish"), "{err}");

        let silent = fake_tool(dir.path(), "silent", "cat >/dev/null");
        let err = write_vnc_password_with(&silent, "secret-ish", &target, uid, gid)
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "desktop-vncpasswd-failed");
        assert!(err.to_string().contains("0 bytes"), "{err}");

        let missing = dir.path().join("absent");
        let err = write_vnc_password_with(&missing, "secret-ish", &target, uid, gid)
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "desktop-vncpasswd-failed");

        for bad in ["", "two\nlines", "nul\0byte"] {
            let err = write_vnc_password_with(&silent, bad, &target, uid, gid)
                .await
                .unwrap_err();
            assert_eq!(err.reason(), "desktop-password-invalid");
        }
        assert!(!target.exists());
    }
}
