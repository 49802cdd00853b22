//! `[cloud]`: where the metadata service is and what the agent publishes through it.

use std::path::PathBuf;
use std::time::Duration;

/// The metadata service's address on every OpenStack cloud.
pub const DEFAULT_METADATA_URL: &str = "http://169.254.169.254";

/// `[cloud]`: the metadata service and what the agent publishes through it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudSettings {
    /// The metadata service base URL as configured; `None` when not set, which means
    /// [`DEFAULT_METADATA_URL`] on an instance and no metadata service in the sandbox.
    pub metadata_url: Option<String>,
    /// How long to keep trying to reach the metadata service at start-up.
    pub metadata_timeout: Duration,
    /// Publish the passphrase through the metadata service's password endpoint (once).
    pub publish_password: bool,
    /// The clouds.yaml with the credential for reporting to Nova; `None`: no Nova reporting.
    pub clouds_yaml: Option<PathBuf>,
    /// Which cloud in it.
    pub cloud_name: String,
    /// The host name of the cloud's User Application Proxy (Exosphere's `userAppProxy` for the
    /// region), so the banner and `exoagent status` can show the URLs a browser uses; `None`:
    /// unknown, local URLs only.
    pub uap_hostname: Option<String>,
    /// Watch the metadata service for the cloud's request (`exoAgentRequest`) and apply it
    /// live (never with a config drive, which cannot change).
    pub watch_request: bool,
    /// Time between two looks at the metadata service for the request (jittered).
    pub request_interval: Duration,
}

/// A host name the UAP's URLs can be built on: lowercase DNS labels (letters, digits, `-`)
/// separated by dots, at most 253 characters; `None` otherwise.
pub fn uap_hostname(text: &str) -> Option<String> {
    let host = text.trim().trim_end_matches('.').to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    (host.len() <= 253 && host.contains('.') && host.split('.').all(label_ok)).then_some(host)
}

impl Default for CloudSettings {
    fn default() -> Self {
        Self {
            metadata_url: None,
            metadata_timeout: Duration::from_secs(120),
            publish_password: true,
            clouds_yaml: None,
            cloud_name: "openstack".to_owned(),
            uap_hostname: None,
            watch_request: true,
            request_interval: Duration::from_secs(60),
        }
    }
}
