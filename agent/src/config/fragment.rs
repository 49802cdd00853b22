//! What the files say, key by key: every file is walked in load order into one fragment whose
//! every value remembers the file and line that set it (later files win key by key). The
//! agent-wide sections' keys are here; each service reads its own keys (`services::<name>`).
//!
//! The walk does not stop at the first problem: every unknown key, wrong type and bad value in
//! a file is reported, and the good values are kept so later checks still see them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use toml_edit::TableLike;

use crate::model::ServiceKind;
use crate::schema::values::{absolute_path, normalise_http_url, valid_user_name};
use crate::schema::{parse_document, set, ConfigError, Key, Located, Walker};
use crate::services::ServiceSection;

/// `[instance]`.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct InstanceFragment {
    pub user: Option<Located<String>>,
    pub create_user: Option<Located<bool>>,
}

/// `[services.<name>]`: the keys every service has, and the service's own section when this
/// version implements it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ServiceFragment {
    pub common: CommonFragment,
    pub own: Option<ServiceSection>,
}

/// `enabled` and `port`, which every service has.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct CommonFragment {
    pub enabled: Option<Located<bool>>,
    pub port: Option<Located<u16>>,
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
    pub uap_hostname: Option<Located<Option<String>>>,
    pub watch_request: Option<Located<bool>>,
    pub request_interval_s: Option<Located<u64>>,
}

/// Everything the files say, merged in load order.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Fragment {
    pub instance: InstanceFragment,
    pub services: BTreeMap<ServiceKind, ServiceFragment>,
    pub supervise: SuperviseFragment,
    pub console: ConsoleFragment,
    pub packages: PackagesFragment,
    pub cloud: CloudFragment,
    pub tls: crate::front::settings::Section,
    pub host: crate::host::settings::Section,
    pub volumes: crate::volumes::Section,
    pub alerts: crate::alerts::Section,
    pub idle: crate::idle::Section,
}

const TOP_KEYS: &[&str] = &[
    "instance",
    "services",
    "supervise",
    "console",
    "packages",
    "cloud",
    "tls",
    "host",
    "volumes",
    "alerts",
    "idle",
];

const INSTANCE_KEYS: &[Key<InstanceFragment>] = &[
    Key {
        name: "user",
        example: "\"alice\"",
        read: |w, f, s| {
            set(
                &mut s.user,
                w.parsed(
                    f,
                    "a POSIX user name (lowercase letter or '_', then up to 31 of a-z 0-9 _ -)",
                    |v| valid_user_name(v).then(|| v.to_owned()),
                ),
            )
        },
    },
    Key {
        name: "create_user",
        example: "false",
        read: |w, f, s| set(&mut s.create_user, w.boolean(f)),
    },
];

const COMMON_SERVICE_KEYS: &[Key<CommonFragment>] = &[
    Key {
        name: "enabled",
        example: "true",
        read: |w, f, s| set(&mut s.enabled, w.boolean(f)),
    },
    Key {
        name: "port",
        example: "1234",
        read: |w, f, s| set(&mut s.port, w.port(f)),
    },
];

const SUPERVISE_KEYS: &[Key<SuperviseFragment>] = &[
    Key {
        name: "backoff_initial_ms",
        example: "2",
        read: |w, f, s| set(&mut s.backoff_initial_ms, w.millis(f, 1)),
    },
    Key {
        name: "backoff_max_ms",
        example: "3",
        read: |w, f, s| set(&mut s.backoff_max_ms, w.millis(f, 1)),
    },
    Key {
        name: "crash_loop_restarts",
        example: "4",
        read: |w, f, s| set(&mut s.crash_loop_restarts, w.u32_at_least(f, 1)),
    },
    Key {
        name: "stable_after_s",
        example: "5",
        read: |w, f, s| set(&mut s.stable_after_s, w.seconds(f, 1)),
    },
    Key {
        name: "readiness_interval_ms",
        example: "60",
        read: |w, f, s| set(&mut s.readiness_interval_ms, w.millis(f, 10)),
    },
    Key {
        name: "liveness_interval_s",
        example: "7",
        read: |w, f, s| set(&mut s.liveness_interval_s, w.seconds(f, 1)),
    },
    Key {
        name: "liveness_failures",
        example: "8",
        read: |w, f, s| set(&mut s.liveness_failures, w.u32_at_least(f, 1)),
    },
    Key {
        name: "log_max_bytes",
        example: "9000",
        read: |w, f, s| set(&mut s.log_max_bytes, w.count(f, 4096, i64::MAX, "bytes")),
    },
];

