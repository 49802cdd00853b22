//! JupyterLab: a hash-pinned virtual environment under the opt directory, a JSON server config
//! for running behind the UAP (remote access, forwarded headers, passphrase hash, no token),
//! run as the instance user, ready when `GET {base_url}api` answers 200 with a `version`. With a
//! workflow ([`workflow`]), the environment is the one built from the workflow's repository and
//! JupyterLab runs in its checkout.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

pub mod activity;
pub mod link;
pub mod settings;
pub mod workflow;

use super::{io_error, Endpoint, Host, ServiceContext, ServiceError, ServiceImpl};
use crate::schema::{Checker, Key, Located};
pub use settings::{JupyterLabSettings, PythonInstaller};
use crate::fsutil;
use crate::model::ServiceKind;
use crate::platform::exec::find_on_path;
use crate::platform::os::{Family, Os};
use crate::platform::packages::{PackageInstaller, PackageItem, PackageSettings};
use crate::platform::passphrase::{argon2_verify, Passphrase};
use link::LinkToken;
use crate::platform::uv::{self, UvSource, UV_VERSION};
use crate::services::command::{run_logged, run_logged_with_env};
use crate::supervise::{Probe, RunSpec};

/// The Python configuration JupyterLab is started with: it loads the agent's JSON configuration
/// beside it, waiting (bounded) for it on a first boot, and makes JupyterLab exit without it.
pub const CONFIG_LOADER: &str = include_str!("jupyter_server_config.py");

/// The pinned, hash-locked requirements, generated from `requirements.in` with
/// `uv pip compile --universal --python-version 3.9 --generate-hashes requirements.in -o requirements.txt`
/// (the previous lock given as `-o`, so uv keeps its pins where they still fit). One lock for
/// every Python the agent accepts: its lines carry environment markers, so Python 3.10 and
/// newer install JupyterLab 4.6 and Python 3.9 (Debian 11) JupyterLab 4.5, the newest that
/// supports it. pip and uv pick the lines whose markers match the venv's interpreter.
pub const REQUIREMENTS: &str = include_str!("requirements.txt");

/// The lowest Python the lock has pins for (its `--python-version`): Debian 11's python3.
const MIN_PYTHON: (u32, u32) = (3, 9);

/// Interpreters tried, newest first, when none is configured. `python3.9` before `python3`:
/// on EL 8 python3 is 3.6 while the `python39` package adds `python3.9`.
const PYTHON_CANDIDATES: [&str; 6] = [
    "python3.13",
    "python3.12",
    "python3.11",
    "python3.10",
    "python3.9",
    "python3",
];

/// Whether `candidate`, which reported `major.minor`, can run the lock's JupyterLab; if not,
/// why (naming the interpreter and its version), for the install error.
fn python_supported(candidate: &str, (major, minor): (u32, u32)) -> Result<(), String> {
    if (major, minor) >= MIN_PYTHON {
        Ok(())
    } else {
        Err(format!(
            "{candidate} is Python {major}.{minor}, older than {}.{} (the oldest the JupyterLab lock has pins for)",
            MIN_PYTHON.0, MIN_PYTHON.1
        ))
    }
}

/// JupyterLab as configured.
#[derive(Debug, Clone)]
pub struct JupyterLab {
    settings: JupyterLabSettings,
    endpoint: Endpoint,
    family: Family,
    /// Where uv comes from when the machine has none on `PATH`.
    uv_source: UvSource,
}

impl JupyterLab {
    /// JupyterLab with the given settings.
    pub fn new(settings: JupyterLabSettings) -> Self {
        let endpoint = Endpoint::direct(SocketAddr::new(settings.bind, settings.port));
        Self {
            settings,
            endpoint,
            family: Family::Debian,
            uv_source: UvSource::from_environment(),
        }
    }

    /// The same, fetching uv (when none is on `PATH`) from `source`.
    pub fn with_uv_source(mut self, source: UvSource) -> Self {
        self.uv_source = source;
        self
    }

    /// The same, reached at `endpoint` (behind the TLS front).
    pub fn at(mut self, endpoint: Endpoint) -> Self {
        self.endpoint = endpoint;
        self
    }

    /// The virtual environment.
    pub fn venv(ctx: &ServiceContext) -> PathBuf {
        ctx.paths.opt_dir.join("jupyterlab/venv")
    }

    fn config_file(ctx: &ServiceContext) -> PathBuf {
        Self::server_config_path(&ctx.paths)
    }

    /// The server configuration JupyterLab runs with (it holds the passphrase's hash).
    pub fn server_config_path(paths: &crate::paths::Paths) -> PathBuf {
        paths
            .service_state_dir(ServiceKind::JupyterLab)
            .join("jupyter_server_config.json")
    }

