//! Finds the config drive by its filesystem label (`config-2`) and mounts it read-only where
//! the identity reader looks for it (mount(2) through `nix`, no `mount` process); nothing to do
//! when the documents are already there.

use std::path::{Path, PathBuf};

use nix::mount::MsFlags;

use crate::platform::exec;

/// The labels Nova gives config drives: iso9660 keeps `config-2`, vfat upper-cases it.
pub const LABELS: [&str; 2] = ["config-2", "CONFIG-2"];

/// The filesystems Nova writes config drives in, tried in turn when `blkid` cannot name the
/// drive's own type (mount(2), unlike mount(8), does not guess).
const NOVA_TYPES: [&str; 2] = ["iso9660", "vfat"];

/// Mount flags: the drive is data, never code (`ro,nosuid,nodev,noexec`).
fn mount_flags() -> MsFlags {
    MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC
}

/// Why the config drive could not be mounted.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    /// The mount point cannot be created.
    #[error("failed to create the mount point '{path}': {source}")]
    MountPoint {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// mount(2) refused the drive under every filesystem type tried.
    #[error("failed to mount '{device}' read-only on '{target}' as {types}: {source}")]
    Mount {
        /// The block device.
        device: PathBuf,
        /// The mount point.
        target: PathBuf,
        /// The filesystem types tried, e.g. `iso9660, vfat`.
        types: String,
        /// The error of the last attempt.
        source: nix::Error,
    },
}

impl DriveError {
    /// Short stable reason for reports.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MountPoint { .. } => "config-drive-mount-point",
            Self::Mount { .. } => "config-drive-mount-failed",
        }
    }
}

/// What [`DriveFinder::ensure_mounted`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriveMount {
    /// `openstack/latest/meta_data.json` is already at the mount point (mounted earlier, by
    /// the image, or a directory laid out like a drive).
    AlreadyPresent,
    /// The drive on `device` is now mounted read-only at the mount point.
    Mounted {
        /// The block device.
        device: PathBuf,
    },
    /// No device carries a config-drive label.
    NotFound,
}

/// Where to look for labelled devices and which probe to use; injected so tests can point it
/// elsewhere.
#[derive(Debug, Clone)]
pub struct DriveFinder {
    by_label: PathBuf,
    blkid: PathBuf,
}

impl DriveFinder {
    /// The host's udev links and `blkid`.
    pub fn system() -> Self {
        Self::new("/dev/disk/by-label", "blkid")
    }

    /// A finder using `by_label` (udev's label links) and the given `blkid`.
    pub fn new(by_label: impl Into<PathBuf>, blkid: impl Into<PathBuf>) -> Self {
        Self {
            by_label: by_label.into(),
            blkid: blkid.into(),
        }
    }

    /// The config drive's block device: udev's label link first; `blkid` when udev has not
    /// made one (early boot, or no udev).
    pub async fn device(&self) -> Option<PathBuf> {
        for label in LABELS {
            let link = self.by_label.join(label);
            if let Ok(device) = std::fs::canonicalize(&link) {
                return Some(device);
            }
        }
        for label in LABELS {
            let token = format!("LABEL={label}");
            let args = ["-l", "-o", "device", "-t", token.as_str()];
            let Ok(found) = exec::run(&self.blkid, &args, &[], None).await else {
                continue;
            };
            if !found.status.success() {
                continue;
            }
            if let Some(line) = found.stdout.lines().map(str::trim).find(|l| !l.is_empty()) {
                return Some(PathBuf::from(line));
            }
        }
        None
    }

    /// The filesystem type `blkid` reads on `device` (`iso9660`, `vfat`), if it can tell.
    async fn filesystem_type(&self, device: &Path) -> Option<String> {
        let args = [
            Path::new("-o").as_os_str(),
            Path::new("value").as_os_str(),
            Path::new("-s").as_os_str(),
            Path::new("TYPE").as_os_str(),
            device.as_os_str(),
        ];
        let found = exec::run(&self.blkid, &args, &[], None).await.ok()?;
        let fstype = found.stdout.trim();
        (found.status.success() && !fstype.is_empty()).then(|| fstype.to_owned())
    }

