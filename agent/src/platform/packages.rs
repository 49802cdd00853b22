//! System packages through apt or dnf: which are missing, and all of them installed in one
//! transaction that waits for the package lock and retries transient failures.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::platform::exec;
use crate::platform::os::PackageManager;

/// Lines of a failing transaction's output kept in the error.
const TAIL_LINES: usize = 10;
/// apt's package lists older than this are refreshed before installing.
const LISTS_MAX_AGE: Duration = Duration::from_secs(3600);

/// The tools used, by path (names on `PATH` in production), and apt's list directory.
#[derive(Debug, Clone)]
pub struct PackageTools {
    /// `apt-get`.
    pub apt_get: PathBuf,
    /// `dpkg-query`.
    pub dpkg_query: PathBuf,
    /// `dnf`.
    pub dnf: PathBuf,
    /// `rpm`.
    pub rpm: PathBuf,
    /// apt's downloaded package lists (their age decides whether to run `apt-get update`).
    pub apt_lists: PathBuf,
}

impl Default for PackageTools {
    fn default() -> Self {
        Self {
            apt_get: "apt-get".into(),
            dpkg_query: "dpkg-query".into(),
            dnf: "dnf".into(),
            rpm: "rpm".into(),
            apt_lists: "/var/lib/apt/lists".into(),
        }
    }
}

/// What an install did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstallOutcome {
    /// Everything was already installed; nothing ran.
    AlreadyInstalled,
    /// These packages were installed, in one transaction, after this many attempts.
    Installed {
        /// The packages that were missing.
        packages: Vec<String>,
        /// Attempts the transaction took.
        attempts: u32,
    },
}

/// Why packages could not be queried or installed.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    /// A package name that could be mistaken for an option or is not a package name.
    #[error("invalid package name '{0}'")]
    InvalidName(String),
    /// Asking which packages are installed failed.
    #[error("'{command}' failed: {detail}")]
    Query {
        /// The command.
        command: String,
        /// What went wrong.
        detail: String,
    },
    /// The transaction failed for good (or transiently, `attempts` times).
    #[error("'{command}' failed after {attempts} attempt(s) ({status}): {stderr}")]
    Install {
        /// The command.
        command: String,
        /// How many times it ran.
        attempts: u32,
        /// The last exit status.
        status: String,
        /// The tail of its output.
        stderr: String,
    },
    /// Another process held the package lock for longer than allowed.
    #[error("the package lock stayed busy through {attempts} attempt(s) of '{command}': {stderr}")]
    LockTimeout {
        /// The command.
        command: String,
        /// How many times it ran.
        attempts: u32,
        /// The tail of its output.
        stderr: String,
    },
}

impl PackageError {
    /// Short stable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidName(_) | Self::Install { .. } => "package-install-failed",
            Self::Query { .. } => "package-query-failed",
            Self::LockTimeout { .. } => "package-lock-timeout",
        }
    }
}

/// How a failed transaction should be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// Another process holds the lock: wait and retry.
    Lock,
    /// The package lists are stale or a mirror is syncing: refresh lists, then retry.
    StaleLists,
    /// Network or mirror hiccup: retry.
    Transient,
    /// Anything else: give up now.
    Permanent,
}

fn classify(manager: PackageManager, output: &str) -> Failure {
    let has = |needles: &[&str]| needles.iter().any(|n| output.contains(n));
    match manager {
        PackageManager::Apt => {
            if has(&[
                "Could not get lock",
                "Unable to acquire the dpkg frontend lock",
                "is another process using it",
            ]) {
                Failure::Lock
            } else if has(&[
                "Unable to locate package",
                "404  Not Found",
                "404 Not Found",
                "has no installation candidate",
            ]) {
                Failure::StaleLists
            } else if has(&[
                "Temporary failure resolving",
                "Failed to fetch",
                "Hash Sum mismatch",
                "Connection timed out",
                "Could not connect",
                "Connection failed",
            ]) {
                Failure::Transient
            } else {
                Failure::Permanent
            }
        }
        PackageManager::Dnf => {
            if has(&["Waiting for process", "lock"]) && has(&["held", "locked", "Waiting"]) {
                Failure::Lock
            } else if has(&[
                "Cannot download",
                "Curl error",
                "Status code: 5",
                "Failed to download metadata",
                "Cannot retrieve repository",
            ]) {
                Failure::Transient
            } else {
                Failure::Permanent
            }
        }
    }
}

