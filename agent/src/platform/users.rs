//! The instance user: created with bash, the distro's admin groups and passwordless sudo unless it
//! exists; its password set through `chpasswd` on stdin, never in argv.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::platform::exec::{self, Priority};
use crate::platform::os::Family;
use crate::platform::passphrase::Passphrase;

/// Lines of a failing tool's stderr kept in an error.
const TAIL_LINES: usize = 5;

/// The account services run as (the instance user, or the invoking user in sandbox mode): the
/// one account type every layer uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Login name.
    pub name: String,
    /// Numeric user id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory (the services' working directory).
    pub home: PathBuf,
}

/// A user database entry (`/etc/passwd`): an account plus its login shell, which only a login
/// session (the desktop) needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserEntry {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory.
    pub home: PathBuf,
    /// Login shell.
    pub shell: PathBuf,
}

impl UserEntry {
    /// The account part, for running services.
    pub fn account(&self) -> Account {
        Account {
            name: self.name.clone(),
            uid: self.uid,
            gid: self.gid,
            home: self.home.clone(),
        }
    }

    /// `account` with its login `shell`.
    pub fn from_account(account: Account, shell: PathBuf) -> Self {
        Self {
            name: account.name,
            uid: account.uid,
            gid: account.gid,
            home: account.home,
            shell,
        }
    }
}

impl From<nix::unistd::User> for UserEntry {
    fn from(user: nix::unistd::User) -> Self {
        Self {
            name: user.name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            home: user.dir,
            shell: user.shell,
        }
    }
}

impl From<UserEntry> for Account {
    fn from(entry: UserEntry) -> Self {
        Self {
            name: entry.name,
            uid: entry.uid,
            gid: entry.gid,
            home: entry.home,
        }
    }
}

/// The tools used, by path (names looked up on `PATH` in production).
#[derive(Debug, Clone)]
pub struct UserTools {
    /// `useradd`.
    pub useradd: PathBuf,
    /// `usermod`.
    pub usermod: PathBuf,
    /// `chpasswd`.
    pub chpasswd: PathBuf,
    /// `visudo`, used to check the sudoers drop-in before it is installed.
    pub visudo: PathBuf,
}

impl Default for UserTools {
    fn default() -> Self {
        Self {
            useradd: "useradd".into(),
            usermod: "usermod".into(),
            chpasswd: "chpasswd".into(),
            visudo: "visudo".into(),
        }
    }
}

/// Why the user could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// The name is not a portable login name.
    #[error("invalid user name '{0}': use lower-case letters, digits, '_' and '-', starting with a letter or '_', at most 32 characters")]
    InvalidName(String),
    /// A tool failed.
    #[error("'{command}' failed ({status}): {stderr}")]
    Command {
        /// The command (argv joined; never carries a secret).
        command: String,
        /// Its exit status.
        status: String,
        /// The tail of its stderr.
        stderr: String,
    },
    /// A file could not be read or written.
    #[error("failed to {action} '{path}': {source}")]
    Io {
        /// What was attempted.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `/etc/passwd` (or `/etc/group`) has a line that cannot be parsed for this name.
    #[error("malformed entry for '{name}' in '{path}'")]
    Malformed {
        /// The user.
        name: String,
        /// The file.
        path: PathBuf,
    },
    /// The user was created but cannot be found afterwards.
    #[error("user '{0}' is missing after useradd")]
    Vanished(String),
    /// No subordinate ids can be chosen (login.defs' pool is invalid or full).
    #[error("subordinate ids for '{name}' in '{path}': {problem}")]
    SubIds {
        /// The user.
        name: String,
        /// The subordinate id file.
        path: PathBuf,
        /// What is wrong.
        problem: crate::platform::subids::RangeError,
    },
}

impl UserError {
    /// Short stable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidName(_) => "user-invalid-name",
            Self::Io { source, .. } if crate::fsutil::is_disk_full(source) => "disk-full",
            Self::Command { command, .. } if command.contains("chpasswd") => "password-set-failed",
            Self::SubIds { .. } => "subids-failed",
            Self::Command { .. } | Self::Io { .. } | Self::Malformed { .. } | Self::Vanished(_) => {
                "user-setup-failed"
            }
        }
    }
}

/// What [`UserManager::join_group`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupJoin {
    /// The user was added.
    Joined,
    /// The user already was a member.
    AlreadyMember,
    /// The group does not exist; nothing changed.
    NoSuchGroup,
}

/// Whether `name` is listed in `group` in the `etc/group` text `groups`; `None` when there is
/// no such group.
fn membership(groups: &str, name: &str, group: &str) -> Option<bool> {
    groups.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&group)).then(|| {
            fields
                .get(3)
                .is_some_and(|members| members.split(',').any(|m| m == name))
        })
    })
}

