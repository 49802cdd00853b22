//! The main job: validate everything, then provision (user, passphrase, one batched package
//! transaction, services concurrently), then supervise — while reporters publish every state
//! change. Services outlive the agent: stopping the agent leaves them running under their shims.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::api::server::{bind_and_serve, ApiState};
use crate::cloud::clouds;
use crate::cloud::discover::{publish_password_once, IdentitySource};
use crate::cloud::drive::DriveFinder;
use crate::cloud::keystone::Keystone;
use crate::cloud::nova::Nova;
use crate::cloud::{discover_identity, ConfigDrive, Discovery, InstanceIdentity, MetadataService};
use crate::config::{self, ConfigErrors, Settings, DEFAULT_METADATA_URL};
use crate::fsutil;
use crate::paths::Paths;
use crate::platform::os::{self, Os};
use crate::platform::packages::PackageInstaller;
use crate::platform::passphrase::{self, Passphrase};
use crate::platform::users::UserManager;
use crate::report::console::{ConsoleReporter, ConsoleSink};
use crate::report::load::LoadSampler;
use crate::report::notify::{run_status_notifier, SdNotify};
use crate::report::nova::{NovaReporter, Pacing};
use crate::services::{Account, Service, ServiceContext};
use crate::state::{
    InstanceStatus, NovaReporting, Reason, ServiceState, ServiceUpdate, SetupPhase, StateHub,
};
use crate::supervise::{ServicePaths, ShimCommand, Supervisor};

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
    /// Short stable reason for reports and exit-code selection.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Config(e) => e.reason(),
            Self::Os(e) => e.reason(),
            Self::Identity(e) => e.reason(),
            Self::NotRoot => "not-root",
            Self::Api(e) => e.reason(),
            Self::Account(_) => "account-unknown",
            Self::Io { .. } => "state-dir-failed",
        }
    }
}

/// Everything decided before the machine is touched.
#[derive(Debug)]
pub struct Plan {
    /// System or sandbox.
    pub mode: Mode,
    /// The layout.
    pub paths: Paths,
    /// The validated settings.
    pub settings: Settings,
    /// The config files that were read, in order.
    pub config_files: Vec<PathBuf>,
    /// The detected OS.
    pub os: Os,
    /// The instance, when a config drive is present.
    pub identity: Option<InstanceIdentity>,
    /// The services to set up.
    pub services: Vec<Service>,
    /// System packages for all services, in one transaction.
    pub packages: Vec<String>,
}

/// How long to try publishing the passphrase when the identity came from a config drive (the
/// cloud may have no metadata service; with one, it answers well within this).
pub const CONFIG_DRIVE_PUBLISH_BUDGET: std::time::Duration = std::time::Duration::from_secs(15);

/// Every system package `services` need on `family`, sorted, once each (one transaction).
pub(crate) fn packages_for(services: &[Service], os: &Os) -> Vec<String> {
    let mut packages: Vec<String> = services
        .iter()
        .flat_map(|s| s.system_packages(os))
        .collect();
    packages.sort();
    packages.dedup();
    packages
}

