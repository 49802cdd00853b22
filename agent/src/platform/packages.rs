//! System packages through apt or dnf: which are missing, and all of them installed in one
//! transaction that waits for the package lock and retries transient failures. An item of the
//! transaction is a package from the repositories, by name, or a package file on disk that its
//! service has verified (apt-get and dnf both install local files in the same transaction and
//! resolve their dependencies from the repositories).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::platform::cloud_init;
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
    /// dpkg's database directory (`/var/lib/dpkg`): which packages are installed is read from
    /// its `status` file directly; `dpkg-query` answers when it cannot be (or when `None`).
    pub dpkg_admin: Option<PathBuf>,
    /// `dnf`.
    pub dnf: PathBuf,
    /// `rpm`.
    pub rpm: PathBuf,
    /// apt's downloaded package lists (their age decides whether to run `apt-get update`).
    pub apt_lists: PathBuf,
    /// cloud-init's status file for this boot. While it exists and cloud-init's config stage
    /// (which writes the apt sources and proxy the cloud asked for) has not finished, the first
    /// transaction waits for it: the agent starts right after cloud-init's network stage.
    /// `None`: never wait.
    pub cloud_init_status: Option<PathBuf>,
}

impl Default for PackageTools {
    fn default() -> Self {
        Self {
            apt_get: "apt-get".into(),
            dpkg_query: "dpkg-query".into(),
            dpkg_admin: Some("/var/lib/dpkg".into()),
            dnf: "dnf".into(),
            rpm: "rpm".into(),
            apt_lists: "/var/lib/apt/lists".into(),
            cloud_init_status: Some(Path::new("/").join(cloud_init::STATUS_FILE)),
        }
    }
}

/// A package file on disk, already verified by the service that offers it (a checksum or a
/// signature), installed in the batch like a named package.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LocalPackage {
    /// The package name the file installs, as the package manager records it
    /// (`rstudio-server`).
    pub name: String,
    /// The version the file installs, as the package manager records it: the same name at
    /// this version installed means the file has nothing to add.
    pub version: String,
    /// The file: an absolute path ending in `.deb` (apt) or `.rpm` (dnf), so the package
    /// manager reads it as a file and never as a package name.
    pub path: PathBuf,
}

/// One item of the batched transaction.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum PackageItem {
    /// A package from the configured repositories.
    Named(String),
    /// A verified package file.
    Local(LocalPackage),
}

impl PackageItem {
    /// The package name: the named package, or the one the file installs.
    pub fn name(&self) -> &str {
        match self {
            Self::Named(name) => name,
            Self::Local(local) => &local.name,
        }
    }

    /// The argument the package manager gets: the name, or the file's absolute path.
    fn argument(&self) -> String {
        match self {
            Self::Named(name) => name.clone(),
            Self::Local(local) => local.path.to_string_lossy().into_owned(),
        }
    }
}

impl fmt::Display for PackageItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Named(name) => f.write_str(name),
            Self::Local(local) => write!(f, "{}", local.path.display()),
        }
    }
}

impl From<&str> for PackageItem {
    fn from(name: &str) -> Self {
        Self::Named(name.to_owned())
    }
}

impl From<String> for PackageItem {
    fn from(name: String) -> Self {
        Self::Named(name)
    }
}

impl From<LocalPackage> for PackageItem {
    fn from(local: LocalPackage) -> Self {
        Self::Local(local)
    }
}

