//! The graphical desktop: a VNC server on loopback (display `:N` for port `5900+N`) with an Xfce
//! (or GNOME) session as the instance user, run as one supervised pair by
//! `exoagent desktop-session`. TigerVNC from the distribution; TurboVNC and VirtualGL (EGL back
//! end) from their vendor repositories when an NVIDIA GPU is present. Ready when the RFB banner
//! offers VNC authentication.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{io_error, Endpoint, Host, ServiceContext, ServiceError, ServiceImpl};
use crate::schema::{Checker, Key, Located};
use session::DesktopEnvironment;
pub use settings::{DesktopSettings, VncServerChoice};
use crate::platform::gpu;

pub mod cli;
pub mod session;
pub mod settings;
pub mod vendor;
pub mod vnc;

use crate::fsutil;
use crate::model::ServiceKind;
use crate::platform::os::{Family, Os};
use crate::platform::passphrase::Passphrase;
use crate::services::command::run_logged;
use crate::supervise::{Probe, RunSpec};
use vendor::Step;

/// RFB security type 2: VNC authentication (the passphrase's first 8 characters).
const VNC_AUTH: u8 = 2;

/// Polkit rule giving the instance user every action without a prompt, as Exosphere's desktop
/// does (the user has passwordless sudo already; prompts only get in the way on a desktop).
const POLKIT_RULE: &str = "/etc/polkit-1/rules.d/49-exoagent-desktop.rules";

/// Which VNC server actually runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VncRoute {
    /// TigerVNC from the distribution.
    TigerVnc,
    /// TurboVNC, with VirtualGL when a GPU is there.
    TurboVnc {
        /// Run the session under VirtualGL's EGL back end.
        virtualgl: bool,
    },
}

impl VncRoute {
    /// Resolve `choice` on a machine whose filesystem is at `system_root` (sysfs at `sys/`).
    pub fn resolve(choice: VncServerChoice, system_root: &Path) -> Self {
        let gpu = gpu::detect_nvidia_gpu(&system_root.join("sys"));
        match choice {
            VncServerChoice::TigerVnc => Self::TigerVnc,
            VncServerChoice::TurboVnc => Self::TurboVnc { virtualgl: gpu },
            VncServerChoice::Auto if gpu => Self::TurboVnc { virtualgl: true },
            VncServerChoice::Auto => Self::TigerVnc,
        }
    }
}

/// The desktop as configured, on the machine it was planned for.
#[derive(Debug, Clone)]
pub struct Desktop {
    settings: DesktopSettings,
    route: VncRoute,
    family: Family,
}

impl Desktop {
    /// The desktop with the given settings on `os`, whose filesystem is at `system_root`.
    pub fn new(settings: DesktopSettings, os: &Os, system_root: &Path) -> Self {
        let route = VncRoute::resolve(settings.vnc_server, system_root);
        Self {
            settings,
            route,
            family: os.family,
        }
    }

    /// The X display number for the RFB port (5901 → `:1`).
    pub fn display(&self) -> u16 {
        self.settings.display()
    }

    fn password_file(ctx: &ServiceContext) -> PathBuf {
        ctx.paths
            .service_state_dir(ServiceKind::Desktop)
            .join("vncpasswd")
    }

    fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ServiceError {
        io_error(ServiceKind::Desktop, action, path)
    }

    /// The `exoagent desktop-session` arguments.
    pub fn session_args(&self, ctx: &ServiceContext) -> Vec<String> {
        let (width, height) = self.settings.geometry;
        let mut args = vec![
            "desktop-session".to_owned(),
            "--display".to_owned(),
            self.display().to_string(),
            "--rfb-port".to_owned(),
            self.settings.port.to_string(),
            "--geometry".to_owned(),
            format!("{width}x{height}"),
            "--password-file".to_owned(),
            Self::password_file(ctx).to_string_lossy().into_owned(),
            "--environment".to_owned(),
            match self.settings.environment {
                DesktopEnvironment::Xfce => "xfce",
                DesktopEnvironment::Gnome => "gnome",
            }
            .to_owned(),
        ];
        match self.route {
            VncRoute::TigerVnc => args.extend(["--server".to_owned(), "tigervnc".to_owned()]),
            VncRoute::TurboVnc { virtualgl } => {
                args.extend(["--server".to_owned(), "turbovnc".to_owned()]);
                if virtualgl {
                    args.push("--virtualgl".to_owned());
                }
            }
        }
        args
    }
}

