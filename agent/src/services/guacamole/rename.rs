//! Completing an upload made over HTTP (docs/guacamole.md, "Cancel and partial files"): the
//! page opens guacd's stream under a temporary name, `<name>.incomplete-upload`, in the file's
//! own folder; once guacd has acked every blob and the `end` (the file is written and closed),
//! the web side renames it to `<name>` itself. guacd's SFTP opens its target with `O_TRUNC` and
//! the Guacamole protocol has no rename, so without this a cut upload would leave a partial
//! file under the final name.
//!
//! The web side runs as the instance user, the user guacd's SFTP logs in as over loopback, so
//! it sees the same files. It renames only when the connection's SFTP goes to loopback as its
//! own user, only the name the relay saw in the stream's `file`/`put` instruction, and only to
//! the name the POST's URL gives with the suffix taken off (a plain file name, never a path).
//! A page could already write any file the user may write through SFTP, so the rename gives
//! it nothing new. Paths are worked out exactly as guacd 1.3.0 does (`src/common-ssh/sftp.c`,
//! `src/protocols/ssh/ssh.c`, `src/protocols/vnc/vnc.c`): `put` names are normalised and
//! appended to `sftp-root-directory` (default `/`); `file` uploads go to `sftp-directory` (VNC)
//! or the SFTP server's starting folder, the user's home. The web side's confinement lets it
//! rename beneath that home folder only (`cli.rs`); elsewhere the rename fails and says so.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// What the page appends to a file's name while it uploads over HTTP.
pub const SUFFIX: &str = ".incomplete-upload";
/// guacd's `GUAC_COMMON_SSH_SFTP_MAX_PATH` (bytes, with the terminating NUL).
const MAX_PATH: usize = 2048;
/// guacd's `GUAC_COMMON_SSH_SFTP_MAX_DEPTH`.
const MAX_DEPTH: usize = 64;
/// The longest file name Linux filesystems take (`NAME_MAX`).
const NAME_MAX: usize = 255;

/// How the page opened an upload stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// `file,<stream>,<mimetype>,<filename>`: into the connection's upload folder.
    File(String),
    /// `put,<object>,<stream>,<mimetype>,<name>`: at a path of the filesystem object.
    Put(String),
}

/// Why an upload is not (or cannot be) renamed to its final name.
#[derive(Debug, thiserror::Error)]
pub enum RenameError {
    /// The final name from the URL is not a plain file name.
    #[error("the file name {0:?} is not a plain file name (empty, `.`, `..`, a slash, a NUL or too long)")]
    BadName(String),
    /// The connection's SFTP does not reach this machine as the web side's own user.
    #[error("this connection's file transfer is not to this machine as the web side's user, so the web side cannot rename the upload")]
    NotLocal,
    /// Which folder guacd writes into is not known for this connection.
    #[error("the folder guacd uploads into is not known for this connection ({0})")]
    UnknownFolder(&'static str),
    /// The stream was not opened under the temporary name of the URL's file name.
    #[error("the stream was not opened as {expected:?}")]
    NotTemporary {
        /// The name the stream should have been opened with.
        expected: String,
    },
    /// The temporary file is not there, not a plain file, or not the size uploaded.
    #[error("{path} is not the uploaded file ({why})")]
    Mismatch {
        /// The temporary file.
        path: PathBuf,
        /// What was found.
        why: String,
    },
    /// The rename itself failed.
    #[error("could not rename {from} to {to}: {source}")]
    Io {
        /// The temporary file.
        from: PathBuf,
        /// The final name.
        to: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
}

impl RenameError {
    /// Short stable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::BadName(_) => "upload-bad-name",
            Self::NotLocal => "upload-not-local",
            Self::UnknownFolder(_) => "upload-folder-unknown",
            Self::NotTemporary { .. } => "upload-not-temporary",
            Self::Mismatch { .. } => "upload-temp-mismatch",
            Self::Io { .. } => "upload-rename-failed",
        }
    }
}

