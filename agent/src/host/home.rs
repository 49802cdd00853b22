//! The instance user's home given back when root owns it: a cloud-init without `write_files:
//! defer` (before 21.3, Debian 11's 20.4) writes a file into the home before the user exists,
//! creating the directory as root's, and `useradd` then keeps that directory as it is (root's,
//! without `/etc/skel`'s files), which breaks every desktop session (`~/.ICEauthority`).

use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use super::{HostError, Outcome};
use crate::platform::users::UserEntry;

/// Give `user`'s home under `root` to the user when root owns it: the directory itself
/// (never what is in it, which has owners of its own), and `/etc/skel`'s entries that are not
/// there yet, as `useradd` would have copied them. Anything else is left alone: a home the user
/// already owns, a missing one, one that is a symbolic link or not a directory, and root's own.
pub(super) fn reclaim_home(root: &Path, user: &UserEntry) -> Result<Outcome, HostError> {
    if user.uid == 0 {
        return Ok(Outcome::Skipped(format!(
            "'{}' is root: its home stays as it is",
            user.name
        )));
    }
    let relative = user.home.strip_prefix("/").unwrap_or(&user.home);
    if !user.home.is_absolute() || relative.as_os_str().is_empty() {
        return Ok(Outcome::Skipped(format!(
            "the home of '{}' is {:?}, not a directory of its own",
            user.name,
            user.home.display().to_string()
        )));
    }
    let home = root.join(relative);
    let metadata = match std::fs::symlink_metadata(&home) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Outcome::Skipped(format!(
                "'{}' does not exist",
                home.display()
            )))
        }
        Err(e) => return Err(HostError::io("inspect", &home)(e)),
    };
    if !metadata.file_type().is_dir() {
        return Ok(Outcome::Skipped(format!(
            "'{}' is not a directory",
            home.display()
        )));
    }
    if metadata.uid() != 0 {
        return Ok(Outcome::Unchanged);
    }
    std::os::unix::fs::lchown(&home, Some(user.uid), Some(user.gid))
        .map_err(HostError::io("give to the user", &home))?;
    copy_missing(&root.join("etc/skel"), &home, user)?;
    Ok(Outcome::Changed)
}

/// Copy the entries of `from` that `to` lacks (files, directories, symbolic links; recursively,
/// never following a link), owned by `user`, keeping their modes. An existing entry of the same
/// name is never touched.
fn copy_missing(from: &Path, to: &Path, user: &UserEntry) -> Result<(), HostError> {
    let io = HostError::io;
    let entries = match std::fs::read_dir(from) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("read", from)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io("read", from))?;
        let (source, target) = (entry.path(), to.join(entry.file_name()));
        if std::fs::symlink_metadata(&target).is_ok() {
            continue;
        }
        let metadata = std::fs::symlink_metadata(&source).map_err(io("inspect", &source))?;
        let mode = metadata.permissions().mode() & 0o7777;
        let kind = metadata.file_type();
        if kind.is_dir() {
            std::fs::DirBuilder::new()
                .mode(mode)
                .create(&target)
                .map_err(io("create", &target))?;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
                .map_err(io("set the mode of", &target))?;
            std::os::unix::fs::lchown(&target, Some(user.uid), Some(user.gid))
                .map_err(io("give to the user", &target))?;
            copy_missing(&source, &target, user)?;
        } else if kind.is_symlink() {
            let link = std::fs::read_link(&source).map_err(io("read", &source))?;
            std::os::unix::fs::symlink(&link, &target).map_err(io("create", &target))?;
            std::os::unix::fs::lchown(&target, Some(user.uid), Some(user.gid))
                .map_err(io("give to the user", &target))?;
        } else if kind.is_file() {
            let contents = std::fs::read(&source).map_err(io("read", &source))?;
            // create_new: never through a link someone placed meanwhile; the mode exactly, the
            // owner before the contents.
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&target)
                .map_err(io("create", &target))?;
            file.set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(io("set the mode of", &target))?;
            std::os::unix::fs::fchown(&file, Some(user.uid), Some(user.gid))
                .map_err(io("give to the user", &target))?;
            std::io::Write::write_all(&mut file, &contents).map_err(io("write", &target))?;
        }
    }
    Ok(())
}
