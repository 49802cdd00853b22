//! Where exoagent keeps things: the fixed system layout of DESIGN §4.6, or everything under
//! one directory in sandbox mode.

use std::path::{Path, PathBuf};

use crate::model::ServiceKind;

/// Where packages and baked images put the exoagent binary (the unit's `ExecStart`).
pub const INSTALLED_EXE: &str = "/usr/bin/exoagent";

/// Every path the agent reads or writes. Built once, passed down; nothing else hard-codes a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// Image defaults: `/usr/lib/exoagent/config.d/*.toml`.
    pub vendor_config_dir: PathBuf,
    /// The main config file: `/etc/exoagent/config.toml`.
    pub config_file: PathBuf,
    /// Drop-ins (cloud-init `write_files`): `/etc/exoagent/config.d/*.toml`.
    pub config_dropin_dir: PathBuf,
    /// Exosphere's launch choices, written by its user-data template:
    /// `/etc/exoagent/exosphere-choices.json`.
    pub exosphere_choices_file: PathBuf,
    /// Durable state: `/var/lib/exoagent`.
    pub state_dir: PathBuf,
    /// Runtime files and the API socket: `/run/exoagent`.
    pub runtime_dir: PathBuf,
    /// Service logs: `/var/log/exoagent`.
    pub log_dir: PathBuf,
    /// Where service payloads are installed (virtual environments): `/opt/exoagent`.
    pub opt_dir: PathBuf,
    /// A mounted config drive, or a directory shaped like one.
    pub config_drive: PathBuf,
    /// The root of the filesystem that user and package changes apply to (`/`).
    pub system_root: PathBuf,
}

impl Paths {
    /// The layout on a real instance.
    pub fn system() -> Self {
        Self {
            vendor_config_dir: "/usr/lib/exoagent/config.d".into(),
            config_file: "/etc/exoagent/config.toml".into(),
            config_dropin_dir: "/etc/exoagent/config.d".into(),
            exosphere_choices_file: "/etc/exoagent/exosphere-choices.json".into(),
            state_dir: "/var/lib/exoagent".into(),
            runtime_dir: "/run/exoagent".into(),
            log_dir: "/var/log/exoagent".into(),
            opt_dir: "/opt/exoagent".into(),
            config_drive: "/run/exoagent/config-drive".into(),
            system_root: "/".into(),
        }
    }

    /// Everything under `root`, mirroring the system layout (`root/etc/exoagent/...`).
    pub fn sandbox(root: &Path) -> Self {
        Self {
            vendor_config_dir: root.join("usr/lib/exoagent/config.d"),
            config_file: root.join("etc/exoagent/config.toml"),
            config_dropin_dir: root.join("etc/exoagent/config.d"),
            exosphere_choices_file: root.join("etc/exoagent/exosphere-choices.json"),
            state_dir: root.join("var/lib/exoagent"),
            runtime_dir: root.join("run/exoagent"),
            log_dir: root.join("var/log/exoagent"),
            opt_dir: root.join("opt/exoagent"),
            config_drive: root.join("config-drive"),
            system_root: root.to_path_buf(),
        }
    }

    /// The mount points the volume watcher created: `/var/lib/exoagent/volumes.json`.
    pub fn volume_records(&self) -> PathBuf {
        self.state_dir.join("volumes.json")
    }

    /// The local status API socket.
    pub fn api_socket(&self) -> PathBuf {
        self.runtime_dir.join("exoagent.sock")
    }

    /// The root-only file holding the instance user's passphrase.
    pub fn passphrase_file(&self) -> PathBuf {
        self.state_dir.join("secrets/passphrase")
    }

    /// The token of Exosphere's notebook link to JupyterLab (0600).
    pub fn jupyterlab_link_token(&self) -> PathBuf {
        self.state_dir.join("secrets/jupyterlab-link-token")
    }