/// The web side's own user: its name and home folder (where an SFTP session starts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnUser {
    /// Login name.
    pub name: String,
    /// Home folder from the password database.
    pub home: PathBuf,
}

impl OwnUser {
    /// The user this process runs as, if the password database knows it; looked up once (the
    /// web side does so before its confinement forbids reading `/etc/passwd`).
    pub fn current() -> Option<Self> {
        static OWN: std::sync::OnceLock<Option<OwnUser>> = std::sync::OnceLock::new();
        OWN.get_or_init(|| {
            let user = nix::unistd::User::from_uid(nix::unistd::geteuid()).ok()??;
            Some(Self {
                name: user.name,
                home: user.dir,
            })
        })
        .clone()
    }
}

/// Where guacd's SFTP writes on one connection, as this machine's filesystem sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftpPlace {
    /// The filesystem object's root (`sftp-root-directory`, normalised; `/` by default).
    root: String,
    /// The folder `file` uploads go to; `None` when guacd versions disagree on it.
    upload_folder: Result<PathBuf, &'static str>,
}

impl SftpPlace {
    /// The place for a connection (`protocol`, its `parameters`), or why the web side cannot
    /// rename its uploads.
    pub fn for_connection(
        protocol: &str,
        parameters: &BTreeMap<String, String>,
        own: &OwnUser,
    ) -> Result<Self, RenameError> {
        let get = |k: &str| parameters.get(k).map(String::as_str).filter(|v| !v.is_empty());
        if get("enable-sftp") != Some("true") {
            return Err(RenameError::NotLocal);
        }
        // SSH's SFTP rides its own session; VNC's has its own host (default: the VNC host)
        // and user.
        let (host, user) = match protocol {
            "ssh" => (get("hostname"), get("username")),
            "vnc" => (
                get("sftp-hostname").or(get("hostname")),
                get("sftp-username"),
            ),
            _ => (None, None),
        };
        let loopback = host.is_some_and(|h| {
            h == "localhost" || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
        });
        if !loopback || user != Some(own.name.as_str()) {
            return Err(RenameError::NotLocal);
        }
        let root = match get("sftp-root-directory") {
            None => "/".to_owned(),
            Some(root) => normalize(root).ok_or(RenameError::UnknownFolder(
                "sftp-root-directory is not an absolute path",
            ))?,
        };
        // guacd 1.3.0 starts with the upload path "." (the SFTP server's starting folder, the
        // user's home) and sets it from `sftp-directory` for VNC only; later versions use
        // `sftp-root-directory` for SSH, so with a root and no folder the place is not known.
        let upload_folder = match (protocol, get("sftp-directory")) {
            ("vnc", Some(dir)) if dir.starts_with('/') => Ok(PathBuf::from(dir)),
            ("vnc", Some(dir)) => Ok(own.home.join(dir)),
            _ if get("sftp-root-directory").is_some() => {
                Err("sftp-root-directory without sftp-directory")
            }
            _ => Ok(own.home.clone()),
        };
        Ok(Self {
            root,
            upload_folder,
        })
    }

    /// The temporary file and the final one for an upload opened as `opened` whose POST names
    /// `final_name`.
    pub fn paths(
        &self,
        opened: &Opened,
        final_name: &str,
    ) -> Result<(PathBuf, PathBuf), RenameError> {
        let final_name = plain_name(final_name)?;
        let temporary = format!("{final_name}{SUFFIX}");
        let not_temporary = || RenameError::NotTemporary {
            expected: temporary.clone(),
        };
        let folder = match opened {
            Opened::File(name) => {
                if *name != temporary {
                    return Err(not_temporary());
                }
                self.upload_folder
                    .clone()
                    .map_err(RenameError::UnknownFolder)?
            }
            Opened::Put(name) => {
                let path = normalize(name).ok_or_else(not_temporary)?;
                let (parent, last) = path.rsplit_once('/').ok_or_else(not_temporary)?;
                if last != temporary {
                    return Err(not_temporary());
                }
                under_root(&self.root, parent)
            }
        };
        Ok((folder.join(&temporary), folder.join(final_name)))
    }

