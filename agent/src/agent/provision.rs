//! Provisioning the machine for the services: the account and its passphrase, the one batched
//! package transaction, the one-time passphrase publication, forgetting a previous instance's
//! run-once state, and the cloud clients (metadata service, Nova reporter) the run needs.

use std::sync::Arc;
use std::time::Duration;

use crate::cloud::clouds;
use crate::cloud::discover::{publish_password_once, IdentitySource};
use crate::cloud::keystone::Keystone;
use crate::cloud::nova::Nova;
use crate::cloud::{CloudSettings, InstanceIdentity, MetadataService};
use crate::config::DEFAULT_METADATA_URL;
use crate::fsutil;
use crate::host::{Host, Outcome};
use crate::paths::Paths;
use crate::platform::os::Os;
use crate::platform::packages::{LocalPackage, PackageError, PackageInstaller, PackageItem};
use crate::platform::passphrase::{self, Passphrase};
use crate::platform::ports::EphemeralPorts;
use crate::platform::users::{Account, UserManager};
use crate::report::nova::{NovaReporter, Pacing};
use crate::services::jupyterlab::link::{self, LinkToken};
use crate::services::{Service, ServiceContext, ServiceError, ServiceSettings};
use crate::state::{NovaReporting, NovaReportingState, Reason, SetupStep, StateHub};

use super::{AgentError, Mode, Plan};

/// How long to try publishing the passphrase when the identity came from a config drive (the
/// cloud may have no metadata service; with one, it answers well within this).
pub const CONFIG_DRIVE_PUBLISH_BUDGET: Duration = Duration::from_secs(15);

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

/// A passphrase made before the instance is known, when none is stored (a first boot).
/// [`load_passphrase`] stores it only if there is still none once a previous instance's state
/// is forgotten; `None` on a restart (one is stored). Its argon2 hash for JupyterLab is not
/// begun here: JupyterLab starts without it (its loader waits for the configuration the hash
/// goes into, [`crate::services::jupyterlab::CONFIG_LOADER`]), so the hash is worked out when
/// that configuration is written, after the spawn, instead of taking a CPU from the agent's
/// path to it (seconds of one under emulation, beside cloud-init's config stage).
pub(super) fn early_passphrase(plan: &Plan) -> Option<Passphrase> {
    if plan.paths.passphrase_file().exists() {
        return None;
    }
    Some(Passphrase::generate())
}

/// The passphrase, made on the first run (`early`, when made before); `true` when it was made
/// now (nothing has its hash or the password yet).
pub(super) fn load_passphrase(
    plan: &Plan,
    early: Option<Passphrase>,
) -> Result<(Passphrase, bool), Reason> {
    let passphrase_file = plan.paths.passphrase_file();
    let fresh = !passphrase_file.exists();
    let passphrase = passphrase::load_or_store(&passphrase_file, early)
        .map_err(|e| Reason::new(e.reason(), e.to_string()))?;
    Ok((passphrase, fresh))
}

/// The account services run as: in system mode the instance user, created when asked for (its
/// password is [`set_password_once`]'s and its sudo drop-in [`provision_sudo`]'s, apart: no
/// service needs them to start).
pub(super) async fn provision_account(plan: &Plan) -> Result<Account, Reason> {
    let paths = &plan.paths;
    match plan.mode {
        Mode::Sandbox => {
            invoking_account(paths).map_err(|e| Reason::new(e.reason(), e.to_string()))
        }
        Mode::System => {
            let users = UserManager::new(&paths.system_root);
            let name = &plan.settings.instance.user;
            let info = if plan.settings.instance.create_user {
                users
                    .ensure_account_entry(name, plan.os.family)
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
            Ok(info.into())
        }
    }
}

/// The subordinate ids `useradd` would have given the instance user (rootless containers), when
/// the agent creates the user (system mode): after the account, off the services' path. Not
/// having them is no reason to fail the set-up: it is logged.
pub(super) async fn provision_subids(plan: &Plan) {
    if plan.mode == Mode::Sandbox || !plan.settings.instance.create_user {
        return;
    }
    let name = &plan.settings.instance.user;
    match UserManager::new(&plan.paths.system_root)
        .ensure_subordinate_ids(name)
        .await
    {
        Ok(true) => {
            tracing::info!(target: "exoagent::agent", user = %name, "subordinate ids given")
        }
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(target: "exoagent::agent", user = %name, reason = e.reason(), "no subordinate ids: {e}")
        }
    }
}

