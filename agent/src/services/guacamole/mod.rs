//! Guacamole without Java: guacd (the distribution's package, or the official container image
//! pinned by digest) plus exoagent's own web side (`exoagent guacamole-web`: token API, client
//! page, WebSocket tunnel), run as the instance user. Ready when the web side answers and guacd
//! has answered a `select` for every configured protocol.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{
    OccupiedPort,
    io_error, Endpoint, Host, ServiceContext, ServiceError, ServiceImpl, ServiceSettings,
};
use crate::schema::{Checker, Key, Located};
pub use settings::{GuacamoleSettings, GuacdSource};
use crate::fsutil;
pub mod assets;
pub mod auth;
pub mod cli;
pub mod forwarded;
pub mod handshake;
pub mod protocol;
pub mod rename;
pub mod settings;
pub mod ssh_loopback;
pub mod streams;
pub mod transfer;
pub mod tunnel;
pub mod web;
pub mod web_config;

use crate::model::{Cidr, ServiceKind};
use crate::platform::cloud_init;
use crate::platform::os::{Family, Os};
use crate::platform::passphrase::Passphrase;
use crate::services::command::run_logged;
use crate::supervise::{Probe, RunSpec};
use ssh_loopback::SshLoopback;
use web_config::{Connection, WebConfig, PASSWORD_TOKEN};

/// The official guacd image, pinned by digest: `guacamole/guacd` 1.6.0 as public deployments
/// pin it. Not pulled in this project's tests (no access to its registry).
pub const GUACD_IMAGE: &str =
    "docker.io/guacamole/guacd@sha256:8974eaa9ba32f713daf311e7cc8cd7e4cdfba1edea39eed75524e78ef4b08f4f";

/// How guacd runs, decided from the settings and the OS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuacdRoute {
    /// `guacd` from the distribution, a child of the web side.
    Package,
    /// The pinned image under podman (host network, so loopback services are reachable and
    /// guacd binds loopback only), a child of the web side.
    Container,
    /// Already running at the configured address.
    External,
}

impl GuacdRoute {
    /// Where guacd comes from on `os`: a package where the distribution has one (Ubuntu
    /// universe, EPEL, Debian 11's 1.3.0), the container image otherwise (Debian 12 and 13
    /// have none).
    pub fn resolve(source: GuacdSource, os: &Os) -> Self {
        match source {
            GuacdSource::Package => Self::Package,
            GuacdSource::Container => Self::Container,
            GuacdSource::External => Self::External,
            GuacdSource::Auto => {
                let debian_11 = os.id == "debian" && os.version_id == "11";
                if os.id == "ubuntu" || os.family == Family::RedHat || debian_11 {
                    Self::Package
                } else {
                    Self::Container
                }
            }
        }
    }
}

/// Guacamole as configured, on the OS it was planned for.
#[derive(Debug, Clone)]
pub struct Guacamole {
    settings: GuacamoleSettings,
    route: GuacdRoute,
    family: Family,
    endpoint: Endpoint,
    ssh_loopback: SshLoopback,
    /// [`Self::ssh_host`]'s answer, worked out once (begun early by
    /// [`ServiceImpl::configure_early`], awaited by `configure`); shared by the clones.
    ssh_host: std::sync::Arc<tokio::sync::OnceCell<IpAddr>>,
}

impl Guacamole {
    /// Guacamole with the given settings on `os`.
    pub fn new(settings: GuacamoleSettings, os: &Os) -> Self {
        let route = GuacdRoute::resolve(settings.guacd, os);
        let endpoint = Endpoint::direct(SocketAddr::new(settings.bind, settings.port));
        Self {
            settings,
            route,
            family: os.family,
            endpoint,
            ssh_loopback: SshLoopback::system(),
            ssh_host: Default::default(),
        }
    }

    /// The same, deciding guacd's address for sshd with `ssh_loopback`'s commands.
    pub fn with_ssh_loopback(mut self, ssh_loopback: SshLoopback) -> Self {
        self.ssh_loopback = ssh_loopback;
        self
    }

