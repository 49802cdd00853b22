//! One configuration file: parsed with spans kept, walked against the schema, and turned into
//! an all-`Option` fragment whose every value remembers the file and line that set it.
//!
//! The walk does not stop at the first problem: every unknown key, wrong type and bad value in
//! the file is reported, and the good values are kept so later checks still see them.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use toml_edit::{ImDocument, Item, TableLike, Value};

use super::error::{ConfigError, ErrorKind};
use crate::config::{DesktopEnvironment, GuacdSource, PythonInstaller, VncServerChoice};
use crate::model::ServiceKind;

/// Where a value was set: the index of the file in load order and the 1-based line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Origin {
    pub file: usize,
    pub line: Option<usize>,
}

/// A value together with where it was set.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Located<T> {
    pub value: T,
    pub origin: Origin,
}

/// `[instance]`.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct InstanceFragment {
    pub user: Option<Located<String>>,
    pub create_user: Option<Located<bool>>,
}

/// `[services.<name>]`; keys other than `enabled` and `port` are only accepted for JupyterLab.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct ServiceFragment {
    pub enabled: Option<Located<bool>>,
    pub port: Option<Located<u16>>,
    pub bind: Option<Located<IpAddr>>,
    pub base_url: Option<Located<String>>,
    pub python: Option<Located<Option<PathBuf>>>,
    pub installer: Option<Located<PythonInstaller>>,
    pub start_timeout_s: Option<Located<u64>>,
    pub environment: Option<Located<DesktopEnvironment>>,
    pub geometry: Option<Located<(u16, u16)>>,
    pub vnc_server: Option<Located<VncServerChoice>>,
    pub guacd: Option<Located<GuacdSource>>,
    pub guacd_address: Option<Located<SocketAddr>>,
    pub session_timeout_min: Option<Located<u64>>,
    pub ssh_port: Option<Located<u16>>,
}

/// `[supervise]`.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct SuperviseFragment {
    pub backoff_initial_ms: Option<Located<u64>>,
    pub backoff_max_ms: Option<Located<u64>>,
    pub crash_loop_restarts: Option<Located<u32>>,
    pub stable_after_s: Option<Located<u64>>,
    pub readiness_interval_ms: Option<Located<u64>>,
    pub liveness_interval_s: Option<Located<u64>>,
    pub liveness_failures: Option<Located<u32>>,
    pub log_max_bytes: Option<Located<u64>>,
}

/// `[console]`.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct ConsoleFragment {
    pub devices: Option<Located<Vec<PathBuf>>>,
    pub status_interval_s: Option<Located<u64>>,
    pub load_interval_s: Option<Located<u64>>,
}

/// `[packages]`.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct PackagesFragment {
    pub lock_timeout_s: Option<Located<u64>>,
    pub attempts: Option<Located<u32>>,
}

/// `[cloud]`.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct CloudFragment {
    pub metadata_url: Option<Located<String>>,
    pub metadata_timeout_s: Option<Located<u64>>,
    pub publish_password: Option<Located<bool>>,
    pub clouds_yaml: Option<Located<PathBuf>>,
    pub cloud_name: Option<Located<String>>,
}

/// Everything one file (or the merge of several) says.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Fragment {
    pub instance: InstanceFragment,
    pub services: BTreeMap<ServiceKind, ServiceFragment>,
    pub supervise: SuperviseFragment,
    pub console: ConsoleFragment,
    pub packages: PackagesFragment,
    pub cloud: CloudFragment,
}

/// Replace `dst` with `src` when `src` is set: later files win key by key.
fn over<T>(dst: &mut Option<T>, src: Option<T>) {
    if src.is_some() {
        *dst = src;
    }
}