/// The instance user's passwordless-sudo drop-in, when the agent creates the user (system mode).
pub(super) async fn provision_sudo(plan: &Plan) -> Result<(), Reason> {
    if plan.mode == Mode::Sandbox || !plan.settings.instance.create_user {
        return Ok(());
    }
    UserManager::new(&plan.paths.system_root)
        .ensure_sudo(&plan.settings.instance.user)
        .await
        .map_err(|e| Reason::new(e.reason(), e.to_string()))
}

/// The instance user's password set to the passphrase once: only when the passphrase is
/// `fresh` or the marker is missing, so a researcher's own password change is never undone by
/// an agent restart. System mode only (the sandbox never sets a system password).
pub(super) async fn set_password_once(
    plan: &Plan,
    passphrase: &Passphrase,
    fresh: bool,
) -> Result<(), Reason> {
    if plan.mode == Mode::Sandbox {
        return Ok(());
    }
    let marker = plan.paths.password_set_marker();
    if !fresh && marker.exists() {
        return Ok(());
    }
    UserManager::new(&plan.paths.system_root)
        .set_password(&plan.settings.instance.user, passphrase)
        .await
        .map_err(|e| Reason::new(e.reason(), e.to_string()))?;
    fsutil::write_atomic(&marker, b"", 0o600, None)
        .map_err(|e| Reason::new("state-dir-failed", e.to_string()))
}

/// The services after every one's downloads were fetched and verified ([`Service::fetch`]),
/// before the batched transaction: those ready for it with the verified package files they
/// offer to it, and those refused with why (their packages and files stay out of the batch, so
/// nothing of them is installed).
pub(crate) struct Fetched {
    /// Fetched and verified (or nothing to fetch).
    pub ready: Vec<Service>,
    /// The verified package files the ready services offer to the batch.
    pub files: Vec<LocalPackage>,
    /// Refused, with the error.
    pub refused: Vec<(Service, ServiceError)>,
    /// Packages the host itself asks for (`[host] base_packages`), outside any service.
    pub host_packages: Vec<String>,
}

/// Fetch and verify every service's downloads (one after the other: only vendor packages are
/// fetched, and few services have one) before anything is installed.
pub(crate) async fn fetch_all(services: &[Service], ctx: &ServiceContext) -> Fetched {
    let mut fetched = Fetched {
        ready: Vec::new(),
        files: Vec::new(),
        refused: Vec::new(),
        host_packages: Vec::new(),
    };
    for service in services.iter().cloned() {
        match service.fetch(ctx).await {
            Ok(files) => {
                fetched.files.extend(files);
                fetched.ready.push(service);
            }
            Err(e) => {
                tracing::error!(target: "exoagent::agent", service = service.kind().as_str(), reason = e.reason(), error = %e, "fetch refused; its packages stay out of the batch");
                fetched.refused.push((service, e));
            }
        }
    }
    fetched
}

/// The items of the one batched transaction: the system packages of the services whose fetch
/// passed and the host's, then the verified package files the services offered.
pub(crate) fn batch_items(fetched: &Fetched, os: &Os) -> Vec<PackageItem> {
    let mut named = super::plan::packages_for(&fetched.ready, os);
    named.extend(fetched.host_packages.iter().cloned());
    named.sort();
    named.dedup();
    named
        .into_iter()
        .map(PackageItem::Named)
        .chain(fetched.files.iter().cloned().map(PackageItem::Local))
        .collect()
}

/// The one batched transaction: [`batch_items`] of `fetched`, in one call of the package layer
/// (nothing runs when everything is installed).
pub(crate) async fn install_batch(
    installer: &PackageInstaller,
    fetched: &Fetched,
    os: &Os,
) -> Result<Vec<PackageItem>, PackageError> {
    let items = batch_items(fetched, os);
    if !items.is_empty() {
        installer.install(&items).await?;
    }
    Ok(items)
}

/// The installer for this plan's OS and package settings.
pub(super) fn installer(plan: &Plan) -> PackageInstaller {
    PackageInstaller::new(plan.os.family.package_manager(), &plan.settings.packages)
}

