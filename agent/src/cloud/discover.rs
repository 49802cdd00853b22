//! Where the instance identity comes from: the config drive first, the metadata service second
//! (retried within a time budget), neither meaning a local-only run. Also the one-time
//! passphrase publication, remembered by a local marker.

use std::path::Path;
use std::time::Duration;

use crate::cloud::identity::{ConfigDrive, IdentityError, InstanceIdentity};
use crate::cloud::metadata::{MetadataError, MetadataService, PasswordOutcome};
use crate::platform::passphrase::Passphrase;
use crate::state::InstanceSource;

/// Longest pause between two attempts to reach the metadata service.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(10);

/// Where the identity was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentitySource {
    /// `openstack/latest/meta_data.json` on the config drive.
    ConfigDrive,
    /// The metadata service.
    MetadataService,
}

impl IdentitySource {
    /// For logs and `validate`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ConfigDrive => "config drive",
            Self::MetadataService => "metadata service",
        }
    }
}

impl From<IdentitySource> for InstanceSource {
    fn from(source: IdentitySource) -> Self {
        match source {
            IdentitySource::ConfigDrive => Self::ConfigDrive,
            IdentitySource::MetadataService => Self::MetadataService,
        }
    }
}

/// The outcome of looking for the identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    /// Found.
    Found(InstanceIdentity, IdentitySource),
    /// Neither source has it; the agent runs local-only. The text says why.
    LocalOnly(String),
}

/// Config drive first; then, when given, the metadata service, retried on transient failures
/// until `budget` is spent. A malformed config drive is an error (someone gave bad data); an
/// unreachable metadata service is not (the instance may simply have none).
pub async fn discover_identity(
    drive: &ConfigDrive,
    service: Option<&MetadataService>,
    budget: Duration,
) -> Result<Discovery, IdentityError> {
    let drive_note = match drive.identity() {
        Ok(identity) => return Ok(Discovery::Found(identity, IdentitySource::ConfigDrive)),
        Err(IdentityError::Missing { path }) => format!("no config drive ({})", path.display()),
        Err(e) => return Err(e),
    };
    let Some(service) = service else {
        return Ok(Discovery::LocalOnly(format!(
            "{drive_note} and no metadata service configured"
        )));
    };
    match with_retries(budget, || service.identity()).await {
        Ok(Some(identity)) => Ok(Discovery::Found(identity, IdentitySource::MetadataService)),
        Ok(None) => Ok(Discovery::LocalOnly(format!(
            "{drive_note}; the metadata service at {} has no meta_data.json",
            service.base_url()
        ))),
        Err(e) => Ok(Discovery::LocalOnly(format!("{drive_note}; {e}"))),
    }
}

/// Run `attempt` until it succeeds, fails for good, or `budget` is spent (capped exponential
/// backoff from 1 s).
pub async fn with_retries<T, F, Fut>(budget: Duration, mut attempt: F) -> Result<T, MetadataError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, MetadataError>>,
{
    let deadline = tokio::time::Instant::now() + budget;
    let mut delay = Duration::from_secs(1);
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(e) if e.is_transient() && tokio::time::Instant::now() + delay < deadline => {
                tracing::debug!(target: "exoagent::cloud", error = %e, retry_in = ?delay, "metadata service not answering yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_RETRY_DELAY);
            }
            Err(e) => return Err(e),
        }
    }
}

/// What [`publish_password_once`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Publication {
    /// The marker says it was published by an earlier run: nothing sent.
    AlreadyDone,
    /// Sent now (or the endpoint already held it).
    Published(PasswordOutcome),
}

/// Publish the passphrase unless `marker` exists; write `marker` afterwards. After Exosphere
/// reads and clears the endpoint it accepts a new POST, so the marker — not the endpoint — is
/// what keeps a restarted agent from publishing again.
pub async fn publish_password_once(
    service: &MetadataService,
    passphrase: &Passphrase,
    marker: &Path,
    budget: Duration,
) -> Result<Publication, MetadataError> {
    if marker.exists() {
        return Ok(Publication::AlreadyDone);
    }
    let outcome = with_retries(budget, || service.publish_password(passphrase)).await?;
    if let Err(e) = crate::fsutil::write_atomic(marker, b"", 0o600, None) {
        tracing::warn!(target: "exoagent::cloud", path = %marker.display(), error = %e, "cannot record the password publication; a restart will try again (and get 409)");
    }
    Ok(Publication::Published(outcome))
}
