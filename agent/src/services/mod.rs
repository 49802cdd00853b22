//! The services exoagent can manage: one folder each, registered once in [`services!`] below,
//! each behind the same small surface ([`ServiceImpl`]: its settings and configuration keys,
//! system packages, install, configure, run spec, readiness probe).
//!
//! Adding a service: see "Adding a service" in `docs/architecture.md`.

pub mod command;

use std::path::PathBuf;
use std::time::Duration;

use crate::front::settings::TlsSettings;
pub use crate::model::{Endpoint, ServiceKind};
use crate::paths::Paths;
use crate::platform::os::Os;
use crate::platform::packages::LocalPackage;
use crate::platform::passphrase::Passphrase;
use crate::schema::{Checker, Field, Key, Located, Origin, Walker};
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
    /// A step refused to go on, with its own stable reason (a missing pin, a wrong checksum).
    #[error("{service}: {detail}")]
    Refused {
        /// Which service.
        service: ServiceKind,
        /// The stable reason.
        reason: &'static str,
        /// What was refused and why.
        detail: String,
    },
}

impl ServiceError {
    /// Short stable reason for reports.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Io { source, .. } if crate::fsutil::is_disk_full(source) => DISK_FULL,
            // Installers (pip, apt) report a full disk only in their output.
            Self::Install { detail, .. } | Self::Configure { detail, .. }
                if mentions_disk_full(detail) =>
            {
                DISK_FULL
            }
            Self::Refused { reason, .. } => reason,
            Self::Install { .. } => "service-install-failed",
            Self::Configure { .. } | Self::Io { .. } => "service-configure-failed",
        }
    }
}

/// The reason of every step that failed because the filesystem or a quota is full.
pub const DISK_FULL: &str = "disk-full";

/// Whether a command's output says it ran out of space (strerror of ENOSPC and EDQUOT).
fn mentions_disk_full(text: &str) -> bool {
    text.contains("No space left on device") || text.contains("Disk quota exceeded")
}

/// Where a service is planned: the detected OS and the root of the filesystem it changes
/// (where guacd and the VNC server come from is decided from these, once).
#[derive(Debug, Clone, Copy)]
pub struct Host<'a> {
    /// The detected OS.
    pub os: &'a Os,
    /// The root of the machine's filesystem (`/`; a temporary root in tests).
    pub system_root: &'a std::path::Path,
    /// Whether web services sit behind the TLS front.
    pub tls: &'a TlsSettings,
}

impl Host<'_> {
    /// Where a web service configured for `public` listens and is reached: behind the TLS
    /// front when `[tls]` enables it (the service then listens on loopback).
    pub fn web_endpoint(&self, public: std::net::SocketAddr) -> Endpoint {
        self.tls.endpoint(public)
    }
}

/// A local TCP port a service occupies besides its own `port` (Guacamole's guacd), for the
/// check that no two uses share one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OccupiedPort {
    /// The key that sets it, within the service's table (`guacd_address`).
    pub key: &'static str,
    /// The port.
    pub port: u16,
    /// Where a file set it; `None` for a default (charged to the line enabling the service).
    pub origin: Option<Origin>,
}

/// How a person's use of a service shows, for idle detection (`idle`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActivitySign {
    /// An established TCP connection on this local port (guacd's: an open Guacamole tunnel;
    /// the VNC server's: a connected viewer).
    Connection(u16),
    /// A process with this name (`/proc/<pid>/comm`) runs: RStudio Server's per-session
    /// `rsession`, which exits when its session is suspended.
    Process(&'static str),
    /// JupyterLab's own account: `last_activity` in `{base_url}api/status` and busy kernels in
    /// `{base_url}api/kernels`, at `addr`.
    JupyterLab {
        /// Where it answers (its probe's address).
        addr: std::net::SocketAddr,
        /// Its base URL (ends with `/`).
        base_url: String,
    },
}

