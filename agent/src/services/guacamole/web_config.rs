//! What the Guacamole web side serves: its listening address, where guacd is, the account, and
//! the connections (`shell`, `desktop`) with guacd parameters. Written by the agent as JSON
//! (non-secret) beside a 0600 passphrase file, read by `exoagent guacamole-web`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use serde::{Deserialize, Serialize};

use super::forwarded::Cidr;

/// The data source Exosphere names in connection ids and expects in token answers.
pub const DATA_SOURCE: &str = "default";
/// Replaced by the passphrase in connection parameters (as in Guacamole's `user-mapping.xml`).
pub const PASSWORD_TOKEN: &str = "${GUAC_PASSWORD}";

/// One connection: a guacd protocol and its parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Connection {
    /// `ssh` or `vnc`.
    pub protocol: String,
    /// guacd parameter name → value; [`PASSWORD_TOKEN`] stands for the passphrase.
    pub parameters: BTreeMap<String, String>,
}

/// The web side's configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebConfig {
    /// Where to listen (`0.0.0.0:49528`).
    pub listen: SocketAddr,
    /// guacd (`127.0.0.1:4822`).
    pub guacd: SocketAddr,
    /// The command that runs guacd in the foreground, as a child of the web side (restarted
    /// when it exits); absent when something else runs guacd.
    #[serde(default)]
    pub guacd_command: Option<Vec<String>>,
    /// The instance user: the only login.
    pub username: String,
    /// The file holding the passphrase (0600, owned by the user the web side runs as).
    pub password_file: PathBuf,
    /// Tokens expire after this many seconds without use (at least 3600, as Guacamole's 60
    /// minutes; Exosphere renews after 55).
    pub session_timeout_s: u64,
    /// By name (`shell`, `desktop`).
    pub connections: BTreeMap<String, Connection>,
    /// Peers whose `X-Forwarded-For` is believed (the cloud's proxy); from anyone else the
    /// header is ignored, so a client cannot pick the address the login limit counts.
    #[serde(default)]
    pub trusted_proxies: Vec<Cidr>,
    /// The agent's idleness notice (`/run/exoagent/notice/idle.json`) the page shows; absent:
    /// none shown.
    #[serde(default)]
    pub idle_notice: Option<PathBuf>,
}

/// Why the configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read.
    #[error("failed to read '{path}': {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The JSON does not match.
    #[error("'{path}': {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the field.
        message: String,
    },
}

impl ConfigError {
    /// Short stable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Read { .. } => "guacamole-config-unreadable",
            Self::Invalid { .. } => "guacamole-config-invalid",
        }
    }
}

impl WebConfig {
    /// Read and check the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        let deserializer = &mut serde_json::Deserializer::from_str(&text);
        let config: WebConfig = serde_path_to_error::deserialize(deserializer)
            .map_err(|e| invalid(format!("{}: {}", e.path(), e.inner())))?;
        if config.session_timeout_s < 3600 {
            return Err(invalid(format!(
                "session_timeout_s: {} is below 3600 (Exosphere renews tokens after 55 minutes)",
                config.session_timeout_s
            )));
        }
        if config
            .guacd_command
            .as_ref()
            .is_some_and(|argv| argv.is_empty())
        {
            return Err(invalid("guacd_command: an empty command".to_owned()));
        }
        for (name, connection) in &config.connections {
            if !matches!(connection.protocol.as_str(), "ssh" | "vnc") {
                return Err(invalid(format!(
                    "connections.{name}.protocol: '{}' is not ssh or vnc",
                    connection.protocol
                )));
            }
        }
        Ok(config)
    }

    /// The session timeout.
    pub fn session_timeout(&self) -> Duration {
        Duration::from_secs(self.session_timeout_s)
    }

    /// Read the passphrase from [`WebConfig::password_file`] (one line; the newline dropped).
    pub fn password(&self) -> Result<String, ConfigError> {
        let text =
            std::fs::read_to_string(&self.password_file).map_err(|source| ConfigError::Read {
                path: self.password_file.clone(),
                source,
            })?;
        Ok(text.trim_end_matches(['\n', '\r']).to_owned())
    }
}

impl Connection {
    /// The parameters with the passphrase filled in.
    pub fn resolved(&self, password: &str) -> BTreeMap<String, String> {
        self.parameters
            .iter()
            .map(|(k, v)| (k.clone(), v.replace(PASSWORD_TOKEN, password)))
            .collect()
    }

