//! `exoagent front`: one TLS front as its own supervised process (run by the agent for each
//! fronted service; usable by hand or in tests with the same flags).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::proxy::{serve, Front, FrontLimits};
use super::tls::{TlsFiles, TlsSetup};
use crate::model::Cidr;

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
/// when the port cannot be bound.
pub async fn run(args: FrontArgs) -> anyhow::Result<ExitCode> {
    let files = TlsFiles {
        cert: args.cert_file,
        key: args.key_file,
        client_ca: args.client_ca_file,
    };
    let tls = match TlsSetup::load(&files) {
        Ok(tls) => tls,
        Err(e) => {
            eprintln!("exoagent front: {e} [{}]", e.reason());
            return Ok(ExitCode::from(78));
        }
    };
    // A client certificate required on TLS means nothing if plain HTTP on the same port
    // reaches the service without one.
    let require_tls = args.require_tls || files.client_ca.is_some();
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("exoagent front: failed to listen on {}: {e}", args.listen);
            return Ok(ExitCode::from(71));
        }
    };
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
    Ok(ExitCode::SUCCESS)
}