/// What each service implements: its configuration section and the small surface the agent
/// drives. [`Service`] is the closed set of implementations and dispatches to them.
pub trait ServiceImpl: Sized {
    /// Which service this is.
    const KIND: ServiceKind;
    /// Whether it serves HTTP on its port (then it can sit behind the TLS front, and must use
    /// [`Host::web_endpoint`] for its endpoint).
    const WEB: bool = false;
    /// Its validated settings.
    type Settings: Clone + std::fmt::Debug + PartialEq;
    /// What the configuration files say about it, beyond `enabled` and `port`.
    type Section: Default + Clone + std::fmt::Debug + PartialEq + 'static;
    /// The keys of its `[services.<name>]` table besides `enabled` and `port`.
    const KEYS: &'static [Key<Self::Section>];
    /// Its settings from the merged section on `port`; problems go to `check`.
    fn settings(
        section: &Self::Section,
        port: Located<u16>,
        check: &mut Checker<'_>,
    ) -> Self::Settings;
    /// Local ports it occupies besides its own `port`, as the merged section gives them.
    fn occupied_ports(_section: &Self::Section) -> Vec<OccupiedPort> {
        Vec::new()
    }
    /// Adjust its settings to the other enabled services (Guacamole offers the desktop).
    fn link(_settings: &mut Self::Settings, _enabled: &[ServiceSettings]) {}
    /// The port its settings give it.
    fn settings_port(settings: &Self::Settings) -> u16;
    /// The service for `settings`, planned on `host`.
    fn planned(settings: Self::Settings, host: Host<'_>) -> Self;

    /// System packages to install in the one batched transaction.
    fn system_packages(&self, os: &Os) -> Vec<String>;
    /// Human-readable plan steps for `exoagent validate`.
    fn plan(&self, ctx: &ServiceContext) -> Vec<String>;
    /// The package files [`Self::fetch`] offers to the batched transaction once verified, for
    /// the plan. The default offers none.
    fn batch_files(&self, _ctx: &ServiceContext) -> Vec<LocalPackage> {
        Vec::new()
    }
    /// Download and verify what the service installs, before the batched package transaction
    /// runs, so that a bad download (a wrong checksum or signature) stops the service before
    /// anything of it is on the machine. The verified package files it returns go into that
    /// transaction beside the system packages (only after this succeeded: a refused service
    /// offers nothing, and its system packages stay out too). Idempotent; the default fetches
    /// nothing.
    fn fetch(
        &self,
        _ctx: &ServiceContext,
    ) -> impl std::future::Future<Output = Result<Vec<LocalPackage>, ServiceError>> + Send {
        std::future::ready(Ok(Vec::new()))
    }
    /// Begin, in the background, what [`Self::configure`] needs from this machine and that
    /// depends on neither the batch nor the passphrase: called as soon as the account is known,
    /// so the work is done (or under way) when `configure` asks for it. The default begins
    /// nothing.
    fn configure_early(&self, _ctx: &ServiceContext) {}
    /// Install the service's payload after the batch (idempotent; it may rely on [`Self::fetch`]
    /// having run, and runs it again when it must).
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
    /// Where it listens and where it is reached.
    fn endpoint(&self) -> Endpoint;
    /// Where a person on the instance reaches it.
    fn url(&self) -> String;
    /// How someone using it shows (idle detection); the default: no sign of its own.
    fn activity(&self) -> Vec<ActivitySign> {
        Vec::new()
    }
}

/// The closed set of services: one line per service. Generates [`ServiceSettings`],
/// [`ServiceSection`] and [`Service`], each an enum with a variant per service, and their
/// dispatch.
macro_rules! services {
    ($($variant:ident => $module:ident :: $service:ident),* $(,)?) => {
        $(pub mod $module;)*

        /// One enabled service and its settings.
        #[derive(Debug, Clone, PartialEq)]
        pub enum ServiceSettings {
            $(
                #[doc = concat!("`[services.", stringify!($module), "]`.")]
                $variant(<$module::$service as ServiceImpl>::Settings),
            )*
        }

        /// What the configuration files say about one implemented service's own keys.
        #[derive(Debug, Clone, PartialEq)]
        pub enum ServiceSection {
            $(
                #[doc = concat!("`[services.", stringify!($module), "]`.")]
                $variant(<$module::$service as ServiceImpl>::Section),
            )*
        }

        /// One configured service, dispatching to its implementation.
        #[derive(Debug, Clone)]
        pub enum Service {
            $(
                #[doc = concat!("`", stringify!($module), "`.")]
                $variant($module::$service),
            )*
        }

        /// Whether this version of exoagent can install and run `kind`.
        pub fn implemented(kind: ServiceKind) -> bool {
            $(kind == <$module::$service as ServiceImpl>::KIND)||*
        }

        /// Whether `kind` serves HTTP on its port (and so can sit behind the TLS front).
        pub fn serves_web(kind: ServiceKind) -> bool {
            $((kind == <$module::$service as ServiceImpl>::KIND && <$module::$service as ServiceImpl>::WEB))||*
        }

        impl ServiceSettings {
            /// Which service these settings are for.
            pub fn kind(&self) -> ServiceKind {
                match self {
                    $(Self::$variant(_) => <$module::$service as ServiceImpl>::KIND,)*
                }
            }

            /// The TCP port the service answers on.
            pub fn port(&self) -> u16 {
                match self {
                    $(Self::$variant(s) => <$module::$service as ServiceImpl>::settings_port(s),)*
                }
            }

            /// Adjust every service's settings to the others (after all are built).
            pub fn link_all(enabled: &mut [ServiceSettings]) {
                for i in 0..enabled.len() {
                    let others = enabled.to_vec();
                    match &mut enabled[i] {
                        $(Self::$variant(s) => <$module::$service as ServiceImpl>::link(s, &others),)*
                    }
                }
            }
        }

        impl ServiceSection {
            /// An empty section for `kind`, or `None` when it is not implemented.
            pub fn new(kind: ServiceKind) -> Option<Self> {
                $(
                    if kind == <$module::$service as ServiceImpl>::KIND {
                        return Some(Self::$variant(Default::default()));
                    }
                )*
                None
            }

            /// The names of its own keys.
            pub fn key_names(&self) -> Vec<&'static str> {
                match self {
                    $(Self::$variant(_) => <$module::$service as ServiceImpl>::KEYS.iter().map(|k| k.name).collect(),)*
                }
            }

            /// Read `field` (one of [`Self::key_names`]) into the section.
            pub fn read(&mut self, name: &str, walker: &mut Walker<'_>, field: &Field<'_>) {
                match self {
                    $(Self::$variant(section) => {
                        if let Some(key) = <$module::$service as ServiceImpl>::KEYS.iter().find(|k| k.name == name) {
                            (key.read)(walker, field, section);
                        }
                    })*
                }
            }

            /// Local ports the service occupies besides its own `port`.
            pub fn occupied_ports(&self) -> Vec<OccupiedPort> {
                match self {
                    $(Self::$variant(section) => <$module::$service as ServiceImpl>::occupied_ports(section),)*
                }
            }

            /// The service's settings on `port`.
            pub fn settings(&self, port: Located<u16>, check: &mut Checker<'_>) -> ServiceSettings {
                match self {
                    $(Self::$variant(section) => ServiceSettings::$variant(
                        <$module::$service as ServiceImpl>::settings(section, port, check),
                    ),)*
                }
            }
        }

        impl Service {
            /// The implementation for validated settings on `os`, whose filesystem is at
            /// `system_root` (where guacd and the VNC server come from is decided here, once).
            pub fn from_settings(
                settings: &ServiceSettings,
                os: &Os,
                system_root: &std::path::Path,
                tls: &TlsSettings,
            ) -> Self {
                let host = Host { os, system_root, tls };
                match settings {
                    $(ServiceSettings::$variant(s) => Self::$variant(
                        <$module::$service as ServiceImpl>::planned(s.clone(), host),
                    ),)*
                }
            }

            /// Which service.
            pub fn kind(&self) -> ServiceKind {
                match self {
                    $(Self::$variant(_) => <$module::$service as ServiceImpl>::KIND,)*
                }
            }

            /// System packages to install in the one batched transaction.
            pub fn system_packages(&self, os: &Os) -> Vec<String> {
                match self {
                    $(Self::$variant(s) => s.system_packages(os),)*
                }
            }

            /// Plan lines for `exoagent validate`.
            pub fn plan(&self, ctx: &ServiceContext) -> Vec<String> {
                match self {
                    $(Self::$variant(s) => s.plan(ctx),)*
                }
            }

            /// The package files its fetch offers to the batch once verified (for the plan).
            pub fn batch_files(&self, ctx: &ServiceContext) -> Vec<LocalPackage> {
                match self {
                    $(Self::$variant(s) => s.batch_files(ctx),)*
                }
            }

            /// Download and verify its payload before the batched transaction (idempotent); the
            /// verified package files it offers to the transaction.
            pub async fn fetch(&self, ctx: &ServiceContext) -> Result<Vec<LocalPackage>, ServiceError> {
                match self {
                    $(Self::$variant(s) => s.fetch(ctx).await,)*
                }
            }

            /// Begin what its configuration needs early, in the background.
            pub fn configure_early(&self, ctx: &ServiceContext) {
                match self {
                    $(Self::$variant(s) => s.configure_early(ctx),)*
                }
            }

            /// Install the service's payload (idempotent).
            pub async fn install(&self, ctx: &ServiceContext) -> Result<(), ServiceError> {
                match self {
                    $(Self::$variant(s) => s.install(ctx).await,)*
                }
            }

            /// Write its configuration (idempotent).
            pub async fn configure(
                &self,
                ctx: &ServiceContext,
                passphrase: &Passphrase,
            ) -> Result<(), ServiceError> {
                match self {
                    $(Self::$variant(s) => s.configure(ctx, passphrase).await,)*
                }
            }

            /// How to run it.
            pub fn run_spec(&self, ctx: &ServiceContext) -> RunSpec {
                match self {
                    $(Self::$variant(s) => s.run_spec(ctx),)*
                }
            }

            /// How to tell that it is ready.
            pub fn probe(&self) -> Probe {
                match self {
                    $(Self::$variant(s) => s.probe(),)*
                }
            }

            /// How long it may take to become ready after launch.
            pub fn start_timeout(&self) -> Duration {
                match self {
                    $(Self::$variant(s) => s.start_timeout(),)*
                }
            }

            /// Whether it serves HTTP (and so can sit behind the TLS front).
            pub fn serves_web(&self) -> bool {
                serves_web(self.kind())
            }

            /// Where it listens and where it is reached.
            pub fn endpoint(&self) -> Endpoint {
                match self {
                    $(Self::$variant(s) => s.endpoint(),)*
                }
            }

            /// Its public port (the one reported and reached from outside).
            pub fn port(&self) -> u16 {
                self.endpoint().public_port
            }

            /// Where a person on the instance reaches it.
            pub fn url(&self) -> String {
                match self {
                    $(Self::$variant(s) => s.url(),)*
                }
            }

            /// How someone using it shows (idle detection).
            pub fn activity(&self) -> Vec<ActivitySign> {
                match self {
                    $(Self::$variant(s) => s.activity(),)*
                }
            }
        }
    };
}

