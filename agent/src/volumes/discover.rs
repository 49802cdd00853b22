//! Which block devices there are and which of them the system already uses: disks and their
//! partitions from sysfs (an injectable root), mounts from `/proc/self/mountinfo`. The root disk
//! is the disk backing `/` (through device-mapper or md when it is stacked), found by what is
//! mounted, never by a device name.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Kernel devices that are never volumes, unless a caller names them explicitly.
const VIRTUAL_PREFIXES: &[&str] = &["loop", "ram", "zram", "dm-", "md", "nbd", "sr"];

/// Which disks to look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceFilter {
    /// Every disk in `/sys/block` backed by a device (`device` link), not loop/ram/dm/md/sr.
    Physical,
    /// Exactly these kernel names (tests feed loop devices through the same path).
    Only(Vec<String>),
}

/// One line of mountinfo that matters here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// `major:minor` of the mounted device (`0:N` for btrfs subvolumes and the like).
    pub dev: String,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// The mount source (`/dev/vdb`, `tmpfs`, …).
    pub source: String,
}

/// A partition of a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Kernel name (`vdb1`).
    pub name: String,
    /// Its number on the disk.
    pub number: u32,
    /// `major:minor`.
    pub dev: String,
    /// Where it is mounted.
    pub mounted_at: Vec<PathBuf>,
    /// Devices stacked on it (LVM, md, dm-crypt).
    pub holders: Vec<String>,
}

/// A whole disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Kernel name (`vdb`).
    pub name: String,
    /// `major:minor`.
    pub dev: String,
    /// Whether the kernel refuses writes (`ro` = 1).
    pub read_only: bool,
    /// Size in 512-byte sectors.
    pub sectors: u64,
    /// The serial sysfs knows (virtio-blk), if any.
    pub serial: Option<String>,
    /// Its partitions, by number.
    pub partitions: Vec<Partition>,
    /// Where the whole disk is mounted.
    pub mounted_at: Vec<PathBuf>,
    /// Devices stacked on the whole disk.
    pub holders: Vec<String>,
    /// Whether it backs `/`.
    pub root: bool,
}

impl Disk {
    /// `/dev/<name>`.
    pub fn path(&self) -> PathBuf {
        Path::new("/dev").join(&self.name)
    }
}

/// Everything observed in one look.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// The disks, by name.
    pub disks: Vec<Disk>,
    /// Every mount.
    pub mounts: Vec<Mount>,
    /// `major:minor` of every block device sysfs knows (disks, partitions, dm, md, loop).
    pub known_devs: BTreeSet<String>,
}

/// Decode mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|b| (b'0'..=b'7').contains(b)) {
                let value = digits.iter().fold(0u32, |v, d| v * 8 + u32::from(d - b'0'));
                if let Ok(b) = u8::try_from(value) {
                    out.push(b);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mounts in a mountinfo text (lines it cannot read are skipped).
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fields: Vec<&str> = left.split(' ').collect();
            let after: Vec<&str> = right.split(' ').collect();
            Some(Mount {
                dev: fields.get(2)?.to_string(),
                mount_point: PathBuf::from(unescape(fields.get(4)?)),
                source: unescape(after.get(1)?),
            })
        })
        .collect()
}

