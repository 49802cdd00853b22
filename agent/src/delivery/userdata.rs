//! Renders cloud-init userdata (`#cloud-config`) for a set of choices: the services, how the
//! agent arrives (baked into the image, or downloaded and checked at boot), an optional
//! clouds.yaml for Nova reporting, whether cloud-init waits for the setup. Built as a YAML tree,
//! never by pasting text, and the agent configuration it carries is checked by the agent's own
//! validator first.

use std::path::PathBuf;
use std::time::Duration;

use serde_norway::{Mapping, Value};

use crate::config;
use crate::model::ServiceKind;

/// Where the userdata puts the agent's configuration.
pub const CONFIG_DROP_IN: &str = "/etc/exoagent/config.d/50-userdata.toml";
/// Where the userdata puts a clouds.yaml, when given one.
pub const CLOUDS_YAML: &str = "/etc/exoagent/clouds.yaml";
/// Where the bootstrap installs the downloaded binary.
pub const BOOTSTRAP_BINARY: &str = "/usr/local/bin/exoagent";
/// How long cloud-init waits for the setup by default (`--wait-timeout`).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30 * 60);

/// The bootstrap, run as `sh -c SCRIPT exoagent-bootstrap URL SHA256 TARGET`: the URL and
/// checksum arrive as arguments, never inside the script text. It runs twice: early, from
/// `bootcmd` as a transient unit queued behind cloud-init's network stage ([`bootcmd`]), and
/// from `runcmd`, where it waits for the early run (a lock) and finds the work done (the binary
/// at TARGET has the checksum and the unit is enabled), or does it when the early run could
/// not. On failure it writes an Exosphere `error` status line, so the launcher does not wait
/// for a timeout. An image that already has exoagent baked in (`/usr/bin/exoagent`) keeps it:
/// the operator chose that build deliberately, and one template then serves baked and stock
/// images alike. The unit is written and enabled by `exoagent install --enable` (files only)
/// and started without a `daemon-reload`: systemd 242 and later load a unit file that appeared
/// since the last look on demand; an older one that cannot find it is reloaded once.
const BOOTSTRAP_SCRIPT: &str = r#"set -u
url="$1"; sum="$2"; target="$3"
if [ -x /usr/bin/exoagent ]; then
  exec systemctl start --no-block exoagent.service
fi
fail() {
  printf '{"status":"error","epoch":%s000,"step":"bootstrap","reason":"%s"}\n' "$(date +%s)" "$1" >/dev/console 2>/dev/null || true
  exit 1
}
exec 9>>/run/exoagent-bootstrap.lock && flock 9 || fail bootstrap-lock
if [ -x "$target" ] && printf '%s  %s\n' "$sum" "$target" | sha256sum -c --status - 2>/dev/null && systemctl is-enabled --quiet exoagent.service; then
  exec systemctl start --no-block exoagent.service 9>&-
fi
tmp="$(mktemp "$target.XXXXXX")" || fail bootstrap-tempfile
trap 'rm -f "$tmp"' EXIT
curl -fsSL --retry 5 --retry-delay 3 --retry-connrefused -o "$tmp" "$url" || fail bootstrap-download
printf '%s  %s\n' "$sum" "$tmp" | sha256sum -c --quiet - || fail bootstrap-checksum
chmod 0755 "$tmp" && mv -f "$tmp" "$target" || fail bootstrap-install
trap - EXIT
"$target" install --enable --exec "$target" 9>&- || fail bootstrap-install
systemctl start --no-block exoagent.service 9>&- || { systemctl daemon-reload && systemctl start --no-block exoagent.service; } 9>&- || fail bootstrap-start
"#;

/// Where the early bootstrap's transient unit is named and what `cloud-init-per` remembers.
pub const EARLY_BOOTSTRAP_UNIT: &str = "exoagent-bootstrap";

/// Where the package bootstrap downloads to (a private directory made by `mktemp -d` inside).
pub const BOOTSTRAP_WORK_DIR: &str = "/var/tmp";