    /// The address guacd reaches sshd at (see [`ssh_loopback`]), decided once cloud-init's
    /// config stage has finished this boot (sshd as the cloud configured it, and restarted):
    /// the dedicated one when guacd runs on this machine, the agent changes this machine (not a
    /// sandbox), `ssh_quickack` is on and sshd treats that address as 127.0.0.1; 127.0.0.1
    /// otherwise, with the reason logged.
    pub async fn ssh_host(&self, ctx: &ServiceContext) -> IpAddr {
        *self
            .ssh_host
            .get_or_init(|| self.choose_ssh_host(ctx))
            .await
    }

    async fn choose_ssh_host(&self, ctx: &ServiceContext) -> IpAddr {
        // cloud-init's config stage applies `ssh_pwauth` and restarts sshd when that changed
        // it: a shell opened in that moment fails (guacd 1.3.0: "SSH handshake failed", 519).
        // So Guacamole is not ready before the stage has run, and sshd's view read below is
        // the one the stage leaves. Under a sandbox's root there is no such file: no wait.
        let status = ctx.paths.system_root.join(cloud_init::STATUS_FILE);
        cloud_init::wait_for_config_stage(
            &status,
            cloud_init::CONFIG_STAGE_WAIT,
            "Guacamole's connections use sshd",
        )
        .await;
        if !self.settings.ssh_quickack
            || self.route == GuacdRoute::External
            || ctx.paths.system_root != Path::new("/")
        {
            return ssh_loopback::PLAIN;
        }
        match self.ssh_loopback.choose(&ctx.account.name, self.settings.ssh_port).await {
            Ok(host) => {
                tracing::info!(
                    target: "exoagent::services",
                    service = "guacamole",
                    %host,
                    "guacd reaches sshd at its own loopback address, delayed ACKs off"
                );
                host
            }
            Err(e) => {
                tracing::warn!(
                    target: "exoagent::services",
                    service = "guacamole",
                    reason = e.reason(),
                    "guacd reaches sshd at 127.0.0.1 (file downloads may be slower): {e}"
                );
                ssh_loopback::PLAIN
            }
        }
    }

    /// The same, reached at `endpoint` (behind the TLS front).
    pub fn at(mut self, endpoint: Endpoint) -> Self {
        self.endpoint = endpoint;
        self
    }

    fn state_dir(ctx: &ServiceContext) -> PathBuf {
        ctx.paths.service_state_dir(ServiceKind::Guacamole)
    }

    /// The web side's configuration file.
    pub fn config_file(ctx: &ServiceContext) -> PathBuf {
        Self::state_dir(ctx).join("web.json")
    }

    fn password_file(ctx: &ServiceContext) -> PathBuf {
        Self::state_dir(ctx).join("passphrase")
    }

    /// The command that runs guacd for `route`, bound to the configured loopback address.
    pub fn guacd_command(&self, route: &GuacdRoute) -> Option<Vec<String>> {
        let addr = self.settings.guacd_address;
        let guacd_args = [
            "-f".to_owned(),
            "-b".to_owned(),
            addr.ip().to_string(),
            "-l".to_owned(),
            addr.port().to_string(),
            "-L".to_owned(),
            "info".to_owned(),
        ];
        match route {
            GuacdRoute::External => None,
            GuacdRoute::Package => {
                let mut argv = vec!["guacd".to_owned()];
                argv.extend(guacd_args);
                Some(argv)
            }
            GuacdRoute::Container => {
                let mut argv: Vec<String> = [
                    "podman",
                    "run",
                    "--rm",
                    "--replace",
                    "--name",
                    "exoagent-guacd",
                    "--network",
                    "host",
                    "--pull",
                    "missing",
                    "--cap-drop",
                    "ALL",
                    "--security-opt",
                    "no-new-privileges",
                    GUACD_IMAGE,
                    "/opt/guacamole/sbin/guacd",
                ]
                .map(str::to_owned)
                .to_vec();
                argv.extend(guacd_args);
                Some(argv)
            }
        }
    }