    /// Marker: the passphrase was set as the instance user's password (never again, so a
    /// researcher's own password change survives agent restarts).
    pub fn password_set_marker(&self) -> PathBuf {
        self.state_dir.join("password-set")
    }

    /// Marker: the passphrase was published to the metadata service (exactly once).
    pub fn password_published_marker(&self) -> PathBuf {
        self.state_dir.join("password-published")
    }

    /// The cloud-init instance whose deferred `write_files` entries exoagent wrote.
    pub fn deferred_write_files_marker(&self) -> PathBuf {
        self.state_dir.join("deferred-write-files")
    }

    /// Where the agent leaves notices for the services' pages to show (readable by them).
    pub fn notice_dir(&self) -> PathBuf {
        self.runtime_dir.join("notice")
    }

    /// Idleness as the Guacamole page shows it (`{"state","idle_since_ms","action_at_ms"}`).
    pub fn idle_notice_file(&self) -> PathBuf {
        self.notice_dir().join("idle.json")
    }

    /// The cloud's request last accepted (`exoAgentRequest`), applied at start.
    pub fn cloud_request_file(&self) -> PathBuf {
        self.state_dir.join("cloud-request.json")
    }

    /// The drop-in `exoagent enable` and `exoagent disable` write (named to sort after the
    /// operator's own drop-ins).
    pub fn enable_dropin(&self) -> PathBuf {
        self.config_dropin_dir.join("zz-exoagent-enable.toml")
    }

    /// The UUID of the instance the durable state belongs to.
    pub fn instance_id_file(&self) -> PathBuf {
        self.state_dir.join("instance-id")
    }

    /// The installed exoagent binary, as services on an instance or a baked image see it.
    pub fn installed_exe(&self) -> PathBuf {
        PathBuf::from(INSTALLED_EXE)
    }

    /// A service's current log file.
    pub fn service_log(&self, service: ServiceKind) -> PathBuf {
        self.log_dir.join(format!("{}.log", service.as_str()))
    }

    /// A service's supervision records (shim pid, exit record).
    pub fn service_run_dir(&self, service: ServiceKind) -> PathBuf {
        self.state_dir.join("run").join(service.as_str())
    }

    /// The TLS front's certificate, key and client CA (0700, owned by the instance user).
    pub fn tls_dir(&self) -> PathBuf {
        self.state_dir.join("tls")
    }

    /// The supervision records of the TLS front before a service.
    pub fn front_run_dir(&self, service: ServiceKind) -> PathBuf {
        self.state_dir
            .join("run")
            .join(format!("{}-front", service.as_str()))
    }

    /// The log of the TLS front before a service.
    pub fn front_log(&self, service: ServiceKind) -> PathBuf {
        self.log_dir.join(format!("{}-front.log", service.as_str()))
    }

    /// A service's durable state (rendered configuration, install markers).
    pub fn service_state_dir(&self, service: ServiceKind) -> PathBuf {
        self.state_dir.join("services").join(service.as_str())
    }
}

/// `dir` made absolute against the current directory (services run elsewhere).
pub fn absolute(dir: &std::path::Path) -> PathBuf {
    if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|cwd| cwd.join(dir))
            .unwrap_or_else(|_| dir.to_path_buf())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_keeps_everything_under_root() {
        let root = Path::new("/tmp/sb");
        let p = Paths::sandbox(root);
        for path in [
            &p.vendor_config_dir,
            &p.config_file,
            &p.config_dropin_dir,
            &p.exosphere_choices_file,
            &p.state_dir,
            &p.runtime_dir,
            &p.log_dir,
            &p.opt_dir,
            &p.config_drive,
        ] {
            assert!(path.starts_with(root), "{path:?}");
        }
        assert!(p.api_socket().starts_with(root));
        for marker in [
            p.password_set_marker(),
            p.password_published_marker(),
            p.instance_id_file(),
        ] {
            assert!(marker.starts_with(&p.state_dir), "{marker:?}");
        }
    }
}