    /// [`CONFIG_LOADER`]'s file, beside [`Self::config_file`] with the same base name: traitlets
    /// loads `<base>.py` then `<base>.json` for `--config=<base>.json`, so JupyterLab's argv
    /// stays what it was before the loader existed, and a JupyterLab started by an older agent
    /// is adopted across an upgrade instead of restarted (its kernels kept).
    fn loader_file(ctx: &ServiceContext) -> PathBuf {
        Self::config_file(ctx).with_extension("py")
    }

    fn lock_marker(venv: &Path) -> PathBuf {
        venv.join(".exoagent-requirements")
    }

    async fn find_python(&self) -> Result<String, ServiceError> {
        let candidates: Vec<String> = match &self.settings.python {
            Some(p) => vec![p.to_string_lossy().into_owned()],
            None => PYTHON_CANDIDATES.iter().map(|s| s.to_string()).collect(),
        };
        let mut seen = Vec::new();
        for candidate in &candidates {
            let output = tokio::process::Command::new(candidate)
                .args([
                    "-c",
                    "import sys, venv; print(sys.version_info[0], sys.version_info[1])",
                ])
                .stdin(std::process::Stdio::null())
                .output()
                .await;
            let Ok(output) = output else { continue };
            let text = String::from_utf8_lossy(&output.stdout);
            let mut parts = text
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok());
            if let (true, Some(major), Some(minor)) =
                (output.status.success(), parts.next(), parts.next())
            {
                match python_supported(candidate, (major, minor)) {
                    Ok(()) => return Ok(candidate.clone()),
                    Err(why) => seen.push(why),
                }
            } else if !output.status.success() {
                seen.push(format!("{candidate} has no venv module"));
            }
        }
        Err(ServiceError::Install {
            service: ServiceKind::JupyterLab,
            detail: format!(
                "no Python >= {}.{} with the venv module found (tried {}{}{})",
                MIN_PYTHON.0,
                MIN_PYTHON.1,
                candidates.join(", "),
                if seen.is_empty() { "" } else { "; " },
                seen.join(", ")
            ),
        })
    }

    /// The server configuration document (JSON, so no value can inject code).
    pub fn server_config(
        &self,
        ctx: &ServiceContext,
        hashed_password: &str,
        link: Option<&LinkToken>,
    ) -> serde_json::Value {
        // A workflow opens in its checkout, at its path.
        let root_dir = match &self.settings.workflow {
            Some(workflow) => workflow::build::checkout_dir(ctx, workflow),
            None => ctx.account.home.clone(),
        };
        let mut config = json!({
            "ServerApp": {
                "ip": self.endpoint().listen.ip().to_string(),
                "port": self.endpoint().listen.port(),
                "port_retries": 0,
                "open_browser": false,
                "base_url": self.settings.base_url,
                "allow_remote_access": true,
                "trust_xheaders": true,
                "root_dir": root_dir.to_string_lossy(),
                "allow_root": ctx.account.uid == 0,
            },
            // Exosphere's notebook link carries this token; the passphrase logs in as well.
            "IdentityProvider": { "token": link.map(LinkToken::expose).unwrap_or("") },
            "PasswordIdentityProvider": {
                "hashed_password": hashed_password,
                "allow_password_change": false,
                "password_required": true,
            },
        });
        if let Some(workflow) = &self.settings.workflow {
            // JupyterLab's own default URL wins over the server's: set both.
            config["ServerApp"]["default_url"] = json!(workflow.path);
            config["LabApp"] = json!({ "default_url": workflow.path });
        }
        config
    }
}

impl JupyterLab {
    /// The link's token, prepared before JupyterLab starts ([`link::prepare`]), when the link
    /// is offered.
    fn link_token(&self, ctx: &ServiceContext) -> Result<Option<LinkToken>, crate::platform::passphrase::SecretError> {
        if !self.settings.exosphere_link {
            return Ok(None);
        }
        LinkToken::load(&ctx.paths.jupyterlab_link_token())
    }
}

