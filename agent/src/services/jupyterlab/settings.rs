//! `[services.jupyterlab]`: JupyterLab's settings, its configuration keys and their checks.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::schema::values::{absolute_path, normalise_base_url};
use crate::schema::{set, value, Checker, Key, Located};

/// How to install Python packages into a service's virtual environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PythonInstaller {
    /// `uv` when it can be had (on PATH, or installed from PyPI), pip otherwise.
    Auto,
    /// Only `uv`; fail when it cannot be had.
    Uv,
    /// Only pip.
    Pip,
}

/// `[services.jupyterlab]`.
#[derive(Debug, Clone, PartialEq)]
pub struct JupyterLabSettings {
    /// Listening port (default 8888).
    pub port: u16,
    /// Listening address (default `0.0.0.0`, so the UAP can reach it).
    pub bind: IpAddr,
    /// URL prefix, always starting and ending with `/` (default `/`).
    pub base_url: String,
    /// The Python interpreter to build the venv from; `None` picks the newest suitable one.
    pub python: Option<PathBuf>,
    /// How packages get into the venv.
    pub installer: PythonInstaller,
    /// How long the server may take from launch to its first good probe.
    pub start_timeout: Duration,
}

impl Default for JupyterLabSettings {
    fn default() -> Self {
        Self {
            port: 8888,
            bind: IpAddr::from([0, 0, 0, 0]),
            base_url: "/".to_owned(),
            python: None,
            installer: PythonInstaller::Auto,
            start_timeout: Duration::from_secs(120),
        }
    }
}

/// What the files say about `[services.jupyterlab]` beyond `enabled` and `port`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Section {
    bind: Option<Located<IpAddr>>,
    base_url: Option<Located<String>>,
    python: Option<Located<Option<PathBuf>>>,
    installer: Option<Located<PythonInstaller>>,
    start_timeout_s: Option<Located<u64>>,
}

/// The keys of `[services.jupyterlab]` besides `enabled` and `port`.
pub const KEYS: &[Key<Section>] = &[
    Key {
        name: "bind",
        example: "\"127.0.0.1\"",
        read: |w, f, s| set(&mut s.bind, w.ip_address(f)),
    },
    Key {
        name: "base_url",
        example: "\"/lab\"",
        read: |w, f, s| {
            set(
                &mut s.base_url,
                w.parsed(
                    f,
                    "a URL path starting with '/' made of segments of letters, digits, '-', \
                     '.', '_' and '~' (no empty, '.' or '..' segments)",
                    normalise_base_url,
                ),
            )
        },
    },
    Key {
        name: "python",
        example: "\"/usr/bin/python3\"",
        read: |w, f, s| {
            set(
                &mut s.python,
                w.parsed(
                    f,
                    "an absolute path, or \"\" to pick one automatically",
                    python_path,
                ),
            )
        },
    },
    Key {
        name: "installer",
        example: "\"pip\"",
        read: |w, f, s| {
            set(
                &mut s.installer,
                w.parsed(f, "one of: auto, uv, pip", |v| match v {
                    "auto" => Some(PythonInstaller::Auto),
                    "uv" => Some(PythonInstaller::Uv),
                    "pip" => Some(PythonInstaller::Pip),
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

/// `python`: an absolute path, or the empty string for "pick automatically".
fn python_path(s: &str) -> Option<Option<PathBuf>> {
    if s.is_empty() {
        Some(None)
    } else {
        absolute_path(s).map(Some)
    }
}

impl Section {
    /// The settings these keys give on `port`, defaults filling what no file set.
    pub fn settings(&self, port: Located<u16>, _check: &mut Checker) -> JupyterLabSettings {
        let d = JupyterLabSettings::default();
        JupyterLabSettings {
            port: port.value,
            bind: value(&self.bind).unwrap_or(d.bind),
            base_url: value(&self.base_url).unwrap_or(d.base_url),
            python: value(&self.python).unwrap_or(d.python),
            installer: value(&self.installer).unwrap_or(d.installer),
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