/// Which of the system packages the batch may ask for (every service's and the host's) are
/// installed already, asked once while the account is made (system mode; `None` in the
/// sandbox, with none to ask about, or when the query fails: the batch then asks itself).
pub(super) async fn installed_early(plan: &Plan) -> Option<std::collections::HashSet<String>> {
    if plan.mode == Mode::Sandbox {
        return None;
    }
    let mut names = plan.packages.clone();
    names.extend(crate::host::base_packages(&plan.settings.host, &plan.os));
    names.sort();
    names.dedup();
    if names.is_empty() {
        return None;
    }
    match installer(plan).installed_names(&names).await {
        Ok(found) => Some(found),
        Err(e) => {
            tracing::debug!(target: "exoagent::agent", error = %e, "early package query failed; the batch asks again");
            None
        }
    }
}

/// One batched package transaction for the services `fetched` made ready and the package
/// files they offered (system mode); in the sandbox nothing is installed and missing packages
/// surface as install errors of the service that needs them. `known` are names found
/// installed by [`installed_early`]: not asked for again.
pub(super) async fn install_packages(
    plan: &Plan,
    hub: &StateHub,
    fetched: &Fetched,
    known: Option<std::collections::HashSet<String>>,
) -> bool {
    if plan.mode == Mode::Sandbox {
        return true;
    }
    let installer = match known {
        Some(names) => installer(plan).knowing_installed(names),
        None => installer(plan),
    };
    match install_batch(&installer, fetched, &plan.os).await {
        Ok(items) => {
            tracing::info!(target: "exoagent::agent", items = items.len(), "system packages checked");
            true
        }
        Err(e) => {
            tracing::error!(target: "exoagent::agent", error = %e, "package installation failed");
            hub.fail_step(SetupStep::Packages, Reason::new(e.reason(), e.to_string()));
            false
        }
    }
}

/// The instance-wide touches of `stage` that `[host]` asks for (system mode only), each
/// logged; a failing one is reported in the log and stops nothing (none of them is a service).
pub(super) async fn apply_host_touches(plan: &Plan, stage: crate::host::Stage) {
    if plan.mode == Mode::Sandbox {
        return;
    }
    let root = &plan.paths.system_root;
    let users = UserManager::new(root);
    let touches = Host::new(root)
        .apply(
            stage,
            &plan.settings.host,
            &plan.os,
            &plan.settings.instance.user,
            &users,
            &plan.paths.deferred_write_files_marker(),
        )
        .await;
    for (touch, result) in touches {
        match result {
            Ok(Outcome::Changed) => {
                tracing::info!(target: "exoagent::host", touch = touch.key(), "applied")
            }
            Ok(Outcome::Unchanged) => {
                tracing::debug!(target: "exoagent::host", touch = touch.key(), "already so")
            }
            Ok(Outcome::Skipped(why)) => {
                tracing::warn!(target: "exoagent::host", touch = touch.key(), why = %why, "skipped")
            }
            Err(e) => {
                tracing::error!(target: "exoagent::host", touch = touch.key(), reason = e.reason(), error = %e, "failed")
            }
        }
    }
}

/// The services' ports (where each listens, and its TLS front) kept out of the kernel's
/// ephemeral range before anything binds or connects (system mode only; under the system root,
/// so a test's root leaves the host alone): [`crate::platform::ports`]. A failure is logged; the
/// services start regardless.
pub(super) fn reserve_service_ports(plan: &Plan) {
    if plan.mode == Mode::Sandbox {
        return;
    }
    let ports: Vec<u16> = plan
        .services
        .iter()
        .flat_map(|service| {
            let endpoint = service.endpoint();
            [
                Some(endpoint.listen.port()),
                endpoint.front.map(|f| f.port()),
            ]
        })
        .flatten()
        .collect();
    let settings = EphemeralPorts::new(&plan.paths.system_root.join("proc/sys/net/ipv4"));
    match settings.reserve(&ports) {
        Ok(added) if added.is_empty() => {}
        Ok(added) => {
            tracing::info!(target: "exoagent::agent", ports = ?added, "ports kept out of the ephemeral range")
        }
        Err(e) => {
            tracing::warn!(target: "exoagent::agent", reason = e.reason(), error = %e, "cannot keep the services' ports out of the ephemeral range")
        }
    }
}