impl JupyterLab {
    /// The uv executable the settings allow: the one on `PATH`, else the pinned release fetched
    /// from the package index into `<opt>/tools`. With `installer = "auto"` pip takes over when
    /// neither can be had (the reason logged); with `installer = "uv"` that is an error.
    async fn uv(&self, ctx: &ServiceContext) -> Result<Option<PathBuf>, ServiceError> {
        if self.settings.installer == PythonInstaller::Pip {
            return Ok(None);
        }
        if let Some(uv) = find_on_path("uv") {
            return Ok(Some(uv));
        }
        match self.uv_source.ensure(&ctx.paths.opt_dir.join("tools")).await {
            Ok(uv) => Ok(Some(uv)),
            Err(e) if self.settings.installer == PythonInstaller::Auto => {
                tracing::warn!(target: "exoagent::services", service = "jupyterlab", reason = e.reason(), "no uv on PATH and the pinned uv could not be fetched ({e}); installing with pip");
                Ok(None)
            }
            Err(e) => Err(ServiceError::Install {
                service: ServiceKind::JupyterLab,
                detail: format!(
                    "installer = \"uv\" but no uv is on PATH and uv {UV_VERSION} could not be fetched: {e}"
                ),
            }),
        }
    }

    /// On Debian and Ubuntu, python3-venv (ensurepip, which `python -m venv` needs) when pip
    /// took over from uv: left out of the batch then ([`ServiceImpl::system_packages`]), so
    /// installed here, only when missing. The sandbox installs nothing.
    async fn ensure_python_venv(&self, ctx: &ServiceContext) -> Result<(), ServiceError> {
        if self.family != Family::Debian
            || self.settings.installer == PythonInstaller::Pip
            || ctx.paths.system_root != Path::new("/")
        {
            return Ok(());
        }
        let installer = PackageInstaller::new(self.family.package_manager(), &PackageSettings::default());
        installer
            .install(&[PackageItem::Named("python3-venv".into())])
            .await
            .map(drop)
            .map_err(|e| ServiceError::Refused {
                service: ServiceKind::JupyterLab,
                reason: e.reason(),
                detail: e.to_string(),
            })
    }

    /// Build (or reuse) the workflow's environment; see [`workflow::build`].
    async fn install_workflow(
        &self,
        ctx: &ServiceContext,
        workflow: &workflow::WorkflowSettings,
    ) -> Result<(), ServiceError> {
        let lock_id = lock_fingerprint();
        let inputs = workflow::build::Inputs {
            workflow,
            ctx,
            family: self.family,
            installer: self.settings.installer,
            uv: self.uv(ctx).await?,
            // Needed only when the repository names no Python (runtime.txt may ask uv for one).
            default_python: self.find_python().await.map_err(|e| e.to_string()),
            lock: REQUIREMENTS,
            lock_id: &lock_id,
        };
        let built = workflow::build::build(&inputs)
            .await
            .map_err(workflow::WorkflowError::into_service_error)?;
        tracing::info!(target: "exoagent::services", service = "jupyterlab", commit = %built.checkout.commit, key = %built.key, fresh = built.fresh, "workflow environment ready");
        Ok(())
    }

    /// JupyterLab from the workflow's environment (through `<opt>/workflows/current`), in its
    /// checkout, wrapped in the repository's `start` when it has one (repo2docker's contract:
    /// `start` ends with `exec "$@"`).
    fn workflow_run_spec(&self, ctx: &ServiceContext, workflow: &workflow::WorkflowSettings) -> RunSpec {
        let current = workflow::current_link(&ctx.paths.opt_dir);
        let venv = current.join("venv");
        let checkout = workflow::build::checkout_dir(ctx, workflow);
        // Whether the repository has a `start` is decided when JupyterLab is launched (the
        // spec is fixed before the first build may have cloned anything): a constant script,
        // the checkout and JupyterLab's argv as its arguments.
        let argv = vec![
            "/bin/sh".to_owned(),
            "-c".to_owned(),
            workflow::START_SCRIPT.to_owned(),
            "exoagent-workflow-start".to_owned(),
            checkout.to_string_lossy().into_owned(),
            venv.join("bin/jupyter-lab").to_string_lossy().into_owned(),
            format!("--config={}", Self::config_file(ctx).to_string_lossy()),
        ];
        let path = format!(
            "{}:/usr/local/bin:/usr/bin:/bin",
            venv.join("bin").to_string_lossy()
        );
        let mut env = ctx.login_env(&path);
        env.extend([
            ("PYTHONUNBUFFERED".to_owned(), "1".to_owned()),
            ("VIRTUAL_ENV".to_owned(), venv.to_string_lossy().into_owned()),
            // Which build runs (a new commit restarts JupyterLab instead of adopting it).
            (
                "EXOAGENT_WORKFLOW_BUILD".to_owned(),
                std::fs::read_link(&current)
                    .map(|k| k.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ),
        ]);
        if let Some(token) = self.link_token(ctx).ok().flatten() {
            env.push(("EXOAGENT_LINK_TOKEN_ID".to_owned(), token.fingerprint()));
        }
        RunSpec {
            argv,
            env,
            cwd: checkout,
            run_as: ctx.run_as(),
        }
    }
}

impl JupyterLab {
    /// Hash the passphrase (or keep the config's hash while it matches) and write the server
    /// config, 0600, owned by the service account, when it changed.
    async fn write_config(
        &self,
        ctx: &ServiceContext,
        passphrase: &Passphrase,
        token: Option<&LinkToken>,
    ) -> Result<(), ServiceError> {
        let path = Self::config_file(ctx);
        // argon2 is slow on purpose: off the runtime. The hash the agent started when it made
        // the passphrase is picked up here (waited for when still being computed).
        let (current, hashing) = (path.clone(), passphrase.clone());
        let hashed = tokio::task::spawn_blocking(move || {
            match current_hash(&current).filter(|h| argon2_verify(&hashing, h)) {
                Some(hashed) => Ok(hashed),
                None => hashing.argon2_once(),
            }
        })
        .await
        .map_err(|e| ServiceError::Configure {
            service: ServiceKind::JupyterLab,
            detail: format!("hashing the passphrase stopped: {e}"),
        })?
        .map_err(|e| ServiceError::Configure {
            service: ServiceKind::JupyterLab,
            detail: e.to_string(),
        })?;
        let config = serde_json::to_vec_pretty(&self.server_config(ctx, &hashed, token)).map_err(
            |e| ServiceError::Configure {
                service: ServiceKind::JupyterLab,
                detail: e.to_string(),
            },
        )?;
        fsutil::write_if_changed(
            &path,
            &config,
            0o600,
            Some((ctx.account.uid, ctx.account.gid)),
        )
        .map(drop)
        .map_err(io_error(ServiceKind::JupyterLab, "write", &path))
    }
}

/// The password hash in an existing server config, if any.
fn current_hash(config: &Path) -> Option<String> {
    let text = std::fs::read(config).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&text).ok()?;
    value["PasswordIdentityProvider"]["hashed_password"]
        .as_str()
        .map(str::to_owned)
}