impl Fragment {
    /// Lay `later` over `self`, key by key.
    pub fn merge(&mut self, later: Fragment) {
        let Fragment {
            instance,
            services,
            supervise,
            console,
            packages,
            cloud,
        } = later;
        over(&mut self.instance.user, instance.user);
        over(&mut self.instance.create_user, instance.create_user);
        for (kind, s) in services {
            let d = self.services.entry(kind).or_default();
            over(&mut d.enabled, s.enabled);
            over(&mut d.port, s.port);
            over(&mut d.bind, s.bind);
            over(&mut d.base_url, s.base_url);
            over(&mut d.python, s.python);
            over(&mut d.installer, s.installer);
            over(&mut d.start_timeout_s, s.start_timeout_s);
            over(&mut d.environment, s.environment);
            over(&mut d.geometry, s.geometry);
            over(&mut d.vnc_server, s.vnc_server);
            over(&mut d.guacd, s.guacd);
            over(&mut d.guacd_address, s.guacd_address);
            over(&mut d.session_timeout_min, s.session_timeout_min);
            over(&mut d.ssh_port, s.ssh_port);
        }
        let d = &mut self.supervise;
        over(&mut d.backoff_initial_ms, supervise.backoff_initial_ms);
        over(&mut d.backoff_max_ms, supervise.backoff_max_ms);
        over(&mut d.crash_loop_restarts, supervise.crash_loop_restarts);
        over(&mut d.stable_after_s, supervise.stable_after_s);
        over(
            &mut d.readiness_interval_ms,
            supervise.readiness_interval_ms,
        );
        over(&mut d.liveness_interval_s, supervise.liveness_interval_s);
        over(&mut d.liveness_failures, supervise.liveness_failures);
        over(&mut d.log_max_bytes, supervise.log_max_bytes);
        over(&mut self.console.devices, console.devices);
        over(
            &mut self.console.status_interval_s,
            console.status_interval_s,
        );
        over(&mut self.console.load_interval_s, console.load_interval_s);
        over(&mut self.packages.lock_timeout_s, packages.lock_timeout_s);
        over(&mut self.packages.attempts, packages.attempts);
        over(&mut self.cloud.metadata_url, cloud.metadata_url);
        over(&mut self.cloud.metadata_timeout_s, cloud.metadata_timeout_s);
        over(&mut self.cloud.publish_password, cloud.publish_password);
        over(&mut self.cloud.clouds_yaml, cloud.clouds_yaml);
        over(&mut self.cloud.cloud_name, cloud.cloud_name);
    }
}

/// The longest interval any `_s` or `_ms` key may ask for: one year. Far beyond any sensible
/// setting, and far from the overflow of timer arithmetic.
const MAX_SECONDS: i64 = 365 * 24 * 3600;
const MAX_MILLIS: i64 = MAX_SECONDS * 1000;

const TOP_KEYS: &[&str] = &[
    "instance",
    "services",
    "supervise",
    "console",
    "packages",
    "cloud",
];
const INSTANCE_KEYS: &[&str] = &["user", "create_user"];
const JUPYTERLAB_KEYS: &[&str] = &[
    "enabled",
    "port",
    "bind",
    "base_url",
    "python",
    "installer",
    "start_timeout_s",
];
const DESKTOP_KEYS: &[&str] = &[
    "enabled",
    "port",
    "environment",
    "geometry",
    "vnc_server",
    "start_timeout_s",
];
const GUACAMOLE_KEYS: &[&str] = &[
    "enabled",
    "port",
    "bind",
    "guacd",
    "guacd_address",
    "session_timeout_min",
    "ssh_port",
    "start_timeout_s",
];
const OTHER_SERVICE_KEYS: &[&str] = &["enabled", "port"];
const SUPERVISE_KEYS: &[&str] = &[
    "backoff_initial_ms",
    "backoff_max_ms",
    "crash_loop_restarts",
    "stable_after_s",
    "readiness_interval_ms",
    "liveness_interval_s",
    "liveness_failures",
    "log_max_bytes",
];
const CONSOLE_KEYS: &[&str] = &["devices", "status_interval_s", "load_interval_s"];
const PACKAGES_KEYS: &[&str] = &["lock_timeout_s", "attempts"];
const CLOUD_KEYS: &[&str] = &[
    "metadata_url",
    "metadata_timeout_s",
    "publish_password",
    "clouds_yaml",
    "cloud_name",
];

/// The 1-based line of a byte offset in `text`.
pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// A key as it appears in a dotted path: bare when TOML allows it, quoted otherwise.
fn key_segment(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        key.to_owned()
    } else {
        format!("{key:?}")
    }
}