/// Installs packages with one package manager.
#[derive(Debug, Clone)]
pub struct PackageInstaller {
    manager: PackageManager,
    tools: PackageTools,
    lock_timeout: Duration,
    attempts: u32,
    retry_base: Duration,
}

impl PackageInstaller {
    /// An installer using the system's tools.
    pub fn new(manager: PackageManager, settings: &PackageSettings) -> Self {
        Self::with_tools(
            manager,
            settings,
            PackageTools::default(),
            Duration::from_secs(2),
        )
    }

    /// An installer using `tools`, waiting `retry_base`, then twice that, … between attempts.
    pub fn with_tools(
        manager: PackageManager,
        settings: &PackageSettings,
        tools: PackageTools,
        retry_base: Duration,
    ) -> Self {
        Self {
            manager,
            tools,
            lock_timeout: settings.lock_timeout,
            attempts: settings.attempts.max(1),
            retry_base,
        }
    }

    /// The packages among `packages` that are not installed.
    pub async fn missing(&self, packages: &[String]) -> Result<Vec<String>, PackageError> {
        validate_names(packages)?;
        let mut missing = Vec::new();
        for package in packages {
            let (program, args): (&Path, Vec<String>) = match self.manager {
                PackageManager::Apt => (
                    &self.tools.dpkg_query,
                    vec![
                        "-W".into(),
                        "-f=${Status}".into(),
                        "--".into(),
                        package.clone(),
                    ],
                ),
                PackageManager::Dnf => (
                    &self.tools.rpm,
                    vec![
                        "-q".into(),
                        "--whatprovides".into(),
                        "--".into(),
                        package.clone(),
                    ],
                ),
            };
            let finished = exec::run(program, &args, &[("LC_ALL", "C")], None)
                .await
                .map_err(|e| PackageError::Query {
                    command: exec::shown(program, &args),
                    detail: e.to_string(),
                })?;
            let installed = match self.manager {
                PackageManager::Apt => {
                    finished.status.success() && finished.stdout.contains("install ok installed")
                }
                PackageManager::Dnf => finished.status.success(),
            };
            if !installed {
                missing.push(package.clone());
            }
        }
        Ok(missing)
    }

    /// Install every missing package of `packages` in one transaction; nothing runs when none is
    /// missing.
    pub async fn install(&self, packages: &[String]) -> Result<InstallOutcome, PackageError> {
        let missing = self.missing(packages).await?;
        if missing.is_empty() {
            return Ok(InstallOutcome::AlreadyInstalled);
        }
        let (program, args, env) = self.install_command(&missing);
        let mut refreshed = false;
        if self.manager == PackageManager::Apt && self.lists_are_stale() {
            self.refresh_lists().await;
            refreshed = true;
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            tracing::info!(target: "exoagent::packages", attempt, packages = %missing.join(" "), "installing");
            let finished = exec::run(&program, &args, &env, None).await.map_err(|e| {
                PackageError::Install {
                    command: exec::shown(&program, &args),
                    attempts: attempt,
                    status: "not started".into(),
                    stderr: e.to_string(),
                }
            })?;
            if finished.status.success() {
                return Ok(InstallOutcome::Installed {
                    packages: missing,
                    attempts: attempt,
                });
            }
            let output = format!("{}\n{}", finished.stdout, finished.stderr);
            let failure = classify(self.manager, &output);
            let give_up = failure == Failure::Permanent
                || attempt >= self.attempts
                || (failure == Failure::StaleLists && refreshed && attempt >= 2);
            tracing::warn!(target: "exoagent::packages", attempt, ?failure, status = %finished.status, "package transaction failed");
            if give_up {
                let command = exec::shown(&program, &args);
                let stderr = finished.tail(TAIL_LINES);
                return Err(if failure == Failure::Lock {
                    PackageError::LockTimeout {
                        command,
                        attempts: attempt,
                        stderr,
                    }
                } else {
                    PackageError::Install {
                        command,
                        attempts: attempt,
                        status: finished.status.to_string(),
                        stderr,
                    }
                });
            }
            if failure == Failure::StaleLists && self.manager == PackageManager::Apt {
                self.refresh_lists().await;
                refreshed = true;
            }
            tokio::time::sleep(self.retry_base * 2u32.saturating_pow(attempt - 1)).await;
        }
    }

