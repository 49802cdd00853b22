//! The validated desired state: typed settings whose fields already satisfy every invariant.
//! Only `config::load` builds these from files; everything else takes them as given.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::model::ServiceKind;

/// The complete, validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The instance user and its passphrase.
    pub instance: InstanceSettings,
    /// The services to set up, enabled ones only, in [`ServiceKind::ALL`] order.
    pub services: Vec<ServiceSettings>,
    /// Restart, crash-loop, probe and log policy shared by all services.
    pub supervise: SupervisePolicy,
    /// Console status and load lines.
    pub console: ConsoleSettings,
    /// Package-manager behaviour.
    pub packages: PackageSettings,
    /// How the instance talks to the cloud it runs in.
    pub cloud: CloudSettings,
}

/// The metadata service's address on every OpenStack cloud.
pub const DEFAULT_METADATA_URL: &str = "http://169.254.169.254";

/// `[cloud]`: the metadata service and what the agent publishes through it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudSettings {
    /// The metadata service base URL as configured; `None` when not set, which means
    /// [`DEFAULT_METADATA_URL`] on an instance and no metadata service in the sandbox.
    pub metadata_url: Option<String>,
    /// How long to keep trying to reach the metadata service at start-up.
    pub metadata_timeout: Duration,
    /// Publish the passphrase through the metadata service's password endpoint (once).
    pub publish_password: bool,
    /// The clouds.yaml with the credential for reporting to Nova; `None`: no Nova reporting.
    pub clouds_yaml: Option<PathBuf>,
    /// Which cloud in it.
    pub cloud_name: String,
}

impl Default for CloudSettings {
    fn default() -> Self {
        Self {
            metadata_url: None,
            metadata_timeout: Duration::from_secs(120),
            publish_password: true,
            clouds_yaml: None,
            cloud_name: "openstack".to_owned(),
        }
    }
}

/// `[instance]`: who the researcher logs in as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSettings {
    /// The login user (`exouser`).
    pub user: String,
    /// Create the user when missing (ignored in sandbox mode).
    pub create_user: bool,
}

/// One enabled service and its settings.
#[derive(Debug, Clone, PartialEq)]
pub enum ServiceSettings {
    /// `[services.jupyterlab]`.
    JupyterLab(JupyterLabSettings),
    /// `[services.desktop]`.
    Desktop(DesktopSettings),
    /// `[services.guacamole]`.
    Guacamole(GuacamoleSettings),
}

impl ServiceSettings {
    /// Which service these settings are for.
    pub fn kind(&self) -> ServiceKind {
        match self {
            Self::JupyterLab(_) => ServiceKind::JupyterLab,
            Self::Desktop(_) => ServiceKind::Desktop,
            Self::Guacamole(_) => ServiceKind::Guacamole,
        }
    }

    /// The TCP port the service answers on.
    pub fn port(&self) -> u16 {
        match self {
            Self::JupyterLab(s) => s.port,
            Self::Desktop(s) => s.port,
            Self::Guacamole(s) => s.port,
        }
    }
}

/// The desktop environment of the VNC desktop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DesktopEnvironment {
    /// Xfce: light, starts in seconds (the default).
    Xfce,
    /// GNOME (as Exosphere's desktop).
    Gnome,
}

/// Which VNC server runs the desktop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VncServerChoice {
    /// TurboVNC with VirtualGL when an NVIDIA GPU is present, TigerVNC otherwise.
    Auto,
    /// TigerVNC from the distribution.
    TigerVnc,
    /// TurboVNC (and VirtualGL) from their vendor repositories.
    TurboVnc,
}

/// `[services.desktop]`: a VNC desktop on display :1, on loopback (Guacamole reaches it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesktopSettings {
    /// RFB port (default 5901, display :1).
    pub port: u16,
    /// Xfce or GNOME.
    pub environment: DesktopEnvironment,
    /// Initial screen size; the browser resizes it.
    pub geometry: (u16, u16),
    /// Which VNC server.
    pub vnc_server: VncServerChoice,
    /// How long from launch to the first good probe.
    pub start_timeout: Duration,
}

