//! `exoagent install`: puts the systemd unit, the tmpfiles entry and the configuration
//! directory into a root (`/` on an instance, an image's root when baking), pointing the unit
//! at the binary's installed path, and optionally enables the unit without a running systemd;
//! and what systemd says about the unit, for a waiter that cannot reach the agent.

use std::path::{Path, PathBuf};

use crate::fsutil;

/// The unit as shipped.
pub const UNIT: &str = include_str!("../../../installer/systemd/exoagent.service");
/// The unit that reads the executable into memory early in the boot, as shipped (the agent's
/// unit wants it).
pub const WARM_UNIT: &str = include_str!("../../../installer/systemd/exoagent-warm.service");
/// The tmpfiles.d entry as shipped.
pub const TMPFILES: &str = include_str!("../../../installer/systemd/exoagent.tmpfiles");
/// The unit's path below the root.
pub const UNIT_PATH: &str = "etc/systemd/system/exoagent.service";
/// The warm-up unit's path below the root.
pub const WARM_UNIT_PATH: &str = "etc/systemd/system/exoagent-warm.service";
/// The tmpfiles entry's path below the root.
pub const TMPFILES_PATH: &str = "etc/tmpfiles.d/exoagent.conf";
/// The enablement link's path below the root.
pub const WANTS_LINK: &str = "etc/systemd/system/multi-user.target.wants/exoagent.service";
/// Where packages and baked images put the binary (owned by the layout).
pub use crate::paths::INSTALLED_EXE;
const SHIPPED_EXEC: &str = "ExecStart=/usr/bin/exoagent run";
/// The executable's path in the warm-up unit as shipped (its condition and its command).
const SHIPPED_PATH: &str = "/usr/bin/exoagent";

/// Why installing failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The binary path cannot go into a unit file.
    #[error("--exec: '{0}' must be an absolute path without whitespace")]
    BadExec(PathBuf),
    /// Writing a file or directory failed.
    #[error("failed to write '{path}': {source}")]
    Write {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

impl InstallError {
    /// Short stable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::BadExec(_) => "install-bad-exec",
            Self::Write { .. } => "install-write-failed",
        }
    }

    /// The exit status of `exoagent install`: 2 for a bad `--exec` (a usage error), 1 when
    /// writing failed. No catch-all arm: a new variant needs a deliberate code.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::BadExec(_) => 2,
            Self::Write { .. } => 1,
        }
    }
}

/// The unit text with `ExecStart` pointing at `exec`.
pub fn unit_for(exec: &Path) -> Result<String, InstallError> {
    let text = exec.to_str().unwrap_or("");
    if !exec.is_absolute() || text.is_empty() || text.chars().any(char::is_whitespace) {
        return Err(InstallError::BadExec(exec.to_path_buf()));
    }
    Ok(UNIT.replace(SHIPPED_EXEC, &format!("ExecStart={text} run")))
}

/// The warm-up unit's text reading `exec` (checked by [`unit_for`]).
fn warm_unit_for(exec: &str) -> String {
    WARM_UNIT.replace(SHIPPED_PATH, exec)
}

/// Install into `root`; with `enable`, also link the unit into `multi-user.target.wants`.
/// Returns the paths written.
pub fn install(root: &Path, exec: &Path, enable: bool) -> Result<Vec<PathBuf>, InstallError> {
    let unit = unit_for(exec)?;
    let warm = warm_unit_for(&exec.to_string_lossy());
    let at = |relative: &str| root.join(relative);
    let wrote = |path: PathBuf| move |source| InstallError::Write { path, source };
    let mut written = Vec::new();
    for (relative, text) in [
        (UNIT_PATH, unit.as_str()),
        (WARM_UNIT_PATH, warm.as_str()),
        (TMPFILES_PATH, TMPFILES),
    ] {
        let path = at(relative);
        if let Some(parent) = path.parent() {
            fsutil::ensure_dir(parent, 0o755).map_err(wrote(parent.to_path_buf()))?;
        }
        fsutil::write_atomic(&path, text.as_bytes(), 0o644, None).map_err(wrote(path.clone()))?;
        written.push(path);
    }
    let config_d = at("etc/exoagent/config.d");
    fsutil::ensure_dir(&config_d, 0o755).map_err(wrote(config_d.clone()))?;
    written.push(config_d);
    if enable {
        let link = at(WANTS_LINK);
        if let Some(parent) = link.parent() {
            fsutil::ensure_dir(parent, 0o755).map_err(wrote(parent.to_path_buf()))?;
        }
        match std::fs::remove_file(&link) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(InstallError::Write { path: link, source }),
        }
        std::os::unix::fs::symlink(format!("/{UNIT_PATH}"), &link).map_err(wrote(link.clone()))?;
        written.push(link);
    }
    Ok(written)
}

