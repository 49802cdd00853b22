//! Volumes that mount themselves, like Exosphere's `auto-mount-volumes` role but never at the
//! cost of data: the watcher that reconciles attached disks with their mount points at start,
//! on kernel block uevents and periodically, and publishes what it did to the state hub.
//!
//! Submodules: [`settings`] (`[volumes]`), [`names`] (metadata → names, serials, mount point
//! names), [`discover`] (sysfs + mountinfo), [`decide`] (the pure decision), [`act`] (the
//! commands), `uevent` (the netlink listener).

pub mod act;
pub mod decide;
pub mod discover;
pub mod names;
pub mod settings;
mod uevent;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cloud::MetadataService;
use crate::state::{StateHub, VolumeState, VolumeStatus};

pub use act::{ActError, Mounter};
pub use decide::{Action, Facts, LeaveReason, Probe};
pub use discover::DeviceFilter;
pub use names::VolumeNames;
pub use settings::{Section, VolumeSettings, KEYS};

/// How long a disk whose serial matches no volume waits for the metadata to name it (Exosphere
/// writes the name right after attaching; Nova's metadata cache lags about 15 s).
pub const NAME_WAIT: Duration = Duration::from_secs(60);
/// The safety-net reconcile interval.
const SAFETY_INTERVAL: Duration = Duration::from_secs(30);
/// How often sysfs is compared when there is no uevent socket.
const POLL_INTERVAL: Duration = Duration::from_secs(2);
/// How often a reconcile runs while a disk waits for its name.
const WAITING_INTERVAL: Duration = Duration::from_secs(5);
/// Uevents arrive in bursts (disk, then partitions): act once the burst is over.
const DEBOUNCE: Duration = Duration::from_secs(1);
/// How long volume names read from the metadata are reused while nothing changes.
const NAMES_MAX_AGE: Duration = Duration::from_secs(300);
/// Largest `meta_data.json` read from a file.
const MAX_META_DATA_BYTES: u64 = 1024 * 1024;

/// Failed reasons (left-alone reasons are [`LeaveReason`]).
pub mod failed {
    /// `blkid` or `wipefs` could not say what is on the device.
    pub const PROBE: &str = "probe-failed";
    /// `mkfs.ext4` failed.
    pub const FORMAT: &str = "format-failed";
    /// Mounting (or preparing the mount point) failed.
    pub const MOUNT: &str = "mount-failed";
    /// Every candidate mount point is taken.
    pub const MOUNT_POINT_TAKEN: &str = "mount-point-taken";
}

/// Where volume names come from: the metadata service's `meta_data.json` (current: Exosphere
/// names volumes after boot), else a `meta_data.json` file (a config drive: as of boot only).
/// With neither, volumes are named after their kernel devices.
#[derive(Debug, Clone, Default)]
pub struct NameSource {
    /// The metadata service.
    pub service: Option<MetadataService>,
    /// A `meta_data.json` file, read when the service does not answer.
    pub file: Option<PathBuf>,
}

impl NameSource {
    async fn fetch(&self) -> Option<VolumeNames> {
        if let Some(service) = &self.service {
            match service.meta_data().await {
                Ok(Some(doc)) => return Some(VolumeNames::from_meta_data(&doc)),
                Ok(None) => {}
                Err(e) => {
                    tracing::info!(target: "exoagent::volumes", reason = e.reason(), error = %e, "cannot read volume names from the metadata service");
                }
            }
        }
        let text = crate::input::read_capped(self.file.as_ref()?, MAX_META_DATA_BYTES).ok()?;
        let doc: serde_json::Value = serde_json::from_str(&text).ok()?;
        Some(VolumeNames::from_meta_data(&doc))
    }

    /// Only the metadata service learns names after boot: worth waiting for.
    fn waits(&self) -> bool {
        self.service.is_some()
    }
}