impl Default for DesktopSettings {
    fn default() -> Self {
        Self {
            port: 5901,
            environment: DesktopEnvironment::Xfce,
            geometry: (1280, 800),
            vnc_server: VncServerChoice::Auto,
            start_timeout: Duration::from_secs(120),
        }
    }
}

/// Where guacd comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuacdSource {
    /// The distribution's package where one exists (Ubuntu universe, EPEL), the official
    /// container image otherwise.
    Auto,
    /// The distribution's `guacd` package, run by the web side as its child.
    Package,
    /// The official image, pinned by digest, run with podman on the host network.
    Container,
    /// Someone else runs guacd at `guacd_address`.
    External,
}

/// `[services.guacamole]`: guacd plus the web side (token API, client page, tunnel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuacamoleSettings {
    /// The web side's port (default 49528).
    pub port: u16,
    /// The web side's address (default `0.0.0.0`, so the UAP can reach it).
    pub bind: IpAddr,
    /// Where guacd comes from.
    pub guacd: GuacdSource,
    /// Where guacd listens (default `127.0.0.1:4822`).
    pub guacd_address: SocketAddr,
    /// Tokens expire after this long without use (at least 60 minutes).
    pub session_timeout: Duration,
    /// sshd's port for the `shell` connection and SFTP.
    pub ssh_port: u16,
    /// The desktop's RFB port when the desktop service is enabled: the `desktop` connection.
    pub desktop_port: Option<u16>,
    /// How long from launch to the first good probe.
    pub start_timeout: Duration,
}

impl Default for GuacamoleSettings {
    fn default() -> Self {
        Self {
            port: 49528,
            bind: IpAddr::from([0, 0, 0, 0]),
            guacd: GuacdSource::Auto,
            guacd_address: SocketAddr::from(([127, 0, 0, 1], 4822)),
            session_timeout: Duration::from_secs(3600),
            ssh_port: 22,
            desktop_port: None,
            start_timeout: Duration::from_secs(120),
        }
    }
}

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
        }
    }
}

/// `[supervise]`: the restart and probe policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisePolicy {
    /// First restart delay.
    pub backoff_initial: Duration,
    /// Restart delays double up to this cap.
    pub backoff_max: Duration,
    /// Consecutive failed runs (exits before `stable_after`) that end in `failed`.
    pub crash_loop_restarts: u32,
    /// A run that lasts this long resets the backoff and the crash-loop counter.
    pub stable_after: Duration,
    /// How often readiness is probed while a service is starting.
    pub readiness_interval: Duration,
    /// How often liveness is probed once ready (jittered by up to 10 %).
    pub liveness_interval: Duration,
    /// Consecutive liveness failures that turn `ready` into `degraded`.
    pub liveness_failures: u32,
    /// Size cap of each service log before it is rotated (one old copy kept).
    pub log_max_bytes: u64,
}

impl Default for SupervisePolicy {
    fn default() -> Self {
        Self {
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            crash_loop_restarts: 5,
            stable_after: Duration::from_secs(60),
            readiness_interval: Duration::from_millis(250),
            liveness_interval: Duration::from_secs(10),
            liveness_failures: 3,
            log_max_bytes: 10 * 1024 * 1024,
        }
    }
}

/// `[console]`: Exosphere status and load lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleSettings {
    /// Devices the lines are written to (ignored in sandbox mode, which writes to stdout).
    pub devices: Vec<PathBuf>,
    /// How often the latest status line is written again.
    pub status_interval: Duration,
    /// How often a load line is written.
    pub load_interval: Duration,
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        Self {
            devices: vec!["/dev/console".into(), "/dev/kmsg".into()],
            status_interval: Duration::from_secs(60),
            load_interval: Duration::from_secs(60),
        }
    }
}

/// `[packages]`: package-manager behaviour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageSettings {
    /// How long to wait for another process holding the package lock.
    pub lock_timeout: Duration,
    /// Attempts for a transaction that fails transiently (network, mirror sync).
    pub attempts: u32,
}

impl Default for PackageSettings {
    fn default() -> Self {
        Self {
            lock_timeout: Duration::from_secs(600),
            attempts: 3,
        }
    }
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
        }
    }
}