/// What an install did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstallOutcome {
    /// Everything was already installed; nothing ran.
    AlreadyInstalled,
    /// These packages were installed, in one transaction, after this many attempts.
    Installed {
        /// The items that were missing.
        packages: Vec<PackageItem>,
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
    /// A local package file the package manager could read as something else (not absolute,
    /// not a `.deb`/`.rpm`, not UTF-8), or whose version could be mistaken for an option.
    #[error("invalid local package '{path}': {detail}")]
    InvalidFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: &'static str,
    },
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
            Self::InvalidName(_) | Self::InvalidFile { .. } | Self::Install { .. } => {
                "package-install-failed"
            }
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
    /// Names an earlier [`Self::installed_names`] found installed: not asked for again.
    known_installed: std::collections::HashSet<String>,
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
            known_installed: std::collections::HashSet::new(),
        }
    }

    /// Which of `names` are installed, asked now (apt: one `dpkg-query`): run early, beside
    /// other work, and handed to [`Self::knowing_installed`], it takes the query off the path
    /// of a machine that has everything already (a baked image).
    pub async fn installed_names(
        &self,
        names: &[String],
    ) -> Result<std::collections::HashSet<String>, PackageError> {
        let items: Vec<PackageItem> = names.iter().cloned().map(PackageItem::Named).collect();
        let missing: std::collections::HashSet<String> = self
            .missing(&items)
            .await?
            .into_iter()
            .map(|item| item.name().to_owned())
            .collect();
        Ok(names
            .iter()
            .filter(|name| !missing.contains(*name))
            .cloned()
            .collect())
    }

    /// This installer, taking `names` (found installed by [`Self::installed_names`]) as
    /// installed: [`Self::missing`] asks only about the others. A package removed in between
    /// would be missed by this transaction and fail its service's install, as if removed after.
    pub fn knowing_installed(mut self, names: std::collections::HashSet<String>) -> Self {
        self.known_installed = names;
        self
    }

    /// The items among `items` that are not installed. A local file counts as installed when
    /// its package is installed at its version (`dpkg-query`/`rpm -q` on the name), so a file
    /// already installed adds nothing to the transaction.
    pub async fn missing(&self, items: &[PackageItem]) -> Result<Vec<PackageItem>, PackageError> {
        validate(self.manager, items)?;
        // apt: every named package in one `dpkg-query` (a process each is ≈ 0.2 s under
        // emulation, on a baked image's critical path).
        let known = |name: &str| self.known_installed.contains(name);
        let named: Vec<&str> = items
            .iter()
            .filter_map(|item| match item {
                PackageItem::Named(name) if self.manager == PackageManager::Apt && !known(name) => {
                    Some(name.as_str())
                }
                _ => None,
            })
            .collect();
        let installed_named = if named.is_empty() {
            std::collections::HashSet::new()
        } else {
            self.installed_apt_names(&named).await?
        };
        let mut missing = Vec::new();
        for item in items {
            let installed = match item {
                PackageItem::Named(name) if known(name) => true,
                PackageItem::Named(name) if self.manager == PackageManager::Apt => {
                    installed_named.contains(name.as_str())
                }
                PackageItem::Named(name) => self.is_installed(name, None).await?,
                PackageItem::Local(local) => {
                    self.is_installed(item.name(), Some(local.version.as_str()))
                        .await?
                }
            };
            if !installed {
                missing.push(item.clone());
            }
        }
        Ok(missing)
    }

    /// Which of `names` dpkg has installed: from its status file when it can be read alone
    /// ([`dpkg_status_installed`]), else from one `dpkg-query -W`: it prints a line per
    /// package it knows (sorted, not in the order asked) and exits 1 when a name matches none
    /// (that one is missing). Any other failure counts every name as missing, as one
    /// failing query per name did.
    async fn installed_apt_names(
        &self,
        names: &[&str],
    ) -> Result<std::collections::HashSet<String>, PackageError> {
        if let Some(admin) = &self.tools.dpkg_admin {
            let (admin, wanted) = (
                admin.clone(),
                names.iter().map(|n| (*n).to_owned()).collect(),
            );
            let read = tokio::task::spawn_blocking(move || dpkg_status_installed(&admin, &wanted));
            match read.await {
                Ok(Ok(found)) => return Ok(found),
                Ok(Err(why)) => {
                    tracing::debug!(target: "exoagent::packages", "dpkg's status file not read ({why}): asking dpkg-query");
                }
                // Only a panic ends a blocking task early: pass it on.
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }
        let mut args: Vec<String> =
            vec!["-W".into(), "-f=${Package} ${Status}\n".into(), "--".into()];
        args.extend(names.iter().map(|n| (*n).to_owned()));
        let program = &self.tools.dpkg_query;
        let finished = query(program, &args).await?;
        if !(finished.status.success() || finished.status.code() == Some(1)) {
            return Ok(std::collections::HashSet::new());
        }
        Ok(finished
            .stdout
            .lines()
            .filter_map(|line| line.split_once(' '))
            .filter(|(name, status)| {
                status.trim() == "install ok installed" && names.contains(name)
            })
            .map(|(name, _)| name.to_owned())
            .collect())
    }

    /// Whether `package` is installed (at `version`, when given).
    async fn is_installed(
        &self,
        package: &str,
        version: Option<&str>,
    ) -> Result<bool, PackageError> {
        let (program, format): (&Path, &str) = match (self.manager, version) {
            (PackageManager::Apt, None) => (&self.tools.dpkg_query, "-f=${Status}"),
            (PackageManager::Apt, Some(_)) => (&self.tools.dpkg_query, "-f=${Status} ${Version}"),
            (PackageManager::Dnf, None) => (&self.tools.rpm, "--whatprovides"),
            (PackageManager::Dnf, Some(_)) => {
                (&self.tools.rpm, "--queryformat=%{VERSION}-%{RELEASE}")
            }
        };
        let first = match self.manager {
            PackageManager::Apt => "-W",
            PackageManager::Dnf => "-q",
        };
        let args: Vec<String> = vec![first.into(), format.into(), "--".into(), package.into()];
        let finished = query(program, &args).await?;
        if !finished.status.success() {
            return Ok(false);
        }
        let out = finished.stdout.trim();
        Ok(match (self.manager, version) {
            (PackageManager::Apt, None) => out.contains("install ok installed"),
            (PackageManager::Apt, Some(version)) => {
                out.strip_prefix("install ok installed ") == Some(version)
            }
            (PackageManager::Dnf, None) => true,
            (PackageManager::Dnf, Some(version)) => out == version,
        })
    }

    /// Wait (at most [`cloud_init::CONFIG_STAGE_WAIT`]) while cloud-init runs and its config
    /// stage has not finished; nothing to wait for without cloud-init.
    async fn wait_for_cloud_config(&self) {
        if let Some(path) = &self.tools.cloud_init_status {
            cloud_init::wait_for_config_stage(
                path,
                cloud_init::CONFIG_STAGE_WAIT,
                "installing packages (apt sources and proxy)",
            )
            .await;
        }
    }

    /// Install every missing item of `items` (named packages and verified local files) in one
    /// transaction; nothing runs when none is missing.
    pub async fn install(&self, items: &[PackageItem]) -> Result<InstallOutcome, PackageError> {
        let missing = self.missing(items).await?;
        if missing.is_empty() {
            return Ok(InstallOutcome::AlreadyInstalled);
        }
        self.wait_for_cloud_config().await;
        let (program, args, env) = self.install_command(&missing);
        let mut refreshed = false;
        if self.manager == PackageManager::Apt && self.lists_are_stale() {
            self.refresh_lists().await;
            refreshed = true;
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            tracing::info!(target: "exoagent::packages", attempt, packages = %shown(&missing), "installing");
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
        items: &[PackageItem],
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
                args.extend(items.iter().map(PackageItem::argument));
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
                args.extend(items.iter().map(PackageItem::argument));
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

/// The items for a log line.
fn shown(items: &[PackageItem]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Every item fit for `manager`'s command line: package names as Debian and RPM allow them,
/// nothing that could be read as an option; local files absolute, UTF-8 and of the manager's
/// format (apt-get reads an argument as a file only when it names a `.deb` by a path).
fn validate(manager: PackageManager, items: &[PackageItem]) -> Result<(), PackageError> {
    for item in items {
        validate_name(item.name())?;
        let PackageItem::Local(local) = item else {
            continue;
        };
        let invalid = |detail| PackageError::InvalidFile {
            path: local.path.clone(),
            detail,
        };
        let extension = match manager {
            PackageManager::Apt => ".deb",
            PackageManager::Dnf => ".rpm",
        };
        let Some(path) = local.path.to_str() else {
            return Err(invalid("not UTF-8"));
        };
        if !local.path.is_absolute() {
            return Err(invalid("not an absolute path"));
        }
        if !path.ends_with(extension) || path.chars().any(char::is_control) {
            return Err(invalid(match manager {
                PackageManager::Apt => "not a .deb file",
                PackageManager::Dnf => "not an .rpm file",
            }));
        }
        let mut bytes = local.version.bytes();
        let version_ok = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
            && bytes.all(|b| b.is_ascii_alphanumeric() || b"+.~:-_".contains(&b));
        if !version_ok {
            return Err(invalid("its version is not a package version"));
        }
    }
    Ok(())
}

/// A package name as Debian and RPM allow it; nothing that could be read as an option.
fn validate_name(package: &str) -> Result<(), PackageError> {
    let mut bytes = package.bytes();
    let first = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric());
    let rest = bytes.all(|b| b.is_ascii_alphanumeric() || b"+._:-".contains(&b));
    if !first || !rest {
        return Err(PackageError::InvalidName(package.to_owned()));
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

/// Which of `names` dpkg's database in `admin` records as `install ok installed` (what
/// `dpkg-query -W -f='${Package} ${Status}'` shows, read without starting it: on a baked image at
/// boot the query's start alone is ≈ 0.5 s under emulation, on the path to the first service).
/// An `Err` (why) when the file cannot be read, or when `updates/` holds journal entries dpkg
/// has not yet merged into it (an install in progress or interrupted): then only dpkg-query
/// knows.
pub fn dpkg_status_installed(
    admin: &Path,
    names: &std::collections::HashSet<String>,
) -> Result<std::collections::HashSet<String>, String> {
    let updates = admin.join("updates");
    match std::fs::read_dir(&updates) {
        Ok(entries) => {
            let pending = entries.flatten().any(|entry| {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit())
            });
            if pending {
                return Err(format!("'{}' holds pending entries", updates.display()));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("'{}': {e}", updates.display())),
    }
    let path = admin.join("status");
    let text = std::fs::read(&path).map_err(|e| format!("'{}': {e}", path.display()))?;
    let mut found = std::collections::HashSet::new();
    // deb822 paragraphs, one per package (and architecture), separated by blank lines; only the
    // first line of the two fields matters (continuation lines start with a space or a tab).
    for paragraph in text
        .split(|&b| b == b'\n')
        .collect::<Vec<_>>()
        .split(|line| line.is_empty())
    {
        let field = |key: &[u8]| {
            paragraph.iter().find_map(|line| {
                let (name, value) = line.split_at(line.iter().position(|&b| b == b':')?);
                name.eq_ignore_ascii_case(key)
                    .then(|| String::from_utf8_lossy(value[1..].trim_ascii()).into_owned())
            })
        };
        if let Some(package) = field(b"Package") {
            if names.contains(&package)
                && field(b"Status").as_deref() == Some("install ok installed")
            {
                found.insert(package);
            }
        }
    }
    Ok(found)
}

/// Run a package database query (`dpkg-query`, `rpm`) in the C locale.
async fn query(program: &Path, args: &[String]) -> Result<exec::Finished, PackageError> {
    exec::run(program, args, &[("LC_ALL", "C")], None)
        .await
        .map_err(|e| PackageError::Query {
            command: exec::shown(program, args),
            detail: e.to_string(),
        })
}

/// The body of a `dpkg-query -W -f=FORMAT -- NAME…` double answering from `installed` (lines
/// `name version`), as the real one does: a line per package found, sorted (`${Package}`
/// first when the format asks for it), "no packages found matching" and exit 1 for a name it
/// does not know. `installed_names_come_from_the_real_dpkg_query` checks the real one.
#[cfg(test)]
pub(crate) fn dpkg_query_double(installed: &Path) -> String {
    format!(
        r#"fmt="$2"; shift 3; rc=0
for p in $(printf '%s\n' "$@" | sort); do
  line=$(grep "^$p " '{}' 2>/dev/null) || {{ echo "dpkg-query: no packages found matching $p" >&2; rc=1; continue; }}
  case "$fmt" in *Package*) echo "$p install ok installed";; *Version*) echo "install ok installed ${{line#* }}";; *) echo "install ok installed";; esac
done
exit $rc"#,
        installed.display()
    )
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
        let apt = PackageManager::Apt;
        assert!(validate(
            apt,
            &["python3.11".into(), "g++".into(), "libc6:amd64".into()]
        )
        .is_ok());
        for bad in ["-y", "", "a b", "a;b", "$(x)"] {
            assert!(validate(apt, &[bad.into()]).is_err(), "{bad}");
        }
    }

    fn deb(path: &str, version: &str) -> PackageItem {
        PackageItem::Local(LocalPackage {
            name: "rstudio-server".into(),
            version: version.into(),
            path: path.into(),
        })
    }

    #[test]
    fn local_files_the_manager_could_misread_are_refused() {
        let apt = PackageManager::Apt;
        assert!(validate(
            apt,
            &[deb("/opt/x/rstudio-server-1.0-1-amd64.deb", "1.0+1")]
        )
        .is_ok());
        for (path, version, detail) in [
            ("rstudio-server.deb", "1.0", "not an absolute path"),
            ("./rstudio-server.deb", "1.0", "not an absolute path"),
            ("/opt/x/rstudio-server.rpm", "1.0", "not a .deb file"),
            ("/opt/x/rstudio\nserver.deb", "1.0", "not a .deb file"),
            (
                "/opt/x/rstudio-server.deb",
                "-1.0",
                "its version is not a package version",
            ),
            (
                "/opt/x/rstudio-server.deb",
                "1 0",
                "its version is not a package version",
            ),
        ] {
            match validate(apt, &[deb(path, version)]) {
                Err(e @ PackageError::InvalidFile { .. }) => {
                    assert!(e.to_string().ends_with(detail), "{path}: {e}");
                    assert_eq!(e.reason(), "package-install-failed");
                }
                other => panic!("{path} {version}: {other:?}"),
            }
        }
        assert!(validate(PackageManager::Dnf, &[deb("/opt/x/r.deb", "1")]).is_err());
        let bad_name = PackageItem::Local(LocalPackage {
            name: "-rstudio".into(),
            version: "1".into(),
            path: "/opt/x/r.deb".into(),
        });
        assert!(matches!(
            validate(apt, &[bad_name]),
            Err(PackageError::InvalidName(_))
        ));
    }

    /// An apt installer whose `dpkg-query` answers from `DIR/installed` (lines `name version`)
    /// and whose `apt-get` records its argv in `DIR/calls`.
    fn fake_apt(dir: &Path) -> PackageInstaller {
        use std::os::unix::fs::PermissionsExt;
        let script = |name: &str, body: &str| {
            let path = dir.join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            path
        };
        let installed = dir.join("installed");
        std::fs::write(&installed, "").unwrap();
        let dpkg_query = script("dpkg-query", &dpkg_query_double(&installed));
        let apt_get = script(
            "apt-get",
            &format!("echo \"$*\" >> '{}'", dir.join("calls").display()),
        );
        let lists = dir.join("lists");
        std::fs::create_dir_all(&lists).unwrap();
        std::fs::write(lists.join("x_Packages"), "").unwrap();
        PackageInstaller::with_tools(
            PackageManager::Apt,
            &PackageSettings::default(),
            PackageTools {
                apt_get,
                dpkg_query,
                // The double answers, not this machine's database.
                dpkg_admin: None,
                apt_lists: lists,
                cloud_init_status: None,
                ..PackageTools::default()
            },
            Duration::from_millis(10),
        )
    }

    #[tokio::test]
    async fn a_local_file_goes_into_the_one_transaction_unless_its_version_is_installed() {
        let dir = tempfile::tempdir().unwrap();
        let installer = fake_apt(dir.path());
        let file = "/opt/exoagent/rstudio/rstudio-server-2026.07.0-139-amd64.deb";
        let items = ["r-base".into(), deb(file, "2026.07.0+139")];

        // Nothing installed: the names and the file's path, after `--`, in one apt-get call.
        let outcome = installer.install(&items).await.unwrap();
        assert_eq!(
            outcome,
            InstallOutcome::Installed {
                packages: items.to_vec(),
                attempts: 1
            }
        );
        let calls = std::fs::read_to_string(dir.path().join("calls")).unwrap();
        assert_eq!(
            calls,
            format!("-y -q -o DPkg::Lock::Timeout=600 install --no-install-recommends -- r-base {file}\n")
        );

        // The package at another version: the file is still missing.
        std::fs::write(
            dir.path().join("installed"),
            "r-base 4.2\nrstudio-server 2025.01.0+1\n",
        )
        .unwrap();
        assert_eq!(installer.missing(&items).await.unwrap(), [items[1].clone()]);

        // At the file's version: nothing to do, nothing runs.
        std::fs::write(
            dir.path().join("installed"),
            "r-base 4.2\nrstudio-server 2026.07.0+139\n",
        )
        .unwrap();
        std::fs::remove_file(dir.path().join("calls")).unwrap();
        assert_eq!(
            installer.install(&items).await.unwrap(),
            InstallOutcome::AlreadyInstalled
        );
        assert!(!dir.path().join("calls").exists());
    }

    #[tokio::test]
    async fn named_packages_are_asked_for_in_one_query_whatever_the_order() {
        let dir = tempfile::tempdir().unwrap();
        let installer = fake_apt(dir.path());
        std::fs::write(dir.path().join("installed"), "cron 3.0\nzip 3.0\n").unwrap();
        let items: Vec<PackageItem> = ["zip", "python3-venv", "cron", "gnupg"]
            .into_iter()
            .map(Into::into)
            .collect();
        assert_eq!(
            installer.missing(&items).await.unwrap(),
            [items[1].clone(), items[3].clone()]
        );
    }

    #[tokio::test]
    async fn names_found_installed_early_are_not_asked_for_again() {
        let dir = tempfile::tempdir().unwrap();
        let installer = fake_apt(dir.path());
        std::fs::write(dir.path().join("installed"), "python3 3.11\n").unwrap();
        // Every call of the double recorded, to count the queries.
        let calls = dir.path().join("queries");
        let dpkg_query = dir.path().join("dpkg-query");
        let body = std::fs::read_to_string(&dpkg_query).unwrap();
        std::fs::write(
            &dpkg_query,
            body.replacen(
                "#!/bin/sh\n",
                &format!("#!/bin/sh\necho \"$*\" >> '{}'\n", calls.display()),
                1,
            ),
        )
        .unwrap();
        let names = vec!["python3".to_owned(), "python3-venv".to_owned()];
        let found = installer.installed_names(&names).await.unwrap();
        assert_eq!(found, ["python3".to_owned()].into_iter().collect());
        let installer = installer.knowing_installed(found);
        // The format holds a newline: a query is counted by its `-W`.
        let read = || std::fs::read_to_string(&calls).unwrap_or_default();
        let queries = || read().matches("-W ").count();
        assert_eq!(queries(), 1, "{}", read());

        // All known: nothing is asked, nothing installed.
        let outcome = installer.install(&["python3".into()]).await.unwrap();
        assert_eq!(outcome, InstallOutcome::AlreadyInstalled);
        assert_eq!(queries(), 1, "{}", read());
        // One not known: asked again alone, and installed.
        let items: Vec<PackageItem> = names.iter().map(|n| n.as_str().into()).collect();
        assert_eq!(installer.missing(&items).await.unwrap(), [items[1].clone()]);
        assert_eq!(queries(), 2, "{}", read());
        assert!(read().ends_with(" -- python3-venv\n"), "{}", read());
    }

    /// This machine's apt installer, asking the real `dpkg-query` (not reading dpkg's status
    /// file).
    fn asking_dpkg_query() -> PackageInstaller {
        let tools = PackageTools {
            dpkg_admin: None,
            ..PackageTools::default()
        };
        PackageInstaller::with_tools(
            PackageManager::Apt,
            &PackageSettings::default(),
            tools,
            Duration::from_millis(10),
        )
    }

    /// dpkg's status file read directly says what `dpkg-query` says, for every package this
    /// machine's database knows (installed, removed with its configuration left, …) and for
    /// names it does not know.
    #[tokio::test]
    async fn the_status_file_read_directly_agrees_with_the_real_dpkg_query() {
        assert!(
            exec::find_on_path("dpkg-query").is_some(),
            "FAIL, not run: no dpkg-query on this machine"
        );
        let every = query(
            Path::new("dpkg-query"),
            &["-W".into(), "-f=${Package}\n".into()],
        )
        .await
        .unwrap();
        let mut names: Vec<&str> = every.stdout.lines().collect();
        assert!(names.len() > 100, "{} packages", names.len());
        names.extend(["exoagent-no-such-package", "bash:amd64"]);
        let direct = PackageInstaller::new(PackageManager::Apt, &PackageSettings::default());
        let asked = asking_dpkg_query();
        let from_file = direct.installed_apt_names(&names).await.unwrap();
        let from_query = asked.installed_apt_names(&names).await.unwrap();
        assert!(from_file.contains("dpkg") && !from_file.contains("exoagent-no-such-package"));
        assert_eq!(from_file, from_query);
    }

    #[test]
    fn the_status_file_gives_way_to_dpkg_query_while_updates_are_pending() {
        let dir = tempfile::tempdir().unwrap();
        let admin = dir.path();
        let names: std::collections::HashSet<String> = ["zip", "gone", "libc6", "held", "vim"]
            .map(str::to_owned)
            .into_iter()
            .collect();
        assert!(
            dpkg_status_installed(admin, &names).is_err(),
            "no status file"
        );
        std::fs::write(
            admin.join("status"),
            "Package: zip\nStatus: install ok installed\nDescription: Archiver\n \
             Status: continuation lines are not fields\n\n\
             Package: gone\nStatus: deinstall ok config-files\n\n\
             Package: libc6\nStatus: install ok installed\nArchitecture: amd64\n\n\
             Package: libc6\nStatus: install ok installed\nArchitecture: i386\n\n\
             Package: held\nStatus: hold ok half-configured\n\n\
             Package: vim\nDescription: editor\n Package: zip\n",
        )
        .unwrap();
        let found = dpkg_status_installed(admin, &names).unwrap();
        let expected: std::collections::HashSet<String> =
            ["zip", "libc6"].map(str::to_owned).into_iter().collect();
        assert_eq!(found, expected);
        // dpkg's journal of a transaction not yet merged into `status`: only dpkg-query knows.
        std::fs::create_dir(admin.join("updates")).unwrap();
        std::fs::write(admin.join("updates/tmp.i"), "").unwrap();
        assert_eq!(dpkg_status_installed(admin, &names).unwrap(), expected);
        std::fs::write(admin.join("updates/0001"), "Package: vim\n").unwrap();
        let why = dpkg_status_installed(admin, &names).unwrap_err();
        assert!(why.contains("pending"), "{why}");
    }

    /// The one-query path against the real `dpkg-query` (this is a Debian machine): packages
    /// that are surely installed are found, an unknown name is missing, the order asked does
    /// not matter. The double above is written from this output.
    #[tokio::test]
    async fn installed_names_come_from_the_real_dpkg_query() {
        assert!(
            exec::find_on_path("dpkg-query").is_some(),
            "FAIL, not run: no dpkg-query on this machine"
        );
        let installer = asking_dpkg_query();
        let found = installer
            .installed_apt_names(&["dpkg", "exoagent-no-such-package", "bash"])
            .await
            .unwrap();
        assert_eq!(
            found,
            ["bash", "dpkg"].map(str::to_owned).into_iter().collect()
        );
    }
}
