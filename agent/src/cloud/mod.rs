//! The cloud the instance runs in: its identity (config drive first, metadata service second)
//! and what the agent publishes through the metadata service.

pub mod clouds;
pub mod discover;
pub mod drive;
pub mod identity;
pub mod keystone;
pub mod metadata;
pub mod nova;
mod settings;
pub mod uap;

pub use discover::{discover_identity, Discovery, IdentitySource};
pub use identity::{ConfigDrive, IdentityError, InstanceIdentity, NetworkData, VendorData};
pub use metadata::{MetadataError, MetadataService, PasswordOutcome};
pub use settings::{uap_hostname, CloudSettings, DEFAULT_METADATA_URL};

/// An error and its causes, `outer: inner: innermost` (an HTTP client's own message alone, such
/// as "error sending request", hides why: refused, timed out, untrusted certificate).
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let part = inner.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = inner.source();
    }
    text
}
