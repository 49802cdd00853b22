//! Resource alerts (`[alerts]`, DESIGN §4): memory and filesystem use sampled against their
//! thresholds; an alert is raised when use reaches its threshold and cleared once use falls
//! [`clearing_line`] below it; the alerts standing are published in the status snapshot
//! (status API, `exoagent status`, the login banner, Nova's `exoAgent` and `exoagent:alert:`
//! tags). Alerts never change the setup state: a full disk is the researcher's to act on.

pub mod settings;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use settings::{AlertSettings, Section, KEYS};

use crate::state::{now_ms, AlertResource, ResourceAlert, StateHub, VolumeState};

/// Points below its threshold use must fall before an alert clears (at most half the
/// threshold): a value hovering at the line would otherwise raise and clear it every sample.
pub const CLEAR_MARGIN: u8 = 5;

/// Where memory use is read.
pub const MEMINFO: &str = "/proc/meminfo";

/// The first sample comes this soon at most (the interval may be minutes): a disk that is
/// already full at boot is worth saying early.
const FIRST_SAMPLE: Duration = Duration::from_secs(10);

/// How long one round of samples may take: a filesystem whose server has gone (NFS) can block
/// `statvfs` for good. A round still running when the next is due is not doubled.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(5);

/// One thing watched.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Subject {
    /// The instance's memory.
    Memory,
    /// The filesystem holding this path (its mount point, for the root disk and volumes).
    Filesystem(PathBuf),
}

impl Subject {
    fn resource(&self) -> AlertResource {
        match self {
            Self::Memory => AlertResource::Memory,
            Self::Filesystem(_) => AlertResource::Filesystem,
        }
    }
}

/// What one sample did to one subject's alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Use reached the threshold: the alert is raised.
    Raised,
    /// Raised before and still within the margin: it stands.
    Held,
    /// Use fell the margin below the threshold: the alert is cleared.
    Cleared,
    /// No alert, and none due.
    Quiet,
}

/// A raised alert: since when, and use at the latest sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raised {
    /// When it was raised (ms since the epoch).
    pub since_ms: u64,
    /// Use at the latest sample, in percent.
    pub used: u8,
}

/// Use below this clears an alert raised at `threshold`: [`CLEAR_MARGIN`] points below it, or
/// half the threshold when that is less (a 4 % threshold still clears).
pub fn clearing_line(threshold: u8) -> u8 {
    threshold - CLEAR_MARGIN.min(threshold / 2)
}

/// One subject's transition: `previous` is its alert before this sample of `used` percent.
pub fn step(
    previous: Option<Raised>,
    used: u8,
    threshold: u8,
    now_ms: u64,
) -> (Option<Raised>, Change) {
    match previous {
        None if used >= threshold => (
            Some(Raised {
                since_ms: now_ms,
                used,
            }),
            Change::Raised,
        ),
        None => (None, Change::Quiet),
        Some(_) if used < clearing_line(threshold) => (None, Change::Cleared),
        Some(raised) => (Some(Raised { used, ..raised }), Change::Held),
    }
}

/// Every subject's alert, carried from sample to sample.
#[derive(Debug, Default)]
pub struct AlertBook {
    raised: BTreeMap<Subject, Raised>,
}

impl AlertBook {
    /// Apply one round of `readings` (subject and use in percent) at `now_ms` and return the
    /// alerts standing, memory first, then filesystems in the readings' order. A subject raised
    /// before and missing from this round (a volume unmounted, a path gone) is cleared: there
    /// is no use left to warn about.
    pub fn observe(
        &mut self,
        readings: &[(Subject, u8)],
        settings: &AlertSettings,
        now_ms: u64,
    ) -> Vec<ResourceAlert> {
        let mut next = BTreeMap::new();
        let mut standing = Vec::new();
        for (subject, used) in readings {
            if next.contains_key(subject) {
                continue;
            }
            let threshold = match subject {
                Subject::Memory => settings.memory_percent,
                Subject::Filesystem(_) => settings.disk_percent,
            };
            let previous = self.raised.get(subject).copied();
            let (raised, change) = step(previous, *used, threshold, now_ms);
            log_change(subject, change, *used, threshold);
            if let Some(raised) = raised {
                next.insert(subject.clone(), raised);
                standing.push(ResourceAlert {
                    resource: subject.resource(),
                    code: subject.resource().code().to_owned(),
                    path: match subject {
                        Subject::Memory => None,
                        Subject::Filesystem(path) => Some(path.to_string_lossy().into_owned()),
                    },
                    used_percent: raised.used,
                    threshold_percent: threshold,
                    since_ms: raised.since_ms,
                });
            }
        }
        for gone in self.raised.keys().filter(|s| !next.contains_key(*s)) {
            if !readings.iter().any(|(s, _)| s == gone) {
                tracing::info!(target: "exoagent::alerts", subject = ?gone, "resource alert cleared: no longer watched");
            }
        }
        self.raised = next;
        standing.sort_by_key(|a| a.resource);
        standing
    }
}

