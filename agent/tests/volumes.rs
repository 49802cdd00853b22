//! Volumes on real loop devices with the real tools (`blkid`, `wipefs`, `mkfs.ext4`, `mount`,
//! `pvcreate`, `mkswap`, `sfdisk`): the loop devices go through the same discover → decide →
//! act path as attached volumes (only the device list is injected). A blank disk is formatted
//! and mounted; an existing filesystem and a partition's filesystem are mounted as they are;
//! an LVM physical volume, swap and a partition table are left alone with their reasons and
//! their first MiB unchanged; detaching removes the empty mount point exoagent made and nothing
//! else. Needs root (loop devices, mount); fails otherwise, never passes unrun. Serial matching
//! and names from the metadata are covered by the unit tests (loop devices have no serial).

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use exoagent::state::{VolumeState, VolumeStatus};
use exoagent::volumes::{DeviceFilter, Mounter, NameSource, Setup, Watcher};

/// Run a tool; panic with its output when it fails.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (installer/dev/prereqs.sh installs it)"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One test at a time picks and attaches loop devices (`losetup -f` then attach is not atomic).
static LOOP_DEVICES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Loop devices, images and mounts made by a test; all undone on drop, even after a failure.
struct Lab {
    dir: tempfile::TempDir,
    loops: Vec<String>,
}

