//! The agent's main job and its vocabulary: the mode, the options the binary passes, the error
//! every step can end in (with its stable reason and exit code); planning, provisioning and the
//! run itself live in the submodules.

use std::path::PathBuf;

use crate::config::ConfigErrors;
use crate::paths::Paths;
use crate::platform::os;
use crate::state::SetupStep;
use crate::supervise::ShimCommand;

mod plan;
mod provision;
pub mod reload;
mod run;

pub use plan::{plan, Plan};
pub use provision::CONFIG_DRIVE_PUBLISH_BUDGET;
pub(crate) use provision::{fetch_all, install_batch, invoking_account};
pub use run::run;

/// Exit status when the configuration is invalid (sysexits EX_CONFIG); the systemd unit does
/// not restart on it.
pub const EXIT_CONFIG: u8 = 78;
/// Exit status when system mode is started without root (EX_NOPERM).
pub const EXIT_NOPERM: u8 = 77;
/// Exit status for every other failure of `exoagent run`.
pub const EXIT_FAILURE: u8 = 1;

/// Where the agent runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// A real instance: root, the system layout, console devices, the instance user.
    System,
    /// Everything under one directory, as the invoking user, on loopback, lines to stdout.
    Sandbox,
}

/// What the binary hands to [`run`].
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// System or sandbox.
    pub mode: Mode,
    /// The layout.
    pub paths: Paths,
    /// The executable that runs `shim` (normally this very binary).
    pub shim: ShimCommand,
    /// Notified on SIGHUP: read the configuration again.
    pub hangup: std::sync::Arc<tokio::sync::Notify>,
}

/// Why the agent could not do its job. Each variant has a stable [`AgentError::reason`].
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration is invalid; nothing was changed.
    #[error("invalid configuration:\n{0}")]
    Config(#[from] ConfigErrors),
    /// The OS is not supported.
    #[error(transparent)]
    Os(#[from] os::OsError),
    /// The instance identity could not be read.
    #[error(transparent)]
    Identity(#[from] crate::cloud::IdentityError),
    /// System mode needs root.
    #[error("exoagent run needs root on a real instance; use 'exoagent sandbox' for an unprivileged run")]
    NotRoot,
    /// The local API could not be started.
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
    /// The account to run services as could not be determined.
    #[error("cannot determine the account to run services as: {0}")]
    Account(String),
    /// A state directory could not be prepared.
    #[error("failed to prepare '{path}': {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

impl AgentError {
    /// Short stable reason for reports.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Config(e) => e.reason(),
            Self::Os(e) => e.reason(),
            Self::Identity(e) => e.reason(),
            Self::NotRoot => "not-root",
            Self::Api(e) => e.reason(),
            Self::Account(_) => "account-unknown",
            Self::Io { source, .. } if crate::fsutil::is_disk_full(source) => "disk-full",
            Self::Io { .. } => "state-dir-failed",
        }
    }

    /// The step reported as failed when the agent stops before setup starts.
    pub fn failed_step(&self) -> SetupStep {
        match self {
            Self::Config(_) => SetupStep::Config,
            Self::Os(_) => SetupStep::Os,
            Self::Identity(_) => SetupStep::Identity,
            Self::NotRoot | Self::Api(_) | Self::Account(_) | Self::Io { .. } => SetupStep::Agent,
        }
    }

    /// The exit status of `exoagent run` / `sandbox` (docs/contracts.md). No catch-all arm: a
    /// new variant needs a deliberate code.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_) => EXIT_CONFIG,
            Self::NotRoot => EXIT_NOPERM,
            Self::Os(_) | Self::Identity(_) | Self::Api(_) | Self::Account(_) | Self::Io { .. } => {
                EXIT_FAILURE
            }
        }
    }
}

/// Sandbox layouts for the unit tests of plan, provision, run and bake.
#[cfg(test)]
pub(crate) mod fixtures {
    use std::fs;
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;
    use std::time::Duration;

    use crate::paths::Paths;
    use crate::platform::os::PackageManager;
    use crate::platform::packages::{PackageInstaller, PackageSettings, PackageTools};

