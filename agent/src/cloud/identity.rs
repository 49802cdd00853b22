//! Reads `openstack/latest/meta_data.json` from a config-drive directory into typed, partial
//! structs: data that is legitimately absent is `None`, not an error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// What the agent needs to know about the instance it runs on.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct InstanceIdentity {
    /// The Nova server UUID.
    pub uuid: String,
    /// The server name.
    #[serde(default)]
    pub name: Option<String>,
    /// The hostname Nova derived (`<name>.novalocal`).
    #[serde(default)]
    pub hostname: Option<String>,
    /// The project (tenant) id.
    #[serde(default)]
    pub project_id: Option<String>,
    /// Server metadata; Nova omits the key entirely when there is none.
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
}

/// Exosphere's `exoGuac` metadata: which Guacamole connections were asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct ExoGuac {
    /// The web terminal.
    pub ssh: bool,
    /// The web desktop.
    pub vnc: bool,
}

impl InstanceIdentity {
    /// The `exoGuac` choice, when present and well formed.
    pub fn exo_guac(&self) -> Option<ExoGuac> {
        self.meta
            .get("exoGuac")
            .and_then(|raw| serde_json::from_str(raw).ok())
    }
}

/// Why the identity could not be read.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// No `meta_data.json` where the config drive should be.
    #[error("no config drive metadata at '{path}'")]
    Missing {
        /// The expected file.
        path: PathBuf,
    },
    /// The file exists but cannot be read.
    #[error("failed to read '{path}': {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not the JSON we expect.
    #[error("failed to parse '{path}': {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: serde_json::Error,
    },
}

impl IdentityError {
    /// Short stable reason for reports.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing { .. } => "identity-missing",
            Self::Read { .. } => "identity-unreadable",
            Self::Parse { .. } => "identity-invalid",
        }
    }
}

/// A mounted config drive or a directory laid out like one.
#[derive(Debug, Clone)]
pub struct ConfigDrive {
    root: PathBuf,
}

impl ConfigDrive {
    /// A reader for the drive mounted (or laid out) at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn latest(&self, name: &str) -> PathBuf {
        self.root.join("openstack/latest").join(name)
    }

    /// The instance identity from `openstack/latest/meta_data.json`.
    pub fn identity(&self) -> Result<InstanceIdentity, IdentityError> {
        let path = self.latest("meta_data.json");
        let text =
            read_optional(&path)?.ok_or_else(|| IdentityError::Missing { path: path.clone() })?;
        serde_json::from_str(&text).map_err(|source| IdentityError::Parse { path, source })
    }

    /// The raw user data, `None` when the server has none.
    pub fn user_data(&self) -> Result<Option<String>, IdentityError> {
        read_optional(&self.latest("user_data"))
    }
}

fn read_optional(path: &Path) -> Result<Option<String>, IdentityError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(IdentityError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/config-drive")
    }

    #[test]
    fn reads_the_fixture_drive() {
        let id = ConfigDrive::new(fixture()).identity().unwrap();
        assert_eq!(id.uuid, "6d8c2f0e-3b1a-4c55-9f0e-2a7d1c9b4e11");
        assert_eq!(id.name.as_deref(), Some("sandbox-instance"));
        assert_eq!(
            id.exo_guac(),
            Some(ExoGuac {
                ssh: true,
                vnc: false
            })
        );
    }

    #[test]
    fn absent_meta_is_empty_and_absent_user_data_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let latest = dir.path().join("openstack/latest");
        std::fs::create_dir_all(&latest).unwrap();
        std::fs::write(latest.join("meta_data.json"), r#"{"uuid":"u-1"}"#).unwrap();
        let drive = ConfigDrive::new(dir.path());
        let id = drive.identity().unwrap();
        assert!(id.meta.is_empty());
        assert_eq!(id.exo_guac(), None);
        assert_eq!(drive.user_data().unwrap(), None);
    }

    #[test]
    fn missing_and_malformed_are_distinct_errors() {
        let dir = tempfile::tempdir().unwrap();
        let drive = ConfigDrive::new(dir.path());
        assert_eq!(drive.identity().unwrap_err().reason(), "identity-missing");
        let latest = dir.path().join("openstack/latest");
        std::fs::create_dir_all(&latest).unwrap();
        std::fs::write(latest.join("meta_data.json"), "{not json").unwrap();
        let err = drive.identity().unwrap_err();
        assert_eq!(err.reason(), "identity-invalid");
        assert!(err.to_string().contains("meta_data.json"));
    }
}