/// Everything the watcher works with; tests inject every path and the device list.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Where mount points are made.
    pub mount_root: PathBuf,
    /// The sysfs root (`/sys`).
    pub sysfs: PathBuf,
    /// The mount table (`/proc/self/mountinfo`).
    pub mountinfo: PathBuf,
    /// Which disks to look at.
    pub filter: DeviceFilter,
    /// Where names come from.
    pub names: NameSource,
    /// The user who owns mounted volumes' top directories.
    pub owner: String,
    /// The file recording the mount points the watcher created.
    pub records: PathBuf,
    /// How mounts are made.
    pub mounter: Mounter,
    /// How long an unnamed disk waits for its name.
    pub name_wait: Duration,
}

/// The mount points the watcher created (so it removes only those, and only when empty).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Records {
    created: BTreeSet<PathBuf>,
}

impl Records {
    fn load(path: &Path) -> Self {
        std::fs::read(path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    fn save(&self, path: &Path) {
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = crate::fsutil::write_if_changed(path, &bytes, 0o600, None) {
            tracing::warn!(target: "exoagent::volumes", path = %path.display(), error = %e, "cannot record mount points");
        }
    }
}

/// One device's identity for the status.
struct Named {
    volume_id: Option<String>,
    name: String,
    pending: bool,
}

/// Reconciles attached disks with mount points.
#[derive(Debug)]
pub struct Watcher {
    setup: Setup,
    /// When each unnamed disk (name + serial) was first seen.
    first_seen: HashMap<String, Instant>,
    /// The names last read, when, and for which disks.
    names: Option<CachedNames>,
    /// Whether the last pass left a disk waiting for its name.
    waiting: bool,
}

/// Names read from the metadata, kept so the periodic pass does not ask every time.
#[derive(Debug)]
struct CachedNames {
    at: Instant,
    disks: Vec<(String, Option<String>)>,
    names: VolumeNames,
}

fn status(device: &Path, named: &Named, state: VolumeState) -> VolumeStatus {
    VolumeStatus {
        device: device.display().to_string(),
        volume_id: named.volume_id.clone(),
        name: Some(named.name.clone()),
        state,
        mount_point: None,
        reason: None,
        detail: String::new(),
    }
}

fn with_reason(mut s: VolumeStatus, reason: &str, detail: String) -> VolumeStatus {
    s.reason = Some(reason.to_owned());
    s.detail = detail;
    s
}

/// Mounts under `mount_root` whose device is gone: its `major:minor` is no longer a block
/// device and its `/dev` node (if it named one) no longer exists.
pub fn stale_mounts<'a>(
    mounts: &'a [discover::Mount],
    known_devs: &BTreeSet<String>,
    mount_root: &Path,
    exists: impl Fn(&Path) -> bool,
) -> Vec<&'a discover::Mount> {
    mounts
        .iter()
        .filter(|m| m.mount_point.starts_with(mount_root) && m.mount_point != mount_root)
        .filter(|m| !known_devs.contains(&m.dev))
        .filter(|m| m.source.starts_with("/dev/") && !exists(Path::new(&m.source)))
        .collect()
}

impl Setup {
    /// The real machine: `/sys`, `/proc/self/mountinfo`, physical disks, the mount points
    /// record in the state directory, `systemd-mount` when systemd runs the machine.
    pub fn system(
        settings: &VolumeSettings,
        paths: &crate::paths::Paths,
        names: NameSource,
        owner: &str,
    ) -> Self {
        Self {
            mount_root: settings.mount_root.clone(),
            sysfs: "/sys".into(),
            mountinfo: "/proc/self/mountinfo".into(),
            filter: DeviceFilter::Physical,
            names,
            owner: owner.to_owned(),
            records: paths.volume_records(),
            mounter: Mounter::detect(&paths.system_root),
            name_wait: NAME_WAIT,
        }
    }
}