/// A short description of a TOML item for messages: its type and, for scalars, its value.
fn describe(item: &Item) -> String {
    match item {
        Item::None => "nothing".to_owned(),
        Item::Value(v) => describe_value(v),
        Item::Table(_) => "table".to_owned(),
        Item::ArrayOfTables(_) => "array of tables".to_owned(),
    }
}

fn describe_value(v: &Value) -> String {
    match v {
        Value::String(s) => format!("string {}", quote(s.value())),
        Value::Integer(i) => format!("integer {}", i.value()),
        Value::Float(x) => format!("float {}", x.value()),
        Value::Boolean(b) => format!("boolean {}", b.value()),
        Value::Datetime(d) => format!("datetime {}", d.value()),
        Value::Array(_) => "array".to_owned(),
        Value::InlineTable(_) => "table".to_owned(),
    }
}

/// A string value quoted and escaped for a one-line message, shortened when long.
fn quote(s: &str) -> String {
    const MAX: usize = 40;
    if s.chars().count() > MAX {
        let short: String = s.chars().take(MAX).collect();
        format!("{short:?}...")
    } else {
        format!("{s:?}")
    }
}

/// One key being read: its dotted path, its line and its item.
struct Field<'t> {
    path: String,
    line: Option<usize>,
    item: &'t Item,
}

/// Walks one parsed file, collecting a fragment and every error.
struct Walker<'a> {
    index: usize,
    path: &'a Path,
    text: &'a str,
    errors: Vec<ConfigError>,
}

impl<'a> Walker<'a> {
    fn line(&self, span: Option<std::ops::Range<usize>>) -> Option<usize> {
        span.map(|s| line_of(self.text, s.start))
    }

    fn error(&mut self, field: &Field<'_>, kind: ErrorKind, message: String) {
        self.errors.push(ConfigError {
            file: self.path.to_path_buf(),
            line: field.line,
            key: Some(field.path.clone()),
            message,
            kind,
        });
    }

    fn located<T>(&self, field: &Field<'_>, value: T) -> Located<T> {
        Located {
            value,
            origin: Origin {
                file: self.index,
                line: field.line,
            },
        }
    }

    fn wrong_type(&mut self, field: &Field<'_>, expected: &str) {
        let found = describe(field.item);
        self.error(
            field,
            ErrorKind::WrongType,
            format!("invalid type {found}, expected {expected}"),
        );
    }