impl Lab {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            loops: Vec::new(),
        }
    }

    fn mount_root(&self) -> PathBuf {
        self.dir.path().join("media/volume")
    }

    /// A sparse 64 MiB image file.
    fn image(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.img"));
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(64 << 20).unwrap();
        path
    }

    /// Attach `image` to a free loop device (with partition scanning when asked).
    fn attach(&mut self, image: &Path, partitions: bool) -> String {
        let mut args = vec!["-f", "--show"];
        if partitions {
            args.push("-P");
        }
        let image = image.to_str().unwrap();
        args.push(image);
        let device = run("losetup", &args).trim().to_owned();
        self.loops.push(device.clone());
        device
    }

    /// Every mount under this lab's directory, deepest first.
    fn mounts(&self) -> Vec<PathBuf> {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mut found: Vec<PathBuf> = exoagent::volumes::discover::parse_mountinfo(&text)
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|m| m.starts_with(self.dir.path()))
            .collect();
        found.sort();
        found.reverse();
        found
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for mount_point in self.mounts() {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&mount_point)
                .stderr(std::process::Stdio::null())
                .status();
        }
        for device in self.loops.iter().rev() {
            // A device the test already detached is gone: nothing to say about it.
            let _ = Command::new("losetup")
                .args(["-d", device])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

fn kernel_name(device: &str) -> String {
    device.trim_start_matches("/dev/").to_owned()
}

fn first_mib_sha256(device: &str) -> Vec<u8> {
    let mut buf = vec![0; 1 << 20];
    std::fs::File::open(device)
        .unwrap()
        .read_exact(&mut buf)
        .unwrap();
    ring::digest::digest(&ring::digest::SHA256, &buf)
        .as_ref()
        .to_vec()
}

/// One tag of `blkid -p`; empty when it finds nothing (exit status 2).
fn blkid(device: &str, tag: &str) -> String {
    let out = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", tag, device])
        .output()
        .unwrap();
    assert!(
        matches!(out.status.code(), Some(0 | 2)),
        "blkid {device}: {out:?}"
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn status<'a>(statuses: &'a [VolumeStatus], device: &str) -> &'a VolumeStatus {
    statuses
        .iter()
        .find(|s| s.device == device)
        .unwrap_or_else(|| panic!("no status for {device}: {statuses:#?}"))
}

fn left_alone(statuses: &[VolumeStatus], device: &str, reason: &str, detail: &str) {
    let s = status(statuses, device);
    assert_eq!(s.state, VolumeState::LeftAlone, "{s:?}");
    assert_eq!(s.reason.as_deref(), Some(reason), "{s:?}");
    assert!(s.detail.contains(detail), "{s:?}");
    assert_eq!(s.mount_point, None, "{s:?}");
}

/// Wait for the kernel to show a loop device's partition (no udev here: `partx` asks it).
fn wait_for_partition(device: &str, number: u32) -> String {
    let part = format!("{device}p{number}");
    // Already added by `losetup -P` on some kernels: then partx complains, harmlessly.
    let _ = Command::new("partx")
        .args(["-a", device])
        .stderr(std::process::Stdio::null())
        .status();
    for _ in 0..50 {
        if Path::new(&part).exists() {
            return part;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{part} did not appear");
}

#[tokio::test]
async fn blank_disks_are_formatted_and_nothing_else_is_touched() {
    // A test that cannot run fails rather than passing unseen (CI runs as root).
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root for loop devices and mount"
    );
    let _one_at_a_time = LOOP_DEVICES.lock().await;
    let mut lab = Lab::new();
    let blank = lab.attach(&lab.image("blank"), false);
    let lvm = lab.attach(&lab.image("lvm"), false);
    // No udevd here: LVM must not wait for it.
    run(
        "pvcreate",
        &[
            "-qq",
            "--config",
            "devices{obtain_device_list_from_udev=0} activation{udev_sync=0 udev_rules=0}",
            &lvm,
        ],
    );
    let swap = lab.attach(&lab.image("swap"), false);
    run("mkswap", &[&swap]);
    let parted_image = lab.image("parted");
    let mut sfdisk = Command::new("sfdisk")
        .args(["-q", parted_image.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(sfdisk.stdin.as_mut().unwrap(), b"label: gpt\n,24M\n,\n").unwrap();
    assert!(sfdisk.wait().unwrap().success());
    let parted = lab.attach(&parted_image, true);
    let part1 = wait_for_partition(&parted, 1);
    let part2 = wait_for_partition(&parted, 2);
    run("mkfs.ext4", &["-q", "-L", "inner", &part1]);
    let existing = lab.attach(&lab.image("existing"), false);
    run("mkfs.ext4", &["-q", "-L", "keep", &existing]);
    let scratch = lab.dir.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    run("mount", &[&existing, scratch.to_str().unwrap()]);
    std::fs::write(scratch.join("results.csv"), "a,b\n1,2\n").unwrap();
    run("umount", &[scratch.to_str().unwrap()]);
    let existing_uuid = blkid(&existing, "UUID");

    let untouched = [&lvm, &swap, &parted];
    let before: Vec<Vec<u8>> = untouched.iter().map(|d| first_mib_sha256(d)).collect();

    let setup = Setup {
        mount_root: lab.mount_root(),
        sysfs: "/sys".into(),
        mountinfo: "/proc/self/mountinfo".into(),
        filter: DeviceFilter::Only(
            [&blank, &lvm, &swap, &parted, &existing]
                .iter()
                .map(|d| kernel_name(d))
                .collect(),
        ),
        names: NameSource::default(),
        owner: "nobody".into(),
        records: lab.dir.path().join("state/volumes.json"),
        mounter: Mounter::Plain,
        name_wait: Duration::ZERO,
    };
    let mut watcher = Watcher::new(setup);
    let statuses = watcher.reconcile().await;

    // The blank disk: formatted ext4, labelled and mounted under its kernel name (no metadata
    // here), given to the instance user.
    let root = lab.mount_root();
    let b = status(&statuses, &blank);
    let blank_at = root.join(kernel_name(&blank));
    assert_eq!(b.state, VolumeState::Mounted, "{b:?}");
    assert_eq!(b.mount_point.as_deref(), blank_at.to_str(), "{b:?}");
    assert_eq!(b.volume_id, None);
    assert_eq!(blkid(&blank, "TYPE"), "ext4");
    assert_eq!(blkid(&blank, "LABEL"), kernel_name(&blank));
    let blank_uuid = blkid(&blank, "UUID");
    assert_eq!(blank_uuid.len(), 36, "{blank_uuid}");
    let meta = std::fs::metadata(&blank_at).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
    assert!(lab.mounts().contains(&blank_at));

    // The filesystem that was there: mounted as it is, its data and label kept.
    let e = status(&statuses, &existing);
    let existing_at = root.join(kernel_name(&existing));
    assert_eq!(e.state, VolumeState::Mounted, "{e:?}");
    assert_eq!(e.mount_point.as_deref(), existing_at.to_str());
    assert_eq!(
        std::fs::read_to_string(existing_at.join("results.csv")).unwrap(),
        "a,b\n1,2\n"
    );
    assert_eq!(blkid(&existing, "UUID"), existing_uuid);
    assert_eq!(blkid(&existing, "LABEL"), "keep");

    // What Exosphere would have formatted: left alone, with the reason.
    left_alone(&statuses, &lvm, "signature", "LVM2_member");
    left_alone(&statuses, &swap, "signature", "swap");
    left_alone(&statuses, &parted, "partition-table", "partitions");
    // The partitions: the filesystem mounted at `<name>.part1`, the empty one left alone.
    let p1 = status(&statuses, &part1);
    let p1_at = root.join(format!("{}.part1", kernel_name(&parted)));
    assert_eq!(p1.state, VolumeState::Mounted, "{p1:?}");
    assert_eq!(p1.mount_point.as_deref(), p1_at.to_str());
    left_alone(&statuses, &part2, "unformatted-partition", "no filesystem");

    let after: Vec<Vec<u8>> = untouched.iter().map(|d| first_mib_sha256(d)).collect();
    for ((device, b), a) in untouched.iter().zip(&before).zip(&after) {
        assert_eq!(b, a, "{device} was written to");
    }

    // Again (a restart, a periodic pass): the same result, nothing formatted twice.
    let again = watcher.reconcile().await;
    assert_eq!(
        again
            .iter()
            .map(|s| (&s.device, s.state, &s.mount_point))
            .collect::<Vec<_>>(),
        statuses
            .iter()
            .map(|s| (&s.device, s.state, &s.mount_point))
            .collect::<Vec<_>>()
    );
    assert_eq!(blkid(&blank, "UUID"), blank_uuid);

    // Detach: the mount goes (systemd does this on a real instance), then the device. The
    // empty mount point exoagent made is removed; what others put under the root stays.
    let not_ours = root.join("not-ours");
    std::fs::create_dir(&not_ours).unwrap();
    let theirs = root.join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::fs::write(theirs.join("notes.txt"), "x").unwrap();
    run("umount", &[blank_at.to_str().unwrap()]);
    run("losetup", &["-d", &blank]);
    let detached = watcher.reconcile().await;
    assert!(detached.iter().all(|s| s.device != blank), "{detached:#?}");
    assert!(!blank_at.exists(), "the empty mount point was kept");
    assert!(not_ours.is_dir() && theirs.join("notes.txt").is_file());
    assert!(existing_at.join("results.csv").is_file());
    let after: Vec<Vec<u8>> = untouched.iter().map(|d| first_mib_sha256(d)).collect();
    assert_eq!(before, after);
}

/// The watcher as the agent runs it: a volume attached while it runs is mounted after the
/// kernel's uevent (no udevd here: the agent listens to the kernel itself), and its status
/// reaches the hub; detaching it removes the mount point again.
#[tokio::test]
async fn a_volume_attached_while_the_watcher_runs_is_mounted() {
    // A test that cannot run fails rather than passing unseen (CI runs as root).
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root for loop devices and mount"
    );
    let _one_at_a_time = LOOP_DEVICES.lock().await;
    let mut lab = Lab::new();
    let image = lab.image("hotplug");
    let hub = exoagent::state::StateHub::new([]);
    let cancel = tokio_util::sync::CancellationToken::new();
    // The device the next attach will use, so the watcher can be told to look at it only;
    // picked again if something else on the machine takes it first.
    let mut attached = None;
    for _ in 0..5 {
        let device = run("losetup", &["-f"]).trim().to_owned();
        let setup = Setup {
            mount_root: lab.mount_root(),
            sysfs: "/sys".into(),
            mountinfo: "/proc/self/mountinfo".into(),
            filter: DeviceFilter::Only(vec![kernel_name(&device)]),
            names: NameSource::default(),
            owner: "root".into(),
            records: lab.dir.path().join("state/volumes.json"),
            mounter: Mounter::Plain,
            name_wait: Duration::ZERO,
        };
        let watching = tokio::spawn(Watcher::new(setup).watch(hub.clone(), cancel.child_token()));
        // Let the first pass run with nothing attached.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(hub.snapshot().volumes.is_empty());
        let attach = Command::new("losetup")
            .args([&device, image.to_str().unwrap()])
            .status()
            .unwrap();
        if attach.success() {
            lab.loops.push(device.clone());
            attached = Some((device, watching));
            break;
        }
        watching.abort();
    }
    let (device, watching) = attached.expect("no free loop device");
    let mut rx = hub.subscribe();
    let mounted_at = lab.mount_root().join(kernel_name(&device));
    let wait = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let done = rx.borrow_and_update().volumes.iter().any(|v| {
                v.state == VolumeState::Mounted && v.mount_point.as_deref() == mounted_at.to_str()
            });
            if done {
                return;
            }
            rx.changed().await.unwrap();
        }
    });
    wait.await
        .unwrap_or_else(|_| panic!("not mounted: {:#?}", hub.snapshot().volumes));
    assert_eq!(blkid(&device, "TYPE"), "ext4");

    run("umount", &[mounted_at.to_str().unwrap()]);
    run("losetup", &["-d", &device]);
    let gone = tokio::time::timeout(Duration::from_secs(20), async {
        while !hub.snapshot().volumes.is_empty() || mounted_at.exists() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    gone.await
        .unwrap_or_else(|_| panic!("not cleaned up: {:#?}", hub.snapshot().volumes));
    cancel.cancel();
    watching.await.unwrap();
}

/// A sysfs tree for `devices` (real loop devices) with the serials a cloud's bus would show:
/// the real `/dev` nodes and tools, a fake `serial` file (loop devices have none).
fn sysfs_with_serials(root: &Path, devices: &[(&str, &str)]) {
    for (device, serial) in devices {
        let name = kernel_name(device);
        let real = Path::new("/sys/block").join(&name);
        let fake = root.join("block").join(&name);
        std::fs::create_dir_all(fake.join("holders")).unwrap();
        for file in ["dev", "size", "ro"] {
            std::fs::copy(real.join(file), fake.join(file)).unwrap();
        }
        std::fs::write(fake.join("serial"), format!("{serial}\n")).unwrap();
    }
}

/// Names from a real-shaped `meta_data.json` (a v6 device tag and a v5 item), serials cut to 20
/// characters as virtio-blk does: the blank disks are formatted with the volume UUID and the
/// name as label and mounted at the sanitised name, the second of two same-named volumes at
/// `<name>-<last 4 of its UUID>`. A disk whose name is not known yet waits, untouched.
#[tokio::test]
async fn volumes_are_named_from_the_metadata() {
    // A test that cannot run fails rather than passing unseen (CI runs as root).
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root for loop devices and mount"
    );
    let _one_at_a_time = LOOP_DEVICES.lock().await;
    let mut lab = Lab::new();
    let first = lab.attach(&lab.image("first"), false);
    let second = lab.attach(&lab.image("second"), false);
    let late = lab.attach(&lab.image("late"), false);
    let (uuid1, uuid2) = (
        "0b7d2f7c-0a88-4c3f-9d59-3f6e0a5b8c41",
        "9c4e5a6b-7d8e-4f01-a2b3-c4d5e6f7a8b9",
    );
    let sysfs = lab.dir.path().join("sys");
    let unknown = "5e1f0c3a-1111-4222-8333-944455556666";
    sysfs_with_serials(
        &sysfs,
        &[
            (&first, &uuid1[..20]),
            (&second, &uuid2[..20]),
            (&late, &unknown[..20]),
        ],
    );
    let meta_data = lab.dir.path().join("meta_data.json");
    let doc = serde_json::json!({
        "uuid": "6d5b4a0c-9a2b-4c8e-8f5a-3c1d2e7f9b10",
        "name": "exo-test",
        "hostname": "exo-test.novalocal",
        "project_id": "8f3ee0a5e7e5400ba7c1d3a2f0e9b8c7",
        "public_keys": {"alice": "ssh-ed25519 AAAAC3Nza alice@laptop\n"},
        "meta": {
            "exoCreatorUsername": "alice",
            format!("exoVolumes::{uuid2}"): "{\"name\":\"Résultats de l'été\"}"
        },
        "devices": [{
            "type": "disk", "bus": "virtio", "serial": uuid1, "address": "0000:00:05.0",
            "tags": ["exoVolume::{\"name\":\"Résultats de l'été\"}"]
        }]
    });
    std::fs::write(&meta_data, doc.to_string()).unwrap();
    let setup = |names: NameSource, name_wait: Duration| Setup {
        mount_root: lab.mount_root(),
        sysfs: sysfs.clone(),
        mountinfo: "/proc/self/mountinfo".into(),
        filter: DeviceFilter::Only(vec![kernel_name(&first), kernel_name(&second)]),
        names,
        owner: "root".into(),
        records: lab.dir.path().join("state/volumes.json"),
        mounter: Mounter::Plain,
        name_wait,
    };

    // The metadata service does not answer (nothing listens there): the disks wait, untouched.
    let unreachable = NameSource {
        service: Some(exoagent::cloud::MetadataService::new(
            "http://127.0.0.1:9",
            reqwest::Client::new(),
        )),
        file: None,
    };
    let statuses = Watcher::new(Setup {
        filter: DeviceFilter::Only(vec![
            kernel_name(&first),
            kernel_name(&second),
            kernel_name(&late),
        ]),
        ..setup(unreachable.clone(), Duration::from_secs(60))
    })
    .reconcile()
    .await;
    for device in [&first, &second, &late] {
        assert_eq!(status(&statuses, device).state, VolumeState::Waiting);
        assert_eq!(
            blkid(device, "TYPE"),
            "",
            "{device} was formatted while waiting"
        );
    }

    // A volume the metadata never names: after the wait, named after its kernel device as
    // Exosphere does (and formatted without the volume UUID, which is not known).
    let mut patient = Watcher::new(Setup {
        filter: DeviceFilter::Only(vec![kernel_name(&late)]),
        ..setup(unreachable.clone(), Duration::from_millis(300))
    });
    let statuses = patient.reconcile().await;
    assert_eq!(status(&statuses, &late).state, VolumeState::Waiting);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let statuses = patient.reconcile().await;
    let l = status(&statuses, &late);
    assert_eq!(l.state, VolumeState::Mounted, "{l:?}");
    assert_eq!(l.volume_id, None);
    assert_eq!(l.name.as_deref(), Some(kernel_name(&late).as_str()));
    let late_at = lab.mount_root().join(kernel_name(&late));
    assert_eq!(l.mount_point.as_deref(), late_at.to_str());
    assert_eq!(blkid(&late, "TYPE"), "ext4");
    assert_eq!(blkid(&late, "LABEL"), kernel_name(&late));

    let names = NameSource {
        service: None,
        file: Some(meta_data),
    };
    let statuses = Watcher::new(setup(names, Duration::from_secs(60)))
        .reconcile()
        .await;
    let root = lab.mount_root();
    // Whichever is mounted second (the kernel names' order, which losetup picks) gets the
    // suffix: the last four characters of its own volume UUID.
    let base = "Résultats-de-l-été";
    let mut plain = 0;
    for (device, uuid) in [(&first, uuid1), (&second, uuid2)] {
        let s = status(&statuses, device);
        assert_eq!(s.state, VolumeState::Mounted, "{s:?}");
        assert_eq!(s.volume_id.as_deref(), Some(uuid));
        assert_eq!(s.name.as_deref(), Some("Résultats de l'été"));
        let at = s.mount_point.clone().unwrap_or_default();
        let suffixed = root.join(format!("{base}-{}", &uuid[uuid.len() - 4..]));
        if at == root.join(base).to_str().unwrap() {
            plain += 1;
        } else {
            assert_eq!(Some(at.as_str()), suffixed.to_str(), "{s:?}");
        }
        assert_eq!(blkid(device, "UUID"), uuid);
        // The name cut to ext4's 16 bytes ("é" is two).
        assert_eq!(blkid(device, "LABEL"), "Résultats de l'");
    }
    assert_eq!(plain, 1, "exactly one volume keeps the plain name");
}
