//! Sinks for state changes: Exosphere console lines, load lines, systemd notifications, the
//! login banner.
//!
//! Reporters only ever read snapshots from the state hub's `watch` channel, so a slow or stuck
//! sink can never block a service.

pub mod banner;
pub mod console;
pub mod load;
pub mod notify;
pub mod nova;