    /// Debian 12, as os-release describes it.
    pub(crate) fn debian12() -> crate::platform::os::Os {
        crate::platform::os::Os {
            id: "debian".into(),
            version_id: "12".into(),
            pretty_name: "Debian 12".into(),
            family: crate::platform::os::Family::Debian,
            supported: true,
        }
    }

    /// The services' context in a sandbox under `root`, as the invoking user.
    pub(crate) fn sandbox_context(root: &Path) -> crate::services::ServiceContext {
        let paths = Paths::sandbox(root);
        crate::services::ServiceContext {
            account: super::invoking_account(&paths).unwrap(),
            exe: paths.installed_exe(),
            paths,
        }
    }

    /// An HTTP server on loopback answering every request with `body`.
    pub(crate) fn serve_every_request(body: &'static [u8]) -> std::net::SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf);
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(body);
            }
        });
        addr
    }

    /// The real package layer with `dpkg-query` and `apt-get` replaced by scripts that record
    /// every call in `dir/calls`. `dpkg-query` answers from `dir/installed` (lines `name
    /// version`; nothing is installed while it is absent, so an install would run).
    pub(crate) fn recording_installer(dir: &Path) -> PackageInstaller {
        let calls = dir.join("calls");
        let script = |name: &str, body: &str| {
            let path = dir.join(name);
            fs::write(
                &path,
                format!(
                    "#!/bin/sh\necho \"{name} $*\" >> '{}'\n{body}\n",
                    calls.display()
                ),
            )
            .unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
            path
        };
        let lists = dir.join("lists");
        fs::create_dir_all(&lists).unwrap();
        fs::write(lists.join("fresh_Packages"), "").unwrap();
        PackageInstaller::with_tools(
            PackageManager::Apt,
            &PackageSettings::default(),
            PackageTools {
                dpkg_query: script(
                    "dpkg-query",
                    &crate::platform::packages::dpkg_query_double(&dir.join("installed")),
                ),
                // The double answers, not this machine's database.
                dpkg_admin: None,
                apt_get: script("apt-get", "exit 0"),
                apt_lists: lists,
                cloud_init_status: None,
                ..PackageTools::default()
            },
            Duration::from_millis(10),
        )
    }

    /// The fixture instance's UUID (`tests/fixtures/config-drive`).
    pub(super) const FIXTURE_UUID: &str = "6d8c2f0e-3b1a-4c55-9f0e-2a7d1c9b4e11";

    /// An empty sandbox under a fresh temporary directory.
    pub(super) fn sandbox() -> (tempfile::TempDir, Paths) {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::sandbox(dir.path());
        (dir, paths)
    }

    /// Write the main config file.
    pub(super) fn write_config(paths: &Paths, text: &str) {
        fs::create_dir_all(paths.config_file.parent().unwrap()).unwrap();
        fs::write(&paths.config_file, text).unwrap();
    }

    /// Lay out a config drive as on an instance: `openstack/latest/meta_data.json`.
    pub(super) fn write_config_drive(paths: &Paths, meta_data: &str) {
        let latest = paths.config_drive.join("openstack/latest");
        fs::create_dir_all(&latest).unwrap();
        fs::write(latest.join("meta_data.json"), meta_data).unwrap();
    }

    /// The repository's fixture `meta_data.json`.
    pub(super) fn fixture_meta_data() -> &'static str {
        crate::cli::sandbox::SANDBOX_META_DATA
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_match_the_contract() {
        let config = ConfigErrors {
            errors: Vec::new(),
            omitted: 0,
        };
        assert_eq!(AgentError::Config(config).exit_code(), 78);
        assert_eq!(AgentError::NotRoot.exit_code(), 77);
        assert_eq!(AgentError::Account("x".into()).exit_code(), 1);
        let io = AgentError::Io {
            path: "/x".into(),
            source: std::io::Error::other("boom"),
        };
        assert_eq!(io.exit_code(), 1);
        assert_eq!(io.failed_step(), SetupStep::Agent);
        assert_eq!(AgentError::NotRoot.failed_step().as_str(), "agent");
    }
}