impl ServiceImpl for JupyterLab {
    const KIND: ServiceKind = ServiceKind::JupyterLab;
    const WEB: bool = true;
    type Settings = JupyterLabSettings;
    type Section = settings::Section;
    const KEYS: &'static [Key<settings::Section>] = settings::KEYS;

    fn settings(section: &settings::Section, port: Located<u16>, check: &mut Checker<'_>) -> JupyterLabSettings {
        section.settings(port, check)
    }

    fn settings_port(settings: &JupyterLabSettings) -> u16 {
        settings.port
    }

    fn planned(settings: JupyterLabSettings, host: Host<'_>) -> Self {
        let public = SocketAddr::new(settings.bind, settings.port);
        let mut lab = Self::new(settings).at(host.web_endpoint(public));
        lab.family = host.os.family;
        lab
    }

    /// System packages the venv needs, batched with every other service's. On Debian and
    /// Ubuntu python3-venv (ensurepip) only when pip makes the venv: uv makes it without, so a
    /// stock cloud image needs no package transaction for JupyterLab (a fallback to pip
    /// installs it then, see [`Self::ensure_python_venv`]). A workflow's builds may fall back
    /// to pip as the instance user, so they keep it in the batch.
    fn system_packages(&self, os: &Os) -> Vec<String> {
        let needs_venv_module =
            self.settings.installer == PythonInstaller::Pip || self.settings.workflow.is_some();
        let mut packages: Vec<String> = match os.family {
            Family::Debian if needs_venv_module => vec!["python3".into(), "python3-venv".into()],
            Family::Debian => vec!["python3".into()],
            // EL 8/9 ship 3.6/3.9 as python3; AppStream's 3.11 gets the lock's JupyterLab 4.6
            // (3.9 would get 4.5, the newest for it).
            Family::RedHat => vec!["python3.11".into()],
        };
        if self.settings.workflow.is_some() {
            packages.push("git".into());
        }
        packages
    }