    /// The connections: `shell` (SSH to this machine, with SFTP) always, `desktop` (VNC, with
    /// SFTP) when the desktop service runs. Both log in as the instance user with the
    /// passphrase, which is filled in by the web side from its 0600 file. guacd reaches sshd
    /// at `ssh_host` ([`Self::ssh_host`]).
    pub fn connections(&self, user: &str, ssh_host: IpAddr) -> BTreeMap<String, Connection> {
        let ssh_port = self.settings.ssh_port.to_string();
        let ssh_host = ssh_host.to_string();
        let params = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let mut connections = BTreeMap::new();
        connections.insert(
            "shell".to_owned(),
            Connection {
                protocol: "ssh".into(),
                parameters: params(&[
                    ("hostname", &ssh_host),
                    ("port", &ssh_port),
                    ("username", user),
                    ("password", PASSWORD_TOKEN),
                    ("enable-sftp", "true"),
                ]),
            },
        );
        if let Some(port) = self.settings.desktop_port {
            let port = port.to_string();
            connections.insert(
                "desktop".to_owned(),
                Connection {
                    protocol: "vnc".into(),
                    parameters: params(&[
                        ("hostname", "127.0.0.1"),
                        ("port", &port),
                        ("password", PASSWORD_TOKEN),
                        ("autoretry", "5"),
                        ("enable-sftp", "true"),
                        ("sftp-hostname", &ssh_host),
                        ("sftp-port", &ssh_port),
                        ("sftp-username", user),
                        ("sftp-password", PASSWORD_TOKEN),
                    ]),
                },
            );
        }
        connections
    }

    /// The web side's configuration for `ctx`, guacd reaching sshd at `ssh_host`.
    pub fn web_config(&self, ctx: &ServiceContext, ssh_host: IpAddr) -> WebConfig {
        WebConfig {
            listen: self.endpoint().listen,
            guacd: self.settings.guacd_address,
            guacd_command: self.guacd_command(&self.route),
            username: ctx.account.name.clone(),
            password_file: Self::password_file(ctx),
            session_timeout_s: self.settings.session_timeout.as_secs(),
            connections: self.connections(&ctx.account.name, ssh_host),
            trusted_proxies: self.settings.trusted_proxies.clone(),
            idle_notice: Some(ctx.paths.idle_notice_file()),
        }
    }

    fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ServiceError {
        io_error(ServiceKind::Guacamole, action, path)
    }
}

/// guacd's packages on `os` for the package route (batched with every other service's).
fn guacd_packages(os: &Os) -> Vec<String> {
    match (os.family, os.id.as_str()) {
        // Ubuntu 24.04 renamed the libraries for the 64-bit time_t transition.
        (Family::Debian, "ubuntu") if os.version_id.as_str() >= "24.04" => {
            vec!["guacd", "libguac-client-ssh0t64", "libguac-client-vnc0t64"]
        }
        (Family::Debian, _) => vec!["guacd", "libguac-client-ssh0", "libguac-client-vnc0"],
        // EPEL must be enabled first: `install` adds the rest once it is.
        (Family::RedHat, _) => vec!["epel-release"],
    }
    .into_iter()
    .map(str::to_owned)
    .collect()
}

impl ServiceImpl for Guacamole {
    const KIND: ServiceKind = ServiceKind::Guacamole;
    const WEB: bool = true;
    type Settings = GuacamoleSettings;
    type Section = settings::Section;
    const KEYS: &'static [Key<settings::Section>] = settings::KEYS;

    fn settings(section: &settings::Section, port: Located<u16>, check: &mut Checker<'_>) -> GuacamoleSettings {
        section.settings(port, check)
    }

    /// Guacamole offers the `desktop` connection when the desktop runs.
    fn occupied_ports(section: &settings::Section) -> Vec<OccupiedPort> {
        section.occupied_ports()
    }

    fn link(settings: &mut GuacamoleSettings, enabled: &[ServiceSettings]) {
        settings.desktop_port = enabled.iter().find_map(|s| match s {
            ServiceSettings::Desktop(d) => Some(d.port),
            _ => None,
        });
    }

