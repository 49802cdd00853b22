//! The instance-wide touches outside any service that Exosphere's playbook makes on every
//! instance (its `console-setup`, `cloud-init-tweaks` and `base-setup` roles): exouser's
//! autologin on tty1, cloud-init's logs kept private, exouser in the distribution's default
//! user's group, and the base packages (which join the one package transaction); cloud-init's
//! deferred files where its cloud-init cannot defer; and exoagent's own: the hook that shows the
//! login banner (`exoagent motd`), the distribution's way, and the instance user's home given
//! back when root owns it.

mod deferred;
mod home;
pub mod settings;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub use settings::HostSettings;

use crate::fsutil;
use crate::platform::exec;
use crate::platform::os::{Family, Os};
use crate::platform::users::{GroupJoin, UserError, UserManager};

/// tty1's getty drop-in, under the system root: Exosphere's file name and contents, so an
/// image set up by either looks the same.
pub const AUTOLOGIN_DROPIN: &str = "etc/systemd/system/getty@tty1.service.d/autologin.conf";

/// cloud-init's logs, under the system root.
pub const CLOUD_INIT_LOGS: [&str; 2] = ["var/log/cloud-init.log", "var/log/cloud-init-output.log"];

/// The unit that makes them private again on every boot (cloud-init may re-create them). It is
/// ordered after cloud-init's network stage (which opens them; `cloud-init.service`, named
/// `cloud-init-network.service` from cloud-init 24.3, Debian 13: both are listed) only: `cloud-final.service` comes after
/// `multi-user.target`, which pulls this unit in, so ordering after it would be a cycle.
pub const CLOUD_INIT_LOGS_UNIT: &str = "etc/systemd/system/exoagent-cloud-init-logs.service";

/// `u=rw,g=r,o=`.
pub const PRIVATE_LOG_MODE: u32 = 0o640;

/// The login banner's hook on Debian and Ubuntu: pam_motd runs `/etc/update-motd.d/*` (through
/// run-parts, so executable files only) as root at every SSH and console login.
pub const MOTD_HOOK: &str = "etc/update-motd.d/60-exoagent";

/// The login banner's hook on EL (no update-motd there): sourced by every login shell, as the
/// user who logs in.
pub const PROFILE_HOOK: &str = "etc/profile.d/exoagent.sh";

/// The header line of both hooks (the first, or the second after `#!`): what marks a file as
/// exoagent's to replace or remove.
const HOOK_HEADER: &str = "# Written by exoagent ([host] login_banner";

/// The hook for `family` calling `exe`: its path under the root, contents and mode. `exe` must
/// be an absolute path of printable characters (it is written into a shell script, quoted).
pub fn login_hook(family: Family, exe: &Path) -> Option<(&'static str, String, u32)> {
    let exe = exe.to_str()?;
    if !exe.starts_with('/') || exe.chars().any(char::is_control) {
        return None;
    }
    let exe = sh_quote(exe);
    Some(match family {
        Family::Debian => (
            MOTD_HOOK,
            format!(
                "#!/bin/sh\n\
                 {HOOK_HEADER}; false removes it, chmod -x silences it.)\n\
                 # The setup state at login. `exoagent motd` answers within 100 ms and exits 0.\n\
                 [ -x {exe} ] || exit 0\n\
                 exec {exe} motd\n"
            ),
            0o755,
        ),
        Family::RedHat => (
            PROFILE_HOOK,
            format!(
                "{HOOK_HEADER}; false removes it.)\n\
                 # The setup state at login. Interactive login shells only: scp, rsync and\n\
                 # scripts see nothing, and neither does every new terminal (EL's bashrc sources\n\
                 # profile.d in non-login shells too). `exoagent motd` answers within 100 ms.\n\
                 case $- in\n\
                 \x20 *i*)\n\
                 \x20   if [ -x {exe} ]; then\n\
                 \x20     if [ -n \"${{BASH_VERSION-}}\" ]; then\n\
                 \x20       if shopt -q login_shell; then {exe} motd; fi\n\
                 \x20     else\n\
                 \x20       case $0 in -*) {exe} motd ;; esac\n\
                 \x20     fi\n\
                 \x20   fi ;;\n\
                 esac\n\
                 :\n"
            ),
            0o644,
        ),
    })
}

