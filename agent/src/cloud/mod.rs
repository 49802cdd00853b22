//! OpenStack instance identity: the native `openstack/latest/*.json` documents, read from a
//! config drive (or a directory shaped like one). The metadata service comes with the cloud
//! issue; this module keeps the typed surface both sources will share.

pub mod identity;

pub use identity::{ConfigDrive, IdentityError, InstanceIdentity};
