//! exoagent: installs, configures and supervises a research instance's interactive services,
//! and reports their readiness to the cloud, the console and the instance owner.
#![deny(missing_docs)]

pub mod agent;
pub mod alerts;
pub mod api;
pub mod cli;
pub mod cloud;
pub mod config;
pub mod delivery;
pub mod front;
pub mod fsutil;
pub mod host;
pub mod httpserve;
pub mod idle;
pub mod input;
pub mod model;
pub mod paths;
pub mod platform;
pub mod report;
pub mod schema;
pub mod services;
pub mod state;
pub mod supervise;
pub mod text;
pub mod volumes;

pub use agent::{run, AgentOptions, Mode};