    /// The entries of a table, each checked against `known`; unknown keys are reported with
    /// `unknown` as their message.
    fn entries<'t>(
        &mut self,
        prefix: Option<&str>,
        table: &'t dyn TableLike,
        known: &[&str],
        unknown: &str,
    ) -> Vec<(&'t str, Field<'t>)> {
        let mut out = Vec::new();
        for (key, item) in table.iter() {
            let path = match prefix {
                Some(prefix) => format!("{prefix}.{}", key_segment(key)),
                None => key_segment(key),
            };
            let key_span = table.key(key).and_then(|k| k.span());
            let line = self.line(key_span.or_else(|| item.span()));
            let field = Field { path, line, item };
            if known.contains(&key) {
                out.push((key, field));
            } else {
                self.error(&field, ErrorKind::UnknownKey, unknown.to_owned());
            }
        }
        out
    }

    fn table<'t>(&mut self, field: &Field<'t>) -> Option<&'t dyn TableLike> {
        match field.item.as_table_like() {
            Some(table) => Some(table),
            None => {
                self.wrong_type(field, "a table");
                None
            }
        }
    }

    fn boolean(&mut self, field: &Field<'_>) -> Option<Located<bool>> {
        match field.item.as_bool() {
            Some(b) => Some(self.located(field, b)),
            None => {
                self.wrong_type(field, "a boolean (true or false)");
                None
            }
        }
    }

    fn integer(
        &mut self,
        field: &Field<'_>,
        range: std::ops::RangeInclusive<i64>,
        expected: &str,
    ) -> Option<Located<i64>> {
        let Some(i) = field.item.as_integer() else {
            self.wrong_type(field, expected);
            return None;
        };
        if range.contains(&i) {
            Some(self.located(field, i))
        } else {
            self.error(
                field,
                ErrorKind::OutOfRange,
                format!("invalid value {i}, expected {expected}"),
            );
            None
        }
    }

    /// An integer key with a minimum (and the type's or the interval cap's maximum).
    fn count<T: TryFrom<i64>>(
        &mut self,
        field: &Field<'_>,
        min: i64,
        max: i64,
        unit: &str,
    ) -> Option<Located<T>> {
        let expected = if unit.is_empty() {
            format!("an integer from {min} to {max}")
        } else {
            format!("an integer from {min} to {max} ({unit})")
        };
        let located = self.integer(field, min..=max, &expected)?;
        // The range check above keeps the value inside T for every caller.
        let value = T::try_from(located.value).ok()?;
        Some(Located {
            value,
            origin: located.origin,
        })
    }

    fn seconds(&mut self, field: &Field<'_>, min: i64) -> Option<Located<u64>> {
        self.count(field, min, MAX_SECONDS, "seconds")
    }

    fn millis(&mut self, field: &Field<'_>, min: i64) -> Option<Located<u64>> {
        self.count(field, min, MAX_MILLIS, "milliseconds")
    }

    fn u32_at_least(&mut self, field: &Field<'_>, min: i64) -> Option<Located<u32>> {
        self.count(field, min, i64::from(u32::MAX), "")
    }

    fn port(&mut self, field: &Field<'_>) -> Option<Located<u16>> {
        let located = self.integer(field, 1..=65535, "a port 1-65535")?;
        let value = u16::try_from(located.value).ok()?;
        Some(Located {
            value,
            origin: located.origin,
        })
    }

    /// A string key whose text must pass `parse`; `expected` describes what is accepted.
    fn parsed<T>(
        &mut self,
        field: &Field<'_>,
        expected: &str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Option<Located<T>> {
        let Some(s) = field.item.as_str() else {
            self.wrong_type(field, expected);
            return None;
        };
        match parse(s) {
            Some(value) => Some(self.located(field, value)),
            None => {
                let shown = quote(s);
                self.error(
                    field,
                    ErrorKind::InvalidValue,
                    format!("invalid value {shown}, expected {expected}"),
                );
                None
            }
        }
    }

    fn instance(&mut self, table: &dyn TableLike, out: &mut InstanceFragment) {
        for (key, field) in self.entries(
            Some("instance"),
            table,
            INSTANCE_KEYS,
            &format!("unknown key, expected one of: {}", INSTANCE_KEYS.join(", ")),
        ) {
            match key {
                "user" => {
                    out.user = self.parsed(
                        &field,
                        "a POSIX user name (lowercase letter or '_', then up to 31 of a-z 0-9 _ -)",
                        |s| valid_user_name(s).then(|| s.to_owned()),
                    )
                }
                _ => out.create_user = self.boolean(&field),
            }
        }
    }

    fn services(
        &mut self,
        table: &dyn TableLike,
        out: &mut BTreeMap<ServiceKind, ServiceFragment>,
    ) {
        let known: Vec<&str> = ServiceKind::ALL.iter().map(|k| k.as_str()).collect();
        for (key, field) in self.entries(
            Some("services"),
            table,
            &known,
            &format!("unknown service, known services: {}", known.join(", ")),
        ) {
            let Ok(kind) = key.parse::<ServiceKind>() else {
                continue; // `entries` only returns known names.
            };
            let Some(service) = self.table(&field) else {
                continue;
            };
            let keys = match kind {
                ServiceKind::JupyterLab => JUPYTERLAB_KEYS,
                ServiceKind::Desktop => DESKTOP_KEYS,
                ServiceKind::Guacamole => GUACAMOLE_KEYS,
                ServiceKind::RStudio => OTHER_SERVICE_KEYS,
            };
            let frag = out.entry(kind).or_default();
            for (key, field) in self.entries(
                Some(&field.path),
                service,
                keys,
                &format!(
                    "unknown key for service '{kind}', expected one of: {}",
                    keys.join(", ")
                ),
            ) {
                match key {
                    "enabled" => frag.enabled = self.boolean(&field),
                    "port" => frag.port = self.port(&field),
                    "bind" => frag.bind = self.parsed(&field, "an IP address", |s| s.parse().ok()),
                    "base_url" => {
                        frag.base_url = self.parsed(
                            &field,
                            "a URL path starting with '/' made of segments of letters, digits, \
                             '-', '.', '_' and '~' (no empty, '.' or '..' segments)",
                            normalise_base_url,
                        )
                    }
                    "python" => {
                        frag.python = self.parsed(
                            &field,
                            "an absolute path, or \"\" to pick one automatically",
                            python_path,
                        )
                    }
                    "installer" => {
                        frag.installer = self.parsed(&field, "one of: auto, uv, pip", |s| match s {
                            "auto" => Some(PythonInstaller::Auto),
                            "uv" => Some(PythonInstaller::Uv),
                            "pip" => Some(PythonInstaller::Pip),
                            _ => None,
                        })
                    }
                    "environment" => {
                        frag.environment = self.parsed(&field, "one of: xfce, gnome", |s| match s {
                            "xfce" => Some(DesktopEnvironment::Xfce),
                            "gnome" => Some(DesktopEnvironment::Gnome),
                            _ => None,
                        })
                    }
                    "geometry" => {
                        frag.geometry = self.parsed(
                            &field,
                            "WIDTHxHEIGHT, each from 320 to 8192 (e.g. \"1280x800\")",
                            geometry,
                        )
                    }
                    "vnc_server" => {
                        frag.vnc_server =
                            self.parsed(&field, "one of: auto, tigervnc, turbovnc", |s| match s {
                                "auto" => Some(VncServerChoice::Auto),
                                "tigervnc" => Some(VncServerChoice::TigerVnc),
                                "turbovnc" => Some(VncServerChoice::TurboVnc),
                                _ => None,
                            })
                    }
                    "guacd" => {
                        frag.guacd =
                            self.parsed(&field, "one of: auto, package, container, external", |s| {
                                match s {
                                    "auto" => Some(GuacdSource::Auto),
                                    "package" => Some(GuacdSource::Package),
                                    "container" => Some(GuacdSource::Container),
                                    "external" => Some(GuacdSource::External),
                                    _ => None,
                                }
                            })
                    }
                    "guacd_address" => {
                        frag.guacd_address = self.parsed(
                            &field,
                            "an IP address and port, e.g. \"127.0.0.1:4822\"",
                            |s| s.parse().ok(),
                        )
                    }
                    "session_timeout_min" => {
                        frag.session_timeout_min = self.count(&field, 60, 1440, "minutes")
                    }
                    "ssh_port" => frag.ssh_port = self.port(&field),
                    _ => frag.start_timeout_s = self.count(&field, 1, 3600, "seconds"),
                }
            }
        }
    }

    fn supervise(&mut self, table: &dyn TableLike, out: &mut SuperviseFragment) {
        for (key, field) in self.entries(
            Some("supervise"),
            table,
            SUPERVISE_KEYS,
            &format!(
                "unknown key, expected one of: {}",
                SUPERVISE_KEYS.join(", ")
            ),
        ) {
            match key {
                "backoff_initial_ms" => out.backoff_initial_ms = self.millis(&field, 1),
                "backoff_max_ms" => out.backoff_max_ms = self.millis(&field, 1),
                "crash_loop_restarts" => out.crash_loop_restarts = self.u32_at_least(&field, 1),
                "stable_after_s" => out.stable_after_s = self.seconds(&field, 1),
                "readiness_interval_ms" => out.readiness_interval_ms = self.millis(&field, 10),
                "liveness_interval_s" => out.liveness_interval_s = self.seconds(&field, 1),
                "liveness_failures" => out.liveness_failures = self.u32_at_least(&field, 1),
                _ => out.log_max_bytes = self.count(&field, 4096, i64::MAX, "bytes"),
            }
        }
    }

    fn console(&mut self, table: &dyn TableLike, out: &mut ConsoleFragment) {
        for (key, field) in self.entries(
            Some("console"),
            table,
            CONSOLE_KEYS,
            &format!("unknown key, expected one of: {}", CONSOLE_KEYS.join(", ")),
        ) {
            match key {
                "devices" => out.devices = self.devices(&field),
                "status_interval_s" => out.status_interval_s = self.seconds(&field, 1),
                _ => out.load_interval_s = self.seconds(&field, 1),
            }
        }
    }

    fn devices(&mut self, field: &Field<'_>) -> Option<Located<Vec<PathBuf>>> {
        let Some(array) = field.item.as_array() else {
            self.wrong_type(field, "an array of absolute paths");
            return None;
        };
        let mut devices = Vec::new();
        let mut ok = true;
        for (i, value) in array.iter().enumerate() {
            let item = Item::Value(value.clone());
            let element = Field {
                path: format!("{}[{i}]", field.path),
                line: self.line(value.span()).or(field.line),
                item: &item,
            };
            match self.parsed(&element, "an absolute path", absolute_path) {
                Some(path) => devices.push(path.value),
                None => ok = false,
            }
        }
        ok.then(|| self.located(field, devices))
    }

    fn packages(&mut self, table: &dyn TableLike, out: &mut PackagesFragment) {
        for (key, field) in self.entries(
            Some("packages"),
            table,
            PACKAGES_KEYS,
            &format!("unknown key, expected one of: {}", PACKAGES_KEYS.join(", ")),
        ) {
            match key {
                "lock_timeout_s" => out.lock_timeout_s = self.seconds(&field, 0),
                _ => out.attempts = self.u32_at_least(&field, 1),
            }
        }
    }
}

