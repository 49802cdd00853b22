//! The VNC side of the desktop: the errors of the server + session pair and the VNC password
//! file.
//!
//! Facts relied on: TigerVNC `Xvnc(1)` and `vncpasswd(1)`; TurboVNC `Xvnc.man`; VirtualGL
//! `doc/unixconfig.txt` (EGL back end).

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use crate::fsutil;

use super::session::Role;

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
    #[error("the VNC password file '{path}' does not exist (`vncpasswd -f` writes one)")]
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
            Self::PasswordWrite { .. } => "desktop-password-write-failed",
        }
    }
}

/// VNC's fixed DES key for password files (TigerVNC `common/rfb/obfuscate.cxx`,
/// `d3desObfuscationKey`; the same in TurboVNC's `vncauth.c`).
const VNC_FIXED_KEY: [u8; 8] = [23, 82, 107, 6, 35, 78, 88, 7];

/// The 8 bytes of a VNC password file for `passphrase`, as `vncpasswd -f` writes them: its first
/// 8 bytes (zero-padded), DES-encrypted under [`VNC_FIXED_KEY`]. VNC's DES (`d3des.c`) reads a
/// key byte's bits from the lowest, standard DES from the highest: each key byte is reversed.
/// An obfuscation every VNC server and viewer undoes, not a protection.
pub fn vnc_password_bytes(passphrase: &str) -> [u8; 8] {
    use des::cipher::{BlockEncrypt, KeyInit};
    let mut block = [0u8; 8];
    for (slot, byte) in block.iter_mut().zip(passphrase.bytes()) {
        *slot = byte;
    }
    let key = VNC_FIXED_KEY.map(u8::reverse_bits);
    let cipher = des::Des::new(&key.into());
    let mut block = block.into();
    cipher.encrypt_block(&mut block);
    block.into()
}

/// Write the VNC password file for `passphrase` to `path` ([`vnc_password_bytes`]: no
/// `vncpasswd` process, and the passphrase never leaves this one), atomically (temporary file +
/// rename) with mode 0600, owned by `uid`:`gid`, so the VNC server running as that user can read
/// it. A missing parent directory (typically `~/.vnc`) is created 0700 and owned likewise.
///
/// VNC authentication (RFB security type 2) uses **only the first 8 characters** of the
/// passphrase: keep the server on loopback and let the agent's login guard the real secret.
pub fn write_vnc_password(
    passphrase: &str,
    path: &Path,
    uid: u32,
    gid: u32,
) -> Result<(), DesktopError> {
    if passphrase.is_empty() {
        return Err(DesktopError::PasswordInvalid { detail: "empty" });
    }
    // What `vncpasswd -f` would refuse or cut: one line of text.
    if passphrase.contains(['\n', '\r', '\0']) {
        return Err(DesktopError::PasswordInvalid {
            detail: "contains a line break or NUL",
        });
    }
    let encoded = vnc_password_bytes(passphrase);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;
    use std::process::{Command, Stdio};

    fn me() -> (u32, u32) {
        (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        )
    }

    /// What the real `vncpasswd -f` (TigerVNC's, on this machine) prints for `passphrase`.
    fn real_vncpasswd(passphrase: &[u8]) -> Vec<u8> {
        let mut child = Command::new("vncpasswd")
            .arg("-f")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("FAIL, not run: TigerVNC's vncpasswd is not on PATH (tests/browser/setup.sh)");
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(passphrase).unwrap();
        stdin.write_all(b"\n").unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        out.stdout
    }

    #[test]
    fn the_password_bytes_are_what_the_real_vncpasswd_writes() {
        for passphrase in [
            "a",
            "exouser",
            "12345678",
            "correct horse battery staple",
            "unusual-outfit-exile-gauge-ridge",
            "ünïcödé!",
            "\u{7f}~ \t\u{1}",
        ] {
            assert_eq!(
                vnc_password_bytes(passphrase).to_vec(),
                real_vncpasswd(passphrase.as_bytes()),
                "{passphrase:?}"
            );
        }
        // Only the first 8 bytes count.
        assert_eq!(
            vnc_password_bytes("abcdefgh-one"),
            vnc_password_bytes("abcdefgh-two")
        );
    }

    #[test]
    fn the_file_is_private_and_its_directory_made() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("home/.vnc/passwd");
        fs::create_dir(dir.path().join("home")).unwrap();
        let (uid, gid) = me();
        write_vnc_password("correct horse", &target, uid, gid).unwrap();
        assert_eq!(
            fs::read(&target).unwrap(),
            vnc_password_bytes("correct horse")
        );
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

    #[test]
    fn passphrases_vncpasswd_would_cut_are_refused_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("passwd");
        let (uid, gid) = me();
        for bad in ["", "two\nlines", "carriage\rreturn", "nul\0byte"] {
            let err = write_vnc_password(bad, &target, uid, gid).unwrap_err();
            assert_eq!(err.reason(), "desktop-password-invalid");
        }
        assert!(!target.exists());
    }
}