    fn settings_port(settings: &GuacamoleSettings) -> u16 {
        settings.port
    }

    fn planned(mut settings: GuacamoleSettings, host: Host<'_>) -> Self {
        let public = SocketAddr::new(settings.bind, settings.port);
        let endpoint = host.web_endpoint(public);
        if endpoint.front.is_some() {
            // Behind the front every request comes from loopback with the front's
            // X-Forwarded-For (the peer it saw, after the proxies it trusts): read past both.
            for proxy in ["127.0.0.1", "::1"] {
                settings.trusted_proxies.extend(proxy.parse::<Cidr>());
            }
            settings
                .trusted_proxies
                .extend(host.tls.trusted_proxies.iter().copied());
        }
        Self::new(settings, host.os).at(endpoint)
    }

    fn system_packages(&self, os: &Os) -> Vec<String> {
        match self.route {
            GuacdRoute::Package => guacd_packages(os),
            GuacdRoute::Container => vec!["podman".to_owned()],
            GuacdRoute::External => Vec::new(),
        }
    }

    fn plan(&self, ctx: &ServiceContext) -> Vec<String> {
        let guacd = match &self.route {
            GuacdRoute::Package => "guacd from the distribution's package".to_owned(),
            GuacdRoute::Container => format!("guacd from {GUACD_IMAGE} under podman"),
            GuacdRoute::External => "guacd already running (external)".to_owned(),
        };
        let names: Vec<String> = self
            .connections(&ctx.account.name, ssh_loopback::PLAIN)
            .into_keys()
            .collect();
        vec![
            format!(
                "{guacd} on {}, run by the web side",
                self.settings.guacd_address
            ),
            format!(
                "write {} and {} (0600, owner {}): connections {}",
                Self::config_file(ctx).display(),
                Self::password_file(ctx).display(),
                ctx.account.name,
                names.join(", ")
            ),
            format!(
                "serve the token API, client page and tunnel on {}:{} under /guacamole/ as {}; \
                 ready when guacd answers for every connection's protocol \
                 and cloud-init's config stage (which may restart sshd) has finished this boot",
                self.endpoint.listen.ip(), self.endpoint.listen.port(), ctx.account.name
            ),
        ]
    }

    async fn install(&self, ctx: &ServiceContext) -> Result<(), ServiceError> {
        if self.route == GuacdRoute::Package && self.family == Family::RedHat {
            run_logged(
                ServiceKind::Guacamole,
                &[
                    "dnf",
                    "install",
                    "-y",
                    "guacd",
                    "libguac-client-ssh",
                    "libguac-client-vnc",
                ],
            )
            .await?;
        }
        if self.route == GuacdRoute::Package {
            let root = &ctx.paths.system_root;
            for argv in distro_guacd_retirement(root, root.join("run/systemd/system").is_dir()) {
                run_logged(ServiceKind::Guacamole, &argv).await?;
            }
        }
        Ok(())
    }

    /// sshd's view of the dedicated loopback address (two `sshd -T` and a route: a second at
    /// boot under emulation), decided while the batch and the passphrase are awaited.
    fn configure_early(&self, ctx: &ServiceContext) {
        let (guacamole, ctx) = (self.clone(), ctx.clone());
        tokio::spawn(async move {
            guacamole.ssh_host(&ctx).await;
        });
    }

    async fn configure(
        &self,
        ctx: &ServiceContext,
        passphrase: &Passphrase,
    ) -> Result<(), ServiceError> {
        let dir = Self::state_dir(ctx);
        fsutil::ensure_dir(&dir, 0o711).map_err(Self::io_err("create", &dir))?;
        let owner = Some((ctx.account.uid, ctx.account.gid));
        let password = Self::password_file(ctx);
        // Only what changed is rewritten: a full disk must not fail an unchanged configuration.
        fsutil::write_if_changed(&password, passphrase.expose().as_bytes(), 0o600, owner)
            .map_err(Self::io_err("write", &password))?;
        let ssh_host = self.ssh_host(ctx).await;
        let config = self.web_config(ctx, ssh_host);
        let text = serde_json::to_vec_pretty(&config).map_err(|e| ServiceError::Configure {
            service: ServiceKind::Guacamole,
            detail: e.to_string(),
        })?;
        let file = Self::config_file(ctx);
        fsutil::write_if_changed(&file, &text, 0o600, owner)
            .map_err(Self::io_err("write", &file))?;
        // The web side's working directory.
        ctx.ensure_home(ServiceKind::Guacamole)
    }