/// Do one vendor step (GPU route; see `vendor` for why it is not run in tests).
async fn run_vendor_step(step: &Step) -> Result<(), ServiceError> {
    let fail = |detail: String| ServiceError::Install {
        service: ServiceKind::Desktop,
        detail,
    };
    let fetch = |url: String| async move {
        let response = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?
            .get(&url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| format!("failed to download {url}: {e}"))?;
        response
            .bytes()
            .await
            .map_err(|e| format!("failed to download {url}: {e}"))
    };
    match step {
        Step::Keyring { url, path } => {
            let armored = fetch(url.clone()).await.map_err(fail)?;
            let tmp = path.with_extension("asc.tmp");
            fsutil::write_atomic(&tmp, &armored, 0o644, None)
                .map_err(Desktop::io_err("write", &tmp))?;
            let result = run_logged(
                ServiceKind::Desktop,
                &[
                    "gpg",
                    "--batch",
                    "--yes",
                    "--dearmor",
                    "-o",
                    &path.to_string_lossy(),
                    &tmp.to_string_lossy(),
                ],
            )
            .await;
            let _ = std::fs::remove_file(&tmp);
            result
        }
        Step::File { path, content } => {
            fsutil::write_if_changed(path, content.as_bytes(), 0o644, None)
                .map(drop)
                .map_err(Desktop::io_err("write", path))
        }
        Step::Download { url, path } => {
            let body = fetch(url.clone()).await.map_err(fail)?;
            fsutil::write_atomic(path, &body, 0o644, None).map_err(Desktop::io_err("write", path))
        }
        Step::Run(argv) => {
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            run_logged(ServiceKind::Desktop, &argv).await
        }
    }
}

impl ServiceImpl for Desktop {
    const KIND: ServiceKind = ServiceKind::Desktop;
    type Settings = DesktopSettings;
    type Section = settings::Section;
    const KEYS: &'static [Key<settings::Section>] = settings::KEYS;

    fn settings(section: &settings::Section, port: Located<u16>, check: &mut Checker<'_>) -> DesktopSettings {
        section.settings(port, check)
    }

    fn settings_port(settings: &DesktopSettings) -> u16 {
        settings.port
    }

    fn planned(settings: DesktopSettings, host: Host<'_>) -> Self {
        Self::new(settings, host.os, host.system_root)
    }

    fn system_packages(&self, os: &Os) -> Vec<String> {
        let environment: &[&str] = match (os.family, self.settings.environment) {
            (Family::Debian, DesktopEnvironment::Xfce) => &["xfce4", "xfce4-terminal", "dbus-x11"],
            (Family::Debian, DesktopEnvironment::Gnome) => {
                &["gnome-session", "gnome-terminal", "dbus-x11"]
            }
            // EL: Xfce comes from EPEL (unverified here: no EL machine).
            (Family::RedHat, DesktopEnvironment::Xfce) => &[
                "epel-release",
                "xfce4-session",
                "xfwm4",
                "xfce4-panel",
                "xfdesktop",
                "xfce4-terminal",
                "dbus-x11",
            ],
            (Family::RedHat, DesktopEnvironment::Gnome) => {
                &["gnome-session", "gnome-terminal", "dbus-x11"]
            }
        };
        // TurboVNC's packages come from its vendor repository, added by `install` (which
        // needs gpg for apt's keyring).
        let server: &[&str] = match (os.family, self.route) {
            (Family::Debian, VncRoute::TurboVnc { .. }) => &["gnupg", "ca-certificates"],
            (Family::RedHat, VncRoute::TurboVnc { .. }) => &[],
            // TigerVNC before 1.12 (Debian 11's 1.11, Ubuntu 20.04's 1.10) has no
            // tigervnc-tools: vncpasswd is tigervnc-common's (an alternative for
            // tigervncpasswd), which the server depends on.
            (Family::Debian, VncRoute::TigerVnc) if tigervnc_before_1_12(os) => {
                &["tigervnc-standalone-server", "tigervnc-common"]
            }
            (Family::Debian, VncRoute::TigerVnc) => {
                &["tigervnc-standalone-server", "tigervnc-tools"]
            }
            (Family::RedHat, VncRoute::TigerVnc) => &["tigervnc-server"],
        };
        environment
            .iter()
            .chain(server)
            .map(|s| (*s).to_owned())
            .collect()
    }