impl Watcher {
    /// A watcher for `setup`.
    pub fn new(setup: Setup) -> Self {
        Self {
            setup,
            first_seen: HashMap::new(),
            names: None,
            waiting: false,
        }
    }

    /// The volume names: read again when the disks changed, a disk waits for its name, or
    /// the last read is older than [`NAMES_MAX_AGE`]; none needed without a non-root disk.
    async fn names(&mut self, observed: &discover::Observed) -> VolumeNames {
        let disks: Vec<(String, Option<String>)> = observed
            .disks
            .iter()
            .filter(|d| !d.root)
            .map(|d| (d.name.clone(), d.serial.clone()))
            .collect();
        if disks.is_empty() {
            return VolumeNames::default();
        }
        if let Some(cached) = &self.names {
            if !self.waiting && cached.disks == disks && cached.at.elapsed() < NAMES_MAX_AGE {
                return cached.names.clone();
            }
        }
        let names = self.setup.names.fetch().await.unwrap_or_default();
        self.names = Some(CachedNames {
            at: Instant::now(),
            disks,
            names: names.clone(),
        });
        names
    }

    fn read_mountinfo(&self) -> String {
        std::fs::read_to_string(&self.setup.mountinfo).unwrap_or_default()
    }

    /// Look once and act: unmount what lost its device, format blank disks, mount filesystems,
    /// remove the empty mount points it made that nothing is mounted on any more. Returns the
    /// status of every device looked at.
    pub async fn reconcile(&mut self) -> Vec<VolumeStatus> {
        let s = &self.setup;
        let observed = discover::observe(&s.sysfs, &self.read_mountinfo(), &s.filter);
        let mut records = Records::load(&s.records);
        for gone in stale_mounts(&observed.mounts, &observed.known_devs, &s.mount_root, |p| {
            p.exists()
        }) {
            tracing::info!(target: "exoagent::volumes", mount_point = ?gone.mount_point, device = ?gone.source, "device gone; unmounting");
            if let Err(e) = s.mounter.unmount(&gone.mount_point).await {
                tracing::warn!(target: "exoagent::volumes", mount_point = ?gone.mount_point, reason = e.reason(), error = %e, "unmount failed");
            }
        }
        let observed = discover::observe(&s.sysfs, &self.read_mountinfo(), &s.filter);
        let names = self.names(&observed).await;
        let s = &self.setup;
        let mut claimed: BTreeSet<PathBuf> = observed
            .mounts
            .iter()
            .filter(|m| m.mount_point.starts_with(&s.mount_root))
            .map(|m| m.mount_point.clone())
            .collect();
        let mut statuses = Vec::new();
        let mut seen_keys = BTreeSet::new();
        for disk in &observed.disks {
            self.disk(
                disk,
                &names,
                &mut claimed,
                &mut records,
                &mut statuses,
                &mut seen_keys,
            )
            .await;
        }
        self.first_seen.retain(|k, _| seen_keys.contains(k));
        self.waiting = statuses.iter().any(|s| s.state == VolumeState::Waiting);
        let mounted_now: BTreeSet<PathBuf> = discover::parse_mountinfo(&self.read_mountinfo())
            .into_iter()
            .map(|m| m.mount_point)
            .collect();
        let s = &self.setup;
        records.created.retain(|dir| {
            if mounted_now.contains(dir) || claimed.contains(dir) {
                return true;
            }
            if let Err(e) = act::remove_empty_dir(dir) {
                tracing::info!(target: "exoagent::volumes", mount_point = ?dir, error = %e, "mount point kept (not empty); forgotten");
            } else {
                tracing::info!(target: "exoagent::volumes", mount_point = ?dir, "removed the empty mount point");
            }
            false
        });
        records.save(&s.records);
        statuses
    }

