//! The machine underneath: OS detection, the package manager, the instance user, the passphrase,
//! and the process primitives services run with (dropping privileges, signalling process groups).
//!
//! Everything here takes its root directory and executables through constructors, so tests run
//! against a temporary root with the real tools and production uses `/` and the tools by name.

pub mod cloud_init;
pub mod confine;
pub mod gpu;
pub mod os;
pub mod packages;
pub mod passphrase;
pub mod ports;
pub mod privileges;
pub mod process_group;
pub mod procfs;
pub mod resident;
pub mod signals;
pub mod startup;
pub mod subids;
pub mod users;
pub mod uv;

pub(crate) mod exec;