services! {
    JupyterLab => jupyterlab::JupyterLab,
    Desktop => desktop::Desktop,
    Guacamole => guacamole::Guacamole,
    RStudio => rstudio::RStudio,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_disk_full_in_every_step() {
        let kind = ServiceKind::JupyterLab;
        let mut full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let source = std::io::Write::write_all(&mut full, b"x").unwrap_err();
        let error = io_error(kind, "write", std::path::Path::new("/etc/x.json"))(source);
        assert_eq!(error.reason(), DISK_FULL);
        assert!(error.to_string().contains("/etc/x.json"), "{error}");
        let other = io_error(kind, "write", std::path::Path::new("/x"))(
            std::io::Error::from_raw_os_error(libc::EACCES),
        );
        assert_eq!(other.reason(), "service-configure-failed");
        let pip = ServiceError::Install {
            service: kind,
            detail: "pip install: OSError: [Errno 28] No space left on device".into(),
        };
        assert_eq!(pip.reason(), DISK_FULL);
        let plain = ServiceError::Install {
            service: kind,
            detail: "pip install: exit status 1".into(),
        };
        assert_eq!(plain.reason(), "service-install-failed");
    }

    #[test]
    fn every_implemented_kind_has_a_section_and_the_others_none() {
        for kind in ServiceKind::ALL {
            assert_eq!(
                ServiceSection::new(kind).is_some(),
                implemented(kind),
                "{kind}"
            );
        }
        assert!(implemented(ServiceKind::JupyterLab));
    }

    #[test]
    fn the_web_services_are_the_ones_a_front_can_sit_before() {
        let web: Vec<ServiceKind> = ServiceKind::ALL
            .into_iter()
            .filter(|k| serves_web(*k))
            .collect();
        assert_eq!(
            web,
            vec![
                ServiceKind::JupyterLab,
                ServiceKind::RStudio,
                ServiceKind::Guacamole
            ]
        );
    }

    #[test]
    fn own_keys_never_shadow_enabled_or_port() {
        for kind in ServiceKind::ALL {
            if let Some(section) = ServiceSection::new(kind) {
                let names = section.key_names();
                assert!(
                    !names.contains(&"enabled") && !names.contains(&"port"),
                    "{kind}"
                );
            }
        }
    }
}
