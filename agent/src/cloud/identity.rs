//! The instance's documents (`meta_data.json`, `network_data.json`, `vendor_data2.json`,
//! `user_data`) as typed, partial structs, and reading them from a config-drive directory:
//! data that is legitimately absent is `None` or empty, not an error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::input::{read_capped, ReadError, MAX_DRIVE_FILE_BYTES};

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

/// `network_data.json`: the instance's links, networks and network services. Fields the agent
/// does not use are ignored; Nova serves `{}` for a server without networks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct NetworkData {
    /// Physical and virtual interfaces.
    #[serde(default)]
    pub links: Vec<NetworkLink>,
    /// Layer-3 networks on those links.
    #[serde(default)]
    pub networks: Vec<Network>,
    /// Services such as DNS resolvers.
    #[serde(default)]
    pub services: Vec<NetworkService>,
}

/// One interface.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct NetworkLink {
    /// Link id that networks refer to (e.g. `tap…`).
    pub id: String,
    /// `ovs`, `bridge`, `phy`, `vlan`, `bond`, ...
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// MAC address.
    #[serde(default)]
    pub ethernet_mac_address: Option<String>,
    /// MTU, when the cloud says.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// The Neutron port id.
    #[serde(default)]
    pub vif_id: Option<String>,
}

/// One network on a link.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Network {
    /// Network id within the document (`network0`, ...).
    pub id: String,
    /// `ipv4_dhcp`, `ipv4`, `ipv6_slaac`, `ipv6_dhcpv6-stateful`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The link id.
    #[serde(default)]
    pub link: Option<String>,
    /// The Neutron network id.
    #[serde(default)]
    pub network_id: Option<String>,
    /// Static address, for `ipv4`/`ipv6`.
    #[serde(default)]
    pub ip_address: Option<String>,
    /// Netmask, for static networks.
    #[serde(default)]
    pub netmask: Option<String>,
    /// Static routes.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Per-network services.
    #[serde(default)]
    pub services: Vec<NetworkService>,
}

/// A static route.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Route {
    /// Destination network.
    pub network: String,
    /// Destination netmask.
    pub netmask: String,
    /// Next hop.
    pub gateway: String,
}

/// A network service (`dns` and its address).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct NetworkService {
    /// `dns`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// Where it is.
    pub address: String,
}

/// `vendor_data2.json`: one JSON value per vendordata provider (`static` for the operator's
/// StaticJSON file, or a dynamic provider's name).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct VendorData {
    /// Provider name → its document.
    pub providers: BTreeMap<String, serde_json::Value>,
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
        self.document("meta_data.json")?
            .ok_or_else(|| IdentityError::Missing {
                path: self.latest("meta_data.json"),
            })
    }

    /// The raw user data, `None` when the server has none.
    pub fn user_data(&self) -> Result<Option<String>, IdentityError> {
        read_optional(&self.latest("user_data"))
    }

    /// `network_data.json`, `None` when the drive has none.
    pub fn network_data(&self) -> Result<Option<NetworkData>, IdentityError> {
        self.document("network_data.json")
    }

    /// `vendor_data2.json`, `None` when the drive has none.
    pub fn vendor_data(&self) -> Result<Option<VendorData>, IdentityError> {
        self.document("vendor_data2.json")
    }

    fn document<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<Option<T>, IdentityError> {
        let path = self.latest(name);
        match read_optional(&path)? {
            None => Ok(None),
            Some(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|source| IdentityError::Parse { path, source }),
        }
    }
}

/// A drive document, refusing what is not a regular file or is oversized: the directory may be
/// a sandbox's or an image's, and a FIFO there must not hang planning.
fn read_optional(path: &Path) -> Result<Option<String>, IdentityError> {
    match read_capped(path, MAX_DRIVE_FILE_BYTES) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(IdentityError::Read {
            path: path.to_path_buf(),
            source: match e {
                ReadError::Io(source) => source,
                refused => std::io::Error::new(std::io::ErrorKind::InvalidData, refused),
            },
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
    fn network_and_vendor_data_are_typed_and_optional() {
        let drive = ConfigDrive::new(fixture());
        let network = drive.network_data().unwrap().unwrap();
        assert_eq!(network.links[0].mtu, Some(1450));
        assert_eq!(network.networks[0].kind, "ipv4_dhcp");
        assert_eq!(network.networks[0].link.as_deref(), Some("tap0a1b2c3d-4e"));
        assert!(network.services.is_empty());
        let vendor = drive.vendor_data().unwrap().unwrap();
        assert!(vendor.providers.contains_key("static"));

        let dir = tempfile::tempdir().unwrap();
        let latest = dir.path().join("openstack/latest");
        std::fs::create_dir_all(&latest).unwrap();
        // What Nova serves for a server without networks, and a StaticJSON provider.
        std::fs::write(latest.join("network_data.json"), "{}").unwrap();
        std::fs::write(
            latest.join("vendor_data2.json"),
            r#"{"static": {"site": "x"}, "dynamic1": {}}"#,
        )
        .unwrap();
        let drive = ConfigDrive::new(dir.path());
        assert_eq!(drive.user_data().unwrap(), None);
        assert_eq!(drive.network_data().unwrap(), Some(NetworkData::default()));
        let vendor = drive.vendor_data().unwrap().unwrap();
        assert_eq!(vendor.providers["static"]["site"], "x");
        std::fs::write(latest.join("network_data.json"), r#"{"links": 3}"#).unwrap();
        assert_eq!(
            drive.network_data().unwrap_err().reason(),
            "identity-invalid"
        );
    }

    #[test]
    fn a_fifo_on_the_drive_is_refused_not_waited_on() {
        let dir = tempfile::tempdir().unwrap();
        let latest = dir.path().join("openstack/latest");
        std::fs::create_dir_all(&latest).unwrap();
        nix::unistd::mkfifo(
            &latest.join("meta_data.json"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let err = ConfigDrive::new(dir.path()).identity().unwrap_err();
        assert_eq!(err.reason(), "identity-unreadable");
        assert!(err.to_string().contains("not a regular file"), "{err}");
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