/// The package bootstrap, run as `sh -c SCRIPT exoagent-bootstrap-package URL SHA256 FORMAT
/// WORKDIR`: like [`BOOTSTRAP_SCRIPT`] every value is an argument, and the package is checked
/// against its SHA-256 before any package tool sees it. apt-get (waiting for the lock that
/// cloud-init or unattended-upgrades may hold) or dnf install it with its dependencies; the
/// package reloads systemd and enables the unit without starting it (installer/package/), so
/// this only starts it: no second `daemon-reload` (each costs seconds on a small instance).
const PACKAGE_BOOTSTRAP_SCRIPT: &str = r#"set -u
url="$1"; sum="$2"; format="$3"; work="$4"
if [ -x /usr/bin/exoagent ]; then
  exec systemctl start --no-block exoagent.service
fi
fail() {
  printf '{"status":"error","epoch":%s000,"step":"bootstrap","reason":"%s"}\n' "$(date +%s)" "$1" >/dev/console 2>/dev/null || true
  exit 1
}
dir="$(mktemp -d "$work/exoagent-bootstrap.XXXXXX")" || fail bootstrap-tempfile
trap 'rm -rf "$dir"' EXIT
pkg="$dir/exoagent.$format"
curl -fsSL --retry 5 --retry-delay 3 --retry-connrefused -o "$pkg" "$url" || fail bootstrap-download
printf '%s  %s\n' "$sum" "$pkg" | sha256sum -c --quiet - || fail bootstrap-checksum
case "$format" in
  deb) DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "$pkg" ;;
  rpm) if command -v dnf >/dev/null 2>&1; then dnf install -y -q "$pkg"; else rpm -U "$pkg"; fi ;;
  *) false ;;
esac || fail bootstrap-install
systemctl start exoagent.service || fail bootstrap-start
"#;

/// The kind of package a bootstrap installs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackageFormat {
    /// A `.deb`, installed with apt-get (Debian, Ubuntu).
    Deb,
    /// An `.rpm`, installed with dnf, else rpm (Rocky, Alma).
    Rpm,
}

impl PackageFormat {
    /// The file extension and the script's format argument.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deb => "deb",
            Self::Rpm => "rpm",
        }
    }

    /// The format a URL's path ends in (`….deb`, `….rpm`; query and fragment ignored).
    pub fn from_url(url: &str) -> Option<Self> {
        let path = url.split(['?', '#']).next().unwrap_or(url);
        if path.ends_with(".deb") {
            Some(Self::Deb)
        } else if path.ends_with(".rpm") {
            Some(Self::Rpm)
        } else {
            None
        }
    }
}

/// How the agent gets onto the instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Already in the image (with its unit enabled): only configure and start it.
    Baked,
    /// A stock image: download from `url`, check `sha256`, install, start.
    Bootstrap {
        /// Where the binary is (https, or http: the checksum protects it either way).
        url: String,
        /// Its SHA-256, 64 hex digits.
        sha256: String,
    },
    /// A stock image: download the `.deb` or `.rpm` from `url`, check `sha256`, install it with
    /// the distribution's package tool, start the unit.
    Package {
        /// Where the package is (https, or http: the checksum protects it either way).
        url: String,
        /// Its SHA-256, 64 hex digits.
        sha256: String,
        /// Which package tool installs it.
        format: PackageFormat,
    },
}

/// What the launcher asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choices {
    /// How the agent arrives.
    pub delivery: Delivery,
    /// The services to enable.
    pub services: Vec<ServiceKind>,
    /// A clouds.yaml to install for Nova reporting, and the cloud in it to use.
    pub clouds_yaml: Option<(String, String)>,
    /// Public keys for the distribution's default user.
    pub ssh_authorized_keys: Vec<String>,
    /// Update and upgrade the OS packages at first boot.
    pub install_os_updates: bool,
    /// Make `cloud-init status --wait` return only once setup is `complete` or `error`, or this
    /// long has passed (then cloud-init reports an error).
    pub cloud_init_waits: Option<Duration>,
}

/// Why userdata could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum UserdataError {
    /// A choice is malformed.
    #[error("{field}: {message}")]
    Invalid {
        /// The option or field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The agent configuration the userdata would carry does not validate.
    #[error("the generated agent configuration is invalid: {0}")]
    Config(String),
}

impl UserdataError {
    /// Short stable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Invalid { .. } => "userdata-invalid-choice",
            Self::Config(_) => "userdata-invalid-config",
        }
    }
}

fn invalid(field: &'static str, message: impl Into<String>) -> UserdataError {
    UserdataError::Invalid {
        field,
        message: message.into(),
    }
}

