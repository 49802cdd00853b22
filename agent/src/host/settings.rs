//! `[host]`: which of Exosphere's instance-wide touches (its `console-setup`, `cloud-init-tweaks`
//! and `base-setup` roles) exoagent makes, all off unless configured and on in Exosphere's
//! template, with cloud-init's deferred files on releases whose cloud-init cannot defer; and
//! exoagent's own: the login banner and the instance user's home given back, on unless turned
//! off.

use crate::schema::{set, value, Key, Located};

/// `[host]`, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostSettings {
    /// The instance user logs in on tty1 without a password (the web console opens a shell).
    pub console_autologin: bool,
    /// cloud-init's logs, which can hold user data, readable by root and group only (0640).
    pub private_cloud_init_logs: bool,
    /// The instance user also joins the distribution's default user's group (`debian`, …).
    pub default_user_group: bool,
    /// The small set of packages Exosphere's playbook puts on every instance.
    pub base_packages: bool,
    /// The setup state at login (`exoagent motd` from the distribution's login hook).
    pub login_banner: bool,
    /// The instance user's home directory given to the user when root owns it (cloud-init
    /// before 21.3 leaves it so when user data writes a file there).
    pub home_ownership: bool,
    /// cloud-init's `write_files` entries marked `defer: true` written by exoagent when the
    /// installed cloud-init predates `defer` (Exosphere's credential files on Debian 11).
    pub deferred_write_files: bool,
}

impl Default for HostSettings {
    /// Exosphere's touches off; the banner on: it only adds a few lines at login, and it is
    /// where a researcher who logs in during setup learns what is going on.
    fn default() -> Self {
        Self {
            console_autologin: false,
            private_cloud_init_logs: false,
            default_user_group: false,
            base_packages: false,
            login_banner: true,
            home_ownership: true,
            deferred_write_files: false,
        }
    }
}

impl HostSettings {
    /// Whether `touch` is asked for.
    pub fn asks(&self, touch: super::Touch) -> bool {
        use super::Touch;
        match touch {
            Touch::ConsoleAutologin => self.console_autologin,
            Touch::PrivateCloudInitLogs => self.private_cloud_init_logs,
            Touch::DefaultUserGroup => self.default_user_group,
            Touch::LoginBanner => self.login_banner,
            Touch::HomeOwnership => self.home_ownership,
            Touch::DeferredWriteFiles => self.deferred_write_files,
        }
    }
}

/// What the files say about `[host]`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Section {
    console_autologin: Option<Located<bool>>,
    private_cloud_init_logs: Option<Located<bool>>,
    default_user_group: Option<Located<bool>>,
    base_packages: Option<Located<bool>>,
    login_banner: Option<Located<bool>>,
    home_ownership: Option<Located<bool>>,
    deferred_write_files: Option<Located<bool>>,
}

/// The keys of `[host]`.
pub const KEYS: &[Key<Section>] = &[
    Key {
        name: "console_autologin",
        example: "true",
        read: |w, f, s| set(&mut s.console_autologin, w.boolean(f)),
    },
    Key {
        name: "private_cloud_init_logs",
        example: "true",
        read: |w, f, s| set(&mut s.private_cloud_init_logs, w.boolean(f)),
    },
    Key {
        name: "default_user_group",
        example: "true",
        read: |w, f, s| set(&mut s.default_user_group, w.boolean(f)),
    },
    Key {
        name: "base_packages",
        example: "true",
        read: |w, f, s| set(&mut s.base_packages, w.boolean(f)),
    },
    Key {
        name: "login_banner",
        example: "false",
        read: |w, f, s| set(&mut s.login_banner, w.boolean(f)),
    },
    Key {
        name: "home_ownership",
        example: "false",
        read: |w, f, s| set(&mut s.home_ownership, w.boolean(f)),
    },
    Key {
        name: "deferred_write_files",
        example: "true",
        read: |w, f, s| set(&mut s.deferred_write_files, w.boolean(f)),
    },
];

impl Section {
    /// The settings; every key is a plain switch, so nothing here can be wrong once read.
    pub fn settings(&self) -> HostSettings {
        let d = HostSettings::default();
        HostSettings {
            console_autologin: value(&self.console_autologin).unwrap_or(d.console_autologin),
            private_cloud_init_logs: value(&self.private_cloud_init_logs)
                .unwrap_or(d.private_cloud_init_logs),
            default_user_group: value(&self.default_user_group).unwrap_or(d.default_user_group),
            base_packages: value(&self.base_packages).unwrap_or(d.base_packages),
            login_banner: value(&self.login_banner).unwrap_or(d.login_banner),
            home_ownership: value(&self.home_ownership).unwrap_or(d.home_ownership),
            deferred_write_files: value(&self.deferred_write_files)
                .unwrap_or(d.deferred_write_files),
        }
    }
}
