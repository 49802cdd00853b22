//! `[services.jupyterlab]`: JupyterLab's settings, its configuration keys and their checks.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::schema::values::{absolute_path, normalise_base_url};
use crate::schema::{set, value, Checker, ErrorKind, Key, Located};

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
    /// Offer Exosphere's notebook link (`exoCustomWorkflow` + the token console line); only
    /// possible on port 8888, the one Exosphere links to.
    pub exosphere_link: bool,
    /// A workflow: JupyterLab runs in the environment built from this repository.
    pub workflow: Option<super::workflow::WorkflowSettings>,
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
            exosphere_link: true,
            workflow: None,
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
    exosphere_link: Option<Located<bool>>,
    workflow_repository: Option<Located<Option<String>>>,
    workflow_ref: Option<Located<String>>,
    workflow_path: Option<Located<String>>,
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
    Key {
        name: "exosphere_link",
        example: "false",
        read: |w, f, s| set(&mut s.exosphere_link, w.boolean(f)),
    },
    Key {
        name: "workflow_repository",
        example: "\"https://github.com/org/demo.git\"",
        read: |w, f, s| {
            set(
                &mut s.workflow_repository,
                w.parsed(
                    f,
                    "a git URL (https://, http://, git://, ssh:// or host:path) without \
                     credentials, or \"\" for no workflow",
                    |v| {
                        if v.is_empty() {
                            Some(None)
                        } else {
                            super::workflow::valid_repository(v).then(|| Some(v.to_owned()))
                        }
                    },
                ),
            )
        },
    },
    Key {
        name: "workflow_ref",
        example: "\"v1.0\"",
        read: |w, f, s| {
            set(
                &mut s.workflow_ref,
                w.parsed(
                    f,
                    "a branch, tag or commit (no spaces, '..', '~^:?*[\\' or leading '-')",
                    |v| super::workflow::valid_ref(v).then(|| v.to_owned()),
                ),
            )
        },
    },
    Key {
        name: "workflow_path",
        example: "\"/lab/tree/index.ipynb\"",
        read: |w, f, s| {
            set(
                &mut s.workflow_path,
                w.parsed(
                    f,
                    "a URL path starting with '/' made of segments of letters, digits, '-', \
                     '.', '_', '~' and '%'",
                    super::workflow::normalise_path,
                ),
            )
        },
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
    pub fn settings(&self, port: Located<u16>, check: &mut Checker) -> JupyterLabSettings {
        let d = JupyterLabSettings::default();
        // Asked for explicitly on another port, the link would lead nowhere: say so. Left at
        // its default, it is simply off there.
        let exosphere_link = match &self.exosphere_link {
            Some(asked) if asked.value && port.value != super::link::EXOSPHERE_PORT => {
                check.error(
                    asked.origin,
                    "services.jupyterlab.exosphere_link".into(),
                    ErrorKind::Conflict,
                    format!(
                        "Exosphere's notebook link always leads to port {}; services.jupyterlab.port is {}",
                        super::link::EXOSPHERE_PORT,
                        port.value
                    ),
                );
                false
            }
            Some(asked) => asked.value,
            None => d.exosphere_link && port.value == super::link::EXOSPHERE_PORT,
        };
        JupyterLabSettings {
            port: port.value,
            bind: value(&self.bind).unwrap_or(d.bind),
            base_url: value(&self.base_url).unwrap_or(d.base_url),
            python: value(&self.python).unwrap_or(d.python),
            installer: value(&self.installer).unwrap_or(d.installer),
            start_timeout: value(&self.start_timeout_s)
                .map(Duration::from_secs)
                .unwrap_or(d.start_timeout),
            exosphere_link,
            workflow: value(&self.workflow_repository).flatten().map(|repository| {
                super::workflow::WorkflowSettings {
                    repository,
                    git_ref: value(&self.workflow_ref)
                        .unwrap_or_else(|| super::workflow::DEFAULT_REF.to_owned()),
                    path: value(&self.workflow_path)
                        .unwrap_or_else(|| super::workflow::DEFAULT_PATH.to_owned()),
                }
            }),
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

    fn loaded(text: &str) -> Result<JupyterLabSettings, Vec<crate::schema::ConfigError>> {
        let dir = tempfile::tempdir().unwrap();
        let paths = crate::paths::Paths::sandbox(dir.path());
        std::fs::create_dir_all(paths.config_file.parent().unwrap()).unwrap();
        std::fs::write(&paths.config_file, text).unwrap();
        match crate::config::load(&paths) {
            Ok(loaded) => match loaded.settings.services.into_iter().next() {
                Some(crate::services::ServiceSettings::JupyterLab(s)) => Ok(s),
                other => panic!("{other:?}"),
            },
            Err(e) => Err(e.errors),
        }
    }

    #[test]
    fn exospheres_link_is_on_at_8888_off_elsewhere_and_refused_when_asked_elsewhere() {
        let on = "[services.jupyterlab]\nenabled = true\n";
        assert!(loaded(on).unwrap().exosphere_link);
        let off = format!("{on}exosphere_link = false\n");
        assert!(!loaded(&off).unwrap().exosphere_link);
        // Another port: Exosphere's link would lead nowhere, so it is simply off...
        let other = format!("{on}port = 8890\n");
        assert!(!loaded(&other).unwrap().exosphere_link);
        // ...and asking for it there is an error naming the key.
        let errors = loaded(&format!("{other}exosphere_link = true\n")).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(
            errors[0].key.as_deref(),
            Some("services.jupyterlab.exosphere_link")
        );
        assert!(errors[0].message.contains("8888"), "{}", errors[0].message);
    }
}