/// The agent configuration drop-in for `choices`, validated by the agent's own loader.
pub fn config_drop_in(choices: &Choices) -> Result<String, UserdataError> {
    let mut root = toml::Table::new();
    let mut services = toml::Table::new();
    for kind in &choices.services {
        let mut table = toml::Table::new();
        table.insert("enabled".into(), toml::Value::Boolean(true));
        services.insert(kind.as_str().into(), toml::Value::Table(table));
    }
    root.insert("services".into(), toml::Value::Table(services));
    if let Some((_, cloud_name)) = &choices.clouds_yaml {
        let mut cloud = toml::Table::new();
        cloud.insert(
            "clouds_yaml".into(),
            toml::Value::String(CLOUDS_YAML.into()),
        );
        cloud.insert("cloud_name".into(), toml::Value::String(cloud_name.clone()));
        root.insert("cloud".into(), toml::Value::Table(cloud));
    }
    let text = format!(
        "# Written by cloud-init from `exoagent userdata`.\n{}",
        toml::to_string(&root).map_err(|e| UserdataError::Config(e.to_string()))?
    );
    config::load_layers(&[(PathBuf::from(CONFIG_DROP_IN), text.clone())])
        .map_err(|e| UserdataError::Config(e.to_string()))?;
    Ok(text)
}

/// Check a bootstrap's URL and checksum.
pub(crate) fn check_delivery(delivery: &Delivery) -> Result<(), UserdataError> {
    let (url, sha256, url_option, sha_option) = match delivery {
        Delivery::Baked => return Ok(()),
        Delivery::Bootstrap { url, sha256 } => (url, sha256, "--binary-url", "--binary-sha256"),
        Delivery::Package { url, sha256, .. } => (url, sha256, "--package-url", "--package-sha256"),
    };
    let scheme_ok = url.starts_with("https://") || url.starts_with("http://");
    if !scheme_ok || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(
            url_option,
            format!("'{url}' is not an http(s) URL without spaces"),
        ));
    }
    if sha256.len() != 64 || !sha256.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(invalid(sha_option, "must be 64 hexadecimal digits"));
    }
    Ok(())
}

/// The `runcmd` entry that starts the agent: baked, ask systemd; bootstrap and package, the
/// checked download with URL and checksum as arguments.
pub(crate) fn bootstrap_command(delivery: &Delivery) -> Value {
    match delivery {
        // The unit is enabled in the image and ordered after cloud-init's config stage; starting
        // it here as well is harmless and covers images where it is not enabled.
        Delivery::Baked => argv(&["systemctl", "start", "--no-block", "exoagent.service"]),
        Delivery::Bootstrap { url, sha256 } => argv(&bootstrap_script(url, sha256)),
        Delivery::Package {
            url,
            sha256,
            format,
        } => argv(&[
            "sh",
            "-c",
            PACKAGE_BOOTSTRAP_SCRIPT,
            "exoagent-bootstrap-package",
            url,
            sha256,
            format.as_str(),
            BOOTSTRAP_WORK_DIR,
        ]),
    }
}

/// The `bootcmd` entries for `delivery`: with a downloaded binary, the bootstrap queued as a
/// transient unit ordered after cloud-init's network stage (`cloud-init.service`, which runs
/// `bootcmd` and then `write_files`; `cloud-init-network.service` from cloud-init 24.3, as on
/// Debian 13: both are named, an ordering on a missing unit is a no-op), so it starts as soon as the configuration is written
/// instead of in cloud-init's final stage; once per instance (`cloud-init-per`). `--no-block`:
/// cloud-init does not wait for it (it could not: the unit waits for cloud-init). The
/// package bootstrap stays in `runcmd` alone: its package transaction waits for cloud-init's
/// own apt work anyway.
pub(crate) fn bootcmd(delivery: &Delivery) -> Option<Value> {
    let Delivery::Bootstrap { url, sha256 } = delivery else {
        return None;
    };
    let unit = format!("--unit={EARLY_BOOTSTRAP_UNIT}");
    let mut command = vec![
        "cloud-init-per",
        "instance",
        EARLY_BOOTSTRAP_UNIT,
        "systemd-run",
        "--no-block",
        &unit,
        "--description=exoagent bootstrap, early",
        "--property=After=cloud-init.service",
        "--property=After=cloud-init-network.service",
        "--property=Wants=network-online.target",
        "--property=After=network-online.target",
    ];
    command.extend(bootstrap_script(url, sha256));
    Some(Value::Sequence(vec![argv(&command)]))
}