/// The ids of the groups the host touches are to add the account to (system mode only); a
/// group file that cannot be read gives none (the join then fails and says why).
pub(super) fn groups_to_join(plan: &Plan) -> Vec<u32> {
    if plan.mode == Mode::Sandbox {
        return Vec::new();
    }
    let root = &plan.paths.system_root;
    let joining = Host::new(root).groups_to_join(
        &plan.settings.host,
        &plan.os,
        &plan.settings.instance.user,
        &UserManager::new(root),
    );
    joining.unwrap_or_else(|e| {
        tracing::warn!(target: "exoagent::host", reason = e.reason(), error = %e, "cannot tell which groups the account joins");
        Vec::new()
    })
}

/// The login banner's hook (`[host] login_banner`, system mode only), written as soon as the
/// status API answers so that a login during setup already shows its progress; `exe` is the
/// running binary (a bootstrap installs it outside `/usr/bin`). Logged; a failure stops nothing.
pub(super) fn install_login_banner(plan: &Plan, exe: &std::path::Path) {
    if plan.mode == Mode::Sandbox {
        return;
    }
    // After an upgrade replaced the binary, /proc/self/exe names the old inode "(deleted)".
    let exe = exe
        .to_str()
        .and_then(|e| e.strip_suffix(" (deleted)"))
        .map_or_else(|| exe.to_path_buf(), std::path::PathBuf::from);
    let touch = crate::host::Touch::LoginBanner.key();
    match Host::new(&plan.paths.system_root).login_banner(
        plan.settings.host.login_banner,
        &plan.os,
        &exe,
    ) {
        Ok(Outcome::Changed) => tracing::info!(target: "exoagent::host", touch, "applied"),
        Ok(Outcome::Unchanged) => tracing::debug!(target: "exoagent::host", touch, "already so"),
        Ok(Outcome::Skipped(why)) => {
            tracing::warn!(target: "exoagent::host", touch, why = %why, "skipped")
        }
        Err(e) => {
            tracing::error!(target: "exoagent::host", touch, reason = e.reason(), error = %e, "failed")
        }
    }
}