/// The unit's name, as systemd knows it.
pub const UNIT_NAME: &str = "exoagent.service";

/// What systemd says about the unit when the agent does not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitState {
    /// Starting, restarting, queued or running: the agent may still answer.
    Pending,
    /// Ended and not to be restarted (exit 77/78, or the restart limit): it will not answer.
    Failed,
    /// No such unit: nothing will start the agent.
    Missing,
}

impl UnitState {
    /// From `systemctl show --property=LoadState,ActiveState` output; anything unexpected is
    /// `Pending` (keep waiting rather than give up on a misread).
    pub fn from_show(text: &str) -> Self {
        let value = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .map(str::trim)
        };
        match (value("LoadState"), value("ActiveState")) {
            (Some("not-found"), _) => Self::Missing,
            (_, Some("failed")) => Self::Failed,
            _ => Self::Pending,
        }
    }
}

/// Ask `systemctl` (argv, no shell) about the unit; `Pending` when it cannot be asked.
pub async fn unit_state(systemctl: &Path) -> UnitState {
    let args = ["show", "--property=LoadState,ActiveState", UNIT_NAME];
    let asked = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        crate::platform::exec::run(systemctl, &args, &[], None),
    )
    .await;
    match asked {
        Ok(Ok(finished)) if finished.status.success() => UnitState::from_show(&finished.stdout),
        _ => UnitState::Pending,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_shipped_unit_has_the_exec_line_we_replace() {
        assert!(UNIT.contains(SHIPPED_EXEC));
        assert!(UNIT.contains("\nWants=exoagent-warm.service\n"));
        assert_eq!(WARM_UNIT.matches(SHIPPED_PATH).count(), 2, "{WARM_UNIT}");
    }

    #[test]
    fn installs_into_a_root_and_enables() {
        let root = tempfile::tempdir().unwrap();
        let written = install(root.path(), Path::new("/usr/local/bin/exoagent"), true).unwrap();
        assert_eq!(written.len(), 5);
        let warm = std::fs::read_to_string(root.path().join(WARM_UNIT_PATH)).unwrap();
        assert!(
            warm.contains("\nConditionPathExists=/usr/local/bin/exoagent\n")
                && warm.contains("\nExecStart=/bin/cat /usr/local/bin/exoagent\n"),
            "{warm}"
        );
        let unit = std::fs::read_to_string(root.path().join(UNIT_PATH)).unwrap();
        assert!(
            unit.contains("ExecStart=/usr/local/bin/exoagent run\n"),
            "{unit}"
        );
        let mode = std::fs::metadata(root.path().join(UNIT_PATH))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
        let link = std::fs::read_link(root.path().join(WANTS_LINK)).unwrap();
        assert_eq!(link, Path::new("/etc/systemd/system/exoagent.service"));
        // Idempotent.
        install(root.path(), Path::new("/usr/local/bin/exoagent"), true).unwrap();
    }

    #[test]
    fn a_relative_or_spaced_exec_is_refused_before_writing() {
        let root = tempfile::tempdir().unwrap();
        for bad in ["exoagent", "/opt/my agent/exoagent"] {
            let err = install(root.path(), Path::new(bad), false).unwrap_err();
            assert_eq!(err.reason(), "install-bad-exec");
            assert_eq!(err.exit_code(), 2, "a usage error");
        }
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
    }

    #[test]
    fn unit_states_read_from_systemctl_show() {
        assert_eq!(
            UnitState::from_show("LoadState=loaded\nActiveState=failed\n"),
            UnitState::Failed
        );
        assert_eq!(
            UnitState::from_show("LoadState=not-found\nActiveState=inactive\n"),
            UnitState::Missing
        );
        for pending in [
            "LoadState=loaded\nActiveState=activating\n",
            "LoadState=loaded\nActiveState=inactive\n",
            "LoadState=loaded\nActiveState=active\n",
            "",
        ] {
            assert_eq!(
                UnitState::from_show(pending),
                UnitState::Pending,
                "{pending}"
            );
        }
    }
}