    /// Make the drive's documents readable at `target`: leave it alone when they already are,
    /// otherwise mount the labelled device there read-only.
    pub async fn ensure_mounted(&self, target: &Path) -> Result<DriveMount, DriveError> {
        if target.join("openstack/latest/meta_data.json").exists() {
            return Ok(DriveMount::AlreadyPresent);
        }
        let Some(device) = self.device().await else {
            return Ok(DriveMount::NotFound);
        };
        std::fs::create_dir_all(target).map_err(|source| DriveError::MountPoint {
            path: target.to_path_buf(),
            source,
        })?;
        let types = match self.filesystem_type(&device).await {
            Some(found) => vec![found],
            None => NOVA_TYPES.map(str::to_owned).to_vec(),
        };
        let tried = types.join(", ");
        let (source, mount_point) = (device.clone(), target.to_path_buf());
        // mount(2) may wait on the device; keep it off the runtime's threads.
        let mounted = tokio::task::spawn_blocking(move || {
            let mut last = nix::Error::EINVAL;
            for fstype in &types {
                match nix::mount::mount(
                    Some(&source),
                    &mount_point,
                    Some(fstype.as_str()),
                    mount_flags(),
                    None::<&str>,
                ) {
                    Ok(()) => return Ok(()),
                    Err(e) => last = e,
                }
            }
            Err(last)
        })
        .await
        // Only a panic in the closure (or shutdown) fails the join: count it as a failed mount.
        .unwrap_or(Err(nix::Error::EIO));
        if let Err(source) = mounted {
            return Err(DriveError::Mount {
                device,
                target: target.to_path_buf(),
                types: tried,
                source,
            });
        }
        Ok(DriveMount::Mounted { device })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A udev-style `by-label` directory in `dir` whose `label` links to a stand-in device.
    fn labelled(dir: &Path, label: &str) -> (PathBuf, PathBuf) {
        let by_label = dir.join("by-label");
        std::fs::create_dir(&by_label).unwrap();
        let device = dir.join("sr0");
        std::fs::write(&device, "").unwrap();
        std::os::unix::fs::symlink(&device, by_label.join(label)).unwrap();
        (by_label, device)
    }

    #[tokio::test]
    async fn the_udev_label_link_is_preferred() {
        let dir = tempfile::tempdir().unwrap();
        let (by_label, device) = labelled(dir.path(), "CONFIG-2");
        // `false` as blkid: had it been asked, nothing would be found.
        let finder = DriveFinder::new(&by_label, "false");
        assert_eq!(finder.device().await, Some(device.canonicalize().unwrap()));
    }

    #[tokio::test]
    async fn no_label_and_no_blkid_match_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let finder = DriveFinder::new(dir.path().join("absent"), "false");
        let target = dir.path().join("mnt");
        assert_eq!(
            finder.ensure_mounted(&target).await.unwrap(),
            DriveMount::NotFound
        );
        assert!(
            !target.exists(),
            "nothing is created when there is no drive"
        );
    }

    #[tokio::test]
    async fn documents_already_in_place_are_used_as_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let latest = dir.path().join("openstack/latest");
        std::fs::create_dir_all(&latest).unwrap();
        std::fs::write(latest.join("meta_data.json"), r#"{"uuid":"u"}"#).unwrap();
        let finder = DriveFinder::new("/nonexistent", "false");
        assert_eq!(
            finder.ensure_mounted(dir.path()).await.unwrap(),
            DriveMount::AlreadyPresent
        );
    }

    #[tokio::test]
    async fn a_failing_mount_names_the_device_and_the_types_tried() {
        let dir = tempfile::tempdir().unwrap();
        let (by_label, _) = labelled(dir.path(), "config-2");
        let finder = DriveFinder::new(&by_label, "false");
        let err = finder
            .ensure_mounted(&dir.path().join("mnt"))
            .await
            .unwrap_err();
        // A regular file is no block device (and as non-root mount(2) is refused anyway).
        assert_eq!(err.reason(), "config-drive-mount-failed");
        let text = err.to_string();
        assert!(
            text.contains("sr0") && text.contains("as iso9660, vfat"),
            "{text}"
        );
    }
}
