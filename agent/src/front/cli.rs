//! `exoagent front`: one TLS front as its own supervised process (run by the agent for each
//! fronted service; usable by hand or in tests with the same flags).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::proxy::{serve, Front, FrontLimits};
use super::tls::{TlsFiles, TlsSetup};
use crate::model::Cidr;
use crate::platform::confine;

/// Arguments of `exoagent front`.
#[derive(Debug, Args)]
pub struct FrontArgs {
    /// The public address to listen on.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: SocketAddr,
    /// The service behind it.
    #[arg(long, value_name = "ADDR:PORT")]
    pub backend: SocketAddr,
    /// The certificate chain to serve (PEM, leaf first).
    #[arg(long = "cert-file", alias = "cert", value_name = "FILE")]
    pub cert_file: PathBuf,
    /// The path of its private key (PEM, mode 0600), never the key itself.
    #[arg(long = "key-file", alias = "key", value_name = "FILE")]
    pub key_file: PathBuf,
    /// Require a client certificate issued by this CA (PEM): mutual TLS. Plain HTTP, which
    /// carries no certificate, is then refused as with `--require-tls`.
    #[arg(long = "client-ca-file", alias = "client-ca", value_name = "FILE")]
    pub client_ca_file: Option<PathBuf>,
    /// Refuse plain HTTP (answered 400 with a clear message).
    #[arg(long)]
    pub require_tls: bool,
    /// A proxy whose X-Forwarded-For is extended rather than replaced (repeatable).
    #[arg(long = "trusted-proxy", value_name = "CIDR", value_parser = parse_cidr)]
    pub trusted_proxies: Vec<Cidr>,
    /// Open client connections at most.
    #[arg(long, default_value_t = FrontLimits::DEFAULT.max_connections)]
    pub max_connections: usize,
}

fn parse_cidr(text: &str) -> Result<Cidr, String> {
    text.parse().map_err(|()| {
        format!(
            "'{}' is not an IP address or CIDR block",
            text.escape_debug()
        )
    })
}

/// Serve until SIGTERM or SIGINT. Exit 78 on unusable TLS files (restarting cannot help), 71
/// when the port cannot be bound or the process cannot be confined, 70 without a runtime. The
/// files are read and the port bound first; then the process confines itself
/// (platform/confine.rs) before its one worker thread starts.
pub fn run(args: FrontArgs) -> ExitCode {
    let files = TlsFiles {
        cert: args.cert_file,
        key: args.key_file,
        client_ca: args.client_ca_file,
    };
    let tls = match TlsSetup::load(&files) {
        Ok(tls) => tls,
        Err(e) => {
            eprintln!("exoagent front: {e} [{}]", e.reason());
            return ExitCode::from(78);
        }
    };
    // A client certificate required on TLS means nothing if plain HTTP on the same port
    // reaches the service without one.
    let require_tls = args.require_tls || files.client_ca.is_some();
    let listener = match confine::bind_listener(args.listen) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("exoagent front: failed to listen on {}: {e}", args.listen);
            return ExitCode::from(71);
        }
    };
    // The certificate and key are re-read when renewed (a new file renamed into place), so
    // their directories stay readable, also the ones their symbolic links lead to (certbot's
    // `live/` links into `archive/`, where renewals land); the client CA is read once, now.
    let mut read_beneath: Vec<std::path::PathBuf> = Vec::new();
    for file in [&files.cert, &files.key] {
        let resolved = std::fs::canonicalize(file).ok();
        for path in std::iter::once(file.as_path()).chain(resolved.as_deref()) {
            let dir = match path.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
                _ => ".".into(),
            };
            if !read_beneath.contains(&dir) {
                read_beneath.push(dir);
            }
        }
    }
    let allowed = confine::Allowed {
        read_beneath,
        rename_beneath: Vec::new(),
        connect_ports: vec![args.backend.port()],
    };
    // One worker: it used less CPU per request than two (work stealing between them costs more
    // than it gains for one service's traffic), matching nginx with two workers on this
    // machine (bench/results/tls-front.md).
    confine::confine_then_run("front", &allowed, 1, || async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        tracing::info!(
            target: "exoagent::front",
            listen = %args.listen,
            backend = %args.backend,
            mutual = files.client_ca.is_some(),
            require_tls,
            "TLS front serving"
        );
        let shutdown = crate::platform::signals::stop_requested()?;
        let front = Front {
            backend: args.backend,
            tls: Some(tls),
            require_tls,
            trusted_proxies: args.trusted_proxies,
            limits: FrontLimits {
                max_connections: args.max_connections.max(1),
                ..FrontLimits::DEFAULT
            },
        };
        serve(listener, front, shutdown).await;
        Ok(())
    })
}