/// Publish the passphrase once (DESIGN §4.4), when configured and the instance is known. A
/// failure is logged and does not stop the services.
pub(super) async fn publish_passphrase(
    plan: &Plan,
    metadata: Option<&MetadataService>,
    passphrase: &Passphrase,
    identity_source: Option<IdentitySource>,
) {
    let Some(service) = metadata else {
        return;
    };
    if !(plan.settings.cloud.publish_password && plan.identity.is_some()) {
        return;
    }
    let marker = plan.paths.password_published_marker();
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

/// The metadata service to use: the configured URL, or on an instance the standard one; the
/// sandbox uses one only when configured.
pub(super) fn metadata_service(plan: &Plan) -> Option<MetadataService> {
    let url = match (&plan.settings.cloud.metadata_url, &plan.mode) {
        (Some(url), _) => url.clone(),
        (None, Mode::System) => DEFAULT_METADATA_URL.to_owned(),
        (None, Mode::Sandbox) => return None,
    };
    match MetadataService::client_for(&url) {
        Ok(client) => Some(MetadataService::new(&url, client)),
        Err(e) => {
            tracing::warn!(target: "exoagent::agent", error = %e, "cannot build an HTTP client; no metadata service");
            None
        }
    }
}

/// The Nova reporter, when a clouds.yaml is configured and the server is known. A credential
/// that cannot even be loaded is shown in `exoagent status`; services go on regardless.
pub(super) fn nova_reporter(
    cloud: &CloudSettings,
    identity: Option<&InstanceIdentity>,
    hub: &StateHub,
) -> Option<NovaReporter> {
    let path = cloud.clouds_yaml.as_ref()?;
    let failed = |code: &str, detail: String| {
        tracing::error!(target: "exoagent::agent", reason = code, "not reporting to Nova: {detail}");
        hub.set_nova_reporting(NovaReporting {
            state: NovaReportingState::Failed,
            reason: Some(Reason::new(code, detail)),
        });
        None
    };
    let Some(identity) = identity else {
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

/// Exosphere's notebook link to JupyterLab, when the plan offers it: its token (prepared now,
/// before JupyterLab's configuration is written) and the `exoCustomWorkflow` value. A token
/// that cannot be prepared turns the link off, logged; JupyterLab still runs.
pub(super) fn exosphere_link(plan: &Plan) -> Option<(LinkToken, String)> {
    let settings = plan.settings.services.iter().find_map(|s| match s {
        ServiceSettings::JupyterLab(settings) => Some(settings),
        _ => None,
    })?;
    match link::prepare(settings, &plan.paths) {
        Ok(token) => token.map(|token| {
            let value = match &settings.workflow {
                Some(workflow) => link::workflow_value(workflow, &settings.base_url),
                None => link::custom_workflow_value(
                    link::pinned_version(crate::services::jupyterlab::REQUIREMENTS)
                        .unwrap_or("unknown"),
                    &settings.base_url,
                ),
            };
            (token, value)
        }),
        Err(e) => {
            tracing::error!(target: "exoagent::agent", reason = e.reason(), error = %e, "Exosphere's notebook link is off");
            None
        }
    }
}

/// A state directory carried over from another instance (a snapshot or a baked image) must not
/// keep that instance's passphrase: key the run-once state by the instance UUID.
pub(super) fn forget_previous_instance(plan: &Plan) -> Result<(), AgentError> {
    let Some(identity) = &plan.identity else {
        return Ok(());
    };
    let marker = plan.paths.instance_id_file();
    let previous = std::fs::read_to_string(&marker).ok();
    if previous.as_deref().map(str::trim) == Some(identity.uuid.as_str()) {
        return Ok(());
    }
    if previous.is_some() {
        tracing::warn!(target: "exoagent::agent", "state belongs to another instance; starting fresh");
        for stale in [
            plan.paths.passphrase_file(),
            plan.paths.password_set_marker(),
            plan.paths.password_published_marker(),
            // Holds the old passphrase's hash; gone, JupyterLab's configuration is the first
            // boot's (written once the new hash is ready, not waited for before the spawn).
            crate::services::jupyterlab::JupyterLab::server_config_path(&plan.paths),
            // The other server's request; this one's is read from the metadata service.
            plan.paths.cloud_request_file(),
        ] {
            // Absent is as good as removed; anything else would leak the old passphrase.
            if let Err(e) = std::fs::remove_file(&stale) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(target: "exoagent::agent", path = %stale.display(), error = %e, "cannot remove the previous instance's state");
                }
            }
        }
    }
    fsutil::write_atomic(&marker, identity.uuid.as_bytes(), 0o644, None).map_err(|source| {
        AgentError::Io {
            path: marker.clone(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::agent::fixtures::{recording_installer, serve_every_request};
    use crate::agent::{fixtures, plan};
    use crate::services::jupyterlab::{JupyterLab, JupyterLabSettings};
    use crate::services::rstudio::{RStudio, RStudioSettings};

    #[tokio::test]
    async fn a_wrong_checksum_stops_rstudio_before_the_package_layer_is_called() {
        let addr = serve_every_request(b"not Posit's package");
        let dir = tempfile::tempdir().unwrap();
        let tools = dir.path().join("tools");
        std::fs::create_dir_all(&tools).unwrap();
        let root = dir.path().join("root");
        let ctx = fixtures::sandbox_context(&root);
        let os = fixtures::debian12();
        let rstudio = Service::RStudio(RStudio::new(
            RStudioSettings {
                package_url: Some(format!("http://{addr}/rstudio-server.deb")),
                ..RStudioSettings::default()
            },
            os.clone(),
        ));
        let installer = recording_installer(&tools);
        let calls = tools.join("calls");

        // RStudio alone: refused with its reason, and the batch has nothing to do.
        let fetched = fetch_all(std::slice::from_ref(&rstudio), &ctx).await;
        assert!(fetched.ready.is_empty());
        let [(service, refusal)] = &fetched.refused[..] else {
            panic!("{} refused", fetched.refused.len());
        };
        assert_eq!(service.kind(), crate::model::ServiceKind::RStudio);
        assert_eq!(refusal.reason(), "rstudio-checksum-mismatch", "{refusal}");
        assert!(
            refusal.to_string().contains("nothing was installed"),
            "{refusal}"
        );
        let batch = install_batch(&installer, &fetched, &os).await.unwrap();
        assert!(batch.is_empty());
        assert!(!calls.exists(), "the package layer was called");

        // Beside JupyterLab: its packages go through the batch, R never does.
        let jupyter = Service::JupyterLab(JupyterLab::new(JupyterLabSettings::default()));
        let fetched = fetch_all(&[jupyter, rstudio], &ctx).await;
        assert_eq!(fetched.ready.len(), 1);
        assert_eq!(fetched.refused.len(), 1);
        let batch = install_batch(&installer, &fetched, &os).await.unwrap();
        // python3-venv only for pip: uv (the default, `auto`) makes the venv without it.
        assert_eq!(batch, ["python3".into()]);
        let log = std::fs::read_to_string(&calls).unwrap();
        assert!(log.contains("apt-get") && log.contains("python3"), "{log}");
        assert!(!log.contains("python3-venv"), "{log}");
        assert!(!log.contains("r-base"), "R went into the batch:\n{log}");
        assert!(
            !log.contains(".deb"),
            "the refused .deb went into the batch:\n{log}"
        );
        let payload = root.join("opt/exoagent/rstudio");
        let left: Vec<_> = std::fs::read_dir(&payload)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "no package or marker kept: {left:?}");
    }

    #[test]
    fn the_hosts_base_packages_join_the_services_in_the_one_batch() {
        let os = fixtures::debian12();
        let host = crate::host::HostSettings {
            base_packages: true,
            ..Default::default()
        };
        let fetched = Fetched {
            ready: vec![Service::JupyterLab(JupyterLab::new(
                JupyterLabSettings::default(),
            ))],
            files: Vec::new(),
            refused: Vec::new(),
            host_packages: crate::host::base_packages(&host, &os),
        };
        let named: Vec<PackageItem> =
            ["cron", "gnupg", "haveged", "python3", "python3-venv", "zip"]
                .into_iter()
                .map(|n| PackageItem::Named(n.to_owned()))
                .collect();
        // Sorted, and python3-venv (asked by both) once.
        assert_eq!(batch_items(&fetched, &os), named);
    }

    #[tokio::test]
    async fn a_verified_rstudio_deb_goes_into_the_one_apt_transaction_with_r_and_the_others() {
        let addr = serve_every_request(b"Posit's package, as pinned");
        let dir = tempfile::tempdir().unwrap();
        let tools = dir.path().join("tools");
        std::fs::create_dir_all(&tools).unwrap();
        let root = dir.path().join("root");
        let ctx = fixtures::sandbox_context(&root);
        let os = fixtures::debian12();
        let rstudio = Service::RStudio(
            RStudio::new(
                RStudioSettings {
                    package_url: Some(format!("http://{addr}/rstudio-server.deb")),
                    ..RStudioSettings::default()
                },
                os.clone(),
            )
            .pinned_to(b"Posit's package, as pinned"),
        );
        let jupyter = Service::JupyterLab(JupyterLab::new(JupyterLabSettings::default()));
        let services = [jupyter, rstudio.clone()];
        let installer = recording_installer(&tools);
        let calls = tools.join("calls");
        let deb = root.join("opt/exoagent/rstudio/rstudio-server-2026.07.0-139-amd64.deb");

        let fetched = fetch_all(&services, &ctx).await;
        assert!(fetched.refused.is_empty());
        let batch = install_batch(&installer, &fetched, &os).await.unwrap();
        assert_eq!(
            batch.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "python3".to_owned(),
                "r-base".into(),
                deb.display().to_string()
            ]
        );
        // One apt-get call with everything; the .deb by its absolute path after `--`. A .deb
        // installed by a call of its own would make two.
        let log = std::fs::read_to_string(&calls).unwrap();
        let installs: Vec<&str> = log
            .lines()
            .filter(|l| l.starts_with("apt-get") && l.contains(" install "))
            .collect();
        assert_eq!(
            installs,
            [format!(
                "apt-get -y -q -o DPkg::Lock::Timeout=600 install --no-install-recommends -- python3 r-base {}",
                deb.display()
            )],
            "{log}"
        );
        // The .deb's "already installed" check asks dpkg for its package and version.
        assert!(
            log.contains("dpkg-query -W -f=${Status} ${Version} -- rstudio-server"),
            "{log}"
        );

        // After the batch (apt installed everything; here the fakes are told so, and the
        // package's rserver put under the root): RStudio's install runs no package command.
        std::fs::write(
            tools.join("installed"),
            "python3 3.11\npython3-venv 3.11\nr-base 4.2\nrstudio-server 2026.07.0+139\n",
        )
        .unwrap();
        let rserver = root.join("usr/lib/rstudio-server/bin/rserver");
        std::fs::create_dir_all(rserver.parent().unwrap()).unwrap();
        std::fs::write(&rserver, "").unwrap();
        rstudio.install(&ctx).await.unwrap();
        assert_eq!(std::fs::read_to_string(&calls).unwrap(), log);

        // A second run installs nothing: the marker keeps the .deb out, the rest is installed.
        let again = fetch_all(&services, &ctx).await;
        assert!(again.files.is_empty());
        install_batch(&installer, &again, &os).await.unwrap();
        let second = std::fs::read_to_string(&calls).unwrap();
        assert!(
            !second[log.len()..].contains("apt-get"),
            "the second run installed:\n{second}"
        );
        // Without the marker the .deb is offered again, and dpkg says it is installed at its
        // version: still nothing runs.
        std::fs::remove_file(root.join("opt/exoagent/rstudio/installed")).unwrap();
        let again = fetch_all(&services, &ctx).await;
        assert_eq!(again.files.len(), 1);
        install_batch(&installer, &again, &os).await.unwrap();
        let third = std::fs::read_to_string(&calls).unwrap();
        assert!(
            !third[log.len()..].contains("apt-get"),
            "the third run installed:\n{third}"
        );
    }

    fn sandbox_plan_with_drive(meta_data: &str) -> (tempfile::TempDir, Plan) {
        let (dir, paths) = fixtures::sandbox();
        fixtures::write_config_drive(&paths, meta_data);
        std::fs::create_dir_all(&paths.state_dir).unwrap();
        let plan = plan(Mode::Sandbox, paths).unwrap();
        (dir, plan)
    }

    /// The previous instance's run-once state: passphrase, both markers and JupyterLab's server
    /// config (its passphrase's hash).
    fn leave_previous_state(paths: &Paths, uuid: &str) -> [std::path::PathBuf; 4] {
        std::fs::write(paths.instance_id_file(), format!("{uuid}\n")).unwrap();
        let stale = [
            paths.passphrase_file(),
            paths.password_set_marker(),
            paths.password_published_marker(),
            JupyterLab::server_config_path(paths),
        ];
        for path in &stale {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, "old").unwrap();
        }
        stale
    }

    #[test]
    fn another_instance_state_is_forgotten() {
        let (_dir, plan) = sandbox_plan_with_drive(fixtures::fixture_meta_data());
        let stale = leave_previous_state(&plan.paths, "11111111-2222-3333-4444-555555555555");
        forget_previous_instance(&plan).unwrap();
        for path in &stale {
            assert!(!path.exists(), "{path:?} kept");
        }
        let recorded = std::fs::read_to_string(plan.paths.instance_id_file()).unwrap();
        assert_eq!(recorded, fixtures::FIXTURE_UUID);
    }

    #[test]
    fn same_instance_state_is_kept() {
        let (_dir, plan) = sandbox_plan_with_drive(fixtures::fixture_meta_data());
        let kept = leave_previous_state(&plan.paths, fixtures::FIXTURE_UUID);
        forget_previous_instance(&plan).unwrap();
        for path in &kept {
            assert_eq!(std::fs::read_to_string(path).unwrap(), "old", "{path:?}");
        }
    }

    #[test]
    fn an_early_passphrase_is_stored_on_a_first_run_only() {
        let (_dir, plan) = sandbox_plan_with_drive(fixtures::fixture_meta_data());
        let early = early_passphrase(&plan).expect("nothing is stored yet");
        let text = early.expose().to_owned();
        forget_previous_instance(&plan).unwrap();
        let (stored, fresh) = load_passphrase(&plan, Some(early)).unwrap();
        assert!(fresh);
        assert_eq!(stored.expose(), text);
        let file = std::fs::read_to_string(plan.paths.passphrase_file()).unwrap();
        assert_eq!(file.trim(), text);
        // A restart makes none and keeps the stored one.
        assert!(early_passphrase(&plan).is_none());
        let (again, fresh) = load_passphrase(&plan, None).unwrap();
        assert!(!fresh);
        assert_eq!(again.expose(), text);
        // Another instance's state: none is made early (one is stored), the stored one is
        // forgotten, and a new one replaces it.
        leave_previous_state(&plan.paths, "11111111-2222-3333-4444-555555555555");
        assert!(early_passphrase(&plan).is_none());
        forget_previous_instance(&plan).unwrap();
        let (new, fresh) = load_passphrase(&plan, None).unwrap();
        assert!(fresh);
        assert_ne!(new.expose(), text);
        assert_eq!(new.expose().split(' ').count(), passphrase::WORDS);
    }

    #[test]
    fn first_run_records_the_instance() {
        let (_dir, plan) = sandbox_plan_with_drive(fixtures::fixture_meta_data());
        forget_previous_instance(&plan).unwrap();
        let recorded = std::fs::read_to_string(plan.paths.instance_id_file()).unwrap();
        assert_eq!(recorded, fixtures::FIXTURE_UUID);
    }

    #[test]
    fn no_identity_touches_nothing() {
        let (_dir, paths) = fixtures::sandbox();
        let plan = plan(Mode::Sandbox, paths).unwrap();
        forget_previous_instance(&plan).unwrap();
        assert!(!plan.paths.instance_id_file().exists());
    }

    #[tokio::test]
    async fn sandbox_provisioning_creates_a_private_passphrase_for_the_invoking_user() {
        let (_dir, paths) = fixtures::sandbox();
        let plan = plan(Mode::Sandbox, paths.clone()).unwrap();
        let (passphrase, fresh) = load_passphrase(&plan, None).unwrap();
        assert!(fresh);
        let account = provision_account(&plan).await.unwrap();
        set_password_once(&plan, &passphrase, fresh).await.unwrap();
        assert_eq!(account.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(account.gid, nix::unistd::getegid().as_raw());
        assert!(account.home.starts_with(paths.system_root.join("home")));
        let file = paths.passphrase_file();
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            std::fs::read_to_string(&file).unwrap().trim(),
            passphrase.expose()
        );
        // The sandbox never sets a system password.
        assert!(!paths.password_set_marker().exists());
        // A second run keeps the passphrase.
        let (again, fresh) = load_passphrase(&plan, early_passphrase(&plan)).unwrap();
        assert!(!fresh);
        assert_eq!(again.expose(), passphrase.expose());
    }

    #[tokio::test]
    async fn sandbox_installs_no_packages() {
        let (_dir, paths) = fixtures::sandbox();
        let plan = plan(Mode::Sandbox, paths).unwrap();
        let hub = StateHub::new([]);
        let fetched = Fetched {
            ready: plan.services.clone(),
            files: Vec::new(),
            refused: Vec::new(),
            host_packages: vec!["zip".into()],
        };
        assert!(install_packages(&plan, &hub, &fetched, None).await);
        assert!(hub.snapshot().setup.step.is_none());
    }

    #[test]
    fn sandbox_has_no_metadata_service_unless_configured() {
        let (_dir, paths) = fixtures::sandbox();
        let plan = plan(Mode::Sandbox, paths).unwrap();
        assert!(metadata_service(&plan).is_none());
    }

    #[test]
    fn nova_reporting_without_identity_is_reported_failed() {
        let (_dir, paths) = fixtures::sandbox();
        fixtures::write_config(
            &paths,
            "[cloud]\nclouds_yaml = \"/nonexistent/clouds.yaml\"\n",
        );
        let plan = plan(Mode::Sandbox, paths).unwrap();
        let hub = StateHub::new([]);
        assert!(nova_reporter(&plan.settings.cloud, plan.identity.as_ref(), &hub).is_none());
        let nova = hub.snapshot().nova.unwrap();
        assert_eq!(nova.state, NovaReportingState::Failed);
        assert_eq!(nova.reason.unwrap().code, "identity-unknown");
    }
}