    /// Whether SFTP rides beside another protocol (a desktop's file transfer): guacd aborts
    /// such a session when its SFTP part fails, so the web side may reopen it without.
    pub fn has_side_sftp(&self) -> bool {
        self.protocol != "ssh"
            && self.parameters.get("enable-sftp").map(String::as_str) == Some("true")
    }

    /// `parameters` (resolved) with SFTP turned off and its settings dropped.
    pub fn without_sftp(parameters: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        let mut parameters: BTreeMap<String, String> = parameters
            .iter()
            .filter(|(k, _)| !k.starts_with("sftp-"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        parameters.insert("enable-sftp".into(), "false".into());
        parameters
    }
}

/// The connection name in a Guacamole client id: base64 of `name\0c\0default`, padded standard
/// (what Exosphere sends) or unpadded URL-safe (current Guacamole). `None` unless it names a
/// connection (`c`) of data source `default`.
pub fn connection_from_client_id(id: &str) -> Option<String> {
    let bytes = [
        &base64::engine::general_purpose::STANDARD,
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        &base64::engine::general_purpose::STANDARD_NO_PAD,
    ]
    .iter()
    .find_map(|engine| engine.decode(id).ok())?;
    let text = String::from_utf8(bytes).ok()?;
    let mut parts = text.split('\0');
    let (name, kind, source) = (parts.next()?, parts.next()?, parts.next()?);
    (parts.next().is_none() && kind == "c" && source == DATA_SOURCE && !name.is_empty())
        .then(|| name.to_owned())
}

/// The id Exosphere builds for a connection name.
pub fn client_id(name: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{name}\0c\0{DATA_SOURCE}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_in_both_encodings() {
        // Exosphere's desktop link (reference/exosphere.md).
        assert_eq!(client_id("desktop"), "ZGVza3RvcABjAGRlZmF1bHQ=");
        assert_eq!(
            connection_from_client_id("ZGVza3RvcABjAGRlZmF1bHQ=").as_deref(),
            Some("desktop")
        );
        assert_eq!(
            connection_from_client_id("ZGVza3RvcABjAGRlZmF1bHQ").as_deref(),
            Some("desktop")
        );
        assert_eq!(
            connection_from_client_id(&client_id("shell")).as_deref(),
            Some("shell")
        );
        for bad in [
            "",
            "!!",
            "c2hlbGw=",
            &base64::engine::general_purpose::STANDARD.encode("x\0g\0default"),
        ] {
            assert_eq!(connection_from_client_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn config_is_checked_and_the_password_filled_in() {
        let dir = tempfile::tempdir().unwrap();
        let pass = dir.path().join("pass");
        std::fs::write(&pass, "alpha beta\n").unwrap();
        let good = serde_json::json!({
            "listen": "127.0.0.1:49528", "guacd": "127.0.0.1:4822", "username": "exouser",
            "password_file": pass, "session_timeout_s": 3600,
            "connections": {"shell": {"protocol": "ssh", "parameters": {
                "hostname": "127.0.0.1", "password": PASSWORD_TOKEN}}}
        });
        let file = dir.path().join("web.json");
        std::fs::write(&file, good.to_string()).unwrap();
        let config = WebConfig::load(&file).unwrap();
        let password = config.password().unwrap();
        assert_eq!(password, "alpha beta");
        assert_eq!(
            config.connections["shell"].resolved(&password)["password"],
            "alpha beta"
        );

        let mut bad = good.clone();
        bad["connections"]["shell"]["protocol"] = "rdp".into();
        std::fs::write(&file, bad.to_string()).unwrap();
        let e = WebConfig::load(&file).unwrap_err().to_string();
        assert!(e.contains("connections.shell.protocol"), "{e}");
        let mut bad = good.clone();
        bad["colour"] = "blue".into();
        std::fs::write(&file, bad.to_string()).unwrap();
        let e = WebConfig::load(&file).unwrap_err().to_string();
        assert!(e.contains("colour"), "{e}");
        let mut bad = good;
        bad["session_timeout_s"] = 60.into();
        std::fs::write(&file, bad.to_string()).unwrap();
        assert_eq!(
            WebConfig::load(&file).unwrap_err().reason(),
            "guacamole-config-invalid"
        );
    }
}