/// Manages accounts under a root directory (`/` on an instance; a prepared tree in tests).
#[derive(Debug, Clone)]
pub struct UserManager {
    root: PathBuf,
    tools: UserTools,
}

impl UserManager {
    /// Accounts under `root`, with the tools found on `PATH`.
    pub fn new(root: &Path) -> Self {
        Self::with_tools(root, UserTools::default())
    }

    /// Accounts under `root`, with the given tools.
    pub fn with_tools(root: &Path, tools: UserTools) -> Self {
        Self {
            root: root.to_path_buf(),
            tools,
        }
    }

    fn is_host_root(&self) -> bool {
        self.root == Path::new("/")
    }

    /// `--root <root>` for the shadow tools when not operating on `/`.
    fn root_args(&self) -> Vec<String> {
        if self.is_host_root() {
            Vec::new()
        } else {
            vec!["--root".into(), self.root.display().to_string()]
        }
    }

    /// The account `name`, if it exists.
    pub fn lookup(&self, name: &str) -> Result<Option<UserEntry>, UserError> {
        let path = self.root.join("etc/passwd");
        let text = std::fs::read_to_string(&path).map_err(|source| UserError::Io {
            action: "read",
            path: path.clone(),
            source,
        })?;
        for line in text.lines() {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.first() != Some(&name) {
                continue;
            }
            let malformed = || UserError::Malformed {
                name: name.to_owned(),
                path: path.clone(),
            };
            if fields.len() < 7 {
                return Err(malformed());
            }
            return Ok(Some(UserEntry {
                name: name.to_owned(),
                uid: fields[2].parse().map_err(|_| malformed())?,
                gid: fields[3].parse().map_err(|_| malformed())?,
                home: PathBuf::from(fields[5]),
                shell: PathBuf::from(fields[6]),
            }));
        }
        Ok(None)
    }

    /// Add `name` to the existing group `group` (`usermod --append`), unless it is a member.
    pub async fn join_group(&self, name: &str, group: &str) -> Result<GroupJoin, UserError> {
        validate_name(name)?;
        let Some(member) = membership(&self.group_file()?, name, group) else {
            return Ok(GroupJoin::NoSuchGroup);
        };
        if member {
            return Ok(GroupJoin::AlreadyMember);
        }
        let mut args = self.root_args();
        args.extend([
            "--append".to_owned(),
            "--groups".to_owned(),
            group.to_owned(),
            name.to_owned(),
        ]);
        // Beside the services' start, which does not wait for it.
        self.tool(Priority::Background, &self.tools.usermod, &args, None)
            .await?;
        Ok(GroupJoin::Joined)
    }

    /// The id of `group` when it exists and `name` is not listed in it yet: the group
    /// [`UserManager::join_group`] would add `name` to.
    pub fn group_to_join(&self, name: &str, group: &str) -> Result<Option<u32>, UserError> {
        let groups = self.group_file()?;
        if membership(&groups, name, group) != Some(false) {
            return Ok(None);
        }
        self.group_id_in(&groups, group)
    }

    /// The id of the group `name`, if it exists.
    pub fn group_id(&self, name: &str) -> Result<Option<u32>, UserError> {
        self.group_id_in(&self.group_file()?, name)
    }

    /// The id of the group `name` in `groups` (the text of `<root>/etc/group`).
    fn group_id_in(&self, groups: &str, name: &str) -> Result<Option<u32>, UserError> {
        let path = self.root.join("etc/group");
        for line in groups.lines() {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.first() != Some(&name) {
                continue;
            }
            return fields
                .get(2)
                .and_then(|gid| gid.parse().ok())
                .map(Some)
                .ok_or(UserError::Malformed {
                    name: name.to_owned(),
                    path,
                });
        }
        Ok(None)
    }

    /// `<root>/etc/group`.
    fn group_file(&self) -> Result<String, UserError> {
        let path = self.root.join("etc/group");
        std::fs::read_to_string(&path).map_err(|source| UserError::Io {
            action: "read",
            path,
            source,
        })
    }

    /// Groups from `etc/group` that exist, and whether `name` is already in each.
    fn admin_groups(&self, name: &str, family: Family) -> Result<Vec<(String, bool)>, UserError> {
        let groups = self.group_file()?;
        Ok(family
            .admin_groups()
            .iter()
            .filter_map(|wanted| {
                membership(&groups, name, wanted).map(|member| ((*wanted).to_owned(), member))
            })
            .collect())
    }