    fn install_command(
        &self,
        packages: &[String],
    ) -> (PathBuf, Vec<String>, Vec<(&'static str, &'static str)>) {
        match self.manager {
            PackageManager::Apt => {
                let mut args: Vec<String> = vec![
                    "-y".into(),
                    "-q".into(),
                    "-o".into(),
                    format!("DPkg::Lock::Timeout={}", self.lock_timeout.as_secs()),
                    "install".into(),
                    "--no-install-recommends".into(),
                    "--".into(),
                ];
                args.extend(packages.iter().cloned());
                (
                    self.tools.apt_get.clone(),
                    args,
                    // needrestart (Ubuntu) would otherwise ask which services to restart.
                    vec![
                        ("DEBIAN_FRONTEND", "noninteractive"),
                        ("NEEDRESTART_MODE", "a"),
                        ("LC_ALL", "C"),
                    ],
                )
            }
            PackageManager::Dnf => {
                let mut args: Vec<String> = vec!["-y".into(), "install".into(), "--".into()];
                args.extend(packages.iter().cloned());
                (self.tools.dnf.clone(), args, vec![("LC_ALL", "C")])
            }
        }
    }

    fn lists_are_stale(&self) -> bool {
        let newest = std::fs::read_dir(&self.tools.apt_lists)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                e.file_name().to_string_lossy().ends_with("Packages")
                    || e.file_name().to_string_lossy().ends_with("Packages.lz4")
            })
            .filter_map(|e| e.metadata().ok()?.modified().ok())
            .max();
        match newest {
            None => true,
            Some(time) => SystemTime::now()
                .duration_since(time)
                .is_ok_and(|age| age > LISTS_MAX_AGE),
        }
    }

    /// `apt-get update`; a failure is logged, not fatal: the install that follows tells.
    async fn refresh_lists(&self) {
        let args = vec![
            "-q".to_owned(),
            "-o".to_owned(),
            format!("DPkg::Lock::Timeout={}", self.lock_timeout.as_secs()),
            "update".to_owned(),
        ];
        let env = [("DEBIAN_FRONTEND", "noninteractive"), ("LC_ALL", "C")];
        match exec::run(&self.tools.apt_get, &args, &env, None).await {
            Ok(done) if done.status.success() => {}
            Ok(done) => {
                tracing::warn!(target: "exoagent::packages", status = %done.status, stderr = %done.tail(3), "apt-get update failed")
            }
            Err(e) => {
                tracing::warn!(target: "exoagent::packages", error = %e, "apt-get update could not run")
            }
        }
    }
}

/// Package names as Debian and RPM allow them; nothing that could be read as an option.
fn validate_names(packages: &[String]) -> Result<(), PackageError> {
    for package in packages {
        let mut bytes = package.bytes();
        let first = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric());
        let rest = bytes.all(|b| b.is_ascii_alphanumeric() || b"+._:-".contains(&b));
        if !first || !rest {
            return Err(PackageError::InvalidName(package.clone()));
        }
    }
    Ok(())
}

/// `[packages]`: package-manager behaviour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageSettings {
    /// How long to wait for another process holding the package lock.
    pub lock_timeout: Duration,
    /// Attempts for a transaction that fails transiently (network, mirror sync).
    pub attempts: u32,
}

impl Default for PackageSettings {
    fn default() -> Self {
        Self {
            lock_timeout: Duration::from_secs(600),
            attempts: 3,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_classified() {
        let apt = PackageManager::Apt;
        assert_eq!(classify(apt, "E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 1 (apt-get)"), Failure::Lock);
        assert_eq!(
            classify(apt, "E: Unable to locate package foo"),
            Failure::StaleLists
        );
        assert_eq!(
            classify(
                apt,
                "W: Failed to fetch http://deb/x  Temporary failure resolving 'deb'"
            ),
            Failure::Transient
        );
        assert_eq!(
            classify(
                apt,
                "E: Sub-process /usr/bin/dpkg returned an error code (1)"
            ),
            Failure::Permanent
        );
        assert_eq!(
            classify(PackageManager::Dnf, "Curl error (6): Couldn't resolve host"),
            Failure::Transient
        );
        assert_eq!(
            classify(PackageManager::Dnf, "Error: Unable to find a match: nope"),
            Failure::Permanent
        );
    }

    #[test]
    fn names_that_could_be_options_are_refused() {
        assert!(validate_names(&["python3.11".into(), "g++".into(), "libc6:amd64".into()]).is_ok());
        for bad in ["-y", "", "a b", "a;b", "$(x)"] {
            assert!(validate_names(&[bad.into()]).is_err(), "{bad}");
        }
    }
}
