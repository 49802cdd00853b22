//! The plan: everything decided before the machine is touched (settings, OS, identity from a
//! config drive, services and their packages), and how `exoagent validate` shows it.

use std::fmt;
use std::path::PathBuf;

use crate::cloud::{ConfigDrive, InstanceIdentity};
use crate::config::{self, Settings, DEFAULT_METADATA_URL};
use crate::paths::Paths;
use crate::platform::os::{self, Os};
use crate::platform::users::Account;
use crate::schema::values::redact_userinfo;
use crate::services::{Service, ServiceContext};

use super::provision::invoking_account;
use super::{AgentError, Mode};

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
    let identity = drive_identity(&paths)?;
    let services: Vec<Service> = loaded
        .settings
        .services
        .iter()
        .map(|s| Service::from_settings(s, &os, &paths.system_root, &loaded.settings.tls))
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

/// The instance identity from the config drive's documents, `None` when there are none.
pub(crate) fn drive_identity(paths: &Paths) -> Result<Option<InstanceIdentity>, AgentError> {
    match ConfigDrive::new(&paths.config_drive).identity() {
        Ok(identity) => Ok(Some(identity)),
        Err(crate::cloud::IdentityError::Missing { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

impl Plan {
    /// A copy for the services' side of the set-up, which runs beside the identity lookup:
    /// everything but the identity (that side's, not needed to install or start a service).
    pub(crate) fn services_side(&self) -> Plan {
        Plan {
            mode: self.mode.clone(),
            paths: self.paths.clone(),
            settings: self.settings.clone(),
            config_files: self.config_files.clone(),
            os: self.os.clone(),
            identity: None,
            services: self.services.clone(),
            packages: self.packages.clone(),
        }
    }

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
            // Accepted URLs carry no credentials; masked anyway, as every shown URL is.
            (Some(url), _) => writeln!(f, "metadata service: {}", redact_userinfo(url))?,
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
        let volumes = &self.settings.volumes;
        match (volumes.automount, &self.mode) {
            (_, Mode::Sandbox) => writeln!(f, "volumes: not touched (sandbox)")?,
            (false, Mode::System) => {
                writeln!(f, "volumes: not touched (volumes.automount = false)")?
            }
            (true, Mode::System) => writeln!(
                f,
                "volumes: mounted under {} (blank disks formatted ext4; anything else left alone)",
                volumes.mount_root.display()
            )?,
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
        let ctx = ServiceContext {
            paths: self.paths.clone(),
            account,
            exe: self.paths.installed_exe(),
        };
        // The batch: every service's system packages, then the package files their fetch
        // verifies and offers (RStudio's .deb on Debian/Ubuntu).
        let items: Vec<String> = self
            .packages
            .iter()
            .cloned()
            .chain(self.services.iter().flat_map(|s| {
                s.batch_files(&ctx)
                    .into_iter()
                    .map(|file| file.path.display().to_string())
            }))
            .collect();
        if items.is_empty() {
            writeln!(f, "  {step}. system packages: none needed")?;
        } else if self.mode == Mode::Sandbox {
            writeln!(
                f,
                "  {step}. system packages (sandbox: not installed, must be present): {}",
                items.join(" ")
            )?;
        } else {
            writeln!(
                f,
                "  {step}. install missing system packages and verified package files in one {:?} transaction, after every service's downloads are fetched and verified (a refused service's packages and files are left out): {}",
                self.os.family.package_manager(),
                items.join(" ")
            )?;
        }
        if self.services.is_empty() {
            step += 1;
            writeln!(f, "  {step}. no services enabled")?;
        }
        let tls = &self.settings.tls;
        let fronted: Vec<String> = self
            .services
            .iter()
            .filter_map(|s| {
                s.endpoint()
                    .front
                    .map(|public| format!("{} on {public}", s.kind()))
            })
            .collect();
        if !fronted.is_empty() {
            step += 1;
            let certificate = match &tls.certificate {
                crate::config::CertChoice::Generated => format!(
                    "generate (or keep, renewing 30 days before expiry) a certificate for this \
                     host's names and addresses in {}",
                    self.paths.tls_dir().display()
                ),
                crate::config::CertChoice::Operator { cert, key } => format!(
                    "install the operator's certificate {} and key {} into {}",
                    cert.display(),
                    key.display(),
                    self.paths.tls_dir().display()
                ),
            };
            writeln!(
                f,
                "  {step}. TLS front: {certificate}; run a front for {}; {}{}{}",
                fronted.join(", "),
                // A client CA makes the front refuse plain HTTP too (`exoagent front`).
                if tls.require || tls.client_ca.is_some() {
                    "plain HTTP refused"
                } else {
                    "plain HTTP also served"
                },
                if tls.client_ca.is_some() {
                    "; client certificates from the configured CA required"
                } else {
                    ""
                },
                if tls.trusted_proxies.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; forwarded headers kept from {}",
                        tls.trusted_proxies
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                },
            )?;
        }
        for service in &self.services {
            step += 1;
            let endpoint = service.endpoint();
            let behind = if endpoint.front.is_some() {
                format!(", behind the TLS front, itself on {}", endpoint.listen)
            } else {
                String::new()
            };
            writeln!(
                f,
                "  {step}. {} on port {}{behind} (concurrently with other services):",
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::fixtures;
    use crate::model::ServiceKind;

    #[test]
    fn empty_sandbox_plans_no_services() {
        let (_dir, paths) = fixtures::sandbox();
        let plan = plan(Mode::Sandbox, paths.clone()).unwrap();
        assert!(plan.services.is_empty());
        assert!(plan.packages.is_empty());
        assert!(plan.config_files.is_empty());
        assert!(plan.identity.is_none());
        let shown = plan.to_string();
        assert!(shown.contains("mode: sandbox"), "{shown}");
        assert!(shown.contains("no services enabled"), "{shown}");
        assert!(shown.contains("config: built-in defaults only"), "{shown}");
        assert!(
            shown.contains("metadata service: none (sandbox)"),
            "{shown}"
        );
        assert!(shown.contains("volumes: not touched (sandbox)"), "{shown}");
        assert!(
            shown.contains(&format!(
                "instance: no config drive at {}",
                paths.config_drive.display()
            )),
            "{shown}"
        );
    }

    #[test]
    fn jupyterlab_config_lists_its_steps() {
        let (_dir, paths) = fixtures::sandbox();
        fixtures::write_config(
            &paths,
            "[services.jupyterlab]\nenabled = true\nbind = \"127.0.0.1\"\nport = 8899\n",
        );
        let plan = plan(Mode::Sandbox, paths.clone()).unwrap();
        let kinds: Vec<ServiceKind> = plan.services.iter().map(|s| s.kind()).collect();
        assert_eq!(kinds, [ServiceKind::JupyterLab]);
        assert_eq!(plan.packages, packages_for(&plan.services, &plan.os));
        assert_eq!(plan.config_files, vec![paths.config_file.clone()]);
        let shown = plan.to_string();
        assert!(!shown.contains("no services enabled"), "{shown}");
        assert!(shown.contains("jupyterlab on port 8899"), "{shown}");
        assert!(
            shown.contains(&paths.config_file.display().to_string()),
            "{shown}"
        );
        assert!(
            shown.contains("     - "),
            "the service's own steps: {shown}"
        );
    }

    #[test]
    fn the_rstudio_plan_on_debian_puts_the_verified_deb_into_the_one_batch() {
        let (_dir, paths) = fixtures::sandbox();
        fixtures::write_config(&paths, "[services.rstudio]\nenabled = true\n");
        let mut plan = plan(Mode::Sandbox, paths.clone()).unwrap();
        // As `exoagent validate` shows it on a Debian 12 instance.
        plan.mode = Mode::System;
        plan.os = os::Os {
            id: "debian".into(),
            version_id: "12".into(),
            pretty_name: "Debian GNU/Linux 12 (bookworm)".into(),
            family: os::Family::Debian,
            supported: true,
        };
        plan.services = plan
            .settings
            .services
            .iter()
            .map(|s| Service::from_settings(s, &plan.os, &paths.system_root, &plan.settings.tls))
            .collect();
        plan.packages = packages_for(&plan.services, &plan.os);
        let shown = plan.to_string();
        let deb = paths
            .opt_dir
            .join("rstudio/rstudio-server-2026.07.0-139-amd64.deb")
            .display()
            .to_string();
        let at = |needle: &str| {
            shown
                .find(needle)
                .unwrap_or_else(|| panic!("no '{needle}' in:\n{shown}"))
        };
        let batch = at(&format!(
            "install missing system packages and verified package files in one Apt transaction, after every service's downloads are fetched and verified (a refused service's packages and files are left out): r-base {deb}\n"
        ));
        let download = at("- download https://download2.rstudio.org/server/jammy/");
        let in_batch = at(&format!(
            "- install {deb} (rstudio-server 2026.07.0+139) in the one batched apt transaction"
        ));
        let mask = at("- run systemctl mask rstudio-server");
        let configure = at("- write ");
        let run = at("- run /usr/lib/rstudio-server/bin/rserver --server-daemonize=0");
        // The batch line names every item; RStudio's own lines give the order around it.
        assert!(batch < download, "{shown}");
        assert!(
            download < in_batch && in_batch < mask && mask < configure && configure < run,
            "{shown}"
        );
        assert!(
            !shown.contains("apt-get"),
            "no apt-get of its own:\n{shown}"
        );
    }

    #[test]
    fn config_drive_identity_is_planned() {
        let (_dir, paths) = fixtures::sandbox();
        fixtures::write_config_drive(&paths, fixtures::fixture_meta_data());
        let plan = plan(Mode::Sandbox, paths).unwrap();
        assert_eq!(plan.identity.as_ref().unwrap().uuid, fixtures::FIXTURE_UUID);
        assert!(plan.to_string().contains(fixtures::FIXTURE_UUID));
    }

    #[test]
    fn bad_config_is_a_config_error() {
        let (_dir, paths) = fixtures::sandbox();
        fixtures::write_config(&paths, "[services.jupyterlab]\nprot = 8888\n");
        match plan(Mode::Sandbox, paths) {
            Err(AgentError::Config(errors)) => {
                assert_eq!(errors.errors.len(), 1, "{errors}");
                assert!(
                    errors.to_string().contains("services.jupyterlab.prot"),
                    "{errors}"
                );
            }
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn malformed_config_drive_is_an_identity_error() {
        let (_dir, paths) = fixtures::sandbox();
        fixtures::write_config_drive(&paths, "{not json");
        assert!(matches!(
            plan(Mode::Sandbox, paths),
            Err(AgentError::Identity(_))
        ));
    }
}
