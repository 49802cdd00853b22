//! Guacamole support: the protocol spoken between browsers, exoagent's tunnel and guacd.

pub mod protocol;