/// Load and validate everything; change nothing. Every configuration error is reported at once.
pub fn plan(mode: Mode, paths: Paths) -> Result<Plan, AgentError> {
    let loaded = config::load(&paths)?;
    let os = match mode {
        Mode::System => os::detect(&paths.system_root)?,
        // The sandbox runs on any Linux: the OS is reported, never refused.
        Mode::Sandbox => os::detect_lenient(std::path::Path::new("/"))?,
    };
    let identity = match ConfigDrive::new(&paths.config_drive).identity() {
        Ok(identity) => Some(identity),
        Err(crate::cloud::IdentityError::Missing { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let services: Vec<Service> = loaded
        .settings
        .services
        .iter()
        .map(|s| Service::from_settings(s, &os, &paths.system_root))
        .collect();
    let packages = packages_for(&services, &os);
    Ok(Plan {
        mode,
        paths,
        settings: loaded.settings,
        config_files: loaded.files,
        os,
        identity,
        services,
        packages,
    })
}

impl Plan {
    fn account_for_display(&self) -> Account {
        match self.mode {
            Mode::System => Account {
                name: self.settings.instance.user.clone(),
                uid: 0,
                gid: 0,
                home: PathBuf::from("/home").join(&self.settings.instance.user),
            },
            Mode::Sandbox => invoking_account(&self.paths).unwrap_or(Account {
                name: "(invoking user)".into(),
                uid: 0,
                gid: 0,
                home: self.paths.system_root.join("home"),
            }),
        }
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match self.mode {
            Mode::System => "system",
            Mode::Sandbox => "sandbox",
        };
        writeln!(f, "mode: {mode}")?;
        writeln!(f, "os: {}", self.os.pretty_name)?;
        match &self.identity {
            Some(id) => writeln!(
                f,
                "instance: {} ({})",
                id.uuid,
                id.name.as_deref().unwrap_or("unnamed")
            )?,
            None => writeln!(
                f,
                "instance: no config drive at {}",
                self.paths.config_drive.display()
            )?,
        }
        match (&self.settings.cloud.metadata_url, &self.mode) {
            (Some(url), _) => writeln!(f, "metadata service: {url}")?,
            (None, Mode::System) => writeln!(f, "metadata service: {DEFAULT_METADATA_URL}")?,
            (None, Mode::Sandbox) => writeln!(f, "metadata service: none (sandbox)")?,
        }
        match &self.settings.cloud.clouds_yaml {
            Some(path) => writeln!(
                f,
                "nova reporting: cloud '{}' from {}",
                self.settings.cloud.cloud_name,
                path.display()
            )?,
            None => writeln!(f, "nova reporting: off (no cloud.clouds_yaml)")?,
        }
        if self.config_files.is_empty() {
            writeln!(f, "config: built-in defaults only")?;
        } else {
            writeln!(f, "config files, later wins:")?;
            for file in &self.config_files {
                writeln!(f, "  {}", file.display())?;
            }
        }
        writeln!(f, "plan:")?;
        let mut step = 1;
        let account = self.account_for_display();
        match self.mode {
            Mode::System => {
                let user = &self.settings.instance.user;
                if self.settings.instance.create_user {
                    writeln!(
                        f,
                        "  {step}. ensure user {user} (bash, passwordless sudo, admin groups)"
                    )?;
                } else {
                    writeln!(f, "  {step}. require existing user {user}")?;
                }
                step += 1;
                writeln!(
                    f,
                    "  {step}. passphrase: keep or generate {} (0600), set as {user}'s password via chpasswd on stdin",
                    self.paths.passphrase_file().display()
                )?;
            }
            Mode::Sandbox => writeln!(
                f,
                "  {step}. passphrase: keep or generate {} (0600); services run as {}",
                self.paths.passphrase_file().display(),
                account.name
            )?,
        }
        step += 1;
        if self.packages.is_empty() {
            writeln!(f, "  {step}. system packages: none needed")?;
        } else if self.mode == Mode::Sandbox {
            writeln!(
                f,
                "  {step}. system packages (sandbox: not installed, must be present): {}",
                self.packages.join(" ")
            )?;
        } else {
            writeln!(
                f,
                "  {step}. install missing system packages in one {:?} transaction: {}",
                self.os.family.package_manager(),
                self.packages.join(" ")
            )?;
        }
        let ctx = ServiceContext {
            paths: self.paths.clone(),
            account,
            exe: PathBuf::from(crate::delivery::install::INSTALLED_EXE),
        };
        if self.services.is_empty() {
            step += 1;
            writeln!(f, "  {step}. no services enabled")?;
        }
        for service in &self.services {
            step += 1;
            writeln!(
                f,
                "  {step}. {} on port {} (concurrently with other services):",
                service.kind(),
                service.port()
            )?;
            for line in service.plan(&ctx) {
                writeln!(f, "     - {line}")?;
            }
        }
        Ok(())
    }
}

/// The invoking user, with a home inside the layout's root: the account a sandbox runs
/// services as, and the one `bake` installs payloads as.
pub(crate) fn invoking_account(paths: &Paths) -> Result<Account, AgentError> {
    let uid = nix::unistd::geteuid();
    let gid = nix::unistd::getegid();
    let name = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| format!("uid{uid}"));
    Ok(Account {
        home: paths.system_root.join("home").join(&name),
        name,
        uid: uid.as_raw(),
        gid: gid.as_raw(),
    })
}

/// Run the main job until `cancel` fires. Services keep running afterwards.
pub async fn run(options: AgentOptions, cancel: CancellationToken) -> Result<(), AgentError> {
    if options.mode == Mode::System && !nix::unistd::geteuid().is_root() {
        return Err(AgentError::NotRoot);
    }
    if options.mode == Mode::System {
        // A config drive is a labelled block device nobody has mounted yet; read-only under
        // /run, so this changes nothing durable before validation.
        match DriveFinder::system()
            .ensure_mounted(&options.paths.config_drive)
            .await
        {
            Ok(found) => {
                tracing::info!(target: "exoagent::agent", drive = ?found, "config drive")
            }
            Err(e) => {
                tracing::warn!(target: "exoagent::agent", reason = e.reason(), error = %e, "config drive not mounted; the metadata service is tried instead")
            }
        }
    }
    // Validate fully before anything is created or changed.
    let mut plan = plan(options.mode.clone(), options.paths.clone())?;
    tracing::info!(target: "exoagent::agent", os = %plan.os.pretty_name, services = plan.services.len(), "configuration valid");

    let paths = &plan.paths;
    for dir in [&paths.state_dir, &paths.runtime_dir, &paths.log_dir] {
        fsutil::ensure_dir(dir, 0o755).map_err(|source| AgentError::Io {
            path: dir.clone(),
            source,
        })?;
    }

    let hub = StateHub::new(plan.services.iter().map(|s| (s.kind(), s.port(), s.url())));
    let mut tasks = tokio::task::JoinSet::new();

    let sink = match plan.mode {
        Mode::System => {
            crate::report::console::enable_devkmsg(&paths.system_root);
            ConsoleSink::Devices(plan.settings.console.devices.clone())
        }
        Mode::Sandbox => ConsoleSink::Stdout,
    };
    let reporter = ConsoleReporter::new(
        sink,
        &plan.settings.console,
        LoadSampler::new(&paths.system_root),
    );
    tasks.spawn(reporter.run(hub.subscribe(), cancel.clone()));
    let notify = SdNotify::from_env();
    if let Some(notify) = notify.clone() {
        tasks.spawn(run_status_notifier(notify, hub.subscribe(), cancel.clone()));
    }

    // The socket is bound before anything slow (the metadata service may take its time), so
    // systemd hears READY at once; it is root-only until the account is known.
    let api_socket = paths.api_socket();
    let api = bind_and_serve(
        ApiState {
            hub: hub.clone(),
            paths: paths.clone(),
        },
        &api_socket,
        None,
        cancel.clone(),
    )
    .await?;
    if let Some(notify) = &notify {
        let _ = notify.notify("READY=1");
    }

    let metadata = metadata_service(&plan);
    let discovery = match plan.identity.take() {
        Some(identity) => Discovery::Found(identity, IdentitySource::ConfigDrive),
        None => {
            discover_identity(
                &ConfigDrive::new(&paths.config_drive),
                metadata.as_ref(),
                plan.settings.cloud.metadata_timeout,
            )
            .await?
        }
    };
    let (instance, identity_source) = match discovery {
        Discovery::Found(identity, source) => {
            tracing::info!(target: "exoagent::agent", uuid = %identity.uuid, source = source.as_str(), "instance identity");
            let status = InstanceStatus::found(&identity.uuid, source.code());
            plan.identity = Some(identity);
            (status, Some(source))
        }
        Discovery::LocalOnly(why) => {
            tracing::info!(target: "exoagent::agent", "no instance identity, running local-only: {why}");
            (InstanceStatus::local_only(why), None)
        }
    };
    hub.set_instance(instance);
    forget_previous_instance(&plan)?;
    if let Some(reporter) = nova_reporter(&plan, &hub) {
        tasks.spawn(reporter.run(hub.clone(), cancel.clone()));
    }

    let (account, passphrase) = match provision_account(&plan, &hub).await {
        Ok(found) => found,
        Err(reason) => {
            hub.fail_step("user", reason);
            (None, None)
        }
    };
    if let Some(account) = &account {
        set_socket_group(&api_socket, account.gid)?;
    }
    if let (Some(service), Some(passphrase), true) = (
        &metadata,
        &passphrase,
        plan.settings.cloud.publish_password && plan.identity.is_some(),
    ) {
        // Before `running` is reported (DESIGN §4.4): Exosphere shows the passphrase once
        // setup runs. A failure is reported locally and does not stop the services.
        let marker = paths.state_dir.join("password-published");
        // The identity came from a config drive: this cloud may have no metadata service at
        // all, so do not hold `running` back for the whole discovery budget.
        let budget = if identity_source == Some(IdentitySource::ConfigDrive) {
            plan.settings
                .cloud
                .metadata_timeout
                .min(CONFIG_DRIVE_PUBLISH_BUDGET)
        } else {
            plan.settings.cloud.metadata_timeout
        };
        match publish_password_once(service, passphrase, &marker, budget).await {
            Ok(done) => {
                tracing::info!(target: "exoagent::agent", outcome = ?done, "passphrase publication")
            }
            Err(e) => {
                tracing::warn!(target: "exoagent::agent", reason = e.reason(), error = %e, "cannot publish the passphrase")
            }
        }
    }

    if let (Some(account), Some(passphrase)) = (account, passphrase) {
        hub.set_phase(SetupPhase::Provisioning);
        let packages_ok = install_packages(&plan, &hub).await;
        if packages_ok {
            let ctx = ServiceContext {
                paths: paths.clone(),
                account,
                exe: options.shim.exe.clone(),
            };
            let passphrase = Arc::new(passphrase);
            let mut starts = tokio::task::JoinSet::new();
            for service in plan.services.clone() {
                let ctx = ctx.clone();
                let hub = hub.clone();
                let passphrase = passphrase.clone();
                let policy = plan.settings.supervise.clone();
                let shim = options.shim.clone();
                let cancel = cancel.clone();
                starts.spawn(async move {
                    start_service(service, ctx, hub, passphrase, policy, shim, cancel).await
                });
            }
            while let Some(started) = starts.join_next().await {
                if let Ok(Some(supervisor)) = started {
                    tasks.spawn(supervisor);
                }
            }
            hub.set_phase(SetupPhase::Supervising);
        }
    }

    cancel.cancelled().await;
    tracing::info!(target: "exoagent::agent", "stopping; services keep running");
    while tasks.join_next().await.is_some() {}
    let _ = api.await;
    let _ = std::fs::remove_file(paths.api_socket());
    Ok(())
}

type SupervisorTask = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Install and configure one service, then hand back its supervisor to run.
async fn start_service(
    service: Service,
    ctx: ServiceContext,
    hub: StateHub,
    passphrase: Arc<Passphrase>,
    policy: crate::config::SupervisePolicy,
    shim: ShimCommand,
    cancel: CancellationToken,
) -> Option<SupervisorTask> {
    let kind = service.kind();
    let _ = hub.transition(kind, ServiceState::Installing, ServiceUpdate::default());
    let prepared = async {
        service.install(&ctx).await?;
        service.configure(&ctx, &passphrase).await
    }
    .await;
    if let Err(e) = prepared {
        tracing::error!(target: "exoagent::agent", service = kind.as_str(), error = %e, "setup failed");
        let _ = hub.transition(
            kind,
            ServiceState::Failed,
            ServiceUpdate {
                reason: Some(Reason::new(e.reason(), e.to_string())),
                ..Default::default()
            },
        );
        return None;
    }
    let supervisor = Supervisor::new(
        kind,
        service.run_spec(&ctx),
        service.probe(),
        service.start_timeout(),
        policy,
        ServicePaths {
            run_dir: ctx.paths.service_run_dir(kind),
            log_file: ctx.paths.service_log(kind),
        },
        shim,
        hub,
    );
    Some(Box::pin(async move {
        supervisor.run(cancel).await;
    }))
}

/// The user, its passphrase, and the password set once (only when the passphrase is new, so a
/// researcher's own password change is never undone by an agent restart).
async fn provision_account(
    plan: &Plan,
    hub: &StateHub,
) -> Result<(Option<Account>, Option<Passphrase>), Reason> {
    let _ = hub;
    let paths = &plan.paths;
    let passphrase_file = paths.passphrase_file();
    let fresh = !passphrase_file.exists();
    let passphrase = passphrase::load_or_create(&passphrase_file)
        .map_err(|e| Reason::new(e.reason(), e.to_string()))?;
    let account = match plan.mode {
        Mode::Sandbox => {
            invoking_account(paths).map_err(|e| Reason::new(e.reason(), e.to_string()))?
        }
        Mode::System => {
            let users = UserManager::new(&paths.system_root);
            let name = &plan.settings.instance.user;
            let info = if plan.settings.instance.create_user {
                users
                    .ensure_user(name, plan.os.family)
                    .await
                    .map_err(|e| Reason::new(e.reason(), e.to_string()))?
            } else {
                users
                    .lookup(name)
                    .map_err(|e| Reason::new(e.reason(), e.to_string()))?
                    .ok_or_else(|| {
                        Reason::new(
                            "user-missing",
                            format!("instance.user '{name}' does not exist and instance.create_user is false"),
                        )
                    })?
            };
            let marker = paths.state_dir.join("password-set");
            if fresh || !marker.exists() {
                users
                    .set_password(name, &passphrase)
                    .await
                    .map_err(|e| Reason::new(e.reason(), e.to_string()))?;
                fsutil::write_atomic(&marker, b"", 0o600, None)
                    .map_err(|e| Reason::new("state-dir-failed", e.to_string()))?;
            }
            Account {
                name: info.name,
                uid: info.uid,
                gid: info.gid,
                home: info.home,
            }
        }
    };
    Ok((Some(account), Some(passphrase)))
}

/// One batched package transaction for all services (system mode); in the sandbox nothing is
/// installed and missing packages surface as install errors of the service that needs them.
async fn install_packages(plan: &Plan, hub: &StateHub) -> bool {
    if plan.mode == Mode::Sandbox || plan.packages.is_empty() {
        return true;
    }
    let installer =
        PackageInstaller::new(plan.os.family.package_manager(), &plan.settings.packages);
    match installer.install(&plan.packages).await {
        Ok(_) => true,
        Err(e) => {
            tracing::error!(target: "exoagent::agent", error = %e, "package installation failed");
            hub.fail_step("packages", Reason::new(e.reason(), e.to_string()));
            false
        }
    }
}

/// The metadata service to use: the configured URL, or on an instance the standard one; the
/// sandbox uses one only when configured.
fn metadata_service(plan: &Plan) -> Option<MetadataService> {
    let url = match (&plan.settings.cloud.metadata_url, &plan.mode) {
        (Some(url), _) => url.clone(),
        (None, Mode::System) => DEFAULT_METADATA_URL.to_owned(),
        (None, Mode::Sandbox) => return None,
    };
    match MetadataService::default_client() {
        Ok(client) => Some(MetadataService::new(&url, client)),
        Err(e) => {
            tracing::warn!(target: "exoagent::agent", error = %e, "cannot build an HTTP client; no metadata service");
            None
        }
    }
}

/// The Nova reporter, when a clouds.yaml is configured and the server is known. A credential
/// that cannot even be loaded is shown in `exoagent status`; services go on regardless.
fn nova_reporter(plan: &Plan, hub: &StateHub) -> Option<NovaReporter> {
    let cloud = &plan.settings.cloud;
    let path = cloud.clouds_yaml.as_ref()?;
    let failed = |code: &str, detail: String| {
        tracing::error!(target: "exoagent::agent", reason = code, "not reporting to Nova: {detail}");
        hub.set_nova_reporting(NovaReporting {
            state: "failed".into(),
            reason: Some(Reason::new(code, detail)),
        });
        None
    };
    let Some(identity) = &plan.identity else {
        return failed(
            "identity-unknown",
            "no instance identity (no config drive, no metadata service): cannot tell which server to report on".into(),
        );
    };
    let config = match clouds::load(path, &cloud.cloud_name) {
        Ok(config) => config,
        Err(e) => return failed(e.reason(), e.to_string()),
    };
    let client = match Keystone::http_client(&config) {
        Ok(client) => client,
        Err(e) => return failed(e.reason(), e.to_string()),
    };
    let keystone = Arc::new(Keystone::new(config, client.clone()));
    Some(NovaReporter::new(
        Nova::new(keystone, client),
        identity.uuid.clone(),
        Pacing::default(),
    ))
}

/// Give the instance user's group access to the status socket once the account exists.
fn set_socket_group(socket: &std::path::Path, gid: u32) -> Result<(), AgentError> {
    nix::unistd::chown(socket, None, Some(nix::unistd::Gid::from_raw(gid))).map_err(|errno| {
        AgentError::Io {
            path: socket.to_path_buf(),
            source: std::io::Error::from(errno),
        }
    })
}

/// A state directory carried over from another instance (a snapshot or a baked image) must not
/// keep that instance's passphrase: key the run-once state by the instance UUID.
fn forget_previous_instance(plan: &Plan) -> Result<(), AgentError> {
    let Some(identity) = &plan.identity else {
        return Ok(());
    };
    let marker = plan.paths.state_dir.join("instance-id");
    let previous = std::fs::read_to_string(&marker).ok();
    if previous.as_deref().map(str::trim) == Some(identity.uuid.as_str()) {
        return Ok(());
    }
    if previous.is_some() {
        tracing::warn!(target: "exoagent::agent", "state belongs to another instance; starting fresh");
        for stale in [
            plan.paths.passphrase_file(),
            plan.paths.state_dir.join("password-set"),
            plan.paths.state_dir.join("password-published"),
        ] {
            let _ = std::fs::remove_file(stale);
        }
    }
    fsutil::write_atomic(&marker, identity.uuid.as_bytes(), 0o644, None).map_err(|source| {
        AgentError::Io {
            path: marker.clone(),
            source,
        }
    })
}
