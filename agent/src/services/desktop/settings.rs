//! `[services.desktop]`: the desktop's settings, its configuration keys and their checks.

use std::time::Duration;

use super::session::DesktopEnvironment;
use crate::schema::{set, value, Checker, ErrorKind, Key, Located};

/// Which VNC server runs the desktop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VncServerChoice {
    /// TurboVNC with VirtualGL when an NVIDIA GPU is present, TigerVNC otherwise.
    Auto,
    /// TigerVNC from the distribution.
    TigerVnc,
    /// TurboVNC (and VirtualGL) from their vendor repositories.
    TurboVnc,
}

/// The RFB port of X display `:0`; display `:N` answers on `5900 + N`.
pub const RFB_BASE_PORT: u16 = 5900;
/// The highest display number `exoagent desktop-session` accepts.
pub const MAX_DISPLAY: u16 = 999;

/// `[services.desktop]`: a VNC desktop on display :1, on loopback (Guacamole reaches it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesktopSettings {
    /// RFB port (default 5901, display :1); always `5900 + display`, display 1 to 999.
    pub port: u16,
    /// Xfce or GNOME.
    pub environment: DesktopEnvironment,
    /// Screen size at start; guacd 1.6 resizes it to the browser window, guacd 1.3.0 cannot.
    pub geometry: (u16, u16),
    /// Which VNC server.
    pub vnc_server: VncServerChoice,
    /// How long from launch to the first good probe.
    pub start_timeout: Duration,
}

impl DesktopSettings {
    /// The X display number of the RFB port (5901 → `:1`).
    pub fn display(&self) -> u16 {
        self.port - RFB_BASE_PORT
    }
}

impl Default for DesktopSettings {
    fn default() -> Self {
        Self {
            port: 5901,
            environment: DesktopEnvironment::Xfce,
            geometry: (1280, 800),
            vnc_server: VncServerChoice::Auto,
            start_timeout: Duration::from_secs(120),
        }
    }
}

/// What the files say about `[services.desktop]` beyond `enabled` and `port`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Section {
    environment: Option<Located<DesktopEnvironment>>,
    geometry: Option<Located<(u16, u16)>>,
    vnc_server: Option<Located<VncServerChoice>>,
    start_timeout_s: Option<Located<u64>>,
}

/// The keys of `[services.desktop]` besides `enabled` and `port`.
pub const KEYS: &[Key<Section>] = &[
    Key {
        name: "environment",
        example: "\"gnome\"",
        read: |w, f, s| {
            set(
                &mut s.environment,
                w.parsed(f, "one of: xfce, gnome", |v| match v {
                    "xfce" => Some(DesktopEnvironment::Xfce),
                    "gnome" => Some(DesktopEnvironment::Gnome),
                    _ => None,
                }),
            )
        },
    },
    Key {
        name: "geometry",
        example: "\"1920x1080\"",
        read: |w, f, s| {
            set(
                &mut s.geometry,
                w.parsed(
                    f,
                    "WIDTHxHEIGHT, each from 320 to 8192 (e.g. \"1280x800\")",
                    geometry,
                ),
            )
        },
    },
    Key {
        name: "vnc_server",
        example: "\"turbovnc\"",
        read: |w, f, s| {
            set(
                &mut s.vnc_server,
                w.parsed(f, "one of: auto, tigervnc, turbovnc", |v| match v {
                    "auto" => Some(VncServerChoice::Auto),
                    "tigervnc" => Some(VncServerChoice::TigerVnc),
                    "turbovnc" => Some(VncServerChoice::TurboVnc),
                    _ => None,
                }),
            )
        },
    },
    Key {
        name: "start_timeout_s",
        example: "30",
        read: |w, f, s| set(&mut s.start_timeout_s, w.start_timeout_s(f)),
    },
];

/// `1280x800` → (1280, 800), each side 320..=8192.
pub fn geometry(s: &str) -> Option<(u16, u16)> {
    let (w, h) = s.split_once('x')?;
    let side = |v: &str| {
        v.parse::<u16>()
            .ok()
            .filter(|n| (320..=8192).contains(n) && !v.starts_with('+'))
    };
    Some((side(w)?, side(h)?))
}

impl Section {
    /// The settings these keys give on `port`, defaults filling what no file set. The port
    /// names the X display (`5900 + N`), so one that maps to no display the session accepts
    /// is refused where it was set.
    pub fn settings(&self, port: Located<u16>, check: &mut Checker) -> DesktopSettings {
        let first = RFB_BASE_PORT + 1;
        let last = RFB_BASE_PORT + MAX_DISPLAY;
        if !(first..=last).contains(&port.value) {
            check.error(
                port.origin,
                "services.desktop.port".to_owned(),
                ErrorKind::OutOfRange,
                format!(
                    "invalid value {}, expected a port from {first} to {last}: the desktop's \
                     port is 5900 + its X display number (5901 is display :1; display :0 \
                     belongs to a local X server)",
                    port.value
                ),
            );
        }
        let d = DesktopSettings::default();
        DesktopSettings {
            port: port.value,
            environment: value(&self.environment).unwrap_or(d.environment),
            geometry: value(&self.geometry).unwrap_or(d.geometry),
            vnc_server: value(&self.vnc_server).unwrap_or(d.vnc_server),
            start_timeout: value(&self.start_timeout_s)
                .map(Duration::from_secs)
                .unwrap_or(d.start_timeout),
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

    #[test]
    fn geometries() {
        assert_eq!(geometry("1280x800"), Some((1280, 800)));
        for bad in ["1280", "x800", "100x800", "1280x9000", "+1280x800", "1280X800"] {
            assert_eq!(geometry(bad), None, "{bad}");
        }
    }
}