    fn run_spec(&self, ctx: &ServiceContext) -> RunSpec {
        RunSpec {
            argv: vec![
                ctx.exe.to_string_lossy().into_owned(),
                "guacamole-web".into(),
                "--config".into(),
                Self::config_file(ctx).to_string_lossy().into_owned(),
            ],
            env: {
                let mut env =
                    ctx.login_env("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
                env.push(("EXOAGENT_LOG".into(), "info".into()));
                env
            },
            cwd: ctx.account.home.clone(),
            run_as: ctx.run_as(),
        }
    }

    fn probe(&self) -> Probe {
        let addr = self.endpoint().probe_addr();
        Probe::Http {
            addr,
            path: "/guacamole/api/exoagent/health".into(),
            host: addr.to_string(),
            expect_json_key: Some("guacd".into()),
            user_agent: None,
        }
    }

    fn start_timeout(&self) -> Duration {
        self.settings.start_timeout
    }

    fn endpoint(&self) -> Endpoint {
        self.endpoint
    }

    fn url(&self) -> String {
        self.endpoint.local_url("/guacamole/")
    }

    /// An open tunnel: the web side's connection to guacd lasts exactly as long as it.
    fn activity(&self) -> Vec<super::ActivitySign> {
        vec![super::ActivitySign::Connection(
            self.settings.guacd_address.port(),
        )]
    }
}

/// The distribution's own guacd unit: Debian's and Ubuntu's package enable and start it on
/// install, bound to 127.0.0.1:4822 like exoagent's guacd, which then cannot bind and
/// crash-loops while the unit's guacd (user `guacd`) serves the connections.
const DISTRO_GUACD_UNIT: &str = "guacd.service";

/// The commands that stop, disable and mask [`DISTRO_GUACD_UNIT`] under `root`, so only the
/// guacd exoagent runs is there: none when the unit is not installed or already masked; without
/// `--now` when systemd is not running the root (an image being baked: `systemctl` then edits
/// the unit links offline).
fn distro_guacd_retirement(root: &Path, live: bool) -> Vec<Vec<&'static str>> {
    let masked = root.join("etc/systemd/system").join(DISTRO_GUACD_UNIT);
    if std::fs::read_link(&masked).is_ok_and(|target| target == Path::new("/dev/null")) {
        return Vec::new();
    }
    let installed = ["lib/systemd/system", "usr/lib/systemd/system"]
        .iter()
        .any(|dir| root.join(dir).join(DISTRO_GUACD_UNIT).exists());
    if !installed {
        return Vec::new();
    }
    let disable = if live {
        vec!["systemctl", "disable", "--now", DISTRO_GUACD_UNIT]
    } else {
        vec!["systemctl", "disable", DISTRO_GUACD_UNIT]
    };
    vec![disable, vec!["systemctl", "mask", DISTRO_GUACD_UNIT]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_distributions_guacd_unit_is_stopped_and_masked_once() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        assert!(distro_guacd_retirement(r, true).is_empty(), "no unit installed");
        std::fs::create_dir_all(r.join("lib/systemd/system")).unwrap();
        std::fs::write(r.join("lib/systemd/system/guacd.service"), "[Unit]\n").unwrap();
        assert_eq!(
            distro_guacd_retirement(r, true),
            [
                vec!["systemctl", "disable", "--now", "guacd.service"],
                vec!["systemctl", "mask", "guacd.service"],
            ]
        );
        // Baking an image: no systemd to stop anything in.
        assert_eq!(
            distro_guacd_retirement(r, false)[0],
            ["systemctl", "disable", "guacd.service"]
        );
        std::fs::create_dir_all(r.join("etc/systemd/system")).unwrap();
        std::os::unix::fs::symlink("/dev/null", r.join("etc/systemd/system/guacd.service"))
            .unwrap();
        assert!(distro_guacd_retirement(r, true).is_empty(), "already masked");
    }