    fn plan(&self, ctx: &ServiceContext) -> Vec<String> {
        let server = match self.route {
            VncRoute::TigerVnc => "TigerVNC".to_owned(),
            VncRoute::TurboVnc { virtualgl: true } => {
                "TurboVNC with VirtualGL (EGL, NVIDIA GPU found)".to_owned()
            }
            VncRoute::TurboVnc { virtualgl: false } => "TurboVNC".to_owned(),
        };
        let (w, h) = self.settings.geometry;
        vec![
            format!(
                "write the VNC password file {} (0600, owner {}) from the passphrase",
                Self::password_file(ctx).display(),
                ctx.account.name
            ),
            format!(
                "run {server} on display :{} (127.0.0.1:{}, {w}x{h}, VNC authentication) with a \
                 {} session as {} under supervision; ready when the RFB banner offers VNC \
                 authentication",
                self.display(),
                self.settings.port,
                match self.settings.environment {
                    DesktopEnvironment::Xfce => "Xfce",
                    DesktopEnvironment::Gnome => "GNOME",
                },
                ctx.account.name
            ),
        ]
    }

    async fn install(&self, ctx: &ServiceContext) -> Result<(), ServiceError> {
        let VncRoute::TurboVnc { virtualgl } = self.route else {
            return Ok(());
        };
        let turbovnc_there = ctx.paths.system_root.join("opt/TurboVNC/bin/Xvnc").exists();
        let virtualgl_there = ctx
            .paths
            .system_root
            .join("opt/VirtualGL/bin/vglrun")
            .exists();
        if turbovnc_there && (!virtualgl || virtualgl_there) {
            return Ok(()); // baked into the image
        }
        for step in vendor::install_steps(self.family, virtualgl) {
            run_vendor_step(&step).await?;
        }
        Ok(())
    }

    async fn configure(
        &self,
        ctx: &ServiceContext,
        passphrase: &Passphrase,
    ) -> Result<(), ServiceError> {
        let dir = ctx.paths.service_state_dir(ServiceKind::Desktop);
        fsutil::ensure_dir(&dir, 0o711).map_err(Self::io_err("create", &dir))?;
        let file = Self::password_file(ctx);
        vnc::write_vnc_password(passphrase.expose(), &file, ctx.account.uid, ctx.account.gid)
            .map_err(|e| ServiceError::Configure {
                service: ServiceKind::Desktop,
                detail: e.to_string(),
            })?;
        // Polkit prompts off for the instance user (system mode only: it is a system file).
        if ctx.paths.system_root == Path::new("/") && ctx.account.uid != 0 {
            let rule = format!(
                "// Written by exoagent: no polkit prompts for the instance user on its desktop.\n\
                 polkit.addRule(function(action, subject) {{\n    \
                 if (subject.user == {:?}) {{ return polkit.Result.YES; }}\n}});\n",
                ctx.account.name
            );
            let path = Path::new(POLKIT_RULE);
            if let Some(parent) = path.parent() {
                fsutil::ensure_dir(parent, 0o755).map_err(Self::io_err("create", parent))?;
            }
            fsutil::write_if_changed(path, rule.as_bytes(), 0o644, None)
                .map_err(Self::io_err("write", path))?;
        }
        // VirtualGL's framebuffer is restricted to the vglusers group (`vglserver_config -f`).
        if let VncRoute::TurboVnc { virtualgl: true } = self.route {
            if ctx.paths.system_root == Path::new("/") && ctx.account.uid != 0 {
                run_logged(
                    ServiceKind::Desktop,
                    &["usermod", "-a", "-G", "vglusers", &ctx.account.name],
                )
                .await?;
            }
        }
        // A desktop session without a home cannot start.
        ctx.ensure_home(ServiceKind::Desktop)
    }