    async fn tool(
        &self,
        priority: Priority,
        program: &Path,
        args: &[String],
        stdin: Option<&[u8]>,
    ) -> Result<(), UserError> {
        let finished = exec::run_at(priority, program, args, &[], stdin)
            .await
            .map_err(|e| UserError::Command {
                command: exec::shown(program, args),
                status: "not started".into(),
                stderr: e.to_string(),
            })?;
        if finished.status.success() {
            Ok(())
        } else {
            Err(UserError::Command {
                command: exec::shown(program, args),
                status: finished.status.to_string(),
                stderr: finished.tail(TAIL_LINES),
            })
        }
    }

    /// Create `name` unless it exists (home, bash), make sure it is in the family's admin groups
    /// and has a passwordless-sudo drop-in. A second call changes nothing.
    pub async fn ensure_user(&self, name: &str, family: Family) -> Result<UserEntry, UserError> {
        // The sudoers entry names the user but needs no account (sudo looks names up when it
        // runs): its `visudo` check runs beside `useradd`, each a process start that costs a
        // noticeable part of a second on a small instance at boot.
        let (account, sudoers) = tokio::join!(self.ensure_account_entry(name, family), async {
            self.ensure_sudo(name).await
        });
        let entry = account?;
        sudoers?;
        Ok(entry)
    }

    /// [`Self::ensure_user`]'s account alone (created unless it exists, in the family's admin
    /// groups), without the sudoers drop-in ([`Self::ensure_sudo`]): what services need to run
    /// as the user; the drop-in is only for the user's own logins.
    pub async fn ensure_account_entry(
        &self,
        name: &str,
        family: Family,
    ) -> Result<UserEntry, UserError> {
        validate_name(name)?;
        self.ensure_account(name, family).await?;
        self.lookup(name)?
            .ok_or_else(|| UserError::Vanished(name.to_owned()))
    }

    /// [`Self::ensure_user`]'s passwordless-sudo drop-in alone (sudo looks the name up when it
    /// runs, so the account need not exist yet).
    pub async fn ensure_sudo(&self, name: &str) -> Result<(), UserError> {
        validate_name(name)?;
        self.ensure_sudoers(name).await
    }

    /// The account with its administrators' groups: a new one in one `useradd` (its groups
    /// given with `--groups`), an existing one only `usermod --append`ed to the groups it lacks.
    async fn ensure_account(&self, name: &str, family: Family) -> Result<(), UserError> {
        let exists = self.lookup(name)?.is_some();
        let missing: Vec<String> = self
            .admin_groups(name, family)?
            .into_iter()
            .filter(|(_, member)| !member)
            .map(|(group, _)| group)
            .collect();
        let mut args = self.root_args();
        if exists {
            if missing.is_empty() {
                return Ok(());
            }
            args.extend([
                "--append".to_owned(),
                "--groups".to_owned(),
                missing.join(","),
            ]);
            args.push(name.to_owned());
            return self
                .tool(Priority::Normal, &self.tools.usermod, &args, None)
                .await;
        }
        args.extend(["--create-home", "--shell", "/bin/bash", "--user-group"].map(String::from));
        if !missing.is_empty() {
            args.extend(["--groups".to_owned(), missing.join(",")]);
        }
        args.push(name.to_owned());
        // Subordinate ids (rootless containers) come after, from ensure_subordinate_ids: in
        // useradd they are a third of its synchronous writes (subuid and subgid, each a lock,
        // a backup and the file), at the moment a service waits for the account.
        let mut without_subids = args.clone();
        let at = without_subids.len() - 1;
        without_subids.splice(
            at..at,
            ["-K", "SUB_UID_COUNT=0", "-K", "SUB_GID_COUNT=0"].map(String::from),
        );
        match self
            .tool(Priority::Normal, &self.tools.useradd, &without_subids, None)
            .await
        {
            // An older shadow (4.8.1, Debian 11's, in the VM scenario) looks for a range of 0
            // ids instead of none and fails before writing anything, with E_SUB_UID_UPDATE
            // (16) or E_SUB_GID_UPDATE (18): there useradd gives them itself.
            Err(UserError::Command { status, stderr, .. })
                if stderr.contains("subordinate")
                    && (status.ends_with(" 16") || status.ends_with(" 18"))
                    && self.lookup(name)?.is_none() =>
            {
                tracing::info!(target: "exoagent::agent", "this useradd cannot leave the subordinate ids out; it gives them itself");
                self.tool(Priority::Normal, &self.tools.useradd, &args, None)
                    .await
            }
            done => done,
        }
    }

