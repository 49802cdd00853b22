//! Guacamole without Java: the protocol codec, guacd's handshake, the WebSocket tunnel, logins
//! and tokens, and the web side that serves the client page and the token API Exosphere uses.

pub mod assets;
pub mod auth;
pub mod config;
pub mod handshake;
pub mod protocol;
pub mod tunnel;
pub mod web;