fn read_trim(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn wanted(name: &str, dir: &Path, filter: &DeviceFilter) -> bool {
    match filter {
        DeviceFilter::Only(names) => names.iter().any(|n| n == name),
        DeviceFilter::Physical => {
            dir.join("device").exists() && !VIRTUAL_PREFIXES.iter().any(|p| name.starts_with(p))
        }
    }
}

/// The disks under `sysfs/block` that `filter` wants, with their partitions, mounts and
/// holders, and which one backs `/` (from `mountinfo`).
pub fn observe(sysfs: &Path, mountinfo: &str, filter: &DeviceFilter) -> Observed {
    let mounts = parse_mountinfo(mountinfo);
    let block = sysfs.join("block");
    let mut known_devs = BTreeSet::new();
    // Every block device: (name, dev, parent disk name).
    let mut all: Vec<(String, String, String)> = Vec::new();
    for name in names_in(&block) {
        let dir = block.join(&name);
        let Some(dev) = read_trim(&dir.join("dev")) else {
            continue;
        };
        known_devs.insert(dev.clone());
        all.push((name.clone(), dev, name.clone()));
        for child in names_in(&dir) {
            if dir.join(&child).join("partition").exists() {
                if let Some(dev) = read_trim(&dir.join(&child).join("dev")) {
                    known_devs.insert(dev.clone());
                    all.push((child, dev, name.clone()));
                }
            }
        }
    }
    let mounted = |dev: &str, name: &str| -> Vec<PathBuf> {
        let source = format!("/dev/{name}");
        mounts
            .iter()
            .filter(|m| m.dev == dev || m.source == source)
            .map(|m| m.mount_point.clone())
            .collect()
    };
    let root_disks = root_disks(&block, &mounts, &all);
    let mut disks = Vec::new();
    for name in names_in(&block) {
        let dir = block.join(&name);
        if !wanted(&name, &dir, filter) {
            continue;
        }
        let Some(dev) = read_trim(&dir.join("dev")) else {
            continue;
        };
        let sectors = read_trim(&dir.join("size"))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        // No medium (an empty drive, a detached loop device): nothing to look at.
        if sectors == 0 {
            continue;
        }
        let mut partitions = Vec::new();
        for child in names_in(&dir) {
            let pdir = dir.join(&child);
            let Some(number) = read_trim(&pdir.join("partition")).and_then(|n| n.parse().ok())
            else {
                continue;
            };
            let pdev = read_trim(&pdir.join("dev")).unwrap_or_default();
            partitions.push(Partition {
                mounted_at: mounted(&pdev, &child),
                holders: names_in(&pdir.join("holders")),
                name: child,
                number,
                dev: pdev,
            });
        }
        partitions.sort_by_key(|p| p.number);
        disks.push(Disk {
            read_only: read_trim(&dir.join("ro")).as_deref() == Some("1"),
            sectors,
            serial: read_trim(&dir.join("serial")).filter(|s| !s.is_empty()),
            mounted_at: mounted(&dev, &name),
            holders: names_in(&dir.join("holders")),
            root: root_disks.contains(&name),
            partitions,
            name,
            dev,
        });
    }
    Observed {
        disks,
        mounts,
        known_devs,
    }
}

/// The disks backing `/`: the device mounted there (by `major:minor`, else by source name),
/// then down through `slaves/` (device-mapper, md) to whole disks.
fn root_disks(
    block: &Path,
    mounts: &[Mount],
    all: &[(String, String, String)],
) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let Some(root) = mounts
        .iter()
        .rev()
        .find(|m| m.mount_point == Path::new("/"))
    else {
        return found;
    };
    let source_name = root.source.strip_prefix("/dev/").unwrap_or("");
    let Some((name, _, parent)) = all
        .iter()
        .find(|(_, dev, _)| *dev == root.dev)
        .or_else(|| all.iter().find(|(name, _, _)| name == source_name))
    else {
        return found;
    };
    let mut todo = vec![(name.clone(), parent.clone())];
    let mut seen = BTreeSet::new();
    while let Some((name, parent)) = todo.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        let slaves_dir = if name == parent {
            block.join(&name).join("slaves")
        } else {
            block.join(&parent).join(&name).join("slaves")
        };
        let slaves = names_in(&slaves_dir);
        if slaves.is_empty() {
            found.insert(parent);
        } else {
            for slave in slaves {
                if let Some((n, _, p)) = all.iter().find(|(n, _, _)| *n == slave) {
                    todo.push((n.clone(), p.clone()));
                }
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    struct FakeSys(tempfile::TempDir);

    impl FakeSys {
        fn new() -> Self {
            Self(tempfile::tempdir().unwrap())
        }
        fn root(&self) -> &Path {
            self.0.path()
        }
        fn disk(&self, name: &str, dev: &str, physical: bool) -> PathBuf {
            let dir = self.root().join("block").join(name);
            fs::create_dir_all(dir.join("holders")).unwrap();
            fs::create_dir_all(dir.join("slaves")).unwrap();
            fs::write(dir.join("dev"), format!("{dev}\n")).unwrap();
            fs::write(dir.join("ro"), "0\n").unwrap();
            fs::write(dir.join("size"), "2097152\n").unwrap();
            if physical {
                fs::create_dir_all(dir.join("device")).unwrap();
            }
            dir
        }
        fn partition(&self, disk: &str, name: &str, number: u32, dev: &str) -> PathBuf {
            let dir = self.root().join("block").join(disk).join(name);
            fs::create_dir_all(dir.join("holders")).unwrap();
            fs::write(dir.join("dev"), format!("{dev}\n")).unwrap();
            fs::write(dir.join("partition"), format!("{number}\n")).unwrap();
            dir
        }
    }

    const MOUNTINFO: &str = "\
22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
23 22 0:21 / /proc rw - proc proc rw
40 22 252:17 / /media/volume/my\\040data rw,relatime shared:9 - ext4 /dev/vdb1 rw
";

    #[test]
    fn the_root_disk_is_the_one_mounted_at_slash_whatever_its_name() {
        let sys = FakeSys::new();
        // The root disk is called `vdz` here: no name rule would guess it.
        sys.disk("vdz", "252:0", true);
        sys.partition("vdz", "vdz1", 1, "252:1");
        sys.disk("vdb", "252:16", true);
        sys.partition("vdb", "vdb1", 1, "252:17");
        let c = sys.disk("vdc", "252:32", true);
        fs::write(c.join("serial"), "9c4e5a6b-7d8e-4f01-a\n").unwrap();
        fs::write(c.join("ro"), "1\n").unwrap();
        sys.disk("loop0", "7:0", false);
        let mountinfo = MOUNTINFO.replace("/dev/vda1", "/dev/vdz1");
        let seen = observe(sys.root(), &mountinfo, &DeviceFilter::Physical);
        let names: Vec<&str> = seen.disks.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["vdb", "vdc", "vdz"]);
        let by = |n: &str| seen.disks.iter().find(|d| d.name == n).unwrap();
        assert!(by("vdz").root);
        assert!(!by("vdb").root);
        assert_eq!(
            by("vdb").partitions[0].mounted_at,
            [PathBuf::from("/media/volume/my data")]
        );
        assert_eq!(by("vdc").serial.as_deref(), Some("9c4e5a6b-7d8e-4f01-a"));
        assert!(by("vdc").read_only);
        assert!(seen.known_devs.contains("252:17"));
    }

    #[test]
    fn a_root_on_lvm_marks_the_disk_under_it() {
        let sys = FakeSys::new();
        sys.disk("sdq", "8:0", true);
        let part = sys.partition("sdq", "sdq2", 2, "8:2");
        fs::write(part.join("holders").join("dm-0"), "").unwrap();
        let dm = sys.disk("dm-0", "253:0", false);
        fs::create_dir_all(dm.join("slaves").join("sdq2")).unwrap();
        sys.disk("sdb", "8:16", true);
        let mountinfo = "22 1 253:0 / / rw - xfs /dev/mapper/vg-root rw\n";
        let seen = observe(sys.root(), mountinfo, &DeviceFilter::Physical);
        let by = |n: &str| seen.disks.iter().find(|d| d.name == n).unwrap();
        assert!(by("sdq").root);
        assert_eq!(by("sdq").partitions[0].holders, ["dm-0"]);
        assert!(!by("sdb").root);
        assert!(seen.disks.iter().all(|d| d.name != "dm-0"));
    }

    #[test]
    fn an_explicit_list_admits_loop_devices() {
        let sys = FakeSys::new();
        sys.disk("loop3", "7:3", false);
        sys.disk("loop4", "7:4", false);
        let empty = sys.disk("loop5", "7:5", false);
        fs::write(empty.join("size"), "0\n").unwrap();
        let only = DeviceFilter::Only(vec!["loop4".into(), "loop5".into()]);
        let seen = observe(sys.root(), "", &only);
        assert_eq!(seen.disks.len(), 1);
        assert_eq!(seen.disks[0].name, "loop4");
        assert!(!seen.disks[0].root);
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        let mounts = parse_mountinfo(MOUNTINFO);
        assert_eq!(mounts.len(), 3);
        assert_eq!(mounts[2].mount_point, Path::new("/media/volume/my data"));
        assert_eq!(mounts[2].source, "/dev/vdb1");
        assert_eq!(unescape("a\\134b\\"), "a\\b\\");
    }
}
