//! The cloud the instance runs in: its identity (config drive first, metadata service second)
//! and what the agent publishes through the metadata service.

pub mod clouds;
pub mod discover;
pub mod drive;
pub mod identity;
pub mod keystone;
pub mod metadata;
pub mod nova;

pub use discover::{discover_identity, Discovery, IdentitySource};
pub use identity::{ConfigDrive, IdentityError, InstanceIdentity, NetworkData, VendorData};
pub use metadata::{MetadataError, MetadataService, PasswordOutcome};
