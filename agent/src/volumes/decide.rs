//! The decision, as a pure function of what was observed: format a blank disk, mount a
//! filesystem, or leave the device alone with a stable reason. Nothing here touches the system;
//! the rule "never destroy data" lives in [`decide`]: only a disk on which neither `blkid -p`
//! nor `wipefs` finds anything, and which has no partitions, is ever formatted.

use std::path::{Path, PathBuf};

/// Filesystems exoagent mounts when it finds them (anything else is left alone).
const MOUNTABLE: &[&str] = &[
    "ext2", "ext3", "ext4", "xfs", "btrfs", "vfat", "exfat", "ntfs", "ntfs3", "f2fs", "jfs", "udf",
    "hfsplus",
];
/// Filesystem labels of config drives (OpenStack's and NoCloud's).
const CONFIG_DRIVE_LABELS: &[&str] = &["config-2", "cidata"];

/// What the probes found on a device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Probe {
    /// `blkid -p`: `TYPE` (a filesystem, `LVM2_member`, `swap`, …).
    pub fs_type: Option<String>,
    /// `blkid -p`: `USAGE` (`filesystem`, `raid`, `crypto`, `other`).
    pub usage: Option<String>,
    /// `blkid -p`: `LABEL`.
    pub label: Option<String>,
    /// `blkid -p`: `PTTYPE` (`dos`, `gpt`).
    pub pt_type: Option<String>,
    /// Signature types `wipefs --no-act` lists.
    pub wipefs: Vec<String>,
    /// `blkid -p` found several signatures that contradict each other (exit status 8).
    pub ambivalent: bool,
    /// `blkid -p` reported something about the contents (a key other than `PART_ENTRY_*`),
    /// whether or not it named a `TYPE` or `PTTYPE`.
    pub blkid_found: bool,
}

impl Probe {
    /// Whether neither tool found anything.
    pub fn is_blank(&self) -> bool {
        self.fs_type.is_none()
            && self.pt_type.is_none()
            && self.wipefs.is_empty()
            && !self.ambivalent
            && !self.blkid_found
    }

    /// What was found, for people: `TYPE=LVM2_member, wipefs: LVM2_member`.
    pub fn found(&self) -> String {
        let mut parts = Vec::new();
        if let Some(t) = &self.fs_type {
            parts.push(format!("TYPE={t}"));
        }
        if let Some(u) = &self.usage {
            parts.push(format!("USAGE={u}"));
        }
        if let Some(p) = &self.pt_type {
            parts.push(format!("PTTYPE={p}"));
        }
        if self.ambivalent {
            parts.push("blkid: ambivalent (several signatures)".into());
        }
        if self.blkid_found && self.fs_type.is_none() && self.pt_type.is_none() {
            parts.push("blkid: a signature without TYPE or PTTYPE".into());
        }
        if !self.wipefs.is_empty() {
            parts.push(format!("wipefs: {}", self.wipefs.join(" ")));
        }
        parts.join(", ")
    }

    fn mountable(&self) -> Option<&str> {
        let t = self.fs_type.as_deref()?;
        (self.usage.as_deref() == Some("filesystem") && self.pt_type.is_none())
            .then_some(t)
            .filter(|t| MOUNTABLE.contains(t))
    }

    fn config_drive(&self) -> bool {
        self.fs_type.as_deref() == Some("iso9660")
            || self.label.as_deref().is_some_and(|l| {
                CONFIG_DRIVE_LABELS
                    .iter()
                    .any(|c| c.eq_ignore_ascii_case(l))
            })
    }
}

/// Why a device is left alone (`reason` in the status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaveReason {
    /// It backs `/`.
    RootDisk,
    /// Mounted somewhere else, or something (LVM, md, dm-crypt) is stacked on it.
    InUse,
    /// The kernel refuses writes to it.
    ReadOnly,
    /// A config drive (label `config-2`/`cidata`, or iso9660).
    ConfigDrive,
    /// A partitioned whole disk (its partitions are looked at one by one).
    PartitionTable,
    /// Something other than a mountable filesystem was found on it.
    Signature,
    /// A partition with nothing on it.
    UnformattedPartition,
}

impl LeaveReason {
    /// The stable reason string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RootDisk => "root-disk",
            Self::InUse => "in-use",
            Self::ReadOnly => "read-only",
            Self::ConfigDrive => "config-drive",
            Self::PartitionTable => "partition-table",
            Self::Signature => "signature",
            Self::UnformattedPartition => "unformatted-partition",
        }
    }
}