impl Walker<'_> {
    fn cloud(&mut self, table: &dyn TableLike, out: &mut CloudFragment) {
        for (key, field) in self.entries(
            Some("cloud"),
            table,
            CLOUD_KEYS,
            &format!("unknown key, expected one of: {}", CLOUD_KEYS.join(", ")),
        ) {
            match key {
                "metadata_url" => {
                    out.metadata_url = self.parsed(
                        &field,
                        "an http:// or https:// URL without query or fragment",
                        normalise_http_url,
                    )
                }
                "metadata_timeout_s" => out.metadata_timeout_s = self.seconds(&field, 0),
                "clouds_yaml" => {
                    out.clouds_yaml = self.parsed(&field, "an absolute path", absolute_path)
                }
                "cloud_name" => {
                    out.cloud_name = self.parsed(&field, "a non-empty cloud name", |s| {
                        (!s.trim().is_empty()).then(|| s.to_owned())
                    })
                }
                _ => out.publish_password = self.boolean(&field),
            }
        }
    }
}

/// An `http(s)://host[:port][/path]` URL without query, fragment or credentials, with any
/// trailing `/` removed (paths are appended to it).
/// `1280x800` → (1280, 800), each side 320..=8192.
pub(crate) fn geometry(s: &str) -> Option<(u16, u16)> {
    let (w, h) = s.split_once('x')?;
    let side = |v: &str| {
        v.parse::<u16>()
            .ok()
            .filter(|n| (320..=8192).contains(n) && !v.starts_with('+'))
    };
    Some((side(w)?, side(h)?))
}