    /// Human-readable plan steps for `exoagent validate`.
    fn plan(&self, ctx: &ServiceContext) -> Vec<String> {
        let mut lines = match &self.settings.workflow {
            Some(workflow) => workflow::build::plan_lines(ctx, workflow),
            None => Vec::new(),
        };
        let venv = match &self.settings.workflow {
            Some(_) => workflow::current_link(&ctx.paths.opt_dir).join("venv"),
            None => Self::venv(ctx),
        };
        lines.extend([
            format!(
                "create venv {} and install the hash-pinned JupyterLab lock ({} pins; each line's marker picks those for the venv's Python, 3.9 or newer) with {}",
                venv.display(),
                REQUIREMENTS
                    .lines()
                    .filter(|l| l.contains("==") && !l.trim_start().starts_with('#'))
                    .count(),
                match self.settings.installer {
                    PythonInstaller::Auto => "uv when available, pip otherwise",
                    PythonInstaller::Uv => "uv",
                    PythonInstaller::Pip => "pip",
                }
            ),
            format!(
                "write {} (0600, owner {}; {} beside it waits for it when JupyterLab starts first): ip {}, port {}, base_url {}, remote access, trusted forwarded headers, passphrase hash, no token",
                Self::config_file(ctx).display(),
                ctx.account.name,
                Self::loader_file(ctx).display(),
                self.endpoint.listen.ip(),
                self.endpoint.listen.port(),
                self.settings.base_url
            ),
            format!(
                "run jupyter-lab as {} under supervision; ready when GET {}api answers 200 with a version",
                ctx.account.name, self.settings.base_url
            ),
        ]);
        lines
    }

    /// Create the venv and install the lock. Idempotent: a venv whose marker matches the lock is
    /// left alone; the marker is written only after a successful install.
    async fn install(&self, ctx: &ServiceContext) -> Result<(), ServiceError> {
        if let Some(workflow) = &self.settings.workflow {
            return self.install_workflow(ctx, workflow).await;
        }
        let venv = Self::venv(ctx);
        let marker = Self::lock_marker(&venv);
        let lock_id = lock_fingerprint();
        if std::fs::read_to_string(&marker).is_ok_and(|m| m.trim() == lock_id) {
            tracing::info!(target: "exoagent::services", service = "jupyterlab", "venv up to date");
            return Ok(());
        }
        let python = self.find_python().await?;
        let parent = venv.parent().unwrap_or(Path::new("/"));
        fsutil::ensure_dir(parent, 0o755).map_err(|source| ServiceError::Io {
            service: ServiceKind::JupyterLab,
            action: "create",
            path: parent.to_path_buf(),
            source,
        })?;
        let requirements = parent.join("requirements.txt");
        fsutil::write_if_changed(&requirements, REQUIREMENTS.as_bytes(), 0o644, None).map_err(
            |source| ServiceError::Io {
                service: ServiceKind::JupyterLab,
                action: "write",
                path: requirements.clone(),
                source,
            },
        )?;
        let uv = self.uv(ctx).await?;
        let venv_s = venv.to_string_lossy().into_owned();
        let req_s = requirements.to_string_lossy().into_owned();
        let venv_python = venv.join("bin/python").to_string_lossy().into_owned();
        match uv {
            Some(uv) => {
                let uv = uv.to_string_lossy().into_owned();
                let env = uv::tls_env();
                let env: Vec<(&str, &str)> =
                    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                // uv makes the venv itself: no python3-venv (ensurepip) needed. A venv already
                // there (a new lock) is installed into in place: JupyterLab may be running
                // from it; a directory without an interpreter is what an interrupted start left.
                if !venv.join("bin/python").exists() {
                    if venv.exists() {
                        std::fs::remove_dir_all(&venv)
                            .map_err(io_error(ServiceKind::JupyterLab, "remove", &venv))?;
                    }
                    run_logged_with_env(
                        ServiceKind::JupyterLab,
                        &[&uv, "venv", "--quiet", "--python", &python, &venv_s],
                        &env,
                    )
                    .await?;
                }
                // Compiled once here, as root: the venv is not writable by the user JupyterLab
                // runs as, so uncompiled modules would be compiled again at every start.
                run_logged_with_env(
                    ServiceKind::JupyterLab,
                    &[
                        &uv,
                        "pip",
                        "install",
                        "--python",
                        &venv_python,
                        "--require-hashes",
                        "--compile-bytecode",
                        "-r",
                        &req_s,
                    ],
                    &env,
                )
                .await?;
            }
            None => {
                self.ensure_python_venv(ctx).await?;
                run_logged(ServiceKind::JupyterLab, &[&python, "-m", "venv", &venv_s]).await?;
                run_logged(
                    ServiceKind::JupyterLab,
                    &[
                        &venv_python,
                        "-m",
                        "pip",
                        "install",
                        "--disable-pip-version-check",
                        "--no-input",
                        "--require-hashes",
                        "-r",
                        &req_s,
                    ],
                )
                .await?;
            }
        }
        fsutil::write_if_changed(&marker, lock_id.as_bytes(), 0o644, None).map(drop).map_err(|source| {
            ServiceError::Io {
                service: ServiceKind::JupyterLab,
                action: "write",
                path: marker.clone(),
                source,
            }
        })
    }

