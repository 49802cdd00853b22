//! TEMPORARY STUB (not committed).
#![allow(missing_docs, dead_code, unused_variables)]
pub mod os {
    use std::path::Path;
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Family {
        Debian,
        RedHat,
    }
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum PackageManager {
        Apt,
        Dnf,
    }
    impl Family {
        pub fn package_manager(self) -> PackageManager {
            PackageManager::Apt
        }
    }
    #[derive(Debug, Clone)]
    pub struct Os {
        pub pretty_name: String,
        pub family: Family,
    }
    #[derive(Debug, thiserror::Error)]
    #[error("x")]
    pub struct OsError;
    impl OsError {
        pub fn reason(&self) -> &'static str {
            "x"
        }
    }
    pub fn detect(root: &Path) -> Result<Os, OsError> {
        todo!()
    }
    pub fn detect_lenient(root: &Path) -> Result<Os, OsError> {
        todo!()
    }
}
pub mod passphrase {
    use std::path::Path;
    pub struct Passphrase(String);
    impl std::fmt::Debug for Passphrase {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("P")
        }
    }
    impl Passphrase {
        pub fn expose(&self) -> &str {
            &self.0
        }
    }
    #[derive(Debug, thiserror::Error)]
    #[error("x")]
    pub struct SecretError;
    impl SecretError {
        pub fn reason(&self) -> &'static str {
            "x"
        }
    }
    pub fn load_or_create(p: &Path) -> Result<Passphrase, SecretError> {
        todo!()
    }
    pub fn argon2_hash(p: &Passphrase) -> Result<String, SecretError> {
        todo!()
    }
}
pub mod packages {
    use super::os::PackageManager;
    use crate::config::settings::PackageSettings;
    #[derive(Debug, thiserror::Error)]
    #[error("x")]
    pub struct PackageError;
    impl PackageError {
        pub fn reason(&self) -> &'static str {
            "x"
        }
    }
    pub struct PackageInstaller;
    impl PackageInstaller {
        pub fn new(m: PackageManager, s: &PackageSettings) -> Self {
            todo!()
        }
        pub async fn install(&self, p: &[String]) -> Result<(), PackageError> {
            todo!()
        }
    }
}
pub mod users {
    use super::os::Family;
    use super::passphrase::Passphrase;
    use std::path::{Path, PathBuf};
    #[derive(Debug, thiserror::Error)]
    #[error("x")]
    pub struct UserError;
    impl UserError {
        pub fn reason(&self) -> &'static str {
            "x"
        }
    }
    pub struct UserInfo {
        pub name: String,
        pub uid: u32,
        pub gid: u32,
        pub home: PathBuf,
        pub shell: PathBuf,
    }
    pub struct UserManager;
    impl UserManager {
        pub fn new(root: &Path) -> Self {
            todo!()
        }
        pub async fn ensure_user(&self, n: &str, f: Family) -> Result<UserInfo, UserError> {
            todo!()
        }
        pub fn lookup(&self, n: &str) -> Result<Option<UserInfo>, UserError> {
            todo!()
        }
        pub async fn set_password(&self, n: &str, p: &Passphrase) -> Result<(), UserError> {
            todo!()
        }
    }
}