/// The binary bootstrap's command: the script with the URL and checksum as arguments (never
/// interpolated into it); the same from `bootcmd` and `runcmd`.
fn bootstrap_script<'a>(url: &'a str, sha256: &'a str) -> [&'a str; 7] {
    [
        "sh",
        "-c",
        BOOTSTRAP_SCRIPT,
        "exoagent-bootstrap",
        url,
        sha256,
        BOOTSTRAP_BINARY,
    ]
}

/// The `runcmd` entry, after the one that starts the agent, that makes cloud-init wait: the
/// last entry, so its exit status is the runcmd script's (cloud-init joins the entries into
/// one script without `set -e`). `exoagent` is looked up on `PATH`: `/usr/bin` when baked,
/// `/usr/local/bin` after a bootstrap, and a failed bootstrap leaves none (status 127, at once).
/// Non-zero, with one line on stderr, when setup ends in `error`, the timeout passes, or the
/// unit has failed for good (docs/contracts.md, "cloud-init waits").
pub(crate) fn wait_command(timeout: Duration) -> Value {
    let timeout = format!("{}s", timeout.as_secs().max(1));
    argv(&["exoagent", "status", "--wait", "--timeout", &timeout])
}

/// Every `runcmd` entry for `delivery`, waiting or not.
pub(crate) fn runcmd(delivery: &Delivery, wait: Option<Duration>) -> Value {
    let mut entries = vec![bootstrap_command(delivery)];
    entries.extend(wait.map(wait_command));
    Value::Sequence(entries)
}

fn check(choices: &Choices) -> Result<(), UserdataError> {
    check_delivery(&choices.delivery)?;
    if choices.services.is_empty() {
        return Err(invalid("--service", "choose at least one service"));
    }
    for key in &choices.ssh_authorized_keys {
        if key.contains('\n') || !(key.starts_with("ssh-") || key.starts_with("ecdsa-")) {
            return Err(invalid(
                "--ssh-public-key",
                "one public key per option, in OpenSSH format",
            ));
        }
    }
    if let Some((yaml, name)) = &choices.clouds_yaml {
        let parsed: serde_norway::Value = serde_norway::from_str(yaml)
            .map_err(|e| invalid("--clouds-yaml", format!("not YAML: {e}")))?;
        if parsed["clouds"][name.as_str()].is_null() {
            return Err(invalid(
                "--cloud-name",
                format!("cloud '{name}' is not in the clouds.yaml"),
            ));
        }
    }
    Ok(())
}

fn file(path: &str, permissions: &str, content: &str) -> Value {
    let mut entry = Mapping::new();
    entry.insert("path".into(), path.into());
    entry.insert("owner".into(), "root:root".into());
    entry.insert("permissions".into(), permissions.into());
    entry.insert("content".into(), content.into());
    Value::Mapping(entry)
}

fn argv(items: &[&str]) -> Value {
    Value::Sequence(items.iter().map(|s| Value::from(*s)).collect())
}

