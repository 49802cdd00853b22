//! The config drive found by its label and mounted for real: a filesystem image labelled
//! `config-2` holding `openstack/latest/*` is attached to a loop device; the finder locates it
//! by reading the label off the real device (no udev here, so no /dev/disk/by-label; the
//! kernel's /sys/class/block and /dev) and mounts it read-only with mount(2), as the type it
//! read; the identity reader then reads it.
//!
//! The image is ext4 because this machine's kernel has neither iso9660 nor vfat (Nova makes
//! config drives in one of those; their labels are read from real and spec-built images in the
//! unit tests of `cloud::drive`).
//! Needs root (loop devices, mount); skipped with a message otherwise (CI runs as root).

use std::path::{Path, PathBuf};
use std::process::Command;

use exoagent::cloud::drive::{DriveFinder, DriveMount};
use exoagent::cloud::ConfigDrive;

struct Attached {
    /// Holds the image file until the loop device is detached.
    _image_dir: tempfile::TempDir,
    loop_device: String,
    mounted_at: Option<PathBuf>,
}

impl Drop for Attached {
    fn drop(&mut self) {
        if let Some(target) = &self.mounted_at {
            let _ = Command::new("umount").arg(target).status();
        }
        let _ = Command::new("losetup")
            .args(["-d", &self.loop_device])
            .status();
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn attach_drive(label: &str) -> Attached {
    let image_dir = tempfile::tempdir().unwrap();
    let contents = image_dir.path().join("contents");
    let latest = contents.join("openstack/latest");
    std::fs::create_dir_all(&latest).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/config-drive/openstack/latest");
    for entry in std::fs::read_dir(fixture).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), latest.join(entry.file_name())).unwrap();
    }
    let image = image_dir.path().join("drive.img");
    let image_text = image.to_str().unwrap();
    run("truncate", &["-s", "4M", image_text]);
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-L",
            label,
            "-d",
            contents.to_str().unwrap(),
            image_text,
        ],
    );
    let loop_device = run("losetup", &["-f", "--show", image_text]);
    Attached {
        _image_dir: image_dir,
        loop_device,
        mounted_at: None,
    }
}

#[tokio::test]
async fn a_labelled_drive_is_found_mounted_read_only_and_read() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root for loop devices and mount");
        return;
    }
    let mut drive = attach_drive("config-2");
    let target = tempfile::tempdir().unwrap();
    let mount_point = target.path().join("config-drive");
    // No udev links here: the finder reads the labels of the kernel's block devices.
    let finder = DriveFinder::new(target.path().join("no-udev"), "/sys/class/block", "/dev");
    let found = finder.ensure_mounted(&mount_point).await.unwrap();
    drive.mounted_at = Some(mount_point.clone());
    assert_eq!(
        found,
        DriveMount::Mounted {
            device: PathBuf::from(&drive.loop_device)
        }
    );
    let identity = ConfigDrive::new(&mount_point).identity().unwrap();
    assert_eq!(identity.uuid, "6d8c2f0e-3b1a-4c55-9f0e-2a7d1c9b4e11");
    assert!(ConfigDrive::new(&mount_point)
        .network_data()
        .unwrap()
        .is_some());

    let options = run(
        "findmnt",
        &["-n", "-o", "OPTIONS", mount_point.to_str().unwrap()],
    );
    for wanted in ["ro", "nosuid", "nodev", "noexec"] {
        assert!(
            options.split(',').any(|o| o == wanted),
            "mount options {options} lack {wanted}"
        );
    }
    // A second start finds it in place and mounts nothing more.
    assert_eq!(
        finder.ensure_mounted(&mount_point).await.unwrap(),
        DriveMount::AlreadyPresent
    );
}