/// Whether a hook file's text is exoagent's (the header is the first line, or the second after
/// a `#!` line).
fn is_own_hook(text: &str) -> bool {
    text.lines()
        .take(2)
        .any(|line| line.starts_with(HOOK_HEADER))
}

/// `text` as one single-quoted shell word.
fn sh_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// The getty drop-in that logs `user` in on tty1 (Exosphere's `autologin.conf`, the user
/// substituted; the doubled backslash is systemd's escape for agetty's `\u`).
pub fn autologin_dropin(user: &str) -> String {
    format!(
        "[Service]\nExecStart=\nExecStart=-/sbin/agetty -o '-p -f -- \\\\u' --noclear --autologin {user} %I $TERM\n"
    )
}

fn cloud_init_logs_unit() -> String {
    let logs: Vec<String> = CLOUD_INIT_LOGS.iter().map(|l| format!("/{l}")).collect();
    format!(
        "# Written by exoagent ([host] private_cloud_init_logs): cloud-init's logs can hold user data.\n\
         [Unit]\n\
         Description=Keep cloud-init's logs readable by root and group only\n\
         After=cloud-init.service\n\
         After=cloud-init-network.service\n\
         PartOf=cloud-init.service\n\
         PartOf=cloud-init-network.service\n\n\
         [Service]\n\
         Type=oneshot\n\
         RemainAfterExit=yes\n\
         ExecStart=-/bin/chmod u=rw,g=r,o= {}\n\n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        logs.join(" ")
    )
}

/// The base packages on `os`: Exosphere's base-setup list. EL leaves out `haveged`, which only
/// EPEL has there (and the kernel's own entropy source makes it unnecessary).
pub fn base_packages(settings: &HostSettings, os: &Os) -> Vec<String> {
    if !settings.base_packages {
        return Vec::new();
    }
    let names: &[&str] = match os.family {
        Family::Debian => &["cron", "gnupg", "haveged", "python3-venv", "zip"],
        Family::RedHat => &["cronie", "gnupg2", "zip"],
    };
    names.iter().map(|n| (*n).to_owned()).collect()
}

/// The group of the user cloud-init creates by default on `os` (Exosphere's per-distribution
/// `default_user_group`), if exoagent knows it.
pub fn default_user_group(os: &Os) -> Option<&'static str> {
    match os.id.as_str() {
        "debian" => Some("debian"),
        "ubuntu" => Some("ubuntu"),
        "rocky" => Some("rocky"),
        "almalinux" => Some("almalinux"),
        "centos" => Some("centos"),
        _ => None,
    }
}

/// One of the touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Touch {
    /// tty1 autologin.
    ConsoleAutologin,
    /// cloud-init's logs 0640.
    PrivateCloudInitLogs,
    /// The default user's group.
    DefaultUserGroup,
    /// The login banner's hook.
    LoginBanner,
    /// The instance user's home given back.
    HomeOwnership,
    /// cloud-init's deferred `write_files`.
    DeferredWriteFiles,
}

impl Touch {
    /// The `[host]` key that asks for it.
    pub fn key(self) -> &'static str {
        match self {
            Self::ConsoleAutologin => "console_autologin",
            Self::PrivateCloudInitLogs => "private_cloud_init_logs",
            Self::DefaultUserGroup => "default_user_group",
            Self::LoginBanner => "login_banner",
            Self::HomeOwnership => "home_ownership",
            Self::DeferredWriteFiles => "deferred_write_files",
        }
    }
}

