//! `[services.guacamole]`: Guacamole's settings, its configuration keys and their checks.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::forwarded::Cidr;
use crate::schema::{set, value, Checker, Key, Located};
use crate::services::OccupiedPort;

/// Where guacd comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuacdSource {
    /// The distribution's package where one exists (Ubuntu universe, EPEL), the official
    /// container image otherwise.
    Auto,
    /// The distribution's `guacd` package, run by the web side as its child.
    Package,
    /// The official image, pinned by digest, run with podman on the host network.
    Container,
    /// Someone else runs guacd at `guacd_address`.
    External,
}

/// `[services.guacamole]`: guacd plus the web side (token API, client page, tunnel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuacamoleSettings {
    /// The web side's port (default 49528).
    pub port: u16,
    /// The web side's address (default `0.0.0.0`, so the UAP can reach it).
    pub bind: IpAddr,
    /// Where guacd comes from.
    pub guacd: GuacdSource,
    /// Where guacd listens (default `127.0.0.1:4822`).
    pub guacd_address: SocketAddr,
    /// Tokens expire after this long without use (at least 60 minutes).
    pub session_timeout: Duration,
    /// sshd's port for the `shell` connection and SFTP.
    pub ssh_port: u16,
    /// Whether guacd may reach sshd at a loopback address of its own with delayed ACKs off
    /// (`ssh_loopback.rs`; default on).
    pub ssh_quickack: bool,
    /// The desktop's RFB port when the desktop service is enabled: the `desktop` connection.
    pub desktop_port: Option<u16>,
    /// How long from launch to the first good probe.
    pub start_timeout: Duration,
    /// Peers whose `X-Forwarded-For` names the client (the UAP's address); none by default.
    pub trusted_proxies: Vec<Cidr>,
}

impl Default for GuacamoleSettings {
    fn default() -> Self {
        Self {
            port: 49528,
            bind: IpAddr::from([0, 0, 0, 0]),
            guacd: GuacdSource::Auto,
            guacd_address: SocketAddr::from(([127, 0, 0, 1], 4822)),
            session_timeout: Duration::from_secs(3600),
            ssh_port: 22,
            ssh_quickack: true,
            desktop_port: None,
            start_timeout: Duration::from_secs(120),
            trusted_proxies: Vec::new(),
        }
    }
}

/// What the files say about `[services.guacamole]` beyond `enabled` and `port`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Section {
    bind: Option<Located<IpAddr>>,
    guacd: Option<Located<GuacdSource>>,
    guacd_address: Option<Located<SocketAddr>>,
    session_timeout_min: Option<Located<u64>>,
    ssh_port: Option<Located<u16>>,
    ssh_quickack: Option<Located<bool>>,
    start_timeout_s: Option<Located<u64>>,
    trusted_proxies: Option<Located<Vec<Cidr>>>,
}

/// The keys of `[services.guacamole]` besides `enabled` and `port`.
pub const KEYS: &[Key<Section>] = &[
    Key {
        name: "bind",
        example: "\"127.0.0.1\"",
        read: |w, f, s| set(&mut s.bind, w.ip_address(f)),
    },
    Key {
        name: "guacd",
        example: "\"external\"",
        read: |w, f, s| {
            set(
                &mut s.guacd,
                w.parsed(f, "one of: auto, package, container, external", |v| match v {
                    "auto" => Some(GuacdSource::Auto),
                    "package" => Some(GuacdSource::Package),
                    "container" => Some(GuacdSource::Container),
                    "external" => Some(GuacdSource::External),
                    _ => None,
                }),
            )
        },
    },
    Key {
        name: "guacd_address",
        example: "\"127.0.0.1:4823\"",
        read: |w, f, s| {
            set(
                &mut s.guacd_address,
                w.parsed(
                    f,
                    "an IP address and port, e.g. \"127.0.0.1:4822\"",
                    |v| v.parse().ok(),
                ),
            )
        },
    },
    Key {
        name: "session_timeout_min",
        example: "120",
        read: |w, f, s| set(&mut s.session_timeout_min, w.count(f, 60, 1440, "minutes")),
    },
    Key {
        name: "ssh_port",
        example: "2222",
        read: |w, f, s| set(&mut s.ssh_port, w.port(f)),
    },
    Key {
        name: "ssh_quickack",
        example: "false",
        read: |w, f, s| set(&mut s.ssh_quickack, w.boolean(f)),
    },
    Key {
        name: "start_timeout_s",
        example: "30",
        read: |w, f, s| set(&mut s.start_timeout_s, w.start_timeout_s(f)),
    },
    Key {
        name: "trusted_proxies",
        example: "[\"10.0.0.7\", \"192.168.0.0/24\"]",
        read: |w, f, s| set(&mut s.trusted_proxies, w.cidrs(f)),
    },
];

impl Section {
    /// guacd's port when guacd is on this machine (a loopback or wildcard `guacd_address`):
    /// another service there would get guacd's traffic, or keep guacd from binding.
    pub fn occupied_ports(&self) -> Vec<OccupiedPort> {
        let address = value(&self.guacd_address).unwrap_or(GuacamoleSettings::default().guacd_address);
        let ip = address.ip();
        if !(ip.is_loopback() || ip.is_unspecified()) {
            return Vec::new();
        }
        vec![OccupiedPort {
            key: "guacd_address",
            port: address.port(),
            origin: self.guacd_address.as_ref().map(|l| l.origin),
        }]
    }

    /// The settings these keys give on `port`, defaults filling what no file set.
    pub fn settings(&self, port: Located<u16>, _check: &mut Checker) -> GuacamoleSettings {
        let d = GuacamoleSettings::default();
        GuacamoleSettings {
            port: port.value,
            bind: value(&self.bind).unwrap_or(d.bind),
            guacd: value(&self.guacd).unwrap_or(d.guacd),
            guacd_address: value(&self.guacd_address).unwrap_or(d.guacd_address),
            session_timeout: value(&self.session_timeout_min)
                .map(|m| Duration::from_secs(m * 60))
                .unwrap_or(d.session_timeout),
            ssh_port: value(&self.ssh_port).unwrap_or(d.ssh_port),
            ssh_quickack: value(&self.ssh_quickack).unwrap_or(d.ssh_quickack),
            desktop_port: None,
            start_timeout: value(&self.start_timeout_s)
                .map(Duration::from_secs)
                .unwrap_or(d.start_timeout),
            trusted_proxies: value(&self.trusted_proxies).unwrap_or(d.trusted_proxies),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_read_into_its_own_field() {
        let problems = crate::schema::key_table_problems("s", KEYS);
        assert!(problems.is_empty(), "{problems:#?}");
    }
}
