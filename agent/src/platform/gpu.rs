//! GPU detection: whether the machine has an NVIDIA display controller (which decides whether
//! TurboVNC with VirtualGL is worth installing). Facts relied on: the sysfs PCI layout
//! (<https://www.kernel.org/doc/Documentation/ABI/testing/sysfs-bus-pci>).

use std::fs;
use std::path::Path;

/// PCI vendor id of NVIDIA.
const NVIDIA_VENDOR: &str = "0x10de";
/// PCI base class 0x03: display controller (VGA 0x0300, XGA 0x0301, 3D 0x0302, other 0x0380).
const DISPLAY_CLASS_PREFIX: &str = "0x03";

/// Whether the machine has an NVIDIA display controller: any
/// `<sys_root>/bus/pci/devices/*/vendor` reading `0x10de` whose `class` starts with `0x03`
/// (VGA and 3D controllers alike; data-centre GPUs such as the A100 are 3D controllers,
/// `0x0302`). Pass `/sys`; tests pass a fake tree. Unreadable entries count as "no".
pub fn detect_nvidia_gpu(sys_root: &Path) -> bool {
    let Ok(devices) = fs::read_dir(sys_root.join("bus/pci/devices")) else {
        return false;
    };
    devices.flatten().any(|device| {
        let dir = device.path();
        let read = |name: &str| fs::read_to_string(dir.join(name)).unwrap_or_default();
        read("vendor").trim().eq_ignore_ascii_case(NVIDIA_VENDOR)
            && read("class")
                .trim()
                .to_ascii_lowercase()
                .starts_with(DISPLAY_CLASS_PREFIX)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pci_device(root: &Path, slot: &str, vendor: &str, class: &str) {
        let dir = root.join("bus/pci/devices").join(slot);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("vendor"), format!("{vendor}\n")).unwrap();
        fs::write(dir.join("class"), format!("{class}\n")).unwrap();
    }

    #[test]
    fn nvidia_display_controllers_are_detected() {
        let sys = tempfile::tempdir().unwrap();
        assert!(!detect_nvidia_gpu(sys.path()), "no bus directory at all");
        // A virtio GPU, an Intel VGA controller and an NVIDIA audio function (class 0x0403,
        // the HDMI audio of a graphics card) are not NVIDIA display controllers.
        pci_device(sys.path(), "0000:00:02.0", "0x1af4", "0x030000");
        pci_device(sys.path(), "0000:00:03.0", "0x8086", "0x030000");
        pci_device(sys.path(), "0000:00:04.1", "0x10de", "0x040300");
        assert!(!detect_nvidia_gpu(sys.path()));

        pci_device(sys.path(), "0000:00:05.0", "0x10DE", "0x030200");
        assert!(detect_nvidia_gpu(sys.path()), "3D controller (A100-style)");

        let vga = tempfile::tempdir().unwrap();
        pci_device(vga.path(), "0000:00:05.0", "0x10de", "0x030000");
        assert!(detect_nvidia_gpu(vga.path()), "VGA controller");
    }

    #[test]
    fn unreadable_device_entries_count_as_no() {
        let sys = tempfile::tempdir().unwrap();
        let dir = sys.path().join("bus/pci/devices/0000:00:05.0");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("vendor"), "0x10de\n").unwrap();
        // No class file.
        assert!(!detect_nvidia_gpu(sys.path()));
    }
}