impl Touch {
    /// When it is made: the home before any service is installed (an install may write into
    /// it), the groups as soon as the account exists (a service started meanwhile is given the
    /// groups being joined: [`Host::groups_to_join`]); the rest
    /// beside the services' start: cloud-init's deferred files (which cloud-init itself writes
    /// in its last stage, after everything else) first, then a getty restart and a unit
    /// enabled (each a systemd reload that takes seconds on a small instance at boot).
    pub fn stage(self) -> Stage {
        match self {
            Self::HomeOwnership => Stage::BeforeServices,
            Self::DefaultUserGroup => Stage::WithAccount,
            Self::DeferredWriteFiles
            | Self::ConsoleAutologin
            | Self::PrivateCloudInitLogs
            | Self::LoginBanner => Stage::BesideServices,
        }
    }
}

/// The touches [`Host::apply`] makes, in order within a stage.
const APPLIED: [Touch; 5] = [
    Touch::HomeOwnership,
    Touch::DeferredWriteFiles,
    Touch::DefaultUserGroup,
    Touch::ConsoleAutologin,
    Touch::PrivateCloudInitLogs,
];

/// When a touch is made, relative to the services' start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Before any service is installed or configured (the user's home and its files).
    BeforeServices,
    /// As soon as the account exists, beside the services' install, configuration and start
    /// (the user's groups; each service process is given the groups being joined).
    WithAccount,
    /// Beside the services' start (nothing a service needs).
    BesideServices,
}

/// What a touch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The machine was changed.
    Changed,
    /// Already so.
    Unchanged,
    /// Not possible here, and why (not an error: for example the group does not exist).
    Skipped(String),
}

/// Why a touch failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A file could not be read or written.
    #[error("failed to {action} '{path}': {source}")]
    Io {
        /// What was attempted.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A tool failed.
    #[error("'{command}' failed ({status}): {stderr}")]
    Command {
        /// argv, joined.
        command: String,
        /// Its exit status.
        status: String,
        /// The tail of its output.
        stderr: String,
    },
    /// The account tools failed.
    #[error(transparent)]
    User(#[from] UserError),
    /// cloud-init's merged cloud-config cannot be acted on.
    #[error("'{path}': {message}")]
    CloudConfig {
        /// The cloud-config file.
        path: PathBuf,
        /// The entry and key, and what is wrong.
        message: String,
    },
}

impl HostError {
    /// A `map_err` for an I/O failure of `action` on `path`.
    fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| Self::Io {
            action,
            path,
            source,
        }
    }

    /// Short stable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Io { source, .. } if fsutil::is_disk_full(source) => "disk-full",
            Self::Io { .. } => "host-file-failed",
            Self::Command { .. } => "host-command-failed",
            Self::User(e) => e.reason(),
            Self::CloudConfig { .. } => "cloud-config-invalid",
        }
    }
}

/// The machine the touches are made on: files under `root`; systemd is told only when `root` is
/// the running system and systemd runs it.
#[derive(Debug, Clone)]
pub struct Host {
    root: PathBuf,
    systemctl: Option<PathBuf>,
}

impl Host {
    /// The machine at `root`.
    pub fn new(root: &Path) -> Self {
        let live = root == Path::new("/") && Path::new("/run/systemd/system").is_dir();
        Self {
            root: root.to_path_buf(),
            systemctl: live.then(|| PathBuf::from("systemctl")),
        }
    }

    /// Make every touch of `stage` that `settings` asks for, for the instance user `user`;
    /// each result is independent (one failing does not stop the others). `deferred_marker`
    /// records the cloud-init instance whose deferred files were written.
    pub async fn apply(
        &self,
        stage: Stage,
        settings: &HostSettings,
        os: &Os,
        user: &str,
        users: &UserManager,
        deferred_marker: &Path,
    ) -> Vec<(Touch, Result<Outcome, HostError>)> {
        let mut done = Vec::new();
        for touch in APPLIED {
            if touch.stage() != stage || !settings.asks(touch) {
                continue;
            }
            let outcome = match touch {
                Touch::HomeOwnership => match users.lookup(user) {
                    Ok(Some(entry)) => home::reclaim_home(&self.root, &entry),
                    Ok(None) => Ok(Outcome::Skipped(format!("user '{user}' does not exist"))),
                    Err(e) => Err(e.into()),
                },
                // Files written and given away one by one: blocking work, off the runtime
                // (it runs while the services start).
                Touch::DeferredWriteFiles => {
                    let (root, marker) = (self.root.clone(), deferred_marker.to_path_buf());
                    let users = users.clone();
                    let written = tokio::task::spawn_blocking(move || {
                        deferred::complete(&root, &marker, &users)
                    });
                    match written.await {
                        Ok(done) => done,
                        // Only a panic ends a blocking task early: pass it on.
                        Err(e) => std::panic::resume_unwind(e.into_panic()),
                    }
                }
                Touch::DefaultUserGroup => self.default_user_group(os, user, users).await,
                Touch::ConsoleAutologin => self.console_autologin(user).await,
                Touch::PrivateCloudInitLogs => self.private_cloud_init_logs().await,
                // Written when the status API answers (`login_banner`), not here.
                Touch::LoginBanner => continue,
            };
            done.push((touch, outcome));
        }
        done
    }

