//! `[alerts]`: whether memory and disk use are watched, the thresholds that raise an alert,
//! the extra filesystems to watch and how often; its keys.

use std::path::PathBuf;
use std::time::Duration;

use crate::schema::values::absolute_path;
use crate::schema::{set, value, Key, Located};

/// `[alerts]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertSettings {
    /// Watch at all.
    pub enabled: bool,
    /// Memory use (total minus available) that raises `memory-high`, in percent.
    pub memory_percent: u8,
    /// A filesystem's use (counted like `df`) that raises `disk-high`, in percent.
    pub disk_percent: u8,
    /// Filesystems watched besides the root disk and the volumes exoagent mounted: the one
    /// holding each path.
    pub paths: Vec<PathBuf>,
    /// Time between samples.
    pub interval: Duration,
}

impl Default for AlertSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            memory_percent: 90,
            disk_percent: 90,
            paths: Vec::new(),
            interval: Duration::from_secs(30),
        }
    }
}

/// What the files say about `[alerts]`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Section {
    enabled: Option<Located<bool>>,
    memory_percent: Option<Located<u8>>,
    disk_percent: Option<Located<u8>>,
    paths: Option<Located<Vec<PathBuf>>>,
    interval_s: Option<Located<u64>>,
}

/// The keys of `[alerts]`.
pub const KEYS: &[Key<Section>] = &[
    Key {
        name: "enabled",
        example: "true",
        read: |w, f, s| set(&mut s.enabled, w.boolean(f)),
    },
    Key {
        name: "memory_percent",
        example: "90",
        read: |w, f, s| set(&mut s.memory_percent, w.count(f, 1, 100, "percent")),
    },
    Key {
        name: "disk_percent",
        example: "90",
        read: |w, f, s| set(&mut s.disk_percent, w.count(f, 1, 100, "percent")),
    },
    Key {
        name: "paths",
        example: "[\"/scratch\"]",
        read: |w, f, s| {
            set(
                &mut s.paths,
                w.parsed_array(
                    f,
                    "an array of absolute paths",
                    "an absolute path",
                    absolute_path,
                ),
            )
        },
    },
    Key {
        name: "interval_s",
        example: "30",
        read: |w, f, s| set(&mut s.interval_s, w.seconds(f, 1)),
    },
];

impl Section {
    /// The settings (every value was checked when read).
    pub fn settings(&self) -> AlertSettings {
        let d = AlertSettings::default();
        AlertSettings {
            enabled: value(&self.enabled).unwrap_or(d.enabled),
            memory_percent: value(&self.memory_percent).unwrap_or(d.memory_percent),
            disk_percent: value(&self.disk_percent).unwrap_or(d.disk_percent),
            paths: value(&self.paths).unwrap_or(d.paths),
            interval: value(&self.interval_s)
                .map(Duration::from_secs)
                .unwrap_or(d.interval),
        }
    }
}
