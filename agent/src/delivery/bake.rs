//! `exoagent bake`: pre-install the chosen services' payloads (system packages, JupyterLab's
//! virtual environment, …) into an image, so that first boot only configures and starts them.
//! It creates no user, passphrase, instance marker or other per-instance state: everything
//! instance-specific happens at first boot, keyed by the instance UUID.

use std::path::PathBuf;

use crate::agent::{self, AgentError, Mode};
use crate::config;
use crate::delivery::userdata::{config_drop_in, Choices, Delivery};
use crate::paths::Paths;
use crate::platform::packages::{PackageError, PackageInstaller};
use crate::services::{Service, ServiceContext, ServiceError, ServiceKind};

/// Why baking failed.
#[derive(Debug, thiserror::Error)]
pub enum BakeError {
    /// The configuration, OS or layout is unusable (as for `run`).
    #[error(transparent)]
    Plan(#[from] AgentError),
    /// Neither the configuration nor `--service` names a service.
    #[error("nothing to bake: no service is enabled in the configuration and no --service given")]
    NothingToBake,
    /// The `--service` choices do not validate.
    #[error("--service: {0}")]
    Choice(String),
    /// The package transaction failed.
    #[error(transparent)]
    Packages(#[from] PackageError),
    /// A service's payload failed to install.
    #[error(transparent)]
    Service(#[from] ServiceError),
}

impl BakeError {
    /// Short stable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Plan(e) => e.reason(),
            Self::NothingToBake => "bake-nothing",
            Self::Choice(_) => "bake-invalid-choice",
            Self::Packages(e) => e.reason(),
            Self::Service(e) => e.reason(),
        }
    }
}

/// What was baked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Baked {
    /// System packages installed (system mode only).
    pub packages: Vec<String>,
    /// Services whose payloads are in place.
    pub services: Vec<ServiceKind>,
}

/// The services `kinds` with their default settings.
fn services_for(kinds: &[ServiceKind], plan: &agent::Plan) -> Result<Vec<Service>, BakeError> {
    let choices = Choices {
        delivery: Delivery::Baked,
        services: kinds.to_vec(),
        clouds_yaml: None,
        ssh_authorized_keys: Vec::new(),
        install_os_updates: false,
    };
    let text = config_drop_in(&choices).map_err(|e| BakeError::Choice(e.to_string()))?;
    let loaded = config::load_layers(&[(PathBuf::from("--service"), text)])
        .map_err(|e| BakeError::Choice(e.to_string()))?;
    Ok(loaded
        .settings
        .services
        .iter()
        .map(|s| Service::from_settings(s, &plan.os, &plan.paths.system_root, &plan.settings.tls))
        .collect())
}

/// Bake the services enabled in the configuration, or `kinds` when given.
pub async fn bake(mode: Mode, paths: Paths, kinds: &[ServiceKind]) -> Result<Baked, BakeError> {
    if mode == Mode::System && !nix::unistd::geteuid().is_root() {
        return Err(AgentError::NotRoot.into());
    }
    let plan = agent::plan(mode.clone(), paths.clone())?;
    let services = if kinds.is_empty() {
        plan.services.clone()
    } else {
        services_for(kinds, &plan)?
    };
    if services.is_empty() {
        return Err(BakeError::NothingToBake);
    }
    let mut packages = agent::packages_for(&services, &plan.os);
    if mode == Mode::System && !packages.is_empty() {
        let installer =
            PackageInstaller::new(plan.os.family.package_manager(), &plan.settings.packages);
        installer.install(&packages).await?;
    } else {
        packages.clear();
    }
    // Installing needs no service account (payloads are root-owned and shared); the invoking
    // account stands in, and nothing of it is recorded.
    let ctx = ServiceContext {
        account: agent::invoking_account(&paths)?,
        // Baking installs payloads only; nothing it does runs the executable.
        exe: paths.installed_exe(),
        paths,
    };
    let mut baked = Vec::new();
    for service in &services {
        tracing::info!(target: "exoagent::bake", service = service.kind().as_str(), "installing payload");
        service.install(&ctx).await?;
        baked.push(service.kind());
    }
    Ok(Baked {
        packages,
        services: baked,
    })
}