    fn os(id: &str, version: &str, family: Family) -> Os {
        Os {
            id: id.into(),
            version_id: version.into(),
            pretty_name: id.into(),
            family,
            supported: true,
        }
    }

    #[test]
    fn guacd_comes_from_a_package_where_one_exists() {
        let ubuntu = os("ubuntu", "22.04", Family::Debian);
        let debian = os("debian", "12", Family::Debian);
        let rocky = os("rocky", "9.4", Family::RedHat);
        assert_eq!(
            GuacdRoute::resolve(GuacdSource::Auto, &ubuntu),
            GuacdRoute::Package
        );
        assert_eq!(
            GuacdRoute::resolve(GuacdSource::Auto, &rocky),
            GuacdRoute::Package
        );
        assert_eq!(
            GuacdRoute::resolve(GuacdSource::Auto, &debian),
            GuacdRoute::Container
        );
        // Debian 11 packages guacd 1.3.0 (with the SSH and VNC plugins); 12 and 13 do not.
        assert_eq!(
            GuacdRoute::resolve(GuacdSource::Auto, &os("debian", "11", Family::Debian)),
            GuacdRoute::Package
        );
        assert_eq!(
            GuacdRoute::resolve(GuacdSource::Auto, &os("debian", "13", Family::Debian)),
            GuacdRoute::Container
        );
        assert_eq!(
            guacd_packages(&os("debian", "11", Family::Debian)),
            ["guacd", "libguac-client-ssh0", "libguac-client-vnc0"]
        );
        assert_eq!(
            GuacdRoute::resolve(GuacdSource::External, &ubuntu),
            GuacdRoute::External
        );
        assert_eq!(
            guacd_packages(&os("ubuntu", "24.04", Family::Debian)),
            ["guacd", "libguac-client-ssh0t64", "libguac-client-vnc0t64"]
        );
        assert_eq!(guacd_packages(&ubuntu)[1], "libguac-client-ssh0");
        let service = Guacamole::new(GuacamoleSettings::default(), &debian);
        assert_eq!(service.system_packages(&debian), ["podman"]);
        let service = Guacamole::new(GuacamoleSettings::default(), &ubuntu);
        assert_eq!(service.system_packages(&ubuntu)[0], "guacd");
    }

    #[test]
    fn guacd_binds_loopback_and_the_image_is_pinned() {
        let service = Guacamole::new(
            GuacamoleSettings::default(),
            &os("debian", "12", Family::Debian),
        );
        let package = service.guacd_command(&GuacdRoute::Package).unwrap();
        assert_eq!(
            package,
            ["guacd", "-f", "-b", "127.0.0.1", "-l", "4822", "-L", "info"]
        );
        let container = service.guacd_command(&GuacdRoute::Container).unwrap();
        assert!(container.contains(&"host".to_owned()));
        let image = container
            .iter()
            .find(|a| a.contains("guacamole/guacd"))
            .unwrap();
        assert!(image.contains("@sha256:") && image.len() > 70, "{image}");
        assert!(container.ends_with(&["-L".to_owned(), "info".to_owned()]));
        assert_eq!(service.guacd_command(&GuacdRoute::External), None);
    }

    #[test]
    fn the_desktop_connection_exists_only_with_the_desktop() {
        let mut settings = GuacamoleSettings::default();
        let shell_only = Guacamole::new(settings.clone(), &os("debian", "12", Family::Debian))
            .connections("exouser", ssh_loopback::PLAIN);
        assert_eq!(shell_only.keys().collect::<Vec<_>>(), ["shell"]);
        assert_eq!(shell_only["shell"].parameters["password"], PASSWORD_TOKEN);
        settings.desktop_port = Some(5901);
        let both =
            Guacamole::new(settings, &os("debian", "12", Family::Debian)).connections("exouser", ssh_loopback::PLAIN);
        let desktop = &both["desktop"];
        assert_eq!(desktop.protocol, "vnc");
        assert_eq!(desktop.parameters["port"], "5901");
        assert_eq!(desktop.parameters["sftp-username"], "exouser");
    }

