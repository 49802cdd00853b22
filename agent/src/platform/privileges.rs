//! Dropping root to another user in a child between fork and exec: the target's supplementary
//! groups, gid and uid are looked up before forking, then applied in the one order that works
//! (groups and gid need root, so the uid goes last).

use std::ffi::CString;
use std::io;

use nix::errno::Errno;
use nix::unistd::Gid;

/// Why the target user's groups could not be looked up.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// A user name cannot be passed to the C library.
    #[error("the user name '{name}' contains NUL")]
    NulInName {
        /// The name as given.
        name: String,
    },
    /// `getgrouplist(3)` failed.
    #[error("failed to list the groups of '{name}': {source}")]
    Groups {
        /// The user.
        name: String,
        /// The errno.
        source: Errno,
    },
}

/// Supplementary groups, gid and uid to switch to, computed before forking (the lookups are not
/// async-signal-safe, [`DropTo::apply`] is).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropTo {
    groups: Vec<libc::gid_t>,
    gid: libc::gid_t,
    uid: libc::uid_t,
}

/// One credential change, in the order [`DropTo::apply`] makes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step<'a> {
    Groups(&'a [libc::gid_t]),
    Gid(libc::gid_t),
    Uid(libc::uid_t),
}

impl DropTo {
    /// `uid`/`gid` with the supplementary groups `name` has in the group database.
    pub fn with_groups_of(
        name: &str,
        uid: libc::uid_t,
        gid: libc::gid_t,
    ) -> Result<Self, PrivilegeError> {
        let c_name = CString::new(name).map_err(|_| PrivilegeError::NulInName {
            name: name.to_owned(),
        })?;
        let groups = nix::unistd::getgrouplist(&c_name, Gid::from_raw(gid)).map_err(|source| {
            PrivilegeError::Groups {
                name: name.to_owned(),
                source,
            }
        })?;
        Ok(Self {
            groups: groups.into_iter().map(Gid::as_raw).collect(),
            gid,
            uid,
        })
    }

    /// `uid`/`gid` with no supplementary group but `gid` (a uid without a user name).
    pub fn without_supplementary_groups(uid: libc::uid_t, gid: libc::gid_t) -> Self {
        Self {
            groups: vec![gid],
            gid,
            uid,
        }
    }

    /// Also in `joining` (groups the user is being added to, which the group database may not
    /// list yet); each group once.
    pub fn joining(mut self, joining: &[libc::gid_t]) -> Self {
        for gid in joining {
            if !self.groups.contains(gid) {
                self.groups.push(*gid);
            }
        }
        self
    }

    /// The credential changes in order: the uid last, since setting it gives up the right to
    /// change the other two.
    fn steps(&self) -> [Step<'_>; 3] {
        [
            Step::Groups(&self.groups),
            Step::Gid(self.gid),
            Step::Uid(self.uid),
        ]
    }

    /// Switch this process (meant for a `pre_exec` closure: only async-signal-safe calls, no
    /// allocation). Needs root unless nothing changes but the groups are already ours (even then
    /// `setgroups` needs `CAP_SETGID`).
    pub fn apply(&self) -> io::Result<()> {
        for step in self.steps() {
            // SAFETY: plain system calls on data owned by `self`; the slice's length is passed
            // with its pointer.
            let result = unsafe {
                match step {
                    Step::Groups(groups) => libc::setgroups(groups.len() as _, groups.as_ptr()),
                    Step::Gid(gid) => libc::setgid(gid),
                    Step::Uid(uid) => libc::setuid(uid),
                }
            };
            if result != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    #[test]
    fn joining_groups_are_added_once() {
        let drop = DropTo::without_supplementary_groups(1000, 1000).joining(&[27, 1000, 27, 44]);
        assert_eq!(drop.groups, [1000, 27, 44]);
        assert_eq!((drop.gid, drop.uid), (1000, 1000));
    }

    #[test]
    fn groups_then_gid_then_uid() {
        let drop = DropTo {
            groups: vec![10, 20],
            gid: 20,
            uid: 1000,
        };
        assert_eq!(
            drop.steps(),
            [Step::Groups(&[10, 20]), Step::Gid(20), Step::Uid(1000)]
        );
    }

    #[test]
    fn without_supplementary_groups_keeps_only_the_gid() {
        let drop = DropTo::without_supplementary_groups(7, 8);
        assert_eq!(drop.groups, vec![8]);
    }

    #[test]
    fn a_nul_in_the_name_is_an_error() {
        let err = DropTo::with_groups_of("a\0b", 1, 1).unwrap_err();
        assert!(matches!(err, PrivilegeError::NulInName { .. }), "{err}");
    }

    /// `id -u`, `id -g` and `id -G` of a child that applied `drop` before exec.
    fn ids_after(drop: &DropTo) -> io::Result<String> {
        let drop = drop.clone();
        let mut command = Command::new("sh");
        command.args(["-c", "id -u; id -g; id -G"]);
        // SAFETY: `apply` only makes async-signal-safe calls on memory prepared before fork.
        unsafe {
            command.pre_exec(move || drop.apply());
        }
        let out = command.output()?;
        assert!(out.status.success(), "{out:?}");
        Ok(String::from_utf8(out.stdout).unwrap())
    }

    #[test]
    fn dropping_to_ourselves_changes_nothing_and_to_another_user_needs_root() {
        let uid = nix::unistd::geteuid().as_raw();
        let gid = nix::unistd::getegid().as_raw();
        let own_groups: Vec<libc::gid_t> = nix::unistd::getgroups()
            .unwrap()
            .into_iter()
            .map(Gid::as_raw)
            .collect();
        let ourselves = DropTo {
            groups: own_groups,
            gid,
            uid,
        };
        let nobody = DropTo::without_supplementary_groups(65534, 65534);
        if uid == 0 {
            let same = ids_after(&ourselves).unwrap();
            assert!(same.starts_with(&format!("{uid}\n{gid}\n")), "{same}");
            // Only the order groups → gid → uid can end here: after setuid, setgid fails.
            assert_eq!(ids_after(&nobody).unwrap(), "65534\n65534\n65534\n");
        } else {
            // Without CAP_SETGID even our own groups cannot be set; the child never execs.
            let err = ids_after(&ourselves).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
            let err = ids_after(&nobody).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
        }
    }
}