    /// The file on this machine that guacd reads for a download answering a `get` of stream
    /// name `name` (the `body`'s name), worked out as guacd's `guac_common_ssh_sftp_get_handler`
    /// does: normalised, then appended to the root. `None` when guacd would refuse the name
    /// (not absolute, too long, too deep) or when the result is not beneath the root.
    pub fn download_path(&self, name: &str) -> Option<PathBuf> {
        let path = under_root(&self.root, &normalize(name)?);
        // guac_ssh_append_path refuses a result of MAX_PATH bytes or more.
        if path.as_os_str().len() >= MAX_PATH || !path.starts_with(&self.root) {
            return None;
        }
        Some(path)
    }
}

/// guacd's `guac_ssh_append_path`: the (normalised) root, one slash, the normalised name.
fn under_root(root: &str, normalized: &str) -> PathBuf {
    PathBuf::from(format!(
        "{}/{}",
        root.trim_end_matches('/'),
        normalized.trim_start_matches('/')
    ))
}

/// `name` if it is a plain file name that takes the suffix: not empty, `.` or `..`, without
/// `/`, `\` (guacd splits on both) or NUL, short enough.
pub fn plain_name(name: &str) -> Result<&str, RenameError> {
    let bad = name.is_empty()
        || name == "."
        || name == ".."
        || name.contains(['/', '\\', '\0'])
        || name.len() + SUFFIX.len() > NAME_MAX;
    if bad {
        return Err(RenameError::BadName(name.to_owned()));
    }
    Ok(name)
}