    /// A service context for the instance user `exouser` under `paths`.
    fn exouser_context(paths: crate::paths::Paths) -> ServiceContext {
        ServiceContext {
            paths,
            account: crate::services::Account {
                name: "exouser".into(),
                uid: 1000,
                gid: 1000,
                home: "/home/exouser".into(),
            },
            exe: "/usr/bin/exoagent".into(),
        }
    }

    #[test]
    fn sshd_is_asked_only_where_guacd_runs_here_and_the_agent_changes_this_machine() {
        use crate::paths::Paths;
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("asked");
        // Stands in for `sshd`: leaves a mark when run (and says nothing, so the address
        // stays 127.0.0.1).
        let spy = SshLoopback::new(
            vec!["false".into()],
            vec!["sh".into(), "-c".into(), "touch \"$0\"".into(), marker.to_string_lossy().into_owned()],
        );
        let ctx = exouser_context;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let on = |settings: GuacamoleSettings| {
            Guacamole::new(settings, &os("ubuntu", "22.04", Family::Debian)).with_ssh_loopback(spy.clone())
        };
        let package = GuacamoleSettings {
            guacd: GuacdSource::Package,
            ..GuacamoleSettings::default()
        };
        let cases = [
            ("a sandbox", on(package.clone()), Paths::sandbox(dir.path())),
            (
                "guacd elsewhere",
                on(GuacamoleSettings {
                    guacd: GuacdSource::External,
                    ..package.clone()
                }),
                Paths::system(),
            ),
            (
                "ssh_quickack off",
                on(GuacamoleSettings {
                    ssh_quickack: false,
                    ..package.clone()
                }),
                Paths::system(),
            ),
        ];
        for (what, service, paths) in cases {
            assert_eq!(rt.block_on(service.ssh_host(&ctx(paths))), ssh_loopback::PLAIN, "{what}");
            assert!(!marker.exists(), "{what}: sshd was asked");
        }
        let host = rt.block_on(on(package).ssh_host(&ctx(Paths::system())));
        assert!(marker.exists(), "guacd here, this machine: sshd is asked");
        assert_eq!(host, ssh_loopback::PLAIN, "its empty answer lists no listen address");
    }

    /// cloud-init's config stage restarts sshd (`ssh_pwauth`): guacd's address for sshd, which
    /// `configure` awaits before the web side starts, is not decided before the stage has
    /// finished; without cloud-init this boot nothing waits.
    #[tokio::test]
    async fn guacamole_waits_for_cloud_inits_config_stage_before_using_sshd() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = exouser_context(crate::paths::Paths::sandbox(dir.path()));
        let service = || Guacamole::new(GuacamoleSettings::default(), &os("debian", "11", Family::Debian));
        assert_eq!(service().ssh_host(&ctx).await, ssh_loopback::PLAIN, "no cloud-init: no wait");

        let status = dir.path().join(cloud_init::STATUS_FILE);
        std::fs::create_dir_all(status.parent().unwrap()).unwrap();
        let stage = |finished: &str| {
            format!(r#"{{"v1": {{"init": {{"finished": 10.5}}, "modules-config": {{"start": 11.0, "finished": {finished}}}}}}}"#)
        };
        std::fs::write(&status, stage("null")).unwrap();
        let guacamole = service();
        guacamole.configure_early(&ctx);
        let deciding = tokio::spawn({
            let (guacamole, ctx) = (guacamole.clone(), ctx.clone());
            async move { guacamole.ssh_host(&ctx).await }
        });
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(!deciding.is_finished(), "decided while cloud-init's config stage runs");
        std::fs::write(&status, stage("42.25")).unwrap();
        let host = tokio::time::timeout(Duration::from_secs(10), deciding)
            .await
            .expect("decided once the stage has finished")
            .unwrap();
        assert_eq!(host, ssh_loopback::PLAIN);
    }
}