    /// The ids of the groups [`Stage::WithAccount`]'s touches are to add `user` to (read only:
    /// the group file; empty when nothing would be joined). A service process started before
    /// the join is given them, since its groups are fixed when it starts.
    pub fn groups_to_join(
        &self,
        settings: &HostSettings,
        os: &Os,
        user: &str,
        users: &UserManager,
    ) -> Result<Vec<u32>, HostError> {
        if !settings.asks(Touch::DefaultUserGroup) {
            return Ok(Vec::new());
        }
        let Some(group) = default_user_group(os) else {
            return Ok(Vec::new());
        };
        Ok(users.group_to_join(user, group)?.into_iter().collect())
    }

    /// The instance user in the distribution's default user's group.
    async fn default_user_group(
        &self,
        os: &Os,
        user: &str,
        users: &UserManager,
    ) -> Result<Outcome, HostError> {
        let Some(group) = default_user_group(os) else {
            return Ok(Outcome::Skipped(format!(
                "no default user group known for {}",
                os.id.escape_debug()
            )));
        };
        match users.join_group(user, group).await? {
            GroupJoin::Joined => Ok(Outcome::Changed),
            GroupJoin::AlreadyMember => Ok(Outcome::Unchanged),
            GroupJoin::NoSuchGroup => {
                Ok(Outcome::Skipped(format!("group '{group}' does not exist")))
            }
        }
    }

    /// The login banner's hook for `os` calling `exe` when `on`; when off, any hook exoagent
    /// wrote is removed (a file of the same name that is not exoagent's is never touched). The
    /// hook's mode is the operator's once it exists, also when its text is rewritten (a new
    /// executable path): `chmod -x` is Debian's way to silence an update-motd script.
    pub fn login_banner(&self, on: bool, os: &Os, exe: &Path) -> Result<Outcome, HostError> {
        if !on {
            let mut removed = false;
            for hook in [MOTD_HOOK, PROFILE_HOOK] {
                removed |= self.remove_own_hook(&self.root.join(hook))?;
            }
            return Ok(if removed {
                Outcome::Changed
            } else {
                Outcome::Unchanged
            });
        }
        let Some((hook, contents, mode)) = login_hook(os.family, exe) else {
            return Ok(Outcome::Skipped(format!(
                "the executable's path {:?} cannot be written into a login script",
                exe.display().to_string()
            )));
        };
        let path = self.root.join(hook);
        let mut mode = mode;
        if let Ok(existing) = std::fs::read_to_string(&path) {
            if let Ok(meta) = std::fs::metadata(&path) {
                mode = meta.permissions().mode() & 0o7777;
            }
            if !is_own_hook(&existing) {
                return Ok(Outcome::Skipped(format!(
                    "'{}' exists and is not exoagent's",
                    path.display()
                )));
            }
        }
        Ok(if self.write_if_changed(&path, &contents, mode)? {
            Outcome::Changed
        } else {
            Outcome::Unchanged
        })
    }

    /// Remove `path` if exoagent wrote it; whether it did.
    fn remove_own_hook(&self, path: &Path) -> Result<bool, HostError> {
        match std::fs::read_to_string(path) {
            Ok(text) if is_own_hook(&text) => {}
            _ => return Ok(false),
        }
        std::fs::remove_file(path).map_err(|source| HostError::Io {
            action: "remove",
            path: path.to_path_buf(),
            source,
        })?;
        Ok(true)
    }

