//! The desired state: layered TOML fragments, strictly parsed, merged and validated in full
//! before anything on the machine changes (DESIGN §4.1).
//!
//! Files are read in this order, later values winning key by key: every `*.toml` in
//! [`Paths::vendor_config_dir`] (sorted by name), then [`Paths::config_file`], then Exosphere's
//! choices in [`Paths::exosphere_choices_file`] (JSON, see `exosphere.rs`), then every
//! `*.toml` in [`Paths::config_dropin_dir`] (sorted by name), then the cloud's request kept in
//! [`Paths::cloud_request_file`] (JSON, see `request.rs`). Missing files and directories are
//! skipped. Every file is checked in full (unknown keys, types, ranges, values) and the merged
//! result is checked across keys; all problems are returned together, each naming its file,
//! line and dotted key. See `docs/configuration.md`.

mod exosphere;
mod fragment;
pub mod request;
pub mod settings;
mod validate;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

pub use crate::schema::{ConfigError, ConfigErrors, ErrorKind};
pub use settings::*;

use crate::input::read_capped;
pub use crate::input::MAX_CONFIG_FILE_BYTES;
use crate::paths::Paths;
pub use crate::schema::MAX_ERRORS;

/// A fully commented configuration that sets every key to its default; printed by
/// `exoagent validate` on failure and shipped in the documentation.
pub const EXAMPLE_CONFIG: &str = include_str!("example.toml");

/// A successfully loaded configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// The validated settings.
    pub settings: Settings,
    /// The files that were read, in the order they were applied.
    pub files: Vec<PathBuf>,
}

/// Load, merge and validate the configuration files of `paths`.
pub fn load(paths: &Paths) -> Result<Loaded, ConfigErrors> {
    load_with_main_default(paths, None)
}

/// As [`load`], with `main` read as [`Paths::config_file`] when there is no such file: what
/// the configuration will be once a default main file is written, checked before writing it.
pub fn load_with_main_default(paths: &Paths, main: Option<&str>) -> Result<Loaded, ConfigErrors> {
    load_with(
        paths,
        &Pending {
            main_default: main,
            ..Pending::default()
        },
    )
}

/// Texts read in place of files about to change: what the configuration will be once they are
/// written, checked before anything is written.
#[derive(Debug, Default, Clone, Copy)]
pub struct Pending<'a> {
    /// The main file's text, when there is no main file yet.
    pub main_default: Option<&'a str>,
    /// The cloud's request in place of the one kept: `Some(None)` for none.
    pub request: Option<Option<&'a str>>,
    /// A drop-in's text in place of the file at that path, present or not (`exoagent enable`).
    pub dropin: Option<(&'a Path, &'a str)>,
}

/// As [`load`], with `pending` texts in place of their files.
pub fn load_with(paths: &Paths, pending: &Pending<'_>) -> Result<Loaded, ConfigErrors> {
    let main = pending.main_default;
    let mut inputs = Vec::new();
    list_dir(&paths.vendor_config_dir, &mut inputs);
    match fs::symlink_metadata(&paths.config_file) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(text) = main {
                inputs.push(Input::Text(paths.config_file.clone(), text.to_owned()));
            }
        }
        // Anything else, a dangling symlink included, is there and must be readable.
        _ => inputs.push(Input::File(paths.config_file.clone())),
    }
    let choices = &paths.exosphere_choices_file;
    if fs::symlink_metadata(choices).is_ok() {
        inputs.push(Input::ExosphereChoices(choices.clone()));
    }
    let mut dropins = Vec::new();
    list_dir(&paths.config_dropin_dir, &mut dropins);
    if let Some((path, text)) = pending.dropin {
        dropins.retain(|input| !matches!(input, Input::File(p) if p == path));
        dropins.push(Input::Text(path.to_path_buf(), text.to_owned()));
        // Back into name order (list_dir's), the replaced file at its own place.
        dropins.sort_by_key(Input::sort_name);
    }
    inputs.extend(dropins);
    let request_file = paths.cloud_request_file();
    match pending.request {
        Some(Some(text)) => inputs.push(Input::Request(text.to_owned())),
        Some(None) => {}
        None => match read_capped(&request_file, MAX_CONFIG_FILE_BYTES) {
            Ok(text) => inputs.push(Input::Request(text)),
            Err(e) if e.is_not_found() => {}
            Err(e) => inputs.push(Input::Error(ConfigError {
                message: format!("failed to read the kept cloud request: {e}"),
                file: request_file,
                line: None,
                key: None,
                kind: ErrorKind::Unreadable,
            })),
        },
    }

    let mut layers = Vec::new();
    let mut errors = Vec::new();
    let mut order = Vec::new();
    for input in inputs {
        match input {
            Input::File(path) => match read_capped(&path, MAX_CONFIG_FILE_BYTES) {
                Ok(text) => {
                    order.push(path.clone());
                    layers.push((path, text));
                }
                Err(e) => {
                    order.push(path.clone());
                    errors.push(ConfigError {
                        message: format!("failed to read config file: {e}"),
                        file: path,
                        line: None,
                        key: None,
                        kind: ErrorKind::Unreadable,
                    });
                }
            },
            Input::ExosphereChoices(path) => {
                order.push(path.clone());
                match read_capped(&path, MAX_CONFIG_FILE_BYTES) {
                    Ok(text) => match exosphere::layer(&path, &text) {
                        Ok(toml) => layers.push((path, toml)),
                        Err(found) => errors.extend(found),
                    },
                    Err(e) => errors.push(ConfigError {
                        message: format!("failed to read Exosphere's choices: {e}"),
                        file: path,
                        line: None,
                        key: None,
                        kind: ErrorKind::Unreadable,
                    }),
                }
            }
            Input::Text(path, text) => {
                order.push(path.clone());
                layers.push((path, text));
            }
            Input::Request(text) => {
                let path = request::display_name().to_path_buf();
                order.push(path.clone());
                match request::layer(&text) {
                    Ok(toml) => layers.push((path, toml)),
                    Err(found) => errors.extend(found),
                }
            }
            Input::Error(error) => {
                order.push(error.file.clone());
                errors.push(error);
            }
        }
    }
    assemble(&layers, errors, &order).map_err(|mut found| {
        for error in &mut found.errors {
            if error.file == *choices {
                exosphere::relocate(error);
            } else if error.file == request::display_name() {
                request::relocate(error);
            }
        }
        found
    })
}