fn log_change(subject: &Subject, change: Change, used: u8, threshold: u8) {
    match change {
        Change::Raised => {
            tracing::warn!(target: "exoagent::alerts", subject = ?subject, used, threshold, "resource alert raised")
        }
        Change::Cleared => {
            tracing::info!(target: "exoagent::alerts", subject = ?subject, used, threshold, "resource alert cleared")
        }
        Change::Held | Change::Quiet => {}
    }
}

/// Memory in use, total minus available, in percent of `MemTotal` (what `free` shows as used
/// plus buffers and reclaimable cache the kernel would not give back). `None` when either
/// line is missing or the total is 0.
pub fn memory_percent(meminfo: &str) -> Option<u8> {
    let field = |name: &str| {
        meminfo.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
    };
    let (total, available) = (field("MemTotal")?, field("MemAvailable")?);
    if total == 0 {
        return None;
    }
    Some(percent(total.saturating_sub(available), total))
}

/// `used` of `total`, rounded up: 89.5 % is not yet under a 90 % threshold, and a disk with
/// one block left is not "100 %" only by rounding (rounded like `df`).
fn percent(used: u64, total: u64) -> u8 {
    let (used, total) = (u128::from(used), u128::from(total));
    (used * 100).div_ceil(total).min(100) as u8
}

/// A writable filesystem's use like `df`'s `Use%`: used blocks over used plus those available
/// to unprivileged users (root's reserve is not space a researcher has), and its device, to
/// watch one filesystem once. `Ok(None)` for a read-only filesystem (nothing can fill it) or
/// one with no blocks (`proc`, `sysfs`); an error when the path cannot be looked at.
pub fn filesystem_use(path: &Path) -> nix::Result<Option<(u64, u8)>> {
    let stat = nix::sys::statvfs::statvfs(path)?;
    let device = nix::sys::stat::stat(path)?.st_dev;
    if stat.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY) {
        return Ok(None);
    }
    let (used, total) = df_blocks(&stat);
    if total == 0 {
        return Ok(None);
    }
    Ok(Some((device, percent(used, total))))
}

/// Used blocks and the total `df` divides by: used plus those available to unprivileged users
/// (root's reserve is not space a researcher has). Shared with the console's load line.
pub fn df_blocks(stat: &nix::sys::statvfs::Statvfs) -> (u64, u64) {
    let used = stat.blocks().saturating_sub(stat.blocks_free());
    (used, used.saturating_add(stat.blocks_available()))
}

/// What to sample, and where from.
#[derive(Debug, Clone)]
pub struct Watched {
    /// `/proc/meminfo` (injected: a test may give a file of its own).
    pub meminfo: PathBuf,
    /// The root disk (the sandbox's directory in the sandbox).
    pub root: PathBuf,
    /// The mount points of volumes exoagent mounted, then `[alerts] paths`.
    pub filesystems: Vec<PathBuf>,
}

/// One round of samples.
#[derive(Debug, Default)]
pub struct Round {
    /// Subjects and their use in percent: memory, then each filesystem once (the first path
    /// naming it wins, so a configured path on the root disk is not a second subject).
    pub readings: Vec<(Subject, u8)>,
    /// Paths that could not be looked at (missing, no permission), with why.
    pub unreadable: Vec<(PathBuf, nix::Error)>,
}

/// Take one round of samples of `watched`.
pub fn sample(watched: &Watched) -> Round {
    let mut readings = Vec::new();
    let mut unreadable = Vec::new();
    if let Some(used) = std::fs::read_to_string(&watched.meminfo)
        .ok()
        .as_deref()
        .and_then(memory_percent)
    {
        readings.push((Subject::Memory, used));
    }
    let mut devices = Vec::new();
    for path in std::iter::once(&watched.root).chain(&watched.filesystems) {
        match filesystem_use(path) {
            Ok(Some((device, used))) if !devices.contains(&device) => {
                devices.push(device);
                readings.push((Subject::Filesystem(path.clone()), used));
            }
            Ok(_) => {}
            Err(e) => unreadable.push((path.clone(), e)),
        }
    }
    Round {
        readings,
        unreadable,
    }
}

