//! The local status API: axum on a Unix socket, and the client the CLI uses.
