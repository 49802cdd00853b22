//! Finds the config drive by its filesystem label (`config-2`) and mounts it read-only where
//! the identity reader looks for it (mount(2) through `nix`, no `mount` process); nothing to do
//! when the documents are already there. The label is read from the devices themselves (the
//! few bytes where iso9660, FAT and ext2/3/4 keep it), not with `blkid`: under emulation each
//! process spawned at boot costs a noticeable part of a second, and with no drive at all
//! (instances using the metadata service) every candidate would have been spawned for.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;

/// The labels Nova gives config drives: iso9660 keeps `config-2`, vfat upper-cases it.
pub const LABELS: [&str; 2] = ["config-2", "CONFIG-2"];

/// The filesystems Nova writes config drives in, tried in turn when the device's own type
/// cannot be read (mount(2), unlike mount(8), does not guess).
const NOVA_TYPES: [&str; 2] = ["iso9660", "vfat"];

/// Bytes read from the start of a device: up to the end of iso9660's primary volume descriptor
/// (sector 16 of 2048 bytes), which covers FAT's boot sector and ext's superblock too.
const PROBE_LEN: usize = 32768 + 2048;

/// Mount flags: the drive is data, never code (`ro,nosuid,nodev,noexec`).
fn mount_flags() -> MsFlags {
    MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC
}

/// The filesystem type and label in a device's first [`PROBE_LEN`] bytes, for the filesystems
/// a config drive may be: iso9660 (the primary volume descriptor's volume identifier), FAT
/// (the extended boot record's volume label, as `mkfs.vfat -n` writes it) and ext2/3/4 (the
/// superblock's volume name). Trailing padding (spaces, NULs) is removed.
pub fn probe_label(head: &[u8]) -> Option<(&'static str, String)> {
    let text = |bytes: &[u8]| -> String {
        String::from_utf8_lossy(bytes)
            .trim_end_matches([' ', '\0'])
            .to_owned()
    };
    // iso9660: volume descriptor type 1, "CD001", identifier at 40..72.
    if let Some(pvd) = head.get(32768..32768 + 72) {
        if pvd[0] == 1 && &pvd[1..6] == b"CD001" {
            return Some(("iso9660", text(&pvd[40..72])));
        }
    }
    // ext2/3/4: superblock at 1024, magic 0xEF53 at +56, volume name at +120..+136.
    if let Some(sb) = head.get(1024..1024 + 136) {
        if sb[56..58] == [0x53, 0xEF] {
            return Some(("ext4", text(&sb[120..136])));
        }
    }
    // FAT: boot signature 0x55AA; FAT12/16 keep the extended boot record at 36, FAT32 (whose
    // 16-bit FAT size at 22 is 0) at 64; signature 0x29 there, label 7 bytes further on.
    let boot = head.get(..512)?;
    if boot[510..512] != [0x55, 0xAA] {
        return None;
    }
    let ebr = if boot[22..24] == [0, 0] { 64 } else { 36 };
    let fs_type = &boot[ebr + 18..ebr + 26];
    if boot[ebr + 2] != 0x29 || !fs_type.starts_with(b"FAT") {
        return None;
    }
    Some(("vfat", text(&boot[ebr + 7..ebr + 18])))
}