    fn run_spec(&self, ctx: &ServiceContext) -> RunSpec {
        let mut argv = vec![ctx.exe.to_string_lossy().into_owned()];
        argv.extend(self.session_args(ctx));
        RunSpec {
            argv,
            env: ctx.login_env("/usr/local/bin:/usr/bin:/bin"),
            cwd: ctx.account.home.clone(),
            run_as: ctx.run_as(),
        }
    }

    fn probe(&self) -> Probe {
        Probe::Rfb {
            addr: self.endpoint().probe_addr(),
            security_type: VNC_AUTH,
        }
    }

    fn start_timeout(&self) -> Duration {
        self.settings.start_timeout
    }

    /// On loopback only: Guacamole reaches it, the UAP never does.
    fn endpoint(&self) -> Endpoint {
        Endpoint::direct(SocketAddr::from((Ipv4Addr::LOCALHOST, self.settings.port)))
    }

    fn url(&self) -> String {
        format!(
            "vnc://127.0.0.1:{} (display :{})",
            self.endpoint().public_port,
            self.display()
        )
    }

    /// A viewer connected to the VNC server (through Guacamole or an SSH tunnel).
    fn activity(&self) -> Vec<super::ActivitySign> {
        vec![super::ActivitySign::Connection(self.endpoint().public_port)]
    }
}

/// Whether `os` packages a TigerVNC older than 1.12, which split vncpasswd into
/// tigervnc-tools: Debian 11 (1.11.0) and Ubuntu 20.04 (1.10.1).
fn tigervnc_before_1_12(os: &Os) -> bool {
    matches!(
        (os.id.as_str(), os.version_id.as_str()),
        ("debian", "11") | ("ubuntu", "20.04")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn debian() -> Os {
        Os {
            id: "debian".into(),
            version_id: "12".into(),
            pretty_name: "Debian 12".into(),
            family: Family::Debian,
            supported: true,
        }
    }

    #[test]
    fn an_nvidia_gpu_under_the_system_root_picks_turbovnc_with_virtualgl() {
        let root = tempfile::tempdir().unwrap();
        let settings = DesktopSettings::default();
        let plain = Desktop::new(settings.clone(), &debian(), root.path());
        assert_eq!(plain.route, VncRoute::TigerVnc);
        assert!(plain
            .system_packages(&debian())
            .contains(&"tigervnc-standalone-server".to_owned()));

        let device = root.path().join("sys/bus/pci/devices/0000:00:05.0");
        std::fs::create_dir_all(&device).unwrap();
        std::fs::write(device.join("vendor"), "0x10de\n").unwrap();
        std::fs::write(device.join("class"), "0x030200\n").unwrap();
        let gpu = Desktop::new(settings, &debian(), root.path());
        assert_eq!(gpu.route, VncRoute::TurboVnc { virtualgl: true });
        let packages = gpu.system_packages(&debian());
        assert!(packages.contains(&"gnupg".to_owned()), "{packages:?}");
        assert!(!packages.contains(&"tigervnc-standalone-server".to_owned()));
    }

    #[test]
    fn vncpasswd_comes_from_tigervnc_tools_only_where_that_package_exists() {
        let root = tempfile::tempdir().unwrap();
        let on = |id: &str, version: &str| {
            let os = Os {
                id: id.into(),
                version_id: version.into(),
                pretty_name: format!("{id} {version}"),
                family: Family::Debian,
                supported: true,
            };
            Desktop::new(DesktopSettings::default(), &os, root.path()).system_packages(&os)
        };
        for (id, version) in [("debian", "12"), ("debian", "13"), ("ubuntu", "22.04")] {
            let packages = on(id, version);
            assert!(packages.contains(&"tigervnc-tools".to_owned()), "{id} {version}");
            assert!(!packages.contains(&"tigervnc-common".to_owned()), "{id} {version}");
        }
        // Debian 11 and Ubuntu 20.04 have no tigervnc-tools (apt: "Unable to locate package").
        for (id, version) in [("debian", "11"), ("ubuntu", "20.04")] {
            let packages = on(id, version);
            assert!(!packages.contains(&"tigervnc-tools".to_owned()), "{id} {version}");
            assert!(packages.contains(&"tigervnc-common".to_owned()), "{id} {version}");
            assert!(packages.contains(&"tigervnc-standalone-server".to_owned()));
        }
    }
}