/// Sample every `settings.interval` and publish the alerts standing to `hub`, until `cancel`.
/// The volumes' mount points are taken from the hub each round: one mounted later is watched
/// from then on.
pub async fn watch(
    settings: AlertSettings,
    meminfo: PathBuf,
    root: PathBuf,
    hub: StateHub,
    cancel: CancellationToken,
) {
    let mut book = AlertBook::default();
    let mut delay = settings.interval.min(FIRST_SAMPLE);
    let mut running: Option<tokio::task::JoinHandle<Round>> = None;
    // Paths said to be unreadable, so that each is said once (again only after it came back).
    let mut unreadable_said: Vec<PathBuf> = Vec::new();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = settings.interval;
        let still_blocked = running.is_some();
        let mut handle = match running.take() {
            // The previous round is still blocked in the kernel: wait for it, not beside it.
            Some(handle) => handle,
            None => {
                let mut filesystems: Vec<PathBuf> = hub
                    .snapshot()
                    .volumes
                    .iter()
                    .filter(|v| v.state == VolumeState::Mounted)
                    .filter_map(|v| v.mount_point.as_ref().map(PathBuf::from))
                    .collect();
                filesystems.extend(settings.paths.iter().cloned());
                let watched = Watched {
                    meminfo: meminfo.clone(),
                    root: root.clone(),
                    filesystems,
                };
                tokio::task::spawn_blocking(move || sample(&watched))
            }
        };
        let round = tokio::select! {
            () = cancel.cancelled() => return,
            done = tokio::time::timeout(SAMPLE_TIMEOUT, &mut handle) => match done {
                Ok(Ok(round)) => round,
                Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Ok(Err(_)) => continue,
                Err(_) => {
                    if !still_blocked {
                        tracing::warn!(target: "exoagent::alerts", "a resource sample took over {SAMPLE_TIMEOUT:?} (a filesystem not answering?); waiting for it");
                    }
                    running = Some(handle);
                    continue;
                }
            },
        };
        for (path, e) in &round.unreadable {
            if !unreadable_said.contains(path) {
                tracing::warn!(target: "exoagent::alerts", path = ?path, error = %e, "a watched path cannot be looked at; its filesystem is not watched until it can");
            }
        }
        unreadable_said = round.unreadable.into_iter().map(|(path, _)| path).collect();
        hub.set_alerts(book.observe(&round.readings, &settings, now_ms()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_alert_is_raised_at_the_threshold_and_cleared_a_margin_below() {
        let (raised, change) = step(None, 89, 90, 1);
        assert_eq!((raised, change), (None, Change::Quiet));
        let (raised, change) = step(None, 90, 90, 1);
        assert_eq!(change, Change::Raised);
        let raised = raised.unwrap();
        assert_eq!(raised.since_ms, 1);
        // Between the clearing line and the threshold it stands, its use following, its
        // start kept.
        let (held, change) = step(Some(raised), 86, 90, 2);
        assert_eq!(change, Change::Held);
        assert_eq!(
            held,
            Some(Raised {
                since_ms: 1,
                used: 86
            })
        );
        let (held, change) = step(held, 85, 90, 3);
        assert_eq!(change, Change::Held, "85 is not below 90 - {CLEAR_MARGIN}");
        assert_eq!(step(held, 84, 90, 4), (None, Change::Cleared));
        // A threshold near the margin clears half way down.
        assert_eq!(clearing_line(4), 2);
        assert_eq!(clearing_line(1), 1);
        let low = step(None, 4, 4, 1).0;
        assert_eq!(step(low, 2, 4, 2).1, Change::Held);
        assert_eq!(step(low, 1, 4, 2).1, Change::Cleared);
    }

    #[test]
    fn the_book_keeps_starts_orders_memory_first_and_drops_what_is_gone() {
        let settings = AlertSettings {
            memory_percent: 80,
            disk_percent: 50,
            ..AlertSettings::default()
        };
        let data = Subject::Filesystem("/data".into());
        let mut book = AlertBook::default();
        let first = book.observe(&[(data.clone(), 60), (Subject::Memory, 79)], &settings, 10);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].code, "disk-high");
        assert_eq!(first[0].path.as_deref(), Some("/data"));
        assert_eq!(
            (first[0].used_percent, first[0].threshold_percent),
            (60, 50)
        );
        let second = book.observe(&[(data.clone(), 70), (Subject::Memory, 95)], &settings, 20);
        let codes: Vec<_> = second.iter().map(|a| a.code.as_str()).collect();
        assert_eq!(codes, ["memory-high", "disk-high"]);
        assert_eq!(second[1].since_ms, 10, "a standing alert keeps its start");
        assert_eq!(second[1].used_percent, 70);
        // The volume unmounted: its alert goes with it.
        let third = book.observe(&[(Subject::Memory, 95)], &settings, 30);
        assert_eq!(third.len(), 1);
        assert_eq!(third[0].resource, AlertResource::Memory);
        // Back: a new alert, a new start.
        let fourth = book.observe(&[(Subject::Memory, 95), (data, 99)], &settings, 40);
        assert_eq!(fourth[1].since_ms, 40);
    }

    #[test]
    fn memory_is_total_minus_available() {
        let meminfo = "MemTotal:       16000000 kB\nMemFree:         1000000 kB\n\
                       MemAvailable:    4000000 kB\nBuffers:  1 kB\n";
        assert_eq!(memory_percent(meminfo), Some(75));
        assert_eq!(
            memory_percent("MemTotal: 3 kB\nMemAvailable: 1 kB\n"),
            Some(67)
        );
        // A kernel before 3.14 has no MemAvailable: no guess.
        assert_eq!(memory_percent("MemTotal: 100 kB\nMemFree: 1 kB\n"), None);
        assert_eq!(memory_percent("MemTotal: 0 kB\nMemAvailable: 0 kB\n"), None);
        assert_eq!(
            memory_percent("MemTotalX: 5 kB\nMemAvailable: 1 kB\n"),
            None
        );
        assert_eq!(memory_percent(""), None);
    }

    #[test]
    fn percentages_round_up_and_stop_at_100() {
        assert_eq!(percent(0, 10), 0);
        assert_eq!(percent(895, 1000), 90);
        assert_eq!(percent(999_999, 1_000_000), 100);
        assert_eq!(percent(u64::MAX, u64::MAX), 100);
        assert_eq!(percent(20, 10), 100);
    }

    #[tokio::test]
    async fn a_volume_mounted_later_is_watched_and_alerts_reach_the_hub() {
        use crate::state::{VolumeState, VolumeStatus};
        let dir = tempfile::tempdir().unwrap();
        let meminfo = dir.path().join("meminfo");
        std::fs::write(&meminfo, "MemTotal: 100 kB\nMemAvailable: 5 kB\n").unwrap();
        let hub = StateHub::new([]);
        let settings = AlertSettings {
            disk_percent: 1,
            interval: Duration::from_secs(1),
            ..AlertSettings::default()
        };
        let cancel = CancellationToken::new();
        // /proc as the "root disk" has no blocks: only the volume's filesystem is a disk here.
        let watcher = tokio::spawn(watch(
            settings,
            meminfo,
            "/proc".into(),
            hub.clone(),
            cancel.clone(),
        ));
        let mut rx = hub.subscribe();
        let alerts = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                rx.changed().await.unwrap();
                let alerts = rx.borrow_and_update().alerts.clone();
                if !alerts.is_empty() {
                    return alerts;
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        assert_eq!(alerts[0].code, "memory-high");
        assert_eq!(alerts[0].used_percent, 95);
        hub.set_volumes(vec![VolumeStatus {
            device: "/dev/vdb".into(),
            volume_id: None,
            name: Some("data".into()),
            state: VolumeState::Mounted,
            mount_point: Some(dir.path().to_string_lossy().into_owned()),
            reason: None,
            detail: String::new(),
        }]);
        let alerts = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                rx.changed().await.unwrap();
                let alerts = rx.borrow_and_update().alerts.clone();
                if alerts.len() == 2 {
                    return alerts;
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(alerts[1].code, "disk-high");
        assert_eq!(
            alerts[1].path.as_deref(),
            Some(dir.path().to_str().unwrap())
        );
        cancel.cancel();
        watcher.await.unwrap();
    }

    #[test]
    fn one_filesystem_is_one_subject_and_pseudo_ones_none() {
        let dir = tempfile::tempdir().unwrap();
        let meminfo = dir.path().join("meminfo");
        std::fs::write(&meminfo, "MemTotal: 100 kB\nMemAvailable: 40 kB\n").unwrap();
        let watched = Watched {
            meminfo,
            root: dir.path().to_path_buf(),
            // On the same filesystem as the root: watched once, under the root's name;
            // /proc has no blocks; a missing path cannot be read.
            filesystems: vec![
                dir.path().join("meminfo"),
                "/proc".into(),
                dir.path().join("missing"),
            ],
        };
        let round = sample(&watched);
        let readings = round.readings;
        assert_eq!(readings.len(), 2, "{readings:?}");
        assert_eq!(readings[0], (Subject::Memory, 60));
        assert_eq!(readings[1].0, Subject::Filesystem(dir.path().to_path_buf()));
        assert_eq!(round.unreadable.len(), 1);
        assert_eq!(round.unreadable[0].0, dir.path().join("missing"));
        assert_eq!(round.unreadable[0].1, nix::Error::ENOENT);
    }
}