    /// Exosphere's tty1 drop-in; getty is restarted to pick it up unless someone is logged in
    /// on tty1 (their session is never cut; the drop-in then applies from their next logout).
    async fn console_autologin(&self, user: &str) -> Result<Outcome, HostError> {
        let path = self.root.join(AUTOLOGIN_DROPIN);
        if !self.write_if_changed(&path, &autologin_dropin(user), 0o644)? {
            return Ok(Outcome::Unchanged);
        }
        if self.systemctl.is_some() {
            self.systemctl(&["daemon-reload"]).await?;
            if tty1_in_use().await {
                tracing::info!(target: "exoagent::host", "someone is logged in on tty1: getty@tty1 is not restarted now");
            } else {
                self.systemctl(&["restart", "getty@tty1.service"]).await?;
            }
        }
        Ok(Outcome::Changed)
    }

    /// The logs made 0640 now, and a unit that does it again on every boot after cloud-init.
    async fn private_cloud_init_logs(&self) -> Result<Outcome, HostError> {
        let mut changed = false;
        for log in CLOUD_INIT_LOGS {
            let path = self.root.join(log);
            let metadata = match std::fs::metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(HostError::Io {
                        action: "inspect",
                        path,
                        source,
                    })
                }
            };
            if metadata.permissions().mode() & 0o7777 != PRIVATE_LOG_MODE {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(PRIVATE_LOG_MODE))
                    .map_err(|source| HostError::Io {
                        action: "restrict",
                        path: path.clone(),
                        source,
                    })?;
                changed = true;
            }
        }
        let unit = self.root.join(CLOUD_INIT_LOGS_UNIT);
        if self.write_if_changed(&unit, &cloud_init_logs_unit(), 0o644)? {
            changed = true;
            if self.systemctl.is_some() {
                // `enable` reloads systemd itself: no separate daemon-reload.
                self.systemctl(&["enable", "exoagent-cloud-init-logs.service"])
                    .await?;
            }
        }
        Ok(if changed {
            Outcome::Changed
        } else {
            Outcome::Unchanged
        })
    }

    /// Write `contents` to `path` (with `mode`) unless it already holds exactly that; whether
    /// it wrote.
    fn write_if_changed(&self, path: &Path, contents: &str, mode: u32) -> Result<bool, HostError> {
        if std::fs::read_to_string(path).ok().as_deref() == Some(contents) {
            return Ok(false);
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| HostError::Io {
                action: "create",
                path: dir.to_path_buf(),
                source,
            })?;
        }
        fsutil::write_atomic(path, contents.as_bytes(), mode, None).map_err(|source| {
            HostError::Io {
                action: "write",
                path: path.to_path_buf(),
                source,
            }
        })?;
        Ok(true)
    }

    async fn systemctl(&self, args: &[&str]) -> Result<(), HostError> {
        let Some(program) = &self.systemctl else {
            return Ok(());
        };
        let failed = |status: String, stderr: String| HostError::Command {
            command: exec::shown(program, args),
            status,
            stderr,
        };
        let finished = exec::run(program, args, &[], None)
            .await
            .map_err(|e| failed("not started".into(), e.to_string()))?;
        if finished.status.success() {
            Ok(())
        } else {
            Err(failed(finished.status.to_string(), finished.tail(3)))
        }
    }
}

/// Whether `who` lists a session on tty1 (when it cannot tell, assume so: never cut a session).
async fn tty1_in_use() -> bool {
    match exec::run(Path::new("who"), &[] as &[&str], &[], None).await {
        Ok(finished) if finished.status.success() => sessions_on_tty1(&finished.stdout),
        _ => true,
    }
}

/// `who`'s output names tty1 as a line in use.
fn sessions_on_tty1(who: &str) -> bool {
    who.lines()
        .any(|line| line.split_whitespace().nth(1) == Some("tty1"))
}

#[cfg(test)]
mod tests;
