//! Small filesystem primitives the agent relies on for convergence: atomic writes with an exact
//! mode and owner, so a killed agent never leaves a half-written file behind; writes that skip
//! unchanged files, so a full disk cannot break what already runs; disk-full detection.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Whether `error` means the filesystem (or the writer's quota) is full: ENOSPC or EDQUOT.
pub fn is_disk_full(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    ) || matches!(error.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// Write `contents` to `path` atomically: a temporary file in the same directory, created with
/// `mode` (never wider at any moment), fsync'd, chowned when `owner` is given, then renamed.
/// The temporary file is removed on every failure path, and temporaries that writers killed
/// mid-write left for the same target are removed first.
pub fn write_atomic(
    path: &Path,
    contents: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no parent"))?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let prefix = format!(".{}.tmp-", name.to_string_lossy());
    remove_dead_temporaries(dir, &prefix);
    let tmp = dir.join(format!("{prefix}{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed the mode; set it exactly.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
        }
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Remove `dir/<prefix><pid>` files whose writer process is gone (killed between creating and
/// renaming its temporary file). A live pid is left alone: it may be writing right now.
fn remove_dead_temporaries(dir: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !process_exists(pid) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Whether a process with `pid` exists (signal 0). Only a definite "no such process" counts
/// as gone: without /proc, or for a pid this process may not signal, the file is kept.
fn process_exists(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return true;
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None) != Err(nix::errno::Errno::ESRCH)
}

/// Like [`write_atomic`], but only when `path` does not already hold exactly `contents` with
/// `mode` (and `owner`, when given). Returns whether it wrote. Rewriting an unchanged file gains
/// nothing and fails on a full disk, which must not stop an agent from adopting what runs.
pub fn write_if_changed(
    path: &Path,
    contents: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> io::Result<bool> {
    if is_current(path, contents, mode, owner) {
        return Ok(false);
    }
    write_atomic(path, contents, mode, owner).map(|()| true)
}

/// Whether `path` is a regular file with exactly these contents, mode and owner.
fn is_current(path: &Path, contents: &[u8], mode: u32, owner: Option<(u32, u32)>) -> bool {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return false;
    };
    if !meta.file_type().is_file()
        || meta.mode() & 0o7777 != mode
        || meta.len() != contents.len() as u64
        || owner.is_some_and(|(uid, gid)| (meta.uid(), meta.gid()) != (uid, gid))
    {
        return false;
    }
    fs::read(path).is_ok_and(|existing| existing == contents)
}

/// Create `dir` and its parents; set `mode` on `dir` itself.
pub fn ensure_dir(dir: &Path, mode: u32) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tiny tmpfs mounted on a temporary directory, unmounted when dropped: a real full disk
    /// for tests. `None` (after saying why) when not root, so callers skip without asserting.
    pub(crate) struct TinyFs {
        dir: tempfile::TempDir,
    }

    impl TinyFs {
        pub(crate) fn mount(size_kib: u32) -> Option<Self> {
            if !nix::unistd::geteuid().is_root() {
                eprintln!("skipped: mounting a tmpfs needs root");
                return None;
            }
            let dir = tempfile::tempdir().unwrap();
            let status = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size_kib}k,mode=0755")])
                .arg("tmpfs")
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success(), "mount tmpfs failed");
            Some(Self { dir })
        }

        pub(crate) fn path(&self) -> &Path {
            self.dir.path()
        }

        /// Fill the filesystem until a write fails with ENOSPC; returns the filler's path.
        pub(crate) fn fill(&self) -> std::path::PathBuf {
            let filler = self.path().join("filler");
            let mut file = fs::File::create(&filler).unwrap();
            let block = vec![0u8; 4096];
            loop {
                match file.write_all(&block) {
                    Ok(()) => {}
                    Err(e) if is_disk_full(&e) => break,
                    Err(e) => panic!("filling the tmpfs: {e}"),
                }
            }
            filler
        }
    }

    impl Drop for TinyFs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }

    fn temporaries(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp"))
            .collect()
    }

    #[test]
    fn dev_full_and_errnos_are_disk_full() {
        let mut full = OpenOptions::new().write(true).open("/dev/full").unwrap();
        let error = full.write_all(b"x").unwrap_err();
        assert!(is_disk_full(&error), "{error:?}");
        assert!(is_disk_full(&io::Error::from_raw_os_error(libc::EDQUOT)));
        assert!(!is_disk_full(&io::Error::from_raw_os_error(libc::EACCES)));
    }

    #[test]
    fn full_disk_write_fails_as_disk_full_and_leaves_no_temporary() {
        let Some(fs) = TinyFs::mount(64) else { return };
        let path = fs.path().join("config");
        write_atomic(&path, b"same", 0o644, None).unwrap();
        fs.fill();
        let error = write_atomic(&path, &[7u8; 8192], 0o644, None).unwrap_err();
        assert!(is_disk_full(&error), "{error:?}");
        assert_eq!(temporaries(fs.path()), Vec::<String>::new());
        assert_eq!(fs::read(&path).unwrap(), b"same", "the old file is intact");
        // An unchanged file is not rewritten, so a full disk does not matter.
        assert!(!write_if_changed(&path, b"same", 0o644, None).unwrap());
        let error = write_if_changed(&path, &[7u8; 8192], 0o644, None).unwrap_err();
        assert!(is_disk_full(&error), "{error:?}");
        assert_eq!(temporaries(fs.path()), Vec::<String>::new());
    }

    #[test]
    fn temporaries_of_dead_writers_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        // Above the largest possible pid_max (2^22): never a live process.
        let dead = dir.path().join(".exit.json.tmp-4194305");
        let live = dir.path().join(".exit.json.tmp-1");
        let other = dir.path().join(".run.json.tmp-4194305");
        for p in [&dead, &live, &other] {
            fs::write(p, b"").unwrap();
        }
        write_atomic(&dir.path().join("exit.json"), b"{}", 0o600, None).unwrap();
        assert!(!dead.exists(), "a dead writer's temporary is removed");
        assert!(live.exists(), "a live writer's temporary is left alone");
        assert!(other.exists(), "another target's temporary is left alone");
    }

    #[test]
    fn write_if_changed_writes_only_differences() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("conf");
        assert!(write_if_changed(&path, b"a", 0o640, None).unwrap());
        let inode = fs::metadata(&path).unwrap().ino();
        assert!(!write_if_changed(&path, b"a", 0o640, None).unwrap());
        assert_eq!(fs::metadata(&path).unwrap().ino(), inode, "not replaced");
        assert!(
            write_if_changed(&path, b"a", 0o600, None).unwrap(),
            "mode differs"
        );
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert!(
            write_if_changed(&path, b"b", 0o600, None).unwrap(),
            "content differs"
        );
        assert_eq!(fs::read(&path).unwrap(), b"b");
        assert_eq!(temporaries(dir.path()), Vec::<String>::new());
    }

    #[test]
    fn atomic_write_sets_exact_mode_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        write_atomic(&path, b"one", 0o600, None).unwrap();
        write_atomic(&path, b"two", 0o600, None).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp files left"
        );
    }
}