    async fn disk(
        &mut self,
        disk: &discover::Disk,
        names: &VolumeNames,
        claimed: &mut BTreeSet<PathBuf>,
        records: &mut Records,
        statuses: &mut Vec<VolumeStatus>,
        seen_keys: &mut BTreeSet<String>,
    ) {
        let path = disk.path();
        let serial = match (&disk.serial, disk.root) {
            (Some(serial), _) => Some(serial.clone()),
            (None, false) => act::udev_serial(&path).await,
            (None, true) => None,
        };
        let matched = serial.as_deref().and_then(|s| names.lookup(s));
        let pending = match (&matched, &serial) {
            (None, Some(serial)) if self.setup.names.waits() && !disk.root => {
                let key = format!("{}:{serial}", disk.name);
                seen_keys.insert(key.clone());
                let first = *self.first_seen.entry(key).or_insert_with(Instant::now);
                first.elapsed() < self.setup.name_wait
            }
            _ => false,
        };
        let named = match matched {
            Some(m) => Named {
                volume_id: Some(m.volume_id),
                name: m.name,
                pending,
            },
            None => Named {
                volume_id: None,
                name: disk.name.clone(),
                pending,
            },
        };
        let mount_root = self.setup.mount_root.clone();
        let outside = |p: &PathBuf| !p.starts_with(&mount_root);
        let mut facts = Facts {
            partition: false,
            root: disk.root,
            read_only: disk.read_only,
            mounted_at: disk.mounted_at.clone(),
            partitions_in_use: disk
                .partitions
                .iter()
                .any(|p| !p.holders.is_empty() || p.mounted_at.iter().any(outside)),
            holders: disk.holders.clone(),
            has_partitions: !disk.partitions.is_empty(),
            probe: Probe::default(),
            name_pending: named.pending,
        };
        let early = disk.root
            || !disk.mounted_at.is_empty()
            || !disk.holders.is_empty()
            || facts.partitions_in_use
            || disk.read_only;
        if !early && !facts.has_partitions {
            match act::probe(&path).await {
                Ok(probe) => facts.probe = probe,
                Err(e) => {
                    tracing::warn!(target: "exoagent::volumes", device = ?disk.name, reason = e.reason(), error = %e, "probe failed; left alone");
                    let st = status(&path, &named, VolumeState::Failed);
                    statuses.push(with_reason(st, failed::PROBE, e.to_string()));
                    return;
                }
            }
        }
        let action = decide::decide(&facts, &self.setup.mount_root);
        let partitioned = matches!(
            action,
            Action::LeaveAlone {
                reason: LeaveReason::PartitionTable,
                ..
            }
        );
        statuses.push(
            self.act(&path, &disk.name, None, &named, action, claimed, records)
                .await,
        );
        if !partitioned {
            return;
        }
        for part in &disk.partitions {
            let ppath = Path::new("/dev").join(&part.name);
            let mut facts = Facts {
                partition: true,
                root: false,
                read_only: disk.read_only,
                mounted_at: part.mounted_at.clone(),
                partitions_in_use: false,
                holders: part.holders.clone(),
                has_partitions: false,
                probe: Probe::default(),
                name_pending: named.pending,
            };
            if part.mounted_at.is_empty() && part.holders.is_empty() && !disk.read_only {
                match act::probe(&ppath).await {
                    Ok(probe) => facts.probe = probe,
                    Err(e) => {
                        let st = status(&ppath, &named, VolumeState::Failed);
                        statuses.push(with_reason(st, failed::PROBE, e.to_string()));
                        continue;
                    }
                }
            }
            let action = decide::decide(&facts, &self.setup.mount_root);
            statuses.push(
                self.act(
                    &ppath,
                    &part.name,
                    Some(part.number),
                    &named,
                    action,
                    claimed,
                    records,
                )
                .await,
            );
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn act(
        &self,
        device: &Path,
        kernel_name: &str,
        partition: Option<u32>,
        named: &Named,
        action: Action,
        claimed: &mut BTreeSet<PathBuf>,
        records: &mut Records,
    ) -> VolumeStatus {
        let base = status(device, named, VolumeState::Mounted);
        let fs = match action {
            Action::Mounted(at) => {
                return VolumeStatus {
                    mount_point: Some(at.display().to_string()),
                    ..base
                };
            }
            Action::Wait => {
                return VolumeStatus {
                    state: VolumeState::Waiting,
                    detail: "its serial matches no volume in the metadata yet".into(),
                    ..base
                };
            }
            Action::LeaveAlone { reason, detail } => {
                let st = VolumeStatus {
                    state: VolumeState::LeftAlone,
                    ..base
                };
                return with_reason(st, reason.as_str(), detail);
            }
            Action::Format => None,
            Action::Mount(fs) => Some(fs),
        };
        let fail = |reason: &str, detail: String| {
            tracing::warn!(target: "exoagent::volumes", device = ?kernel_name, reason, detail = ?detail, "volume not mounted");
            with_reason(
                VolumeStatus {
                    state: VolumeState::Failed,
                    ..base.clone()
                },
                reason,
                detail,
            )
        };
        let Some(mount_point) = self.mount_point(kernel_name, partition, named, claimed) else {
            return fail(
                failed::MOUNT_POINT_TAKEN,
                "every candidate mount point is in use or not empty".into(),
            );
        };
        if fs.is_none() {
            let label = names::label(&named.name);
            tracing::info!(target: "exoagent::volumes", device = ?kernel_name, label = ?label, "formatting a blank volume (ext4)");
            if let Err(e) = act::format(device, &label, named.volume_id.as_deref()).await {
                return fail(failed::FORMAT, e.to_string());
            }
        }
        let existed = mount_point.exists();
        if let Err(e) = act::make_dir(&mount_point) {
            return fail(failed::MOUNT, e.to_string());
        }
        if !existed {
            records.created.insert(mount_point.clone());
        }
        claimed.insert(mount_point.clone());
        if let Err(e) = self
            .setup
            .mounter
            .mount(
                device,
                &mount_point,
                &self.setup.owner,
                &self.setup.mountinfo,
            )
            .await
        {
            return fail(failed::MOUNT, e.to_string());
        }
        match owner_ids(&self.setup.owner) {
            Some(ids) => {
                if let Err(e) = act::chown(&mount_point, ids) {
                    tracing::warn!(target: "exoagent::volumes", mount_point = ?mount_point, reason = e.reason(), error = %e, "chown failed");
                }
            }
            None => {
                tracing::warn!(target: "exoagent::volumes", user = ?self.setup.owner, "no such user; the volume stays root's")
            }
        }
        tracing::info!(target: "exoagent::volumes", device = ?kernel_name, name = ?named.name, mount_point = ?mount_point, "volume mounted");
        VolumeStatus {
            mount_point: Some(mount_point.display().to_string()),
            detail: if fs.is_none() {
                "formatted (ext4) and mounted".into()
            } else {
                String::new()
            },
            ..base
        }
    }

    /// The first free mount point: `<name>`, then `<name>-<last 4 of the UUID>`, then
    /// `<name>-<last 4 of the device name>`. Free: nothing mounted or claimed there, and not a
    /// non-empty directory or a file (mounting would hide what is there).
    fn mount_point(
        &self,
        kernel_name: &str,
        partition: Option<u32>,
        named: &Named,
        claimed: &BTreeSet<PathBuf>,
    ) -> Option<PathBuf> {
        let mut dir = names::sanitise(&named.name);
        if dir.is_empty() {
            dir = names::sanitise(kernel_name);
        }
        if let Some(n) = partition {
            dir = names::partition_dir(&dir, n);
        }
        let candidates = [
            dir.clone(),
            names::clash_dir(&dir, named.volume_id.as_deref(), kernel_name),
            names::clash_dir(&dir, None, kernel_name),
        ];
        candidates
            .into_iter()
            .map(|c| self.setup.mount_root.join(c))
            .find(|p| {
                !claimed.contains(p)
                    && match std::fs::read_dir(p) {
                        Ok(mut entries) => entries.next().is_none(),
                        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
                    }
            })
    }

    /// Reconcile now, then on every block uevent (debounced, after `udevadm settle`), when sysfs
    /// changes without a uevent socket, and every 30 s, until `cancel` fires. Each result goes
    /// to `hub`.
    pub async fn watch(mut self, hub: StateHub, cancel: CancellationToken) {
        let mut events = match uevent::Uevents::open() {
            Ok(events) => Some(events),
            Err(e) => {
                tracing::warn!(target: "exoagent::volumes", error = %e, "no uevent socket; polling /sys/block every 2s");
                None
            }
        };
        let mut last_seen = self.sysfs_fingerprint();
        loop {
            let statuses = self.reconcile().await;
            let waiting = statuses.iter().any(|s| s.state == VolumeState::Waiting);
            hub.set_volumes(statuses);
            let deadline = Instant::now()
                + if waiting {
                    WAITING_INTERVAL
                } else {
                    SAFETY_INTERVAL
                };
            loop {
                let tick = match &events {
                    Some(_) => deadline,
                    None => (Instant::now() + POLL_INTERVAL).min(deadline),
                };
                let event = async {
                    match events.as_mut() {
                        Some(e) => e.next_block_event().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = cancel.cancelled() => return,
                    result = event => {
                        if let Err(e) = result {
                            tracing::warn!(target: "exoagent::volumes", error = %e, "uevent socket failed; polling /sys/block every 2s");
                            events = None;
                        }
                        self.debounce(events.as_mut(), &cancel).await;
                        act::udev_settle().await;
                        break;
                    }
                    () = tokio::time::sleep_until(tick) => {
                        if Instant::now() >= deadline {
                            break;
                        }
                        if self.sysfs_fingerprint() != last_seen {
                            break;
                        }
                    }
                }
            }
            last_seen = self.sysfs_fingerprint();
        }
    }

    /// Let a burst of uevents pass: return once none came for [`DEBOUNCE`].
    async fn debounce(&self, mut events: Option<&mut uevent::Uevents>, cancel: &CancellationToken) {
        loop {
            let next = async {
                match events.as_mut() {
                    Some(e) => e.next_block_event().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = cancel.cancelled() => return,
                more = next => if !more { return },
                () = tokio::time::sleep(DEBOUNCE) => return,
            }
        }
    }

    /// What sysfs and the mount table say, compared between polls.
    fn sysfs_fingerprint(&self) -> discover::Observed {
        discover::observe(
            &self.setup.sysfs,
            &self.read_mountinfo(),
            &self.setup.filter,
        )
    }
}

/// The user's uid and gid.
fn owner_ids(user: &str) -> Option<(u32, u32)> {
    let user = nix::unistd::User::from_name(user).ok()??;
    Some((user.uid.as_raw(), user.gid.as_raw()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use discover::Mount;

    #[test]
    fn only_mounts_under_the_root_whose_device_is_gone_are_stale() {
        let mount = |dev: &str, at: &str, source: &str| Mount {
            dev: dev.into(),
            mount_point: at.into(),
            source: source.into(),
        };
        let mounts = vec![
            mount("252:16", "/media/volume/kept", "/dev/vdb"),
            mount("252:32", "/media/volume/gone", "/dev/vdc"),
            mount("252:48", "/srv/other", "/dev/vdd"),
            mount("0:40", "/media/volume/nfs", "server:/x"),
            mount("252:64", "/media/volume", "/dev/vde"),
        ];
        let known: BTreeSet<String> = ["252:16".to_owned()].into();
        let stale = stale_mounts(&mounts, &known, Path::new("/media/volume"), |_| false);
        let at: Vec<&Path> = stale.iter().map(|m| m.mount_point.as_path()).collect();
        assert_eq!(at, [Path::new("/media/volume/gone")]);
    }
}
