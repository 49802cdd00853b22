//! The services exoagent can manage: a closed set of kinds, each behind the same small surface
//! (system packages, install, configure, run spec, readiness probe).

pub mod command;
pub mod desktop;
pub mod guacamole;
pub mod jupyterlab;

use std::path::PathBuf;
use std::time::Duration;

use crate::config::ServiceSettings;
pub use crate::model::ServiceKind;
use crate::paths::Paths;
use crate::platform::os::Os;
use crate::platform::passphrase::Passphrase;
use crate::supervise::{Probe, RunAs, RunSpec};

pub use crate::platform::users::Account;

/// What every service step needs to know about where and as whom it runs.
#[derive(Debug, Clone)]
pub struct ServiceContext {
    /// The layout.
    pub paths: Paths,
    /// The account services run as.
    pub account: Account,
    /// The exoagent executable, for services that run one of its subcommands (the desktop
    /// pair, the Guacamole web side).
    pub exe: PathBuf,
}

impl Account {
    /// Whether the agent must switch to this account to run services.
    fn needs_switch(&self) -> bool {
        nix::unistd::geteuid().as_raw() != self.uid
    }
}

impl ServiceContext {
    /// The account switch the shim performs, if any.
    pub fn run_as(&self) -> Option<RunAs> {
        self.account.needs_switch().then_some(RunAs {
            uid: self.account.uid,
            gid: self.account.gid,
        })
    }

    /// A login-like environment for the service account with `path` as `PATH` (services get
    /// nothing else from the agent's environment).
    pub fn login_env(&self, path: &str) -> Vec<(String, String)> {
        let account = &self.account;
        vec![
            ("HOME".into(), account.home.to_string_lossy().into_owned()),
            ("USER".into(), account.name.clone()),
            ("LOGNAME".into(), account.name.clone()),
            ("SHELL".into(), "/bin/bash".into()),
            ("PATH".into(), path.to_owned()),
            ("LANG".into(), "C.UTF-8".into()),
        ]
    }

    /// Create the account's home (the services' working directory) when it is missing.
    pub fn ensure_home(&self, service: ServiceKind) -> Result<(), ServiceError> {
        let home = &self.account.home;
        if home.exists() {
            return Ok(());
        }
        crate::fsutil::ensure_dir(home, 0o750).map_err(io_error(service, "create", home))
    }
}

/// Turns an I/O error of `service` doing `action` on `path` into a [`ServiceError`].
pub fn io_error(
    service: ServiceKind,
    action: &'static str,
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> ServiceError {
    let path = path.to_path_buf();
    move |source| ServiceError::Io {
        service,
        action,
        path,
        source,
    }
}

/// A service step that failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Installing the service's payload failed.
    #[error("{service}: install failed: {detail}")]
    Install {
        /// Which service.
        service: ServiceKind,
        /// The command and the tail of its output.
        detail: String,
    },
    /// Writing the service's configuration failed.
    #[error("{service}: configuration failed: {detail}")]
    Configure {
        /// Which service.
        service: ServiceKind,
        /// What went wrong.
        detail: String,
    },
    /// A file or directory could not be written.
    #[error("{service}: failed to {action} '{path}': {source}")]
    Io {
        /// Which service.
        service: ServiceKind,
        /// What was attempted.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

impl ServiceError {
    /// Short stable reason for reports.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Install { .. } => "service-install-failed",
            Self::Configure { .. } | Self::Io { .. } => "service-configure-failed",
        }
    }
}

/// What each service implements: the small surface the agent drives. [`Service`] is the
/// closed set of implementations and dispatches to them.
pub trait ServiceImpl {
    /// System packages to install in the one batched transaction.
    fn system_packages(&self, os: &Os) -> Vec<String>;
    /// Human-readable plan steps for `exoagent validate`.
    fn plan(&self, ctx: &ServiceContext) -> Vec<String>;
    /// Install the service's payload (idempotent).
    fn install(
        &self,
        ctx: &ServiceContext,
    ) -> impl std::future::Future<Output = Result<(), ServiceError>> + Send;
    /// Write its configuration (idempotent).
    fn configure(
        &self,
        ctx: &ServiceContext,
        passphrase: &Passphrase,
    ) -> impl std::future::Future<Output = Result<(), ServiceError>> + Send;
    /// How the supervisor runs it.
    fn run_spec(&self, ctx: &ServiceContext) -> RunSpec;
    /// How to tell that it is ready (and still alive).
    fn probe(&self) -> Probe;
    /// How long it may take from launch to the first good probe.
    fn start_timeout(&self) -> Duration;
    /// Its port.
    fn port(&self) -> u16;
    /// Where a person on the instance reaches it.
    fn url(&self) -> String;
}