    /// Give `name` the subordinate user and group ids `useradd` would have given it (the same
    /// rule: login.defs' pools, the first free range; only for an account in `UID_MIN..UID_MAX`,
    /// only where `/etc/subuid` and `/etc/subgid` exist), through `usermod`, unless it has them.
    /// Returns whether anything was added. [`Self::ensure_user`] creates accounts without them.
    pub async fn ensure_subordinate_ids(&self, name: &str) -> Result<bool, UserError> {
        use crate::platform::subids::{free_range, has_range, parse_ranges, SubIdDefs};
        validate_name(name)?;
        let Some(user) = self.lookup(name)? else {
            return Err(UserError::Vanished(name.to_owned()));
        };
        let defs = SubIdDefs::read(&self.root).map_err(|source| UserError::Io {
            action: "read",
            path: self.root.join("etc/login.defs"),
            source,
        })?;
        if !defs.covers(user.uid) {
            return Ok(false);
        }
        let mut additions = Vec::new();
        for (file, pool, flag) in [
            ("etc/subuid", defs.uids, "--add-subuids"),
            ("etc/subgid", defs.gids, "--add-subgids"),
        ] {
            let path = self.root.join(file);
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(UserError::Io {
                        action: "read",
                        path,
                        source,
                    })
                }
            };
            let ranges = parse_ranges(&text);
            if has_range(&ranges, name, user.uid) {
                continue;
            }
            match free_range(pool, &ranges) {
                Ok(Some((first, last))) => {
                    additions.extend([flag.to_owned(), format!("{first}-{last}")])
                }
                Ok(None) => {}
                Err(problem) => {
                    return Err(UserError::SubIds {
                        name: name.to_owned(),
                        path,
                        problem,
                    })
                }
            }
        }
        if additions.is_empty() {
            return Ok(false);
        }
        let mut args = self.root_args();
        args.extend(additions);
        args.push(name.to_owned());
        self.tool(Priority::Background, &self.tools.usermod, &args, None)
            .await
            .map(|()| true)
    }

    /// `<root>/etc/sudoers.d/90-exoagent-<name>`, 0440, checked with `visudo -cf` before it is
    /// renamed into place (sudo ignores names with a dot, so the temporary file is inert).
    async fn ensure_sudoers(&self, name: &str) -> Result<(), UserError> {
        let dir = self.root.join("etc/sudoers.d");
        let path = dir.join(format!("90-exoagent-{name}"));
        let contents = format!("# Written by exoagent: the instance user administers the instance.\n{name} ALL=(ALL) NOPASSWD:ALL\n");
        if std::fs::read_to_string(&path).ok().as_deref() == Some(contents.as_str()) {
            return Ok(());
        }
        let io = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| UserError::Io {
                action,
                path,
                source,
            }
        };
        std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        let temporary = dir.join(format!(".90-exoagent-{name}.tmp"));
        let staged = std::fs::write(&temporary, &contents)
            .map_err(io("write", &temporary))
            .and_then(|()| {
                std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o440))
                    .map_err(io("restrict", &temporary))
            });
        if let Err(e) = staged {
            // sudo reads every file in sudoers.d: never leave a partial one behind.
            let _ = std::fs::remove_file(&temporary);
            return Err(e);
        }
        let check = vec![
            "-c".to_owned(),
            "-f".to_owned(),
            temporary.display().to_string(),
        ];
        if let Err(e) = self
            .tool(Priority::Normal, &self.tools.visudo, &check, None)
            .await
        {
            let _ = std::fs::remove_file(&temporary);
            return Err(e);
        }
        std::fs::rename(&temporary, &path)
            .map_err(io("install", &path))
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&temporary);
            })
    }

    /// Set `name`'s password: `chpasswd` reads `name:passphrase` on stdin.
    pub async fn set_password(&self, name: &str, passphrase: &Passphrase) -> Result<(), UserError> {
        validate_name(name)?;
        let mut line = format!("{name}:{}\n", passphrase.expose()).into_bytes();
        let result = self
            .tool(
                Priority::Normal,
                &self.tools.chpasswd,
                &self.root_args(),
                Some(&line),
            )
            .await;
        line.fill(0);
        result
    }
}

/// A portable login name (what useradd accepts everywhere by default).
fn validate_name(name: &str) -> Result<(), UserError> {
    let mut bytes = name.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_');
    let rest_ok =
        bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if first_ok && rest_ok && name.len() <= 32 {
        Ok(())
    } else {
        Err(UserError::InvalidName(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_an_account_plus_its_shell() {
        let account = Account {
            name: "ada".into(),
            uid: 1001,
            gid: 1002,
            home: PathBuf::from("/home/ada"),
        };
        let entry = UserEntry::from_account(account.clone(), PathBuf::from("/bin/bash"));
        assert_eq!(entry.shell, Path::new("/bin/bash"));
        assert_eq!(entry.account(), account);
        assert_eq!(Account::from(entry), account);
    }

    #[test]
    fn names_are_validated() {
        for good in ["exouser", "_svc", "a-b_1"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", "Exouser", "1abc", "a b", "a:b", "-x", &"x".repeat(33)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