/// The first [`PROBE_LEN`] bytes of `device` (fewer when it is smaller); `None` when it cannot
/// be opened or read (no medium in a CD drive, an I/O error).
fn read_head(device: &Path) -> Option<Vec<u8>> {
    // O_NONBLOCK: a CD drive without a medium answers at once instead of waiting for one.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(device)
        .ok()?;
    let mut head = vec![0; PROBE_LEN];
    let mut filled = 0;
    while filled < PROBE_LEN {
        match file.read_at(&mut head[filled..], filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    head.truncate(filled);
    Some(head)
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

/// Where to look for labelled devices; injected so tests can point it elsewhere.
#[derive(Debug, Clone)]
pub struct DriveFinder {
    by_label: PathBuf,
    sys_block: PathBuf,
    dev: PathBuf,
}

impl DriveFinder {
    /// The host's udev links, the kernel's list of block devices and their nodes.
    pub fn system() -> Self {
        Self::new("/dev/disk/by-label", "/sys/class/block", "/dev")
    }

    /// A finder using `by_label` (udev's label links), `sys_block` (the kernel's block devices,
    /// one entry per device or partition with a `size` in sectors) and `dev` (their nodes).
    pub fn new(
        by_label: impl Into<PathBuf>,
        sys_block: impl Into<PathBuf>,
        dev: impl Into<PathBuf>,
    ) -> Self {
        Self {
            by_label: by_label.into(),
            sys_block: sys_block.into(),
            dev: dev.into(),
        }
    }

    /// The config drive's block device and its filesystem type when read: udev's label link
    /// first; when udev has made none (early boot, no udev, no drive), each non-empty block
    /// device's label read directly. Blocking (reads devices).
    pub fn device(&self) -> Option<(PathBuf, Option<&'static str>)> {
        for label in LABELS {
            let link = self.by_label.join(label);
            if let Ok(device) = std::fs::canonicalize(&link) {
                let fstype = read_head(&device)
                    .as_deref()
                    .and_then(probe_label)
                    .map(|(fstype, _)| fstype);
                return Some((device, fstype));
            }
        }
        let mut names: Vec<String> = std::fs::read_dir(&self.sys_block)
            .ok()?
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .collect();
        names.sort();
        names.into_iter().find_map(|name| {
            // An empty CD drive or an unattached loop device has size 0: nothing to read.
            let size = std::fs::read_to_string(self.sys_block.join(&name).join("size")).ok()?;
            if size.trim().parse::<u64>().ok()? == 0 {
                return None;
            }
            // sysfs writes a `/` in a device's name as `!` (`cciss!c0d0`).
            let device = self.dev.join(name.replace('!', "/"));
            let (fstype, label) = probe_label(&read_head(&device)?)?;
            // As cloud-init and blkid compare: either spelling, whatever the filesystem.
            let matches = LABELS.contains(&label.as_str());
            matches.then_some((device, Some(fstype)))
        })
    }

    /// Make the drive's documents readable at `target`: leave it alone when they already are,
    /// otherwise mount the labelled device there read-only.
    pub async fn ensure_mounted(&self, target: &Path) -> Result<DriveMount, DriveError> {
        if target.join("openstack/latest/meta_data.json").exists() {
            return Ok(DriveMount::AlreadyPresent);
        }
        let finder = self.clone();
        let found = tokio::task::spawn_blocking(move || finder.device())
            .await
            .unwrap_or(None);
        let Some((device, fstype)) = found else {
            return Ok(DriveMount::NotFound);
        };
        std::fs::create_dir_all(target).map_err(|source| DriveError::MountPoint {
            path: target.to_path_buf(),
            source,
        })?;
        let types = match fstype {
            Some(found) => vec![found.to_owned()],
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

    /// A real iso9660 image with volume identifier `label`, made by genisoimage (what Nova
    /// itself runs for a config drive, `-V config-2`; installed by installer/dev/prereqs.sh).
    fn iso_image(dir: &Path, label: &str) -> Vec<u8> {
        let contents = dir.join("iso-contents/openstack/latest");
        std::fs::create_dir_all(&contents).unwrap();
        std::fs::write(contents.join("meta_data.json"), r#"{"uuid":"u"}"#).unwrap();
        let image = dir.join(format!("{label}.iso"));
        let made = std::process::Command::new("genisoimage")
            .args(["-quiet", "-J", "-r", "-V", label, "-o"])
            .arg(&image)
            .arg(dir.join("iso-contents"))
            .status()
            .expect("genisoimage (installer/dev/prereqs.sh installs it)");
        assert!(made.success(), "genisoimage failed");
        std::fs::read(image).unwrap()
    }

    /// A FAT boot sector as mkfs.vfat writes it (Microsoft's FAT specification, "BPB"):
    /// FAT16 keeps its extended boot record at 36, FAT32 (16-bit FAT size 0) at 64.
    fn fat_boot_sector(label: &[u8; 11], fat32: bool) -> Vec<u8> {
        let mut boot = vec![0u8; 512];
        boot[..3].copy_from_slice(&[0xEB, 0x3C, 0x90]);
        boot[3..11].copy_from_slice(b"mkfs.fat");
        boot[11..13].copy_from_slice(&512u16.to_le_bytes());
        let ebr = if fat32 {
            boot[36..40].copy_from_slice(&1009u32.to_le_bytes());
            64
        } else {
            boot[22..24].copy_from_slice(&32u16.to_le_bytes());
            36
        };
        boot[ebr] = 0x80;
        boot[ebr + 2] = 0x29;
        boot[ebr + 3..ebr + 7].copy_from_slice(&[0x12, 0x34, 0x56, 0x78]);
        boot[ebr + 7..ebr + 18].copy_from_slice(label);
        boot[ebr + 18..ebr + 26].copy_from_slice(if fat32 { b"FAT32   " } else { b"FAT16   " });
        boot[510..512].copy_from_slice(&[0x55, 0xAA]);
        boot
    }

    /// A `/sys/class/block`-like directory and a `/dev`-like one holding `devices`
    /// (name, size in sectors, contents).
    fn block_devices(dir: &Path, devices: &[(&str, u64, &[u8])]) -> (PathBuf, PathBuf) {
        let (sys, dev) = (dir.join("sys-block"), dir.join("dev"));
        std::fs::create_dir_all(&dev).unwrap();
        for (name, size, contents) in devices {
            std::fs::create_dir_all(sys.join(name)).unwrap();
            std::fs::write(sys.join(name).join("size"), format!("{size}\n")).unwrap();
            std::fs::write(dev.join(name), contents).unwrap();
        }
        (sys, dev)
    }

    #[test]
    fn labels_are_read_from_iso9660_fat_and_ext() {
        let dir = tempfile::tempdir().unwrap();
        let iso = iso_image(dir.path(), "config-2");
        assert_eq!(
            probe_label(&iso[..PROBE_LEN]),
            Some(("iso9660", "config-2".to_owned()))
        );
        for fat32 in [false, true] {
            let boot = fat_boot_sector(b"CONFIG-2   ", fat32);
            assert_eq!(
                probe_label(&boot),
                Some(("vfat", "CONFIG-2".to_owned())),
                "fat32: {fat32}"
            );
        }
        let mut ext = vec![0u8; 2048];
        ext[1024 + 56..1024 + 58].copy_from_slice(&0xEF53u16.to_le_bytes());
        ext[1024 + 120..1024 + 128].copy_from_slice(b"config-2");
        assert_eq!(probe_label(&ext), Some(("ext4", "config-2".to_owned())));
        // Nothing recognisable: zeroes, a boot sector without FAT's record, a short read.
        assert_eq!(probe_label(&[0u8; PROBE_LEN]), None);
        let mut mbr = vec![0u8; 512];
        mbr[510..].copy_from_slice(&[0x55, 0xAA]);
        assert_eq!(probe_label(&mbr), None);
        assert_eq!(probe_label(&[0x55; 100]), None);
    }

    #[test]
    fn the_drive_is_found_by_reading_labels_without_udev() {
        let dir = tempfile::tempdir().unwrap();
        let fat = fat_boot_sector(b"CONFIG-2   ", false);
        let other = fat_boot_sector(b"EFI        ", true);
        let (sys, dev) = block_devices(
            dir.path(),
            &[
                // An empty CD drive (size 0) is not read, whatever its node holds.
                ("sr0", 0, &fat),
                ("vda", 8192, &[0u8; 4096]),
                ("vda1", 4096, &other),
                ("vdb", 131072, &fat),
            ],
        );
        let finder = DriveFinder::new(dir.path().join("no-udev"), &sys, &dev);
        assert_eq!(finder.device(), Some((dev.join("vdb"), Some("vfat"))));

        let (sys, dev) = block_devices(&dir.path().join("none"), &[("vda1", 4096, &other)]);
        let finder = DriveFinder::new(dir.path().join("no-udev"), &sys, &dev);
        assert_eq!(finder.device(), None);
    }

    #[test]
    fn a_real_iso_drive_is_found_by_its_label() {
        let dir = tempfile::tempdir().unwrap();
        let iso = iso_image(dir.path(), "config-2");
        let wrong = iso_image(dir.path(), "cidata");
        // Another cloud's seed drive (NoCloud's `cidata`) is not a config drive.
        let (sys, dev) = block_devices(dir.path(), &[("sr0", 1000, &wrong), ("sr1", 1000, &iso)]);
        let finder = DriveFinder::new(dir.path().join("no-udev"), &sys, &dev);
        assert_eq!(finder.device(), Some((dev.join("sr1"), Some("iso9660"))));
    }

    #[test]
    fn the_udev_label_link_is_preferred() {
        let dir = tempfile::tempdir().unwrap();
        let (by_label, device) = labelled(dir.path(), "CONFIG-2");
        // No block devices to read: had they been asked, nothing would be found.
        let finder = DriveFinder::new(&by_label, "/nonexistent", "/nonexistent");
        assert_eq!(
            finder.device(),
            Some((device.canonicalize().unwrap(), None))
        );
    }

    #[tokio::test]
    async fn no_label_anywhere_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let finder = DriveFinder::new(dir.path().join("absent"), "/nonexistent", "/nonexistent");
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
        let finder = DriveFinder::new("/nonexistent", "/nonexistent", "/nonexistent");
        assert_eq!(
            finder.ensure_mounted(dir.path()).await.unwrap(),
            DriveMount::AlreadyPresent
        );
    }

    #[tokio::test]
    async fn a_failing_mount_names_the_device_and_the_types_tried() {
        let dir = tempfile::tempdir().unwrap();
        let (by_label, _) = labelled(dir.path(), "config-2");
        let finder = DriveFinder::new(&by_label, "/nonexistent", "/nonexistent");
        let err = finder
            .ensure_mounted(&dir.path().join("mnt"))
            .await
            .unwrap_err();
        // A regular file is no block device (and as non-root mount(2) is refused anyway); its
        // (empty) contents name no type, so Nova's two are tried.
        assert_eq!(err.reason(), "config-drive-mount-failed");
        let text = err.to_string();
        assert!(
            text.contains("sr0") && text.contains("as iso9660, vfat"),
            "{text}"
        );
    }
}
