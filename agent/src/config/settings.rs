//! The validated desired state: typed settings whose fields already satisfy every invariant.
//! Only `config::load` builds these from files; everything else takes them as given. Each
//! section's type lives with the module that uses it; `[instance]` is the agent's own.

pub use crate::alerts::AlertSettings;
pub use crate::cloud::{CloudSettings, DEFAULT_METADATA_URL};
pub use crate::front::settings::{CertChoice, TlsSettings};
pub use crate::host::HostSettings;
pub use crate::idle::{IdleAction, IdleSettings};
pub use crate::platform::packages::PackageSettings;
pub use crate::report::console::ConsoleSettings;
pub use crate::services::desktop::{DesktopSettings, VncServerChoice};
pub use crate::services::guacamole::{GuacamoleSettings, GuacdSource};
pub use crate::services::jupyterlab::{JupyterLabSettings, PythonInstaller};
pub use crate::services::ServiceSettings;
pub use crate::supervise::SupervisePolicy;
pub use crate::volumes::VolumeSettings;

/// The complete, validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The instance user and its passphrase.
    pub instance: InstanceSettings,
    /// The services to set up, enabled ones only, in `ServiceKind::ALL` order.
    pub services: Vec<ServiceSettings>,
    /// Restart, crash-loop, probe and log policy shared by all services.
    pub supervise: SupervisePolicy,
    /// Console status and load lines.
    pub console: ConsoleSettings,
    /// Package-manager behaviour.
    pub packages: PackageSettings,
    /// How the instance talks to the cloud it runs in.
    pub cloud: CloudSettings,
    /// The upstream TLS front.
    pub tls: TlsSettings,
    /// Exosphere's instance-wide touches outside any service.
    pub host: HostSettings,
    /// Attached volumes.
    pub volumes: VolumeSettings,
    /// Memory and disk alerts.
    pub alerts: AlertSettings,
    /// Idle detection and its optional action.
    pub idle: IdleSettings,
}

/// `[instance]`: who the researcher logs in as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSettings {
    /// The login user (`exouser`).
    pub user: String,
    /// Create the user when missing (ignored in sandbox mode).
    pub create_user: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            instance: InstanceSettings {
                user: "exouser".to_owned(),
                create_user: true,
            },
            services: Vec::new(),
            supervise: SupervisePolicy::default(),
            console: ConsoleSettings::default(),
            packages: PackageSettings::default(),
            cloud: CloudSettings::default(),
            tls: TlsSettings::default(),
            host: HostSettings::default(),
            volumes: VolumeSettings::default(),
            alerts: AlertSettings::default(),
            idle: IdleSettings::default(),
        }
    }
}