    /// Write the server config (0600, owned by the service account) when it changed, so a changed
    /// port or base URL takes effect, and the loader JupyterLab starts with. The existing hash is
    /// kept while it matches the passphrase: a fresh salt would rewrite an unchanged file, and
    /// fail on a full disk.
    ///
    /// With no server config yet (a first boot), the argon2 hash (seconds under emulation) is
    /// not waited for: the config is written by a task of its own once the hash is ready, and
    /// JupyterLab, started meanwhile, waits for it in its loader ([`CONFIG_LOADER`]) while its
    /// imports take longer than the hash. A config that exists is checked and rewritten before
    /// this returns, as the running or next JupyterLab would otherwise read the old one.
    async fn configure(
        &self,
        ctx: &ServiceContext,
        passphrase: &Passphrase,
    ) -> Result<(), ServiceError> {
        let path = Self::config_file(ctx);
        let token = self.link_token(ctx).map_err(|e| ServiceError::Configure {
            service: ServiceKind::JupyterLab,
            detail: format!("Exosphere's notebook link: {e}"),
        })?;
        let dir = path.parent().unwrap_or(Path::new("/"));
        let io_err = |action, path| io_error(ServiceKind::JupyterLab, action, path);
        fsutil::ensure_dir(dir, 0o711).map_err(io_err("create", dir))?;
        let loader = Self::loader_file(ctx);
        fsutil::write_if_changed(&loader, CONFIG_LOADER.as_bytes(), 0o644, None)
            .map_err(io_err("write", &loader))?;
        ctx.ensure_home(ServiceKind::JupyterLab)?;
        if std::fs::symlink_metadata(&path).is_ok() {
            return self.write_config(ctx, passphrase, token.as_ref()).await;
        }
        tracing::info!(target: "exoagent::services", service = "jupyterlab", "no server configuration yet: JupyterLab may start, its loader waits for the configuration");
        let (lab, ctx, passphrase) = (self.clone(), ctx.clone(), passphrase.clone());
        // Detached: it ends once the file is written. A failure (a full disk) is retried, so a
        // JupyterLab restarted by its supervisor finds the file once the cause is gone.
        drop(tokio::spawn(async move {
            let mut delay = Duration::from_secs(2);
            loop {
                match lab.write_config(&ctx, &passphrase, token.as_ref()).await {
                    Ok(()) => {
                        tracing::info!(target: "exoagent::services", service = "jupyterlab", "server configuration written");
                        return;
                    }
                    Err(e) => {
                        tracing::error!(target: "exoagent::services", service = "jupyterlab", reason = e.reason(), delay_s = delay.as_secs(), "server configuration not written ({e}); JupyterLab does not start without it; trying again");
                    }
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(60));
            }
        }));
        Ok(())
    }

    /// How the supervisor starts it: the venv's `jupyter-lab` with our config, a clean
    /// environment, as the instance user.
    fn run_spec(&self, ctx: &ServiceContext) -> RunSpec {
        if let Some(workflow) = &self.settings.workflow {
            return self.workflow_run_spec(ctx, workflow);
        }
        let venv = Self::venv(ctx);
        let account = &ctx.account;
        let path = format!(
            "{}:/usr/local/bin:/usr/bin:/bin",
            venv.join("bin").to_string_lossy()
        );
        RunSpec {
            argv: vec![
                venv.join("bin/jupyter-lab").to_string_lossy().into_owned(),
                format!("--config={}", Self::config_file(ctx).to_string_lossy()),
            ],
            env: vec![
                ("HOME".into(), account.home.to_string_lossy().into_owned()),
                ("USER".into(), account.name.clone()),
                ("LOGNAME".into(), account.name.clone()),
                ("SHELL".into(), "/bin/bash".into()),
                ("PATH".into(), path),
                ("LANG".into(), "C.UTF-8".into()),
                ("PYTHONUNBUFFERED".into(), "1".into()),
            ]
            .into_iter()
            // Which link token the config holds (a digest, not the token): a rotated token
            // changes the spec, so JupyterLab restarts with it instead of being adopted.
            .chain(self.link_token(ctx).ok().flatten().map(|t| {
                ("EXOAGENT_LINK_TOKEN_ID".to_owned(), t.fingerprint())
            }))
            .collect(),
            cwd: account.home.clone(),
            run_as: ctx.run_as(),
        }
    }

    /// `GET {base_url}api` on loopback (or the bound address) must answer 200 with a version.
    fn probe(&self) -> Probe {
        let addr = self.endpoint().probe_addr();
        Probe::Http {
            addr,
            path: format!("{}api", self.settings.base_url),
            host: addr.to_string(),
            expect_json_key: Some("version".into()),
            user_agent: None,
        }
    }

    /// How long from launch to the first good probe.
    fn start_timeout(&self) -> Duration {
        self.settings.start_timeout
    }

