//! RStudio Server (open source): R from the distribution (`r-base`; `R` from EPEL with CRB or
//! PowerTools on EL), Posit's package pinned by version and URL and verified before anything is
//! installed (SHA-256 on Debian/Ubuntu, Posit's rpm signature against the pinned key fingerprint
//! on EL), `rserver.conf`/`rsession.conf` written by exoagent, and `rserver` supervised in the
//! foreground as root (it starts each user's rsession as that user; the package's own unit is
//! stopped and masked). Sign-in is PAM with the instance user's passphrase through the package's
//! `/etc/pam.d/rstudio`. Ready when `GET /auth-sign-in` answers 200 to a browser.
//!
//! Options: <https://github.com/rstudio/rstudio/blob/main/src/cpp/server/server-options.json>;
//! downloads: <https://posit.co/download/rstudio-server/>.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod package;
pub mod settings;
pub mod signature;

use super::{io_error, Endpoint, Host, ServiceContext, ServiceError, ServiceImpl};
use super::command::run_logged_with_env;
use crate::fsutil;
use crate::model::ServiceKind;
use crate::platform::os::{Family, Os};
use crate::platform::packages::LocalPackage;
use crate::platform::passphrase::Passphrase;
use crate::schema::{Checker, Key, Located};
use crate::supervise::{Probe, RunSpec};
pub use package::{Pin, Step};
pub use settings::{RStudioSettings, DEFAULT_RSERVER};

/// A browser's User-Agent: rserver redirects agents it does not recognise as a supported
/// browser away from the sign-in page, so the probe must look like one.
pub const BROWSER_USER_AGENT: &str =
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36";

const KIND: ServiceKind = ServiceKind::RStudio;

/// RStudio Server as configured, planned for one OS.
#[derive(Debug, Clone)]
pub struct RStudio {
    settings: RStudioSettings,
    os: Os,
    pin: Pin,
    endpoint: Endpoint,
}

impl RStudio {
    /// RStudio Server with `settings` on `os`.
    pub fn new(settings: RStudioSettings, os: Os) -> Self {
        let endpoint = Endpoint::direct(SocketAddr::new(settings.bind, settings.port));
        let pin = package::pin(&os);
        Self {
            settings,
            os,
            pin,
            endpoint,
        }
    }

