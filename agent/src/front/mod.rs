//! The upstream TLS front (DESIGN §4.5, docs/uap.md): a process per fronted service that owns
//! the service's public port, terminates TLS (or passes plain HTTP) and forwards to the service
//! on loopback, plus the certificate it serves.

pub mod cli;
pub mod proxy;
pub mod tls;

pub use proxy::{serve, Front, FrontLimits, Hop};
pub use tls::{TlsError, TlsFiles, TlsSetup};