/// The `#cloud-config` document for `choices`.
pub fn render(choices: &Choices) -> Result<String, UserdataError> {
    check(choices)?;
    let drop_in = config_drop_in(choices)?;
    let mut doc = Mapping::new();
    if !choices.ssh_authorized_keys.is_empty() {
        doc.insert(
            "ssh_authorized_keys".into(),
            Value::Sequence(
                choices
                    .ssh_authorized_keys
                    .iter()
                    .map(|k| Value::from(k.as_str()))
                    .collect(),
            ),
        );
    }
    doc.insert("package_update".into(), choices.install_os_updates.into());
    doc.insert("package_upgrade".into(), choices.install_os_updates.into());
    let mut files = vec![file(CONFIG_DROP_IN, "0644", &drop_in)];
    if let Some((yaml, _)) = &choices.clouds_yaml {
        files.push(file(CLOUDS_YAML, "0600", yaml));
    }
    doc.insert("write_files".into(), Value::Sequence(files));
    if let Some(entries) = bootcmd(&choices.delivery) {
        doc.insert("bootcmd".into(), entries);
    }
    doc.insert(
        "runcmd".into(),
        runcmd(&choices.delivery, choices.cloud_init_waits),
    );
    let body = serde_norway::to_string(&Value::Mapping(doc))
        .map_err(|e| UserdataError::Config(e.to_string()))?;
    Ok(format!("#cloud-config\n{body}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A YAML sequence of strings (an argv), as strings.
    fn strings(value: &Value) -> Vec<&str> {
        value
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect()
    }

    fn choices(delivery: Delivery) -> Choices {
        Choices {
            delivery,
            services: vec![ServiceKind::JupyterLab],
            clouds_yaml: None,
            ssh_authorized_keys: vec![],
            install_os_updates: true,
            cloud_init_waits: None,
        }
    }

    #[test]
    fn baked_userdata_configures_and_starts() {
        let text = render(&choices(Delivery::Baked)).unwrap();
        assert!(text.starts_with("#cloud-config\n"));
        let doc: Value = serde_norway::from_str(&text).unwrap();
        let drop_in = doc["write_files"][0]["content"].as_str().unwrap();
        assert!(
            drop_in.contains("[services.jupyterlab]\nenabled = true"),
            "{drop_in}"
        );
        assert_eq!(doc["runcmd"][0][0], "systemctl");
    }

    #[test]
    fn waiting_is_the_last_runcmd_entry() {
        let mut waits = choices(Delivery::Baked);
        waits.cloud_init_waits = Some(Duration::from_secs(600));
        let doc: Value = serde_norway::from_str(&render(&waits).unwrap()).unwrap();
        let runcmd = doc["runcmd"].as_sequence().unwrap();
        assert_eq!(runcmd.len(), 2);
        assert_eq!(runcmd[0][0], "systemctl");
        let wait: Vec<&str> = strings(&runcmd[1]);
        assert_eq!(wait, ["exoagent", "status", "--wait", "--timeout", "600s"]);
        let doc: Value =
            serde_norway::from_str(&render(&choices(Delivery::Baked)).unwrap()).unwrap();
        assert_eq!(doc["runcmd"].as_sequence().unwrap().len(), 1);
    }

    #[test]
    fn bootstrap_passes_url_and_checksum_as_arguments() {
        let url = "https://example.org/exoagent?x=$(reboot)";
        let text = render(&choices(Delivery::Bootstrap {
            url: url.into(),
            sha256: "ab".repeat(32),
        }))
        .unwrap();
        let doc: Value = serde_norway::from_str(&text).unwrap();
        let cmd = doc["runcmd"][0].as_sequence().unwrap();
        assert_eq!(cmd[0], "sh");
        assert!(!cmd[2].as_str().unwrap().contains("example.org"));
        assert_eq!(cmd[4], url, "the URL is an argument, not script text");
        assert_eq!(cmd[5], "ab".repeat(32).as_str());
        // The same script, with the same arguments, queued early from bootcmd, once per
        // instance, behind cloud-init's network stage.
        let early = doc["bootcmd"].as_sequence().unwrap();
        assert_eq!(early.len(), 1);
        let early: Vec<&str> = strings(&early[0]);
        assert_eq!(
            early[..4],
            [
                "cloud-init-per",
                "instance",
                EARLY_BOOTSTRAP_UNIT,
                "systemd-run"
            ]
        );
        assert!(early.contains(&"--no-block"));
        assert!(early.contains(&"--property=After=cloud-init.service"));
        assert!(early.contains(&"--property=After=cloud-init-network.service"));
        let at = early.iter().position(|a| *a == "sh").unwrap();
        let late: Vec<&str> = strings(&doc["runcmd"][0]);
        assert_eq!(early[at..], late[..]);
        // Baked and package deliveries have nothing to queue early.
        let baked: Value =
            serde_norway::from_str(&render(&choices(Delivery::Baked)).unwrap()).unwrap();
        assert!(baked.get("bootcmd").is_none());
    }

    #[test]
    fn bad_choices_name_the_option() {
        let err = render(&choices(Delivery::Bootstrap {
            url: "ftp://x".into(),
            sha256: "00".repeat(32),
        }))
        .unwrap_err();
        assert!(err.to_string().starts_with("--binary-url:"), "{err}");
        let err = render(&choices(Delivery::Bootstrap {
            url: "https://x/y".into(),
            sha256: "zz".into(),
        }))
        .unwrap_err();
        assert!(err.to_string().starts_with("--binary-sha256:"), "{err}");
        let mut cloud = choices(Delivery::Baked);
        cloud.clouds_yaml = Some(("clouds: {a: {}}".into(), "b".into()));
        assert!(render(&cloud)
            .unwrap_err()
            .to_string()
            .starts_with("--cloud-name:"));
    }

    fn package(url: &str, format: PackageFormat) -> Delivery {
        Delivery::Package {
            url: url.into(),
            sha256: "cd".repeat(32),
            format,
        }
    }

    #[test]
    fn package_bootstrap_passes_every_value_as_an_argument() {
        let url = "https://example.org/exoagent_0.1.0-1_amd64.deb?x=$(reboot)'";
        let text = render(&choices(package(url, PackageFormat::Deb))).unwrap();
        assert!(text.starts_with("#cloud-config\n"));
        let doc: Value = serde_norway::from_str(&text).unwrap();
        let cmd: Vec<&str> = strings(&doc["runcmd"][0]);
        assert_eq!(cmd[..2], ["sh", "-c"]);
        assert_eq!(cmd[2], PACKAGE_BOOTSTRAP_SCRIPT);
        assert_eq!(
            cmd[3..],
            [
                "exoagent-bootstrap-package",
                url,
                "cd".repeat(32).as_str(),
                "deb",
                BOOTSTRAP_WORK_DIR
            ]
        );
        assert!(!cmd[2].contains("example.org"));
        // The drop-in and the rest are the same as for the other deliveries.
        assert_eq!(doc["write_files"][0]["path"], CONFIG_DROP_IN);
    }

    #[test]
    fn the_package_is_checked_before_any_package_tool_sees_it() {
        let script = PACKAGE_BOOTSTRAP_SCRIPT;
        let checked = script.find("sha256sum -c").unwrap();
        for tool in ["apt-get", "dnf", "rpm -U", "systemctl start exoagent"] {
            let at = script.find(tool).unwrap();
            assert!(checked < at, "{tool} before the checksum");
        }
        assert!(script.contains("|| fail bootstrap-checksum"));
        // Inside double quotes wherever used: no word splitting or globbing of outside values.
        for line in script.lines() {
            for var in ["$url", "$sum", "$pkg", "$format"] {
                for (at, _) in line.match_indices(var) {
                    let quotes = line[..at].matches('"').count();
                    assert!(quotes % 2 == 1, "{var} unquoted in: {line}");
                }
            }
        }
    }

    #[test]
    fn the_format_comes_from_the_url() {
        assert_eq!(
            PackageFormat::from_url("https://x/exoagent_0.1.0-1_amd64.deb"),
            Some(PackageFormat::Deb)
        );
        assert_eq!(
            PackageFormat::from_url("https://x/exoagent-0.1.0-1.x86_64.rpm?sig=1#f"),
            Some(PackageFormat::Rpm)
        );
        assert_eq!(PackageFormat::from_url("https://x/exoagent"), None);
        assert_eq!(PackageFormat::from_url("https://x/a.deb/b"), None);
    }

    #[test]
    fn bad_package_choices_name_the_package_options() {
        let err = render(&choices(package("ftp://x/a.deb", PackageFormat::Deb))).unwrap_err();
        assert!(err.to_string().starts_with("--package-url:"), "{err}");
        let err = render(&choices(Delivery::Package {
            url: "https://x/a.rpm".into(),
            sha256: "nothex".into(),
            format: PackageFormat::Rpm,
        }))
        .unwrap_err();
        assert!(err.to_string().starts_with("--package-sha256:"), "{err}");
    }

    #[test]
    fn a_clouds_yaml_is_written_root_only_and_referenced() {
        let mut with_cloud = choices(Delivery::Baked);
        with_cloud.clouds_yaml = Some((
            "clouds:\n  mine: {auth_type: password}\n".into(),
            "mine".into(),
        ));
        let doc: Value = serde_norway::from_str(&render(&with_cloud).unwrap()).unwrap();
        assert_eq!(doc["write_files"][1]["path"], CLOUDS_YAML);
        assert_eq!(doc["write_files"][1]["permissions"], "0600");
        let drop_in = doc["write_files"][0]["content"].as_str().unwrap();
        assert!(drop_in.contains("cloud_name = \"mine\""), "{drop_in}");
    }
}