    /// The port.
    fn endpoint(&self) -> Endpoint {
        self.endpoint
    }

    /// Where a person on the instance reaches it.
    fn url(&self) -> String {
        match &self.settings.workflow {
            // Where the workflow opens (under the base URL).
            Some(workflow) => self.endpoint.local_url(&format!(
                "{}{}",
                self.settings.base_url.trim_end_matches('/'),
                workflow.path
            )),
            None => self.endpoint.local_url(&self.settings.base_url),
        }
    }

    /// Its own account of kernel, terminal and API activity ([`activity`]).
    fn activity(&self) -> Vec<super::ActivitySign> {
        vec![super::ActivitySign::JupyterLab {
            addr: self.endpoint().probe_addr(),
            base_url: self.settings.base_url.clone(),
        }]
    }
}

/// Identifies the lock content, so a changed lock reinstalls.
fn lock_fingerprint() -> String {
    // FNV-1a: stable across Rust versions, unlike `DefaultHasher`.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in REQUIREMENTS.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("fnv1a64:{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paths::Paths;
    use crate::services::Account;

    fn ctx(uid: u32) -> ServiceContext {
        ServiceContext {
            paths: Paths::sandbox(Path::new("/sb")),
            account: Account {
                name: "exouser".into(),
                uid,
                gid: uid,
                home: "/home/exouser".into(),
            },
            exe: "/usr/bin/exoagent".into(),
        }
    }

    #[test]
    fn server_config_is_what_the_uap_needs() {
        let lab = JupyterLab::new(JupyterLabSettings::default());
        let cfg = lab.server_config(&ctx(1000), "argon2:$argon2id$x", None);
        assert_eq!(cfg["ServerApp"]["allow_remote_access"], true);
        assert_eq!(cfg["ServerApp"]["trust_xheaders"], true);
        assert_eq!(cfg["ServerApp"]["port"], 8888);
        assert_eq!(cfg["ServerApp"]["port_retries"], 0);
        assert_eq!(cfg["ServerApp"]["ip"], "0.0.0.0");
        assert_eq!(cfg["ServerApp"]["allow_root"], false);
        assert_eq!(cfg["IdentityProvider"]["token"], "");
        assert_eq!(
            cfg["PasswordIdentityProvider"]["hashed_password"],
            "argon2:$argon2id$x"
        );
    }

    #[test]
    fn python3_venv_is_asked_for_only_when_pip_makes_the_venv() {
        let os = crate::agent::fixtures::debian12();
        let auto = JupyterLab::new(JupyterLabSettings::default());
        assert_eq!(auto.system_packages(&os), ["python3"]);
        let pip = JupyterLab::new(JupyterLabSettings {
            installer: PythonInstaller::Pip,
            ..JupyterLabSettings::default()
        });
        assert_eq!(pip.system_packages(&os), ["python3", "python3-venv"]);
    }

    #[test]
    fn probe_targets_loopback_when_bound_to_all() {
        let lab = JupyterLab::new(JupyterLabSettings::default());
        match lab.probe() {
            Probe::Http {
                addr,
                path,
                expect_json_key,
                ..
            } => {
                assert_eq!(addr.to_string(), "127.0.0.1:8888");
                assert_eq!(path, "/api");
                assert_eq!(expect_json_key.as_deref(), Some("version"));
            }
            other => panic!("expected an HTTP probe, got {other:?}"),
        }
        assert_eq!(lab.url(), "http://127.0.0.1:8888/");
    }

    #[test]
    fn run_spec_has_no_secret_and_a_clean_env() {
        let lab = JupyterLab::new(JupyterLabSettings::default());
        let spec = lab.run_spec(&ctx(1000));
        assert!(spec.argv[0].ends_with("venv/bin/jupyter-lab"));
        assert_eq!(
            spec.argv[1],
            "--config=/sb/var/lib/exoagent/services/jupyterlab/jupyter_server_config.json"
        );
        assert!(spec.env.iter().all(|(k, _)| k != "JUPYTER_TOKEN"));
        assert_eq!(spec.cwd, PathBuf::from("/home/exouser"));
    }

    #[test]
    fn a_workflow_runs_from_the_current_build_in_its_checkout_whatever_is_on_disk() {
        let settings = JupyterLabSettings {
            workflow: Some(workflow::WorkflowSettings {
                repository: "https://github.com/org/demo.git".into(),
                git_ref: "HEAD".into(),
                path: "/lab/tree/a.ipynb".into(),
            }),
            ..JupyterLabSettings::default()
        };
        let lab = JupyterLab::new(settings);
        let spec = lab.run_spec(&ctx(1000));
        assert_eq!(lab.url(), "http://127.0.0.1:8888/lab/tree/a.ipynb");
        assert_eq!(spec.argv[..2], ["/bin/sh", "-c"]);
        assert_eq!(spec.argv[2], workflow::START_SCRIPT);
        assert_eq!(spec.argv[4], "/home/exouser/demo");
        assert_eq!(spec.argv[5], "/sb/opt/exoagent/workflows/current/venv/bin/jupyter-lab");
        assert_eq!(spec.cwd, PathBuf::from("/home/exouser/demo"));
        let cfg = lab.server_config(&ctx(1000), "h", None);
        assert_eq!(cfg["ServerApp"]["root_dir"], "/home/exouser/demo");
        assert_eq!(cfg["LabApp"]["default_url"], "/lab/tree/a.ipynb");
        assert_eq!(cfg["ServerApp"]["default_url"], "/lab/tree/a.ipynb");
        // Without a workflow, JupyterLab's own defaults.
        let plain = JupyterLab::new(JupyterLabSettings::default()).server_config(&ctx(1000), "h", None);
        assert!(plain.get("LabApp").is_none());
    }

    /// The `jupyterlab==` pin the lock's markers select for Python `major.minor` (the lock's
    /// markers on it are `python_full_version < 'X.Y'` / `>= 'X.Y'`, or none).
    fn jupyterlab_pin_for(python: (u32, u32)) -> Vec<String> {
        let version_of = |v: &str| -> (u32, u32) {
            let mut parts = v.trim_matches('\'').split('.').map(|p| p.parse::<u32>().unwrap());
            (parts.next().unwrap(), parts.next().unwrap())
        };
        REQUIREMENTS
            .lines()
            .filter_map(|line| line.strip_prefix("jupyterlab=="))
            .filter_map(|rest| {
                let rest = rest.trim_end_matches(['\\', ' ']);
                let Some((version, marker)) = rest.split_once(';') else {
                    return Some(rest.trim().to_owned());
                };
                let words: Vec<&str> = marker.split_whitespace().collect();
                let applies = match words.as_slice() {
                    ["python_full_version", "<", bound] => python < version_of(bound),
                    ["python_full_version", ">=", bound] => python >= version_of(bound),
                    other => panic!("a marker this test does not read: {other:?}"),
                };
                applies.then(|| version.trim().to_owned())
            })
            .collect()
    }

    #[test]
    fn each_accepted_python_gets_one_jupyterlab_from_the_lock() {
        // Debian 11's python3 gets JupyterLab 4.5, the newest that supports it.
        assert_eq!(jupyterlab_pin_for((3, 9)), ["4.5.11"]);
        for minor in 10..=14 {
            assert_eq!(jupyterlab_pin_for((3, minor)), ["4.6.6"], "Python 3.{minor}");
        }
        // The lock was compiled for the oldest Python the agent accepts.
        assert!(
            REQUIREMENTS.contains(&format!("--python-version {}.{} ", MIN_PYTHON.0, MIN_PYTHON.1)),
            "the lock's header names --python-version {}.{}",
            MIN_PYTHON.0,
            MIN_PYTHON.1
        );
    }

    #[test]
    fn python_selection_accepts_3_9_and_newer_and_names_what_it_refuses() {
        assert_eq!(python_supported("python3", (3, 9)), Ok(()));
        for minor in 10..=13 {
            assert_eq!(python_supported(&format!("python3.{minor}"), (3, minor)), Ok(()));
        }
        let refused = python_supported("/usr/bin/python3", (3, 8)).unwrap_err();
        assert_eq!(
            refused,
            "/usr/bin/python3 is Python 3.8, older than 3.9 (the oldest the JupyterLab lock has pins for)"
        );
        assert!(python_supported("python2", (2, 7)).is_err());
        // 3.9 is tried by name before python3 (EL 8: python3 is 3.6, python39 adds python3.9).
        let at = |name: &str| PYTHON_CANDIDATES.iter().position(|c| *c == name).unwrap();
        assert!(at("python3.10") < at("python3.9") && at("python3.9") < at("python3"));
    }

    #[test]
    fn the_lock_pins_jupyterlab_with_hashes() {
        assert!(REQUIREMENTS.contains("jupyterlab==4.6.6"));
        let pinned = REQUIREMENTS
            .lines()
            .filter(|l| !l.trim_start().starts_with('#') && l.contains("=="))
            .count();
        let hashed = REQUIREMENTS.matches("--hash=sha256:").count();
        assert!(
            pinned > 50 && hashed >= pinned,
            "{pinned} pinned, {hashed} hashes"
        );
    }
}