/// One configured service, dispatching to its implementation.
#[derive(Debug, Clone)]
pub enum Service {
    /// JupyterLab.
    JupyterLab(jupyterlab::JupyterLab),
    /// The VNC desktop.
    Desktop(desktop::Desktop),
    /// guacd and the web side.
    Guacamole(guacamole::Guacamole),
}

impl Service {
    /// The implementation for validated settings on `os`, whose filesystem is at
    /// `system_root` (where guacd and the VNC server come from is decided here, once).
    pub fn from_settings(
        settings: &ServiceSettings,
        os: &Os,
        system_root: &std::path::Path,
    ) -> Self {
        match settings {
            ServiceSettings::JupyterLab(s) => {
                Self::JupyterLab(jupyterlab::JupyterLab::new(s.clone()))
            }
            ServiceSettings::Desktop(s) => {
                Self::Desktop(desktop::Desktop::new(s.clone(), os, system_root))
            }
            ServiceSettings::Guacamole(s) => {
                Self::Guacamole(guacamole::Guacamole::new(s.clone(), os))
            }
        }
    }

    /// Which service.
    pub fn kind(&self) -> ServiceKind {
        match self {
            Self::JupyterLab(_) => ServiceKind::JupyterLab,
            Self::Desktop(_) => ServiceKind::Desktop,
            Self::Guacamole(_) => ServiceKind::Guacamole,
        }
    }

    /// System packages to install in the one batched transaction.
    pub fn system_packages(&self, os: &Os) -> Vec<String> {
        match self {
            Self::JupyterLab(s) => s.system_packages(os),
            Self::Desktop(s) => s.system_packages(os),
            Self::Guacamole(s) => s.system_packages(os),
        }
    }

    /// Plan lines for `exoagent validate`.
    pub fn plan(&self, ctx: &ServiceContext) -> Vec<String> {
        match self {
            Self::JupyterLab(s) => s.plan(ctx),
            Self::Desktop(s) => s.plan(ctx),
            Self::Guacamole(s) => s.plan(ctx),
        }
    }

    /// Install the service's payload (idempotent).
    pub async fn install(&self, ctx: &ServiceContext) -> Result<(), ServiceError> {
        match self {
            Self::JupyterLab(s) => s.install(ctx).await,
            Self::Desktop(s) => s.install(ctx).await,
            Self::Guacamole(s) => s.install(ctx).await,
        }
    }

    /// Write its configuration (idempotent).
    pub async fn configure(
        &self,
        ctx: &ServiceContext,
        passphrase: &Passphrase,
    ) -> Result<(), ServiceError> {
        match self {
            Self::JupyterLab(s) => s.configure(ctx, passphrase).await,
            Self::Desktop(s) => s.configure(ctx, passphrase).await,
            Self::Guacamole(s) => s.configure(ctx, passphrase).await,
        }
    }

    /// How to run it.
    pub fn run_spec(&self, ctx: &ServiceContext) -> RunSpec {
        match self {
            Self::JupyterLab(s) => s.run_spec(ctx),
            Self::Desktop(s) => s.run_spec(ctx),
            Self::Guacamole(s) => s.run_spec(ctx),
        }
    }

    /// How to tell that it is ready.
    pub fn probe(&self) -> Probe {
        match self {
            Self::JupyterLab(s) => s.probe(),
            Self::Desktop(s) => s.probe(),
            Self::Guacamole(s) => s.probe(),
        }
    }

    /// How long it may take to become ready after launch.
    pub fn start_timeout(&self) -> Duration {
        match self {
            Self::JupyterLab(s) => s.start_timeout(),
            Self::Desktop(s) => s.start_timeout(),
            Self::Guacamole(s) => s.start_timeout(),
        }
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        match self {
            Self::JupyterLab(s) => s.port(),
            Self::Desktop(s) => s.port(),
            Self::Guacamole(s) => s.port(),
        }
    }

    /// Where a person on the instance reaches it.
    pub fn url(&self) -> String {
        match self {
            Self::JupyterLab(s) => s.url(),
            Self::Desktop(s) => s.url(),
            Self::Guacamole(s) => s.url(),
        }
    }
}