/// What to do with a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Already mounted under the mount root: report it.
    Mounted(PathBuf),
    /// Blank: make an ext4 filesystem, then mount it.
    Format,
    /// Mount the filesystem of this type.
    Mount(String),
    /// Do not touch it.
    LeaveAlone {
        /// Why.
        reason: LeaveReason,
        /// What was found, for people.
        detail: String,
    },
    /// Its serial matches no volume yet: ask the metadata again before naming it.
    Wait,
}

/// Everything known about one device (a whole disk or a partition).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// A partition (else a whole disk).
    pub partition: bool,
    /// It (or, for a partition, its disk) backs `/`.
    pub root: bool,
    /// The kernel refuses writes.
    pub read_only: bool,
    /// Where the device itself is mounted.
    pub mounted_at: Vec<PathBuf>,
    /// For a whole disk: whether any of its partitions is mounted or held.
    pub partitions_in_use: bool,
    /// Devices stacked on it.
    pub holders: Vec<String>,
    /// Whether sysfs lists partitions on it (whole disks).
    pub has_partitions: bool,
    /// What the probes found.
    pub probe: Probe,
    /// Its name is not known yet and the metadata is still being asked.
    pub name_pending: bool,
}

/// The action for a device whose mount points live under `mount_root`.
pub fn decide(facts: &Facts, mount_root: &Path) -> Action {
    let leave = |reason, detail: String| Action::LeaveAlone { reason, detail };
    if facts.root {
        return leave(LeaveReason::RootDisk, "the disk backing /".into());
    }
    if let Some(ours) = facts.mounted_at.iter().find(|m| m.starts_with(mount_root)) {
        return Action::Mounted(ours.clone());
    }
    if let Some(at) = facts.mounted_at.first() {
        return leave(LeaveReason::InUse, format!("mounted at {}", at.display()));
    }
    if !facts.holders.is_empty() {
        return leave(
            LeaveReason::InUse,
            format!("held by {}", facts.holders.join(" ")),
        );
    }
    if facts.partitions_in_use {
        return leave(LeaveReason::InUse, "a partition is mounted or held".into());
    }
    if facts.read_only {
        return leave(
            LeaveReason::ReadOnly,
            "the kernel marks it read-only".into(),
        );
    }
    let probe = &facts.probe;
    if probe.config_drive() {
        return leave(LeaveReason::ConfigDrive, probe.found());
    }
    if !facts.partition && (facts.has_partitions || probe.pt_type.is_some()) {
        let detail = match &probe.pt_type {
            Some(t) => format!("{t} partition table"),
            None => "partitions".into(),
        };
        return leave(LeaveReason::PartitionTable, detail);
    }
    if let Some(fs) = probe.mountable() {
        // An extra signature beside the filesystem (a stale RAID superblock, say) makes the
        // contents ambiguous: better left for a person.
        if probe.wipefs.iter().any(|w| w != fs) {
            return leave(LeaveReason::Signature, probe.found());
        }
        return if facts.name_pending {
            Action::Wait
        } else {
            Action::Mount(fs.to_owned())
        };
    }
    if probe.is_blank() {
        if facts.partition {
            return leave(
                LeaveReason::UnformattedPartition,
                "no filesystem on the partition".into(),
            );
        }
        return if facts.name_pending {
            Action::Wait
        } else {
            Action::Format
        };
    }
    let detail = if probe.usage.as_deref() == Some("filesystem") {
        format!("{} (a filesystem exoagent does not mount)", probe.found())
    } else {
        probe.found()
    };
    leave(LeaveReason::Signature, detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &str = "/media/volume";

    fn blank() -> Facts {
        Facts::default()
    }

    fn found(fs_type: &str, usage: &str) -> Probe {
        Probe {
            fs_type: Some(fs_type.into()),
            usage: Some(usage.into()),
            wipefs: vec![fs_type.into()],
            ..Default::default()
        }
    }

    fn reason(facts: &Facts) -> &'static str {
        match decide(facts, Path::new(ROOT)) {
            Action::LeaveAlone { reason, .. } => reason.as_str(),
            other => panic!("not left alone: {other:?}"),
        }
    }

    #[test]
    fn only_a_disk_where_nothing_is_found_is_formatted() {
        assert_eq!(decide(&blank(), Path::new(ROOT)), Action::Format);
        // Either tool finding anything is enough to leave it.
        let only_wipefs = Facts {
            probe: Probe {
                wipefs: vec!["zfs_member".into()],
                ..Default::default()
            },
            ..blank()
        };
        assert_eq!(reason(&only_wipefs), "signature");
        let ambivalent = Facts {
            probe: Probe {
                ambivalent: true,
                ..Default::default()
            },
            ..blank()
        };
        assert_eq!(reason(&ambivalent), "signature");
        // blkid saying "found" is enough, even when it names no TYPE or PTTYPE.
        let found_unnamed = Facts {
            probe: Probe {
                blkid_found: true,
                ..Default::default()
            },
            ..blank()
        };
        assert_eq!(reason(&found_unnamed), "signature");
        let only_partitions = Facts {
            has_partitions: true,
            ..blank()
        };
        assert_eq!(reason(&only_partitions), "partition-table");
    }

    #[test]
    fn what_exosphere_would_format_is_left_alone() {
        for (t, usage) in [
            ("LVM2_member", "raid"),
            ("linux_raid_member", "raid"),
            ("swap", "other"),
            ("crypto_LUKS", "crypto"),
            ("zfs_member", "filesystem"),
        ] {
            let facts = Facts {
                probe: found(t, usage),
                ..blank()
            };
            let action = decide(&facts, Path::new(ROOT));
            match action {
                Action::LeaveAlone { reason, detail } => {
                    assert_eq!(reason, LeaveReason::Signature, "{t}");
                    assert!(detail.contains(t), "{t}: {detail}");
                }
                other => panic!("{t}: {other:?}"),
            }
        }
    }

    #[test]
    fn filesystems_are_mounted_never_formatted() {
        let facts = Facts {
            probe: found("xfs", "filesystem"),
            ..blank()
        };
        assert_eq!(decide(&facts, Path::new(ROOT)), Action::Mount("xfs".into()));
        let stale_raid = Facts {
            probe: Probe {
                wipefs: vec!["ext4".into(), "linux_raid_member".into()],
                ..found("ext4", "filesystem")
            },
            ..blank()
        };
        assert_eq!(reason(&stale_raid), "signature");
    }

    #[test]
    fn every_reason_has_its_case() {
        let cases: Vec<(Facts, &str)> = vec![
            (
                Facts {
                    root: true,
                    probe: found("ext4", "filesystem"),
                    ..blank()
                },
                "root-disk",
            ),
            (
                Facts {
                    mounted_at: vec!["/srv".into()],
                    ..blank()
                },
                "in-use",
            ),
            (
                Facts {
                    holders: vec!["dm-3".into()],
                    ..blank()
                },
                "in-use",
            ),
            (
                Facts {
                    partitions_in_use: true,
                    has_partitions: true,
                    ..blank()
                },
                "in-use",
            ),
            (
                Facts {
                    read_only: true,
                    ..blank()
                },
                "read-only",
            ),
            (
                Facts {
                    probe: Probe {
                        label: Some("config-2".into()),
                        ..found("vfat", "filesystem")
                    },
                    ..blank()
                },
                "config-drive",
            ),
            (
                Facts {
                    probe: found("iso9660", "filesystem"),
                    ..blank()
                },
                "config-drive",
            ),
            (
                Facts {
                    probe: Probe {
                        pt_type: Some("gpt".into()),
                        wipefs: vec!["gpt".into(), "PMBR".into()],
                        ..Default::default()
                    },
                    ..blank()
                },
                "partition-table",
            ),
            (
                Facts {
                    probe: found("swap", "other"),
                    ..blank()
                },
                "signature",
            ),
            (
                Facts {
                    partition: true,
                    ..blank()
                },
                "unformatted-partition",
            ),
        ];
        for (facts, expected) in cases {
            assert_eq!(reason(&facts), expected, "{facts:?}");
        }
    }

    #[test]
    fn partitions_with_filesystems_are_mounted() {
        let facts = Facts {
            partition: true,
            probe: found("ext4", "filesystem"),
            ..blank()
        };
        assert_eq!(
            decide(&facts, Path::new(ROOT)),
            Action::Mount("ext4".into())
        );
    }

    #[test]
    fn a_mount_under_the_root_is_ours_and_elsewhere_in_use() {
        let facts = Facts {
            mounted_at: vec!["/media/volume/data".into()],
            probe: found("ext4", "filesystem"),
            ..blank()
        };
        assert_eq!(
            decide(&facts, Path::new(ROOT)),
            Action::Mounted("/media/volume/data".into())
        );
    }

    #[test]
    fn an_unknown_name_waits_but_never_delays_leaving_alone() {
        let waiting = Facts {
            name_pending: true,
            ..blank()
        };
        assert_eq!(decide(&waiting, Path::new(ROOT)), Action::Wait);
        let swap = Facts {
            name_pending: true,
            probe: found("swap", "other"),
            ..blank()
        };
        assert_eq!(reason(&swap), "signature");
    }
}