/// An absolute stream name normalised as guacd's `guac_common_ssh_sftp_normalize_path` does:
/// `/` and `\` separate, `.` and empty parts go, `..` climbs (never above the root); `None`
/// when not absolute, too long or too deep.
fn normalize(path: &str) -> Option<String> {
    if !path.starts_with(['/', '\\']) || path.len() >= MAX_PATH {
        return None;
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in path[1..].split(['/', '\\']) {
        match part {
            ".." => {
                parts.pop();
            }
            "." | "" => {}
            part => {
                if parts.len() == MAX_DEPTH {
                    return None;
                }
                parts.push(part);
            }
        }
    }
    Some(format!("/{}", parts.join("/")))
}

/// Renames `temporary` to `target` once it is a plain file of `size` bytes (the bytes guacd
/// acked); replaces an existing `target` as guacd's truncating open would have.
pub fn complete(temporary: &Path, target: &Path, size: u64) -> Result<(), RenameError> {
    let mismatch = |why: String| RenameError::Mismatch {
        path: temporary.to_owned(),
        why,
    };
    let meta = std::fs::symlink_metadata(temporary).map_err(|e| mismatch(e.to_string()))?;
    if !meta.is_file() {
        return Err(mismatch("not a plain file".to_owned()));
    }
    if meta.len() != size {
        return Err(mismatch(format!("{} bytes, {size} uploaded", meta.len())));
    }
    std::fs::rename(temporary, target).map_err(|source| RenameError::Io {
        from: temporary.to_owned(),
        to: target.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own() -> OwnUser {
        OwnUser {
            name: "exouser".into(),
            home: PathBuf::from("/home/exouser"),
        }
    }

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn shell() -> BTreeMap<String, String> {
        params(&[
            ("hostname", "127.0.0.1"),
            ("username", "exouser"),
            ("enable-sftp", "true"),
        ])
    }

    #[test]
    fn file_uploads_land_in_the_home_folder_and_put_ones_under_the_root() {
        let place = SftpPlace::for_connection("ssh", &shell(), &own()).unwrap();
        let (temp, target) = place
            .paths(&Opened::File("a b.bin.incomplete-upload".into()), "a b.bin")
            .unwrap();
        assert_eq!(temp, Path::new("/home/exouser/a b.bin.incomplete-upload"));
        assert_eq!(target, Path::new("/home/exouser/a b.bin"));
        // guacd's normalisation: backslashes, `.`, `..` (clamped at the root), doubled slashes.
        let (temp, target) = place
            .paths(
                &Opened::Put("/../tmp/./x\\y//d.txt.incomplete-upload".into()),
                "d.txt",
            )
            .unwrap();
        assert_eq!(temp, Path::new("/tmp/x/y/d.txt.incomplete-upload"));
        assert_eq!(target, Path::new("/tmp/x/y/d.txt"));
    }

    #[test]
    fn a_root_and_an_upload_folder_are_honoured_as_guacd_does() {
        let mut p = shell();
        p.insert("sftp-root-directory".into(), "/srv//data/".into());
        let place = SftpPlace::for_connection("ssh", &p, &own()).unwrap();
        let (temp, _) = place
            .paths(&Opened::Put("/../in/f.incomplete-upload".into()), "f")
            .unwrap();
        assert_eq!(temp, Path::new("/srv/data/in/f.incomplete-upload"));
        // guacd versions disagree on where `file` goes then: no rename.
        let err = place
            .paths(&Opened::File("f.incomplete-upload".into()), "f")
            .unwrap_err();
        assert_eq!(err.reason(), "upload-folder-unknown");

        let desktop = |dir: &str| {
            params(&[
                ("hostname", "127.0.0.1"),
                ("enable-sftp", "true"),
                ("sftp-username", "exouser"),
                ("sftp-directory", dir),
            ])
        };
        for (dir, want) in [("/data/up", "/data/up/f"), ("up", "/home/exouser/up/f")] {
            let place = SftpPlace::for_connection("vnc", &desktop(dir), &own()).unwrap();
            let (_, target) = place
                .paths(&Opened::File("f.incomplete-upload".into()), "f")
                .unwrap();
            assert_eq!(target, Path::new(want));
        }
    }

    #[test]
    fn a_download_path_is_mapped_as_guacd_opens_it_and_never_leaves_the_root() {
        let place = SftpPlace::for_connection("ssh", &shell(), &own()).unwrap();
        assert_eq!(
            place.download_path("/home/exouser/big.iso"),
            Some(PathBuf::from("/home/exouser/big.iso"))
        );
        assert_eq!(
            place.download_path("/../tmp/./x\\y//d.txt"),
            Some(PathBuf::from("/tmp/x/y/d.txt"))
        );
        let mut p = shell();
        p.insert("sftp-root-directory".into(), "/srv//data/".into());
        let place = SftpPlace::for_connection("ssh", &p, &own()).unwrap();
        assert_eq!(
            place.download_path("/in/f.bin"),
            Some(PathBuf::from("/srv/data/in/f.bin"))
        );
        // `..` climbs no higher than the root, as guacd's normalisation.
        for escape in ["/../../etc/passwd", "/in/../../../etc/passwd", "\\..\\..\\etc\\passwd"] {
            let path = place.download_path(escape).unwrap();
            assert!(path.starts_with("/srv/data"), "{escape:?} → {path:?}");
            assert_eq!(path, Path::new("/srv/data/etc/passwd"));
        }
        // What guacd refuses is not mapped: not absolute, too long, too deep.
        let long = format!("/{}", "x".repeat(MAX_PATH));
        let deep = "/d".repeat(MAX_DEPTH + 1);
        for bad in ["", "etc/passwd", "../etc/passwd", long.as_str(), deep.as_str()] {
            assert_eq!(place.download_path(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn bad_final_names_are_refused() {
        let place = SftpPlace::for_connection("ssh", &shell(), &own()).unwrap();
        let long = "x".repeat(NAME_MAX);
        for bad in ["", ".", "..", "a/b", "../x", "a\\b", "a\0b", long.as_str()] {
            let err = place
                .paths(&Opened::File(format!("{bad}{SUFFIX}")), bad)
                .unwrap_err();
            assert_eq!(err.reason(), "upload-bad-name", "{bad:?}");
        }
    }

    #[test]
    fn only_the_temporary_name_the_stream_was_opened_with_is_renamed() {
        let place = SftpPlace::for_connection("ssh", &shell(), &own()).unwrap();
        for (opened, name) in [
            // Opened under the final name (the blob path's way): nothing to rename.
            (Opened::File("a.bin".into()), "a.bin"),
            // Another file's temporary name.
            (Opened::File("b.bin.incomplete-upload".into()), "a.bin"),
            (Opened::Put("/home/exouser/.bashrc".into()), ".bashrc"),
            (Opened::Put("/x/b.incomplete-upload/a".into()), "a"),
            // Not absolute: guacd refuses it.
            (Opened::Put("a.incomplete-upload".into()), "a"),
        ] {
            let err = place.paths(&opened, name).unwrap_err();
            assert_eq!(err.reason(), "upload-not-temporary", "{opened:?} → {name:?}");
        }
    }

    #[test]
    fn a_connection_not_to_loopback_as_this_user_is_not_renamed() {
        for (protocol, p) in [
            ("ssh", params(&[("hostname", "10.0.0.5"), ("username", "exouser"), ("enable-sftp", "true")])),
            ("ssh", params(&[("hostname", "example.org"), ("username", "exouser"), ("enable-sftp", "true")])),
            ("ssh", params(&[("hostname", "127.0.0.1"), ("username", "root"), ("enable-sftp", "true")])),
            ("ssh", params(&[("hostname", "127.0.0.1"), ("username", "exouser")])),
            // VNC on loopback, its SFTP elsewhere.
            ("vnc", params(&[("hostname", "127.0.0.1"), ("sftp-hostname", "10.1.1.1"), ("sftp-username", "exouser"), ("enable-sftp", "true")])),
            ("vnc", params(&[("hostname", "127.0.0.1"), ("enable-sftp", "true")])),
            ("rdp", params(&[("hostname", "127.0.0.1"), ("username", "exouser"), ("enable-sftp", "true")])),
        ] {
            let err = SftpPlace::for_connection(protocol, &p, &own()).unwrap_err();
            assert_eq!(err.reason(), "upload-not-local", "{protocol} {p:?}");
        }
        for host in ["::1", "localhost", "127.0.0.2"] {
            let p = params(&[("hostname", host), ("username", "exouser"), ("enable-sftp", "true")]);
            assert!(SftpPlace::for_connection("ssh", &p, &own()).is_ok(), "{host}");
        }
    }

    #[test]
    fn complete_renames_only_a_plain_file_of_the_uploaded_size() {
        let dir = tempfile::tempdir().unwrap();
        let temp = dir.path().join(format!("a{SUFFIX}"));
        let target = dir.path().join("a");
        std::fs::write(&target, b"old").unwrap();
        std::fs::write(&temp, b"12345").unwrap();
        let err = complete(&temp, &target, 4).unwrap_err();
        assert_eq!(err.reason(), "upload-temp-mismatch");
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        complete(&temp, &target, 5).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"12345");
        assert!(!temp.exists());
        // A symlink in its place is not followed.
        std::os::unix::fs::symlink(&target, &temp).unwrap();
        assert_eq!(complete(&temp, &target, 5).unwrap_err().reason(), "upload-temp-mismatch");
        // Missing.
        std::fs::remove_file(&temp).unwrap();
        assert_eq!(complete(&temp, &target, 5).unwrap_err().reason(), "upload-temp-mismatch");
    }

    #[test]
    fn the_current_user_is_known() {
        let me = OwnUser::current().expect("this process's user in the password database");
        assert!(!me.name.is_empty());
    }
}
