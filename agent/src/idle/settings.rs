//! `[idle]`: whether idleness is watched, what counts as activity, how long without it makes
//! the instance idle, and the optional action (shelving through Nova) after a grace period;
//! its keys.

use std::time::Duration;

use crate::schema::{set, value, Key, Located};

/// What is done once the instance has been idle for the grace period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleAction {
    /// Nothing: idleness is reported only.
    None,
    /// Shelve the instance through `[cloud] clouds_yaml`'s credential.
    Shelve,
}

impl IdleAction {
    /// The configuration's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Shelve => "shelve",
        }
    }

    fn parse(word: &str) -> Option<Self> {
        match word {
            "none" => Some(Self::None),
            "shelve" => Some(Self::Shelve),
            _ => None,
        }
    }
}

/// `[idle]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdleSettings {
    /// Watch at all.
    pub enabled: bool,
    /// Time without activity after which the instance is idle.
    pub after: Duration,
    /// Time between samples.
    pub interval: Duration,
    /// CPU use (all CPUs, busy share of the interval) that counts as activity, in percent.
    pub cpu_percent: u8,
    /// Disk reads and writes together that count as activity, KiB per second.
    pub disk_kib_per_s: u32,
    /// Network traffic in and out together (every interface but loopback) that counts as
    /// activity, KiB per second.
    pub network_kib_per_s: u32,
    /// What happens once idle for `grace`.
    pub action: IdleAction,
    /// Time from the warning to the action; any activity meanwhile cancels it.
    pub grace: Duration,
}

impl Default for IdleSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            after: Duration::from_secs(3600),
            interval: Duration::from_secs(60),
            cpu_percent: 10,
            disk_kib_per_s: 1024,
            network_kib_per_s: 64,
            action: IdleAction::None,
            grace: Duration::from_secs(1800),
        }
    }
}

/// What the files say about `[idle]`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Section {
    pub(crate) enabled: Option<Located<bool>>,
    after_s: Option<Located<u64>>,
    interval_s: Option<Located<u64>>,
    cpu_percent: Option<Located<u8>>,
    disk_kib_per_s: Option<Located<u32>>,
    network_kib_per_s: Option<Located<u32>>,
    pub(crate) action: Option<Located<IdleAction>>,
    grace_s: Option<Located<u64>>,
}

/// The keys of `[idle]`.
pub const KEYS: &[Key<Section>] = &[
    Key {
        name: "enabled",
        example: "false",
        read: |w, f, s| set(&mut s.enabled, w.boolean(f)),
    },
    Key {
        name: "after_s",
        example: "7200",
        read: |w, f, s| set(&mut s.after_s, w.seconds(f, 1)),
    },
    Key {
        name: "interval_s",
        example: "30",
        read: |w, f, s| set(&mut s.interval_s, w.seconds(f, 1)),
    },
    Key {
        name: "cpu_percent",
        example: "5",
        read: |w, f, s| set(&mut s.cpu_percent, w.count(f, 1, 100, "percent")),
    },
    Key {
        name: "disk_kib_per_s",
        example: "2048",
        read: |w, f, s| {
            set(
                &mut s.disk_kib_per_s,
                w.count(f, 1, 1 << 30, "KiB per second"),
            )
        },
    },
    Key {
        name: "network_kib_per_s",
        example: "128",
        read: |w, f, s| {
            set(
                &mut s.network_kib_per_s,
                w.count(f, 1, 1 << 30, "KiB per second"),
            )
        },
    },
    Key {
        name: "action",
        example: "\"shelve\"",
        read: |w, f, s| {
            set(
                &mut s.action,
                w.parsed(f, "\"none\" or \"shelve\"", IdleAction::parse),
            )
        },
    },
    Key {
        name: "grace_s",
        example: "600",
        read: |w, f, s| set(&mut s.grace_s, w.seconds(f, 1)),
    },
];

impl Section {
    /// The settings (every value was checked when read).
    pub fn settings(&self) -> IdleSettings {
        let d = IdleSettings::default();
        let secs = |v: &Option<Located<u64>>, dflt: Duration| {
            value(v).map(Duration::from_secs).unwrap_or(dflt)
        };
        IdleSettings {
            enabled: value(&self.enabled).unwrap_or(d.enabled),
            after: secs(&self.after_s, d.after),
            interval: secs(&self.interval_s, d.interval),
            cpu_percent: value(&self.cpu_percent).unwrap_or(d.cpu_percent),
            disk_kib_per_s: value(&self.disk_kib_per_s).unwrap_or(d.disk_kib_per_s),
            network_kib_per_s: value(&self.network_kib_per_s).unwrap_or(d.network_kib_per_s),
            action: value(&self.action).unwrap_or(d.action),
            grace: secs(&self.grace_s, d.grace),
        }
    }
}