/// Merge and validate in-memory layers `(path, contents)`, first to last, as [`load`] does with
/// files. The paths are only used in messages and [`Loaded::files`].
pub fn load_layers(layers: &[(PathBuf, String)]) -> Result<Loaded, ConfigErrors> {
    let order: Vec<PathBuf> = layers.iter().map(|(path, _)| path.clone()).collect();
    assemble(layers, Vec::new(), &order)
}

/// A file to read, or a directory that could not be listed.
enum Input {
    File(PathBuf),
    /// A file's text given in memory (a default not written yet).
    Text(PathBuf, String),
    /// Exosphere's choices (JSON), translated into a layer.
    ExosphereChoices(PathBuf),
    /// The cloud's request (JSON), translated into a layer.
    Request(String),
    Error(ConfigError),
}

impl Input {
    /// The file name a drop-in is ordered by.
    fn sort_name(&self) -> Option<std::ffi::OsString> {
        match self {
            Self::File(path) | Self::Text(path, _) | Self::ExosphereChoices(path) => {
                path.file_name().map(|n| n.to_owned())
            }
            Self::Request(_) | Self::Error(_) => None,
        }
    }
}

/// Append the `*.toml` entries of `dir`, sorted by name, to `inputs`. Names starting with `.`
/// are skipped, as the shell glob `*.toml` would; a missing directory adds nothing.
fn list_dir(dir: &Path, inputs: &mut Vec<Input>) {
    let unreadable = |e: io::Error| {
        Input::Error(ConfigError {
            file: dir.to_path_buf(),
            line: None,
            key: None,
            message: format!("failed to list config directory: {e}"),
            kind: ErrorKind::Unreadable,
        })
    };
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(e) => return inputs.push(unreadable(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        match entry {
            Ok(entry) => names.push(entry.file_name()),
            Err(e) => return inputs.push(unreadable(e)),
        }
    }
    names.retain(|name| {
        let path = Path::new(name);
        path.extension().is_some_and(|ext| ext == "toml")
            && !name.as_encoded_bytes().starts_with(b".")
    });
    names.sort();
    inputs.extend(names.into_iter().map(|name| Input::File(dir.join(name))));
}

/// Parse every layer, merge them in order and validate the result. `errors` holds problems
/// found before parsing (unreadable files and directories); `order` lists every path
/// considered, readable or not, in load order, so the errors can be listed in that order.
fn assemble(
    layers: &[(PathBuf, String)],
    mut errors: Vec<ConfigError>,
    order: &[PathBuf],
) -> Result<Loaded, ConfigErrors> {
    let mut merged = fragment::Fragment::default();
    let mut omitted = 0;
    for (index, (path, text)) in layers.iter().enumerate() {
        let (found, more) = fragment::parse(index, path, text, &mut merged);
        errors.extend(found);
        omitted += more;
        // Keep memory bounded across many files as the walker does within one.
        if errors.len() > MAX_ERRORS {
            omitted += errors.len() - MAX_ERRORS;
            errors.truncate(MAX_ERRORS);
        }
    }
    // Unreadable files were found before any parsing: put every error at its file's place.
    // The sort is stable, so each file's errors keep their line order.
    errors.sort_by_key(|e| order.iter().position(|f| *f == e.file));
    let files: Vec<PathBuf> = layers.iter().map(|(path, _)| path.clone()).collect();
    let (settings, semantic) = validate::settings(&merged, &files);
    errors.extend(semantic);
    if errors.len() > MAX_ERRORS {
        omitted += errors.len() - MAX_ERRORS;
        errors.truncate(MAX_ERRORS);
    }
    if errors.is_empty() && omitted == 0 {
        Ok(Loaded { settings, files })
    } else {
        Err(ConfigErrors { errors, omitted })
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::time::Duration;

    use super::*;
    use crate::model::ServiceKind;

    fn layers(files: &[(&str, &str)]) -> Vec<(PathBuf, String)> {
        files
            .iter()
            .map(|(p, t)| (PathBuf::from(p), (*t).to_owned()))
            .collect()
    }

    fn ok(files: &[(&str, &str)]) -> Loaded {
        match load_layers(&layers(files)) {
            Ok(loaded) => loaded,
            Err(e) => panic!("unexpected errors:\n{e}"),
        }
    }

    fn errs(files: &[(&str, &str)]) -> Vec<ConfigError> {
        match load_layers(&layers(files)) {
            Ok(loaded) => panic!("expected errors, got {:?}", loaded.settings),
            Err(e) => {
                assert_eq!(e.reason(), "config-invalid");
                e.errors
            }
        }
    }

    fn jupyter(settings: &Settings) -> &JupyterLabSettings {
        match settings.services.first() {
            Some(ServiceSettings::JupyterLab(j)) => j,
            _ => panic!("jupyterlab not enabled first: {settings:?}"),
        }
    }

    #[test]
    fn nothing_gives_defaults() {
        let loaded = ok(&[]);
        assert_eq!(loaded.settings, Settings::default());
        assert!(loaded.files.is_empty());
        let loaded = ok(&[("/e/empty.toml", "# nothing\n")]);
        assert_eq!(loaded.settings, Settings::default());
        assert_eq!(loaded.files, vec![PathBuf::from("/e/empty.toml")]);
    }

    #[test]
    fn example_config_parses_to_the_defaults() {
        let loaded = ok(&[("example.toml", EXAMPLE_CONFIG)]);
        assert_eq!(loaded.settings, Settings::default());
        // Every key of the schema appears in the example, so it documents them all.
        for key in [
            "user",
            "create_user",
            "[services.jupyterlab]",
            "[services.rstudio]",
            "[services.desktop]",
            "[services.guacamole]",
            "enabled",
            "port",
            "bind",
            "base_url",
            "python",
            "installer",
            "start_timeout_s",
            "backoff_initial_ms",
            "backoff_max_ms",
            "crash_loop_restarts",
            "stable_after_s",
            "readiness_interval_ms",
            "liveness_interval_s",
            "liveness_failures",
            "log_max_bytes",
            "devices",
            "status_interval_s",
            "load_interval_s",
            "lock_timeout_s",
            "attempts",
            "[tls]",
            "require",
            "cert_file",
            "key_file",
            "client_ca_file",
            "trusted_proxies",
            "exosphere_link",
            "[host]",
            "console_autologin",
            "private_cloud_init_logs",
            "default_user_group",
            "base_packages",
            "[volumes]",
            "automount",
            "mount_root",
            "watch_request",
            "request_interval_s",
            "[alerts]",
            "memory_percent",
            "disk_percent",
            "paths",
            "interval_s",
            "[idle]",
            "after_s",
            "cpu_percent",
            "disk_kib_per_s",
            "network_kib_per_s",
            "action",
            "grace_s",
        ] {
            assert!(EXAMPLE_CONFIG.contains(key), "example lacks {key}");
        }
    }

    #[test]
    fn enabled_jupyterlab_gets_defaults() {
        let loaded = ok(&[("/a.toml", "[services.jupyterlab]\nenabled = true\n")]);
        assert_eq!(jupyter(&loaded.settings), &JupyterLabSettings::default());
        assert_eq!(loaded.settings.services.len(), 1);
        assert_eq!(loaded.settings.services[0].kind(), ServiceKind::JupyterLab);
    }

    #[test]
    fn disabled_services_are_left_out() {
        let loaded = ok(&[(
            "/a.toml",
            "[services.jupyterlab]\nenabled = false\nport = 9999\n[services.rstudio]\nport = 1\n",
        )]);
        assert!(loaded.settings.services.is_empty());
    }

    #[test]
    fn later_layers_win_key_by_key() {
        let vendor = "[services.jupyterlab]\nenabled = true\nport = 1001\nbind = \"127.0.0.1\"\n\
                      [supervise]\nliveness_failures = 7\n";
        let main = "[services.jupyterlab]\nport = 1002\n[instance]\nuser = \"alice\"\n";
        let dropin_a = "[services.jupyterlab]\nport = 1003\nbase_url = \"/a\"\n";
        let dropin_b = "[services.jupyterlab]\nport = 1004\n";
        let loaded = ok(&[
            ("/usr/lib/10-vendor.toml", vendor),
            ("/etc/config.toml", main),
            ("/etc/config.d/10-a.toml", dropin_a),
            ("/etc/config.d/20-b.toml", dropin_b),
        ]);
        let j = jupyter(&loaded.settings);
        assert_eq!(j.port, 1004);
        assert_eq!(j.base_url, "/a/");
        assert_eq!(j.bind, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(loaded.settings.instance.user, "alice");
        assert_eq!(loaded.settings.supervise.liveness_failures, 7);
        // A later layer can switch a service off again.
        let loaded = ok(&[
            ("/v.toml", vendor),
            ("/d.toml", "[services.jupyterlab]\nenabled = false\n"),
        ]);
        assert!(loaded.settings.services.is_empty());
    }

    #[test]
    fn load_reads_vendor_then_main_then_sorted_dropins() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::sandbox(dir.path());
        fs::create_dir_all(&paths.vendor_config_dir).unwrap();
        fs::create_dir_all(&paths.config_dropin_dir).unwrap();
        let write = |path: PathBuf, port: u16| {
            fs::write(&path, format!("[services.jupyterlab]\nport = {port}\n")).unwrap();
            path
        };
        let v1 = write(paths.vendor_config_dir.join("50-b.toml"), 1);
        let v0 = write(paths.vendor_config_dir.join("10-a.toml"), 2);
        let main = write(paths.config_file.clone(), 3);
        let d1 = write(paths.config_dropin_dir.join("90-late.toml"), 4);
        let d0 = write(paths.config_dropin_dir.join("05-early.toml"), 5);
        // Not *.toml, or hidden: ignored even though they are invalid.
        fs::write(paths.config_dropin_dir.join("99.toml.bak"), "bad = ").unwrap();
        fs::write(paths.config_dropin_dir.join(".99-hidden.toml"), "bad = ").unwrap();
        fs::write(paths.config_dropin_dir.join("README"), "bad = ").unwrap();
        fs::write(
            paths.config_dropin_dir.join("50-on.toml"),
            "[services.jupyterlab]\nenabled = true\n",
        )
        .unwrap();
        let loaded = load(&paths).unwrap();
        assert_eq!(
            loaded.files,
            vec![
                v0,
                v1,
                main,
                d0,
                paths.config_dropin_dir.join("50-on.toml"),
                d1
            ]
        );
        assert_eq!(jupyter(&loaded.settings).port, 4);
    }

    #[test]
    fn exosphere_choices_come_between_the_main_file_and_the_dropins() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::sandbox(dir.path());
        fs::create_dir_all(&paths.config_dropin_dir).unwrap();
        let choices = &paths.exosphere_choices_file;
        fs::write(choices, r#"{"guac_enabled":false,"gui_enabled":false}"#).unwrap();
        fs::write(
            &paths.config_file,
            "[services.jupyterlab]\nenabled = true\n",
        )
        .unwrap();
        let loaded = load(&paths).unwrap();
        assert_eq!(
            loaded.files,
            vec![paths.config_file.clone(), choices.clone()]
        );
        assert_eq!(loaded.settings.services.len(), 1);
        // Everything Exosphere's playbook does besides services comes with its choices...
        let all_on = HostSettings {
            console_autologin: true,
            private_cloud_init_logs: true,
            default_user_group: true,
            base_packages: true,
            login_banner: true,
            home_ownership: true,
            deferred_write_files: true,
        };
        assert_eq!(loaded.settings.host, all_on);
        // ...and an operator's drop-in still turns any of it off.
        fs::write(
            paths.config_dropin_dir.join("50-no-autologin.toml"),
            "[host]\nconsole_autologin = false\n",
        )
        .unwrap();
        let loaded = load(&paths).unwrap();
        assert_eq!(
            loaded.settings.host,
            HostSettings {
                console_autologin: false,
                ..all_on
            }
        );
        fs::remove_file(paths.config_dropin_dir.join("50-no-autologin.toml")).unwrap();

        // Guacamole and the desktop, as Exosphere asks for them; Guacamole then offers the
        // desktop connection.
        fs::write(choices, r#"{"guac_enabled":true,"gui_enabled":true}"#).unwrap();
        let loaded = load(&paths).unwrap();
        let kinds: Vec<_> = loaded.settings.services.iter().map(|s| s.kind()).collect();
        assert_eq!(
            kinds,
            [
                ServiceKind::JupyterLab,
                ServiceKind::Desktop,
                ServiceKind::Guacamole
            ]
        );
        match &loaded.settings.services[2] {
            ServiceSettings::Guacamole(g) => assert_eq!(g.desktop_port, Some(5901)),
            other => panic!("{other:?}"),
        }

        // A problem caused by Exosphere's choice is reported against the JSON file, without
        // the generated TOML's line numbers.
        fs::write(
            &paths.config_file,
            "[services.jupyterlab]\nenabled = true\nport = 49528\n",
        )
        .unwrap();
        let e = load(&paths).unwrap_err().errors;
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].file, *choices);
        assert_eq!(e[0].kind, ErrorKind::Conflict);
        assert_eq!(e[0].line, None);
        fs::write(
            &paths.config_file,
            "[services.jupyterlab]\nenabled = true\n",
        )
        .unwrap();
        fs::write(choices, r#"{"guac_enabled":true,"gui_enabled":false}"#).unwrap();

        // An operator's drop-in still wins over Exosphere's choice.
        fs::write(
            paths.config_dropin_dir.join("90-operator.toml"),
            "[services.guacamole]\nenabled = false\n",
        )
        .unwrap();
        assert_eq!(load(&paths).unwrap().settings.services.len(), 1);

        // Broken JSON: named, nothing else lost from the report.
        fs::write(choices, "{\"guac_enabled\": maybe}").unwrap();
        fs::write(&paths.config_file, "[services.jupyterlab]\nport = 0\n").unwrap();
        let e = load(&paths).unwrap_err().errors;
        assert_eq!(e.len(), 2, "{e:?}");
        assert_eq!(e[0].file, paths.config_file);
        assert_eq!(e[1].file, *choices);
        assert_eq!(e[1].kind, ErrorKind::Syntax);
    }

    #[test]
    fn missing_directories_and_main_file_are_fine() {
        let dir = tempfile::tempdir().unwrap();
        let loaded = load(&Paths::sandbox(dir.path())).unwrap();
        assert_eq!(loaded.settings, Settings::default());
        assert!(loaded.files.is_empty());
    }

    #[test]
    fn base_url_is_normalised() {
        for (given, want) in [("/", "/"), ("/lab", "/lab/"), ("/a/b/", "/a/b/")] {
            let text = format!("[services.jupyterlab]\nenabled = true\nbase_url = \"{given}\"\n");
            let loaded = ok(&[("/a.toml", &text)]);
            assert_eq!(jupyter(&loaded.settings).base_url, want);
        }
        for bad in ["lab", "/a/../b", "/a b", "//host/"] {
            let text = format!("[services.jupyterlab]\nenabled = true\nbase_url = \"{bad}\"\n");
            let e = errs(&[("/a.toml", &text)]);
            assert_eq!(e.len(), 1, "{bad}");
            assert_eq!(e[0].key.as_deref(), Some("services.jupyterlab.base_url"));
            assert_eq!(e[0].kind, ErrorKind::InvalidValue);
        }
    }

    #[test]
    fn every_value_is_converted() {
        let text = r#"
[instance]
user = "researcher"
create_user = false
[services.jupyterlab]
enabled = true
port = 9000
bind = "::1"
base_url = "/jl"
python = "/opt/py/bin/python3"
installer = "pip"
start_timeout_s = 600
workflow_repository = "git@github.com:org/demo.git"
workflow_ref = "v2"
workflow_path = "/lab/tree/a.ipynb/"
[supervise]
backoff_initial_ms = 500
backoff_max_ms = 4000
crash_loop_restarts = 2
stable_after_s = 30
readiness_interval_ms = 100
liveness_interval_s = 5
liveness_failures = 4
log_max_bytes = 4096
[console]
devices = ["/dev/ttyS0"]
status_interval_s = 30
load_interval_s = 120
[packages]
lock_timeout_s = 0
attempts = 1
[cloud]
metadata_url = "http://127.0.0.1:8775/"
metadata_timeout_s = 5
publish_password = false
clouds_yaml = "/etc/openstack/clouds.yaml"
cloud_name = "exo"
watch_request = false
request_interval_s = 300
[tls]
enabled = true
require = true
trusted_proxies = ["10.0.0.7"]
[host]
console_autologin = true
base_packages = true
[volumes]
automount = true
mount_root = "/mnt/vols"
[alerts]
enabled = false
memory_percent = 80
disk_percent = 95
paths = ["/scratch"]
interval_s = 5
[idle]
after_s = 600
interval_s = 15
cpu_percent = 20
disk_kib_per_s = 4096
network_kib_per_s = 256
action = "shelve"
grace_s = 120
"#;
        let s = ok(&[("/a.toml", text)]).settings;
        assert_eq!(
            s,
            Settings {
                instance: InstanceSettings {
                    user: "researcher".into(),
                    create_user: false
                },
                services: vec![ServiceSettings::JupyterLab(JupyterLabSettings {
                    port: 9000,
                    bind: "::1".parse().unwrap(),
                    base_url: "/jl/".into(),
                    python: Some("/opt/py/bin/python3".into()),
                    installer: PythonInstaller::Pip,
                    start_timeout: Duration::from_secs(600),
                    // Port 9000: Exosphere's link (port 8888 only) is off.
                    exosphere_link: false,
                    workflow: Some(crate::services::jupyterlab::workflow::WorkflowSettings {
                        repository: "git@github.com:org/demo.git".into(),
                        git_ref: "v2".into(),
                        path: "/lab/tree/a.ipynb".into(),
                    }),
                })],
                supervise: SupervisePolicy {
                    backoff_initial: Duration::from_millis(500),
                    backoff_max: Duration::from_secs(4),
                    crash_loop_restarts: 2,
                    stable_after: Duration::from_secs(30),
                    readiness_interval: Duration::from_millis(100),
                    liveness_interval: Duration::from_secs(5),
                    liveness_failures: 4,
                    log_max_bytes: 4096,
                },
                console: ConsoleSettings {
                    devices: vec!["/dev/ttyS0".into()],
                    status_interval: Duration::from_secs(30),
                    load_interval: Duration::from_secs(120),
                },
                packages: PackageSettings {
                    lock_timeout: Duration::ZERO,
                    attempts: 1
                },
                cloud: CloudSettings {
                    metadata_url: Some("http://127.0.0.1:8775".into()),
                    metadata_timeout: Duration::from_secs(5),
                    publish_password: false,
                    clouds_yaml: Some("/etc/openstack/clouds.yaml".into()),
                    cloud_name: "exo".into(),
                    uap_hostname: None,
                    watch_request: false,
                    request_interval: Duration::from_secs(300),
                },
                tls: TlsSettings {
                    enabled: true,
                    require: true,
                    certificate: CertChoice::Generated,
                    client_ca: None,
                    trusted_proxies: vec!["10.0.0.7".parse().unwrap()],
                },
                host: HostSettings {
                    console_autologin: true,
                    private_cloud_init_logs: false,
                    default_user_group: false,
                    base_packages: true,
                    login_banner: true,
                    home_ownership: true,
                    deferred_write_files: false,
                },
                volumes: VolumeSettings {
                    automount: true,
                    mount_root: "/mnt/vols".into(),
                },
                alerts: AlertSettings {
                    enabled: false,
                    memory_percent: 80,
                    disk_percent: 95,
                    paths: vec!["/scratch".into()],
                    interval: std::time::Duration::from_secs(5),
                },
                idle: IdleSettings {
                    enabled: true,
                    after: std::time::Duration::from_secs(600),
                    interval: std::time::Duration::from_secs(15),
                    cpu_percent: 20,
                    disk_kib_per_s: 4096,
                    network_kib_per_s: 256,
                    action: IdleAction::Shelve,
                    grace: std::time::Duration::from_secs(120),
                },
            }
        );
        // An empty python resets an earlier layer's choice to "pick automatically".
        let reset = "[services.jupyterlab]\npython = \"\"\n";
        let s = ok(&[("/a.toml", text), ("/b.toml", reset)]).settings;
        assert_eq!(jupyter(&s).python, None);
    }

    #[test]
    fn inline_and_dotted_tables_are_accepted() {
        for text in [
            "services.jupyterlab.enabled = true\nservices.jupyterlab.port = 1234\n",
            "services = { jupyterlab = { enabled = true, port = 1234 } }\n",
            "[services]\njupyterlab.enabled = true\njupyterlab.port = 1234\n",
        ] {
            let s = ok(&[("/a.toml", text)]).settings;
            assert_eq!(jupyter(&s).port, 1234, "{text}");
        }
        let e = errs(&[("/a.toml", "\nservices = { jupyterlab = { prot = 1 } }\n")]);
        assert_eq!(e[0].key.as_deref(), Some("services.jupyterlab.prot"));
        assert_eq!(e[0].line, Some(2));
    }

    #[test]
    fn duplicate_ports_name_both_services() {
        let e = errs(&[(
            "/a.toml",
            "[services.jupyterlab]\nenabled = true\nport = 49528\n\n[services.guacamole]\nenabled = true\n",
        )]);
        let conflict: Vec<_> = e.iter().filter(|e| e.kind == ErrorKind::Conflict).collect();
        assert_eq!(conflict.len(), 1, "{e:?}");
        let c = conflict[0];
        assert_eq!(c.key.as_deref(), Some("services.guacamole.port"));
        // The default port is charged to the line that enabled the service.
        assert_eq!(c.line, Some(6));
        assert!(c.message.contains("services.jupyterlab (/a.toml:3)"), "{c}");
        assert!(c.message.contains("services.guacamole"), "{c}");
        // Different ports: no conflict.
        ok(&[(
            "/a.toml",
            "[services.jupyterlab]\nenabled = true\n[services.guacamole]\nenabled = true\n",
        )]);
    }

    #[test]
    fn guacd_on_another_services_port_is_a_conflict() {
        let e = errs(&[(
            "/a.toml",
            "[services.jupyterlab]\nenabled = true\nport = 8888\n\n[services.guacamole]\n\
             enabled = true\nguacd_address = \"127.0.0.1:8888\"\n",
        )]);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].kind, ErrorKind::Conflict);
        assert_eq!(e[0].file, PathBuf::from("/a.toml"));
        assert_eq!(e[0].line, Some(7));
        assert_eq!(
            e[0].key.as_deref(),
            Some("services.guacamole.guacd_address")
        );
        assert!(
            e[0].message.contains("services.jupyterlab (/a.toml:3)"),
            "{}",
            e[0]
        );
        // Guacamole's own port, and the default guacd port taken by another service (charged
        // to the line enabling Guacamole).
        let e = errs(&[(
            "/a.toml",
            "[services.guacamole]\nenabled = true\nguacd_address = \"0.0.0.0:49528\"\n",
        )]);
        assert_eq!(e[0].line, Some(3), "{e:?}");
        let e = errs(&[(
            "/a.toml",
            "[services.jupyterlab]\nenabled = true\nport = 4822\n[services.guacamole]\nenabled = true\n",
        )]);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].line, Some(5));
        assert_eq!(
            e[0].key.as_deref(),
            Some("services.guacamole.guacd_address")
        );
        // guacd elsewhere, or on a free local port: fine.
        for address in ["10.0.0.5:8888", "127.0.0.1:4823"] {
            ok(&[(
                "/a.toml",
                &format!(
                    "[services.jupyterlab]\nenabled = true\nport = 8888\n\
                     [services.guacamole]\nenabled = true\nguacd_address = \"{address}\"\n"
                ),
            )]);
        }
    }

    #[test]
    fn a_flood_of_errors_is_capped_and_counted() {
        // 5000 unknown tables: every one is counted, at most MAX_ERRORS listed, then one line
        // saying how many more there were.
        let text: String = (0..5000).map(|i| format!("[t{i}]\n")).collect();
        let e = load_layers(&layers(&[("/a.toml", &text)])).unwrap_err();
        assert_eq!(e.errors.len(), MAX_ERRORS);
        assert_eq!(e.omitted, 5000 - MAX_ERRORS);
        assert_eq!(e.errors[0].line, Some(1));
        let shown = e.to_string();
        assert_eq!(shown.lines().count(), MAX_ERRORS + 1);
        assert!(
            shown
                .lines()
                .last()
                .unwrap()
                .contains("4000 more errors not listed"),
            "{}",
            shown.lines().last().unwrap()
        );
    }

    #[test]
    fn credentials_in_a_refused_url_are_not_echoed() {
        let e = errs(&[(
            "/a.toml",
            "[cloud]\nmetadata_url = \"http://admin:hunter2@169.254.169.254/\"\n",
        )]);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].key.as_deref(), Some("cloud.metadata_url"));
        let shown = e[0].to_string();
        assert!(
            !shown.contains("hunter2") && !shown.contains("admin"),
            "{shown}"
        );
        assert!(shown.contains("http://***@169.254.169.254/"), "{shown}");
    }

    #[test]
    fn desktop_port_must_name_a_display() {
        // 43901 once passed validation and then crash-looped the desktop ("38001 is not in
        // 0..=999"); every port at or below 5901 became display :1.
        for bad in [43901, 5900, 5000, 6900] {
            let e = errs(&[(
                "/a.toml",
                &format!("[services.desktop]\nenabled = true\nport = {bad}\n"),
            )]);
            assert_eq!(e.len(), 1, "{bad}: {e:?}");
            assert_eq!(e[0].key.as_deref(), Some("services.desktop.port"), "{bad}");
            assert_eq!(e[0].line, Some(3), "{bad}");
            assert_eq!(e[0].kind, ErrorKind::OutOfRange, "{bad}");
            assert!(e[0].message.contains("5901 to 6899"), "{}", e[0]);
        }
        for (good, display) in [(5901, 1), (5999, 99), (6899, 999)] {
            let loaded = ok(&[(
                "/a.toml",
                &format!("[services.desktop]\nenabled = true\nport = {good}\n"),
            )]);
            match &loaded.settings.services[0] {
                ServiceSettings::Desktop(d) => assert_eq!(d.display(), display),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn every_known_service_is_implemented() {
        // Every kind `model` names has a folder in the `services!` registry, so enabling any
        // known service is valid; the `Unavailable` refusal in `validate.rs` is only a guard
        // for a kind named before its folder lands (then this test fails until it does).
        for kind in ServiceKind::ALL {
            assert!(crate::services::implemented(kind), "{kind}");
            ok(&[("/a.toml", &format!("[services.{kind}]\nenabled = true\n"))]);
        }
    }

    #[test]
    fn backoff_max_below_initial_is_reported_where_set() {
        let e = errs(&[
            ("/a.toml", "[supervise]\nbackoff_initial_ms = 5000\n"),
            ("/b.toml", "\n[supervise]\nbackoff_max_ms = 2000\n"),
        ]);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].file, PathBuf::from("/b.toml"));
        assert_eq!(e[0].line, Some(3));
        assert_eq!(e[0].key.as_deref(), Some("supervise.backoff_max_ms"));
        assert!(e[0].message.contains("/a.toml:2"), "{}", e[0]);
        let e = errs(&[("/a.toml", "[supervise]\nbackoff_initial_ms = 60000\n")]);
        assert_eq!(e[0].key.as_deref(), Some("supervise.backoff_initial_ms"));
        ok(&[("/a.toml", "[supervise]\nbackoff_initial_ms = 30000\n")]);
    }

    #[test]
    fn all_errors_are_collected_at_once() {
        let a = "[services.jupyterlab]\nport = \"x\"\nbind = \"nope\"\ninstaller = \"conda\"\n\
                 prot = 1\n[services.foo]\n";
        let b = "[instance\n";
        let c = "[instance]\nuser = \"root\"\n[supervise]\nlog_max_bytes = 1\n\
                 [console]\ndevices = [\"/dev/console\", 5, \"rel\"]\n";
        let e = errs(&[("/a.toml", a), ("/b.toml", b), ("/c.toml", c)]);
        let got: Vec<(String, Option<usize>, Option<&str>, ErrorKind)> = e
            .iter()
            .map(|e| {
                (
                    e.file.display().to_string(),
                    e.line,
                    e.key.as_deref(),
                    e.kind,
                )
            })
            .collect();
        use ErrorKind::*;
        let want: Vec<(String, Option<usize>, Option<&str>, ErrorKind)> = vec![
            (
                "/a.toml".into(),
                Some(2),
                Some("services.jupyterlab.port"),
                WrongType,
            ),
            (
                "/a.toml".into(),
                Some(3),
                Some("services.jupyterlab.bind"),
                InvalidValue,
            ),
            (
                "/a.toml".into(),
                Some(4),
                Some("services.jupyterlab.installer"),
                InvalidValue,
            ),
            (
                "/a.toml".into(),
                Some(5),
                Some("services.jupyterlab.prot"),
                UnknownKey,
            ),
            ("/a.toml".into(), Some(6), Some("services.foo"), UnknownKey),
            ("/b.toml".into(), Some(1), None, Syntax),
            (
                "/c.toml".into(),
                Some(4),
                Some("supervise.log_max_bytes"),
                OutOfRange,
            ),
            (
                "/c.toml".into(),
                Some(6),
                Some("console.devices[1]"),
                WrongType,
            ),
            (
                "/c.toml".into(),
                Some(6),
                Some("console.devices[2]"),
                InvalidValue,
            ),
            (
                "/c.toml".into(),
                Some(2),
                Some("instance.user"),
                InvalidValue,
            ),
        ];
        assert_eq!(
            got,
            want,
            "\n{}",
            ConfigErrors {
                errors: e.clone(),
                omitted: 0
            }
        );
        // One error per line in the display.
        let shown = ConfigErrors {
            errors: e,
            omitted: 0,
        }
        .to_string();
        assert_eq!(shown.lines().count(), want.len());
        assert!(
            shown.lines().next().unwrap().starts_with(
                "/a.toml:2: services.jupyterlab.port: invalid type string \"x\", expected a port"
            ),
            "{shown}"
        );
    }

    #[test]
    fn ranges_are_checked() {
        for (section, key, bad, good) in [
            ("supervise", "backoff_initial_ms", 0, 1),
            ("supervise", "crash_loop_restarts", 0, 1),
            ("supervise", "stable_after_s", 0, 1),
            ("supervise", "readiness_interval_ms", 9, 10),
            ("supervise", "liveness_interval_s", 0, 1),
            ("supervise", "liveness_failures", 0, 1),
            ("supervise", "log_max_bytes", 4095, 4096),
            ("console", "status_interval_s", 0, 1),
            ("console", "load_interval_s", 0, 1),
            ("packages", "attempts", 0, 1),
            ("packages", "lock_timeout_s", -1, 0),
            ("services.jupyterlab", "start_timeout_s", 3601, 3600),
            ("services.jupyterlab", "port", 0, 1),
            ("services.jupyterlab", "port", 65536, 65535),
            (
                "supervise",
                "stable_after_s",
                365 * 24 * 3600 + 1,
                365 * 24 * 3600,
            ),
        ] {
            let text = |v: i64| format!("[{section}]\n{key} = {v}\n");
            let e = errs(&[("/a.toml", &text(bad))]);
            assert_eq!(e.len(), 1, "{key} = {bad}: {e:?}");
            assert_eq!(e[0].kind, ErrorKind::OutOfRange, "{}", e[0]);
            assert_eq!(e[0].key.as_deref(), Some(&*format!("{section}.{key}")));
            assert!(
                e[0].message.contains(&format!("invalid value {bad},")),
                "{}",
                e[0]
            );
            ok(&[("/a.toml", &text(good))]);
        }
    }

    #[test]
    fn user_name_is_checked() {
        let e = errs(&[("/a.toml", "[instance]\nuser = \"Bad User\"\n")]);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].key.as_deref(), Some("instance.user"));
        assert_eq!(e[0].kind, ErrorKind::InvalidValue);
    }

    #[test]
    fn tables_of_the_wrong_type_are_reported() {
        let e = errs(&[("/a.toml", "instance = 5\n[[services]]\nx = 1\n")]);
        let keys: Vec<_> = e.iter().map(|e| (e.key.as_deref(), e.kind)).collect();
        assert_eq!(
            keys,
            vec![
                (Some("instance"), ErrorKind::WrongType),
                (Some("services"), ErrorKind::WrongType)
            ]
        );
        assert!(e[0]
            .message
            .contains("invalid type integer 5, expected a table"));
    }

    #[test]
    fn long_and_odd_values_are_escaped_and_shortened() {
        let long = "x".repeat(500);
        let text = format!("[services.jupyterlab]\nbind = \"{long}\\n\"\n\"we ird\" = 1\n");
        let e = errs(&[("/a.toml", &text)]);
        assert_eq!(e.len(), 2);
        assert!(e[0].message.len() < 200, "{}", e[0]);
        assert!(!e[0].to_string().contains('\n'));
        assert_eq!(
            e[1].key.as_deref(),
            Some("services.jupyterlab.\"we ird\""),
            "{}",
            e[1]
        );
    }

    /// The fenced blocks of a Markdown text marked with `lang`.
    fn fenced_blocks(markdown: &str, lang: &str) -> Vec<String> {
        let mut blocks = Vec::new();
        let mut current: Option<String> = None;
        for line in markdown.lines() {
            match &mut current {
                None if line.trim_start() == format!("```{lang}") => current = Some(String::new()),
                None => {}
                Some(_) if line.trim_start() == "```" => blocks.extend(current.take()),
                Some(block) => {
                    block.push_str(line);
                    block.push('\n');
                }
            }
        }
        blocks
    }

    fn docs() -> String {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md");
        fs::read_to_string(path).unwrap()
    }

    #[test]
    fn every_toml_block_in_the_docs_is_valid() {
        let docs = docs();
        let blocks = fenced_blocks(&docs, "toml");
        assert!(blocks.len() >= 3, "expected several toml blocks");
        for (i, block) in blocks.iter().enumerate() {
            if let Err(e) = load_layers(&[(format!("block-{i}.toml").into(), block.clone())]) {
                panic!("docs toml block {i} is invalid:\n{e}\n---\n{block}");
            }
        }
    }

    #[test]
    fn the_cloud_init_example_in_the_docs_is_valid() {
        let docs = docs();
        let yaml = fenced_blocks(&docs, "yaml");
        assert!(!yaml.is_empty());
        for block in yaml {
            // The file body is the indented text under `content: |`.
            let mut lines = block
                .lines()
                .skip_while(|l| !l.trim_end().ends_with("content: |"));
            let header = lines.next().unwrap();
            let indent = header.len() - header.trim_start().len();
            let body: String = lines
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .map(|l| format!("{}\n", l.trim_start()))
                .collect();
            assert!(body.contains("[services.jupyterlab]"), "{body}");
            let loaded = load_layers(&[("write_files.toml".into(), body)]).unwrap();
            assert_eq!(loaded.settings.services.len(), 1);
        }
    }

    #[test]
    fn the_error_examples_in_the_docs_are_real_output() {
        let l = |p: &str, t: &str| (PathBuf::from(p), t.to_owned());
        let errors = load_layers(&[
            l("/etc/exoagent/config.toml", "[instance]\nuser = \"root\"\n"),
            l(
                "/etc/exoagent/config.d/10-x.toml",
                "[services.jupyterlab]\nenabled = true\n\nport = 70000\nbind = \"nope\"\n\
                 prot = 1\n\n[services.foo]\n",
            ),
            l(
                "/etc/exoagent/config.d/20-y.toml",
                "[services.jupyterlab]\n[instance\n",
            ),
        ])
        .unwrap_err()
        .to_string();
        let docs = docs();
        let block = fenced_blocks(&docs, "text")
            .into_iter()
            .find(|b| b.contains("70000"))
            .unwrap();
        // Everything but the unreadable file (which needs a real directory) is reproduced.
        let documented: Vec<&str> = block
            .lines()
            .filter(|l| !l.contains("failed to read"))
            .collect();
        assert_eq!(documented, errors.lines().collect::<Vec<_>>());
    }

    #[test]
    fn the_docs_list_every_key_and_the_example() {
        let docs = docs();
        assert!(
            docs.contains(EXAMPLE_CONFIG.trim()),
            "docs must embed EXAMPLE_CONFIG verbatim"
        );
    }
}