const CONSOLE_KEYS: &[Key<ConsoleFragment>] = &[
    Key {
        name: "devices",
        example: "[\"/dev/ttyS0\"]",
        read: |w, f, s| {
            set(
                &mut s.devices,
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
        name: "status_interval_s",
        example: "2",
        read: |w, f, s| set(&mut s.status_interval_s, w.seconds(f, 1)),
    },
    Key {
        name: "load_interval_s",
        example: "3",
        read: |w, f, s| set(&mut s.load_interval_s, w.seconds(f, 1)),
    },
];

const PACKAGES_KEYS: &[Key<PackagesFragment>] = &[
    Key {
        name: "lock_timeout_s",
        example: "1",
        read: |w, f, s| set(&mut s.lock_timeout_s, w.seconds(f, 0)),
    },
    Key {
        name: "attempts",
        example: "2",
        read: |w, f, s| set(&mut s.attempts, w.u32_at_least(f, 1)),
    },
];

const CLOUD_KEYS: &[Key<CloudFragment>] = &[
    Key {
        name: "metadata_url",
        example: "\"http://127.0.0.1:8775\"",
        read: |w, f, s| {
            set(
                &mut s.metadata_url,
                w.parsed(
                    f,
                    "an http:// or https:// URL without query or fragment",
                    normalise_http_url,
                ),
            )
        },
    },
    Key {
        name: "metadata_timeout_s",
        example: "1",
        read: |w, f, s| set(&mut s.metadata_timeout_s, w.seconds(f, 0)),
    },
    Key {
        name: "publish_password",
        example: "false",
        read: |w, f, s| set(&mut s.publish_password, w.boolean(f)),
    },
    Key {
        name: "clouds_yaml",
        example: "\"/etc/openstack/clouds.yaml\"",
        read: |w, f, s| {
            set(
                &mut s.clouds_yaml,
                w.parsed(f, "an absolute path", absolute_path),
            )
        },
    },
    Key {
        name: "cloud_name",
        example: "\"mine\"",
        read: |w, f, s| {
            set(
                &mut s.cloud_name,
                w.parsed(f, "a non-empty cloud name", |v| {
                    (!v.trim().is_empty()).then(|| v.to_owned())
                }),
            )
        },
    },
    Key {
        name: "uap_hostname",
        example: "\"proxy-js2-iu.exosphere.app\"",
        read: |w, f, s| {
            set(
                &mut s.uap_hostname,
                w.parsed(
                    f,
                    "a host name such as proxy.example.org, or \"\" for none",
                    |v| match v.trim() {
                        "" => Some(None),
                        host => crate::cloud::uap_hostname(host).map(Some),
                    },
                ),
            )
        },
    },
    Key {
        name: "watch_request",
        example: "false",
        read: |w, f, s| set(&mut s.watch_request, w.boolean(f)),
    },
    Key {
        name: "request_interval_s",
        example: "300",
        read: |w, f, s| set(&mut s.request_interval_s, w.seconds(f, 1)),
    },
];

/// `[services]`: one table per known service; each is read with the common keys and the
/// service's own.
fn services(
    w: &mut Walker<'_>,
    table: &dyn TableLike,
    out: &mut BTreeMap<ServiceKind, ServiceFragment>,
) {
    let known: Vec<&str> = ServiceKind::ALL.iter().map(|k| k.as_str()).collect();
    for (name, field) in w.entries(
        Some("services"),
        table,
        &known,
        &format!("unknown service, known services: {}", known.join(", ")),
    ) {
        let Ok(kind) = name.parse::<ServiceKind>() else {
            continue; // `entries` only returns known names.
        };
        let Some(service) = w.table(&field) else {
            continue;
        };
        let fragment = out.entry(kind).or_insert_with(|| ServiceFragment {
            common: CommonFragment::default(),
            own: ServiceSection::new(kind),
        });
        let mut names: Vec<&str> = COMMON_SERVICE_KEYS.iter().map(|k| k.name).collect();
        if let Some(own) = &fragment.own {
            names.extend(own.key_names());
        }
        let unknown = format!(
            "unknown key for service '{kind}', expected one of: {}",
            names.join(", ")
        );
        for (key, field) in w.entries(Some(&field.path), service, &names, &unknown) {
            match COMMON_SERVICE_KEYS.iter().find(|k| k.name == key) {
                Some(common) => (common.read)(w, &field, &mut fragment.common),
                None => {
                    if let Some(own) = &mut fragment.own {
                        own.read(key, w, &field);
                    }
                }
            }
        }
    }
}

/// Read the file at position `index` of the load order into `fragment` (its values win over
/// earlier files'), returning the errors found in it (at most `MAX_ERRORS`) and how many more
/// there were.
pub(crate) fn parse(
    index: usize,
    path: &Path,
    text: &str,
    fragment: &mut Fragment,
) -> (Vec<ConfigError>, usize) {
    let doc = match parse_document(path, text) {
        Ok(doc) => doc,
        Err(error) => return (vec![error], 0),
    };
    let mut w = Walker::new(index, path, text);
    let root: &dyn TableLike = doc.as_table();
    for (key, field) in w.entries(
        None,
        root,
        TOP_KEYS,
        &format!("unknown key, expected one of: {}", TOP_KEYS.join(", ")),
    ) {
        let Some(table) = w.table(&field) else {
            continue;
        };
        match key {
            "instance" => w.section(
                "instance",
                table,
                INSTANCE_KEYS,
                "unknown key",
                &mut fragment.instance,
            ),
            "services" => services(&mut w, table, &mut fragment.services),
            "supervise" => w.section(
                "supervise",
                table,
                SUPERVISE_KEYS,
                "unknown key",
                &mut fragment.supervise,
            ),
            "console" => w.section(
                "console",
                table,
                CONSOLE_KEYS,
                "unknown key",
                &mut fragment.console,
            ),
            "packages" => w.section(
                "packages",
                table,
                PACKAGES_KEYS,
                "unknown key",
                &mut fragment.packages,
            ),
            "cloud" => w.section(
                "cloud",
                table,
                CLOUD_KEYS,
                "unknown key",
                &mut fragment.cloud,
            ),
            "tls" => w.section(
                "tls",
                table,
                crate::front::settings::KEYS,
                "unknown key",
                &mut fragment.tls,
            ),
            "host" => w.section(
                "host",
                table,
                crate::host::settings::KEYS,
                "unknown key",
                &mut fragment.host,
            ),
            "volumes" => w.section(
                "volumes",
                table,
                crate::volumes::KEYS,
                "unknown key",
                &mut fragment.volumes,
            ),
            "alerts" => w.section(
                "alerts",
                table,
                crate::alerts::KEYS,
                "unknown key",
                &mut fragment.alerts,
            ),
            "idle" => w.section(
                "idle",
                table,
                crate::idle::KEYS,
                "unknown key",
                &mut fragment.idle,
            ),
            // `entries` returns only names from `TOP_KEYS`; a test checks each has an arm.
            _ => {}
        }
    }
    w.finish_counted()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::key_table_problems;

    #[test]
    fn every_agent_wide_key_is_read_into_its_own_field() {
        let mut problems = key_table_problems("instance", INSTANCE_KEYS);
        problems.extend(key_table_problems("s", COMMON_SERVICE_KEYS));
        problems.extend(key_table_problems("supervise", SUPERVISE_KEYS));
        problems.extend(key_table_problems("console", CONSOLE_KEYS));
        problems.extend(key_table_problems("packages", PACKAGES_KEYS));
        problems.extend(key_table_problems("cloud", CLOUD_KEYS));
        problems.extend(key_table_problems("host", crate::host::settings::KEYS));
        problems.extend(key_table_problems("volumes", crate::volumes::KEYS));
        problems.extend(key_table_problems("alerts", crate::alerts::KEYS));
        problems.extend(key_table_problems("idle", crate::idle::KEYS));
        assert!(problems.is_empty(), "{problems:#?}");
    }

    #[test]
    fn every_top_level_section_has_a_reader() {
        for key in TOP_KEYS {
            // A section without a reader would accept anything: an unknown key must be refused.
            let text = format!("[{key}]\nnot_a_key = 1\n");
            let mut fragment = Fragment::default();
            let (errors, _) = parse(0, Path::new("t.toml"), &text, &mut fragment);
            assert_eq!(errors.len(), 1, "{key}: {errors:?}");
            assert_eq!(errors[0].key.as_deref(), Some(&*format!("{key}.not_a_key")));
        }
    }

    /// A key the walker reads into the wrong field is caught: this table reads `b` into
    /// `a`'s field, as a catch-all match arm once could.
    #[test]
    fn a_misrouted_key_is_a_test_failure() {
        #[derive(Default, PartialEq)]
        struct Two {
            a: Option<Located<bool>>,
            b: Option<Located<bool>>,
        }
        let misrouted: &[Key<Two>] = &[
            Key {
                name: "a",
                example: "true",
                read: |w, f, s| set(&mut s.a, w.boolean(f)),
            },
            Key {
                name: "b",
                example: "false",
                read: |w, f, s| set(&mut s.a, w.boolean(f)),
            },
        ];
        let problems = key_table_problems("t", misrouted);
        assert!(
            problems.iter().any(|p| p == "b overwrites what a set"),
            "{problems:?}"
        );
        let fixed: &[Key<Two>] = &[
            misrouted[0],
            Key {
                name: "b",
                example: "false",
                read: |w, f, s| set(&mut s.b, w.boolean(f)),
            },
        ];
        assert!(key_table_problems("t", fixed).is_empty());
    }
}