    /// The same, with the pinned SHA-256 replaced by that of `content` (tests: a package a
    /// local server can serve and the check accepts).
    #[cfg(test)]
    pub(crate) fn pinned_to(mut self, content: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, content);
        let hex = data_encoding::HEXLOWER.encode(digest.as_ref());
        self.pin.sha256 = Some(Box::leak(hex.into_boxed_str()));
        self
    }

    /// The same, reached at `endpoint` (behind the TLS front).
    pub fn at(mut self, endpoint: Endpoint) -> Self {
        self.endpoint = endpoint;
        self
    }

    /// Where exoagent writes RStudio's configuration (`/etc/rstudio` under the system root).
    pub fn config_dir(ctx: &ServiceContext) -> PathBuf {
        ctx.paths.system_root.join("etc/rstudio")
    }

    /// Where the verified package is kept, and the marker of a finished install.
    fn payload_dir(ctx: &ServiceContext) -> PathBuf {
        ctx.paths.opt_dir.join("rstudio")
    }

    /// The pin for this OS.
    pub fn pin(&self) -> Pin {
        self.pin.clone()
    }

    /// The exact install steps, in order: the fetch steps (download, verify) run before the
    /// batched package transaction, [`Step::Batch`] is in it (Debian/Ubuntu), the rest after it.
    pub fn install_steps(&self, ctx: &ServiceContext) -> Vec<Step> {
        self.steps_for(ctx, &self.pin)
    }

    /// The install steps for `pin` on this OS.
    pub fn steps_for(&self, ctx: &ServiceContext, pin: &Pin) -> Vec<Step> {
        let url = self
            .settings
            .package_url
            .clone()
            .unwrap_or_else(|| pin.url.to_owned());
        let file = Self::payload_dir(ctx).join(pin.file_name());
        let local = file.to_string_lossy().into_owned();
        let mut steps = vec![Step::Download {
            url,
            sha256: pin.sha256.map(str::to_owned),
            to: file.clone(),
        }];
        if let Some(fingerprint) = pin.signed_by {
            steps.push(Step::VerifySignature {
                package: file.clone(),
                key_url: self
                    .settings
                    .signing_key_url
                    .clone()
                    .unwrap_or_else(|| signature::POSIT_KEY_URL.to_owned()),
                fingerprint: fingerprint.to_owned(),
            });
        }
        let argv = |a: &[&str]| Step::Run(a.iter().map(|s| s.to_string()).collect());
        match self.os.family {
            // apt-get takes the verified .deb in the one batched transaction, with r-base and
            // every other service's packages, and resolves its dependencies from the archive.
            Family::Debian => steps.push(Step::Batch(LocalPackage {
                name: package::PACKAGE_NAME.into(),
                version: package::PACKAGE_VERSION.into(),
                path: file,
            })),
            Family::RedHat => {
                // Right after the batch, not in it: R is in EPEL, whose repository exists only
                // once the batch installed epel-release, and needs CRB (EL9) / PowerTools (EL8)
                // enabled by the config-manager plugin from the batch too.
                let repo = if self.os.version_id.starts_with('8') {
                    "powertools"
                } else {
                    "crb"
                };
                steps.push(argv(&["dnf", "config-manager", "--set-enabled", repo]));
                steps.push(argv(&["dnf", "-y", "install", "R", &local]));
            }
        }
        // The package enables and starts its own unit; exoagent supervises rserver instead.
        steps.push(Step::Systemd(vec![
            "systemctl".into(),
            "disable".into(),
            "--now".into(),
            "rstudio-server".into(),
        ]));
        steps.push(Step::Systemd(vec![
            "systemctl".into(),
            "mask".into(),
            "rstudio-server".into(),
        ]));
        steps
    }

    /// `rserver.conf`, one `key=value` per line.
    pub fn rserver_conf(&self, ctx: &ServiceContext) -> String {
        let s = &self.settings;
        // Root can never sign in; a user below 1000 (an old EL account) lowers the floor.
        let min_uid = match ctx.account.uid {
            0 => 1000,
            uid => uid.min(1000),
        };
        let mut text = String::from(
            "# Written by exoagent; edits are overwritten. Sign-in is PAM (/etc/pam.d/rstudio).\n",
        );
        text += &format!("www-address={}\n", self.endpoint.listen.ip());
        text += &format!("www-port={}\n", self.endpoint.listen.port());
        text += &format!("auth-minimum-user-id={min_uid}\n");
        text += &format!("auth-timeout-minutes={}\n", s.auth_timeout_minutes);
        if s.secure_cookies {
            text += "auth-cookies-force-secure=1\n";
        }
        // The public URL comes from Host and X-Forwarded-Proto, which rserver reads itself.
        text
    }

    /// `rsession.conf`.
    pub fn rsession_conf(&self) -> String {
        format!(
            "# Written by exoagent; edits are overwritten.\nsession-timeout-minutes={}\n",
            self.settings.session_timeout_minutes
        )
    }

    fn marker(ctx: &ServiceContext, pin: &Pin) -> (PathBuf, String) {
        let check = match (pin.sha256, pin.signed_by) {
            (Some(sha256), _) => sha256,
            (None, Some(fingerprint)) => fingerprint,
            (None, None) => "",
        };
        (
            Self::payload_dir(ctx).join("installed"),
            format!("{} {} {check}\n", pin.version, pin.build),
        )
    }

    /// The install steps still to run: `None` when a configured `rserver` is used as it is or
    /// the marker says this pin is installed.
    fn pending_steps(&self, ctx: &ServiceContext) -> Result<Option<Vec<Step>>, ServiceError> {
        if self.settings.rserver != Path::new(DEFAULT_RSERVER) {
            return Ok(None);
        }
        let (marker, id) = Self::marker(ctx, &self.pin);
        if std::fs::read_to_string(&marker).is_ok_and(|m| m == id) {
            return Ok(None);
        }
        Ok(Some(self.steps_for(ctx, &self.pin)))
    }

    async fn run_step(&self, ctx: &ServiceContext, step: &Step) -> Result<(), ServiceError> {
        match step {
            Step::Download { url, sha256, to } => {
                package::download_verified(url, sha256.as_deref(), to).await
            }
            Step::VerifySignature {
                package,
                key_url,
                fingerprint,
            } => {
                package::verify_signature(package, key_url, fingerprint, &signature::Tools::default())
                    .await
            }
            // Installed by the batch; after it, the package's rserver must be there (in the
            // sandbox nothing is installed, and this is where that surfaces).
            Step::Batch(local) => {
                let rserver = ctx
                    .paths
                    .system_root
                    .join(Path::new(DEFAULT_RSERVER).strip_prefix("/").unwrap_or(Path::new(DEFAULT_RSERVER)));
                if rserver.is_file() {
                    Ok(())
                } else {
                    Err(ServiceError::Install {
                        service: KIND,
                        detail: format!(
                            "{} is missing: the batched package transaction did not install {} ({})",
                            rserver.display(),
                            local.name,
                            local.path.display()
                        ),
                    })
                }
            }
            Step::Run(argv) => run_install_command(argv).await,
            Step::Systemd(argv) if systemd_is_init(ctx) => run_install_command(argv).await,
            Step::Systemd(argv) => {
                tracing::info!(target: "exoagent::services", service = "rstudio", command = %argv.join(" "), "skipped: systemd is not PID 1");
                Ok(())
            }
        }
    }
}