pub(crate) fn normalise_http_url(s: &str) -> Option<String> {
    let url = reqwest::Url::parse(s).ok()?;
    let plain = matches!(url.scheme(), "http" | "https")
        && url.host_str().is_some()
        && url.query().is_none()
        && url.fragment().is_none()
        && url.username().is_empty()
        && url.password().is_none();
    plain.then(|| url.as_str().trim_end_matches('/').to_owned())
}

/// Whether `s` is a portable POSIX user name: `^[a-z_][a-z0-9_-]{0,31}$`.
pub(crate) fn valid_user_name(s: &str) -> bool {
    let mut chars = s.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    s.len() <= 32
        && (first.is_ascii_lowercase() || first == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// A checked URL prefix, always starting and ending with `/`; `None` when not acceptable.
pub(crate) fn normalise_base_url(s: &str) -> Option<String> {
    let rest = s.strip_prefix('/')?;
    if rest.is_empty() {
        return Some("/".to_owned());
    }
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    for segment in rest.split('/') {
        let fine = !segment.is_empty()
            && segment != "."
            && segment != ".."
            && segment
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~'));
        if !fine {
            return None;
        }
    }
    Some(format!("/{rest}/"))
}

/// An absolute path without NUL bytes.
fn absolute_path(s: &str) -> Option<PathBuf> {
    (s.starts_with('/') && !s.contains('\0')).then(|| PathBuf::from(s))
}

/// `python`: an absolute path, or the empty string for "pick automatically".
fn python_path(s: &str) -> Option<Option<PathBuf>> {
    if s.is_empty() {
        Some(None)
    } else {
        absolute_path(s).map(Some)
    }
}

/// Parse the file at position `index` of the load order into a fragment, or return every
/// error found in it.
pub(crate) fn parse(index: usize, path: &Path, text: &str) -> (Fragment, Vec<ConfigError>) {
    let mut fragment = Fragment::default();
    let doc = match ImDocument::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            let message = e
                .message()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("; ");
            let error = ConfigError {
                file: path.to_path_buf(),
                line: e.span().map(|s| line_of(text, s.start)),
                key: None,
                message: format!("TOML syntax error: {message}"),
                kind: ErrorKind::Syntax,
            };
            return (fragment, vec![error]);
        }
    };
    let mut walker = Walker {
        index,
        path,
        text,
        errors: Vec::new(),
    };
    let root: &dyn TableLike = doc.as_table();
    for (key, field) in walker.entries(
        None,
        root,
        TOP_KEYS,
        &format!("unknown key, expected one of: {}", TOP_KEYS.join(", ")),
    ) {
        let Some(table) = walker.table(&field) else {
            continue;
        };
        match key {
            "instance" => walker.instance(table, &mut fragment.instance),
            "services" => walker.services(table, &mut fragment.services),
            "supervise" => walker.supervise(table, &mut fragment.supervise),
            "console" => walker.console(table, &mut fragment.console),
            "cloud" => walker.cloud(table, &mut fragment.cloud),
            _ => walker.packages(table, &mut fragment.packages),
        }
    }
    let mut errors = walker.errors;
    // Tables and dotted keys can make the walk order differ from the text order.
    errors.sort_by_key(|e| e.line);
    (fragment, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names() {
        for good in ["exouser", "_x", "a", "a-b_c9", &"a".repeat(32)] {
            assert!(valid_user_name(good), "{good}");
        }
        for bad in [
            "",
            "9a",
            "-a",
            "Exouser",
            "a b",
            "a.b",
            &"a".repeat(33),
            "é",
        ] {
            assert!(!valid_user_name(bad), "{bad}");
        }
    }

    #[test]
    fn http_urls() {
        assert_eq!(
            normalise_http_url("http://169.254.169.254/").as_deref(),
            Some("http://169.254.169.254")
        );
        assert_eq!(
            normalise_http_url("https://meta.example:8443/x/").as_deref(),
            Some("https://meta.example:8443/x")
        );
        for bad in [
            "ftp://x",
            "169.254.169.254",
            "http://u:p@x",
            "http://x/?q=1",
            "http://x/#f",
            "",
        ] {
            assert_eq!(normalise_http_url(bad), None, "{bad}");
        }
    }

    #[test]
    fn base_urls() {
        assert_eq!(normalise_base_url("/").as_deref(), Some("/"));
        assert_eq!(normalise_base_url("/lab").as_deref(), Some("/lab/"));
        assert_eq!(normalise_base_url("/a/b-c/").as_deref(), Some("/a/b-c/"));
        for bad in [
            "",
            "lab",
            "//",
            "//evil.example/",
            "/a/../b",
            "/./",
            "/a b",
            "/a\t",
            "/a?x",
        ] {
            assert_eq!(normalise_base_url(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn lines_are_one_based() {
        let text = "a\nb\nc";
        assert_eq!(line_of(text, 0), 1);
        assert_eq!(line_of(text, 2), 2);
        assert_eq!(line_of(text, 4), 3);
        assert_eq!(line_of(text, 99), 3);
    }

    #[test]
    fn odd_keys_are_quoted_in_paths() {
        assert_eq!(key_segment("port"), "port");
        assert_eq!(key_segment("a b"), "\"a b\"");
        assert_eq!(key_segment("a\nb"), "\"a\\nb\"");
    }
}
