//! `[services.rstudio]`: RStudio Server's settings, its configuration keys and their checks.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::schema::values::{absolute_path, normalise_http_url};
use crate::schema::{set, value, Checker, Field, Key, Located, Walker};

/// Where Posit's package puts the server binary.
pub const DEFAULT_RSERVER: &str = "/usr/lib/rstudio-server/bin/rserver";

/// `[services.rstudio]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RStudioSettings {
    /// Listening port (`www-port`, default 8787).
    pub port: u16,
    /// Listening address (`www-address`, default `0.0.0.0` so the UAP can reach it).
    pub bind: IpAddr,
    /// The `rserver` executable supervised in the foreground.
    pub rserver: PathBuf,
    /// Where the pinned package is downloaded from (`None`: Posit's URL for the OS). A mirror;
    /// the pinned SHA-256 (or signature) applies either way.
    pub package_url: Option<String>,
    /// Where Posit's signing key is fetched from for an rpm's signature check (`None`:
    /// Posit's URL). A mirror; the pinned fingerprint applies either way.
    pub signing_key_url: Option<String>,
    /// `auth-cookies-force-secure`: the browser reaches RStudio over HTTPS (the UAP).
    pub secure_cookies: bool,
    /// `auth-timeout-minutes` (0: never signed out for inactivity).
    pub auth_timeout_minutes: u32,
    /// `session-timeout-minutes` in rsession.conf (0: an idle R session is never suspended).
    pub session_timeout_minutes: u32,
    /// How long rserver may take from launch to its first good probe.
    pub start_timeout: Duration,
}

impl Default for RStudioSettings {
    fn default() -> Self {
        Self {
            port: 8787,
            bind: IpAddr::from([0, 0, 0, 0]),
            rserver: PathBuf::from(DEFAULT_RSERVER),
            package_url: None,
            signing_key_url: None,
            secure_cookies: true,
            // Research sessions run for days; sign-in is behind the passphrase anyway.
            auth_timeout_minutes: 0,
            // A suspended session loses running computations; never suspend by default.
            session_timeout_minutes: 0,
            start_timeout: Duration::from_secs(60),
        }
    }
}

/// What the files say about `[services.rstudio]` beyond `enabled` and `port`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Section {
    bind: Option<Located<IpAddr>>,
    rserver: Option<Located<PathBuf>>,
    package_url: Option<Located<Option<String>>>,
    signing_key_url: Option<Located<Option<String>>>,
    secure_cookies: Option<Located<bool>>,
    auth_timeout_minutes: Option<Located<u32>>,
    session_timeout_minutes: Option<Located<u32>>,
    start_timeout_s: Option<Located<u64>>,
}

/// A mirror URL, or `""` for Posit's own (`None`).
fn optional_url(w: &mut Walker<'_>, f: &Field<'_>) -> Option<Located<Option<String>>> {
    w.parsed(f, "an http or https URL, or \"\" for Posit's", |v| match v {
        "" => Some(None),
        url => normalise_http_url(url).map(Some),
    })
}

/// The keys of `[services.rstudio]` besides `enabled` and `port`.
pub const KEYS: &[Key<Section>] = &[
    Key {
        name: "bind",
        example: "\"127.0.0.1\"",
        read: |w, f, s| set(&mut s.bind, w.ip_address(f)),
    },
    Key {
        name: "rserver",
        example: "\"/opt/rstudio/bin/rserver\"",
        read: |w, f, s| set(&mut s.rserver, w.parsed(f, "an absolute path", absolute_path)),
    },
    Key {
        name: "package_url",
        example: "\"https://mirror.example.org/rstudio-server.deb\"",
        read: |w, f, s| set(&mut s.package_url, optional_url(w, f)),
    },
    Key {
        name: "signing_key_url",
        example: "\"https://mirror.example.org/posit-signing-key.asc\"",
        read: |w, f, s| set(&mut s.signing_key_url, optional_url(w, f)),
    },
    Key {
        name: "secure_cookies",
        example: "false",
        read: |w, f, s| set(&mut s.secure_cookies, w.boolean(f)),
    },
    Key {
        name: "auth_timeout_minutes",
        example: "60",
        read: |w, f, s| set(&mut s.auth_timeout_minutes, w.count(f, 0, 525_600, "minutes")),
    },
    Key {
        name: "session_timeout_minutes",
        example: "120",
        read: |w, f, s| {
            set(
                &mut s.session_timeout_minutes,
                w.count(f, 0, 525_600, "minutes"),
            )
        },
    },
    Key {
        name: "start_timeout_s",
        example: "30",
        read: |w, f, s| set(&mut s.start_timeout_s, w.start_timeout_s(f)),
    },
];

impl Section {
    /// The settings these keys give on `port`, defaults filling what no file set.
    pub fn settings(&self, port: Located<u16>, _check: &mut Checker) -> RStudioSettings {
        let d = RStudioSettings::default();
        RStudioSettings {
            port: port.value,
            bind: value(&self.bind).unwrap_or(d.bind),
            rserver: value(&self.rserver).unwrap_or(d.rserver),
            package_url: value(&self.package_url).unwrap_or(d.package_url),
            signing_key_url: value(&self.signing_key_url).unwrap_or(d.signing_key_url),
            secure_cookies: value(&self.secure_cookies).unwrap_or(d.secure_cookies),
            auth_timeout_minutes: value(&self.auth_timeout_minutes)
                .unwrap_or(d.auth_timeout_minutes),
            session_timeout_minutes: value(&self.session_timeout_minutes)
                .unwrap_or(d.session_timeout_minutes),
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
}