/// Whether systemd manages the machine at the system root (sd_booted(3)); not so in a
/// container or the sandbox (whose root is its own directory).
fn systemd_is_init(ctx: &ServiceContext) -> bool {
    ctx.paths.system_root.join("run/systemd/system").is_dir()
}

async fn run_install_command(argv: &[String]) -> Result<(), ServiceError> {
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let env = [
        ("DEBIAN_FRONTEND", "noninteractive"),
        ("NEEDRESTART_MODE", "a"),
        ("LC_ALL", "C"),
    ];
    run_logged_with_env(KIND, &argv, &env).await
}

impl ServiceImpl for RStudio {
    const KIND: ServiceKind = KIND;
    const WEB: bool = true;
    type Settings = RStudioSettings;
    type Section = settings::Section;
    const KEYS: &'static [Key<settings::Section>] = settings::KEYS;

    fn settings(
        section: &settings::Section,
        port: Located<u16>,
        check: &mut Checker<'_>,
    ) -> RStudioSettings {
        section.settings(port, check)
    }

    fn settings_port(settings: &RStudioSettings) -> u16 {
        settings.port
    }

    fn planned(settings: RStudioSettings, host: Host<'_>) -> Self {
        let public = SocketAddr::new(settings.bind, settings.port);
        Self::new(settings, host.os.clone()).at(host.web_endpoint(public))
    }

    /// R from the distribution (Debian, Ubuntu universe); on EL what enabling EPEL's R needs.
    fn system_packages(&self, os: &Os) -> Vec<String> {
        match os.family {
            Family::Debian => vec!["r-base".into()],
            Family::RedHat => vec!["epel-release".into(), "dnf-plugins-core".into()],
        }
    }

    /// On Debian/Ubuntu the verified `.deb` (none with a configured `rserver`).
    fn batch_files(&self, ctx: &ServiceContext) -> Vec<LocalPackage> {
        if self.settings.rserver != Path::new(DEFAULT_RSERVER) {
            return Vec::new();
        }
        self.install_steps(ctx)
            .iter()
            .filter_map(Step::batched)
            .cloned()
            .collect()
    }

    fn plan(&self, ctx: &ServiceContext) -> Vec<String> {
        let mut lines = Vec::new();
        if self.settings.rserver != Path::new(DEFAULT_RSERVER) {
            lines.push(format!(
                "use the existing rserver {} (no package is installed)",
                self.settings.rserver.display()
            ));
        } else {
            lines.extend(self.install_steps(ctx).iter().map(Step::to_string));
        }
        lines.push(format!(
            "write {} and rsession.conf: www-address {}, www-port {}, PAM sign-in as {}",
            Self::config_dir(ctx).join("rserver.conf").display(),
            self.endpoint.listen.ip(),
            self.endpoint.listen.port(),
            ctx.account.name
        ));
        lines.push(format!(
            "run {} --server-daemonize=0 under supervision; ready when GET /auth-sign-in answers 200",
            self.settings.rserver.display()
        ));
        lines
    }

    /// Download and verify the pinned package before the batched transaction, so a wrong
    /// checksum or signature stops the service before anything of it (R included) is
    /// installed; on Debian/Ubuntu the verified `.deb` is then offered to that transaction.
    /// Nothing to do once installed, or with a configured `rserver` elsewhere.
    async fn fetch(&self, ctx: &ServiceContext) -> Result<Vec<LocalPackage>, ServiceError> {
        let Some(steps) = self.pending_steps(ctx)? else {
            return Ok(Vec::new());
        };
        let dir = Self::payload_dir(ctx);
        fsutil::ensure_dir(&dir, 0o755).map_err(io_error(KIND, "create", &dir))?;
        for step in steps.iter().filter(|s| s.is_fetch()) {
            self.run_step(ctx, step).await?;
        }
        Ok(steps.iter().filter_map(Step::batched).cloned().collect())
    }

