//! `exoagent bake`: pre-install the chosen services' payloads (system packages, JupyterLab's
//! virtual environment, …) into an image, so that first boot only configures and starts them.
//! It creates no user, passphrase, instance marker or other per-instance state: everything
//! instance-specific happens at first boot, keyed by the instance UUID.

use std::path::PathBuf;

use crate::agent::{self, AgentError, Mode};
use crate::config;
use crate::delivery::userdata::{config_drop_in, Choices, Delivery};
use crate::paths::Paths;
use crate::platform::os::Os;
use crate::platform::packages::{PackageError, PackageInstaller, PackageItem};
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
    /// The items of the one package transaction: system packages and verified package files
    /// (system mode only).
    pub packages: Vec<PackageItem>,
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
        cloud_init_waits: None,
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
    // Installing needs no service account (payloads are root-owned and shared); the invoking
    // account stands in, and nothing of it is recorded.
    let ctx = ServiceContext {
        account: agent::invoking_account(&paths)?,
        // Baking installs payloads only; nothing it does runs the executable.
        exe: paths.installed_exe(),
        paths,
    };
    // System packages in system mode only; the sandbox installs none.
    let installer = (mode == Mode::System)
        .then(|| PackageInstaller::new(plan.os.family.package_manager(), &plan.settings.packages));
    bake_services(&services, &ctx, installer.as_ref(), &plan.os).await
}

/// Bake `services`: every vendor package downloaded and verified first (one refusal stops the
/// bake with the image unchanged), then their system packages and the verified package files
/// in one transaction through `installer` (none without one), then each payload.
pub(crate) async fn bake_services(
    services: &[Service],
    ctx: &ServiceContext,
    installer: Option<&PackageInstaller>,
    os: &Os,
) -> Result<Baked, BakeError> {
    let mut fetched = agent::fetch_all(services, ctx).await;
    if let Some((_, refusal)) = std::mem::take(&mut fetched.refused).into_iter().next() {
        return Err(refusal.into());
    }
    let packages = match installer {
        Some(installer) => agent::install_batch(installer, &fetched, os).await?,
        None => Vec::new(),
    };
    let mut baked = Vec::new();
    for service in services {
        tracing::info!(target: "exoagent::bake", service = service.kind().as_str(), "installing payload");
        service.install(ctx).await?;
        baked.push(service.kind());
    }
    Ok(Baked {
        packages,
        services: baked,
    })
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::agent::fixtures::{
        debian12, recording_installer, sandbox_context as context, serve_every_request,
    };
    use crate::services::jupyterlab::{JupyterLab, JupyterLabSettings};
    use crate::services::rstudio::{RStudio, RStudioSettings};

    #[tokio::test]
    async fn baking_rstudio_installs_r_in_the_one_batch_then_its_payload() {
        let dir = tempfile::tempdir().unwrap();
        let tools = dir.path().join("tools");
        std::fs::create_dir_all(&tools).unwrap();
        // An rserver already in the image: RStudio's own payload step has nothing to download,
        // R still comes from the batch.
        let rserver = dir.path().join("rserver");
        std::fs::write(&rserver, "").unwrap();
        let rstudio = Service::RStudio(RStudio::new(
            RStudioSettings {
                rserver: rserver.clone(),
                ..RStudioSettings::default()
            },
            debian12(),
        ));
        let installer = recording_installer(&tools);
        let baked = bake_services(
            &[rstudio],
            &context(&dir.path().join("root")),
            Some(&installer),
            &debian12(),
        )
        .await
        .unwrap();
        assert_eq!(
            baked,
            Baked {
                packages: vec!["r-base".into()],
                services: vec![ServiceKind::RStudio],
            }
        );
        let calls = std::fs::read_to_string(tools.join("calls")).unwrap();
        let install = calls
            .lines()
            .find(|l| l.starts_with("apt-get") && l.contains(" install "))
            .unwrap_or_else(|| panic!("no install ran:\n{calls}"));
        assert!(install.ends_with(" r-base"), "{install}");
    }

    #[tokio::test]
    async fn baking_rstudio_puts_the_verified_deb_into_the_one_batch_with_r() {
        let addr = serve_every_request(b"Posit's package, as pinned");
        let dir = tempfile::tempdir().unwrap();
        let tools = dir.path().join("tools");
        std::fs::create_dir_all(&tools).unwrap();
        let root = dir.path().join("root");
        let rstudio = Service::RStudio(
            RStudio::new(
                RStudioSettings {
                    package_url: Some(format!("http://{addr}/rstudio-server.deb")),
                    ..RStudioSettings::default()
                },
                debian12(),
            )
            .pinned_to(b"Posit's package, as pinned"),
        );
        let services = [rstudio];
        let installer = recording_installer(&tools);
        // What the .deb installs, standing in place: RStudio's payload step checks it.
        let rserver = root.join("usr/lib/rstudio-server/bin/rserver");
        std::fs::create_dir_all(rserver.parent().unwrap()).unwrap();
        std::fs::write(&rserver, "").unwrap();
        let deb = root.join("opt/exoagent/rstudio/rstudio-server-2026.07.0-139-amd64.deb");
        let baked = bake_services(&services, &context(&root), Some(&installer), &debian12())
            .await
            .unwrap();
        assert_eq!(
            baked
                .packages
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["r-base".to_owned(), deb.display().to_string()]
        );
        assert_eq!(baked.services, [ServiceKind::RStudio]);
        let calls = std::fs::read_to_string(tools.join("calls")).unwrap();
        let installs: Vec<&str> = calls
            .lines()
            .filter(|l| l.starts_with("apt-get") && l.contains(" install "))
            .collect();
        assert_eq!(
            installs,
            [format!(
                "apt-get -y -q -o DPkg::Lock::Timeout=600 install --no-install-recommends -- r-base {}",
                deb.display()
            )],
            "one transaction, the .deb in it:\n{calls}"
        );
        assert!(root.join("opt/exoagent/rstudio/installed").is_file());

        // Baking again installs nothing (the marker; R installed).
        std::fs::write(tools.join("installed"), "r-base 4.2\n").unwrap();
        let again = bake_services(&services, &context(&root), Some(&installer), &debian12())
            .await
            .unwrap();
        assert_eq!(again.packages, ["r-base".into()]);
        assert_eq!(
            std::fs::read_to_string(tools.join("calls"))
                .unwrap()
                .matches("apt-get")
                .count(),
            1
        );
    }

    #[tokio::test]
    async fn a_refused_rstudio_download_stops_the_bake_before_anything_is_installed() {
        let addr = serve_every_request(b"not Posit's package");
        let dir = tempfile::tempdir().unwrap();
        let tools = dir.path().join("tools");
        std::fs::create_dir_all(&tools).unwrap();
        let root = dir.path().join("root");
        let services = [
            Service::JupyterLab(JupyterLab::new(JupyterLabSettings::default())),
            Service::RStudio(RStudio::new(
                RStudioSettings {
                    package_url: Some(format!("http://{addr}/rstudio-server.deb")),
                    ..RStudioSettings::default()
                },
                debian12(),
            )),
        ];
        let installer = recording_installer(&tools);
        let err = bake_services(&services, &context(&root), Some(&installer), &debian12())
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "rstudio-checksum-mismatch", "{err}");
        assert!(
            !tools.join("calls").exists(),
            "the package layer was called"
        );
        assert!(
            !root.join("opt/exoagent/jupyterlab").exists(),
            "JupyterLab was installed before the refusal"
        );
        let left: Vec<_> = std::fs::read_dir(root.join("opt/exoagent/rstudio"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