    /// After the batch: on Debian/Ubuntu check that the batch installed the package; on EL
    /// verify the package again and install R and it; then stop and mask the vendor unit.
    /// Idempotent through a marker naming the pin; a configured `rserver` elsewhere is used as
    /// it is.
    async fn install(&self, ctx: &ServiceContext) -> Result<(), ServiceError> {
        if self.settings.rserver != Path::new(DEFAULT_RSERVER) && !self.settings.rserver.is_file()
        {
            return Err(ServiceError::Install {
                service: KIND,
                detail: format!("rserver '{}' does not exist", self.settings.rserver.display()),
            });
        }
        let Some(steps) = self.pending_steps(ctx)? else {
            return Ok(());
        };
        // A file installed here, not in the batch (EL), is verified again right before: the
        // install must never trust a file it did not just check.
        if !steps.iter().any(|s| s.batched().is_some()) {
            self.fetch(ctx).await?;
        }
        for step in steps.iter().filter(|s| !s.is_fetch()) {
            self.run_step(ctx, step).await?;
        }
        let (marker, id) = Self::marker(ctx, &self.pin);
        fsutil::write_if_changed(&marker, id.as_bytes(), 0o644, None)
            .map(drop)
            .map_err(io_error(KIND, "write", &marker))
    }

    /// Write `rserver.conf` and `rsession.conf` (root-owned, world-readable: rsession reads its
    /// file as the user). The passphrase is the instance user's Unix password, set elsewhere.
    async fn configure(
        &self,
        ctx: &ServiceContext,
        _passphrase: &Passphrase,
    ) -> Result<(), ServiceError> {
        let dir = Self::config_dir(ctx);
        fsutil::ensure_dir(&dir, 0o755).map_err(io_error(KIND, "create", &dir))?;
        for (name, text) in [
            ("rserver.conf", self.rserver_conf(ctx)),
            ("rsession.conf", self.rsession_conf()),
        ] {
            let path = dir.join(name);
            fsutil::write_if_changed(&path, text.as_bytes(), 0o644, None)
                .map_err(io_error(KIND, "write", &path))?;
        }
        ctx.ensure_home(KIND)
    }

    /// rserver in the foreground with our config, as the agent's user (root on an instance):
    /// it switches to each signed-in user for their rsession itself.
    fn run_spec(&self, ctx: &ServiceContext) -> RunSpec {
        let dir = Self::config_dir(ctx);
        RunSpec {
            argv: vec![
                self.settings.rserver.to_string_lossy().into_owned(),
                "--server-daemonize=0".into(),
                format!("--config-file={}", dir.join("rserver.conf").display()),
            ],
            env: vec![
                (
                    "PATH".into(),
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                ),
                ("LANG".into(), "C.UTF-8".into()),
                // Where rserver and rsession look for rsession.conf and the rest.
                ("RSTUDIO_CONFIG_DIR".into(), dir.to_string_lossy().into_owned()),
            ],
            cwd: PathBuf::from("/"),
            run_as: None,
        }
    }

    /// `GET /auth-sign-in` with a browser's User-Agent must answer 200.
    fn probe(&self) -> Probe {
        let addr = self.endpoint().probe_addr();
        Probe::Http {
            addr,
            path: "/auth-sign-in".into(),
            host: addr.to_string(),
            expect_json_key: None,
            user_agent: Some(BROWSER_USER_AGENT.into()),
        }
    }

    fn start_timeout(&self) -> Duration {
        self.settings.start_timeout
    }

    fn endpoint(&self) -> Endpoint {
        self.endpoint
    }

    fn url(&self) -> String {
        self.endpoint.local_url("/")
    }

    /// RStudio Server runs one `rsession` per open session; it exits once the session is
    /// suspended (`session-timeout-minutes`), so a forgotten tab does not count for ever.
    fn activity(&self) -> Vec<super::ActivitySign> {
        vec![super::ActivitySign::Process("rsession")]
    }
}

#[cfg(test)]
mod signature_tests;
#[cfg(test)]
mod tests;
